"""Sampled-label GGN trace (unbiased; true labels differ), SAM sharpness, Gaussian-perturbation flatness."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pnekern.probes import perturbation_sharpness, sam_sharpness, sampled_label_ggn_trace

DT = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_sampled_label_is_unbiased_for_ce_ggn_and_true_labels_differ(oracle):
    m = oracle.make_mlp_ce(seed=4, n=8)
    # Make the model confidently wrong on the true labels, so the empirical Fisher is far from the GGN.
    with torch.no_grad():
        m.model[2].weight.mul_(3.0)
        preds = m.model(m.batch[0]).argmax(-1)
    y_wrong = (preds + 1) % 3
    batch = (m.batch[0], y_wrong)
    g = oracle.ggn_ce(m.model, batch[0])
    d = g.shape[0]
    a = torch.exp(torch.empty(d, dtype=DT).uniform_(-1.5, 1.5, generator=gen(0)))
    for weight in (None, a):
        exact = float(torch.trace(g)) if weight is None else float((weight**2 * torch.diag(g)).sum())
        est = sampled_label_ggn_trace(m.model, m.loss_fn, batch, a=weight, num_samples=2000, generator=gen(1))
        assert est.num_matvecs == 2000
        z = (est.value - exact) / est.stderr
        assert abs(z) < 4, (est.value, exact, est.stderr)
        assert est.stderr < 0.05 * exact  # the band is tight enough that a biased estimator would fail
        # per-parameter blocks are unbiased for the diagonal-block traces
        sizes = [p.numel() for p in m.model.parameters()]
        w2diag = torch.diag(g) * (1 if weight is None else weight**2)
        for blk, chunk in zip(est.per_param, torch.split(w2diag, sizes)):
            assert abs(blk["value"] - float(chunk.sum())) < 4.5 * blk["stderr"] + 1e-12
    true = sampled_label_ggn_trace(m.model, m.loss_fn, batch, labels="true")
    assert true.num_matvecs == 1 and true.stderr == 0.0
    # True labels give b‖ḡ_y‖² (empirical-Fisher-type), far from the GGN trace.
    exact = float(torch.trace(g))
    assert abs(true.value - exact) > 0.5 * exact, (true.value, exact)
    # ... and it is what it claims: N ‖∇L(true labels)‖².
    params = list(m.model.parameters())
    grad = torch.autograd.grad(m.loss_fn(m.model(batch[0]), batch[1]), params)
    assert true.value == pytest.approx(8 * sum(float((gg**2).sum()) for gg in grad), rel=1e-10)


def test_sampled_label_mse_unbiased(oracle):
    m = oracle.make_mlp_ce(seed=5)  # reuse the MLP as a regressor with MSE
    x = m.batch[0]
    y = torch.randn(x.shape[0], 3, dtype=DT, generator=gen(2))
    loss_fn = nn.MSELoss()
    exact = float(torch.trace(oracle.ggn_mse(m.model, x)))
    est = sampled_label_ggn_trace(m.model, loss_fn, (x, y), num_samples=1500, generator=gen(3))
    assert abs(est.value - exact) < 4 * est.stderr and est.stderr < 0.06 * exact, (est.value, exact, est.stderr)


def test_sam_sharpness_exact_on_quadratic_and_restores_params(linreg, oracle):
    m = linreg
    params = list(m.model.parameters())
    for p in params:
        p.grad = torch.full_like(p, -3.0)
    before = [p.detach().clone() for p in params]
    rho = 0.3
    est = sam_sharpness(m.model, m.loss_fn, m.batch, rho=rho)
    # Exact for a quadratic: ρ‖g‖ + ½ρ² ĝᵀHĝ.
    h = oracle.hessian(m.model, m.loss_fn, *m.batch)
    g = torch.cat([gg.reshape(-1) for gg in torch.autograd.grad(m.loss_fn(m.model(m.batch[0]), m.batch[1]), params)])
    u = g / g.norm()
    want = rho * float(g.norm()) + 0.5 * rho**2 * float(u @ h @ u)
    assert est.value == pytest.approx(want, rel=1e-10)
    assert est.metadata["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-12)
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # bit-exact
    assert all(torch.equal(p.grad, torch.full_like(p, -3.0)) for p in params)
    with pytest.raises(ValueError, match="rho"):
        sam_sharpness(m.model, m.loss_fn, m.batch, rho=0.0)


def test_perturbation_sharpness_half_sigma2_trace_on_quadratic(linreg, oracle):
    m = linreg
    tr = float(torch.trace(oracle.hessian(m.model, m.loss_fn, *m.batch)))
    out = perturbation_sharpness(m.model, m.loss_fn, m.batch, sigmas=(0.05, 0.2), num_samples=200, generator=gen(4))
    for s, est in out.items():
        assert abs(est.value - 0.5 * s**2 * tr) < 4 * est.stderr, (s, est.value, 0.5 * s**2 * tr, est.stderr)
        assert est.stderr < 0.2 * 0.5 * s**2 * tr
    with pytest.raises(ValueError, match="sigmas"):
        perturbation_sharpness(m.model, m.loss_fn, m.batch, sigmas=(-1.0,))


def test_sampled_label_bad_inputs(mlp_ce):
    m = mlp_ce
    with pytest.raises(ValueError, match="labels"):
        sampled_label_ggn_trace(m.model, m.loss_fn, m.batch, labels="empirical")
    with pytest.raises(ValueError, match="num_samples"):
        sampled_label_ggn_trace(m.model, m.loss_fn, m.batch, num_samples=0)
    with pytest.raises(ValueError, match="loss"):
        sampled_label_ggn_trace(m.model, lambda o, t: o.sum(), m.batch)
