"""Tail index of the gradient noise: Mohammadi et al. (2015) estimator as used by Simsekli et al. (2019), SPEC §3.

For i.i.d. symmetric α-stable X_1..X_K split into K2 blocks of K1, the block sums Y_i satisfy
Y =ᵈ K1^{1/α} X, so 1/α̂ = (mean log|Y| − mean log|X|) / log K1. Two conditions make it mean something for
gradient noise, and both are easy to get wrong:
  * samples must be identically distributed: pooling coordinates of different scales makes the pool a scale mixture
    whose block sums look heavy-tailed even when every coordinate is Gaussian (α̂ far below 2). We standardize each
    coordinate by a scale estimated on *independent* data (the previous step or an EMA), never the same samples;
  * blocks must not follow memory order (neighbouring coordinates are correlated): samples are permuted first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TailIndexResult", "mohammadi_alpha", "standardized_deviations", "tail_index", "sample_symmetric_stable"]


@dataclass
class TailIndexResult:
    """α̂ with a bootstrap confidence interval. α = 2 is Gaussian; α < 2 heavy-tailed (infinite variance).

    Attributes:
        alpha: point estimate (clipped to (0, 2] when ``clip=True`` was asked).
        ci_low, ci_high: percentile bootstrap interval at level ``ci``.
        num_samples: samples used; block: K1 (samples per block).
    """

    alpha: float
    ci_low: float
    ci_high: float
    ci: float
    num_samples: int
    block: int


def _default_block(k: int) -> int:
    # K1 ≈ sqrt(K) balances the bias (small K1) against the variance of the K2 = K/K1 block means.
    return max(2, int(math.isqrt(k)))


def mohammadi_alpha(samples: Tensor, block: int | None = None, *, generator: torch.Generator | None = None,
                    permute: bool = True) -> Tensor:
    """Mohammadi's estimator of the stable index α from centred, identically scaled samples.

    Args:
        samples: [K] (any shape; flattened) real samples; trailing samples that do not fill a block are dropped.
        block: K1, samples per block (default ≈ sqrt(K)); needs K ≥ 2·K1.
        generator: RNG for the permutation.
        permute: shuffle before blocking (turn off only for samples already in random order).
    Returns:
        0-dim float64 tensor α̂ (not clipped; values slightly above 2 are estimation noise around Gaussian).
    """
    x = samples.detach().reshape(-1).to(torch.float64)
    x = x[torch.isfinite(x)]
    k = x.numel()
    k1 = _default_block(k) if block is None else int(block)
    if k1 < 2:
        raise ValueError(f"block={block!r} must be >= 2")
    k2 = k // k1
    if k2 < 2:
        raise ValueError(f"mohammadi_alpha needs at least 2 blocks: got {k} finite samples with block={k1}")
    if permute:
        perm = torch.randperm(k, generator=generator, device="cpu").to(x.device)
        x = x[perm]
    x = x[: k1 * k2]
    # |x| = 0 exactly would give −inf; it happens only with underflowed or padded samples, which carry no tail info.
    tiny = torch.finfo(torch.float64).tiny
    y = x.reshape(k2, k1).sum(dim=1)
    inv_alpha = (y.abs().clamp(min=tiny).log().mean() - x.abs().clamp(min=tiny).log().mean()) / math.log(k1)
    return 1.0 / inv_alpha


def standardized_deviations(contributions: Tensor, scale: Tensor, *, eps: float = 0.0) -> Tensor:
    """(x_k − x̄)/ŝ per coordinate, with the (n−1)/n shrinkage of deviations from the mean undone.

    Args:
        contributions: [n, d] micro-batch gradients of one step (n ≥ 2).
        scale: [d] standard deviation of one contribution estimated on independent data (previous step / EMA).
        eps: added to ``scale``; coordinates with zero scale are dropped.
    Returns:
        [n·m] standardized deviations (m = coordinates with positive scale), unit variance when the scale is right.
    """
    if contributions.dim() != 2 or contributions.shape[0] < 2:
        raise ValueError(f"contributions must be [n >= 2, d], got shape {tuple(contributions.shape)}")
    if scale.shape != contributions.shape[1:]:
        raise ValueError(f"scale must have shape [{contributions.shape[1]}], got {tuple(scale.shape)}")
    n = contributions.shape[0]
    x = contributions.to(torch.float64)
    s = scale.to(torch.float64) + eps
    keep = s > 0
    dev = (x - x.mean(dim=0, keepdim=True))[:, keep] / s[keep]
    return (dev * math.sqrt(n / (n - 1.0))).reshape(-1)


def tail_index(samples: Tensor, block: int | None = None, *, num_boot: int = 200, ci: float = 0.95, seed: int = 0,
               clip: bool = False) -> TailIndexResult:
    """α̂ (Mohammadi) with a percentile-bootstrap confidence interval (reads the result on the host).

    Args:
        samples: standardized samples (see :func:`standardized_deviations`), any shape.
        block: K1 (default ≈ sqrt(K)).
        num_boot: bootstrap resamples (0 disables the interval: ci_low = ci_high = NaN).
        ci: interval level in (0, 1).
        seed: seeds the permutation and the bootstrap.
        clip: clip α̂ and the interval to (0, 2].
    """
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci={ci!r} must be in (0, 1)")
    if num_boot < 0:
        raise ValueError(f"num_boot={num_boot!r} must be >= 0")
    x = samples.detach().reshape(-1).to(torch.float64)
    x = x[torch.isfinite(x)].cpu()
    g = torch.Generator().manual_seed(int(seed))
    k1 = _default_block(x.numel()) if block is None else int(block)
    alpha = float(mohammadi_alpha(x, k1, generator=g))
    lo = hi = math.nan
    if num_boot > 0:
        boots = []
        for _ in range(num_boot):
            idx = torch.randint(0, x.numel(), (x.numel(),), generator=g)
            boots.append(float(mohammadi_alpha(x[idx], k1, generator=g)))
        b = torch.tensor(boots, dtype=torch.float64)
        q = torch.quantile(b, torch.tensor([(1 - ci) / 2, (1 + ci) / 2], dtype=torch.float64))
        lo, hi = float(q[0]), float(q[1])
    if clip:
        alpha, lo, hi = (min(2.0, v) if math.isfinite(v) else v for v in (alpha, lo, hi))
    return TailIndexResult(alpha=alpha, ci_low=lo, ci_high=hi, ci=ci, num_samples=int(x.numel()), block=k1)


def sample_symmetric_stable(alpha: float, shape: tuple[int, ...] | int, *, generator: torch.Generator | None = None,
                            dtype: torch.dtype = torch.float64) -> Tensor:
    """Symmetric α-stable samples (unit scale) by Chambers–Mallows–Stuck; α = 2 gives N(0, 2).

    Used to validate the estimator; ``alpha`` in (0, 2].
    """
    if not 0.0 < alpha <= 2.0:
        raise ValueError(f"alpha={alpha!r} must be in (0, 2]")
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    u = (torch.rand(shape, generator=generator, dtype=torch.float64) - 0.5) * math.pi
    w = -torch.log1p(-torch.rand(shape, generator=generator, dtype=torch.float64))  # Exp(1), no log(0)
    if alpha == 1.0:
        x = torch.tan(u)
    else:
        x = (torch.sin(alpha * u) / torch.cos(u) ** (1.0 / alpha)) * (torch.cos(u - alpha * u) / w) ** ((1.0 - alpha) / alpha)
    return x.to(dtype)
