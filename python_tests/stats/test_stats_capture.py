"""What counts as a micro-batch contribution: backward() calls into p.grad, nothing else."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import pnekern


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))


def _backward(model, K=3):
    for k in range(K):
        x = torch.randn(5, 3)
        (model(x).pow(2).mean() / K).backward()


def test_autograd_grad_calls_are_not_contributions():
    model = _model()
    opt = pnekern.AdamW(model.parameters(), stats="trace")
    _backward(model, K=2)
    # A gradient penalty / curvature probe differentiates the same parameters without touching p.grad.
    loss = model(torch.randn(5, 3)).pow(2).mean()
    torch.autograd.grad(loss, list(model.parameters()))
    opt.step()
    assert opt.last_stats().to_dict()["num_contributions"] == 2


def test_tied_parameter_counts_once_per_backward():
    lin = nn.Linear(4, 4, bias=False)
    opt = pnekern.AdamW(lin.parameters(), stats="trace")
    for _ in range(3):
        x = torch.randn(2, 4)
        lin(lin(x)).sum().backward()  # the weight is used twice in one graph
    opt.step()
    assert opt.last_stats().to_dict()["num_contributions"] == 3


def test_discarded_optimizer_stops_capturing():
    model = _model()
    old = pnekern.AdamW(model.parameters(), stats="trace")
    ref = weakref.ref(old.noise_stats)
    del old
    gc.collect()
    assert ref() is None, "the statistics engine of a discarded optimizer is still alive"
    opt = pnekern.AdamW(model.parameters(), stats="trace")
    _backward(model, K=3)
    opt.step()
    assert opt.last_stats().to_dict()["num_contributions"] == 3


def test_zero_grad_discards_contributions():
    model = _model()
    opt = pnekern.AdamW(model.parameters(), stats="trace")
    _backward(model, K=2)
    opt.zero_grad()
    _backward(model, K=3)
    opt.step()
    assert opt.last_stats().to_dict()["num_contributions"] == 3



@pytest.mark.parametrize("mode", ["diag", "lowrank"])
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_per_element_buffers_hold_only_this_steps_contributions(mode, backend):
    # The Σx² buffer and the sketch are not zeroed between steps: a step's first contribution overwrites them. A
    # run whose contributions were discarded by zero_grad, and whose earlier steps left values behind, must give
    # the statistics of a run that only ever saw this step's contributions.
    torch.manual_seed(1)
    data = [torch.randn(5, 3) for _ in range(12)]
    noise = [torch.randn(5, 3) * 3.0 for _ in range(2)]
    a, b = _model(), _model()
    oa = pnekern.AdamW(a.parameters(), lr=1e-2, stats=mode, backend=backend)
    ob = pnekern.AdamW(b.parameters(), lr=1e-2, stats=mode, backend=backend)
    for step in range(3):
        if step == 1:  # contributions that zero_grad discards
            for x in noise:
                a(x).pow(2).mean().backward()
            oa.zero_grad()
        for model in (a, b):
            for x in data[4 * step:4 * step + 3]:
                (model(x).pow(2).mean() / 3).backward()
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(oa.noise_stats.sumsq_buffer(p), ob.noise_stats.sumsq_buffer(q), rtol=0, atol=0)
        oa.step(), ob.step()
        oa.zero_grad(), ob.zero_grad()
        sa, sb = oa.last_stats().to_dict(), ob.last_stats().to_dict()
        for key in ("num_contributions", "trace_noise", "trace_precond_noise", "grad_norm_sq"):
            assert float(sa[key]) == float(sb[key]), (step, key)
        if mode == "lowrank":
            for name, (u, lam, d) in ob.noise_stats.covariances.items():
                ua, lama, da = oa.noise_stats.covariances[name]
                assert torch.equal(lam, lama) and torch.equal(d, da), (step, name)


def test_fused_step_asks_for_the_rows_each_mode_reads(monkeypatch):
    # Trace mode reads only Σ g² and Σ a_prev² g² and asks the kernel for those 2 columns (the CPU kernel then
    # skips A_t); diag/lowrank mode reads Σ g², Σ a_t² g² and Σ a_t² q, 3 columns (the CPU kernel then skips
    # A_{t−1}). The exactness suites check the values themselves.
    from pnekern import ops

    widths = []
    real = ops.adamw_step_

    def spy(backend, *args, **kw):
        if kw.get("stats_out") is not None:
            widths.append(kw["stats_out"].shape[1])
        return real(backend, *args, **kw)

    monkeypatch.setattr(ops, "adamw_step_", spy)
    for mode, want in (("trace", 2), ("diag", 3), ("lowrank", 3)):
        widths.clear()
        model = _model()
        opt = pnekern.AdamW(model.parameters(), stats=mode, backend="reference")
        for _ in range(3):
            _backward(model)
            opt.step()
            opt.zero_grad()
        assert widths == [want] * 3, (mode, widths)
        assert torch.isfinite(opt.last_stats().trace_precond_noise)
