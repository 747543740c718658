"""Triton Philox4x32-10 / Gaussian stream (pnekern.kernels.philox) against the pure-torch reference and the
Random123 known-answer vectors: words and uniforms bit for bit, normals to a few ulp (log/cos differ in the last
bit between implementations)."""
from __future__ import annotations

import pytest
import torch
from _triton_setup import triton_device

DEVICE = triton_device()

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from pnekern.kernels import philox as tk  # noqa: E402
from pnekern.reference import philox as ref  # noqa: E402

from test_philox_reference import KAT  # noqa: E402


@triton.jit
def _kat_kernel(ctr_ptr, key_ptr, out_ptr):
    i = tl.arange(0, 4)
    c = tl.load(ctr_ptr + i).to(tl.uint32)  # int64 words -> uint32
    k = tl.load(key_ptr + (i % 2)).to(tl.uint32)
    c0 = tl.sum(tl.where(i == 0, c, 0), axis=0)
    c1 = tl.sum(tl.where(i == 1, c, 0), axis=0)
    c2 = tl.sum(tl.where(i == 2, c, 0), axis=0)
    c3 = tl.sum(tl.where(i == 3, c, 0), axis=0)
    k0 = tl.sum(tl.where(i == 0, k, 0), axis=0)
    k1 = tl.sum(tl.where(i == 1, k, 0), axis=0)
    w0, w1, w2, w3 = tk.philox4x32_10(c0, c1, c2, c3, k0, k1)
    tl.store(out_ptr + 0, w0.to(tl.int64))
    tl.store(out_ptr + 1, w1.to(tl.int64))
    tl.store(out_ptr + 2, w2.to(tl.int64))
    tl.store(out_ptr + 3, w3.to(tl.int64))


@pytest.mark.parametrize("counter,key,want", KAT, ids=["zero", "all-ones", "pi-digits"])
def test_known_answer_vectors(counter, key, want):
    out = torch.full((4,), -1, dtype=torch.int64, device=DEVICE)
    _kat_kernel[(1,)](torch.tensor(counter, dtype=torch.int64, device=DEVICE),
                      torch.tensor(key, dtype=torch.int64, device=DEVICE), out)
    assert out.tolist() == list(want)


# (seed, step, tensor_idx, numel, offset): odd sizes, a seed above 2^63, uint32 extremes, the elem_hi word.
CASES = [
    (0, 0, 0, 1, 0),
    (2024, 9, 3, 7, 12345),
    (0xFEDCBA9876543210, 0xFFFFFFFF, 0xFFFFFFFF, 1023, 0),
    (123, 1, 5, 4100, 2**32 - 2000),
]


@pytest.mark.parametrize("seed,step,tensor_idx,numel,offset", CASES)
def test_stream_matches_reference(seed, step, tensor_idx, numel, offset):
    args = (seed, step, tensor_idx, numel)
    words = tk.philox_words(*args, device=DEVICE, offset=offset)
    assert torch.equal(words.cpu(), ref.philox_words(*args, offset=offset)), "uint32 words must agree bit for bit"
    u = tk.philox_uniform(*args, device=DEVICE, offset=offset)
    assert torch.equal(u.cpu(), ref.philox_uniform(*args, offset=offset)), "uniforms are exact on every backend"
    z = tk.philox_normal(*args, device=DEVICE, offset=offset)
    z_ref = ref.philox_normal(*args, offset=offset)
    assert z.dtype == torch.float32 and z.shape == (numel,)
    # a few fp32 ulp of |z| <= 5.8 (log/cos last-bit differences), and the 1e-6 for |z| <~ 4
    torch.testing.assert_close(z.cpu(), z_ref, rtol=5e-7, atol=1e-6)


def test_stream_is_independent_of_block_size():
    full = tk.philox_normal(9, 4, 2, 5000, device=DEVICE)
    part = tk.philox_normal(9, 4, 2, 17, device=DEVICE, offset=4093)
    assert torch.equal(full[4093:4110], part)


def test_empty():
    assert tk.philox_normal(1, 1, 1, 0, device=DEVICE).numel() == 0
