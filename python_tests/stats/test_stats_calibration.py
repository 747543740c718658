"""Online κ calibration inside the optimizers: κ̂ ≈ 1 for AdamW's EMA momentum, ≈ 1/(1−β1)² for heavy ball."""
from __future__ import annotations

import pytest
import torch

import pnekern


def _run(make_opt, steps=3000, d=1000, K=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.zeros(d, requires_grad=True)
    opt = make_opt([p])
    sigma = torch.rand(d, generator=g) + 0.5  # anisotropic white noise, zero mean: a flat loss
    for _ in range(steps):
        for _ in range(K):
            p.backward(sigma * torch.randn(d, generator=g))
        opt.step()
        opt.zero_grad()
    return opt


def test_adamw_calibrated_kappa_is_one():
    opt = _run(lambda ps: pnekern.AdamW(ps, lr=1e-3, weight_decay=0.0, stats="trace", kappa="calibrated",
                                        calibration_every=500))
    est = opt.noise_stats.calibration_estimate
    assert est is not None and est.num_obs > 1000
    assert abs(est.kappa - 1.0) < 0.2, est
    # A step's statistics use the κ known when it starts; the estimate made at step 3000 applies from step 3001.
    assert opt.last_stats().kappa != est.kappa
    p = opt.param_groups[0]["params"][0]
    for _ in range(2):
        p.backward(torch.randn_like(p))
    opt.step()
    assert opt.last_stats().kappa == est.kappa


def test_adamw_calibration_removes_weight_decay_shrink():
    opt = _run(lambda ps: pnekern.AdamW(ps, lr=1e-3, weight_decay=0.5, stats="trace", kappa="calibrated",
                                        calibration_every=500))
    assert abs(opt.noise_stats.calibration_estimate.kappa - 1.0) < 0.2


def test_sgd_heavy_ball_calibrated_kappa():
    opt = _run(lambda ps: pnekern.SGD(ps, lr=1e-4, momentum=0.9, stats="trace", kappa="calibrated",
                                      calibration_every=500), steps=3000)
    est = opt.noise_stats.calibration_estimate
    assert abs(est.kappa / 100.0 - 1.0) < 0.2, est
    # The configured (non-calibrated) value for this momentum is the heavy-ball one.
    assert pnekern.optim.sgd_kappa(0.9, 0.0, False) == pytest.approx(100.0, rel=1e-12)
