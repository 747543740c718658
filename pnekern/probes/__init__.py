"""Curvature probes (SPEC §4): Hessian / finite-difference Hessian / GGN products over a fixed batch, randomised
trace, diagonal and eigenvalue estimators, the output-space (one vjp per probe) and sampled-label GGN traces, SAM and Gaussian-perturbation sharpness, and
:class:`CurvatureProbe`, which an optimizer drives (``opt.attach_probe(probe)``) to log Curv_t = Tr(A Ĥ A) and P-NE*.

A batch is ``(inputs, targets)`` with ``loss = loss_fn(model(inputs), targets)``; a tuple ``inputs`` is unpacked
(``model(*inputs)``) and ``forward=(model, inputs) -> output`` replaces the call. Nothing here writes the model's
parameters, ``.grad``, train/eval mode or the caller's RNG stream.

Units: for a loss in nats and parameters in units θ, curvature traces/eigenvalues are in nats/θ²; preconditioned
quantities Tr(A M A) carry an extra a² (Adam's a = 1/(sqrt(v̂)+eps) has units θ-per-gradient-unit).
"""
from __future__ import annotations

from ._estimators import (
    Estimate,
    hutchinson_diag,
    hutchinson_trace,
    hutchpp_trace,
    precond_trace,
    rademacher,
    top_eigenvalue,
    weighted_operator,
    xtrace,
)
from ._operators import (
    CurvatureOperator,
    as_operator,
    call_model,
    default_fd_step,
    fd_hvp,
    flatten_tensors,
    ggn_vp,
    hvp,
    select_params,
    unflatten_vector,
)
from ._output_space import output_space_ggn_trace
from ._probe import CurvatureProbe, ProbeResult
from ._sharpness import local_entropy, perturbation_sharpness, sam_sharpness, sampled_label_ggn_trace

__all__ = [
    "CurvatureOperator",
    "CurvatureProbe",
    "Estimate",
    "ProbeResult",
    "as_operator",
    "call_model",
    "default_fd_step",
    "fd_hvp",
    "flatten_tensors",
    "ggn_vp",
    "local_entropy",
    "output_space_ggn_trace",
    "hutchinson_diag",
    "hutchinson_trace",
    "hutchpp_trace",
    "hvp",
    "perturbation_sharpness",
    "precond_trace",
    "rademacher",
    "sam_sharpness",
    "sampled_label_ggn_trace",
    "select_params",
    "top_eigenvalue",
    "unflatten_vector",
    "weighted_operator",
    "xtrace",
]
