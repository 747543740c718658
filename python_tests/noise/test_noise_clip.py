"""PSD clipping of noise residuals (SPEC §5) against dense eigen-projections, and the infeasible-mass accounting."""
from __future__ import annotations

import pytest
import torch

from pnekern.noise import LowRankDiag, psd_clip, psd_clip_diag, psd_clip_lowrank

f64 = torch.float64


def dense_projection(m: torch.Tensor) -> torch.Tensor:
    """Frobenius projection onto the PSD cone: V max(Λ, 0) Vᵀ."""
    lam, vec = torch.linalg.eigh(0.5 * (m + m.T))
    return (vec * lam.clamp(min=0)) @ vec.T


def min_eig(m: torch.Tensor) -> float:
    return float(torch.linalg.eigvalsh(0.5 * (m + m.T)).min())


@pytest.mark.parametrize("d", [1, 7, 33])
def test_diag_clip_is_the_exact_projection(d):
    g = torch.Generator().manual_seed(d)
    delta = torch.randn(d, generator=g, dtype=f64)
    clipped, mass = psd_clip_diag(delta, d)
    dense = dense_projection(torch.diag(delta))
    torch.testing.assert_close(torch.diag(clipped), dense, rtol=0, atol=1e-14)
    assert float(mass) == pytest.approx(float(torch.trace(dense) - delta.sum()), rel=1e-12, abs=1e-14)
    assert float(mass) == pytest.approx(float((-delta).clamp(min=0).sum()), rel=1e-12, abs=1e-14)


def test_isotropic_diag_mass_counts_every_element():
    clipped, mass = psd_clip_diag(torch.tensor(-0.5, dtype=f64), 12)
    assert float(clipped) == 0.0
    assert float(mass) == pytest.approx(6.0)


@pytest.mark.parametrize("d,k", [(10, 4), (7, 7), (5, 9), (65, 3)])
def test_lowrank_clip_matches_dense_projection_without_diagonal(d, k):
    # Pure low rank (δ = 0): the small-core eigen-clip is the exact PSD projection.
    g = torch.Generator().manual_seed(100 * d + k)
    u = torch.randn(d, k, generator=g, dtype=f64)
    s = torch.randn(k, generator=g, dtype=f64)
    r = LowRankDiag(d, torch.zeros(d, dtype=f64), u, s)
    clipped, mass = psd_clip_lowrank(r)
    dense = dense_projection(r.dense())
    torch.testing.assert_close(clipped.dense(), dense, rtol=1e-10, atol=1e-10)
    # Infeasible mass = tr R⁺ − tr R = |sum of negative eigenvalues|.
    neg = torch.linalg.eigvalsh(r.dense()).clamp(max=0).sum().abs()
    assert float(mass) == pytest.approx(float(neg), rel=1e-9, abs=1e-10)
    assert float(mass) == pytest.approx(float(clipped.trace() - r.trace()), rel=1e-9, abs=1e-10)
    # The clipped basis is orthonormal and its eigenvalues are >= 0.
    b = clipped.basis
    torch.testing.assert_close(b.T @ b, torch.eye(b.shape[1], dtype=f64), rtol=0, atol=1e-10)
    assert bool((clipped.eig >= 0).all())


def test_lowrank_residual_target_minus_measured():
    # R = (U_t S_t U_tᵀ + D_t) − (U_s S_s U_sᵀ + D_s): joint basis [U_t, U_s], indefinite core.
    d = 12
    g = torch.Generator().manual_seed(5)
    ut, us = torch.randn(d, 3, generator=g, dtype=f64), torch.randn(d, 2, generator=g, dtype=f64)
    target = LowRankDiag(d, torch.rand(d, generator=g, dtype=f64), ut, torch.rand(3, generator=g, dtype=f64) + 0.1)
    measured = LowRankDiag(d, torch.rand(d, generator=g, dtype=f64), us, torch.rand(2, generator=g, dtype=f64) + 0.5)
    r = target.minus(measured)
    torch.testing.assert_close(r.dense(), target.dense() - measured.dense(), rtol=1e-12, atol=1e-12)
    clipped, mass = psd_clip(r)
    rp = clipped.dense()
    assert min_eig(rp) > -1e-10, "R⁺ must be PSD"
    assert min_eig(rp - r.dense()) > -1e-10, "R⁺ ⪰ R: the clip never injects less than asked"
    assert float(mass) == pytest.approx(float(torch.trace(rp - r.dense())), rel=1e-10, abs=1e-12)
    # tr of the negative part is subadditive: our mass bounds the exact projection's from above.
    exact = float(torch.trace(dense_projection(r.dense()) - r.dense()))
    assert float(mass) >= exact - 1e-10
    # With the low-rank part restricted to its span and δ = 0, it is the exact projection (checked above);
    # here the diagonal remainder is clipped on its own.
    low = LowRankDiag(d, torch.zeros(d, dtype=f64), r.basis, r.eig)
    low_clipped, _ = psd_clip_lowrank(low)
    torch.testing.assert_close(rp, low_clipped.dense() + torch.diag(r.diag.clamp(min=0)), rtol=1e-10, atol=1e-10)


def test_feasible_residual_is_unchanged():
    d = 9
    g = torch.Generator().manual_seed(2)
    r = LowRankDiag(d, torch.rand(d, generator=g, dtype=f64), torch.randn(d, 2, generator=g, dtype=f64),
                    torch.rand(2, generator=g, dtype=f64))
    clipped, mass = psd_clip(r)
    torch.testing.assert_close(clipped.dense(), r.dense(), rtol=1e-10, atol=1e-12)
    assert abs(float(mass)) < 1e-12


def test_precond_trace_matches_dense():
    d = 8
    g = torch.Generator().manual_seed(3)
    r = LowRankDiag(d, torch.rand(d, generator=g, dtype=f64), torch.randn(d, 3, generator=g, dtype=f64),
                    torch.rand(3, generator=g, dtype=f64))
    a = torch.rand(d, generator=g, dtype=f64) + 0.5
    dense = torch.diag(a) @ r.dense() @ torch.diag(a)
    assert float(r.precond_trace(a)) == pytest.approx(float(torch.trace(dense)), rel=1e-12)
    iso = LowRankDiag(d, torch.tensor(0.3, dtype=f64))
    assert float(iso.precond_trace(a)) == pytest.approx(0.3 * float((a * a).sum()), rel=1e-12)
