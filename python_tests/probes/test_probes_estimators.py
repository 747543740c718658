"""Randomised trace / diagonal / eigenvalue estimators against exact values (dense oracles, float64)."""
from __future__ import annotations

import math

import pytest
import torch

from pnekern.probes import (
    ggn_vp,
    hutchinson_diag,
    hutchinson_trace,
    hutchpp_trace,
    hvp,
    precond_trace,
    top_eigenvalue,
    weighted_operator,
    xtrace,
)

DT = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def _adam_like_a(dim, seed=0):
    # Preconditioner entries spanning two decades, as Adam's 1/(sqrt(v̂)+eps) does.
    return torch.exp(torch.empty(dim, dtype=DT).uniform_(-2.3, 2.3, generator=gen(seed)))


@pytest.mark.parametrize("which", ["hessian_mlp", "ggn_mlp", "ggn_linreg"])
def test_traces_within_few_stderr(which, mlp_ce, linreg, oracle):
    if which == "ggn_linreg":
        m, exact_mat, op = linreg, oracle.ggn_mse(linreg.model, linreg.batch[0]), ggn_vp(*_mlb(linreg))
    elif which == "ggn_mlp":
        m, exact_mat, op = mlp_ce, oracle.ggn_ce(mlp_ce.model, mlp_ce.batch[0]), ggn_vp(*_mlb(mlp_ce))
    else:
        m, exact_mat, op = mlp_ce, oracle.hessian(mlp_ce.model, mlp_ce.loss_fn, *mlp_ce.batch), hvp(*_mlb(mlp_ce))
    exact = float(torch.trace(exact_mat))
    est = hutchinson_trace(op, num_probes=32, generator=gen(1))
    assert est.num_matvecs == 32 and est.stderr > 0
    assert abs(est.value - exact) < 4 * est.stderr, (est.value, exact, est.stderr)
    # per-parameter split: block traces of the diagonal blocks, each within its own stderr band.
    sizes = [p.numel() for p in m.model.parameters()]
    offs = [0] + list(torch.tensor(sizes).cumsum(0).tolist())
    for blk, lo, hi in zip(est.per_param, offs[:-1], offs[1:]):
        block_exact = float(torch.trace(exact_mat[lo:hi, lo:hi]))
        assert abs(blk["value"] - block_exact) < 4 * blk["stderr"] + 1e-12
    if which != "hessian_mlp":  # Hutch++ / XTrace are for PSD operators
        for fn in (hutchpp_trace, xtrace):
            e = fn(op, num_matvecs=30, generator=gen(2))
            assert e.num_matvecs <= 30  # fewer when d < num_matvecs/2: the sketch already spans the space
            assert abs(e.value - exact) < 4 * e.stderr + 1e-9 * abs(exact), (fn.__name__, e.value, exact, e.stderr)


def _mlb(m):
    return m.model, m.loss_fn, m.batch


def test_precond_trace_matches_exact_tr_aha(mlp_ce, oracle):
    h = oracle.hessian(mlp_ce.model, mlp_ce.loss_fn, *mlp_ce.batch)
    a = _adam_like_a(h.shape[0])
    exact = float(torch.trace(torch.diag(a) @ h @ torch.diag(a)))
    est = precond_trace(hvp(*_mlb(mlp_ce)), a, num_probes=48, generator=gen(3))
    assert est.num_matvecs == 48
    assert abs(est.value - exact) < 4 * est.stderr
    # Per-parameter preconditioner layout gives the identical estimate.
    per = [c.view(p.shape) for c, p in zip(torch.split(a, [p.numel() for p in mlp_ce.model.parameters()]),
                                            mlp_ce.model.parameters())]
    est2 = precond_trace(hvp(*_mlb(mlp_ce)), per, num_probes=48, generator=gen(3))
    assert est2.value == pytest.approx(est.value, rel=1e-12)
    # The weighted operator is A H A.
    w = weighted_operator(hvp(*_mlb(mlp_ce)), a)
    v = torch.randn(w.dim, dtype=DT, generator=gen(4))
    torch.testing.assert_close(w.matvec(v), a * (h @ (a * v)), rtol=1e-10, atol=1e-12)


def test_precond_trace_lower_variance_than_diag_route():
    # SPEC §4: (A z)ᵀ H (A z) beats Σ a_i² d̂_i. Both are unbiased for Tr(AHA); compare their sample spreads.
    d = 40
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=DT, generator=gen(0)))
    h = q @ torch.diag(torch.linspace(-1, 3, d, dtype=DT)) @ q.T
    a = _adam_like_a(d, 1)
    direct = precond_trace(h, a, num_probes=400, generator=gen(5))
    diag = hutchinson_diag(h, num_probes=400, generator=gen(5))
    diag_route_se = float(((a**2) ** 2 * diag.stderr**2).sum().sqrt())  # independent-coordinate approximation
    exact = float(torch.trace(torch.diag(a) @ h @ torch.diag(a)))
    assert abs(direct.value - exact) < 4 * direct.stderr
    assert abs(float((a**2 * diag.value).sum()) - exact) < 6 * diag_route_se
    assert direct.stderr < diag_route_se


def test_hutchinson_diag_matches_exact(linreg, oracle):
    h = oracle.hessian(linreg.model, linreg.loss_fn, *linreg.batch)
    est = hutchinson_diag(hvp(*_mlb(linreg)), num_probes=200, generator=gen(6))
    err = (est.value - torch.diag(h)).abs()
    assert est.value.shape == (h.shape[0],) and est.stderr.shape == (h.shape[0],)
    assert bool((err < 4.5 * est.stderr + 1e-12).all()), (err / est.stderr).max()
    # Not trivially passing: the error is non-zero and the band is tight relative to the diagonal.
    assert float(err.max()) > 0 and float((est.stderr / torch.diag(h).abs()).max()) < 0.5
    assert [tuple(d["value"].shape) for d in est.per_param] == [(2, 5), (2,)]


def test_stderr_is_calibrated_over_seeds():
    # Coverage of ±2 stderr over repeated seeds ≈ 95% (binomial band for 200 trials: 0.89..0.99).
    d = 30
    m = torch.randn(d, d, dtype=DT, generator=gen(7))
    m = m @ m.T / d + torch.diag(torch.linspace(0, 2, d, dtype=DT))
    exact = float(torch.trace(m))
    cover = sum(abs((e := hutchinson_trace(m, num_probes=24, generator=gen(100 + s))).value - exact) < 2 * e.stderr
                for s in range(200))
    assert 0.89 <= cover / 200 <= 0.99, cover


def test_hutchpp_and_xtrace_beat_hutchinson_on_decaying_spectrum():
    d = 120
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=DT, generator=gen(8)))
    m = q @ torch.diag(1.0 / torch.arange(1, d + 1, dtype=DT) ** 2) @ q.T
    exact = float(torch.trace(m))
    errs = {"hutchinson": [], "hutchpp": [], "xtrace": []}
    for s in range(12):
        errs["hutchinson"].append(abs(hutchinson_trace(m, num_probes=30, generator=gen(s)).value - exact))
        errs["hutchpp"].append(abs(hutchpp_trace(m, num_matvecs=30, generator=gen(s)).value - exact))
        errs["xtrace"].append(abs(xtrace(m, num_matvecs=30, generator=gen(s)).value - exact))
    rms = {k: math.sqrt(sum(e * e for e in v) / len(v)) for k, v in errs.items()}
    assert rms["hutchpp"] < 0.5 * rms["hutchinson"], rms
    assert rms["xtrace"] < 0.5 * rms["hutchinson"], rms


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_top_eigenvalue_plain_and_preconditioned(method, linreg, mlp_ce, oracle):
    # Linear regression: PSD with a spread spectrum (power iteration converges). MLP Hessian: indefinite (Lanczos).
    h = oracle.hessian(linreg.model, linreg.loss_fn, *linreg.batch)
    iters = 25 if method == "lanczos" else 400
    est = top_eigenvalue(hvp(*_mlb(linreg)), method=method, num_iters=iters, generator=gen(9))
    lam = float(torch.linalg.eigvalsh(h)[-1])
    assert est.value == pytest.approx(lam, rel=1e-6)
    a = _adam_like_a(h.shape[0], 2)
    pre = torch.diag(a.sqrt()) @ h @ torch.diag(a.sqrt())
    est_a = top_eigenvalue(hvp(*_mlb(linreg)), method=method, num_iters=iters, a=a, generator=gen(9))
    lam_a = float(torch.linalg.eigvalsh(pre)[-1])
    assert est_a.value == pytest.approx(lam_a, rel=1e-6)
    assert abs(lam_a - lam) > 1e-3 * lam  # the preconditioning changes the answer
    if method == "lanczos":
        hm = oracle.hessian(mlp_ce.model, mlp_ce.loss_fn, *mlp_ce.batch)
        evals = torch.linalg.eigvalsh(hm)
        assert evals[0] < 0  # indefinite
        e = top_eigenvalue(hvp(*_mlb(mlp_ce)), num_iters=51, generator=gen(10))
        assert e.value == pytest.approx(float(evals[-1]), rel=1e-8)
        assert e.stderr < 1e-6
        # residual bound: the Ritz value is within stderr of the spectrum
        u = e.metadata["eigenvector"]
        assert float((hm @ u - e.value * u).norm()) <= e.stderr * 1.01 + 1e-10


def test_estimator_bad_inputs(linreg):
    op = hvp(*_mlb(linreg))
    with pytest.raises(ValueError, match="num_probes"):
        hutchinson_trace(op, num_probes=0)
    with pytest.raises(ValueError, match="num_matvecs"):
        hutchpp_trace(op, num_matvecs=2)
    with pytest.raises(ValueError, match="num_matvecs"):
        xtrace(op, num_matvecs=3)
    with pytest.raises(ValueError, match="num_iters"):
        top_eigenvalue(op, num_iters=0)
    with pytest.raises(ValueError, match="method"):
        top_eigenvalue(op, method="arnoldi")
    with pytest.raises(ValueError, match="a has"):
        precond_trace(op, torch.ones(3, dtype=DT))
    with pytest.raises(ValueError, match="non-negative"):
        top_eigenvalue(op, a=-torch.ones(op.dim, dtype=DT))
