"""Triton micro-batch accumulate (pnekern.kernels.microbatch_accumulate) against the reference op: the S1 sums
(Σx², Σa²x²) per contribution and the diag-mode sum of squares (accumulated, or assigned by a step's first
contribution), over odd sizes and fp32/bf16/fp16 inputs."""
from __future__ import annotations

import pytest
import torch
from _triton_setup import triton_device

DEVICE = triton_device()

from pnekern import ops  # noqa: E402
from pnekern.kernels import microbatch_accumulate as tk  # noqa: E402
from pnekern.reference import adamw as ref  # noqa: E402

SIZES = (1, 7, 1023, 65537)

# acc rtol: fp32 per-element products and block sums vs the reference's float64 (inputs are the same stored values
# in every dtype, so the tolerance does not depend on it); sumsq: one fp32 rounding of (scale·x)².
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_v", [False, True])
@pytest.mark.parametrize("with_sumsq,assign_first", [(False, False), (True, False), (True, True)])
def test_matches_reference(dtype, with_v, with_sumsq, assign_first):
    gen = torch.Generator().manual_seed(0)
    sizes = SIZES if dtype == torch.float32 and with_v else SIZES[:3]
    for n in sizes:
        acc = torch.tensor([1.5, 2.5], dtype=torch.float64, device=DEVICE)  # accumulates onto what is there
        acc_ref = acc.clone()
        q = torch.rand(n, generator=gen).to(DEVICE) if with_sumsq else None
        q_ref = q.clone() if with_sumsq else None
        v = (torch.rand(n, generator=gen) * 1e-3).to(dtype).to(DEVICE) if with_v else None
        for k in range(2):  # two contributions
            x = torch.randn(n, generator=gen).to(dtype).to(DEVICE)
            x_first = x if k == 0 else x_first
            scale = 0.25 if k else 1.0
            assign = assign_first and k == 0  # the random start values must then be gone
            tk.microbatch_accumulate_(acc, x, v, 1.3, 1e-8, scale, q, assign)
            ref.microbatch_accumulate_(acc_ref, x, v, 1.3, 1e-8, scale, q_ref, assign)
        torch.testing.assert_close(acc.cpu(), acc_ref.cpu(), rtol=2e-6, atol=0.0, msg=lambda m: f"n={n}: {m}")
        if with_sumsq:
            torch.testing.assert_close(q.cpu(), q_ref.cpu(), rtol=2.0**-23, atol=0.0)
            if assign_first:  # the reference's own contract: the start values are gone
                y0 = x_first.double().square()
                want = (y0.float() + (0.25 * x.double()).square().float()).cpu()
                torch.testing.assert_close(q_ref.cpu(), want, rtol=2.0**-23, atol=0.0)


def test_non_contiguous_inputs_and_dispatch():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 30, generator=gen).to(DEVICE).t()
    v = torch.rand(40, 30, generator=gen).to(DEVICE).t()
    q = torch.zeros(40, 30, device=DEVICE).t()
    acc = torch.zeros(2, dtype=torch.float64, device=DEVICE)
    acc_ref, q_ref = acc.clone(), q.clone()
    ops.microbatch_accumulate_("triton", acc, x, v, 1.0, 1e-8, 2.0, q)
    ref.microbatch_accumulate_(acc_ref, x, v, 1.0, 1e-8, 2.0, q_ref)
    torch.testing.assert_close(acc.cpu(), acc_ref.cpu(), rtol=2e-6, atol=0.0)
    torch.testing.assert_close(q.cpu(), q_ref.cpu(), rtol=2.0**-23, atol=0.0)
    # assign into a non-contiguous buffer: written back through the launcher's contiguous copy
    q.fill_(7.0)
    ops.microbatch_accumulate_("triton", acc, x, v, 1.0, 1e-8, 2.0, q, True)
    torch.testing.assert_close(q.cpu(), (2.0 * x.double()).square().float().cpu(), rtol=2.0**-23, atol=0.0)


def test_deterministic_and_empty():
    x = torch.randn(10000).to(DEVICE)
    a, b = (torch.zeros(2, dtype=torch.float64, device=DEVICE) for _ in range(2))
    tk.microbatch_accumulate_(a, x, None, 1.0, 1e-8, 1.0)
    tk.microbatch_accumulate_(b, x, None, 1.0, 1e-8, 1.0)
    assert torch.equal(a, b) and a[0] == a[1]  # without v, a = 1: both sums are Σx²
    tk.microbatch_accumulate_(a, torch.empty(0, device=DEVICE), None, 1.0, 1e-8, 1.0)
    assert torch.equal(a, b)


def test_validation():
    acc = torch.zeros(2, dtype=torch.float64, device=DEVICE)
    with pytest.raises(RuntimeError, match="v has dtype"):
        tk.microbatch_accumulate_(acc, torch.zeros(3, device=DEVICE),
                                  torch.zeros(3, dtype=torch.float16, device=DEVICE), 1.0, 1e-8, 1.0)
    with pytest.raises(RuntimeError, match="acc must be"):
        tk.microbatch_accumulate_(acc.float(), torch.zeros(3, device=DEVICE), None, 1.0, 1e-8, 1.0)
