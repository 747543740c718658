"""Noise injection and exposure control (SPEC §5): ``pnekern.AdamW(..., noise=pnekern.NoiseConfig(...))``.

(STYLE.md lists injection configs under ``optim/``; they live in this sibling package so the optimizer file stays
small. Data flow is unchanged: ``optim`` imports ``noise``, which imports ``stats`` and ``reference``.)

- :class:`NoiseConfig` with targets :func:`isotropic`, :func:`diagonal`, :func:`lowrank` or ``emulate_batch_size``,
  ``space="gradient" | "parameter"``, ``into_second_moment``, a target-exposure ``schedule`` and ``seed``;
- schedules :func:`constant`, :func:`ramp`, :func:`piecewise`, :func:`concentrated`, :func:`equal_exposure_pair`;
- building blocks: :class:`LowRankDiag`, :func:`psd_clip` (+ ``_diag``/``_lowrank``), :func:`sample_noise`,
  :class:`ExposureController`.
"""
from __future__ import annotations

from .config import METRICS, SPACES, DiagonalTarget, IsotropicTarget, LowRankTarget, NoiseConfig, diagonal, isotropic, lowrank
from .controller import ControllerConfig, ExposureController
from .covariance import LowRankDiag, psd_clip, psd_clip_diag, psd_clip_lowrank
from .injector import NOISE_FIELDS, NoiseInjector, NoisyStepStats
from .sampler import lowrank_normals, sample_noise
from .schedules import Schedule, concentrated, constant, equal_exposure_pair, piecewise, ramp

__all__ = [
    "NoiseConfig", "ControllerConfig", "isotropic", "diagonal", "lowrank", "IsotropicTarget", "DiagonalTarget",
    "LowRankTarget", "SPACES", "METRICS", "Schedule", "constant", "ramp", "piecewise", "concentrated",
    "equal_exposure_pair", "LowRankDiag", "psd_clip", "psd_clip_diag", "psd_clip_lowrank", "sample_noise",
    "lowrank_normals", "ExposureController", "NoiseInjector", "NoisyStepStats", "NOISE_FIELDS",
]
