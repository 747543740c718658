"""The Philox-based noise sampler: covariance by Monte Carlo, reproducibility, independence from chunking."""
from __future__ import annotations

import math

import pytest
import torch

from pnekern.noise import LowRankDiag, lowrank_normals, sample_noise
from pnekern.reference.philox import philox_normal

f64 = torch.float64


def empirical_cov(draws: torch.Tensor) -> torch.Tensor:
    """(1/N) Σ ε εᵀ (the mean is known to be zero)."""
    x = draws.to(f64)
    return x.T @ x / x.shape[0]


def assert_cov_within(emp: torch.Tensor, true: torch.Tensor, n: int, z_diag: float = 3.0, z_off: float = 3.5) -> None:
    """Entrywise Monte Carlo bound: |Ĉ_ij − C_ij| ≤ z · SE_ij, SE_ij² = (C_ii C_jj + C_ij²)/N for Gaussian draws.

    Diagonal entries at 3 SE; off-diagonal ones at 3.5 SE (Bonferroni over ≤ 21 entries keeps the family-wise
    false-alarm rate below 1%).
    """
    d = true.shape[0]
    se = ((torch.outer(true.diagonal(), true.diagonal()) + true * true) / n).sqrt()
    z = (emp - true).abs() / se
    eye = torch.eye(d, dtype=torch.bool)
    assert float(z[eye].max()) < z_diag, f"diagonal off by {float(z[eye].max()):.2f} SE"
    if d > 1:
        assert float(z[~eye].max()) < z_off, f"off-diagonal off by {float(z[~eye].max()):.2f} SE"


def lowrank_cov(d=6, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, k, generator=g)
    s = torch.rand(k, generator=g) + 0.5
    delta = torch.rand(d, generator=g) * 0.3 + 0.05
    return LowRankDiag(d, delta, u, s)


def test_lowrank_plus_diag_covariance_monte_carlo():
    cov = lowrank_cov()
    n = 2000
    draws = torch.stack([sample_noise(cov, seed=11, step=t, tensor_idx=2) for t in range(n)])
    assert_cov_within(empirical_cov(draws), cov.dense().to(f64), n)
    # Zero mean: the grand mean has variance 1ᵀΣ1 / (d² N).
    se_mean = math.sqrt(float(cov.dense().to(f64).sum()) / cov.numel**2 / n)
    assert abs(float(draws.to(f64).mean())) < 3 * se_mean


def test_preconditioned_covariance_monte_carlo():
    # A(U S^{1/2} z_r + D^{1/2} z_d) has covariance A (U S Uᵀ + D) A.
    cov = lowrank_cov(d=5, k=3, seed=1)
    a = torch.tensor([0.5, 1.0, 2.0, 3.0, 0.25])
    n = 2000
    draws = torch.stack([a * sample_noise(cov, seed=3, step=t, tensor_idx=0) for t in range(n)])
    true = torch.diag(a.to(f64)) @ cov.dense().to(f64) @ torch.diag(a.to(f64))
    assert_cov_within(empirical_cov(draws), true, n)


def test_isotropic_and_diag_variance():
    n = 2000
    iso = LowRankDiag(4, torch.tensor(0.7))
    draws = torch.stack([sample_noise(iso, seed=5, step=t, tensor_idx=1) for t in range(n)])
    assert_cov_within(empirical_cov(draws), 0.7 * torch.eye(4, dtype=f64), n)


def test_stream_is_the_philox_contract():
    # Diagonal normals are elements 0..d-1 of tensor_idx's stream at `step`; low-rank ones follow at d..d+k-1.
    d, k = 9, 2
    cov = lowrank_cov(d, k, seed=2)
    eps = sample_noise(cov, seed=123, step=7, tensor_idx=4, dtype=f64)
    z_d = philox_normal(123, 7, 4, d).to(f64)
    z_r = philox_normal(123, 7, 4, k, offset=d).to(f64)
    torch.testing.assert_close(z_r, lowrank_normals(123, 7, 4, d, k).to(f64), rtol=0, atol=0)
    expected = cov.basis.to(f64) @ (cov.eig.to(f64).sqrt() * z_r) + cov.diag.to(f64).sqrt() * z_d
    torch.testing.assert_close(eps, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("numel", [1, 7, 1023])
def test_reproducible_and_independent_of_chunking(numel):
    g = torch.Generator().manual_seed(numel)
    cov = LowRankDiag(numel, torch.rand(numel, generator=g), torch.randn(numel, 2, generator=g), torch.rand(2, generator=g))
    full = sample_noise(cov, seed=2**40 + 3, step=5, tensor_idx=3)
    again = sample_noise(cov, seed=2**40 + 3, step=5, tensor_idx=3)
    assert torch.equal(full, again)
    for chunk in (1, 3, 64, numel, numel + 5):
        assert torch.equal(sample_noise(cov, seed=2**40 + 3, step=5, tensor_idx=3, chunk_elems=chunk), full), chunk
    # Every key component changes the draw.
    for kw in ({"seed": 2**40 + 4, "step": 5, "tensor_idx": 3}, {"seed": 2**40 + 3, "step": 6, "tensor_idx": 3},
               {"seed": 2**40 + 3, "step": 5, "tensor_idx": 2}):
        assert not torch.equal(sample_noise(cov, **kw), full), kw


def test_chunk_elems_must_be_positive():
    with pytest.raises(ValueError, match="chunk_elems"):
        sample_noise(LowRankDiag(3, torch.tensor(1.0)), 0, 0, 0, chunk_elems=0)
