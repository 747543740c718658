"""Every in-step statistic against a brute-force computation that stores all micro-batch gradients."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import pnekern

CASES = [("reference", torch.float64, 1e-9), ("cpp", torch.float32, 2e-4)]


def make_mlp(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3)).to(dtype)


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(4, 8)
        self.layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 1)
        self.head.weight = nn.Parameter(self.head.weight)  # a plain param, used once

    def forward(self, x):
        return self.head(self.layer(self.emb(x))).mean(dim=1)


def make_transformer(dtype):
    torch.manual_seed(1)
    return TinyTransformer().to(dtype)


def batch_for(model, k, step, dtype):
    g = torch.Generator().manual_seed(1000 * step + k)
    if isinstance(model, TinyTransformer):
        x = torch.randn(3, 5, 4, generator=g, dtype=dtype)
        y = torch.randn(3, 1, generator=g, dtype=dtype)
    else:
        x = torch.randn(4, 5, generator=g, dtype=dtype)
        y = torch.randn(4, 3, generator=g, dtype=dtype)
    return x, y


def brute_force_contribs(model, K, step, dtype):
    params = [p for p in model.parameters()]
    contribs = []
    for k in range(K):
        x, y = batch_for(model, k, step, dtype)
        loss = ((model(x) - y) ** 2).mean() / K
        contribs.append([g.detach().to(torch.float64) for g in torch.autograd.grad(loss, params)])
    return contribs


def precond(opt, p, which):
    st = opt.state.get(p)
    group = opt.param_groups[0]
    if not st or float(st["step"]) == 0:
        return torch.ones_like(p, dtype=torch.float64)
    step = float(st["step"])
    bc2 = 1 - group["betas"][1] ** step
    return 1.0 / (st["exp_avg_sq"].to(torch.float64).sqrt() / math.sqrt(bc2) + group["eps"])


@pytest.mark.parametrize("mode", ["trace", "diag", "lowrank"])
@pytest.mark.parametrize("K", [2, 3, 8])
@pytest.mark.parametrize("backend,dtype,rtol", CASES, ids=["reference-f64", "cpp-f32"])
@pytest.mark.parametrize("make_model", [make_mlp, make_transformer], ids=["mlp", "transformer"])
def test_statistics_match_brute_force(make_model, backend, dtype, rtol, K, mode):
    model = make_model(dtype)
    B = 4 * K
    lr = 1e-2
    opt = pnekern.AdamW(model.parameters(), lr=lr, backend=backend, stats=mode, batch_size=B, stats_rank=12)
    params = list(model.parameters())
    pne = 0.0
    for step in range(3):
        contribs = brute_force_contribs(model, K, step, dtype)
        a_prev = [precond(opt, p, "prev") for p in params]
        for k in range(K):
            x, y = batch_for(model, k, step, dtype)
            (((model(x) - y) ** 2).mean() / K).backward()
        opt.step()
        a_new = [precond(opt, p, "new") for p in params]
        opt.zero_grad()
        s = opt.last_stats().to_dict()
        G = [sum(c[i] for c in contribs) for i in range(len(params))]
        diag = [K * (sum(c[i] ** 2 for c in contribs) - G[i] ** 2 / K) / (K - 1) for i in range(len(params))]
        tr = sum(d.sum().item() for d in diag)
        a = a_prev if mode == "trace" else a_new
        tr_a = sum((ai**2 * d).sum().item() for ai, d in zip(a, diag))
        g2 = sum((g**2).sum().item() for g in G)
        pne += lr * lr * tr_a
        assert s["num_contributions"] == K
        assert s["trace_noise"] == pytest.approx(tr, rel=rtol)
        assert s["trace_precond_noise"] == pytest.approx(tr_a, rel=rtol)
        assert s["grad_norm_sq"] == pytest.approx(g2, rel=rtol)
        assert s["grad_norm_sq_unbiased"] == pytest.approx(g2 - tr, rel=rtol, abs=rtol * g2)
        assert s["noise_scale_raw"] == pytest.approx(B * tr / (g2 - tr), rel=50 * rtol)
        assert s["temperature"] == pytest.approx(lr * tr_a, rel=rtol)
        assert s["diffusion"] == pytest.approx(lr * lr * tr_a, rel=rtol)
        assert s["pne"] == pytest.approx(pne, rel=rtol)
        assert s["kappa"] == 1.0 and s["curvature"] is None and s["pne_star"] is None
        # per-parameter breakdown sums to the total
        per = s["per_param"]
        assert len(per) == len(params)
        assert sum(v["trace_noise"] for v in per.values()) == pytest.approx(tr, rel=rtol)
        # ... and each parameter's row is its own (a permutation of rows keeps every sum above).
        for i, (ai, d, g) in enumerate(zip(a, diag, G)):
            row = per[f"group0.param{i}"]
            tr_ai = (ai**2 * d).sum().item()
            assert row["trace_noise"] == pytest.approx(d.sum().item(), rel=rtol, abs=rtol * tr)
            assert row["trace_precond_noise"] == pytest.approx(tr_ai, rel=rtol, abs=rtol * tr_a)
            assert row["grad_norm_sq"] == pytest.approx((g**2).sum().item(), rel=rtol, abs=rtol * g2)
            assert row["temperature"] == pytest.approx(lr * tr_ai, rel=rtol, abs=rtol * lr * tr_a)
            assert row["diffusion"] == pytest.approx(lr * lr * tr_ai, rel=rtol, abs=rtol * lr * lr * tr_a)
            assert row["num_contributions"] == K and row["lr"] == lr
        if mode == "lowrank":
            # With rank >= n-1 the Nyström factors reproduce Σ_step exactly.
            for i, (name, (u, lam, resid)) in enumerate(opt.noise_stats.covariances.items()):
                cs = torch.stack([c[i].reshape(-1) for c in contribs])  # [K, d]
                cen = cs - cs.mean(0)
                sigma = K * (cen.T @ cen) / (K - 1)
                approx = (u.double() * lam.double()) @ u.double().T + torch.diag(resid.double())
                scale = sigma.abs().max().item()
                assert (approx - sigma).abs().max().item() <= max(1e-3, 50 * rtol) * scale, name


def test_single_contribution_gives_nan_and_warns_once():
    model = make_mlp(torch.float64)
    opt = pnekern.AdamW(model.parameters(), stats="trace", batch_size=4)
    with pytest.warns(RuntimeWarning, match="fewer than 2 gradient contributions"):
        for step in range(2):
            x, y = batch_for(model, 0, step, torch.float64)
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
            s = opt.last_stats().to_dict()
            assert math.isnan(s["trace_noise"]) and math.isnan(s["temperature"])
            assert s["pne"] == 0.0  # nothing made up
            assert s["grad_norm_sq"] > 0


def test_bad_stats_options():
    params = list(make_mlp(torch.float32).parameters())
    with pytest.raises(ValueError, match="stats='bogus'"):
        pnekern.AdamW(params, stats="bogus")
    with pytest.raises(ValueError, match="batch_size"):
        pnekern.AdamW(params, stats="trace", batch_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        pnekern.AdamW(params, batch_size=8)
    with pytest.raises(ValueError, match="stats_every"):
        pnekern.AdamW(params, stats="trace", stats_every=0)
    with pytest.raises(ValueError, match="kappa"):
        pnekern.AdamW(params, stats="trace", kappa="bogus")


def test_param_group_added_later_is_tracked():
    m1, m2 = make_mlp(torch.float64), nn.Linear(3, 2).double()
    opt = pnekern.AdamW(m1.parameters(), stats="trace")
    opt.add_param_group({"params": m2.parameters(), "lr": 1e-2})
    for k in range(2):
        x, y = batch_for(m1, k, 0, torch.float64)
        (((m2(m1(x)) - y[:, :2]) ** 2).mean()).backward()
    opt.step()
    d = opt.last_stats().to_dict()
    per = d["per_param"]
    assert "group1.param0" in per and per["group1.param0"]["num_contributions"] == 2
    assert per["group1.param0"]["lr"] == 1e-2
    # Two learning rates: each parameter's temperature uses its own group's (NE_p = η_p κ Tr(A Σ A)_p).
    for row in per.values():
        assert row["temperature"] == pytest.approx(row["lr"] * d["kappa"] * row["trace_precond_noise"], rel=1e-12)
    assert d["temperature"] == pytest.approx(sum(r["temperature"] for r in per.values()), rel=1e-12)
    assert {r["lr"] for r in per.values()} == {1e-3, 1e-2}


def test_named_parameters_and_tied_weights_count_once_per_backward():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4, dtype=torch.float64))

        def forward(self, x):
            return (x @ self.w) @ self.w  # the same tensor used twice in one forward

    m = Tied()
    opt = pnekern.AdamW(m.named_parameters(), stats="trace")
    for k in range(3):
        x = torch.randn(2, 4, dtype=torch.float64)
        m(x).pow(2).mean().backward()
    opt.step()
    s = opt.last_stats().to_dict()
    assert s["per_param"]["w"]["num_contributions"] == 3


def test_stats_every_holds_exposure_between_measurements():
    model = make_mlp(torch.float64)
    opt = pnekern.AdamW(model.parameters(), stats="trace", stats_every=3, lr=1e-2)
    measured = []
    for step in range(7):
        for k in range(2):
            x, y = batch_for(model, k, step, torch.float64)
            (((model(x) - y) ** 2).mean() / 2).backward()
        opt.step()
        opt.zero_grad()
        s = opt.last_stats().to_dict()
        measured.append(not s["held"])
        if s["held"]:
            assert s["trace_noise"] is None and s["diffusion"] == pytest.approx(last_d)
        else:
            last_d = s["diffusion"]
    assert measured == [True, False, False, True, False, False, True]
    recs = opt.exposure.records()
    assert len(recs) == 7 and [r["held"] for r in recs] == [not m for m in measured]
    pne = 0.0
    for r in recs:
        pne += r["diffusion"]
        assert r["pne"] == pytest.approx(pne)


def test_kappa_heavy_ball_and_float_and_bias_corrected():
    for kappa, expect in (("heavy_ball", 100.0), (2.5, 2.5), ("ema", 1.0)):
        model = make_mlp(torch.float64)
        opt = pnekern.AdamW(model.parameters(), stats="trace", kappa=kappa, lr=1e-2)
        for k in range(2):
            x, y = batch_for(model, k, 0, torch.float64)
            ((model(x) - y) ** 2).mean().backward()
        opt.step()
        s = opt.last_stats().to_dict()
        assert s["kappa"] == pytest.approx(expect)
        assert s["temperature"] == pytest.approx(1e-2 * expect * s["trace_precond_noise"])
    from pnekern.stats.engine import bias_corrected_coefficient

    assert bias_corrected_coefficient(1.0, 0.9, 1) == pytest.approx(3.0, rel=0.05)
    assert bias_corrected_coefficient(1.0, 0.9, 10_000) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("mode", ["trace", "diag"])
def test_rows_of_several_kernel_calls_reach_their_parameters(mode):
    # backend="auto": fp32 params take the C++ kernel, the float64 one the reference, two kernel calls whose row
    # tables come back in bucket order (p0, p2, p1), not parameter order; each parameter must get its own statistics.
    g = torch.Generator().manual_seed(3)
    params = [torch.zeros(6, requires_grad=True), torch.zeros(5, dtype=torch.float64, requires_grad=True),
              torch.zeros(4, requires_grad=True)]
    lr, K = 1e-2, 3
    opt = pnekern.AdamW(params, lr=lr, backend="auto", stats=mode)
    for step in range(2):
        contribs = [[torch.randn(p.shape, generator=g, dtype=torch.float64) * (i + 1) for i, p in enumerate(params)]
                    for _ in range(K)]
        a_prev = [precond(opt, p, "prev") for p in params]
        for c in contribs:
            for p, x in zip(params, c):
                p.backward(x.to(p.dtype))
        opt.step()
        a = a_prev if mode == "trace" else [precond(opt, p, "new") for p in params]
        opt.zero_grad()
        per = opt.last_stats().to_dict()["per_param"]
        for i in range(len(params)):
            xs = [c[i].to(params[i].dtype).to(torch.float64) for c in contribs]
            G = sum(xs)
            d = K * (sum(x**2 for x in xs) - G**2 / K) / (K - 1)
            row = per[f"group0.param{i}"]
            assert row["trace_noise"] == pytest.approx(d.sum().item(), rel=1e-5)
            assert row["trace_precond_noise"] == pytest.approx((a[i] ** 2 * d).sum().item(), rel=1e-5)
            assert row["grad_norm_sq"] == pytest.approx((G**2).sum().item(), rel=1e-5)


def test_accumulators_survive_a_group_added_and_a_copy_mid_step():
    # The per-parameter [S1, S1A] accumulators are rows of one matrix, re-made when a group is added and when the
    # optimizer is copied: contributions captured before either must still count.
    import copy

    def run(regroup):
        model = make_mlp(torch.float64)
        opt = pnekern.AdamW(model.parameters(), stats="trace", lr=1e-2)
        for step in range(2):
            for k in range(3):
                x, y = batch_for(model, k, step, torch.float64)
                (((model(x) - y) ** 2).mean() / 3).backward()
                if regroup and step == 1 and k == 1:
                    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, dtype=torch.float64))]})
                    copied, opt = copy.deepcopy((model, opt))
                    for a, b in zip(model.parameters(), copied.parameters()):
                        b.grad = a.grad.clone()  # Parameter.__deepcopy__ leaves .grad behind
                    model = copied
            opt.step()
            opt.zero_grad()
        return opt.last_stats().to_dict()

    plain, changed = run(False), run(True)
    for key in ("trace_noise", "trace_precond_noise", "grad_norm_sq", "temperature"):
        assert changed[key] == plain[key], key
    assert changed["per_param"]["group0.param0"]["trace_noise"] == plain["per_param"]["group0.param0"]["trace_noise"]
