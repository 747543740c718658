"""Recording a training run so that any step can be recomputed exactly (SPEC §7, Counterfactual Noise Replay).

:class:`Recorder` owns the training step: ``rec.step(batch)`` runs zero_grad → ``loss_fn(model, batch)`` → backward
→ ``optimizer.step()`` → parameter-space noise ξ_t (optional) and records, per step t (0-based, θ_t → θ_{t+1}):

* the batch (e.g. a tensor of example indices; anything ``loss_fn`` accepts; kept by reference),
* η_t of every param group (read just before the step, so LR schedulers stepped afterwards are respected),
* the noise seed s_t (ξ_t is regenerated from it: ``noise.sample(t, s_t, params)``),
* optionally v̂_t (``record_precond=True``: Adam's bias-corrected second moment after the step, d floats a step),

and checkpoints (θ_t, optimizer.state_dict()) every ``checkpoint_every`` steps (t = 0, c, 2c, …). Replaying a
segment from its checkpoint with the recorded batches, learning rates and seeds reproduces θ_t bit for bit (for a
deterministic ``loss_fn``: no dropout, or dropout seeded from the batch), which is what the adjoint's
checkpoint + recompute needs.

Storage is bounded: with ``max_checkpoints`` set, whenever one more would exceed it every other checkpoint (never
θ_0) is dropped — the interval doubles, recompute cost per segment doubles, memory stays ≤ max_checkpoints·(θ +
optimizer state). With ``directory`` set, checkpoints are written with torch.save and only paths stay in memory.

Noise: ξ_t is added to the parameters after the optimizer step (parameter space, SPEC §5) — it enters θ_{t+1}.
:class:`GaussianNoise` is N(0, diag(std²)); any object with ``sample(step, seed, params) -> list[Tensor]`` and
``covariance(step) -> Tensor`` (flat variances [d], or a dense [d, d]) works.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..optim.nap import nap_noise_seed

__all__ = ["Recorder", "StepRecord", "GaussianNoise", "train_step", "step_noise_seed"]


def step_noise_seed(seed: int, step: int) -> int:
    """The noise seed s_t of step ``step`` for a run seeded with ``seed`` (63-bit int)."""
    return nap_noise_seed(seed, step, 0)


class GaussianNoise:
    """ξ_t ~ N(0, diag(std²)) in parameter space, regenerated from the step's seed.

    Args:
        std: a float (isotropic) or one tensor per parameter (same shapes) [θ units].
    """

    def __init__(self, std: float | Sequence[Tensor]) -> None:
        if isinstance(std, (int, float)) and not isinstance(std, bool):
            if not std >= 0:
                raise ValueError(f"std={std!r} must be >= 0")
            self.std: float | list[Tensor] = float(std)
        elif isinstance(std, (list, tuple)) and all(isinstance(s, Tensor) for s in std):
            if any(bool((s < 0).any()) for s in std):
                raise ValueError("std tensors must be >= 0")
            self.std = [s.detach().clone() for s in std]
        else:
            raise ValueError("std must be a float or a list of tensors shaped like the parameters")

    def sample(self, step: int, seed: int, params: Sequence[Tensor]) -> list[Tensor]:
        """ξ_t, one tensor per parameter (drawn on the CPU in float64 from ``seed``, cast to the parameter)."""
        gen = torch.Generator().manual_seed(seed)
        out = []
        for i, p in enumerate(params):
            z = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            s = self.std if isinstance(self.std, float) else self.std[i].to(torch.float64).cpu()
            out.append((s * z).to(device=p.device, dtype=p.dtype))
        return out

    def covariance(self, step: int, params: Sequence[Tensor]) -> Tensor:
        """diag Cov ξ_t as a flat float64 vector [d] (θ²)."""
        if isinstance(self.std, float):
            return torch.full((sum(p.numel() for p in params),), self.std**2, dtype=torch.float64)
        return torch.cat([s.reshape(-1).to(torch.float64).cpu() ** 2 for s in self.std])


@dataclass
class StepRecord:
    """What step t (θ_t → θ_{t+1}) needs to be recomputed.

    Attributes:
        step: t, 0-based. batch: the loss_fn batch. lrs: η_t per param group. noise_seed: s_t or None.
        precond: v̂_t per parameter (record_precond=True, Adam family) or None.
    """

    step: int
    batch: Any
    lrs: tuple[float, ...]
    noise_seed: int | None
    precond: list[Tensor] | None = None


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """Parameters in optimizer order (groups in order, params in order): the flat layout of every CNR vector."""
    return [p for g in optimizer.param_groups for p in g["params"]]


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batch: Any,
    noise: Any | None,
    step: int,
    seed: int | None,
    extra_noise: Tensor | None = None,
) -> Tensor:
    """The one training step both the run and every replay execute (so replays are bitwise identical).

    extra_noise: a flat [d] perturbation δξ_t added to ξ_t (a counterfactual re-run with common random numbers).
    Returns the (detached) loss.
    """
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    loss.backward()
    optimizer.step()
    params = optimizer_params(optimizer)
    with torch.no_grad():
        if noise is not None:
            for p, xi in zip(params, noise.sample(step, seed, params)):
                p.add_(xi)
        if extra_noise is not None:
            off = 0
            for p in params:
                n = p.numel()
                p.add_(extra_noise[off:off + n].reshape(p.shape).to(p.dtype))
                off += n
    return loss.detach()


class Recorder:
    """Runs and records a training loop for counterfactual replay (see module docstring).

    Args:
        model: the trained module. optimizer: torch/pnekern SGD or AdamW (any optimizer records; the replay's
            linearization supports SGD, SGD+momentum, Adam and AdamW).
        loss_fn: ``loss_fn(model, batch) -> scalar loss``, deterministic given (θ, batch).
        noise: parameter-space noise source or None. seed: base seed of the per-step noise seeds.
        checkpoint_every: c ≥ 1. max_checkpoints: bound on stored checkpoints (≥ 2) or None.
        record_precond: also store v̂_t every step (d floats per step). directory: write checkpoints there.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[nn.Module, Any], Tensor],
        *,
        noise: Any | None = None,
        seed: int = 0,
        checkpoint_every: int = 10,
        max_checkpoints: int | None = None,
        record_precond: bool = False,
        directory: str | os.PathLike | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not callable(loss_fn):
            raise ValueError("loss_fn must be callable: loss_fn(model, batch) -> scalar loss")
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise ValueError(f"checkpoint_every={checkpoint_every!r} must be an int >= 1")
        if max_checkpoints is not None and (not isinstance(max_checkpoints, int) or max_checkpoints < 2):
            raise ValueError(f"max_checkpoints={max_checkpoints!r} must be an int >= 2 or None")
        if noise is not None and not (hasattr(noise, "sample") and hasattr(noise, "covariance")):
            raise ValueError("noise must have sample(step, seed, params) and covariance(step, params)")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed={seed!r} must be an int >= 0")
        names = {id(p): n for n, p in model.named_parameters()}
        self.params = optimizer_params(optimizer)
        missing = [i for i, p in enumerate(self.params) if id(p) not in names]
        if missing:
            raise ValueError(f"optimizer parameters {missing} are not parameters of the model")
        self.param_names = [names[id(p)] for p in self.params]
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.noise = noise
        self.seed = seed
        self.checkpoint_every = checkpoint_every
        self.max_checkpoints = max_checkpoints
        self.record_precond = bool(record_precond)
        self.directory = None if directory is None else os.fspath(directory)
        if self.directory is not None:
            os.makedirs(self.directory, exist_ok=True)
        self.records: list[StepRecord] = []
        self.checkpoints: dict[int, Any] = {}
        # A detached replica for replays: deep-copying (model, optimizer) together keeps their parameter identity.
        self._replica: tuple[nn.Module, torch.optim.Optimizer] | None = None
        self._checkpoint(0)

    # ------------------------------------------------------------------ recording
    @property
    def num_steps(self) -> int:
        """T, the number of recorded steps."""
        return len(self.records)

    @property
    def dim(self) -> int:
        """d, the number of optimized parameter elements."""
        return sum(p.numel() for p in self.params)

    def _checkpoint(self, t: int) -> None:
        ckpt = {
            "params": [p.detach().clone() for p in self.params],
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
        }
        if self.directory is not None:
            path = os.path.join(self.directory, f"cnr_ckpt_{t:08d}.pt")
            torch.save(ckpt, path)
            ckpt = path
        self.checkpoints[t] = ckpt
        if self.max_checkpoints is not None and len(self.checkpoints) > self.max_checkpoints:
            # Thin: keep θ_0 and every other later checkpoint (the interval doubles).
            keys = sorted(self.checkpoints)
            for k in keys[1::2]:
                old = self.checkpoints.pop(k)
                if isinstance(old, str) and os.path.exists(old):
                    os.remove(old)

    def load_checkpoint(self, t: int) -> dict[str, Any]:
        """The stored checkpoint at step t: {"params": [θ tensors], "optimizer": state_dict}."""
        ckpt = self.checkpoints[t]
        return torch.load(ckpt, weights_only=False) if isinstance(ckpt, str) else ckpt

    def step(self, batch: Any) -> Tensor:
        """Run and record one training step on ``batch``; returns the detached loss."""
        t = self.num_steps
        lrs = tuple(float(g["lr"]) for g in self.optimizer.param_groups)
        seed = step_noise_seed(self.seed, t) if self.noise is not None else None
        loss = train_step(self.model, self.optimizer, self.loss_fn, batch, self.noise, t, seed)
        precond = None
        if self.record_precond:
            precond = []
            for g in self.optimizer.param_groups:
                for p in g["params"]:
                    st = self.optimizer.state.get(p, {})
                    if "exp_avg_sq" in st:
                        bc2 = 1.0 - float(g["betas"][1]) ** float(st["step"])
                        precond.append((st["exp_avg_sq"] / bc2).detach().clone())
                    else:
                        precond.append(torch.ones_like(p))
        self.records.append(StepRecord(t, batch, lrs, seed, precond))
        if (t + 1) % self.checkpoint_every == 0:
            self._checkpoint(t + 1)
        return loss

    def nbytes(self) -> int:
        """Bytes held in memory by checkpoints and per-step preconditioners (batches not counted)."""
        total = 0
        for ckpt in self.checkpoints.values():
            if isinstance(ckpt, str):
                continue
            total += sum(p.numel() * p.element_size() for p in ckpt["params"])
            for st in ckpt["optimizer"]["state"].values():
                total += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, Tensor))
        for r in self.records:
            if r.precond is not None:
                total += sum(v.numel() * v.element_size() for v in r.precond)
        return total

    # ------------------------------------------------------------------ replay support
    def replica(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        """A private (model, optimizer) copy used for recomputation (created once)."""
        if self._replica is None:
            self._replica = copy.deepcopy((self.model, self.optimizer))
        return self._replica

    def restore(self, t: int) -> tuple[nn.Module, torch.optim.Optimizer, int]:
        """Load the latest checkpoint at or before step t into the replica; returns (model, optimizer, t0)."""
        t0 = max(k for k in self.checkpoints if k <= t)
        ckpt = self.load_checkpoint(t0)
        model, opt = self.replica()
        with torch.no_grad():
            for p, v in zip(optimizer_params(opt), ckpt["params"]):
                p.copy_(v)
        opt.load_state_dict(copy.deepcopy(ckpt["optimizer"]))
        return model, opt, t0

    def replay_step(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        t: int,
        extra_noise: Tensor | None = None,
        lr_scale: float = 1.0,
    ) -> Tensor:
        """Re-execute recorded step t on (model, optimizer), optionally with δξ_t and η_t·lr_scale."""
        rec = self.records[t]
        for g, lr in zip(optimizer.param_groups, rec.lrs):
            g["lr"] = lr * lr_scale
        return train_step(model, optimizer, self.loss_fn, rec.batch, self.noise, t, rec.noise_seed, extra_noise)
