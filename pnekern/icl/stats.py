"""Statistics for ICL sweeps: Spearman ρ with a bootstrap CI, TOST equivalence of two samples, Holm–Bonferroni.

scipy is used for the Student-t tail when importable (``backend="auto"``); otherwise a numpy implementation
(regularized incomplete beta by Lentz's continued fraction) gives the same numbers to ~1e-10. Pass
``backend="numpy"`` to force the fallback (the tests compare both).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np

__all__ = ["SpearmanResult", "TOSTResult", "rankdata", "student_t_sf", "spearman_with_ci", "tost_two_sample",
           "holm_bonferroni"]


def _have_scipy() -> bool:
    try:
        import scipy.special  # noqa: F401
        return True
    except ImportError:
        return False


def _use_scipy(backend: str) -> bool:
    if backend not in ("auto", "numpy", "scipy"):
        raise ValueError(f"backend must be 'auto', 'numpy' or 'scipy', got {backend!r}")
    if backend == "scipy" and not _have_scipy():
        raise ImportError("backend='scipy' requested but scipy is not installed")
    return backend == "scipy" or (backend == "auto" and _have_scipy())


def rankdata(a: Sequence[float]) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (scipy's ``method="average"``)."""
    x = np.asarray(a, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # boundaries of runs of equal values; each run gets the mean of the ranks it spans
    starts = np.r_[0, np.flatnonzero(np.diff(xs) != 0) + 1]
    ends = np.r_[starts[1:], len(xs)]
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks_sorted = np.repeat(avg, ends - starts)
    out = np.empty_like(ranks_sorted)
    out[order] = ranks_sorted
    return out


def _betainc_numpy(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) (Numerical Recipes §6.4, modified Lentz)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    ln_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # the continued fraction converges fast for x < (a+1)/(a+b+2); use the symmetry relation otherwise
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc_numpy(b, a, 1.0 - x)
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10000):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((a + m2 - 1) * (a + m2)), -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return math.exp(ln_front) * h / a


def student_t_sf(t: float, df: float, backend: str = "auto") -> float:
    """P(T > t) for Student's t with ``df`` degrees of freedom."""
    if _use_scipy(backend):
        from scipy import stats as sst
        return float(sst.t.sf(t, df))
    if math.isnan(t):
        return float("nan")
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * _betainc_numpy(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return tail if t >= 0 else 1.0 - tail


@dataclass
class SpearmanResult:
    """Spearman rank correlation ρ, two-sided p-value (t approximation, as scipy), percentile-bootstrap CI."""

    rho: float
    p_value: float
    ci_low: float
    ci_high: float
    n: int
    ci: float


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else float("nan")


def spearman_with_ci(x: Sequence[float], y: Sequence[float], n_boot: int = 2000, ci: float = 0.95, seed: int = 0,
                     backend: str = "auto") -> SpearmanResult:
    """Spearman ρ between paired samples with a seeded percentile-bootstrap CI over pairs.

    Resamples in which x or y is constant have no ρ and are dropped from the quantiles.
    """
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xa.shape != ya.shape or xa.ndim != 1:
        raise ValueError(f"x and y must be 1-D of equal length, got {xa.shape} and {ya.shape}")
    n = len(xa)
    if n < 3:
        raise ValueError(f"need at least 3 pairs, got {n}")
    rho = _pearson(rankdata(xa), rankdata(ya))
    df = n - 2
    if abs(rho) >= 1.0:
        p = 0.0
    else:
        t = rho * math.sqrt(df / (1 - rho * rho))
        p = 2 * student_t_sf(abs(t), df, backend)
    rng = np.random.default_rng(seed)
    boots = np.empty(n_boot)
    for i in range(n_boot):
        idx = rng.integers(0, n, n)
        boots[i] = _pearson(rankdata(xa[idx]), rankdata(ya[idx]))
    alpha = (1 - ci) / 2
    lo, hi = np.nanquantile(boots, [alpha, 1 - alpha])
    return SpearmanResult(rho, float(min(1.0, p)), float(lo), float(hi), n, ci)


@dataclass
class TOSTResult:
    """Two one-sided tests for equivalence of means: H0 diff ≤ low or diff ≥ upp, diff = mean(x) − mean(y).

    ``p_value = max(p_lower, p_upper)``; equivalence is declared at level α when p_value < α.
    """

    diff: float
    low: float
    upp: float
    t_lower: float
    t_upper: float
    df: float
    p_lower: float
    p_upper: float
    p_value: float

    def equivalent(self, alpha: float = 0.05) -> bool:
        return self.p_value < alpha


def tost_two_sample(x: Sequence[float], y: Sequence[float], low: float, upp: float, equal_var: bool = False,
                    backend: str = "auto") -> TOSTResult:
    """TOST for two independent samples (Welch's t by default, pooled variance with ``equal_var=True``).

    Args:
        low, upp: equivalence margins on mean(x) − mean(y), low < upp (same units as x).
    """
    if not low < upp:
        raise ValueError(f"low ({low}) must be < upp ({upp})")
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    nx, ny = len(xa), len(ya)
    if nx < 2 or ny < 2:
        raise ValueError(f"each sample needs >= 2 values, got {nx} and {ny}")
    vx, vy = xa.var(ddof=1), ya.var(ddof=1)
    if equal_var:
        df = nx + ny - 2
        sp = ((nx - 1) * vx + (ny - 1) * vy) / df
        se = math.sqrt(sp * (1 / nx + 1 / ny))
    else:
        a, b = vx / nx, vy / ny
        se = math.sqrt(a + b)
        df = (a + b) ** 2 / (a * a / (nx - 1) + b * b / (ny - 1))
    diff = float(xa.mean() - ya.mean())
    t_lo = (diff - low) / se
    t_up = (diff - upp) / se
    p_lo = student_t_sf(t_lo, df, backend)  # H0: diff <= low, reject for large t
    p_up = 1.0 - student_t_sf(t_up, df, backend)  # H0: diff >= upp, reject for small t
    return TOSTResult(diff, float(low), float(upp), t_lo, t_up, float(df), p_lo, p_up, max(p_lo, p_up))


def holm_bonferroni(p_values: Sequence[float], alpha: float = 0.05) -> Tuple[np.ndarray, np.ndarray]:
    """Holm's step-down correction for m tests.

    Returns:
        (reject [m] bool, adjusted p-values [m]) in the input order; adjusted p_(i) = max_{j≤i} min(1,
        (m − j + 1) p_(j)) over the sorted p-values, and reject = adjusted ≤ α (equivalent to Holm's sequential
        rule p_(i) ≤ α/(m − i + 1) until the first acceptance).
    """
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError("p_values must be 1-D")
    if np.any((p < 0) | (p > 1)):
        raise ValueError("p_values must lie in [0, 1]")
    m = len(p)
    order = np.argsort(p, kind="mergesort")
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adj_sorted = np.maximum.accumulate(scaled)
    adj = np.empty(m)
    adj[order] = adj_sorted
    return adj <= alpha, adj
