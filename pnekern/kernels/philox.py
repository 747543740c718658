"""Philox4x32-10 and the pnekern Gaussian stream in Triton (contract: csrc/include/pnekern/philox.h).

    key     = (seed_lo, seed_hi)
    counter = (grp_lo, grp_hi, tensor_idx, step)      grp = elem >> 2: one counter per four elements
    u       = ((w >> 8) + 1) · 2^-24 ∈ (0, 1]          element e: lane l = e & 3, word pair p = l >> 1
    z       = ρ cos θ (l even) / ρ sin θ (l odd)       ρ = sqrt(-2 ln u[2p]), θ = fp32(2π u[2p+1]), fp32

The ``@triton.jit`` helpers (``philox4x32_10``, ``philox_counter_words``, ``uniform_open0``, ``box_muller``,
``philox_normal_elem``) are meant to be called from other kernels (in-step noise sampling); the launchers
(``philox_words``, ``philox_uniform``, ``philox_normal``) mirror ``pnekern.reference.philox``. Words and uniforms are
bit-identical to the reference; normals agree to a few ulp (log/sin/cos implementations differ in the last bit).
``philox_normal_elem`` evaluates its element's whole counter (a GPU lane per element; the CPU kernels share each
counter between its four elements).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import interpreter_enabled

__all__ = [
    "philox4x32_10", "philox_counter_words", "uniform_open0", "box_muller", "philox_normal_elem",
    "philox_words", "philox_uniform", "philox_normal",
]

_PHILOX_M0: tl.constexpr = tl.constexpr(0xD2511F53)
_PHILOX_M1: tl.constexpr = tl.constexpr(0xCD9E8D57)
_PHILOX_W0: tl.constexpr = tl.constexpr(0x9E3779B9)
_PHILOX_W1: tl.constexpr = tl.constexpr(0xBB67AE85)
_PHILOX_ROUNDS: tl.constexpr = tl.constexpr(10)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 blocks (all six arguments uint32, broadcastable); returns the four output words."""
    for r in tl.static_range(_PHILOX_ROUNDS):
        if r > 0:
            k0 = k0 + _PHILOX_W0
            k1 = k1 + _PHILOX_W1
        hi0 = tl.umulhi(c0, _PHILOX_M0)
        lo0 = c0 * _PHILOX_M0
        hi1 = tl.umulhi(c2, _PHILOX_M1)
        lo1 = c2 * _PHILOX_M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def philox_counter_words(grp, tensor_idx, step, seed_lo, seed_hi):
    """Output words of pnekern counter ``grp`` (int64; the words of elements 4·grp .. 4·grp + 3; the other
    arguments any integer type, taken mod 2^32)."""
    c0 = (grp & 0xFFFFFFFF).to(tl.uint32)
    c1 = (grp >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + tensor_idx.to(tl.uint32)
    c3 = tl.zeros_like(c0) + step.to(tl.uint32)
    k0 = tl.zeros_like(c0) + seed_lo.to(tl.uint32)
    k1 = tl.zeros_like(c0) + seed_hi.to(tl.uint32)
    return philox4x32_10(c0, c1, c2, c3, k0, k1)


@triton.jit
def uniform_open0(w):
    """uint32 → fp32 uniform ((w >> 8) + 1) · 2^-24 ∈ (0, 1] (exact)."""
    return ((w >> 8) + 1).to(tl.float32) * 5.9604644775390625e-08  # 2^-24


@triton.jit
def box_muller(u1, u2, use_sin):
    """One standard normal from two uniforms in (0, 1]: sqrt(-2 ln u1) · (sin if ``use_sin`` else cos)(2π u2), fp32."""
    theta = 6.283185307179586 * u2  # 2π, rounded to fp32 like the C++ kTwoPi
    return tl.sqrt(-2.0 * tl.log(u1)) * tl.where(use_sin, tl.sin(theta), tl.cos(theta))


@triton.jit
def _lane_word(w0, w1, w2, w3, lane):
    return tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))


@triton.jit
def philox_normal_elem(elem, tensor_idx, step, seed_lo, seed_hi):
    """The standard normal of element ``elem`` (int64) of tensor ``tensor_idx`` at ``step`` under the seed."""
    w0, w1, w2, w3 = philox_counter_words(elem >> 2, tensor_idx, step, seed_lo, seed_hi)
    lane = elem & 3
    second = lane >= 2
    return box_muller(uniform_open0(tl.where(second, w2, w0)), uniform_open0(tl.where(second, w3, w1)), (lane & 1) == 1)


@triton.jit
def _philox_kernel(coords_ptr, out_ptr, numel, OUTPUT: tl.constexpr, BLOCK: tl.constexpr):
    """coords int64 [5] = (seed_lo, seed_hi, tensor_idx, step, first). OUTPUT 0: fp32 normals of elements first ..
    [numel]; 1: their fp32 uniforms [numel]; 2: the four words of counters first .. as int64 [numel, 4]."""
    pid = tl.program_id(0)
    seed_lo = tl.load(coords_ptr + 0)
    seed_hi = tl.load(coords_ptr + 1)
    tensor_idx = tl.load(coords_ptr + 2)
    step = tl.load(coords_ptr + 3)
    first = tl.load(coords_ptr + 4)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    if OUTPUT == 0:
        tl.store(out_ptr + idx, philox_normal_elem(first + idx, tensor_idx, step, seed_lo, seed_hi), mask=mask)
    elif OUTPUT == 1:
        elem = first + idx
        w0, w1, w2, w3 = philox_counter_words(elem >> 2, tensor_idx, step, seed_lo, seed_hi)
        tl.store(out_ptr + idx, uniform_open0(_lane_word(w0, w1, w2, w3, elem & 3)), mask=mask)
    else:
        w0, w1, w2, w3 = philox_counter_words(first + idx, tensor_idx, step, seed_lo, seed_hi)
        tl.store(out_ptr + idx * 4 + 0, w0.to(tl.int64), mask=mask)
        tl.store(out_ptr + idx * 4 + 1, w1.to(tl.int64), mask=mask)
        tl.store(out_ptr + idx * 4 + 2, w2.to(tl.int64), mask=mask)
        tl.store(out_ptr + idx * 4 + 3, w3.to(tl.int64), mask=mask)


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda") if torch.cuda.is_available() and not interpreter_enabled() else torch.device("cpu")
    return torch.device(device)


def _launch(output: int, seed: int, step: int, tensor_idx: int, numel: int, device, offset: int) -> Tensor:
    device = _device(device)
    if device.type == "cpu" and not interpreter_enabled():
        raise RuntimeError("the Triton Philox kernels run on CPU tensors only under TRITON_INTERPRET=1")
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    coords = torch.tensor([seed & 0xFFFFFFFF, seed >> 32, int(tensor_idx) & 0xFFFFFFFF, int(step) & 0xFFFFFFFF,
                           int(offset)], dtype=torch.int64).to(device)
    if output == 2:
        out = torch.empty((numel, 4), dtype=torch.int64, device=device)
    else:
        out = torch.empty(numel, dtype=torch.float32, device=device)
    if numel:
        block = min(4096, triton.next_power_of_2(numel)) if interpreter_enabled() else 1024
        _philox_kernel[(triton.cdiv(numel, block),)](coords, out, numel, OUTPUT=output, BLOCK=block,
                                                     num_warps=1 if interpreter_enabled() else 4)
    return out


def philox_words(seed: int, step: int, tensor_idx: int, count: int, device=None, offset: int = 0) -> Tensor:
    """The four Philox words of counters ``offset .. offset+count-1`` (elements 4·counter ..): int64 [count, 4] in
    [0, 2^32)."""
    return _launch(2, seed, step, tensor_idx, count, device, offset)


def philox_uniform(seed: int, step: int, tensor_idx: int, numel: int, device=None, offset: int = 0) -> Tensor:
    """Uniforms in (0, 1] of elements ``offset ..`` (word e & 3 of counter e >> 2): fp32 [numel], bit-identical to
    the reference."""
    return _launch(1, seed, step, tensor_idx, numel, device, offset)


def philox_normal(seed: int, step: int, tensor_idx: int, numel: int, device=None, offset: int = 0) -> Tensor:
    """Standard normals of the pnekern stream (see ``pnekern.reference.philox.philox_normal``): fp32 [numel]."""
    return _launch(0, seed, step, tensor_idx, numel, device, offset)
