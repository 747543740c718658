"""End to end: ``pnekern.AdamW(..., backend="triton")`` against torch.optim.AdamW for a few steps (CPU tensors under
the interpreter in CI), the trace statistics through the Triton kernels against the reference backend, and the
dispatch rules of ``pnekern.ops.resolve_backend`` for ``triton``."""
from __future__ import annotations

import pytest
import torch
from _triton_setup import triton_device
from torch import nn

DEVICE = triton_device()

import pnekern  # noqa: E402
from pnekern import ops  # noqa: E402


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 3)).to(DEVICE)


@pytest.mark.parametrize("amsgrad,maximize", [(False, False), (True, True)])
def test_adamw_triton_matches_torch(amsgrad, maximize):
    ours, theirs = _model(), _model()
    kw = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, amsgrad=amsgrad, maximize=maximize)
    opt = pnekern.AdamW(ours.parameters(), backend="triton", **kw)
    ref = torch.optim.AdamW(theirs.parameters(), foreach=False, **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(16, 7, generator=gen).to(DEVICE)
        for model, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            model(x).square().mean().backward()
            o.step()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
        s, t = opt.state[p], ref.state[q]
        torch.testing.assert_close(s["exp_avg"], t["exp_avg"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(s["exp_avg_sq"], t["exp_avg_sq"], rtol=1e-6, atol=1e-9)
        assert float(s["step"]) == float(t["step"]) == 4.0


def test_trace_stats_match_reference_backend():
    """Two micro-batches per step: the hook's S1 (microbatch kernel) and the step's S2 (fused step) on Triton give
    the statistics the reference backend gives."""
    results = []
    for backend in ("triton", "reference"):
        model = _model(2)
        opt = pnekern.AdamW(model.parameters(), lr=1e-2, backend=backend, stats="trace", batch_size=16)
        gen = torch.Generator().manual_seed(3)
        for _ in range(3):
            opt.zero_grad()
            for _ in range(2):
                x = torch.randn(8, 7, generator=gen).to(DEVICE)
                model(x).square().mean().backward()
            opt.step()
        results.append(({k: v for k, v in opt.last_stats().to_dict().items() if isinstance(v, float)},
                        [p.detach().clone() for p in model.parameters()]))
    (s_t, p_t), (s_r, p_r) = results
    assert s_t.keys() == s_r.keys() and s_t
    for k in s_t:
        assert s_t[k] == pytest.approx(s_r[k], rel=1e-5, abs=1e-12, nan_ok=True), k
    for a, b in zip(p_t, p_r):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_resolve_backend_rules(monkeypatch):
    cpu = torch.device("cpu")
    if DEVICE == "cpu":
        assert ops.resolve_backend("triton", cpu, torch.bfloat16) == "triton"
    with pytest.raises(RuntimeError, match="float32, bfloat16 and float16"):
        ops.resolve_backend("triton", torch.device(DEVICE), torch.float64)
    # auto on CPU never picks triton
    assert ops.resolve_backend("auto", cpu, torch.float32) in ("cpp", "reference")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.resolve_backend("triton", cpu, torch.float32)
    if torch.cuda.is_available():
        assert ops.resolve_backend("auto", torch.device("cuda"), torch.float32) == "triton"
