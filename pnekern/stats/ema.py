"""Debiased exponential moving averages that live on the device (no host sync per update).

The gradient-noise scale B_simple = B·tr(Σ_step)/|G|²_unbiased is a ratio of two noisy per-step estimates whose
denominator can be negative on a single step. McCandlish et al. (2018) smooth numerator and denominator separately
and divide last; :class:`NoiseScaleEMA` does exactly that (SPEC §2) and keeps the raw per-step pairs.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["DebiasedEMA", "NoiseScaleEMA"]


class DebiasedEMA:
    """EMA ``s ← β s + (1−β) x`` with Adam-style bias correction ``s / (1 − β^n)``.

    NaN/inf inputs (a step without a variance estimate, or a step GradScaler skipped) are ignored on the device:
    neither the average nor the count ``n`` moves. ``beta = 0`` returns the last finite value.

    Args:
        beta: smoothing factor in [0, 1).
    """

    def __init__(self, beta: float = 0.95) -> None:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"beta={beta!r} must be a float in [0, 1)")
        self.beta = float(beta)
        self._avg: Tensor | None = None  # float64 0-dim, on the device of the first update
        self._weight: Tensor | None = None  # β^n tracked as 1 − (bias-correction mass)

    def update(self, x: Tensor | float) -> None:
        """Fold in one observation (0-dim tensor or float); non-finite values are skipped without a sync."""
        if not isinstance(x, Tensor):
            x = torch.tensor(float(x), dtype=torch.float64)
        x = x.detach().reshape(()).to(torch.float64)
        if self._avg is None:
            self._avg = torch.zeros((), dtype=torch.float64, device=x.device)
            self._weight = torch.ones((), dtype=torch.float64, device=x.device)
        ok = torch.isfinite(x)
        x0 = torch.where(ok, x, torch.zeros_like(x))
        self._avg = torch.where(ok, self.beta * self._avg + (1.0 - self.beta) * x0, self._avg)
        self._weight = torch.where(ok, self._weight * self.beta, self._weight)

    def value(self) -> Tensor | None:
        """The debiased average (0-dim float64 tensor; NaN before the first finite observation), or None."""
        if self._avg is None:
            return None
        mass = 1.0 - self._weight
        return torch.where(mass > 0, self._avg / mass.clamp(min=1e-300), torch.full_like(self._avg, math.nan))

    def state_dict(self) -> dict:
        return {"beta": self.beta, "avg": self._avg, "weight": self._weight}

    def load_state_dict(self, state: dict, device: torch.device | str | None = None) -> None:
        """Restore :meth:`state_dict`; tensors are copied (to ``device`` when given)."""

        def own(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().to(device=device if device is not None else t.device, copy=True)

        self.beta = float(state["beta"])
        self._avg = own(state["avg"])
        self._weight = own(state["weight"])


class NoiseScaleEMA:
    """Smoothed gradient-noise scale: EMA(B·tr Σ_step) / EMA(|G|²_unbiased) (+inf when the latter is ≤ 0).

    Args:
        beta: smoothing of both EMAs (0 = no smoothing: the per-step ratio with a clamped denominator).
        floor: a smoothed denominator ≤ ``floor·|EMA(num)|`` (a non-positive |G|² estimate: the noise dominates
            the signal) gives B_simple = +inf instead of a sign flip or a huge clamped number.
        keep_pairs: keep the raw per-step (numerator, denominator) device tensors in :attr:`pairs`.
    """

    def __init__(self, beta: float = 0.95, floor: float = 1e-12, keep_pairs: bool = True) -> None:
        self.num = DebiasedEMA(beta)
        self.den = DebiasedEMA(beta)
        if not floor > 0:
            raise ValueError(f"floor={floor!r} must be positive")
        self.floor = float(floor)
        self.keep_pairs = keep_pairs
        #: raw per-step (B·tr Σ_step, |G|²_unbiased) pairs as 0-dim device tensors, oldest first
        self.pairs: list[tuple[Tensor, Tensor]] = []

    def update(self, num: Tensor, den: Tensor) -> None:
        """Add one step's numerator B·tr(Σ_step) [examples·g²] and denominator |G|²_unbiased [g²]."""
        both = torch.isfinite(num) & torch.isfinite(den)
        nan = torch.full_like(num, math.nan)
        # Keep the two EMAs on the same set of steps so their ratio is meaningful.
        self.num.update(torch.where(both, num, nan))
        self.den.update(torch.where(both, den, nan.to(den.dtype)))
        if self.keep_pairs:
            self.pairs.append((num.detach(), den.detach()))

    def state_dict(self) -> dict:
        """Both EMAs with their debias weights (the raw ``pairs`` history is not part of the state)."""
        return {"num": self.num.state_dict(), "den": self.den.state_dict(), "floor": self.floor}

    def load_state_dict(self, state: dict, device: torch.device | str | None = None) -> None:
        self.num.load_state_dict(state["num"], device)
        self.den.load_state_dict(state["den"], device)
        self.floor = float(state.get("floor", self.floor))

    def value(self) -> Tensor | None:
        """B_simple [examples] as a 0-dim float64 device tensor (NaN before any finite step), or None."""
        n, d = self.num.value(), self.den.value()
        if n is None or d is None:
            return None
        # A non-positive smoothed |G|² means the noise swamps the signal at this batch size: B_simple is beyond
        # anything measurable, reported as +inf (not a large made-up number).
        ok = d > self.floor * n.abs()
        return torch.where(ok, n / torch.where(ok, d, torch.ones_like(d)), torch.full_like(n, math.inf))
