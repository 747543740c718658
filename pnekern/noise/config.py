"""User-facing noise-injection configuration: targets and :class:`NoiseConfig` (SPEC §5).

A *target* is the covariance the step gradient should have, Σ_target [g²] per parameter. The injected residual is
R = Σ_target − Σ_step (Σ_step measured in the step by the diag/lowrank statistics), clipped to PSD. With
``additive=True`` the target is the residual itself (nothing is subtracted; works with any statistics mode).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .controller import ControllerConfig
from .schedules import Schedule, constant

__all__ = [
    "NoiseConfig", "IsotropicTarget", "DiagonalTarget", "LowRankTarget", "isotropic", "diagonal", "lowrank",
    "SPACES", "METRICS",
]

SPACES = ("gradient", "parameter")
METRICS = ("temperature", "pne_star")


@dataclass(frozen=True)
class IsotropicTarget:
    """Σ_target = σ² I for every parameter; ``sigma2`` in g² (per element)."""

    sigma2: float


@dataclass(frozen=True)
class DiagonalTarget:
    """Σ_target = diag(variances[i]) for parameter i (in the optimizer's parameter order; None = no target there)."""

    variances: tuple[Tensor | None, ...]


@dataclass(frozen=True)
class LowRankTarget:
    """Σ_target = U diag(S) Uᵀ + diag(D) for parameter i: ``factors[i] = (U [d, k], S [k], D [d] or float)``."""

    factors: tuple[tuple[Tensor, Tensor, Tensor | float] | None, ...]


def _nonneg_tensor(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {type(t).__name__}")
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise ValueError(f"{name} must be finite and >= 0 (a variance); it has negative or non-finite entries")


def isotropic(sigma2: float) -> IsotropicTarget:
    """Σ_target = σ² I [g² per element]."""
    if isinstance(sigma2, bool) or not isinstance(sigma2, (int, float)) or not math.isfinite(sigma2) or sigma2 < 0:
        raise ValueError(f"sigma2={sigma2!r} must be a finite variance >= 0")
    return IsotropicTarget(float(sigma2))


def diagonal(variances: Sequence[Tensor | None]) -> DiagonalTarget:
    """Σ_target = diag(variances[i]) per parameter; each tensor has its parameter's shape (or numel elements)."""
    if isinstance(variances, Tensor) or not isinstance(variances, Sequence):
        raise ValueError("variances must be a sequence with one tensor (or None) per parameter, in optimizer order")
    for i, v in enumerate(variances):
        if v is not None:
            _nonneg_tensor(f"variances[{i}]", v)
    return DiagonalTarget(tuple(v.detach() if v is not None else None for v in variances))


def lowrank(factors: Sequence[tuple[Tensor, Tensor, Tensor | float] | None]) -> LowRankTarget:
    """Σ_target = U diag(S) Uᵀ + diag(D) per parameter: ``factors[i] = (U [d, k], S [k] >= 0, D [d] or float >= 0)``."""
    if not isinstance(factors, Sequence):
        raise ValueError("factors must be a sequence with one (U, S, D) triple (or None) per parameter")
    out = []
    for i, f in enumerate(factors):
        if f is None:
            out.append(None)
            continue
        if not isinstance(f, (tuple, list)) or len(f) != 3:
            raise ValueError(f"factors[{i}] must be a (U, S, D) triple")
        u, s, d = f
        if not isinstance(u, Tensor) or u.dim() != 2 or not u.is_floating_point():
            raise ValueError(f"factors[{i}] U must be a floating-point [d, k] tensor")
        _nonneg_tensor(f"factors[{i}] S", s)
        if s.dim() != 1 or s.shape[0] != u.shape[1]:
            raise ValueError(f"factors[{i}] S must have shape [{u.shape[1]}] (one value per column of U), got {tuple(s.shape)}")
        if isinstance(d, Tensor):
            _nonneg_tensor(f"factors[{i}] D", d)
            if d.numel() not in (1, u.shape[0]):
                raise ValueError(f"factors[{i}] D must have {u.shape[0]} elements (rows of U) or be a scalar")
        elif isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d < 0:
            raise ValueError(f"factors[{i}] D={d!r} must be a tensor or a float >= 0")
        out.append((u.detach(), s.detach(), d.detach() if isinstance(d, Tensor) else float(d)))
    return LowRankTarget(tuple(out))


Target = IsotropicTarget | DiagonalTarget | LowRankTarget


@dataclass(frozen=True)
class NoiseConfig:
    """Noise injection for :class:`pnekern.AdamW` (``noise=NoiseConfig(...)``).

    Args:
        target: :func:`isotropic`, :func:`diagonal` or :func:`lowrank`: the covariance Σ_target [g²] the step
            gradient should have. Exactly one of ``target`` / ``emulate_batch_size`` unless only a ``schedule`` is
            given (then the shape defaults to ``isotropic(1.0)`` with ``additive=True``).
        emulate_batch_size: B' ≤ B (the optimizer's ``batch_size``): Σ_target = Σ_step · B/B', so the residual is
            Σ_step·(B/B' − 1) (needs ``stats='diag'`` or ``'lowrank'``).
        additive: inject ``target`` itself (R = Σ_target, nothing subtracted; any statistics mode). False (default)
            subtracts the measured Σ_step (needs diag/lowrank statistics).
        space: ``"gradient"``: ε ~ N(0, c·R) added to the step gradient before the moments (no κ: the momentum
            filters ε like real noise). ``"parameter"``: ζ ~ N(0, η² κ A (c·R) A) added after the update, with
            A = A_t (the preconditioner the update used) and η the group's lr.
        into_second_moment: gradient space only: True (default) lets ε enter v like real gradient noise; False
            keeps it out of v (ε enters m and the update only).
        schedule: target exposure: a :class:`Schedule` (see :mod:`pnekern.noise.schedules`) or a float (constant);
            enables the closed-loop controller that scales R by c_t. None: c_t = 1.
        metric: what ``schedule`` targets: ``"temperature"`` (NE_t, total natural + injected) or ``"pne_star"``
            (P-NE*_t = NE_t / Curv_t; needs a curvature probe attached to the optimizer).
        controller: :class:`ControllerConfig` (gains, clamps).
        seed: uint64 seed of the Philox noise stream (the stream's counter is the optimizer step; both are in
            ``state_dict()``).
        chunk_elems: sample the noise this many elements at a time (memory bound; the stream does not depend on it).
            Only the Python sampling path uses it (``in_step=False`` or parameters the fused step cannot take).
        in_step: True (default): the fused step draws ε itself (C++, Triton and reference backends; same Philox
            stream, no ε or noisy-gradient tensor is allocated) wherever it can: fp32/bf16/fp16 real parameters,
            not ``differentiable``, and not parameter space with a ``schedule`` (its scale needs the updated A_t
            before ζ is drawn). False: draw ε in Python with :func:`pnekern.noise.sampler.sample_noise` and hand
            the kernel a noisy gradient copy / patch m and θ afterwards (the original path; same stream).
    """

    target: Target | None = None
    emulate_batch_size: int | None = None
    additive: bool = False
    space: str = "gradient"
    into_second_moment: bool = True
    schedule: Schedule | float | None = None
    metric: str = "temperature"
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    seed: int = 0
    chunk_elems: int | None = None
    in_step: bool = True

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise ValueError(f"space={self.space!r} must be one of {SPACES}")
        if self.metric not in METRICS:
            raise ValueError(f"metric={self.metric!r} must be one of {METRICS}")
        if not isinstance(self.in_step, bool):
            raise ValueError(f"in_step={self.in_step!r} must be a bool")
        if not isinstance(self.into_second_moment, bool):
            raise ValueError(f"into_second_moment={self.into_second_moment!r} must be a bool")
        if not self.into_second_moment and self.space != "gradient":
            raise ValueError("into_second_moment=False only applies to space='gradient'")
        if not isinstance(self.additive, bool):
            raise ValueError(f"additive={self.additive!r} must be a bool")
        if self.target is not None and not isinstance(self.target, (IsotropicTarget, DiagonalTarget, LowRankTarget)):
            raise ValueError(
                f"target={self.target!r} must be built with pnekern.noise.isotropic / diagonal / lowrank"
            )
        eb = self.emulate_batch_size
        if eb is not None:
            if isinstance(eb, bool) or not isinstance(eb, int) or eb < 1:
                raise ValueError(f"emulate_batch_size={eb!r} must be a positive int (examples per emulated step)")
            if self.target is not None:
                raise ValueError("give either target or emulate_batch_size, not both")
            if self.additive:
                raise ValueError("emulate_batch_size builds the residual from the measured noise; additive=True does not apply")
        if self.target is None and eb is None and self.schedule is None:
            raise ValueError("NoiseConfig needs a target, an emulate_batch_size or a schedule")
        if self.schedule is not None and not isinstance(self.schedule, Schedule):
            if isinstance(self.schedule, bool) or not isinstance(self.schedule, (int, float)):
                raise ValueError(f"schedule={self.schedule!r} must be a pnekern.noise Schedule or a float")
            object.__setattr__(self, "schedule", constant(float(self.schedule)))
        if self.target is None and eb is None:
            # A bare schedule: the controller scales isotropic unit noise.
            object.__setattr__(self, "target", IsotropicTarget(1.0))
            object.__setattr__(self, "additive", True)
        if not isinstance(self.controller, ControllerConfig):
            raise ValueError(f"controller={self.controller!r} must be a ControllerConfig")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            raise ValueError(f"seed={self.seed!r} must be an int in [0, 2**64)")
        if self.chunk_elems is not None and (
            isinstance(self.chunk_elems, bool) or not isinstance(self.chunk_elems, int) or self.chunk_elems < 1
        ):
            raise ValueError(f"chunk_elems={self.chunk_elems!r} must be a positive int or None")

    @property
    def measured(self) -> bool:
        """Whether the residual subtracts (or scales) the measured Σ_step (needs diag/lowrank statistics)."""
        return self.emulate_batch_size is not None or not self.additive
