"""Shared launch helpers for the Triton kernels: dtype mapping, fixed launch configs, pointer tables and the
deterministic second-stage reduction (per-segment sums of fp64 partials, fixed order, no atomics)."""
from __future__ import annotations

import os
from collections import OrderedDict

import torch
import triton
import triton.language as tl

from . import interpreter_enabled

TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

#: Elements per program on a GPU and warps per program (fixed: autotuning is opt-in via PNEKERN_TRITON_CONFIG).
GPU_BLOCK = 1024
GPU_WARPS = 4
#: Under the interpreter every program costs Python overhead, so blocks are larger (numpy does the vector work).
INTERPRET_MAX_BLOCK = 4096
#: Rows of partials summed per iteration by the segment-sum kernel.
REDUCE_BLOCK = 256


def launch_config(max_numel: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a launch whose largest tensor has ``max_numel`` elements.

    ``PNEKERN_TRITON_CONFIG="BLOCK,NUM_WARPS"`` overrides (opt-in tuning; BLOCK a power of two). Statistics are
    reduced per block, so their last bits (not the update) depend on BLOCK; the result is the same run to run.
    """
    override = os.environ.get("PNEKERN_TRITON_CONFIG", "").strip()
    if override:
        block, warps = (int(x) for x in override.split(","))
        if block < 16 or block & (block - 1):
            raise ValueError(f"PNEKERN_TRITON_CONFIG BLOCK must be a power of two >= 16, got {block}")
        return block, warps
    if interpreter_enabled():
        return min(INTERPRET_MAX_BLOCK, max(16, triton.next_power_of_2(max(1, max_numel)))), 1
    return GPU_BLOCK, GPU_WARPS


class TableCache:
    """Small LRU of device-resident metadata tables keyed by (device, pointers, sizes).

    The tables hold only what the key holds, so a hit is correct by construction; hits keep repeated steps free of
    host→device copies (and hence CUDA-graph capturable once warmed up).
    """

    def __init__(self, maxsize: int = 16):
        self.maxsize = maxsize
        self._items: OrderedDict = OrderedDict()

    def get(self, key, build):
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
            return hit
        value = build()
        self._items[key] = value
        if len(self._items) > self.maxsize:
            self._items.popitem(last=False)
        return value


@triton.jit
def _segment_sum_kernel(partials_ptr, seg_start_ptr, out_ptr, NCOLS: tl.constexpr, RBLOCK: tl.constexpr,
                        ACCUMULATE: tl.constexpr):
    """out[s, :] (+)= Σ_{r in [seg_start[s], seg_start[s+1])} partials[r, :]  (float64, fixed order: deterministic)."""
    seg = tl.program_id(0)
    lo = tl.load(seg_start_ptr + seg)
    hi = tl.load(seg_start_ptr + seg + 1)
    cols = tl.arange(0, NCOLS)
    acc = tl.zeros([RBLOCK, NCOLS], dtype=tl.float64)
    for r0 in range(lo, hi, RBLOCK):
        rows = r0 + tl.arange(0, RBLOCK)
        m = rows < hi
        acc += tl.load(partials_ptr + rows[:, None] * NCOLS + cols[None, :], mask=m[:, None], other=0.0)
    total = tl.sum(acc, axis=0)
    dst = out_ptr + seg * NCOLS + cols
    if ACCUMULATE:
        total += tl.load(dst)
    tl.store(dst, total)


def segment_sum(partials: torch.Tensor, seg_start: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    """Deterministic per-segment column sums: ``partials`` float64 [R, C] (C a power of two), ``seg_start`` int64
    [S+1] row boundaries, ``out`` contiguous float64 [S, C] overwritten (or added to with ``accumulate``)."""
    nseg = seg_start.numel() - 1
    if nseg <= 0:
        return
    _segment_sum_kernel[(nseg,)](partials, seg_start, out, NCOLS=partials.shape[1], RBLOCK=REDUCE_BLOCK,
                                 ACCUMULATE=accumulate, num_warps=1 if interpreter_enabled() else 4)


@triton.jit
def to_storage(x, DT: tl.constexpr, MANUAL_BF16: tl.constexpr):
    """fp32 → storage dtype with round-to-nearest-even.

    ``MANUAL_BF16`` rounds bf16 with integer ops: Triton's interpreter truncates fp32→bf16 casts, GPUs round to
    nearest even natively (the result is the same either way).
    """
    if MANUAL_BF16 and DT == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # keep NaN a NaN (the carry could make it inf)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DT)
