"""Seeded generators of synthetic in-context-learning tasks.

Every task draws from an explicit ``torch.Generator`` (never the global RNG), so a batch is a pure function of the
generator's seed and state. Batches are created on the generator's device.

Regression-family tasks (``LinearRegressionTask``, ``SparseRegressionTask``, ``ClassificationTask``) return a
:class:`RegressionBatch` with ``xs [B,k,d]``, ``ys [B,k]`` (noisy targets), ``ys_clean [B,k]`` (noiseless) and
``betas [B,d]``. Inputs are x ~ N(0, I_d) throughout, which the closed-form baselines (one-step GD step size,
Bayes posterior) rely on.

Token tasks (``InductionTask``, ``CopyTask``, ``FactualRecallTask``) return a :class:`SequenceBatch` of
``tokens [B,T]`` (int64) and next-token ``targets [B,T]`` with ``IGNORE_INDEX`` where no loss is taken.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Union

import torch
from torch import Tensor

__all__ = [
    "IGNORE_INDEX",
    "RegressionBatch",
    "SequenceBatch",
    "ICLTask",
    "LinearRegressionTask",
    "SparseRegressionTask",
    "ClassificationTask",
    "InductionTask",
    "CopyTask",
    "FactualRecallTask",
    "TASK_REGISTRY",
    "make_task",
    "make_generator",
]

#: Target value meaning "no loss at this position" (the default of ``torch.nn.functional.cross_entropy``).
IGNORE_INDEX = -100


def make_generator(seed: int, device: Union[str, torch.device] = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded with ``seed`` (the only RNG the tasks use)."""
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(int(seed))
    return g


@dataclass
class RegressionBatch:
    """A batch of in-context regression (or classification) sequences.

    Attributes:
        xs: inputs, [B, k, d], float32.
        ys: observed targets, [B, k] (x·β + noise; ±1 labels for classification).
        ys_clean: noiseless targets, [B, k] (x·β; sign(x·β) for classification).
        betas: the task vector of each sequence, [B, d].
        task_ids: index into the finite task pool, [B] int64, or None for an infinite pool.
        kind: "regression" (squared loss) or "classification" (logistic loss on ±1 labels).
    """

    xs: Tensor
    ys: Tensor
    ys_clean: Tensor
    betas: Tensor
    task_ids: Optional[Tensor] = None
    kind: str = "regression"

    @property
    def batch_size(self) -> int:
        return int(self.xs.shape[0])

    def slice(self, start: int, stop: int) -> "RegressionBatch":
        """Rows ``start:stop`` of the batch (views, used for micro-batching)."""
        return RegressionBatch(
            self.xs[start:stop], self.ys[start:stop], self.ys_clean[start:stop], self.betas[start:stop],
            None if self.task_ids is None else self.task_ids[start:stop], self.kind,
        )

    def to(self, device: Union[str, torch.device]) -> "RegressionBatch":
        return RegressionBatch(
            self.xs.to(device), self.ys.to(device), self.ys_clean.to(device), self.betas.to(device),
            None if self.task_ids is None else self.task_ids.to(device), self.kind,
        )

    def num_tokens(self) -> int:
        """Tokens the model reads: each example is an x token and a y token (Garg et al. interleaving)."""
        return 2 * int(self.xs.shape[0]) * int(self.xs.shape[1])


@dataclass
class SequenceBatch:
    """A batch of token sequences for next-token prediction.

    Attributes:
        tokens: [B, T] int64 inputs.
        targets: [B, T] int64; targets[:, t] is the token to predict after reading tokens[:, :t+1],
            ``IGNORE_INDEX`` where the position is not scored.
    """

    tokens: Tensor
    targets: Tensor
    kind: str = "sequence"

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])

    def slice(self, start: int, stop: int) -> "SequenceBatch":
        return SequenceBatch(self.tokens[start:stop], self.targets[start:stop], self.kind)

    def to(self, device: Union[str, torch.device]) -> "SequenceBatch":
        return SequenceBatch(self.tokens.to(device), self.targets.to(device), self.kind)

    def num_tokens(self) -> int:
        return int(self.tokens.numel())


def _require_int(name: str, value: Any, minimum: int) -> int:
    # bool is an int subclass; True as a dimension is always a config mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _require_nonneg_float(name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return v


class ICLTask:
    """Base class: a task knows its sequence length and samples batches from a generator."""

    #: registry name, set by subclasses
    name: str = "task"

    def sample(self, batch_size: int, generator: torch.Generator, **kwargs: Any):  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def sequence_length(self) -> int:  # pragma: no cover - abstract
        """Number of positions a model must support to read one full sequence."""
        raise NotImplementedError

    def _check_batch_size(self, batch_size: int) -> int:
        return _require_int("batch_size", batch_size, 1)


class LinearRegressionTask(ICLTask):
    """In-context linear regression (Garg et al. 2022): y_i = x_iᵀβ + ε_i, x ~ N(0, I_d), ε ~ N(0, σ²).

    Args:
        d: input dimension (> 0).
        k_max: maximum number of (x, y) examples per sequence (> 0).
        noise_var: σ², variance of the label noise (≥ 0), in y² units.
        beta_cov: prior covariance Σβ of β ~ N(0, Σβ): "isotropic" (I_d) or a symmetric PSD [d, d] tensor.
        num_tasks: None for an infinite task pool (a fresh β per sequence), or M for a finite pool of M fixed β's
            drawn once from the prior (Raventós et al. 2023); each sequence then picks one uniformly.
        pool_seed: seed of the generator that draws the finite pool (independent of the batch generator, so the
            pool is the same for training and evaluation).
        device: where the pool and Σβ live; batches follow the generator's device.
    """

    name = "linear_regression"

    def __init__(
        self,
        d: int,
        k_max: int,
        noise_var: float = 0.0,
        beta_cov: Union[str, Tensor] = "isotropic",
        num_tasks: Optional[int] = None,
        pool_seed: int = 0,
        device: Union[str, torch.device] = "cpu",
    ) -> None:
        self.d = _require_int("d", d, 1)
        self.k_max = _require_int("k_max", k_max, 1)
        self.noise_var = _require_nonneg_float("noise_var", noise_var)
        self.device = torch.device(device)
        if isinstance(beta_cov, str):
            if beta_cov != "isotropic":
                raise ValueError(f"beta_cov must be 'isotropic' or a [d, d] tensor, got {beta_cov!r}")
            self.beta_cov = torch.eye(self.d, device=self.device)
            self._beta_sqrt = self.beta_cov.clone()
        else:
            cov = torch.as_tensor(beta_cov, dtype=torch.float32, device=self.device)
            if cov.shape != (self.d, self.d):
                raise ValueError(f"beta_cov must have shape ({self.d}, {self.d}), got {tuple(cov.shape)}")
            if not torch.allclose(cov, cov.T, atol=1e-6):
                raise ValueError("beta_cov must be symmetric")
            evals, evecs = torch.linalg.eigh(cov.double())
            if evals.min() < -1e-6 * max(1.0, float(evals.abs().max())):
                raise ValueError(f"beta_cov must be positive semi-definite (min eigenvalue {float(evals.min()):.3g})")
            self.beta_cov = cov
            # symmetric square root via eigh, so singular (low-rank) priors are allowed, unlike Cholesky
            self._beta_sqrt = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
            self._beta_sqrt = self._beta_sqrt.float()
        if num_tasks is not None:
            _require_int("num_tasks", num_tasks, 1)
        self.num_tasks = num_tasks
        self.pool_seed = int(pool_seed)
        self.pool: Optional[Tensor] = None
        if num_tasks is not None:
            g = make_generator(self.pool_seed, self.device)
            self.pool = self._draw_betas(num_tasks, g)  # [M, d]

    @property
    def sequence_length(self) -> int:
        return 2 * self.k_max

    def _draw_betas(self, n: int, generator: torch.Generator) -> Tensor:
        z = torch.randn(n, self.d, generator=generator, device=generator.device)
        return z @ self._beta_sqrt.to(z.device).T

    def _resolve_k(self, k: Optional[int]) -> int:
        if k is None:
            return self.k_max
        k = _require_int("k", k, 1)
        if k > self.k_max:
            raise ValueError(f"k ({k}) is larger than the context k_max ({self.k_max})")
        return k

    def sample_betas(self, batch_size: int, generator: torch.Generator):
        """β for each sequence, [B, d], and pool indices [B] (None for an infinite pool)."""
        if self.pool is None:
            return self._draw_betas(batch_size, generator), None
        ids = torch.randint(0, self.num_tasks, (batch_size,), generator=generator, device=generator.device)
        return self.pool.to(generator.device)[ids], ids

    def sample(self, batch_size: int, generator: torch.Generator, k: Optional[int] = None) -> RegressionBatch:
        """Draw ``batch_size`` sequences of ``k`` (default k_max) examples.

        Returns:
            RegressionBatch with xs [B,k,d], ys/ys_clean [B,k], betas [B,d] (float32, on the generator's device).
        """
        b = self._check_batch_size(batch_size)
        k = self._resolve_k(k)
        betas, ids = self.sample_betas(b, generator)
        xs = torch.randn(b, k, self.d, generator=generator, device=generator.device)
        ys_clean = torch.einsum("bkd,bd->bk", xs, betas)
        noise = torch.randn(b, k, generator=generator, device=generator.device) * math.sqrt(self.noise_var)
        return RegressionBatch(xs, ys_clean + noise, ys_clean, betas, ids, "regression")


class SparseRegressionTask(LinearRegressionTask):
    """Sparse linear regression: β has exactly ``sparsity`` non-zero N(0,1) entries at uniformly random places.

    The prior is not Gaussian, so the Gaussian Bayes baseline is only a reference here (Lasso-like estimators do
    better); ``beta_cov`` is the matching second moment (sparsity/d)·I for ridge comparisons.
    """

    name = "sparse_regression"

    def __init__(self, d: int, k_max: int, sparsity: int, noise_var: float = 0.0,
                 num_tasks: Optional[int] = None, pool_seed: int = 0,
                 device: Union[str, torch.device] = "cpu") -> None:
        d = _require_int("d", d, 1)
        self.sparsity = _require_int("sparsity", sparsity, 1)
        if self.sparsity > d:
            raise ValueError(f"sparsity ({sparsity}) must be <= d ({d})")
        super().__init__(d, k_max, noise_var, "isotropic", num_tasks, pool_seed, device)
        # E[ββᵀ] = (s/d) I: used by the ridge/Bayes reference baselines.
        self.beta_cov = torch.eye(d, device=self.device) * (self.sparsity / d)

    def _draw_betas(self, n: int, generator: torch.Generator) -> Tensor:
        values = torch.randn(n, self.d, generator=generator, device=generator.device)
        # the s smallest of i.i.d. uniforms give a uniformly random support of size s
        scores = torch.rand(n, self.d, generator=generator, device=generator.device)
        support = scores.argsort(dim=1)[:, : self.sparsity]
        mask = torch.zeros_like(values).scatter_(1, support, 1.0)
        return values * mask


class ClassificationTask(LinearRegressionTask):
    """In-context linear classification: labels sign(x·β) ∈ {−1, +1}, flipped with probability ``label_flip_prob``.

    ``ys_clean`` holds the unflipped labels; training uses the logistic loss softplus(−y·f).
    """

    name = "classification"

    def __init__(self, d: int, k_max: int, label_flip_prob: float = 0.0,
                 beta_cov: Union[str, Tensor] = "isotropic", num_tasks: Optional[int] = None, pool_seed: int = 0,
                 device: Union[str, torch.device] = "cpu") -> None:
        p = _require_nonneg_float("label_flip_prob", label_flip_prob)
        if p > 0.5:
            raise ValueError(f"label_flip_prob must be in [0, 0.5], got {label_flip_prob}")
        self.label_flip_prob = p
        super().__init__(d, k_max, 0.0, beta_cov, num_tasks, pool_seed, device)

    def sample(self, batch_size: int, generator: torch.Generator, k: Optional[int] = None) -> RegressionBatch:
        b = self._check_batch_size(batch_size)
        k = self._resolve_k(k)
        betas, ids = self.sample_betas(b, generator)
        xs = torch.randn(b, k, self.d, generator=generator, device=generator.device)
        logits = torch.einsum("bkd,bd->bk", xs, betas)
        # sign(0) = 0 would be a third class; x·β = 0 has probability zero but map it to +1 anyway
        clean = torch.where(logits >= 0, 1.0, -1.0)
        flips = torch.rand(b, k, generator=generator, device=generator.device) < self.label_flip_prob
        ys = torch.where(flips, -clean, clean)
        return RegressionBatch(xs, ys, clean, betas, ids, "classification")


class InductionTask(ICLTask):
    """Repeated random tokens: a uniformly random block r of length ``prefix_len`` followed by r again.

    Only the second copy is predictable (from the first, in context), so targets are scored at positions
    t = L−1 .. 2L−2, where the next token is r[t−L+1]. An induction head at position t attends to the token
    after the previous occurrence of tokens[t].

    Args:
        vocab_size: number of distinct tokens (≥ 2).
        prefix_len: L, length of the random block (≥ 2); sequences have 2L tokens.
    """

    name = "induction"

    def __init__(self, vocab_size: int, prefix_len: int) -> None:
        self.vocab_size = _require_int("vocab_size", vocab_size, 2)
        self.prefix_len = _require_int("prefix_len", prefix_len, 2)

    @property
    def total_vocab(self) -> int:
        return self.vocab_size

    @property
    def sequence_length(self) -> int:
        return 2 * self.prefix_len

    def sample(self, batch_size: int, generator: torch.Generator) -> SequenceBatch:
        b = self._check_batch_size(batch_size)
        L = self.prefix_len
        block = torch.randint(0, self.vocab_size, (b, L), generator=generator, device=generator.device)
        tokens = torch.cat([block, block], dim=1)
        targets = torch.full_like(tokens, IGNORE_INDEX)
        targets[:, L - 1: 2 * L - 1] = tokens[:, L: 2 * L]
        return SequenceBatch(tokens, targets)


class CopyTask(ICLTask):
    """Symbolic copy / reverse: [s_1..s_n, SEP, o_1..o_n] with o = s (copy) or reversed s.

    Token ids 0..vocab_size−1 are symbols; SEP = vocab_size, so models need ``total_vocab = vocab_size + 1``.
    Targets are scored at positions n..2n−1 (predicting o_1..o_n).
    """

    name = "copy"

    def __init__(self, vocab_size: int, length: int, reverse: bool = False) -> None:
        self.vocab_size = _require_int("vocab_size", vocab_size, 2)
        self.length = _require_int("length", length, 1)
        self.reverse = bool(reverse)

    @property
    def sep_token(self) -> int:
        return self.vocab_size

    @property
    def total_vocab(self) -> int:
        return self.vocab_size + 1

    @property
    def sequence_length(self) -> int:
        return 2 * self.length + 1

    def sample(self, batch_size: int, generator: torch.Generator) -> SequenceBatch:
        b = self._check_batch_size(batch_size)
        n = self.length
        s = torch.randint(0, self.vocab_size, (b, n), generator=generator, device=generator.device)
        out = s.flip(1) if self.reverse else s
        sep = torch.full((b, 1), self.sep_token, dtype=s.dtype, device=s.device)
        tokens = torch.cat([s, sep, out], dim=1)
        targets = torch.full_like(tokens, IGNORE_INDEX)
        targets[:, n: 2 * n] = tokens[:, n + 1: 2 * n + 1]
        return SequenceBatch(tokens, targets)


class FactualRecallTask(ICLTask):
    """Memorization control: fixed key → value pairs, learnable only in the weights (the context holds no hint).

    Sequences are [key, value]; the value is scored at position 0. Keys are tokens 0..num_facts−1, values are
    tokens num_facts..num_facts+num_values−1; the mapping is drawn once from ``seed``.
    """

    name = "factual_recall"

    def __init__(self, num_facts: int, num_values: int, seed: int = 0,
                 device: Union[str, torch.device] = "cpu") -> None:
        self.num_facts = _require_int("num_facts", num_facts, 1)
        self.num_values = _require_int("num_values", num_values, 2)
        g = make_generator(seed, device)
        #: value token of each key, [num_facts] int64
        self.values = self.num_facts + torch.randint(0, self.num_values, (self.num_facts,), generator=g,
                                                     device=g.device)

    @property
    def total_vocab(self) -> int:
        return self.num_facts + self.num_values

    @property
    def sequence_length(self) -> int:
        return 2

    def all_facts(self) -> SequenceBatch:
        """Every key once, in order: [num_facts, 2] (for recall accuracy)."""
        keys = torch.arange(self.num_facts, device=self.values.device)
        return self._batch(keys)

    def _batch(self, keys: Tensor) -> SequenceBatch:
        vals = self.values.to(keys.device)[keys]
        tokens = torch.stack([keys, vals], dim=1)
        targets = torch.full_like(tokens, IGNORE_INDEX)
        targets[:, 0] = vals
        return SequenceBatch(tokens, targets)

    def sample(self, batch_size: int, generator: torch.Generator) -> SequenceBatch:
        b = self._check_batch_size(batch_size)
        keys = torch.randint(0, self.num_facts, (b,), generator=generator, device=generator.device)
        return self._batch(keys)


def _reverse_task(**cfg: Any) -> CopyTask:
    if "reverse" in cfg:
        raise ValueError("reverse is implied by the task name 'reverse'; use 'copy' with reverse=... instead")
    return CopyTask(reverse=True, **cfg)


#: name → constructor, used by :func:`make_task`
TASK_REGISTRY: Dict[str, Callable[..., ICLTask]] = {
    "linear_regression": LinearRegressionTask,
    "sparse_regression": SparseRegressionTask,
    "classification": ClassificationTask,
    "induction": InductionTask,
    "copy": CopyTask,
    "reverse": _reverse_task,
    "factual_recall": FactualRecallTask,
}


def make_task(name: str, **cfg: Any) -> ICLTask:
    """Build a task from its registry name and keyword config.

    Raises:
        ValueError: unknown ``name`` or an unknown/invalid config field (the message names the field).
    """
    if name not in TASK_REGISTRY:
        raise ValueError(f"name: unknown task {name!r}; known tasks: {sorted(TASK_REGISTRY)}")
    ctor = TASK_REGISTRY[name]
    target = CopyTask if name == "reverse" else ctor
    accepted = set(inspect.signature(target.__init__).parameters) - {"self"}
    unknown = sorted(set(cfg) - accepted)
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown} for task {name!r}; accepted: {sorted(accepted)}")
    return ctor(**cfg)
