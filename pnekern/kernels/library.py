"""The Triton launchers as ``torch.library`` custom ops: ``torch.ops.pnekern_triton.adamw_step_`` and
``torch.ops.pnekern_triton.microbatch_accumulate_``.

Why: Dynamo cannot trace a Triton launcher written in Python (host-side checks, pointer tables, lists of tensors).
As custom ops with fake implementations and declared mutations, a ``torch.compile``d training step records each
launch as one opaque node and runs it, without a graph break. The schemas mirror the C++ operators in
``csrc/torch_ops.cpp`` (``lr`` is split into a float and an optional device tensor, since a schema argument has one
type). The launchers (``adamw_step.adamw_step_``, ``microbatch_accumulate.microbatch_accumulate_``) hold the contract.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor
from torch.library import custom_op

__all__ = ["adamw_step_op", "microbatch_accumulate_op"]


@custom_op(
    "pnekern_triton::adamw_step_",
    mutates_args=("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps", "stats_out"),
)
def adamw_step_op(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    lr: float,
    lr_tensor: Optional[Tensor],
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    amsgrad: bool,
    maximize: bool,
    grad_scale: Optional[Tensor],
    found_inf: Optional[Tensor],
    sumsq_bufs: list[Tensor],
    stats_out: Optional[Tensor],
    noise_mode: int,
    noise_seed: int,
    noise_counter: int,
    noise_param_coef: float,
    noise_scale: Optional[Tensor],
    noise_tensor_idx: list[int],
    noise_var: list[Tensor],
    noise_basis: list[Tensor],
    noise_coef: list[Tensor],
) -> None:
    """Fused AdamW step (+ statistics, + in-step noise) over all tensors in one launch; see the launcher."""
    from .adamw_step import adamw_step_

    adamw_step_(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
        lr_tensor if lr_tensor is not None else lr, beta1, beta2, weight_decay, eps, amsgrad, maximize,
        grad_scale, found_inf, sumsq_bufs, stats_out, noise_mode, noise_seed, noise_counter, noise_param_coef,
        noise_scale, noise_tensor_idx, noise_var, noise_basis, noise_coef,
    )


@adamw_step_op.register_fake
def _adamw_step_fake(*args, **kwargs) -> None:  # in-place only: nothing to allocate
    return None


@custom_op("pnekern_triton::microbatch_accumulate_", mutates_args=("acc", "sumsq"))
def microbatch_accumulate_op(
    acc: Tensor, x: Tensor, v: Optional[Tensor], inv_sqrt_bc2: float, eps: float, scale: float,
    sumsq: Optional[Tensor], assign_sumsq: bool = False,
) -> None:
    """(Σx², Σa²x²) of one contribution into ``acc`` and x² into ``sumsq``; see the launcher."""
    from .microbatch_accumulate import microbatch_accumulate_

    microbatch_accumulate_(acc, x, v, inv_sqrt_bc2, eps, scale, sumsq, assign_sumsq)


@microbatch_accumulate_op.register_fake
def _microbatch_accumulate_fake(*args, **kwargs) -> None:
    return None
