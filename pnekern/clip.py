"""Gradient clipping that tells the noise statistics what it did, so post-clip exposure is exact."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .stats.engine import engines_for

__all__ = ["clip_grad_norm_"]


def clip_grad_norm_(
    parameters: Tensor | Iterable[Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> Tensor:
    """Same contract as ``torch.nn.utils.clip_grad_norm_`` (returns the total norm before clipping).

    Additionally records the clip coefficient c = min(1, max_norm/(norm + 1e-6)) — torch's own formula — in every
    pnekern statistics engine tracking these parameters: the step's noise statistics are then reported for the
    clipped gradient c·ḡ (covariance c²Σ_step) with the pre-clip temperature alongside (``temperature_preclip``).
    No host sync: c stays a device tensor.
    """
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    params = list(parameters)
    total = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite=error_if_nonfinite, foreach=foreach)
    coef = torch.clamp(float(max_norm) / (total.to(torch.float64) + 1e-6), max=1.0)
    for engine in engines_for(params):
        engine.clip_coef = coef if engine.clip_coef is None else engine.clip_coef * coef
    return total
