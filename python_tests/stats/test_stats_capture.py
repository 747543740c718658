"""What counts as a micro-batch contribution: backward() calls into p.grad, nothing else."""
from __future__ import annotations

import gc
import weakref

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


def test_fused_step_asks_for_the_rows_each_mode_reads(monkeypatch):
    # Trace mode reads only Σ g² and Σ a_prev² g² and asks the kernel for those 2 columns (the CPU kernel then
    # skips A_t, its cheaper loop); diag mode needs all 4. The exactness suites check the values themselves.
    from pnekern import ops

    widths = []
    real = ops.adamw_step_

    def spy(backend, *args, **kw):
        if kw.get("stats_out") is not None:
            widths.append(kw["stats_out"].shape[1])
        return real(backend, *args, **kw)

    monkeypatch.setattr(ops, "adamw_step_", spy)
    for mode, want in (("trace", 2), ("diag", 4)):
        widths.clear()
        model = _model()
        opt = pnekern.AdamW(model.parameters(), stats=mode, backend="reference")
        for _ in range(3):
            _backward(model)
            opt.step()
            opt.zero_grad()
        assert widths == [want] * 3, (mode, widths)
        assert torch.isfinite(opt.last_stats().trace_precond_noise)
