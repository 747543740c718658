"""Micro-batch gradient-contribution statistics (Triton): ``microbatch_accumulate_`` (SPEC §2, trace/diag modes).

Same signature and semantics as ``pnekern.reference.adamw.microbatch_accumulate_``:
acc[0] += Σ (scale·x)², acc[1] += Σ a² (scale·x)² with a = 1/(sqrt(v)·inv_sqrt_bc2 + eps) (a = 1 without v), and
``sumsq += (scale·x)²`` (``= (scale·x)²`` with ``assign_sumsq``) elementwise when a diag-mode buffer is given.
fp32 math per element, per-block fp32 sums, float64 partials summed in a fixed order by a second kernel that also
adds into ``acc`` (deterministic, no atomics, no host reads: the hook can run every micro-batch without a sync).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import TL_DTYPES, TableCache, launch_config, segment_sum

__all__ = ["microbatch_accumulate_"]

_tables = TableCache()


@triton.jit
def _microbatch_accumulate_kernel(
    x_ptr,
    v_ptr,  # unused unless HAS_V
    sumsq_ptr,  # float32, unused unless HAS_SUMSQ
    partials_ptr,  # float64 [programs, 2]
    numel,
    inv_sqrt_bc2,
    eps,
    scale,
    HAS_V: tl.constexpr,
    HAS_SUMSQ: tl.constexpr,
    ASSIGN_SUMSQ: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    y = scale * tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y2 = y * y
    if HAS_V:
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a = 1.0 / (tl.sqrt_rn(v) * inv_sqrt_bc2 + eps)
        s1 = tl.where(mask, a * a * y2, 0.0)
    else:
        s1 = y2
    tl.store(partials_ptr + pid * 2 + 0, tl.sum(y2, axis=0).to(tl.float64))
    tl.store(partials_ptr + pid * 2 + 1, tl.sum(s1, axis=0).to(tl.float64))
    if HAS_SUMSQ:
        if ASSIGN_SUMSQ:
            tl.store(sumsq_ptr + offs, y2, mask=mask)
        else:
            q = tl.load(sumsq_ptr + offs, mask=mask, other=0.0)
            tl.store(sumsq_ptr + offs, q + y2, mask=mask)


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
    """Accumulate one contribution's (Σx², Σa²x²) into ``acc`` (float64 [2]) and ``sumsq`` (fp32, += x², or = x²
    with ``assign_sumsq``) in place.

    x / v: fp32, bf16 or fp16 (v the same dtype as x), same number of elements; non-contiguous inputs are read
    through contiguous copies.
    """
    op = "microbatch_accumulate_"
    if acc.dtype != torch.float64 or acc.numel() != 2:
        raise RuntimeError(f"{op}: acc must be a float64 tensor with 2 elements, got {acc.dtype} {tuple(acc.shape)}")
    if x.dtype not in TL_DTYPES:
        raise RuntimeError(f"{op}: x has dtype {x.dtype}; supported: float32, bfloat16, float16")
    for name, t in (("acc", acc), ("v", v), ("sumsq", sumsq)):
        if t is not None and t.device != x.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if v is not None:
        if v.dtype != x.dtype:
            raise RuntimeError(f"{op}: v has dtype {v.dtype} but x has {x.dtype}")
        if v.numel() != x.numel():
            raise RuntimeError(f"{op}: v has {v.numel()} elements but x has {x.numel()}")
    if sumsq is not None:
        if sumsq.dtype != torch.float32:
            raise RuntimeError(f"{op}: sumsq must be float32, got {sumsq.dtype}")
        if sumsq.numel() != x.numel():
            raise RuntimeError(f"{op}: sumsq has {sumsq.numel()} elements but x has {x.numel()}")
    numel = x.numel()
    if numel == 0:
        return
    xc = x.contiguous()
    vc = v.contiguous() if v is not None else xc
    qc = sumsq if sumsq is None or sumsq.is_contiguous() else (
        torch.empty(x.shape, dtype=torch.float32, device=x.device) if assign_sumsq else sumsq.contiguous())
    acc_c = acc if acc.is_contiguous() else acc.contiguous()

    block, num_warps = launch_config(numel)
    nprog = triton.cdiv(numel, block)
    partials = torch.empty((nprog, 2), dtype=torch.float64, device=x.device)
    _microbatch_accumulate_kernel[(nprog,)](
        xc, vc, qc if qc is not None else partials, partials, numel,
        float(inv_sqrt_bc2), float(eps), float(scale),
        HAS_V=v is not None, HAS_SUMSQ=sumsq is not None, ASSIGN_SUMSQ=bool(assign_sumsq), BLOCK=block,
        num_warps=num_warps,
    )
    seg = _tables.get((x.device, nprog),
                      lambda: torch.tensor([0, nprog], dtype=torch.int64).to(x.device, non_blocking=True))
    segment_sum(partials, seg, acc_c, accumulate=True)
    if acc_c is not acc:
        acc.copy_(acc_c)
    if qc is not None and qc is not sumsq:
        sumsq.copy_(qc)
