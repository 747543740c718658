"""Monte Carlo: the trace estimators are unbiased for synthetic gradients with known covariance."""
from __future__ import annotations

import math

import pytest
import torch

import pnekern

D = 40


def _cov(kind: str, g: torch.Generator):
    if kind == "diag":
        return torch.diag(torch.rand(D, generator=g, dtype=torch.float64) * 2 + 0.1)
    u = torch.randn(D, 3, generator=g, dtype=torch.float64)
    return u @ u.T + torch.diag(torch.rand(D, generator=g, dtype=torch.float64) * 0.2)


def _feed(p, K, mu, L, g):
    for _ in range(K):
        x = mu + L @ torch.randn(D, generator=g, dtype=torch.float64)
        p.backward(x)  # fires the capture hook with x, then accumulates into p.grad


@pytest.mark.parametrize("kind", ["diag", "lowrank"])
@pytest.mark.parametrize("K", [2, 5])
def test_sgd_trace_and_mcCandlish_identity_unbiased(kind, K):
    g = torch.Generator().manual_seed(0)
    C = _cov(kind, g)
    L = torch.linalg.cholesky(C)
    mu = torch.randn(D, generator=g, dtype=torch.float64) * 0.3
    p = torch.zeros(D, dtype=torch.float64, requires_grad=True)
    opt = pnekern.SGD([p], lr=0.0, stats="trace", batch_size=K)
    trs, unb, raw = [], [], []
    for _ in range(600):
        _feed(p, K, mu, L, g)
        opt.step()
        opt.zero_grad()
        s = opt.last_stats().to_dict()
        trs.append(s["trace_noise"])
        unb.append(s["grad_norm_sq_unbiased"])
        raw.append(s["grad_norm_sq"])
    trs, unb, raw = map(lambda v: torch.tensor(v, dtype=torch.float64), (trs, unb, raw))
    truth_tr = K * torch.trace(C).item()  # Σ_step = K·C for p.grad = Σ_k x_k
    truth_g2 = (K * mu).square().sum().item()
    se = trs.std().item() / math.sqrt(len(trs))
    assert abs(trs.mean().item() - truth_tr) < 3 * se
    se = unb.std().item() / math.sqrt(len(unb))
    assert abs(unb.mean().item() - truth_g2) < 3 * se
    # McCandlish: E|ḡ|² = |G|² + tr Σ_step
    se = raw.std().item() / math.sqrt(len(raw))
    assert abs(raw.mean().item() - (truth_g2 + truth_tr)) < 3 * se


@pytest.mark.parametrize("mode", ["trace", "diag"])
def test_adamw_precond_trace_unbiased_given_A(mode):
    K = 3
    g = torch.Generator().manual_seed(1)
    C = _cov("lowrank", g)
    L = torch.linalg.cholesky(C)
    mu = torch.randn(D, generator=g, dtype=torch.float64)
    p = torch.zeros(D, dtype=torch.float64, requires_grad=True)
    opt = pnekern.AdamW([p], lr=1e-3, stats=mode)
    err = []
    for t in range(400):
        if mode == "trace":
            st = opt.state.get(p)
            if st:
                step = float(st["step"])
                a = 1.0 / (st["exp_avg_sq"].sqrt() / math.sqrt(1 - 0.999**step) + 1e-8)
            else:
                a = torch.ones(D, dtype=torch.float64)
        _feed(p, K, mu, L, g)
        opt.step()
        opt.zero_grad()
        if mode == "diag":
            st = opt.state[p]
            step = float(st["step"])
            a = 1.0 / (st["exp_avg_sq"].sqrt() / math.sqrt(1 - 0.999**step) + 1e-8)
        truth = K * (a * a * torch.diag(C)).sum().item()
        err.append(opt.last_stats().to_dict()["trace_precond_noise"] / truth - 1.0)
    err = torch.tensor(err[5:], dtype=torch.float64)
    se = err.std().item() / math.sqrt(len(err))
    if mode == "trace":
        # A_{t-1} is independent of this step's noise: exactly unbiased.
        assert abs(err.mean().item()) < 3 * se
    else:
        # A_t depends (weakly) on this step's gradient through v; the bias is tiny at β2 = 0.999.
        assert abs(err.mean().item()) < max(3 * se, 0.01)
