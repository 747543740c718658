"""Counterfactual Noise Replay (SPEC §7): record a run, then predict how a metric f(θ_T) would change under a
different noise sample, a different noise covariance or a different learning rate — without retraining.

- :class:`Recorder` — runs the training step and records batches, η_t, noise seeds (optionally v̂_t) and
  checkpoints every c steps (bounded storage); any step can be recomputed bit for bit.
- :class:`CNR` — tangent (forward, one HVP per step) and adjoint (backward, one HVP per step, checkpoint +
  recompute) propagation through the linearized SGD / SGD+momentum / Adam(W) update; covariance-change prediction
  with Hessian-of-f probes; validation by re-running with common random numbers (:meth:`CNR.rerun`).
- :class:`GaussianNoise` — parameter-space noise regenerated from per-step seeds.
"""
from __future__ import annotations

from .recorder import GaussianNoise, Recorder, StepRecord, optimizer_params, step_noise_seed, train_step
from .replay import CNR, AdjointResult, CovarianceChange, StepLinearization, exact_hessian_probes

__all__ = [
    "Recorder", "StepRecord", "GaussianNoise", "train_step", "step_noise_seed", "optimizer_params",
    "CNR", "AdjointResult", "CovarianceChange", "StepLinearization", "exact_hessian_probes",
]
