"""Gaussian noise ε ~ N(0, U diag(s) Uᵀ + diag(δ)) from the pnekern Philox stream (SPEC §5, STYLE practice 10).

ε = U (s^{1/2} ⊙ z_r) + δ^{1/2} ⊙ z_d with z from :func:`pnekern.reference.philox.philox_normal` keyed by
(seed, step, tensor index, element index):

* z_d[e] is element e (0 ≤ e < d) of tensor ``tensor_idx``'s stream at ``step``;
* z_r[j] is element d + j of the same stream (indices past the tensor's own elements), so the k low-rank normals
  never collide with the diagonal ones and every backend can draw them without coordination.

Because each normal depends only on its global element index, the result does not depend on how the elements are
split into chunks (``chunk_elems``), blocks or devices.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..reference.philox import philox_normal
from .covariance import LowRankDiag

__all__ = ["sample_noise", "lowrank_normals"]


def lowrank_normals(seed: int, step: int, tensor_idx: int, numel: int, rank: int, device=None) -> Tensor:
    """z_r: the ``rank`` standard normals of the low-rank part (stream elements numel .. numel+rank−1), fp32."""
    return philox_normal(seed, step, tensor_idx, rank, device=device, offset=numel)


def sample_noise(
    cov: LowRankDiag,
    seed: int,
    step: int,
    tensor_idx: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    chunk_elems: int | None = None,
) -> Tensor:
    """One draw ε ~ N(0, Σ) with Σ = ``cov`` (must be PSD: clip residuals first).

    Args:
        cov: the covariance over d = ``cov.numel`` elements [g²].
        seed: uint64 noise seed. step: the noise counter (uint32). tensor_idx: the parameter's index (uint32).
        device: where ε lives (default: the covariance's device). dtype: ε's dtype (math in fp32 or fp64).
        chunk_elems: draw the diagonal normals ``chunk_elems`` at a time (bounds the Philox temporaries); the
            result is bitwise identical for every chunk size.
    Returns:
        ε, tensor [d] of ``dtype`` [g].
    """
    d = cov.numel
    device = cov.diag.device if device is None else torch.device(device)
    if chunk_elems is not None and chunk_elems < 1:
        raise ValueError(f"chunk_elems={chunk_elems!r} must be a positive int or None")
    chunk = d if not chunk_elems else int(chunk_elems)
    k = cov.rank
    basis = coef = None
    if k > 0:
        basis = cov.basis.to(device)
        if chunk >= d:
            # One Philox call for the whole stream: z_d = elements [0, d), z_r = elements [d, d + k).
            z_all = philox_normal(seed, step, tensor_idx, d + k, device=device)
            z_first, z_r = z_all[:d], z_all[d:]
        else:
            z_first, z_r = None, lowrank_normals(seed, step, tensor_idx, d, k, device=device)
        coef = (cov.eig.to(device=device, dtype=torch.float64).clamp(min=0.0).sqrt() * z_r.to(torch.float64))
        coef = coef.to(basis.dtype).tolist() if device.type == "cpu" else coef.to(basis.dtype)
    else:
        z_first = philox_normal(seed, step, tensor_idx, d, device=device) if chunk >= d else None
    out = torch.empty(d, dtype=dtype, device=device)
    iso = cov.diag.dim() == 0
    sd_iso = cov.diag.to(device).clamp(min=0.0).sqrt() if iso else None
    for start in range(0, d, chunk):
        n = min(chunk, d - start)
        z = z_first if z_first is not None else philox_normal(seed, step, tensor_idx, n, device=device, offset=start)
        sd = sd_iso if iso else cov.diag[start : start + n].to(device).clamp(min=0.0).sqrt()
        piece = z.to(sd.dtype) * sd
        if basis is not None:
            # Column by column (not a matmul): each element's sum has a fixed order, so chunking is bitwise neutral.
            rows = basis[start : start + n]
            for j in range(k):
                piece = piece + (rows[:, j] * coef[j]).to(piece.dtype)
        out[start : start + n] = piece.to(dtype)
    return out
