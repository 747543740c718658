"""Fused multi-tensor AdamW step with the in-step noise statistics (Triton), ``backend="triton"``.

Same signature and semantics as ``pnekern.reference.adamw.adamw_step_`` (torch.optim.AdamW, SPEC §1; statistics
columns ``STATS_COLUMNS``, SPEC §2), fp32 math for fp32 / bf16 / fp16 storage.

Layout of a launch: every tensor is cut into BLOCK-element chunks; one program per chunk reads its tensor index and
first element from a chunk table and the tensor's buffers from a pointer table, so hundreds of small tensors share
one launch. Bias corrections are computed per tensor in float64 where the step counters live (on the device for
capturable/fused state, on the host for torch's default CPU counters) and rounded to fp32 exactly as torch rounds its
Python-float scalars; ``grad_scale`` / ``found_inf`` are read by the kernel from device memory. Nothing here reads a
device value on the host, except incrementing CPU step counters after a step that depends on a device ``found_inf``
(the reference does the same).

In-step noise (``noise_*`` arguments, SPEC §5, same contract as the reference's ``step_noise``): each program
draws its elements' Philox normals (keyed by the global element index, so the stream does not depend on BLOCK),
forms ε = (z·sqrt(max(δ,0)) + Σ_j U[e,j]·c_j)·sqrt(c) in registers and adds it to g (m and v, or m only) or to θ
after the update; no ε tensor exists. Per-tensor noise operands come from a second pointer table.

Statistics: each program reduces its chunk in fp32 and writes one float64 partial row; a second kernel sums each
tensor's partial rows in a fixed order (deterministic, no atomics).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import interpreter_enabled
from ._common import TL_DTYPES, TableCache, launch_config, segment_sum, to_storage
from .philox import philox_normal_elem
from ..reference.adamw import PRECOND_NEW_COLUMNS, PRECOND_NEW_STATS_COLS, TRACE_STATS_COLS

__all__ = ["adamw_step_", "STATS_COLS"]

#: Columns of a ``stats_out`` row (see ``pnekern.reference.adamw.STATS_COLUMNS``).
STATS_COLS = 4
#: Pointer-table columns: param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, sumsq, numel.
_PTR_COLS = 7
#: Coefficient-table columns (fp32): decay, -step_size, sqrt(bc2), 1/sqrt(bc2_prev), has_prev.
_COEF_COLS = 5

_tables = TableCache()


@triton.jit
def _adamw_step_kernel(
    ptr_table,  # int64 [N, 7]
    chunk_table,  # int64 [C, 2]: tensor index, first element
    coef_table,  # float32 [N, 5]
    grad_scale_ptr,  # float32 [1] (unused unless UNSCALE)
    found_inf_ptr,  # float32 [1] (unused unless HAS_FOUND_INF)
    partials_ptr,  # float64 [C, 4] (unused unless STATS)
    noise_table,  # int64 [N, 6]: var ptr, var stride (0: isotropic), basis ptr, coef ptr, rank, tensor word
    noise_on_table,  # float32 [N]: 1.0 where the tensor gets noise
    noise_scale_ptr,  # float32 [1] controller scale (unused unless NOISE_MULT)
    seed_lo,
    seed_hi,
    noise_counter,
    noise_param_coef,  # fp32 η·sqrt(κ) (NOISE_MODE 3)
    w1,  # fp32 1 - beta1
    beta2,
    one_minus_beta2,
    eps,
    DT: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    SMALL_W: tl.constexpr,
    UNSCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    STATS: tl.constexpr,
    HAS_SUMSQ: tl.constexpr,
    MANUAL_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
    NOISE_MODE: tl.constexpr = 0,
    NOISE_RANK: tl.constexpr = 0,
    NOISE_MULT: tl.constexpr = False,
):
    pid = tl.program_id(0)
    t = tl.load(chunk_table + pid * 2)
    start = tl.load(chunk_table + pid * 2 + 1)
    row = ptr_table + t * 7
    numel = tl.load(row + 6)
    p_ptr = tl.load(row + 0).to(tl.pointer_type(DT))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(DT))
    m_ptr = tl.load(row + 2).to(tl.pointer_type(DT))
    v_ptr = tl.load(row + 3).to(tl.pointer_type(DT))

    coef = coef_table + t * 5
    decay = tl.load(coef + 0)
    neg_step_size = tl.load(coef + 1)
    bc2_sqrt = tl.load(coef + 2)

    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    wmask = mask
    if HAS_FOUND_INF:
        # found_inf != 0: nothing is written (the step does not happen) and the statistics are zero.
        # (a broadcast load: one address, cached; keeps the mask a plain vector under the interpreter too)
        wmask = mask & (tl.load(found_inf_ptr + offs * 0) == 0.0)

    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if UNSCALE:
        g = tl.div_rn(g, tl.load(grad_scale_ptr))
        tl.store(g_ptr + offs, to_storage(g, DT, MANUAL_BF16), mask=wmask)
    if MAXIMIZE:
        g = -g
    g_m = g
    g_v = g
    if NOISE_MODE != 0:
        nrow = noise_table + t * 6
        var_ptr = tl.load(nrow + 0).to(tl.pointer_type(tl.float32))
        var_stride = tl.load(nrow + 1)
        on = tl.load(noise_on_table + t)
        var = tl.load(var_ptr + offs * var_stride, mask=mask, other=0.0)
        z = philox_normal_elem(offs, tl.load(nrow + 5), noise_counter, seed_lo, seed_hi)
        eps_n = z * tl.sqrt_rn(tl.where(var < 0.0, 0.0, var))  # clamp(min=0): NaN stays NaN
        if NOISE_RANK > 0:
            basis_ptr = tl.load(nrow + 2).to(tl.pointer_type(tl.float32))
            coef_ptr = tl.load(nrow + 3).to(tl.pointer_type(tl.float32))
            rank = tl.load(nrow + 4)
            for j in tl.static_range(NOISE_RANK):
                in_rank = mask & ((offs * 0 + rank) > j)  # tensors of lower rank add exact zeros
                uj = tl.load(basis_ptr + offs * rank + j, mask=in_rank, other=0.0)
                cj = tl.load(coef_ptr + j + offs * 0, mask=in_rank, other=0.0)
                eps_n = eps_n + uj * cj
        if NOISE_MULT:
            eps_n = eps_n * tl.sqrt_rn(tl.load(noise_scale_ptr + offs * 0))
        eps_n = eps_n * on  # 0 for tensors without noise in this launch
        ge = -eps_n if MAXIMIZE else eps_n
        if NOISE_MODE == 1:
            g_m = g + ge
            g_v = g_m
        elif NOISE_MODE == 2:
            g_m = g + ge
    param = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32) * decay
    m_old = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # torch.lerp's two formulas (it switches at |weight| = 0.5 for accuracy).
    if SMALL_W:
        m = m_old + w1 * (g_m - m_old)
    else:
        m = g_m + (w1 - 1.0) * (g_m - m_old)
    v_old = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = v_old * beta2 + one_minus_beta2 * g_v * g_v
    v_use = v
    v_prev = v_old
    if AMSGRAD:
        vmax_ptr = tl.load(row + 4).to(tl.pointer_type(DT))
        vmax_old = tl.load(vmax_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        # torch.maximum propagates NaN: a NaN v fails the comparison and is selected.
        v_use = tl.where(vmax_old >= v, vmax_old, v)
        tl.store(vmax_ptr + offs, to_storage(v_use, DT, MANUAL_BF16), mask=wmask)
        v_prev = vmax_old
    denom = tl.div_rn(tl.sqrt_rn(v_use), bc2_sqrt) + eps
    param = param + tl.div_rn(neg_step_size * m, denom)
    if NOISE_MODE == 3:
        param = param + (noise_param_coef * tl.div_rn(1.0, denom)) * eps_n
    tl.store(p_ptr + offs, to_storage(param, DT, MANUAL_BF16), mask=wmask)
    tl.store(m_ptr + offs, to_storage(m, DT, MANUAL_BF16), mask=wmask)
    tl.store(v_ptr + offs, to_storage(v, DT, MANUAL_BF16), mask=wmask)

    if STATS:
        inv_prev_bc2_sqrt = tl.load(coef + 3)
        prev_on = tl.load(coef + 4)
        a_new = 1.0 / denom
        a_prev = tl.where(prev_on != 0.0, 1.0 / (tl.sqrt_rn(v_prev) * inv_prev_bc2_sqrt + eps), 1.0)
        g2 = g * g
        a_new2 = a_new * a_new
        # Lanes past the end (or a skipped step) contribute exact zeros (not 0·inf when eps = 0).
        out = partials_ptr + pid * 4
        tl.store(out + 0, tl.sum(tl.where(wmask, g2, 0.0), axis=0).to(tl.float64))
        tl.store(out + 1, tl.sum(tl.where(wmask, a_prev * a_prev * g2, 0.0), axis=0).to(tl.float64))
        tl.store(out + 2, tl.sum(tl.where(wmask, a_new2 * g2, 0.0), axis=0).to(tl.float64))
        if HAS_SUMSQ:
            q_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
            q = tl.load(q_ptr + offs, mask=mask, other=0.0)
            tl.store(out + 3, tl.sum(tl.where(wmask, a_new2 * q, 0.0), axis=0).to(tl.float64))
        else:
            tl.store(out + 3, tl.zeros([], dtype=tl.float64))


# ----------------------------------------------------------------------------------------------------------------
# launcher


def _check(t: Tensor, op_arg: str, i: int, like: Tensor, dtype: torch.dtype) -> None:
    if t.device != like.device:
        raise RuntimeError(f"adamw_step_: {op_arg}[{i}] is on {t.device} but params[{i}] is on {like.device}")
    if t.dtype != dtype:
        raise RuntimeError(
            f"adamw_step_: {op_arg}[{i}] has dtype {t.dtype} but expected {dtype} "
            "(params, grads and optimizer state must share one dtype)"
        )
    if t.numel() != like.numel():
        raise RuntimeError(f"adamw_step_: {op_arg}[{i}] has {t.numel()} elements but params[{i}] has {like.numel()}")


def _coefficients(state_steps: Sequence[Tensor], lr, beta1: float, beta2: float, weight_decay: float,
                  device: torch.device) -> Tensor:
    """Per-tensor fp32 coefficients [N, 5] from the step counters *before* this step's increment.

    Computed in float64 where the counters (and a Tensor lr) live, so CPU counters cost no device sync and device
    counters (capturable) need no host read; rounded to fp32 once, as torch rounds Python-float scalars.
    """
    lr_dev = lr.device if isinstance(lr, Tensor) else None
    if all(s.device.type == "cpu" for s in state_steps) and (lr_dev is None or lr_dev.type == "cpu"):
        prev = torch.stack([s.detach().reshape(()) for s in state_steps]).to(torch.float64)
    else:
        prev = torch.stack([s.detach().reshape(()).to(device=device, dtype=torch.float64) for s in state_steps])
    if isinstance(lr, Tensor):
        lr = lr.detach().reshape(()).to(device=prev.device, dtype=torch.float64)
    step = prev + 1
    bc1 = 1 - torch.pow(beta1, step)
    bc2 = 1 - torch.pow(beta2, step)
    decay = (1 - lr * weight_decay) * torch.ones_like(step)
    neg_step_size = -(lr / bc1)
    has_prev = prev > 0
    inv_prev = torch.where(has_prev, (1 - torch.pow(beta2, prev)).rsqrt(), torch.ones_like(prev))
    coef = torch.stack([decay, neg_step_size, bc2.sqrt(), inv_prev, has_prev.to(torch.float64)], dim=1)
    return coef.to(torch.float32).to(device, non_blocking=True)


def _device_scalar(t: Tensor, device: torch.device) -> Tensor:
    if t.numel() != 1:
        raise RuntimeError(f"adamw_step_: grad_scale / found_inf must have exactly one element, got {t.numel()}")
    return t.detach().reshape(1).to(device=device, dtype=torch.float32)


def adamw_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    lr: float | Tensor,
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
    """One fused AdamW step over N tensors in one launch (see ``pnekern.reference.adamw.adamw_step_``), noise
    included (``noise_*``: the reference's contract, generated in the kernel).

    ``lr`` may be a 0-dim tensor (read on its device, never on the host). Tensors must live on one device (a CUDA
    device, or the CPU under ``TRITON_INTERPRET=1``) and share one dtype (fp32 / bf16 / fp16); ``sumsq_bufs`` are
    fp32. Non-contiguous buffers are stepped through contiguous copies that are written back.
    """
    n = len(params)
    for name, seq in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                      ("state_steps", state_steps)):
        if len(seq) != n:
            raise RuntimeError(f"adamw_step_: got {n} params but {len(seq)} {name}")
    if amsgrad and len(max_exp_avg_sqs) != n:
        raise RuntimeError(f"adamw_step_: amsgrad=True needs one max_exp_avg_sqs per param: got {n} params but "
                           f"{len(max_exp_avg_sqs)} max_exp_avg_sqs")
    if not amsgrad and len(max_exp_avg_sqs):
        raise RuntimeError(f"adamw_step_: max_exp_avg_sqs must be empty when amsgrad=False, got "
                           f"{len(max_exp_avg_sqs)}")
    if len(sumsq_bufs) not in (0, n):
        raise RuntimeError(f"adamw_step_: sumsq_bufs must be empty or one per param: got {n} params but "
                           f"{len(sumsq_bufs)} sumsq_bufs")
    if stats_out is not None:
        if tuple(stats_out.shape) not in ((n, STATS_COLS), (n, PRECOND_NEW_STATS_COLS), (n, TRACE_STATS_COLS)):
            raise RuntimeError(f"adamw_step_: stats_out must have shape [{n}, {STATS_COLS}] (all sums), "
                               f"[{n}, {PRECOND_NEW_STATS_COLS}] (Σ g², Σ a_new² g², Σ a_new² q) or "
                               f"[{n}, {TRACE_STATS_COLS}] (Σ g² and Σ a_prev² g² only), got {tuple(stats_out.shape)}")
        if stats_out.dtype != torch.float64:
            raise RuntimeError(f"adamw_step_: stats_out must be float64, got {stats_out.dtype}")
    if n == 0:
        return
    device, dtype = params[0].device, params[0].dtype
    if dtype not in TL_DTYPES:
        raise RuntimeError(f"adamw_step_: params[0] has dtype {dtype}; supported: float32, bfloat16, float16")
    for i, p in enumerate(params):
        if p.device != device:
            raise RuntimeError(f"adamw_step_: params[{i}] is on {p.device} but params[0] is on {device}")
        if p.dtype != dtype:
            raise RuntimeError(f"adamw_step_: params[{i}] has dtype {p.dtype} but params[0] has {dtype}")
        _check(grads[i], "grads", i, p, dtype)
        _check(exp_avgs[i], "exp_avgs", i, p, dtype)
        _check(exp_avg_sqs[i], "exp_avg_sqs", i, p, dtype)
        if amsgrad:
            _check(max_exp_avg_sqs[i], "max_exp_avg_sqs", i, p, dtype)
        if len(sumsq_bufs):
            _check(sumsq_bufs[i], "sumsq_bufs", i, p, torch.float32)
        if state_steps[i].numel() != 1:
            raise RuntimeError(f"adamw_step_: state_steps[{i}] must be a one-element tensor")
    if stats_out is not None and stats_out.device != device:
        raise RuntimeError(f"adamw_step_: stats_out is on {stats_out.device} but params are on {device}")

    # Non-contiguous buffers go through contiguous copies (written back after the kernel).
    write_back: list[tuple[Tensor, Tensor]] = []

    def flat(t: Tensor, written: bool) -> Tensor:
        if t.is_contiguous():
            return t
        c = t.contiguous()
        if written:
            write_back.append((t, c))
        return c

    unscale = grad_scale is not None
    ps = [flat(t, True) for t in params]
    gs = [flat(t, unscale) for t in grads]
    ms = [flat(t, True) for t in exp_avgs]
    vs = [flat(t, True) for t in exp_avg_sqs]
    vmaxs = [flat(t, True) for t in max_exp_avg_sqs] if amsgrad else []
    qs = [flat(t, False) for t in sumsq_bufs]

    max_numel = max(p.numel() for p in ps)
    block, num_warps = launch_config(max_numel)
    numels = [p.numel() for p in ps]

    ptr_rows = []
    for i in range(n):
        ptr_rows.append((ps[i].data_ptr(), gs[i].data_ptr(), ms[i].data_ptr(), vs[i].data_ptr(),
                         vmaxs[i].data_ptr() if amsgrad else 0, qs[i].data_ptr() if qs else 0, numels[i]))

    def build_ptr_table() -> Tensor:
        return torch.tensor(ptr_rows, dtype=torch.int64).to(device, non_blocking=True)

    def build_chunks() -> tuple[Tensor, Tensor]:
        chunk_rows, seg = [], [0]
        for i, ne in enumerate(numels):
            chunk_rows.extend((i, s) for s in range(0, ne, block))
            seg.append(len(chunk_rows))
        chunks = torch.tensor(chunk_rows, dtype=torch.int64).reshape(-1, 2)
        return chunks.to(device, non_blocking=True), torch.tensor(seg, dtype=torch.int64).to(device, non_blocking=True)

    ptr_table = _tables.get(("ptr", device, tuple(ptr_rows)), build_ptr_table)
    chunk_table, seg_start = _tables.get(("chunks", device, block, tuple(numels)), build_chunks)
    nchunks = chunk_table.shape[0]
    coef = _coefficients(state_steps, lr, beta1, beta2, weight_decay, device)

    scale_t = _device_scalar(grad_scale, device) if unscale else coef  # placeholders are never read
    found_t = _device_scalar(found_inf, device) if found_inf is not None else coef
    stats_buf = None
    partials = coef
    if stats_out is not None:
        # A 2-column (trace) row keeps the first two sums of the full row and a 3-column (A_t) row columns 0, 2, 3:
        # the GPU step is bandwidth-bound, so one kernel computing all four costs nothing extra there.
        full = stats_out.shape[1] == STATS_COLS and stats_out.is_contiguous()
        stats_buf = stats_out if full else torch.empty((n, STATS_COLS), dtype=torch.float64, device=device)
        partials = torch.empty((nchunks, STATS_COLS), dtype=torch.float64, device=device)

    noise_mode = int(noise_mode)
    if noise_mode not in (0, 1, 2, 3):
        raise RuntimeError(f"adamw_step_: noise_mode must be 0 (off), 1 (into_v), 2 (outside_v) or 3 (param), got {noise_mode}")
    noise_table = noise_on = noise_scale_t = coef
    rank_max, keep = 0, []
    seed = int(noise_seed) & 0xFFFFFFFFFFFFFFFF
    if noise_mode:
        noise_table, noise_on, rank_max, keep = _noise_tables(ps, noise_tensor_idx, noise_var, noise_basis, noise_coef,
                                                              device)
        if noise_scale is not None:
            noise_scale_t = _device_scalar(noise_scale, device)

    # Python floats rounded to fp32 once, as torch does when they multiply an fp32 tensor.
    w1 = 1.0 - beta1
    if nchunks:
        _adamw_step_kernel[(nchunks,)](
            ptr_table, chunk_table, coef, scale_t, found_t, partials,
            noise_table, noise_on, noise_scale_t, seed & 0xFFFFFFFF, seed >> 32, int(noise_counter) & 0xFFFFFFFF,
            float(noise_param_coef),
            w1, beta2, 1.0 - beta2, eps,
            DT=TL_DTYPES[dtype], AMSGRAD=bool(amsgrad), MAXIMIZE=bool(maximize), SMALL_W=abs(w1) < 0.5,
            UNSCALE=unscale, HAS_FOUND_INF=found_inf is not None, STATS=stats_out is not None,
            HAS_SUMSQ=bool(qs), MANUAL_BF16=interpreter_enabled(), BLOCK=block, num_warps=num_warps,
            NOISE_MODE=noise_mode, NOISE_RANK=rank_max, NOISE_MULT=bool(noise_mode) and noise_scale is not None,
        )
    del keep
    if stats_out is not None:
        segment_sum(partials, seg_start, stats_buf, accumulate=False)
        if stats_buf is not stats_out:
            if stats_out.shape[1] == PRECOND_NEW_STATS_COLS:
                # Column by column: indexing with a list would copy an index tensor to the device every step.
                for j, c in enumerate(PRECOND_NEW_COLUMNS):
                    stats_out[:, j].copy_(stats_buf[:, c])
            else:
                stats_out.copy_(stats_buf[:, : stats_out.shape[1]])
    for dst, src in write_back:
        dst.copy_(src)
    _count_step(state_steps, found_inf)


def _noise_tables(ps, tensor_idx, var, basis, coef, device) -> tuple[Tensor, Tensor, int, list[Tensor]]:
    """Per-tensor noise operands: int64 [N, 6] (var ptr, var stride, basis ptr, coef ptr, rank, tensor word), fp32
    on-flags [N], the largest rank, and the tensors the pointers refer to (kept alive until the launch)."""
    n = len(ps)
    if len(tensor_idx) != n or len(var) != n:
        raise RuntimeError(f"adamw_step_: noise needs one noise_tensor_idx and one noise_var per param: got {n} "
                           f"params, {len(tensor_idx)} indices, {len(var)} variances")
    if len(basis) not in (0, n) or len(coef) != len(basis):
        raise RuntimeError("adamw_step_: noise_basis must be empty or one per param, with matching noise_coef")
    keep: list[Tensor] = []
    dummy = torch.zeros(1, dtype=torch.float32, device=device)
    keep.append(dummy)
    rows, on, rank_max = [], [], 0
    for i, p in enumerate(ps):
        d = p.numel()
        v = var[i]
        if v.numel() not in (0, 1, d):
            raise RuntimeError(f"adamw_step_: noise_var[{i}] has {v.numel()} elements; expected 0, 1 or {d}")
        vv = v.detach().reshape(-1).to(device=device, dtype=torch.float32).contiguous() if v.numel() else dummy
        keep.append(vv)
        u_ptr = c_ptr = dummy.data_ptr()
        k = 0
        if len(basis) and basis[i].numel():
            u = basis[i].detach().to(device=device, dtype=torch.float32).contiguous()
            c = coef[i].detach().reshape(-1).to(device=device, dtype=torch.float32).contiguous()
            if u.dim() != 2 or u.shape[0] != d or c.numel() != u.shape[1]:
                raise RuntimeError(f"adamw_step_: noise_basis[{i}] must be [{d}, k] with noise_coef[{i}] of k elements")
            keep += [u, c]
            u_ptr, c_ptr, k = u.data_ptr(), c.data_ptr(), int(u.shape[1])
        rank_max = max(rank_max, k)
        rows.append((vv.data_ptr(), 1 if (v.numel() == d and d > 1) else 0, u_ptr, c_ptr, k,
                     int(tensor_idx[i]) & 0xFFFFFFFF))
        on.append(1.0 if v.numel() else 0.0)
    table = torch.tensor(rows, dtype=torch.int64).to(device)
    flags = torch.tensor(on, dtype=torch.float32).to(device)
    return table, flags, rank_max, keep


def _count_step(state_steps: Sequence[Tensor], found_inf: Tensor | None) -> None:
    """Increment the step counters (by 0 on a found_inf step) without reading device values on the host, except
    for CPU counters whose increment depends on a device found_inf."""
    steps = list(state_steps)
    if found_inf is None:
        torch._foreach_add_(steps, 1.0)
        return
    counted = (found_inf.detach().reshape(()) == 0)
    by_device: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for s in steps:
        by_device.setdefault((s.device, s.dtype), []).append(s)
    for (dev, dt), group in by_device.items():
        inc = counted.to(device=dev, dtype=dt)
        torch._foreach_add_(group, [inc] * len(group))
