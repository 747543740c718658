"""local_entropy (Entropy-SGD's local entropy by thermodynamic integration over MALA chains) vs closed forms.

For least squares, L(w) = mean((Xw − y)²) is exactly quadratic with H = 2XᵀX/N, so
LE(w) = −½ Σ log(1 + h_i/γ) + (β/2) gᵀ(H + γI)⁻¹g with g = H(w − w*).
Over 20 seeds at the minimum the z-scores had mean −0.05 and std 1.25 (the batch-means error bar is ~25% small),
so the tolerance is 4 standard errors.
"""
from __future__ import annotations

import pytest
import torch

from pnekern.probes import local_entropy

F64 = torch.float64


def _least_squares(d=6, n=40, spread=(0.3, 2.0), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64) * torch.linspace(*spread, d, dtype=F64)
    y = torch.randn(n, 1, generator=g, dtype=F64)
    model = torch.nn.Linear(d, 1, bias=False).to(F64)
    w_star = torch.linalg.lstsq(x, y).solution.reshape(-1)
    hess = 2.0 * x.T @ x / n
    return model, (x, y), w_star, hess


def _exact(hess, grad, gamma, beta):
    h = torch.linalg.eigvalsh(hess)
    eye = torch.eye(hess.shape[0], dtype=F64)
    return float(-0.5 * torch.log1p(h / gamma).sum() + 0.5 * beta * grad @ torch.linalg.solve(hess + gamma * eye, grad))


@pytest.mark.parametrize("offset,beta", [(0.0, 1.0), (0.3, 2.0)])
def test_matches_the_quadratic_closed_form(offset, beta):
    model, batch, w_star, hess = _least_squares()
    with torch.no_grad():
        model.weight.copy_((w_star + offset).reshape(1, -1))
    w = model.weight.detach().reshape(-1).clone()
    gamma = 1.0
    want = _exact(hess, hess @ (w - w_star), gamma, beta)
    est = local_entropy(model, torch.nn.MSELoss(), batch, gamma=gamma, beta=beta, num_steps=1000, burn_in=200,
                        generator=torch.Generator().manual_seed(3))
    assert 0 < est.stderr < 0.03 * abs(want) + 0.02
    assert abs(est.value - want) < 4 * est.stderr, (est.value, want, est.stderr)
    assert all(0.2 < a < 0.95 for a in est.metadata["acceptance"])
    assert torch.equal(model.weight.detach().reshape(-1), w)  # the model is untouched


def test_sharper_basin_has_lower_local_entropy():
    flat_model, flat_batch, w_flat, h_flat = _least_squares(spread=(0.2, 0.5))
    sharp_model, sharp_batch, w_sharp, h_sharp = _least_squares(spread=(1.0, 3.0))
    for m, w in ((flat_model, w_flat), (sharp_model, w_sharp)):
        with torch.no_grad():
            m.weight.copy_(w.reshape(1, -1))
    flat = local_entropy(flat_model, torch.nn.MSELoss(), flat_batch, gamma=1.0, generator=torch.Generator().manual_seed(0))
    sharp = local_entropy(sharp_model, torch.nn.MSELoss(), sharp_batch, gamma=1.0,
                          generator=torch.Generator().manual_seed(0))
    assert sharp.value + 4 * sharp.stderr < flat.value
    assert flat.value < 0.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(gamma=0.0), "gamma"), (dict(gamma=1.0, beta=-1.0), "beta"), (dict(gamma=1.0, num_steps=5), "num_steps"),
    (dict(gamma=1.0, num_lambdas=0), "num_lambdas"), (dict(gamma=1.0, burn_in=-1), "burn_in"),
    (dict(gamma=1.0, step_size=float("nan")), "step_size"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    model, batch, _, _ = _least_squares()
    with pytest.raises(ValueError, match=match):
        local_entropy(model, torch.nn.MSELoss(), batch, **kwargs)
