"""Cross-check of the diag statistics against BackPACK's ``SumGradSquared`` and ``Variance`` (optional dependency).

BackPACK's wheel depends on torchvision, whose pins would replace the installed torch, so it is not in the test
extra. Install it without dependencies to run this file:
``pip install --no-deps backpack-for-pytorch einops unfoldNd``.

Conventions (N examples, a mean-reduced loss, one example per micro-batch so x_n = ∇ℓ_n / N):
* our diag buffer Σ_n x_n² equals BackPACK's ``sum_grad_squared`` exactly;
* BackPACK's ``variance`` is (1/N)Σ x_n² − ((1/N)Σ x_n)²; our per-element Σ_step (the covariance of the mean gradient,
  SPEC §2) is N/(N−1)·(Σ x_n² − (Σ x_n)²/N) = N²/(N−1) · variance, and ``trace_noise`` is its sum.
"""
from __future__ import annotations

import copy

import pytest
import torch

import pnekern

backpack = pytest.importorskip("backpack")
from backpack.extensions import SumGradSquared, Variance  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize("n", [2, 5, 8])
def test_diag_statistics_match_backpack(n):
    torch.manual_seed(n)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    x, y = torch.randn(n, 5, dtype=torch.float64), torch.randn(n, 3, dtype=torch.float64)

    bp_model = backpack.extend(copy.deepcopy(model))
    bp_loss = backpack.extend(torch.nn.MSELoss())
    with backpack.backpack(Variance(), SumGradSquared()):
        bp_loss(bp_model(x), y).backward()

    opt = pnekern.AdamW(model.parameters(), stats="diag", batch_size=n)
    for i in range(n):
        (torch.nn.functional.mse_loss(model(x[i:i + 1]), y[i:i + 1]) / n).backward()
    want_trace = 0.0
    for p, q in zip(model.parameters(), bp_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-15)
        sumsq = opt.noise_stats.sumsq_buffer(p).double()  # the buffer is fp32
        torch.testing.assert_close(sumsq, q.sum_grad_squared, rtol=1e-6, atol=1e-12)
        g = p.grad.double()
        sigma_ours = (sumsq - g * g / n) * (n / (n - 1.0))
        torch.testing.assert_close(sigma_ours, q.variance * (n * n / (n - 1.0)), rtol=1e-5, atol=1e-10)
        want_trace += float(q.variance.sum()) * n * n / (n - 1.0)
    opt.step()
    got = float(opt.last_stats().to_dict()["trace_noise"])
    assert got == pytest.approx(want_trace, rel=1e-5)
