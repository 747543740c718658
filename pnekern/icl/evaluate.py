"""Evaluation of ICL models: error-vs-k curves with bootstrap CIs, excess error over the Bayes posterior mean,
prediction distance to baselines, induction-head scores, head knockout, linear probes and recall accuracy.

Conventions (SPEC §8): squared errors are divided by d ("normalized by d") unless ``normalize=False``, so the
zero predictor scores tr(Σβ)/d = 1 against the noiseless target for an isotropic unit prior. Every curve says which
target it was measured against: ``"clean"`` (x_qᵀβ), ``"noisy"`` (the observed y_q), ``"bayes"`` (the posterior
mean prediction, i.e. excess error) or a baseline's name (prediction distance).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .baselines import BayesPosteriorMean, ICLEstimator, predict_prefixes
from .models import LinearSelfAttention
from .tasks import FactualRecallTask, InductionTask, make_generator

__all__ = [
    "ErrorCurve",
    "bootstrap_ci",
    "model_prefix_predictions",
    "error_vs_k",
    "excess_error_over_bayes",
    "prediction_distance",
    "induction_score",
    "induction_scores",
    "head_knockout_effect",
    "linear_probe_beta",
    "recall_accuracy",
]

Predictor = Union[nn.Module, ICLEstimator]


@dataclass
class ErrorCurve:
    """Mean squared error per number of in-context examples k.

    Attributes:
        k: [K] int64, 0..K−1 (the prediction at k uses k context examples).
        mean, ci_low, ci_high: [K] float64, mean error and its percentile-bootstrap CI over sequences.
        target: what the prediction was compared with ("clean", "noisy", "bayes" or a baseline name).
        normalized_by_d: whether the squared error was divided by d.
        n_samples: number of sequences.
        ci: confidence level of the interval.
    """

    k: Tensor
    mean: Tensor
    ci_low: Tensor
    ci_high: Tensor
    target: str
    normalized_by_d: bool
    n_samples: int
    ci: float

    def to_dict(self) -> Dict[str, object]:
        return {"k": self.k.tolist(), "mean": self.mean.tolist(), "ci_low": self.ci_low.tolist(),
                "ci_high": self.ci_high.tolist(), "target": self.target, "normalized_by_d": self.normalized_by_d,
                "n_samples": self.n_samples, "ci": self.ci}


def bootstrap_ci(samples: Tensor, n_boot: int = 1000, ci: float = 0.95, seed: int = 0,
                 statistic: Callable[[Tensor], Tensor] = lambda x: x.mean(dim=1)):
    """Percentile bootstrap over the first axis.

    Args:
        samples: [N, ...] i.i.d. observations (rows are resampled together, so columns keep their pairing).
        statistic: maps resamples [n, N, ...] → [n, ...]; default the mean.
    Returns:
        (estimate [...], low [...], high [...]) in float64.
    """
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    x = samples.double()
    N = x.shape[0]
    if N < 2:
        raise ValueError(f"need at least 2 samples for a bootstrap, got {N}")
    g = make_generator(seed, "cpu")
    est = statistic(x.unsqueeze(0))[0]
    stats = []
    # resample in chunks: n_boot·N·K elements at once can be hundreds of MB
    chunk = max(1, int(2e7 // max(1, x.numel())))
    for start in range(0, n_boot, chunk):
        n = min(chunk, n_boot - start)
        idx = torch.randint(0, N, (n, N), generator=g).to(x.device)
        stats.append(statistic(x[idx]))
    boot = torch.cat(stats, dim=0)
    alpha = (1 - ci) / 2
    q = torch.tensor([alpha, 1 - alpha], dtype=torch.float64, device=x.device)
    lo, hi = torch.quantile(boot, q, dim=0)
    return est, lo, hi


@torch.no_grad()
def model_prefix_predictions(predictor: Predictor, xs: Tensor, ys: Tensor) -> Tensor:
    """Prediction for every prefix, [B, K]: column k predicts ys[:, k] from the first k examples.

    Works for baselines (:class:`ICLEstimator`), :class:`LinearSelfAttention` (one call per k, 0 at k = 0) and
    any causal regression model ``model(xs, ys) -> [B, K]`` (run in eval mode).
    """
    if isinstance(predictor, ICLEstimator):
        return predict_prefixes(predictor, xs, ys)
    was_training = predictor.training
    predictor.eval()
    try:
        if isinstance(predictor, LinearSelfAttention):
            cols = [predictor(xs[:, :k], ys[:, :k], xs[:, k]) for k in range(xs.shape[1])]
            return torch.stack(cols, dim=1)
        return predictor(xs, ys)
    finally:
        predictor.train(was_training)


def _device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for parameter-free modules)."""
    p = next(model.parameters(), None)
    return torch.device("cpu") if p is None else p.device


def _sq_error_samples(pred_fn: Callable[[object], Tensor], ref_fn: Callable[[object], Tensor], task,
                      n_samples: int, batch_size: int, seed: int, normalize: bool) -> Tensor:
    g = make_generator(seed, getattr(task, "device", "cpu"))
    rows = []
    remaining = n_samples
    while remaining > 0:
        b = min(batch_size, remaining)
        batch = task.sample(b, g)
        err = (pred_fn(batch).double() - ref_fn(batch).double()).pow(2)
        rows.append(err / task.d if normalize else err)
        remaining -= b
    return torch.cat(rows, dim=0)  # [n_samples, K]


def _curve(errors: Tensor, target: str, normalize: bool, n_boot: int, ci: float, seed: int) -> ErrorCurve:
    est, lo, hi = bootstrap_ci(errors, n_boot=n_boot, ci=ci, seed=seed)
    return ErrorCurve(torch.arange(errors.shape[1]), est, lo, hi, target, normalize, errors.shape[0], ci)


def error_vs_k(predictor: Predictor, task, *, target: str = "clean", n_samples: int = 2048, batch_size: int = 512,
               seed: int = 0, normalize: bool = True, n_boot: int = 1000, ci: float = 0.95) -> ErrorCurve:
    """Squared error vs k against the noiseless target x_qᵀβ (``target="clean"``) or the noisy y_q ("noisy").

    Sequences come from ``make_generator(seed)``, so two predictors evaluated with the same seed see the same
    data (common random numbers: their difference has a much tighter CI than either curve).
    """
    if target not in ("clean", "noisy"):
        raise ValueError(f"target must be 'clean' or 'noisy', got {target!r}")
    ref = (lambda b: b.ys_clean) if target == "clean" else (lambda b: b.ys)
    errs = _sq_error_samples(lambda b: model_prefix_predictions(predictor, b.xs, b.ys), ref, task, n_samples,
                             batch_size, seed, normalize)
    return _curve(errs, target, normalize, n_boot, ci, seed)


def prediction_distance(predictor: Predictor, reference: Predictor, task, *, n_samples: int = 2048,
                        batch_size: int = 512, seed: int = 0, normalize: bool = True, n_boot: int = 1000,
                        ci: float = 0.95, reference_name: Optional[str] = None) -> ErrorCurve:
    """E(f − g)² vs k between a model f and a reference g (e.g. ridge, OLS, dMMSE), Akyürek et al.'s metric."""
    name = reference_name or getattr(reference, "name", type(reference).__name__)
    errs = _sq_error_samples(lambda b: model_prefix_predictions(predictor, b.xs, b.ys),
                             lambda b: model_prefix_predictions(reference, b.xs, b.ys), task, n_samples,
                             batch_size, seed, normalize)
    return _curve(errs, name, normalize, n_boot, ci, seed)


def excess_error_over_bayes(predictor: Predictor, task, **kwargs) -> ErrorCurve:
    """E(f − x_qᵀμ)² vs k, μ the Gaussian posterior mean for the task's Σβ and σ² (SPEC §8).

    For the squared loss this is exactly the model's error minus the Bayes error against either target.
    """
    bayes = BayesPosteriorMean(task.beta_cov, task.noise_var)
    return prediction_distance(predictor, bayes, task, reference_name="bayes", **kwargs)


def induction_score(attn: Tensor, tokens: Tensor) -> Tensor:
    """Per-head induction score: mean attention mass from position t to the position right after an earlier
    occurrence of tokens[t] (Olsson et al. 2022), averaged over positions that have an earlier occurrence.

    Args:
        attn: [B, H, T, T] attention probabilities (row t = query position).
        tokens: [B, T].
    Returns:
        [H] scores in [0, 1]; NaN when no position has an earlier occurrence.
    """
    B, H, T, _ = attn.shape
    same = tokens.unsqueeze(2) == tokens.unsqueeze(1)  # [B, t, i]
    earlier = same & torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril(-1)
    target = torch.zeros_like(earlier)
    target[:, :, 1:] = earlier[:, :, :-1]  # j = i + 1 (≤ t since i < t)
    has = target.any(-1)  # [B, T]
    mass = (attn * target.unsqueeze(1).to(attn.dtype)).sum(-1)  # [B, H, T]
    n = has.sum()
    if n == 0:
        return torch.full((H,), float("nan"), dtype=attn.dtype, device=attn.device)
    return (mass * has.unsqueeze(1).to(attn.dtype)).sum(dim=(0, 2)) / n


@torch.no_grad()
def induction_scores(model: nn.Module, vocab_size: int, prefix_len: int, n_seqs: int = 64, seed: int = 0) -> Tensor:
    """Induction score of every head of a token model on repeated random sequences, [n_layer, n_head]."""
    task = InductionTask(vocab_size, prefix_len)
    device = _device(model)
    batch = task.sample(n_seqs, make_generator(seed, device))
    was_training = model.training
    model.eval()
    try:
        out = model(batch.tokens, return_attn=True)
    finally:
        model.train(was_training)
    return torch.stack([induction_score(a, batch.tokens) for a in out.attentions])


@torch.no_grad()
def head_knockout_effect(model: nn.Module, task, *, n_samples: int = 1024, seed: int = 0,
                         target: str = "clean") -> Tensor:
    """Increase of the mean-over-k ICL error (normalized by d) when one head is masked out, [n_layer, n_head].

    Regression tasks use the squared error against ``target``; token tasks use the cross-entropy (nats).
    All variants see the same sequences.
    """
    device = _device(model)
    batch = task.sample(n_samples, make_generator(seed, device))
    L, H = model.n_layer, model.n_head

    def metric(mask: Optional[Tensor]) -> float:
        if hasattr(batch, "tokens"):
            logits = model(batch.tokens, head_mask=mask)
            return float(F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=-100))
        ref = batch.ys_clean if target == "clean" else batch.ys
        return float((model(batch.xs, batch.ys, head_mask=mask) - ref).pow(2).mean() / task.d)

    was_training = model.training
    model.eval()
    try:
        base = metric(None)
        out = torch.zeros(L, H, dtype=torch.float64)
        for layer in range(L):
            for head in range(H):
                mask = torch.ones(L, H, device=device)
                mask[layer, head] = 0
                out[layer, head] = metric(mask) - base
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def linear_probe_beta(model: nn.Module, task, *, n_train: int = 2048, n_test: int = 1024, lam: float = 1e-2,
                      seed: int = 0, position: int = -1) -> Tensor:
    """Held-out R² of a ridge probe from the residual stream to β, per layer (embedding + each block), [L+1].

    Features are the hidden states at token ``position`` (default the last y token, after the whole context);
    the probe is ridge regression with intercept (λ = ``lam`` on standardized-scale features), fitted on
    ``n_train`` sequences and scored on ``n_test`` fresh ones: R² = 1 − Σ‖β − β̂‖² / Σ‖β − β̄_train‖².
    """
    device = _device(model)
    g = make_generator(seed, device)
    train_b, test_b = task.sample(n_train, g), task.sample(n_test, g)
    was_training = model.training
    model.eval()
    try:
        h_tr = model(train_b.xs, train_b.ys, return_hidden=True).hidden_states
        h_te = model(test_b.xs, test_b.ys, return_hidden=True).hidden_states
    finally:
        model.train(was_training)
    r2 = []
    for a, b in zip(h_tr, h_te):
        Xtr, Xte = a[:, position].double(), b[:, position].double()
        Ytr, Yte = train_b.betas.double(), test_b.betas.double()
        mx, my = Xtr.mean(0), Ytr.mean(0)
        sx = Xtr.std(0).clamp_min(1e-8)  # standardize so one λ suits every layer's activation scale
        A, Ac = (Xtr - mx) / sx, (Xte - mx) / sx
        G = A.T @ A + lam * n_train * torch.eye(A.shape[1], dtype=A.dtype, device=A.device)
        W = torch.linalg.solve(G, A.T @ (Ytr - my))
        pred = Ac @ W + my
        ss_res = (Yte - pred).pow(2).sum()
        ss_tot = (Yte - my).pow(2).sum()
        r2.append(float(1 - ss_res / ss_tot))
    return torch.tensor(r2, dtype=torch.float64)


@torch.no_grad()
def recall_accuracy(model: nn.Module, task: FactualRecallTask) -> float:
    """Fraction of keys whose value is the argmax prediction at position 0 (memorization control)."""
    device = _device(model)
    batch = task.all_facts().to(device)
    was_training = model.training
    model.eval()
    try:
        logits = model(batch.tokens)
    finally:
        model.train(was_training)
    return float((logits[:, 0].argmax(-1) == batch.targets[:, 0]).double().mean())
