"""Reference fused AdamW step (torch.optim.AdamW semantics, SPEC §1) with the in-step noise statistics.

Math is done in fp32 (fp64 for the statistics) whatever the storage dtype, exactly as the compiled kernels do,
so this is the oracle they are compared against.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["adamw_step_", "microbatch_accumulate_", "STATS_COLUMNS"]

#: Columns of the per-tensor ``stats_out`` rows written by the fused step (all float64 sums over elements):
#: 0: Σ g²  (g = the unscaled step gradient p.grad),
#: 1: Σ a_prev² g²  with a_prev = 1/(sqrt(v_{t-1}/bc2_{t-1}) + eps) (all ones before the first step),
#: 2: Σ a_new² g²   with a_new = 1/denom of this step (A_t),
#: 3: Σ a_new² q    with q the optional per-tensor sum-of-squares buffer (diag mode), 0 without one.
STATS_COLUMNS = ("grad_sq", "precond_prev_grad_sq", "precond_new_grad_sq", "precond_new_sumsq")


def _host_step(step_t: Tensor) -> float | Tensor:
    # CPU step tensors (torch's default) are read without a device sync; device-resident steps
    # (capturable/fused) stay tensors so nothing waits on the device.
    return float(step_t) if step_t.device.type == "cpu" else step_t.to(torch.float64)


def adamw_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    amsgrad: bool,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    sumsq_bufs: Sequence[Tensor] = (),
    stats_out: Tensor | None = None,
) -> None:
    """One AdamW step over N tensors, in place (params, grads on unscale, state, steps, stats_out).

    Args:
        params, grads, exp_avgs, exp_avg_sqs: N tensors each, matching shapes; real dtypes (complex params are
            passed as ``view_as_real`` views by the optimizer).
        max_exp_avg_sqs: N tensors with ``amsgrad``, else empty.
        state_steps: N 0-dim float tensors; incremented by one unless ``found_inf`` is nonzero.
        lr, beta1, beta2, weight_decay, eps, amsgrad, maximize: torch.optim.AdamW hyperparameters.
        grad_scale: optional 0-dim tensor; gradients are divided by it and the unscaled gradient is written back
            (what torch's fused AdamW does for GradScaler).
        found_inf: optional 0-dim tensor; when nonzero nothing at all changes and the step does not count.
        sumsq_bufs: empty, or N fp32 tensors (Σ_k x_k² per element, diag mode) used by stats column 3.
        stats_out: optional float64 tensor [N, 4] overwritten with the per-tensor sums in ``STATS_COLUMNS``.
    """
    n = len(params)
    if stats_out is not None and tuple(stats_out.shape) != (n, 4):
        raise RuntimeError(f"adamw_step_: stats_out must have shape [{n}, 4], got {tuple(stats_out.shape)}")
    skip = None
    if found_inf is not None:
        skip = found_inf.reshape(()).to(device=params[0].device if n else found_inf.device) != 0
    for i in range(n):
        p, g_raw, m, v = params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]
        vmax = max_exp_avg_sqs[i] if amsgrad else None
        step_t = state_steps[i]
        step_prev = _host_step(step_t)
        step = step_prev + 1

        # fp32 math for fp32/bf16/fp16 storage (what the kernels do); float64 storage keeps float64 math, as torch does.
        ct = torch.float64 if p.dtype == torch.float64 else torch.float32
        g = g_raw.to(ct, copy=True)
        if grad_scale is not None:
            g = g / grad_scale.to(device=g.device, dtype=ct)
        g_signed = -g if maximize else g

        p32 = p.to(ct, copy=True)
        m32 = m.to(ct, copy=True)
        v32 = v.to(ct, copy=True)
        v_prev = (vmax if amsgrad else v).to(ct, copy=True)

        if weight_decay != 0:
            p32.mul_(1 - lr * weight_decay)
        m32.lerp_(g_signed, 1 - beta1)
        v32.mul_(beta2).addcmul_(g_signed, g_signed, value=1 - beta2)
        bc1 = 1 - beta1**step
        bc2 = 1 - beta2**step
        step_size = lr / bc1
        bc2_sqrt = bc2**0.5
        if amsgrad:
            vmax32 = torch.maximum(vmax.to(ct), v32)
            denom = (vmax32.sqrt() / bc2_sqrt).add_(eps)
        else:
            vmax32 = None
            denom = (v32.sqrt() / bc2_sqrt).add_(eps)
        if isinstance(step_size, Tensor):
            p32.addcdiv_(m32, denom * (-1.0 / step_size).to(ct))
        else:
            p32.addcdiv_(m32, denom, value=-step_size)

        if stats_out is not None:
            g64 = g.to(torch.float64)
            gsq = g64 * g64
            if isinstance(step_prev, Tensor) or step_prev > 0:
                bc2_prev = 1 - beta2**step_prev
                a_prev = 1.0 / (v_prev.to(torch.float64).sqrt() / bc2_prev**0.5 + eps)
            else:
                a_prev = torch.ones_like(g64)
            a_new = 1.0 / denom.to(torch.float64)
            row = [gsq.sum(), (a_prev * a_prev * gsq).sum(), (a_new * a_new * gsq).sum()]
            if len(sumsq_bufs):
                row.append((a_new * a_new * sumsq_bufs[i].to(torch.float64)).sum())
            else:
                row.append(torch.zeros((), dtype=torch.float64, device=g.device))
            row_t = torch.stack([r.to(stats_out.device) for r in row])
            if skip is not None:
                row_t = torch.where(skip.to(stats_out.device), torch.zeros_like(row_t), row_t)
            stats_out[i].copy_(row_t)

        def _commit(dst: Tensor, new: Tensor) -> None:
            new = new.to(dst.dtype)
            dst.copy_(new if skip is None else torch.where(skip, dst, new))

        _commit(p, p32)
        _commit(m, m32)
        _commit(v, v32)
        if amsgrad:
            _commit(vmax, vmax32)
        if grad_scale is not None:
            _commit(g_raw, g)
        if skip is None:
            step_t.add_(1)
        else:
            step_t.add_((~skip).to(device=step_t.device, dtype=step_t.dtype))


def microbatch_accumulate_(
    acc: Tensor,
    x: Tensor,
    v: Tensor | None,
    inv_sqrt_bc2: float,
    eps: float,
    scale: float,
    sumsq: Tensor | None = None,
) -> None:
    """Accumulate one micro-batch gradient contribution's squared norms (SPEC §2, trace/diag modes).

    acc[0] += Σ (scale·x)²,  acc[1] += Σ a² (scale·x)²  with a = 1/(sqrt(v)·inv_sqrt_bc2 + eps) (a = 1 when v is
    None), and ``sumsq += (scale·x)²`` elementwise when a diag-mode buffer is given.

    Args:
        acc: float64 tensor [2], updated in place.
        x: the contribution (any float dtype), same shape as v / sumsq.
        v: second moment (``exp_avg_sq``, or ``max_exp_avg_sq`` with amsgrad) or None before the first step.
        inv_sqrt_bc2: 1/sqrt(1 − β2^t) for the state's step t.
        eps: Adam's eps.
        scale: multiplier applied to x first (e.g. 1/loss_scale under AMP).
        sumsq: optional fp32 buffer, updated in place.
    """
    xs = x.to(torch.float64) * scale
    sq = xs * xs
    if v is None:
        s1 = sq.sum()
    else:
        a = 1.0 / (v.to(torch.float64).sqrt() * inv_sqrt_bc2 + eps)
        s1 = (a * a * sq).sum()
    acc[0] += sq.sum().to(acc.device)
    acc[1] += s1.to(acc.device)
    if sumsq is not None:
        sumsq.add_(sq.to(sumsq.dtype))
