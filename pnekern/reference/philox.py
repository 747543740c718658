"""Pure-PyTorch Philox4x32-10 and the pnekern Gaussian stream (the contract of csrc/include/pnekern/philox.h).

Stream layout (bit for bit the same on reference / C++ / Triton / CUDA, SPEC §5, STYLE practice 10):

    key     = (seed_lo, seed_hi)                      seed: uint64
    counter = (grp_lo, grp_hi, tensor_idx, step)      grp = elem >> 2 (elem: flat element index, uint64);
                                                      tensor_idx, step: uint32
    out     = philox4x32_10(counter, key)             four uint32 words

One counter serves the four elements 4·grp .. 4·grp + 3. Element e has lane l = e & 3 and uses the word pair
p = l >> 1: u1, u2 = uniform_open0(out[2p]), uniform_open0(out[2p + 1]) with uniform_open0(w) = ((w >> 8) + 1) · 2^-24
∈ (0, 1] (exact in fp32), and the Box–Muller normal z = ρ cos θ (l even) or ρ sin θ (l odd), ρ = sqrt(-2 ln u1),
θ = fp32(2π u2), evaluated in fp32. Its uniform is uniform_open0(out[l]). Words and uniforms are bitwise identical
across backends; normals agree to a few ulp (log/sin/cos differ in the last bit between libm, torch and Triton).

uint32 words are carried in int64 tensors holding values in [0, 2^32) so every operation is exact in torch on any
device; the 32×32→64 multiply is split into 16-bit halves so nothing overflows int64.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "PHILOX_M0", "PHILOX_M1", "PHILOX_W0", "PHILOX_W1", "PHILOX_ROUNDS",
    "philox4x32_10", "philox_counters", "philox_words", "uniform_open0", "box_muller_pair",
    "philox_uniform", "philox_normal",
]

#: Random123's Philox4x32 round multipliers and Weyl key increments.
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

_MASK32 = 0xFFFFFFFF
#: 2π rounded to fp32, as the C++ kernel's ``kTwoPi`` literal.
_TWO_PI_F32 = 6.283185307179586


def _mulhilo32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product a·b; ``a`` a uint32 constant, ``b`` int64 holding uint32."""
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    p0 = a * b_lo  # < 2^48
    p1 = a * b_hi  # < 2^48; product = p0 + p1·2^16
    mid = p0 + ((p1 & 0xFFFF) << 16)  # < 2^49
    lo = mid & _MASK32
    hi = (p1 >> 16) + (mid >> 32)  # < 2^32 (the product is < 2^64)
    return hi, lo


def philox4x32_10(counter, key) -> Tensor:
    """Philox4x32-10 of ``counter`` under ``key``.

    Args:
        counter: four uint32 words, as an int64 tensor ``[..., 4]`` (values in [0, 2^32)) or a 4-sequence of ints /
            int64 tensors broadcastable against each other.
        key: two uint32 words, a 2-sequence of ints / int64 tensors (or an int64 tensor ``[..., 2]``).

    Returns:
        int64 tensor ``[..., 4]`` with the four output words (values in [0, 2^32)).
    """
    if isinstance(counter, Tensor):
        c = [counter[..., j].to(torch.int64) & _MASK32 for j in range(4)]
    else:
        c = [torch.as_tensor(w, dtype=torch.int64) & _MASK32 for w in counter]
    device = c[0].device
    if isinstance(key, Tensor):
        k0, k1 = (key[..., j].to(torch.int64) & _MASK32 for j in range(2))
    else:
        k0, k1 = (torch.as_tensor(w, dtype=torch.int64, device=device) & _MASK32 for w in key)
    c0, c1, c2, c3 = c
    for r in range(PHILOX_ROUNDS):
        if r:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack(torch.broadcast_tensors(c0, c1, c2, c3), dim=-1)


def philox_counters(count: int, tensor_idx: int, step: int, offset: int = 0, device=None) -> Tensor:
    """The pnekern counters ``offset .. offset+count-1`` (counter c serves elements 4c .. 4c+3): int64 ``[count, 4]``
    = (grp_lo, grp_hi, tensor_idx, step), each word reduced mod 2^32 (tensor_idx and step are uint32)."""
    grp = torch.arange(offset, offset + count, dtype=torch.int64, device=device)
    ctr = torch.empty((count, 4), dtype=torch.int64, device=device)
    ctr[:, 0] = grp & _MASK32
    ctr[:, 1] = grp >> 32
    ctr[:, 2] = int(tensor_idx) & _MASK32
    ctr[:, 3] = int(step) & _MASK32
    return ctr


def _key(seed: int) -> tuple[int, int]:
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return seed & _MASK32, seed >> 32


def philox_words(seed: int, step: int, tensor_idx: int, count: int, offset: int = 0, device=None) -> Tensor:
    """The four Philox output words of counters ``offset .. offset+count-1`` (row c: the words of elements
    4(offset+c) .. 4(offset+c)+3): int64 ``[count, 4]`` in [0, 2^32)."""
    return philox4x32_10(philox_counters(count, tensor_idx, step, offset, device), _key(seed))


def _element_words(seed: int, step: int, tensor_idx: int, numel: int, offset: int, device) -> tuple[Tensor, int]:
    """Words of the counters covering elements ``offset .. offset+numel-1``, and the first element's lane."""
    first = int(offset) >> 2
    last = (int(offset) + numel + 3) >> 2
    return philox_words(seed, step, tensor_idx, last - first, first, device), int(offset) & 3


def uniform_open0(words: Tensor) -> Tensor:
    """uint32 words (int64 tensor) → float32 uniforms ((w >> 8) + 1) · 2^-24 ∈ (0, 1], exact."""
    return ((words >> 8) + 1).to(torch.float32) * (2.0**-24)


def box_muller_pair(u1: Tensor, u2: Tensor) -> tuple[Tensor, Tensor]:
    """Both normals of each pair of fp32 uniforms in (0, 1]: (ρ cos θ, ρ sin θ), ρ = sqrt(-2 ln u1), θ = fp32(2π u2)."""
    two_pi = torch.tensor(_TWO_PI_F32, dtype=torch.float32, device=u1.device)
    rho = torch.sqrt(-2.0 * torch.log(u1))
    theta = two_pi * u2
    return rho * torch.cos(theta), rho * torch.sin(theta)


def philox_uniform(seed: int, step: int, tensor_idx: int, numel: int, device=None, offset: int = 0) -> Tensor:
    """Uniforms in (0, 1] of elements ``offset ..`` of tensor ``tensor_idx`` at ``step`` (element e: word e & 3 of
    counter e >> 2): fp32 [numel]."""
    words, lane = _element_words(seed, step, tensor_idx, numel, offset, device)
    return uniform_open0(words.reshape(-1)[lane : lane + numel])


def philox_normal(seed: int, step: int, tensor_idx: int, numel: int, device=None, offset: int = 0) -> Tensor:
    """Standard normals of the pnekern stream: element e of tensor ``tensor_idx`` at optimizer ``step``.

    Args:
        seed: uint64 seed (key = (seed_lo, seed_hi)); Python ints are reduced mod 2^64.
        step: the optimizer step the draw is for (uint32 counter word 3).
        tensor_idx: index of the tensor in the optimizer's parameter list (uint32 counter word 2).
        numel: number of elements (flat indices ``offset .. offset + numel - 1``; counter words 0/1 hold e >> 2).
        device: where the result lives (the stream does not depend on it).
        offset: first flat element index (to draw a slice of a tensor's stream).

    Returns:
        float32 tensor [numel]: z_e = ρ cos θ (e even) or ρ sin θ (e odd) of the word pair 2·((e >> 1) & 1) of
        counter e >> 2 (module docstring).
    """
    words, lane = _element_words(seed, step, tensor_idx, numel, offset, device)
    u = uniform_open0(words)
    a_cos, a_sin = box_muller_pair(u[:, 0], u[:, 1])
    b_cos, b_sin = box_muller_pair(u[:, 2], u[:, 3])
    z = torch.stack((a_cos, a_sin, b_cos, b_sin), dim=1).reshape(-1)
    return z[lane : lane + numel].contiguous()
