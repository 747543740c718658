"""Backend selection errors: an explicit backend that cannot run says why, before anything changes."""
from __future__ import annotations

import pytest
import torch

import pnekern
from pnekern import ops


def test_cuda_backend_on_cpu_tensors_raises_before_the_step_changes_anything():
    p = torch.nn.Parameter(torch.randn(5))
    p.grad = torch.randn(5)
    opt = pnekern.AdamW([p], lr=0.1, backend="cuda")
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="backend='cuda'.*CUDA tensors.*cpu"):
        opt.step()
    assert torch.equal(p.detach(), before) and len(opt.state) == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("stats", [None, "trace"])
def test_cpp_backend_rejects_float64_before_any_parameter_moves(dtype, stats):
    # The fp32 parameter ahead of it used to be updated before the kernel rejected the float64 one.
    if not ops.native_available():
        pytest.fail("the compiled extension is required for this test")
    a = torch.nn.Parameter(torch.randn(4))
    b = torch.nn.Parameter(torch.randn(3, dtype=dtype))
    opt = pnekern.AdamW([a, b], lr=0.1, backend="cpp", stats=stats)
    before = [a.detach().clone(), b.detach().clone()]
    with pytest.raises(RuntimeError, match=r"backend='cpp' supports float32.*float64.*backend='auto'"):
        for _ in range(2):  # with stats, the capture hook names the problem already in backward()
            (a.sum() + b.abs().sum()).backward()
        opt.step()
    assert torch.equal(a.detach(), before[0]) and torch.equal(b.detach(), before[1]) and len(opt.state) == 0
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    auto = pnekern.AdamW([a, b], lr=0.1, backend="auto")  # the documented way: cpp for fp32, reference for float64
    auto.step()
    assert not torch.equal(a.detach(), before[0]) and not torch.equal(b.detach(), before[1])


def test_cuda_backend_reason_names_the_missing_build():
    if not ops.native_available():
        pytest.fail("the compiled extension is required for this test")
    reason = ops._cuda_usable(torch.device("cuda"), torch.float32)
    if pnekern.build_info()["native"]["with_cuda"]:
        assert reason is None or "dtype" not in reason
    else:
        assert "built without CUDA" in reason and "PNEKERN_BUILD_CUDA=1" in reason
    assert "float64" in ops._cuda_usable(torch.device("cuda"), torch.float64) or not pnekern.build_info()["native"]["with_cuda"]


@pytest.mark.parametrize("name", ["CUDA", "nvidia", 3])
def test_unknown_or_miscased_backend_names(name):
    if isinstance(name, str) and name.lower() in ops.BACKENDS:
        assert ops.validate_backend(name) == name.lower()
    else:
        with pytest.raises(ValueError, match="backend="):
            pnekern.AdamW([torch.nn.Parameter(torch.zeros(1))], backend=name)
