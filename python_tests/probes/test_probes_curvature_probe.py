"""CurvatureProbe: exactness of Curv = Tr(A Ĥ A), optimizer wiring (curvature / pne_star), side-effect freedom."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import pnekern
from pnekern.probes import CurvatureProbe

DT = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def _precond(d, seed=0):
    return torch.exp(torch.empty(d, dtype=DT).uniform_(-2.0, 2.0, generator=gen(seed)))


def _split(vec, model):
    return [c.view(p.shape) for c, p in zip(torch.split(vec, [p.numel() for p in model.parameters()]), model.parameters())]


@pytest.mark.parametrize(
    "kind,estimator,num_probes",
    [("ggn", "hutchinson", 24), ("ggn", "hutchpp", 30), ("ggn", "xtrace", 30), ("hessian", "hutchinson", 24),
     ("fd_hessian", "hutchinson", 24), ("sampled_label", "hutchinson", 400)],
)
def test_measure_matches_exact_tr_aha(kind, estimator, num_probes, oracle):
    m = oracle.make_mlp_ce(seed=2)
    if kind in ("ggn", "sampled_label"):
        mat = oracle.ggn_ce(m.model, m.batch[0])
    else:
        mat = oracle.hessian(m.model, m.loss_fn, *m.batch)
    a = _precond(mat.shape[0])
    exact = float((a[:, None] * mat * a[None, :]).trace())
    probe = CurvatureProbe(m.model, m.loss_fn, m.batch, kind=kind, estimator=estimator, num_probes=num_probes, seed=3)
    res = probe.measure(_split(a, m.model))
    assert res.value.dtype == torch.float64 and res.value.shape == () and res.stderr.shape == ()
    v, se = float(res.value), float(res.stderr)
    assert abs(v - exact) < 4 * se + 1e-9 * abs(exact), (kind, estimator, v, exact, se)
    assert se < 0.3 * abs(exact)
    assert res.kind == kind and res.mode == "eval" and res.seed == 3 and res.batch_index == 0
    assert not bool(res.flagged)
    d = res.to_dict()
    assert d["curvature"] == pytest.approx(v) and d["nonpositive"] is False


def test_flat_and_identity_preconditioner(mlp_ce, oracle):
    m = mlp_ce
    g = oracle.ggn_ce(m.model, m.batch[0])
    probe = CurvatureProbe(m.model, m.loss_fn, m.batch, num_probes=32)
    res = probe.measure()  # A = I
    assert abs(float(res.value) - float(g.trace())) < 4 * float(res.stderr)
    # same seed, same probes: flat and per-parameter layouts agree exactly
    a = _precond(g.shape[0], 4)
    r1 = CurvatureProbe(m.model, m.loss_fn, m.batch, num_probes=8).measure(a)
    r2 = CurvatureProbe(m.model, m.loss_fn, m.batch, num_probes=8).measure(_split(a, m.model))
    assert float(r1.value) == float(r2.value)
    # successive measurements use fresh probes (seed + index), reproducibly
    p = CurvatureProbe(m.model, m.loss_fn, m.batch, num_probes=8)
    v0, v1 = float(p.measure(a).value), float(p.measure(a).value)
    assert v0 == float(r1.value) and v1 != v0 and p.last.index == 1 and p.last.seed == 1


class _ICLLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.read = nn.Linear(3, 4, dtype=DT)
        self.out = nn.Linear(4, 1, dtype=DT)
        self.mix = nn.Parameter(torch.tensor(0.3, dtype=DT))

    def forward(self, xs, ys):
        h = torch.tanh(self.read(xs))
        return self.out(h).squeeze(-1) + self.mix * ys.cumsum(-1) / ys.shape[-1]


def test_tuple_input_model_standalone_with_optimizer_preconditioner():
    torch.manual_seed(0)
    model = _ICLLike()
    xs, ys = torch.randn(6, 5, 3, dtype=DT, generator=gen(1)), torch.randn(6, 5, dtype=DT, generator=gen(2))
    loss_fn = nn.MSELoss()
    opt = pnekern.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        loss_fn(model(xs, ys), ys).backward()
        opt.step()
    probe = CurvatureProbe(model, loss_fn, ((xs, ys), ys), kind="hessian", num_probes=48)
    a = opt.preconditioner(probe.params)
    res = probe.measure(a)
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    shapes = [p.shape for p in model.parameters()]

    def loss_of(theta):
        ps = {n: c.view(s) for n, c, s in zip(names, torch.split(theta, sizes), shapes)}
        return loss_fn(torch.func.functional_call(model, ps, (xs, ys)), ys)

    h = torch.autograd.functional.hessian(loss_of, torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    af = torch.cat([t.reshape(-1) for t in a]).to(DT)
    exact = float((af[:, None] * h * af[None, :]).trace())
    assert abs(float(res.value) - exact) < 4 * float(res.stderr), (float(res.value), exact, float(res.stderr))
    # forward= callable gives the identical number (same seed, same probes)
    probe2 = CurvatureProbe(model, loss_fn, ({"x": xs, "y": ys}, ys), kind="hessian", num_probes=48,
                            forward=lambda mod, inp: mod(inp["x"], inp["y"]))
    assert float(probe2.measure(a).value) == float(res.value)


def _train(with_probe: bool, steps: int = 4, K: int = 3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 3)).to(DT)
    loss_fn = nn.CrossEntropyLoss()
    data = [(torch.randn(4, 5, dtype=DT, generator=gen(10 * s + k)), torch.randint(0, 3, (4,), generator=gen(100 + 10 * s + k)))
            for s in range(steps) for k in range(K)]
    held = (torch.randn(16, 5, dtype=DT, generator=gen(999)), torch.randint(0, 3, (16,), generator=gen(998)))
    opt = pnekern.AdamW(model.parameters(), lr=1e-2, stats="trace", batch_size=12)
    probe = CurvatureProbe(model, loss_fn, held, every=2, num_probes=16) if with_probe else None
    if probe is not None:
        opt.attach_probe(probe)
    records = []
    for s in range(steps):
        opt.zero_grad()
        for k in range(K):
            x, y = data[s * K + k]
            (loss_fn(model(x), y) / K).backward()  # dropout draws from the global RNG
        opt.step()
        records.append(opt.last_stats().to_dict())
    return model, opt, probe, records, held


def test_attached_probe_feeds_curvature_and_pne_star_without_perturbing_training(oracle):
    model, opt, probe, recs, held = _train(True)
    ref_model, _, _, ref_recs, _ = _train(False)
    # The probe changed nothing: parameters, and the noise statistics, are bit-identical to a run without it.
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
    for r, q in zip(recs, ref_recs):
        assert r["trace_precond_noise"] == q["trace_precond_noise"] and r["temperature"] == q["temperature"]
    assert model.training  # restored to train mode after each measurement
    assert [r["pne_star"] is not None for r in recs] == [False, True, True, True]
    assert probe.num_measurements == 2
    for r in (recs[1], recs[3]):
        assert r["curvature_held"] is False
        assert r["pne_star"] == pytest.approx(r["temperature"] / r["curvature"], rel=1e-12)
    assert recs[2]["curvature_held"] is True and recs[2]["curvature"] == recs[1]["curvature"]
    assert recs[3]["curvature"] == pytest.approx(float(probe.last.value), rel=1e-15)
    # ... and the curvature is Tr(A G A) with the optimizer's A on the held-out batch (dropout off in eval mode).
    model.eval()
    g = oracle.ggn_ce(model, held[0])
    model.train()
    a = torch.cat([t.reshape(-1) for t in opt.preconditioner(probe.params)]).to(DT)
    exact = float((a**2 * torch.diag(g)).sum())
    assert abs(recs[3]["curvature"] - exact) < 4 * float(probe.last.stderr), (recs[3]["curvature"], exact)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3))
        self.frozen_bn = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.frozen_bn(self.body(x)))


@pytest.mark.parametrize("eval_mode", [True, False])
def test_measure_leaves_model_grads_modes_buffers_and_rng_as_found(eval_mode):
    torch.manual_seed(0)
    net = _Net().to(DT)
    net.train()
    net.frozen_bn.eval()  # mixed modes must be restored per module, not by a blanket train()
    x, y = torch.randn(10, 4, dtype=DT), torch.randn(10, 2, dtype=DT)
    net(x)  # give BN non-trivial running stats
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    bufs = {n: b.clone() for n, b in net.named_buffers()}
    modes = {n: m.training for n, m in net.named_modules()}
    rng = torch.get_rng_state()
    batches = [(x, y), (x[:6], y[:6])]
    for kind in ("ggn", "hessian", "fd_hessian", "sampled_label"):
        probe = CurvatureProbe(net, nn.MSELoss(), batches, kind=kind, num_probes=4, eval_mode=eval_mode)
        r0, r1 = probe.measure(), probe.measure()
        assert (r0.batch_index, r1.batch_index) == (0, 1)
        assert r0.mode == ("eval" if eval_mode else "train")
        assert math.isfinite(float(r0.value))
    assert all(torch.equal(p, params[n]) for n, p in net.named_parameters())
    assert all(torch.equal(p.grad, grads[n]) for n, p in net.named_parameters())
    assert all(torch.equal(b, bufs[n]) for n, b in net.named_buffers())
    assert {n: m.training for n, m in net.named_modules()} == modes
    assert torch.equal(torch.get_rng_state(), rng)


def test_nonpositive_hessian_trace_is_flagged():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(DT)
    batch = (torch.randn(8, 3, dtype=DT), torch.randn(8, 2, dtype=DT))

    def concave(out, y):  # H = −(GGN of MSE): negative definite
        return -((out - y) ** 2).mean()

    res = CurvatureProbe(model, concave, batch, kind="hessian", num_probes=4).measure()
    assert float(res.value) < 0 and bool(res.nonpositive) and bool(res.flagged) and res.to_dict()["nonpositive"]
    nan = CurvatureProbe(model, concave, batch, kind="fd_hessian", num_probes=4, nonpositive="nan").measure()
    assert math.isnan(float(nan.value)) and bool(nan.flagged)
    ok = CurvatureProbe(model, nn.MSELoss(), batch, kind="hessian", num_probes=4).measure()
    assert float(ok.value) > 0 and not bool(ok.flagged)


def test_due_and_bad_arguments(mlp_ce):
    m = mlp_ce
    probe = CurvatureProbe(m.model, m.loss_fn, m.batch, every=3)
    assert [probe.due(s) for s in range(7)] == [False, False, False, True, False, False, True]
    assert len(probe.params) == 4
    bad = [
        (dict(kind="laplace"), "kind"),
        (dict(estimator="hutch"), "estimator"),
        (dict(num_probes=0), "num_probes"),
        (dict(estimator="xtrace", num_probes=3), "num_probes"),
        (dict(every=0), "every"),
        (dict(kind="hessian", estimator="hutchpp"), "estimator"),
        (dict(loss="mse"), "loss"),
        (dict(seed=1.5), "seed"),
        (dict(nonpositive="clip"), "nonpositive"),
        (dict(params=[]), "params"),
    ]
    for kwargs, word in bad:
        with pytest.raises(ValueError, match=word):
            CurvatureProbe(m.model, m.loss_fn, m.batch, **kwargs)
    with pytest.raises(ValueError, match="loss"):
        CurvatureProbe(m.model, lambda o, t: o.sum(), m.batch)  # GGN needs a known loss
    with pytest.raises(ValueError, match="batch"):
        CurvatureProbe(m.model, m.loss_fn, [m.batch[0]])
    with pytest.raises(ValueError, match="precond"):
        probe.measure([torch.ones(3)])
    with pytest.raises(ValueError, match="precond"):
        probe.measure([torch.ones(2, 2)] * 4)
    with pytest.raises(TypeError):
        pnekern.AdamW(m.model.parameters()).attach_probe(object())
