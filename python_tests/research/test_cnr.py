"""Counterfactual Noise Replay (SPEC §7): exact on linear regression with SGD (± momentum), right sign/magnitude on a
small nonlinear model, bitwise recomputation, bounded checkpoints, bad inputs."""
import pytest
import torch
from torch import nn

import pnekern
from pnekern.cnr import CNR, GaussianNoise, Recorder

D, N = 4, 64


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = X @ torch.randn(D, generator=g, dtype=torch.float64) + 0.1 * torch.randn(N, generator=g, dtype=torch.float64)
    Xv = torch.randn(16, D, generator=g, dtype=torch.float64)
    yv = torch.randn(16, generator=g, dtype=torch.float64)
    return X, y, Xv, yv


def _linear_run(opt_name, steps=25, checkpoint_every=7, noise_std=0.01, max_checkpoints=None):
    X, y, Xv, yv = _data()
    torch.manual_seed(0)
    model = nn.Linear(D, 1, dtype=torch.float64)
    opt = {
        "sgd": lambda: torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.01),
        "momentum": lambda: pnekern.SGD(model.parameters(), lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01),
        "adamw": lambda: torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1),
    }[opt_name]()

    def loss_fn(m, idx):
        return 0.5 * ((m(X[idx]).squeeze(-1) - y[idx]) ** 2).mean()

    rec = Recorder(model, opt, loss_fn, noise=GaussianNoise(noise_std), checkpoint_every=checkpoint_every,
                   max_checkpoints=max_checkpoints, seed=3)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        rec.step(torch.randint(0, N, (8,), generator=g))
    return model, rec, Xv, yv


def _val_mse(Xv, yv):
    return lambda m: 0.5 * ((m(Xv).squeeze(-1) - yv) ** 2).mean()


def _flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("opt_name", ["sgd", "momentum"])
def test_linear_regression_sgd_is_exact(opt_name):
    model, rec, Xv, yv = _linear_run(opt_name)
    cnr = CNR(rec, _val_mse(Xv, yv))
    f0, th0 = cnr.rerun()
    assert torch.equal(th0, _flat_params(model))  # checkpoint + recompute is bitwise
    g = torch.Generator().manual_seed(7)
    for scale in (1e-3, 1e-1):  # exact at any size: the dynamics are affine
        dxi = scale * torch.randn(rec.num_steps, rec.dim, generator=g, dtype=torch.float64)
        f1, th1 = cnr.rerun(delta_xi=dxi)
        dth, thT = cnr.tangent(delta_xi=dxi)
        torch.testing.assert_close(dth, th1 - th0, rtol=1e-9, atol=1e-14)
        # quadratic metric: the tangent + second-order term is exact
        pred = cnr.delta_f_from_tangent(dth, thT)
        assert abs(pred - (f1 - f0)) <= 1e-9 * abs(f1 - f0) + 1e-15
        # adjoint: first order δf = ∇f·δθ_T exactly (a linear metric would be exact end to end)
        adj = cnr.adjoint()
        lin = float(adj.grad_f @ (th1 - th0))
        assert abs(adj.delta_f_noise(dxi) - lin) <= 1e-10 * abs(lin) + 1e-15
        assert adj.num_hvps == rec.num_steps


def test_linear_metric_adjoint_exact_vs_rerun():
    model, rec, Xv, _ = _linear_run("momentum")
    x_test = Xv[0]
    cnr = CNR(rec, lambda m: m(x_test).squeeze())  # one prediction: linear in θ
    f0, _ = cnr.rerun()
    adj = cnr.adjoint()
    g = torch.Generator().manual_seed(2)
    for _ in range(4):
        dxi = 0.05 * torch.randn(rec.num_steps, rec.dim, generator=g, dtype=torch.float64)
        f1, _ = cnr.rerun(delta_xi=dxi)
        assert abs(adj.delta_f_noise(dxi) - (f1 - f0)) <= 1e-10 * abs(f1 - f0) + 1e-15


def test_covariance_change_exact_on_linear_regression():
    """ΔE f for Σ_t → Σ̃_t against the closed form ½ Σ_t tr(G J_t ΔΣ_t J_tᵀ) with dense transition matrices."""
    model, rec, Xv, yv = _linear_run("sgd", steps=12, checkpoint_every=5)
    X, y, _, _ = _data()
    cnr = CNR(rec, _val_mse(Xv, yv))
    delta_diag = torch.linspace(1e-4, 5e-4, rec.dim, dtype=torch.float64)
    res = cnr.covariance_change(lambda t: delta_diag * (1 + 0.1 * t))
    # closed form: θ = (w, b); loss 0.5·mean((Xw + b − y)²) ⇒ H = ZᵀZ/n with Z = [X, 1]; M_t = I − η(H_t + wd I)
    lr, wd = 0.1, 0.01
    Zv = torch.cat([Xv, torch.ones(16, 1, dtype=torch.float64)], 1)
    G = Zv.T @ Zv / 16
    J = torch.eye(rec.dim, dtype=torch.float64)
    expected = 0.0
    for t in reversed(range(rec.num_steps)):
        expected += 0.5 * float(torch.trace(G @ J @ torch.diag(delta_diag * (1 + 0.1 * t)) @ J.T))
        idx = rec.records[t].batch
        Z = torch.cat([X[idx], torch.ones(len(idx), 1, dtype=torch.float64)], 1)
        J = J @ (torch.eye(rec.dim, dtype=torch.float64) - lr * (Z.T @ Z / len(idx) + wd * torch.eye(rec.dim)))
    assert abs(res.delta_expected_f - expected) <= 1e-8 * abs(expected)
    assert res.mean_shift == "omitted"
    # Monte-Carlo probes (E[ppᵀ] = G) agree within their standard error
    g = torch.Generator().manual_seed(0)
    probes = (torch.randn(400, 16, generator=g, dtype=torch.float64) @ Zv / 4.0,
              torch.full((400,), 1 / 400))
    mc = cnr.covariance_change(lambda t: delta_diag * (1 + 0.1 * t), probes=probes)
    assert abs(mc.delta_expected_f - expected) < 0.25 * expected


def test_learning_rate_change_first_order():
    model, rec, Xv, yv = _linear_run("sgd")
    cnr = CNR(rec, _val_mse(Xv, yv))
    f0, _ = cnr.rerun()
    adj = cnr.adjoint()
    for eps in (1e-3, -1e-3):
        f1, _ = cnr.rerun(lr_eps=eps)
        pred = adj.delta_f_lr(eps)
        assert pred * (f1 - f0) > 0
        assert abs(pred - (f1 - f0)) < 0.02 * abs(f1 - f0)  # second order in ε


def test_recompute_is_bitwise_with_thinned_checkpoints():
    model, rec, Xv, yv = _linear_run("adamw", steps=40, checkpoint_every=2, max_checkpoints=4)
    assert len(rec.checkpoints) <= 4 and 0 in rec.checkpoints
    cnr = CNR(rec, _val_mse(Xv, yv))
    assert torch.equal(cnr.final_params(), _flat_params(model))
    f0, th0 = cnr.rerun()
    assert torch.equal(th0, _flat_params(model))
    assert rec.nbytes() > 0


def _mlp_run(opt_name, steps=30):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(128, 3, generator=g, dtype=torch.float64)
    y = torch.sin(2 * X[:, 0]) + X[:, 1] * X[:, 2]
    Xv = torch.randn(32, 3, generator=g, dtype=torch.float64)
    yv = torch.sin(2 * Xv[:, 0]) + Xv[:, 1] * Xv[:, 2]
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    opt = (pnekern.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01) if opt_name == "adamw"
           else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5))

    def loss_fn(m, idx):
        return ((m(X[idx]).squeeze(-1) - y[idx]) ** 2).mean()

    rec = Recorder(model, opt, loss_fn, noise=GaussianNoise(1e-3), checkpoint_every=8, seed=1)
    for _ in range(steps):
        rec.step(torch.randint(0, 128, (16,), generator=g))
    return rec, (lambda m: ((m(Xv).squeeze(-1) - yv) ** 2).mean())


@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adamw"])
def test_nonlinear_model_prediction_sign_and_magnitude(opt_name):
    rec, metric = _mlp_run(opt_name)
    cnr = CNR(rec, metric)
    f0, _ = cnr.rerun()
    adj = cnr.adjoint()
    g = torch.Generator().manual_seed(5)
    base = 0.01 * adj.adjoints / adj.adjoints.norm()  # a counterfactual noise direction the metric is sensitive to
    pred, real = [], []
    for k in range(8):
        sign = 1.0 if k % 2 == 0 else -1.0
        dxi = sign * (0.5 + 0.25 * k) * base + 1e-3 * torch.randn(base.shape, generator=g, dtype=torch.float64)
        pred.append(adj.delta_f_noise(dxi))
        real.append(cnr.rerun(delta_xi=dxi)[0] - f0)
    pred_t, real_t = torch.tensor(pred), torch.tensor(real)
    assert bool((torch.sign(pred_t) == torch.sign(real_t)).all())
    rel = ((pred_t - real_t).abs() / real_t.abs()).max()
    assert float(rel) < (0.1 if opt_name == "sgd_momentum" else 0.5), (pred, real)
    ranks = lambda v: v.argsort().argsort().double()
    rho = torch.corrcoef(torch.stack([ranks(pred_t), ranks(real_t)]))[0, 1]
    assert float(rho) > 0.9


def test_bad_inputs():
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = lambda m, b: m(b).sum()
    with pytest.raises(ValueError):
        Recorder(model, opt, loss_fn, checkpoint_every=0)
    with pytest.raises(ValueError):
        Recorder(model, opt, loss_fn, max_checkpoints=1)
    with pytest.raises(ValueError):
        Recorder(model, "sgd", loss_fn)
    with pytest.raises(ValueError):
        Recorder(model, opt, loss_fn, noise=object())
    with pytest.raises(ValueError):
        Recorder(nn.Linear(2, 1), opt, loss_fn)  # optimizer params are not the model's
    with pytest.raises(ValueError):
        GaussianNoise(-1.0)
    rec = Recorder(model, opt, loss_fn)
    with pytest.raises(ValueError):
        CNR(rec, lambda m: m.weight.sum())  # no steps recorded yet
    rec.step(torch.randn(3, 2))
    with pytest.raises(ValueError):
        CNR(rec, "not callable")
    nes = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    rec2 = Recorder(model, nes, loss_fn)
    rec2.step(torch.randn(3, 2))
    with pytest.raises(ValueError):
        CNR(rec2, lambda m: m.weight.sum())
    with pytest.raises(ValueError):
        CNR(rec, lambda m: m.weight.sum()).adjoint().delta_f_noise(torch.zeros(3, 3))
