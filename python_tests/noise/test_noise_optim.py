"""Noise injection through pnekern.AdamW: covariances in both spaces, "emulate batch B'", accounting, contracts.

Frozen-preconditioner trick: with β1 = β2 = 0 and a constant gradient c (two micro-batches of a linear loss, so the
natural noise is exactly 0), m_t = c + ε_t and A_t = 1/(|c| + eps) at every step, so ε_t and ζ_t can be read off the
optimizer exactly and their covariance checked by Monte Carlo.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import pnekern
from pnekern.noise import NoiseConfig, isotropic, lowrank

f64 = torch.float64


def assert_cov_within(emp: torch.Tensor, true: torch.Tensor, n: int, z_diag: float = 3.0, z_off: float = 3.5) -> None:
    """|Ĉ_ij − C_ij| ≤ z·SE_ij with SE_ij² = (C_ii C_jj + C_ij²)/N (Gaussian); off-diagonals Bonferroni at 3.5 SE."""
    d = true.shape[0]
    se = ((torch.outer(true.diagonal(), true.diagonal()) + true * true) / n).sqrt()
    z = (emp - true).abs() / se
    eye = torch.eye(d, dtype=torch.bool)
    assert float(z[eye].max()) < z_diag, f"diagonal off by {float(z[eye].max()):.2f} SE"
    assert float(z[~eye].max()) < z_off, f"off-diagonal off by {float(z[~eye].max()):.2f} SE"


def const_step(opt, p, c, k=2):
    """One step whose gradient is exactly c (k identical micro-batches: zero natural noise)."""
    opt.zero_grad()
    for _ in range(k):
        ((p * c).sum() / k).backward()
    opt.step()


def lowrank_factors(d=5, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, k, generator=g, dtype=f64)
    s = torch.rand(k, generator=g, dtype=f64) + 0.5
    delta = torch.rand(d, generator=g, dtype=f64) * 0.3 + 0.05
    dense = u @ torch.diag(s) @ u.T + torch.diag(delta)
    return (u, s, delta), dense


C = torch.tensor([0.5, -1.0, 2.0, -0.25, 1.5], dtype=f64)


@pytest.mark.parametrize("into_v", [True, False])
def test_gradient_space_covariance_and_second_moment(into_v):
    (u, s, delta), dense = lowrank_factors()
    p = torch.nn.Parameter(torch.zeros(5, dtype=f64))
    cfg = NoiseConfig(target=lowrank([(u, s, delta)]), additive=True, space="gradient", into_second_moment=into_v, seed=7)
    opt = pnekern.AdamW([p], lr=1e-3, betas=(0.0, 0.0), weight_decay=0.0, stats="trace", noise=cfg)
    n = 1000
    eps = []
    for _ in range(n):
        const_step(opt, p, C)
        m = opt.state[p]["exp_avg"]
        e = m - C
        eps.append(e.clone())
        v = opt.state[p]["exp_avg_sq"]
        # No κ in gradient space; into_second_moment decides whether v sees ε (β2 = 0: v = g_used²).
        torch.testing.assert_close(v, (C + e) ** 2 if into_v else C * C, rtol=1e-12, atol=1e-15)
    x = torch.stack(eps)
    assert_cov_within(x.T @ x / n, dense, n)


def test_parameter_space_covariance_scales_with_lr_squared_and_kappa():
    (u, s, delta), dense = lowrank_factors(seed=1)
    adam_eps, kappa = 0.1, 2.0
    a = 1.0 / (C.abs() + adam_eps)  # A_t with β2 = 0: v = c², bc2 = 1
    zetas = {}
    for lr in (1e-2, 3e-2):
        p = torch.nn.Parameter(torch.zeros(5, dtype=f64))
        cfg = NoiseConfig(target=lowrank([(u, s, delta)]), additive=True, space="parameter", seed=3)
        opt = pnekern.AdamW([p], lr=lr, betas=(0.0, 0.0), eps=adam_eps, weight_decay=0.0, stats="trace",
                            kappa=kappa, noise=cfg)
        drift = -lr * C / (C.abs() + adam_eps)  # the deterministic Adam update with m = c, sqrt(v) = |c|
        out = []
        n = 1000 if lr == 1e-2 else 50
        for _ in range(n):
            before = p.detach().clone()
            const_step(opt, p, C)
            out.append(p.detach() - before - drift)
        zetas[lr] = torch.stack(out)
    # Monte Carlo at lr = 1e-2: Cov ζ = η² κ A R A.
    x = zetas[1e-2]
    true = (1e-2) ** 2 * kappa * torch.diag(a) @ dense @ torch.diag(a)
    assert_cov_within(x.T @ x / x.shape[0], true, x.shape[0])
    # Same seed, same stream: tripling η triples every draw (variance ∝ η²).
    torch.testing.assert_close(zetas[3e-2], 3.0 * zetas[1e-2][:50], rtol=1e-9, atol=1e-13)


def test_exposure_accounting_and_infeasible_mass():
    """Injected exposure and infeasible mass against a brute-force Σ_step (target below the natural noise)."""
    torch.manual_seed(0)
    d, k = 6, 4
    p = torch.nn.Parameter(torch.zeros(d, dtype=f64))
    sigma2 = 0.02
    lr = 1e-2
    opt = pnekern.AdamW([p], lr=lr, weight_decay=0.0, stats="diag", noise=NoiseConfig(target=isotropic(sigma2)))
    g = torch.Generator().manual_seed(1)
    scale = torch.tensor([0.05, 0.1, 0.2, 0.3, 0.5, 1.0], dtype=f64)
    for step in range(3):
        opt.zero_grad()
        contribs = []
        for _ in range(k):
            x = torch.randn(d, generator=g, dtype=f64) * scale
            contribs.append(x)
            ((p * x).sum()).backward()  # contribution x_k exactly
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            opt.step()
        xs = torch.stack(contribs)
        diag_sigma = k / (k - 1) * ((xs * xs).sum(0) - xs.sum(0) ** 2 / k)
        st = opt.last_stats()
        d_ = st.to_dict()
        expected_mass = (diag_sigma - sigma2).clamp(min=0).sum()
        assert d_["infeasible_mass"] == pytest.approx(float(expected_mass), rel=1e-9)
        a = opt.preconditioner([p])[0].to(f64)
        inj = lr * (a * a * (sigma2 - diag_sigma).clamp(min=0)).sum()
        assert d_["temperature_injected"] == pytest.approx(float(inj), rel=1e-6)
        assert d_["temperature"] == pytest.approx(d_["temperature_sampled"] + d_["temperature_injected"], rel=1e-12)
        assert d_["injection_scale"] == 1.0
        warned = [w for w in rec if "clipped" in str(w.message)]
        assert len(warned) == (1 if step == 0 else 0), "warns once, naming what was clipped"
        if step == 0:
            assert "group0.param0" in str(warned[0].message)
    # The log carries the same fields.
    recs = opt.exposure.records()
    assert len(recs) == 3 and recs[-1]["infeasible_mass"] == pytest.approx(d_["infeasible_mass"])
    assert recs[-1]["temperature_injected"] == pytest.approx(d_["temperature_injected"])


def regression_batch(step: int, b: int, d: int, beta: torch.Tensor, sigma: float, salt: int):
    g = torch.Generator().manual_seed(1_000_003 * salt + step)
    x = torch.randn(b, d, generator=g, dtype=f64)
    y = x @ beta + sigma * torch.randn(b, generator=g, dtype=f64)
    return x, y


def run_regression(batch: int, micro: int, steps: int, noise: NoiseConfig | None, salt: int, mode: str = "diag", d: int = 4):
    """Linear regression started at the optimum (per-example gradient −ξx, covariance σ²I): Σ_step = σ²/B · I."""
    sigma = 1.0
    beta = torch.linspace(-2.0, 3.0, d, dtype=f64)
    w = torch.nn.Parameter(beta.clone())
    opt = pnekern.AdamW([w], lr=1e-7, betas=(0.0, 0.999), weight_decay=0.0, stats=mode, batch_size=batch, noise=noise)
    used, temps, sampled, injected = [], [], [], []
    for t in range(steps):
        x, y = regression_batch(t, batch, d, beta, sigma, salt)
        opt.zero_grad()
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            (0.5 * ((xs @ w - ys) ** 2).mean() / micro).backward()
        opt.step()
        used.append(opt.state[w]["exp_avg"].clone())  # β1 = 0: m = the gradient the step used (ḡ + ε)
        st = opt.last_stats().to_dict()
        temps.append(st["temperature"])
        sampled.append(st.get("temperature_sampled", st["temperature"]))
        injected.append(st.get("temperature_injected", 0.0))
    return torch.stack(used), torch.tensor(temps), torch.tensor(sampled), torch.tensor(injected)


@pytest.mark.parametrize("mode", ["diag", "lowrank"])
def test_emulate_batch_size_total_covariance(mode):
    """Batch B = 32 with emulate_batch_size = 8: the step gradient's covariance becomes σ²/8 · I (Monte Carlo)."""
    big, small, steps = 32, 8, 400 if mode == "diag" else 250
    used, temps, sampled, injected = run_regression(
        big, 4, steps, NoiseConfig(emulate_batch_size=small, seed=5), salt=1, mode=mode
    )
    var = used.var(dim=0, unbiased=False)  # the mean gradient is 0 at the optimum
    pooled = float(var.mean())
    se = math.sqrt(2.0 / (steps * 4)) * (1.0 / small)
    assert abs(pooled - 1.0 / small) < 3 * se, (pooled, 1.0 / small, se)
    cov = used.T @ used / steps
    off = cov - torch.diag(cov.diagonal())
    assert float(off.abs().max()) < 3.5 * (1.0 / small) / math.sqrt(steps)
    if mode == "diag":
        # Measured through the optimizer's own statistics: injected = (B/B' − 1) × natural, step by step.
        torch.testing.assert_close(injected, (big / small - 1) * sampled, rtol=1e-6, atol=1e-15)


def test_emulate_batch_matches_a_real_small_batch_run():
    """Source equivalence: measured temperature at B = 32 emulating B' = 8 vs a real B' = 8 run (within 10%).

    d = 16 and 8 micro-batches keep the per-step temperature estimate's spread down (CV ≈ 0.3 and 0.56), so the
    ratio of the two 350-step means has a standard error of about 3.5%: 10% is ~3 SE.
    """
    steps = 400
    _, t_emulated, _, _ = run_regression(32, 8, steps, NoiseConfig(emulate_batch_size=8, seed=1), salt=2, d=16)
    _, t_real, _, _ = run_regression(8, 8, steps, None, salt=3, d=16)
    assert abs(float(t_emulated[50:].mean()) / float(t_real[50:].mean()) - 1.0) < 0.10


@pytest.mark.parametrize("space", ["gradient", "parameter"])
def test_no_noise_paths_are_unchanged(space):
    """noise=None is the plain step (torch semantics); zero-variance noise runs the noise path with no effect."""
    torch.manual_seed(0)
    models = [torch.nn.Linear(7, 3) for _ in range(4)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    opts = [
        pnekern.AdamW(models[0].parameters(), lr=1e-2),
        pnekern.AdamW(models[1].parameters(), lr=1e-2, noise=None),
        pnekern.AdamW(models[2].parameters(), lr=1e-2, stats="trace",
                      noise=NoiseConfig(target=isotropic(0.0), additive=True, space=space)),
        torch.optim.AdamW(models[3].parameters(), lr=1e-2, foreach=False),
    ]
    for t in range(4):
        x = torch.randn(6, 7)
        for m, o in zip(models, opts):
            o.zero_grad()
            for xs in x.chunk(2):
                m(xs).square().mean().backward()
            o.step()
    for a, b, c, ref in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b) and torch.equal(a, c)
        torch.testing.assert_close(a, ref, rtol=1e-6, atol=1e-7)
    assert "pnekern_noise" not in opts[1].state_dict() and "pnekern_noise" in opts[2].state_dict()


@pytest.mark.parametrize("space,into_v", [("gradient", True), ("gradient", False), ("parameter", True)])
def test_grad_is_not_modified(space, into_v):
    p = torch.nn.Parameter(torch.zeros(5))
    opt = pnekern.AdamW([p], lr=1e-2, stats="trace",
                        noise=NoiseConfig(target=isotropic(1.0), additive=True, space=space, into_second_moment=into_v))
    const_step(opt, p, C.float())
    torch.testing.assert_close(p.grad, C.float(), rtol=0, atol=0)
    m_clean = 0.1 * C.float()  # (1 − β1) c from zero state
    close = torch.allclose(opt.state[p]["exp_avg"], m_clean, rtol=1e-6, atol=1e-7)
    assert close == (space == "parameter"), "gradient-space noise enters m, parameter-space noise does not"


@pytest.mark.parametrize("in_step", [False, True])
def test_failed_step_leaves_everything_untouched(monkeypatch, in_step):
    # in_step=False: the Python sampler fails on the second parameter. in_step=True (the fused step draws ε): the
    # preparation of the second parameter's kernel operands fails; either way before anything is mutated.
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(4))
    b = torch.nn.Parameter(torch.randn(3))
    opt = pnekern.AdamW([a, b], lr=1e-2, stats="diag",
                        noise=NoiseConfig(target=isotropic(0.5), additive=True, in_step=in_step))
    for _ in range(2):
        opt.zero_grad()
        for _ in range(2):
            (a.sum() + b.square().sum()).backward()
        opt.step()
    params = [a.detach().clone(), b.detach().clone()]
    sd = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    for _ in range(2):
        (a.sum() + b.square().sum()).backward()
    import pnekern.noise.injector as injector

    owner, name = (injector.NoiseInjector, "_kernel_operands") if in_step else (injector, "sample_noise")
    real, calls = getattr(owner, name), []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated failure while drawing noise")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
    with pytest.raises(RuntimeError, match="simulated failure"):
        opt.step()
    assert torch.equal(a, params[0]) and torch.equal(b, params[1])
    after = opt.state_dict()
    assert after["pnekern_noise"]["counter"] == sd["pnekern_noise"]["counter"]
    for k, st in sd["state"].items():
        for name, t in st.items():
            assert torch.equal(after["state"][k][name], t), (k, name)
