"""Covariances of one flattened parameter in "low-rank + diagonal" form, residuals and PSD clipping (SPEC §5).

Every covariance here is of the *step gradient* (units g², the gradient's units squared) of one parameter tensor
flattened to d elements: Σ = U diag(s) Uᵀ + diag(δ). The isotropic case keeps δ as a 0-dim tensor (no d-sized
memory). A residual R = Σ_target − Σ_step may be indefinite (s or δ with negative entries); :func:`psd_clip` turns it
into the PSD covariance that is actually injected and reports the infeasible mass tr R⁺ − tr R ≥ 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LowRankDiag", "psd_clip", "psd_clip_diag", "psd_clip_lowrank"]


@dataclass
class LowRankDiag:
    """Σ = U diag(s) Uᵀ + diag(δ) over ``numel`` elements (one flattened parameter).

    Attributes:
        numel: d, the number of elements.
        diag: δ, float tensor [d] or 0-dim (isotropic δ·I); units g².
        basis: U, float tensor [d, k] or None (pure diagonal). Columns need not be orthonormal.
        eig: s, float tensor [k] (may be negative in a residual) or None; units g² (with U's columns unit-less).
    """

    numel: int
    diag: Tensor
    basis: Tensor | None = None
    eig: Tensor | None = None

    @property
    def rank(self) -> int:
        """k, the number of low-rank directions (0 for a pure diagonal)."""
        return 0 if self.basis is None else int(self.basis.shape[1])

    def trace(self) -> Tensor:
        """tr Σ as a 0-dim float64 tensor [g²]."""
        d = self.diag.to(torch.float64)
        tr = d.sum() if d.dim() else d * self.numel
        if self.basis is not None:
            b = self.basis.to(torch.float64)
            tr = tr + ((b * b).sum(0) * self.eig.to(torch.float64)).sum()
        return tr

    def precond_trace(self, a: Tensor) -> Tensor:
        """Tr(A Σ A) for A = diag(a), ``a`` [d] (or any shape with d elements): 0-dim float64 [g²·a²]."""
        a2 = a.reshape(-1).to(torch.float64).square()
        d = self.diag.to(torch.float64)
        tr = (a2 * d).sum() if d.dim() else a2.sum() * d
        if self.basis is not None:
            b = self.basis.to(torch.float64)
            tr = tr + ((a2 @ (b * b)) * self.eig.to(torch.float64)).sum()
        return tr

    def diagonal(self) -> Tensor:
        """diag Σ as a [d] tensor (materialises the isotropic case)."""
        d = self.diag.expand(self.numel) if self.diag.dim() == 0 else self.diag
        if self.basis is None:
            return d.clone()
        return d + (self.basis * self.basis) @ self.eig.to(self.basis.dtype)

    def scaled(self, c: float | Tensor) -> "LowRankDiag":
        """c·Σ (c ≥ 0, a float or 0-dim tensor)."""
        return LowRankDiag(
            self.numel, self.diag * c, self.basis, None if self.eig is None else self.eig * c
        )

    def minus(self, other: "LowRankDiag") -> "LowRankDiag":
        """Σ_self − Σ_other as an (indefinite) low-rank + diagonal form with the joint basis [U_self, U_other]."""
        if other.numel != self.numel:
            raise ValueError(f"covariances over {self.numel} and {other.numel} elements cannot be subtracted")
        diag = self.diag - other.diag
        bases = [b for b in (self.basis, other.basis) if b is not None]
        if not bases:
            return LowRankDiag(self.numel, diag)
        dtype = torch.promote_types(bases[0].dtype, bases[-1].dtype)
        eigs = []
        if self.basis is not None:
            eigs.append(self.eig.to(dtype))
        if other.basis is not None:
            eigs.append(-other.eig.to(dtype))
        basis = torch.cat([b.to(dtype) for b in bases], dim=1)
        return LowRankDiag(self.numel, diag, basis, torch.cat(eigs))

    def dense(self) -> Tensor:
        """The d×d matrix (tests and small problems only)."""
        dtype = self.diag.dtype if self.basis is None else torch.promote_types(self.diag.dtype, self.basis.dtype)
        m = torch.diag(self.diag.to(dtype).expand(self.numel))
        if self.basis is not None:
            b = self.basis.to(dtype)
            m = m + b @ torch.diag(self.eig.to(dtype)) @ b.T
        return m


def psd_clip_diag(diag: Tensor, numel: int) -> tuple[Tensor, Tensor]:
    """Exact Frobenius projection of diag(δ) onto the PSD cone: [δ]₊.

    Args:
        diag: δ, [d] or 0-dim (isotropic).
        numel: d (counts the isotropic case's mass).
    Returns:
        ([δ]₊ with δ's shape and dtype, infeasible mass Σ([δ]₊ − δ) as a 0-dim float64 tensor ≥ 0).
    """
    clipped = diag.clamp(min=0.0)
    mass = (clipped - diag).to(torch.float64)
    mass = mass.sum() if mass.dim() else mass * numel
    return clipped, mass


def psd_clip_lowrank(cov: LowRankDiag) -> tuple[LowRankDiag, Tensor]:
    """SPEC §5 clip of U diag(s) Uᵀ + diag(δ): eigen-clip the low-rank part in its own basis, [·]₊ the diagonal.

    Orthonormalise the joint basis U = Q T (reduced QR, Q [d, k'] orthonormal), eigendecompose the small core
    T diag(s) Tᵀ = V Λ Vᵀ (k'×k', float64), keep max(Λ, 0) with basis Q V, and clip the diagonal remainder [δ]₊.
    The result R⁺ = (QV) Λ₊ (QV)ᵀ + diag([δ]₊) is PSD and R⁺ ⪰ R (never injects less than asked in any
    direction). It is the exact PSD projection when δ = 0 (pure low rank) or U is empty; otherwise the clipped mass
    tr R⁺ − tr R = Σ(Λ₊ − Λ) + Σ([δ]₊ − δ) is an upper bound of the exact projection's (tr of the negative part
    is subadditive).

    Returns:
        (clipped covariance with orthonormal basis [d, k'] and eig ≥ 0, infeasible mass 0-dim float64 ≥ 0).
    """
    diag, mass_d = psd_clip_diag(cov.diag, cov.numel)
    if cov.basis is None or cov.rank == 0:
        return LowRankDiag(cov.numel, diag), mass_d
    basis = cov.basis
    work = torch.float64
    q, t = torch.linalg.qr(basis.to(work), mode="reduced")
    core = (t * cov.eig.to(work)) @ t.T
    core = 0.5 * (core + core.T)
    lam, vec = torch.linalg.eigh(core)
    lam_pos = lam.clamp(min=0.0)
    mass = mass_d + (lam_pos - lam).sum()
    new_basis = (q @ vec).to(basis.dtype)
    return LowRankDiag(cov.numel, diag, new_basis, lam_pos.to(basis.dtype)), mass


def psd_clip(cov: LowRankDiag) -> tuple[LowRankDiag, Tensor]:
    """Clip a residual to PSD (:func:`psd_clip_diag` or :func:`psd_clip_lowrank`); returns (R⁺, tr R⁺ − tr R)."""
    if cov.basis is None:
        diag, mass = psd_clip_diag(cov.diag, cov.numel)
        return LowRankDiag(cov.numel, diag), mass
    return psd_clip_lowrank(cov)
