"""Closed-loop control of the injected noise scale c_t (SPEC §5).

The injected covariance is c_t · R⁺ (R⁺ the PSD-clipped residual). In the tracked metric's units (NE_t or P-NE*_t)
a step's measured total is M_t = N_t + c_t·U_t: N_t the natural (sampled) part, U_t the exposure of R⁺ at unit scale
(post-clip). Before drawing step t's noise the optimizer asks for

    c_t = clamp( c_ff · exp(k_p e_{t−1} + k_i I_{t−1}),  min_scale, max_scale ),
    c_ff = [target_t − N̄]₊ / Û_t,        e_s = clamp(log(T̄_s / M̄_s), ±max_error),  I = Σ e,

where Û_t is the unit exposure predicted with the preconditioner available at that point (A_t itself for
parameter-space noise, which is added after the update; A_{t−1} in gradient space) and N̄ a debiased EMA of the
measured natural part. The feed-forward is exact in steady state; the PI term on the log ratio removes what it
misses (A drifting, the natural part's estimation noise). The error compares EMAs T̄, M̄ (same smoothing) of the
target and of the measurement: the log of a single noisy measurement would make the loop track the geometric mean,
which sits below the arithmetic mean (the exposure actually integrated) by ~CV²/2. Conditional integration
(anti-windup) stops I growing while c is clamped. ``feedforward=False`` gives a plain PI around ``initial_scale``.

Everything stays in 0-dim device tensors: the loop never reads a value on the host.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["ControllerConfig", "ExposureController"]


@dataclass(frozen=True)
class ControllerConfig:
    """Gains and limits of :class:`ExposureController` (dimensionless).

    kp, ki: proportional and integral gains on the log ratio log(target/measured). feedforward: use the
    model-based c_ff (recommended). smoothing: EMA factor of N̄ and of the error's T̄, M̄ (0 = last step only).
    min_scale, max_scale: clamp of c_t. max_error: clamp of |log(target/measured)| per step. initial_scale: c_t
    before any measurement when ``feedforward=False`` (and the centre of the PI then).
    """

    kp: float = 0.1
    ki: float = 0.05
    feedforward: bool = True
    smoothing: float = 0.8
    min_scale: float = 1e-6
    max_scale: float = 1e6
    max_error: float = 2.0
    initial_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("kp", "ki", "max_error"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"controller {name}={v!r} must be a finite float >= 0")
        if not isinstance(self.feedforward, bool):
            raise ValueError(f"controller feedforward={self.feedforward!r} must be a bool")
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"controller smoothing={self.smoothing!r} must be in [0, 1)")
        if not (0.0 < self.min_scale <= self.initial_scale <= self.max_scale < math.inf):
            raise ValueError(
                f"controller scales must satisfy 0 < min_scale <= initial_scale <= max_scale < inf, got "
                f"min_scale={self.min_scale!r}, initial_scale={self.initial_scale!r}, max_scale={self.max_scale!r}"
            )


class ExposureController:
    """Tracks a target exposure by scaling the residual: :meth:`scale` gives c_t, :meth:`update` closes the loop."""

    _KEYS = ("integral", "error", "natural", "target", "measured", "weight", "saturated", "last_scale")

    def __init__(self, config: ControllerConfig) -> None:
        self.config = config
        self._state: dict[str, Tensor] = {}
        self.reset()

    def reset(self) -> None:
        f64 = torch.float64
        self._state = {
            "integral": torch.zeros((), dtype=f64),  # I = Σ e
            "error": torch.zeros((), dtype=f64),  # e of the last measured step
            "natural": torch.zeros((), dtype=f64),  # EMA numerators of N, the target and M
            "target": torch.zeros((), dtype=f64),
            "measured": torch.zeros((), dtype=f64),
            "weight": torch.zeros((), dtype=f64),  # EMA debiasing weight 1 − smoothing^updates
            "saturated": torch.zeros((), dtype=f64),  # +1 / −1 when the last c_t hit max / min, else 0
            "last_scale": torch.tensor(self.config.initial_scale, dtype=f64),
        }

    def _to(self, device: torch.device) -> None:
        for k, v in self._state.items():
            if v.device != device:
                self._state[k] = v.to(device)

    @torch.no_grad()
    def scale(self, target: float, unit: Tensor | None) -> Tensor:
        """c_t for a step whose target is ``target`` and whose predicted unit-scale exposure is ``unit`` (0-dim).

        ``unit`` None (no prediction possible, e.g. P-NE* before any curvature) holds the last scale.
        Returns a 0-dim float64 tensor on ``unit``'s device.
        """
        cfg, st = self.config, self._state
        if unit is None:
            return st["last_scale"].clone()
        device = unit.device
        self._to(device)
        f64 = torch.float64
        unit = unit.to(f64).reshape(())
        correction = cfg.kp * st["error"] + cfg.ki * st["integral"]
        if cfg.feedforward:
            nat = torch.where(st["weight"] > 0, st["natural"] / st["weight"].clamp(min=1e-300), torch.zeros_like(unit))
            need = (max(target, 0.0) - nat).clamp(min=0.0)
            ff = torch.where(unit > 0, need / unit.clamp(min=1e-300), torch.full_like(unit, cfg.max_scale))
            raw = ff.clamp(min=1e-300).log() + correction
        else:
            raw = math.log(cfg.initial_scale) + correction
        lo, hi = math.log(cfg.min_scale), math.log(cfg.max_scale)
        st["saturated"] = (raw > hi).to(f64) - (raw < lo).to(f64)
        c = raw.clamp(lo, hi).exp()
        valid = torch.isfinite(c)
        st["last_scale"] = torch.where(valid, c, st["last_scale"])
        return st["last_scale"].clone()

    @torch.no_grad()
    def update(self, target: float, measured: Tensor, natural: Tensor) -> None:
        """Close the loop after a measured step with target ``target``: measured total M_t, natural part N_t.

        Non-finite or non-positive measurements (n = 1 steps, skipped steps) leave the state unchanged.
        """
        cfg, st = self.config, self._state
        device = measured.device
        self._to(device)
        f64 = torch.float64
        measured = measured.to(device=device, dtype=f64).reshape(())
        natural = natural.to(device=device, dtype=f64).reshape(())
        valid = torch.isfinite(measured) & (measured > 0) & torch.isfinite(natural)
        safe_m = torch.where(valid, measured, torch.ones_like(measured))
        s = cfg.smoothing
        tgt_ema = st["target"] * s + (1.0 - s) * max(target, 0.0)
        meas_ema = st["measured"] * s + (1.0 - s) * safe_m
        # Both EMAs share the debiasing weight, which cancels in their ratio.
        err = torch.log(tgt_ema.clamp(min=1e-300) / meas_ema.clamp(min=1e-300)).clamp(-cfg.max_error, cfg.max_error)
        # Anti-windup: no integration further into a limit c_t is clamped at.
        blocked = ((st["saturated"] > 0) & (err > 0)) | ((st["saturated"] < 0) & (err < 0))
        integral = torch.where(blocked, st["integral"], st["integral"] + err)
        st["integral"] = torch.where(valid, integral, st["integral"])
        st["error"] = torch.where(valid, err, st["error"])
        st["natural"] = torch.where(valid, st["natural"] * s + (1.0 - s) * natural.clamp(min=0.0), st["natural"])
        st["target"] = torch.where(valid, tgt_ema, st["target"])
        st["measured"] = torch.where(valid, meas_ema, st["measured"])
        st["weight"] = torch.where(valid, st["weight"] * s + (1.0 - s), st["weight"])

    def state_dict(self) -> dict[str, Any]:
        """CPU copies of the controller state (for the optimizer checkpoint)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self._state.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self._KEYS) - set(state)
        if missing:
            raise ValueError(f"noise controller state is missing {sorted(missing)}")
        self._state = {k: torch.as_tensor(state[k], dtype=torch.float64).clone() for k in self._KEYS}
