"""Reference fused AdamW step (torch.optim.AdamW semantics, SPEC §1) with the in-step noise statistics.

Math is done in fp32 (fp64 for the statistics) whatever the storage dtype, exactly as the compiled kernels do,
so this is the oracle they are compared against.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .philox import philox_normal

__all__ = ["adamw_step_", "microbatch_accumulate_", "step_noise", "STATS_COLUMNS", "TRACE_STATS_COLS",
           "PRECOND_NEW_COLUMNS", "PRECOND_NEW_STATS_COLS", "NOISE_MODES"]

#: In-step noise modes (the ``noise_mode`` argument, SPEC §5): 0 off; 1 gradient space into v (g ← g + ε before m
#: and v); 2 gradient space outside v (m and the update use g + ε, v uses g); 3 parameter space (after the update
#: θ ← θ + noise_param_coef · a_new ⊙ ε, a_new = 1/denom of this step).
NOISE_MODES = {"off": 0, "into_v": 1, "outside_v": 2, "param": 3}

#: Columns of the per-tensor ``stats_out`` rows written by the fused step (all float64 sums over elements):
#: 0: Σ g²  (g = the unscaled step gradient p.grad),
#: 1: Σ a_prev² g²  with a_prev = 1/(sqrt(v_{t-1}/bc2_{t-1}) + eps) (all ones before the first step),
#: 2: Σ a_new² g²   with a_new = 1/denom of this step (A_t),
#: 3: Σ a_new² q    with q the optional per-tensor sum-of-squares buffer (diag mode), 0 without one.
#: ``stats_out`` is [N, 4] (all four), [N, 2] (columns 0–1 only: trace mode, which needs no A_t, and whose CPU
#: kernel then does about half the statistics work) or [N, 3] (columns 0, 2, 3: diag/lowrank mode, which needs no
#: A_{t−1}, so the CPU kernel skips a sqrt and a division per element).
STATS_COLUMNS = ("grad_sq", "precond_prev_grad_sq", "precond_new_grad_sq", "precond_new_sumsq")
#: Width of a trace-mode ``stats_out`` row (its columns 0–1).
TRACE_STATS_COLS = 2
#: The ``STATS_COLUMNS`` an A_t ``stats_out`` row holds, and its width.
PRECOND_NEW_COLUMNS = (0, 2, 3)
PRECOND_NEW_STATS_COLS = len(PRECOND_NEW_COLUMNS)


def step_noise(
    numel: int,
    seed: int,
    counter: int,
    tensor_idx: int,
    var: Tensor,
    basis: Tensor | None = None,
    coef: Tensor | None = None,
    scale: Tensor | None = None,
    device=None,
) -> Tensor | None:
    """ε of one tensor as the fused kernels compute it in-step (the contract, materialised here as the oracle).

    ε_e = (z_e · sqrt(max(δ_e, 0)) + Σ_j U[e, j] · c_j) · sqrt(c)   in fp32, in this order (j ascending),

    z_e = ``philox_normal(seed, counter, tensor_idx)`` element e. This is exactly what
    ``pnekern.noise.sampler.sample_noise`` returns for Σ = U diag(s) Uᵀ + diag(δ) when c_j = fp32(sqrt(s_j)·z_r[j])
    with z_r the stream's elements d .. d+k−1, times ``scale``'s fp32 square root.

    Args:
        numel: d. var: δ, fp32 with 0 elements (no noise: returns None), 1 (isotropic) or d; units g².
        basis: U, fp32 [d, k] or None / empty. coef: c, fp32 [k]. scale: optional one-element controller scale.
    Returns:
        fp32 [d] ε [g], or None when ``var`` is empty.
    """
    if var.numel() == 0:
        return None
    device = var.device if device is None else device
    z = philox_normal(seed, counter, tensor_idx, numel, device=device)
    delta = var.reshape(-1).to(device=device, dtype=torch.float32)
    if delta.numel() == 1:
        delta = delta.reshape(())
    eps = z * delta.clamp(min=0.0).sqrt()
    if basis is not None and basis.numel():
        u = basis.to(device=device, dtype=torch.float32).reshape(numel, -1)
        c = coef.to(device=device, dtype=torch.float32).reshape(-1)
        for j in range(u.shape[1]):
            eps = eps + u[:, j] * c[j]
    if scale is not None:
        eps = eps * scale.detach().reshape(()).to(device=device, dtype=torch.float32).sqrt()
    return eps


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
    noise_mode: int = 0,
    noise_seed: int = 0,
    noise_counter: int = 0,
    noise_param_coef: float = 0.0,
    noise_scale: Tensor | None = None,
    noise_tensor_idx: Sequence[int] = (),
    noise_var: Sequence[Tensor] = (),
    noise_basis: Sequence[Tensor] = (),
    noise_coef: Sequence[Tensor] = (),
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
        stats_out: optional float64 tensor [N, 4] overwritten with the per-tensor sums in ``STATS_COLUMNS``, or
            [N, 2] (columns 0–1, trace mode) or [N, 3] (columns 0, 2, 3: ``PRECOND_NEW_STATS_COLS``, diag/lowrank
            mode, which never reads A_{t−1}).
        noise_mode: ``NOISE_MODES`` value; 0 (default) ignores every other noise argument.
        noise_seed, noise_counter: the Philox key (uint64; the C++ op takes it as int64 two's complement) and step
            word. noise_tensor_idx: N Philox tensor words.
        noise_var: N fp32 tensors δ with 0 (no noise for that tensor), 1 (isotropic) or numel elements [g²].
        noise_basis, noise_coef: empty, or N fp32 tensors U [numel, k] (0 elements: none) and c [k] (see
            :func:`step_noise`). noise_scale: optional one-element controller scale c (ε is multiplied by sqrt(c)).
        noise_param_coef: η·sqrt(κ) of parameter-space noise (mode 3).
    The statistics rows always use the clean gradient. With ``found_inf`` nothing changes (noise included).
    """
    n = len(params)
    full_cols = len(STATS_COLUMNS)
    if stats_out is not None and tuple(stats_out.shape) not in (
            (n, full_cols), (n, PRECOND_NEW_STATS_COLS), (n, TRACE_STATS_COLS)):
        raise RuntimeError(f"adamw_step_: stats_out must have shape [{n}, {full_cols}] (all sums), "
                           f"[{n}, {PRECOND_NEW_STATS_COLS}] (Σ g², Σ a_new² g², Σ a_new² q) or "
                           f"[{n}, {TRACE_STATS_COLS}] (Σ g² and Σ a_prev² g² only), got {tuple(stats_out.shape)}")
    noise_mode = int(noise_mode)
    if noise_mode not in NOISE_MODES.values():
        raise RuntimeError(f"adamw_step_: noise_mode must be 0 (off), 1 (into_v), 2 (outside_v) or 3 (param), got {noise_mode}")
    eps_all: list[Tensor | None] = [None] * n
    if noise_mode:
        if len(noise_tensor_idx) != n or len(noise_var) != n:
            raise RuntimeError(f"adamw_step_: noise needs one noise_tensor_idx and one noise_var per param: got {n} "
                               f"params, {len(noise_tensor_idx)} indices, {len(noise_var)} variances")
        if len(noise_basis) not in (0, n) or len(noise_coef) != len(noise_basis):
            raise RuntimeError("adamw_step_: noise_basis must be empty or one per param, with matching noise_coef")
        seed = int(noise_seed) & 0xFFFFFFFFFFFFFFFF
        for i in range(n):
            # Drawn before anything is mutated (the oracle materialises ε; the kernels never do).
            eps_all[i] = step_noise(
                params[i].numel(), seed, int(noise_counter) & 0xFFFFFFFF, int(noise_tensor_idx[i]), noise_var[i],
                noise_basis[i] if len(noise_basis) else None, noise_coef[i] if len(noise_coef) else None,
                noise_scale, device=params[i].device,
            )
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
        eps_n = eps_all[i]
        g_m = g_v = g_signed
        if eps_n is not None:
            e = eps_n.view(g.shape).to(ct)
            noisy = g + e
            if noise_mode in (1, 2):
                g_m = -noisy if maximize else noisy
            if noise_mode == 1:
                g_v = g_m

        p32 = p.to(ct, copy=True)
        m32 = m.to(ct, copy=True)
        v32 = v.to(ct, copy=True)
        v_prev = (vmax if amsgrad else v).to(ct, copy=True)

        if weight_decay != 0:
            p32.mul_(1 - lr * weight_decay)
        m32.lerp_(g_m, 1 - beta1)
        v32.mul_(beta2).addcmul_(g_v, g_v, value=1 - beta2)
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
        if eps_n is not None and noise_mode == 3:
            # ζ = (η√κ · a_new) ⊙ ε, a_new = 1/denom of this step (SPEC §5 parameter space).
            a_new_f = 1.0 / denom
            p32.add_((float(noise_param_coef) * a_new_f) * eps_n.view(g.shape).to(ct))

        if stats_out is not None:
            g64 = g.to(torch.float64)
            gsq = g64 * g64
            if isinstance(step_prev, Tensor) or step_prev > 0:
                bc2_prev = 1 - beta2**step_prev
                a_prev = 1.0 / (v_prev.to(torch.float64).sqrt() / bc2_prev**0.5 + eps)
            else:
                a_prev = torch.ones_like(g64)
            row = [gsq.sum(), (a_prev * a_prev * gsq).sum()]
            if stats_out.shape[1] != TRACE_STATS_COLS:
                a_new = 1.0 / denom.to(torch.float64)
                row.append((a_new * a_new * gsq).sum())
                if len(sumsq_bufs):
                    row.append((a_new * a_new * sumsq_bufs[i].to(torch.float64)).sum())
                else:
                    row.append(torch.zeros((), dtype=torch.float64, device=g.device))
                if stats_out.shape[1] == PRECOND_NEW_STATS_COLS:
                    row = [row[c] for c in PRECOND_NEW_COLUMNS]
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
    assign_sumsq: bool = False,
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
        assign_sumsq: ``sumsq = (scale·x)²`` instead of ``+=`` (a step's first contribution: the statistics engine
            never zeroes the buffer between steps).
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
        if assign_sumsq:
            sumsq.copy_(sq)
        else:
            sumsq.add_(sq.to(sumsq.dtype))
