"""NAP (SPEC §6): bad inputs, exact steps without noise, Monte-Carlo noise covariance, Oja estimate, state_dict."""
import copy
import math

import pytest
import torch
from torch import nn

from pnekern import NAP
from pnekern.optim.nap import nap_noise_seed


def _param(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return nn.Parameter(torch.randn(*shape, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("kwargs", [
    dict(lr=-1.0), dict(betas=(1.0, 0.9)), dict(eps=-1.0), dict(weight_decay=-0.1), dict(preconditioner="shampoo"),
    dict(noise="colored"), dict(target="hessian"), dict(rank=0), dict(rank=2.5), dict(lam=-1e-3),
    dict(lam=float("nan")), dict(temperature=-1.0), dict(oja_lr=0.0), dict(oja_lr=1.5), dict(cov_beta=1.0),
    dict(seed=-1), dict(seed=1 << 63),
])
def test_bad_constructor_arguments_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        NAP([_param((3,))], **kwargs)


def test_bad_calls_raise_value_error():
    p = _param((2, 3))
    opt = NAP([p], target="gradient", rank=2)
    with pytest.raises(ValueError):
        opt.observe(p, torch.randn(4, 5))  # wrong width
    with pytest.raises(ValueError):
        opt.set_target(p, torch.randn(6, 2, dtype=torch.float64), torch.ones(2))  # not orthonormal
    with pytest.raises(ValueError):
        opt.set_target(p, torch.eye(6, 2, dtype=torch.float64), -torch.ones(2))
    with pytest.raises(ValueError):
        opt.observe(_param((2, 3)), torch.randn(1, 6))  # not a parameter of this optimizer
    with pytest.raises(ValueError):
        opt.track_features(nn.Linear(3, 2))  # weight not in the optimizer
    lin = nn.Linear(3, 2).double()
    with pytest.raises(ValueError):
        NAP(lin.parameters(), target="gradient").track_features(lin)  # group target is not "features"
    bad_schedule = NAP([p], temperature=lambda t: -1.0, noise="langevin", target=None)
    with pytest.raises(ValueError):
        bad_schedule.noise_covariance(p)


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_noiseless_adam_preconditioner_equals_torch_adamw(wd):
    p1, p2 = _param((4, 3)), _param((4, 3))
    nap = NAP([p1], lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd, noise="none", target=None)
    ref = torch.optim.AdamW([p2], lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd)
    for t in range(6):
        g = torch.randn(4, 3, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        p1.grad, p2.grad = g.clone(), g.clone()
        nap.step()
        ref.step()
    torch.testing.assert_close(p1, p2, rtol=1e-14, atol=1e-14)


def _increments(opt, p, grad, steps):
    """θ_{t+1} − θ_t for a constant gradient: with P constant the drift is deterministic and equal every step."""
    out = []
    for _ in range(steps):
        before = p.detach().clone()
        p.grad = grad.clone()
        opt.step()
        out.append((p.detach() - before).reshape(-1))
    return torch.stack(out)


def _mc_cov_check(inc, cov, n_sigma=5.0):
    # Drift is the same every step: subtract the sample mean, compare the covariance entry-wise with a CLT bound.
    n = inc.shape[0]
    centered = inc - inc.mean(0)
    emp = centered.T @ centered / (n - 1)
    sd = torch.sqrt((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / n)
    assert bool(((emp - cov).abs() <= n_sigma * sd + 1e-15).all()), (emp, cov)
    # and the covariance is not trivially small relative to the bound
    assert bool((cov.diagonal() > 10 * sd.diagonal()).all())


def test_aligned_noise_covariance_monte_carlo_parameter_space():
    torch.manual_seed(0)
    p = _param((5,))
    opt = NAP([p], lr=0.1, betas=(0.0, 0.5), eps=0.3, noise="aligned", target=None, lam=0.05, temperature=2.0,
              seed=11)
    u, _ = torch.linalg.qr(torch.randn(5, 2, dtype=torch.float64))
    opt.set_target(p, u, torch.tensor([3.0, 1.0], dtype=torch.float64))
    grad = torch.tensor([1.0, -2.0, 0.5, 3.0, -0.1], dtype=torch.float64)  # constant: v̂ = g² exactly, P constant
    _increments(opt, p, grad, 1)
    cov = opt.noise_covariance(p)
    a = 1.0 / (grad.abs() + 0.3)
    expected = 2 * 0.1 * 2.0 * a[:, None] * ((u * torch.tensor([3.0, 1.0], dtype=torch.float64)) @ u.T
                                            + 0.05 * torch.eye(5, dtype=torch.float64)) * a[None, :]
    torch.testing.assert_close(cov, expected, rtol=1e-12, atol=1e-15)
    _mc_cov_check(_increments(opt, p, grad, 6000), cov)


def test_aligned_noise_covariance_monte_carlo_kronecker_features():
    lin = nn.Linear(3, 2).double()
    opt = NAP([{"params": [lin.weight], "target": "features"}], lr=0.05, preconditioner="identity", lam=0.1,
              temperature=1.0, seed=3)
    u, _ = torch.linalg.qr(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], dtype=torch.float64))
    opt.set_target(lin.weight, u, torch.tensor([2.0, 0.5], dtype=torch.float64))
    s = (u * torch.tensor([2.0, 0.5], dtype=torch.float64)) @ u.T + 0.1 * torch.eye(3, dtype=torch.float64)
    cov = opt.noise_covariance(lin.weight)
    torch.testing.assert_close(cov, 2 * 0.05 * torch.kron(torch.eye(2, dtype=torch.float64), s))
    _mc_cov_check(_increments(opt, lin.weight, torch.zeros(2, 3, dtype=torch.float64), 6000), cov)


def test_langevin_noise_covariance_is_2_eta_T_P():
    p = _param((4,))
    opt = NAP([p], lr=0.2, betas=(0.0, 0.5), eps=0.1, noise="langevin", target=None, temperature=0.5, seed=5)
    grad = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    _increments(opt, p, grad, 1)
    cov = opt.noise_covariance(p)
    torch.testing.assert_close(cov, torch.diag(2 * 0.2 * 0.5 / (grad.abs() + 0.1)), rtol=1e-12, atol=0.0)
    _mc_cov_check(_increments(opt, p, grad, 6000), cov)


def test_temperature_schedule_scales_noise_and_zero_temperature_is_noiseless():
    p1, p2 = _param((6,)), _param((6,))
    hot = NAP([p1], lr=0.1, preconditioner="identity", noise="langevin", target=None, temperature=lambda t: 4.0)
    cold = NAP([p2], lr=0.1, preconditioner="identity", noise="langevin", target=None, temperature=1.0)
    d1 = _increments(hot, p1, torch.zeros(6, dtype=torch.float64), 3)
    d2 = _increments(cold, p2, torch.zeros(6, dtype=torch.float64), 3)
    torch.testing.assert_close(d1, 2.0 * d2)  # same seeds: √4 = 2× the noise
    p3 = _param((6,))
    zero = NAP([p3], lr=0.1, preconditioner="identity", noise="langevin", target=None,
               temperature=lambda t: 0.0 if t > 1 else 1.0)
    inc = _increments(zero, p3, torch.ones(6, dtype=torch.float64), 3)
    torch.testing.assert_close(inc[1:], torch.full((2, 6), -0.1, dtype=torch.float64))


def test_oja_recovers_top_subspace_of_per_task_gradients():
    torch.manual_seed(0)
    d = 12
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    eig = torch.tensor([9.0, 4.0] + [0.05] * (d - 2), dtype=torch.float64)
    root = q * eig.sqrt()
    p = nn.Parameter(torch.zeros(d, dtype=torch.float64))
    opt = NAP([p], lr=0.0, rank=2, noise="none", target="gradient", oja_lr=0.5, cov_beta=0.9)
    gen = torch.Generator().manual_seed(1)
    for _ in range(150):
        opt.zero_grad()
        for _ in range(8):  # 8 "tasks" per step: one backward each, captured by the gradient hook
            x = root @ torch.randn(d, generator=gen, dtype=torch.float64)
            (p * x).sum().backward()
        opt.step()
    u = opt.state[p]["U"]
    proj = q[:, :2] @ q[:, :2].T
    assert float(torch.linalg.norm(proj @ u - u)) < 0.1  # subspace angle ~ sin θ
    torch.testing.assert_close(u.T @ u, torch.eye(2, dtype=torch.float64))
    sigma = opt.state[p]["sigma"]
    # Ritz values of a small-sample covariance spread apart (the top one biased up); their sum is unbiased.
    assert float(sigma[0]) > float(sigma[1]) > 1.0
    assert abs(float(sigma.sum()) - 13.0) < 2.5


def test_feature_hook_estimates_input_second_moment():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).double()
    opt = NAP([{"params": [lin.weight], "target": "features"}, {"params": [lin.bias]}], lr=0.0, rank=1,
              noise="none", oja_lr=0.5, cov_beta=0.5)
    opt.track_features(lin)
    direction = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64) / math.sqrt(2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        opt.zero_grad()
        x = torch.randn(32, 1, generator=gen, dtype=torch.float64) * 3.0 * direction \
            + 0.1 * torch.randn(32, 4, generator=gen, dtype=torch.float64)
        lin(x).sum().backward()
        with torch.no_grad():
            lin(torch.randn(5, 4, dtype=torch.float64))  # no-grad forwards are ignored
        opt.step()
    u = opt.state[lin.weight]["U"][:, 0]
    assert abs(float(u @ direction)) > 0.99
    assert abs(float(opt.state[lin.weight]["sigma"][0]) - 9.01) < 2.0


def _run(opt, p, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(3):
            (p * torch.randn(p.shape, generator=gen, dtype=torch.float64)).sum().backward()
        opt.step()


@pytest.mark.parametrize("noise", ["aligned", "langevin"])
def test_state_dict_round_trip_continues_bitwise(noise):
    p = _param((3, 4))
    opt = NAP([p], lr=0.05, rank=2, noise=noise, target="gradient", temperature=0.3, seed=42)
    _run(opt, p, 4, seed=0)
    sd = copy.deepcopy(opt.state_dict())  # torch's state_dict aliases live buffers
    p2 = nn.Parameter(p.detach().clone())
    opt2 = NAP([p2], lr=0.05, rank=2, noise=noise, target="gradient", temperature=0.3, seed=0)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["seed"] == 42
    assert opt2.state[p2]["U"].dtype == torch.float64
    _run(opt, p, 4, seed=1)
    _run(opt2, p2, 4, seed=1)
    assert torch.equal(p, p2)
    for k in ("U", "sigma", "exp_avg", "exp_avg_sq"):
        assert torch.equal(opt.state[p][k], opt2.state[p2][k]), k


def test_noise_is_a_function_of_seed_step_and_index():
    a = nap_noise_seed(1, 2, 3)
    assert a == nap_noise_seed(1, 2, 3) and len({a, nap_noise_seed(1, 2, 4), nap_noise_seed(1, 3, 3),
                                                 nap_noise_seed(2, 2, 3)}) == 4
    p1, p2 = _param((5,)), _param((5,))
    o1 = NAP([p1], lr=0.1, noise="langevin", target=None, preconditioner="identity", seed=9)
    o2 = NAP([p2], lr=0.1, noise="langevin", target=None, preconditioner="identity", seed=9)
    z = torch.zeros(5, dtype=torch.float64)
    torch.testing.assert_close(_increments(o1, p1, z, 3), _increments(o2, p2, z, 3), rtol=0, atol=0)
