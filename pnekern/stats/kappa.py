"""Online calibration of the momentum variance amplification κ by mean-squared displacement (SPEC §3).

Over a lag h much longer than the momentum memory 1/(1−β1), the parameters of a noisy optimizer diffuse:
E‖θ_{t+h} − θ_t‖² ≈ c₀ + κ D̄ h + v̄² h², where D̄ = mean_t η_t² Tr(A Σ_step A) is the per-step diffusion the
statistics engine measures with κ = 1, v̄ the drift per step, and c₀ a constant from the momentum filter's boundary
(for Adam's EMA momentum with β1 = 0.9 it is about −9.5 steps' worth of diffusion: without it the slope is biased by
~20 % at h = 50). Fitting the slope and dividing by D̄ gives κ̂: ≈ 1 for Adam's EMA momentum, ≈ 1/(1−β1)² for heavy
ball. Decoupled weight decay shrinks θ deterministically (θ ← sθ − u); the displacement is taken against the
shrunk past, θ_{t+h} − (Π s)·θ_t, and the lag is replaced by the matching geometric sum.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

__all__ = ["KappaCalibrator", "KappaEstimate"]


@dataclass
class KappaEstimate:
    """Result of a κ fit.

    Attributes:
        kappa: κ̂ [dimensionless]; NaN when there is not enough history (fewer than 3 lags observed) or D̄ ≤ 0.
        diffusion: D̄, the mean per-step diffusion on the tracked coordinates with κ = 1 [θ²/step].
        slope: κ̂·D̄ [θ²/step] (the fit regresses the MSD on the diffusion measured inside each window).
        intercept: c₀ [θ²]. drift: v̄² [θ²/step²].
        lags, msd, counts: the lags used, mean squared displacement per lag [θ²] and windows averaged per lag.
        num_obs: optimizer steps observed.
    """

    kappa: float
    diffusion: float
    slope: float
    intercept: float
    drift: float
    num_obs: int
    lags: list[int] = field(default_factory=list)
    msd: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)


class KappaCalibrator:
    """Accumulates squared displacements of a fixed coordinate subset over a grid of lags.

    Memory: a ring buffer of ``h_max + 1`` snapshots of the subset (float64, on the subset's device). Each
    observation costs ``num_lags`` subtractions and norms on the device; nothing is read on the host until
    :meth:`estimate`.

    Args:
        h_min, h_max: smallest and largest lag in steps (SPEC: h ≥ 5/(1−β1)).
        num_lags: lags in the grid, log-spaced between h_min and h_max.
        drift: fit the v̄² h² drift term (SPEC §3); False fits c₀ + κ D̄ h only.
        warmup: observations ignored at the start. Trace-mode D_t uses A_{t−1}, and in Adam's first steps
            1/sqrt(v̂) rests on one or two squared gradients per coordinate — a heavy-tailed estimate (infinite
            mean at t = 2) that would inflate D̄ by tens of percent although the actual update is bounded.
            Default: h_min.
    """

    def __init__(self, h_min: int, h_max: int, num_lags: int = 12, drift: bool = True, warmup: int | None = None) -> None:
        if not (isinstance(h_min, int) and isinstance(h_max, int) and 1 <= h_min < h_max):
            raise ValueError(f"h_min={h_min!r}, h_max={h_max!r} must be ints with 1 <= h_min < h_max")
        if num_lags < 3:
            raise ValueError(f"num_lags={num_lags!r} must be >= 3 (the fit has up to three coefficients)")
        grid = np.unique(np.round(np.geomspace(h_min, h_max, num_lags)).astype(int))
        self.lags: list[int] = [int(h) for h in grid]
        self.h_max = int(h_max)
        self.drift = bool(drift)
        self._ring: Tensor | None = None  # [h_max + 1, m]
        self._ring_step: list[int | None] = [None] * (self.h_max + 1)  # optimizer step stored in each slot
        self._ring_logc = [0.0] * (self.h_max + 1)  # log of the cumulative shrink Π s at that snapshot
        self._logc = 0.0
        self._msd_sum: Tensor | None = None  # [G] Σ ‖θ_t − (C_t/C_{t−h}) θ_{t−h}‖²
        self._counts = [0] * len(self.lags)
        self._heff_sum = [0.0] * len(self.lags)  # Σ effective lag (variance weighting of the shrink)
        self._hlin2_sum = [0.0] * len(self.lags)  # Σ (drift lag)²
        self._dwin_sum: Tensor | None = None  # [G] Σ over windows of the diffusion inside the window
        self._ring_cumd: Tensor | None = None  # [h_max + 1] cumulative Σ D at each snapshot
        self._cumd: Tensor | None = None
        self._dsum: Tensor | None = None
        self.warmup = h_min if warmup is None else int(warmup)
        self._seen = 0
        self.num_obs = 0
        self._last_step = -1

    @torch.no_grad()
    def observe(self, theta: Tensor, diffusion: Tensor | float, shrink: float = 1.0, step: int | None = None) -> None:
        """Record θ on the tracked subset after an update, that update's diffusion D_t (κ = 1) and shrink s.

        Args:
            theta: [m] the tracked coordinates after the update (any float dtype; kept as float64).
            diffusion: D_t restricted to the same coordinates [θ²/step], 0-dim tensor or float.
            shrink: the decoupled weight-decay factor s = 1 − η·wd applied by this update.
            step: optimizer step index (defaults to consecutive); gaps (e.g. ``stats_every`` > 1) are handled —
                only pairs of snapshots exactly h steps apart are compared.
        """
        if not shrink > 0:
            raise ValueError(f"shrink={shrink!r} must be positive (1 − lr·weight_decay > 0)")
        theta = theta.detach().reshape(-1).to(torch.float64)
        step = self._last_step + 1 if step is None else int(step)
        if step <= self._last_step:
            raise ValueError(f"step={step} must increase (last observed {self._last_step})")
        self._seen += 1
        if self._seen <= self.warmup:
            self._last_step = step
            return
        if self._ring is None or self._ring.shape[1] != theta.numel():
            self._ring = torch.zeros(self.h_max + 1, theta.numel(), dtype=torch.float64, device=theta.device)
            self._msd_sum = torch.zeros(len(self.lags), dtype=torch.float64, device=theta.device)
            self._dsum = torch.zeros((), dtype=torch.float64, device=theta.device)
            self._dwin_sum = torch.zeros(len(self.lags), dtype=torch.float64, device=theta.device)
            self._ring_cumd = torch.zeros(self.h_max + 1, dtype=torch.float64, device=theta.device)
            self._cumd = torch.zeros((), dtype=torch.float64, device=theta.device)
        d = diffusion if isinstance(diffusion, Tensor) else torch.tensor(float(diffusion), dtype=torch.float64)
        d = torch.nan_to_num(d.detach().to(device=theta.device, dtype=torch.float64).reshape(()), nan=0.0)
        self._cumd = self._cumd + d
        # The shrink of steps that were not observed is approximated by this one's.
        gap = step - self._last_step if self._last_step >= 0 else 1
        self._logc += gap * math.log(shrink)
        terms, dwins, used = [], [], []
        for i, h in enumerate(self.lags):
            slot = (step - h) % (self.h_max + 1)
            if self._ring_step[slot] != step - h:
                continue
            dlog = self._logc - self._ring_logc[slot]
            ratio = math.exp(dlog)
            terms.append((theta - ratio * self._ring[slot]).square().sum())
            used.append(i)
            s = math.exp(dlog / h)
            if abs(1.0 - s) < 1e-12:
                heff, hlin = float(h), float(h)
            else:
                heff = (1.0 - s ** (2 * h)) / (1.0 - s * s)
                hlin = (1.0 - s**h) / (1.0 - s)
            # Diffusion that entered this window (steps after the old snapshot up to now), shrink-weighted.
            dwins.append((self._cumd - self._ring_cumd[slot]) * (heff / h))
            self._counts[i] += 1
            self._heff_sum[i] += heff
            self._hlin2_sum[i] += hlin * hlin
        if terms:
            idx = torch.tensor(used, device=theta.device)
            self._msd_sum.index_add_(0, idx, torch.stack(terms))
            self._dwin_sum.index_add_(0, idx, torch.stack(dwins))
        slot = step % (self.h_max + 1)
        self._ring[slot].copy_(theta)
        self._ring_step[slot] = step
        self._ring_logc[slot] = self._logc
        self._ring_cumd[slot] = self._cumd
        self._dsum += d
        self.num_obs += 1
        self._last_step = step

    _TENSORS = ("_ring", "_msd_sum", "_dwin_sum", "_ring_cumd", "_cumd", "_dsum")
    _LISTS = ("_ring_step", "_ring_logc", "_counts", "_heff_sum", "_hlin2_sum")
    _SCALARS = ("_logc", "warmup", "_seen", "num_obs", "_last_step")

    def state_dict(self) -> dict:
        """The ring buffer, per-lag sums and counters (tensors by reference; lists copied)."""
        out: dict = {"lags": list(self.lags), "h_max": self.h_max, "drift": self.drift}
        out.update({k.lstrip("_"): getattr(self, k) for k in self._TENSORS + self._SCALARS})
        out.update({k.lstrip("_"): list(getattr(self, k)) for k in self._LISTS})
        return out

    def load_state_dict(self, state: dict, device: torch.device | str | None = None) -> None:
        """Restore :meth:`state_dict` (tensors copied, to ``device`` when given); the lag grid must match."""
        if list(state["lags"]) != self.lags or int(state["h_max"]) != self.h_max:
            raise ValueError(
                f"KappaCalibrator: saved lags {list(state['lags'])} (h_max {state['h_max']}) do not match this "
                f"calibrator's {self.lags} (h_max {self.h_max})"
            )
        self.drift = bool(state["drift"])
        for k in self._TENSORS:
            t = state[k.lstrip("_")]
            setattr(self, k, None if t is None else t.detach().to(device=device if device is not None else t.device, copy=True))
        for k in self._LISTS:
            setattr(self, k, list(state[k.lstrip("_")]))
        self._logc = float(state["logc"])
        for k in ("warmup", "_seen", "num_obs", "_last_step"):
            setattr(self, k, int(state[k.lstrip("_")]))

    def estimate(self) -> KappaEstimate:
        """Fit MSD(h) and return κ̂ (one host transfer)."""
        nan = math.nan
        if self._msd_sum is None or self.num_obs == 0:
            return KappaEstimate(nan, nan, nan, nan, nan, self.num_obs)
        msd_sum = self._msd_sum.cpu().numpy()
        dbar = float(self._dsum.cpu()) / self.num_obs
        rows = [i for i, c in enumerate(self._counts) if c > 0]
        lags = [self.lags[i] for i in rows]
        counts = [self._counts[i] for i in rows]
        msd = [float(msd_sum[i] / self._counts[i]) for i in rows]
        ncoef = 3 if self.drift else 2
        if len(rows) < ncoef + 1:
            return KappaEstimate(nan, dbar, nan, nan, nan, self.num_obs, lags, msd, counts)
        dwin_sum = self._dwin_sum.cpu().numpy()
        # Regress on the diffusion measured inside the windows rather than D̄·h: exact under LR schedules and
        # any other drift of D_t, identical when D_t is stationary.
        heff = np.array([dwin_sum[i] / self._counts[i] for i in rows])
        hlin2 = np.array([self._hlin2_sum[i] / self._counts[i] for i in rows])
        y = np.array(msd)
        cols = [np.ones_like(heff), heff] + ([hlin2] if self.drift else [])
        x = np.stack(cols, axis=1)
        # The MSD at lag h has standard error ∝ h / sqrt(windows): weight rows by sqrt(count)/h.
        w = np.sqrt(np.array(counts, dtype=np.float64)) / np.array(lags, dtype=np.float64)
        coef, *_ = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)
        kappa = float(coef[1]) if dbar > 0 else nan
        slope = kappa * dbar
        return KappaEstimate(
            kappa=kappa, diffusion=dbar, slope=slope, intercept=float(coef[0]),
            drift=float(coef[2]) if self.drift else 0.0, num_obs=self.num_obs, lags=lags, msd=msd, counts=counts,
        )
