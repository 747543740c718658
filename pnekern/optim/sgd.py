"""Drop-in ``torch.optim.SGD`` with the same in-step gradient-noise statistics as pnekern.AdamW (A = I).

The update itself is torch's own implementation (so it is exact by construction); pnekern adds the
micro-batch capture and the exposure telemetry around it. The drafts' SGD sensitivity analysis needs it.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..stats.engine import STATS_MODES, NoiseStats, StepStats

__all__ = ["SGD", "sgd_kappa"]


def sgd_kappa(momentum: float, dampening: float, nesterov: bool) -> float:
    """Long-run variance amplification of torch's SGD momentum (buf ← μ buf + (1−d) g).

    The total displacement caused by one gradient is (1−d)/(1−μ) (heavy ball: 1/(1−μ), the drafts' κ = 1/(1−β)²
    after squaring); with Nesterov it is 1 + μ(1−d)/(1−μ). κ is its square; plain SGD gives 1.
    """
    if momentum == 0:
        return 1.0
    total = 1.0 + momentum * (1 - dampening) / (1 - momentum) if nesterov else (1 - dampening) / (1 - momentum)
    return total * total


def _unhooked(fn: Callable) -> Callable:
    # torch wraps Optimizer subclasses' step with its hook runner once any instance exists; ours is wrapped
    # too, so calling the wrapped parent would run every step hook twice.
    return fn.__wrapped__ if getattr(fn, "hooked", False) else fn


class SGD(torch.optim.SGD):
    """torch.optim.SGD plus noise statistics (``stats``, ``batch_size``, ... as in :class:`pnekern.AdamW`).

    κ defaults to the value implied by the momentum settings of the first param group (:func:`sgd_kappa`).
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        stats: str | None = None,
        batch_size: int | None = None,
        stats_every: int = 1,
        kappa: str | float | None = None,
        gns_beta: float = 0.95,
        stats_rank: int = 8,
        data_parallel: bool | None = None,
        process_group: Any = None,
        stats_seed: int = 0,
        calibration_every: int = 200,
        tail_coords: int = 2048,
    ) -> None:
        if stats not in STATS_MODES:
            raise ValueError(f"stats={stats!r} is not a statistics mode; choose one of None, 'trace', 'diag', 'lowrank'")
        super().__init__(
            params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            maximize=maximize, foreach=foreach, differentiable=differentiable, fused=fused,
        )
        self._stats: NoiseStats | None = None
        if stats is not None:
            if kappa is None:
                kappa = sgd_kappa(momentum, dampening, nesterov)
            self._stats = NoiseStats(
                self, stats, lambda p: (None, 1.0, 0.0), beta1=lambda p: float(momentum), batch_size=batch_size,
                kappa=kappa, stats_every=stats_every, rank=stats_rank, gns_beta=gns_beta, backend="auto",
                data_parallel=data_parallel, process_group=process_group, seed=stats_seed,
                calibration_every=calibration_every, tail_coords=tail_coords,
            )
        elif batch_size is not None:
            raise ValueError("batch_size is only used by the noise statistics; pass stats='trace' (or diag/lowrank) too")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_stats"] = getattr(self, "_stats", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("_stats", None)
        super().__setstate__(state)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if getattr(self, "_stats", None) is not None:
            self._stats.track_group(self.param_groups[-1], len(self.param_groups) - 1)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        if getattr(self, "_stats", None) is not None:
            self._stats.reset()

    def last_stats(self) -> StepStats | None:
        if self._stats is None:
            raise RuntimeError("statistics are off: construct the optimizer with stats='trace' (or 'diag'/'lowrank')")
        return self._stats.last

    @property
    def exposure(self) -> Any:
        if self._stats is None:
            raise RuntimeError("statistics are off: construct the optimizer with stats='trace' (or 'diag'/'lowrank')")
        return self._stats.log

    @property
    def noise_stats(self) -> NoiseStats | None:
        return self._stats

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """torch.optim.SGD.step, with the step's noise statistics computed from the pre-update gradients."""
        stats = self._stats
        rows: dict[int, Tensor] = {}
        lrs: dict[int, float] = {}
        loss = None
        if stats is not None and closure is not None:
            # Evaluate the closure first so the statistics see the gradients the update will use.
            with torch.enable_grad():
                loss = closure()
            closure = None
        if stats is not None and stats.measuring_this_step():
            stats.reduce_buffers()
            with torch.no_grad():
                for group in self.param_groups:
                    lr = float(group["lr"])
                    for p in group["params"]:
                        if p.grad is None or p.grad.is_sparse:
                            continue
                        g = torch.view_as_real(p.grad) if p.grad.is_complex() else p.grad
                        g2 = g.to(torch.float64).square().sum()
                        q = stats.sumsq_buffer(p)
                        qa = q.to(torch.float64).sum() if q is not None else torch.zeros((), dtype=torch.float64, device=g.device)
                        rows[id(p)] = torch.stack([g2, g2, g2, qa])  # A = I: every preconditioned column is |g|²
                        lrs[id(p)] = lr
        out = _unhooked(torch.optim.SGD.step)(self, closure)
        loss = out if loss is None else loss
        if stats is not None:
            stats.finish_step(rows, lrs, precond="new" if stats.mode in ("diag", "lowrank") else "prev")
        return loss
