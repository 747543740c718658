"""Randomised trace, diagonal and extreme-eigenvalue estimators for symmetric operators given by products.

Each estimator accepts a :class:`CurvatureOperator`, a plain callable ``v -> M v`` plus ``dim=`` or an explicit matrix,
draws every random vector from a ``torch.Generator`` (default: a fresh CPU generator seeded with 0, so the global torch
RNG is never consumed), streams probes one at a time (only Hutch++/XTrace keep a d×(m/3) or d×(m/2) sketch, Lanczos
its Krylov basis), and returns an :class:`Estimate`.

Units: for M in nats/θ² the trace and eigenvalues are in nats/θ² (trace: summed over the d coordinates), the
diagonal in nats/θ² per coordinate; a preconditioned trace Tr(A M A) carries the units of a² · M.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ._operators import CurvatureOperator, as_operator, flatten_tensors

__all__ = [
    "Estimate",
    "quadratic_samples",
    "weighted_operator",
    "hutchinson_trace",
    "hutchpp_trace",
    "xtrace",
    "hutchinson_diag",
    "precond_trace",
    "top_eigenvalue",
    "rademacher",
]

OperatorLike = CurvatureOperator | Callable[[Tensor], Tensor] | Tensor


@dataclass
class Estimate:
    """Result of a randomised estimate.

    Attributes:
        value: the estimate (a float for traces/eigenvalues, a ``(dim,)`` tensor for diagonals).
        stderr: its standard error (same type/shape as ``value``); for eigenvalues, the residual bound
            ‖M u − λ u‖ on the distance from ``value`` to the nearest true eigenvalue.
        num_matvecs: operator products used.
        per_param: breakdown over parameter blocks (list aligned with ``op.params``) where the estimator's
            decomposition is itself unbiased per block, else None. Items are dicts with ``value``/``stderr``.
        metadata: free-form details (method, probe distribution, eigenvector, ...).
    """

    value: Any
    stderr: Any
    num_matvecs: int
    per_param: list[dict[str, Any]] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def _generator(generator: torch.Generator | None) -> torch.Generator:
    # A private seeded generator instead of the global one: estimates are reproducible and never perturb the
    # caller's RNG stream (training dropout, data order).
    return generator if generator is not None else torch.Generator().manual_seed(0)


def rademacher(dim: int, op: CurvatureOperator, generator: torch.Generator, cols: int | None = None) -> Tensor:
    """i.i.d. ±1 entries, shape ``(dim,)`` or ``(dim, cols)``, drawn on the generator's device, returned on op's."""
    shape = (dim,) if cols is None else (dim, cols)
    z = torch.randint(0, 2, shape, generator=generator, device=generator.device)
    return (2 * z - 1).to(dtype=op.dtype, device=op.device)


def _block_sums(x: Tensor, op: CurvatureOperator) -> Tensor:
    """Sum a ``(dim,)`` or ``(dim, k)`` array over each parameter block → ``(num_blocks,)`` or ``(num_blocks, k)``."""
    return torch.stack([c.sum(0) for c in torch.split(x, op.block_sizes)])


def _mean_stderr(samples: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and standard error over the last axis (unbiased sample std / sqrt(k); 0 for k = 1)."""
    k = samples.shape[-1]
    mean = samples.mean(-1)
    if k < 2:
        return mean, torch.zeros_like(mean)
    return mean, samples.std(-1, unbiased=True) / math.sqrt(k)


def _per_param(op: CurvatureOperator, samples: Tensor) -> list[dict[str, Any]] | None:
    if not op.params:
        return None
    mean, se = _mean_stderr(samples)
    return [{"value": float(m), "stderr": float(s)} for m, s in zip(mean.tolist(), se.tolist())]


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def quadratic_samples(
    op: CurvatureOperator, weight: Tensor | None, num_probes: int, generator: torch.Generator
) -> Tensor:
    """Per-block quadratic forms (w ⊙ z_j)ᵀ_b [M (w ⊙ z_j)]_b, Rademacher z_j, one product per probe, streamed.

    Returns a float64 ``(num_blocks, num_probes)`` tensor on ``op.device`` (summing over blocks gives the Hutchinson
    samples of Tr(W M W)); no host synchronisation.
    """
    _check_count("num_probes", num_probes, 1)
    blocks = torch.empty(len(op.block_sizes), num_probes, dtype=torch.float64, device=op.device)
    for j in range(num_probes):
        z = rademacher(op.dim, op, generator)
        u = z if weight is None else weight * z
        blocks[:, j] = _block_sums((u * op.matvec(u)).to(torch.float64), op)
    return blocks


def _weighted_quadratic_trace(
    op: CurvatureOperator, weight: Tensor | None, num_probes: int, generator: torch.Generator, method: str
) -> Estimate:
    """mean_j (w ⊙ z_j)ᵀ M (w ⊙ z_j) with Rademacher z_j (w = 1 if None), one product per probe, streamed."""
    start = op.num_matvecs
    blocks = quadratic_samples(op, weight, num_probes, generator)
    mean, se = _mean_stderr(blocks.sum(0))
    return Estimate(
        value=float(mean),
        stderr=float(se),
        num_matvecs=op.num_matvecs - start,
        per_param=_per_param(op, blocks),
        metadata={"method": method, "probes": "rademacher", "num_probes": num_probes},
    )


def hutchinson_trace(
    op: OperatorLike, num_probes: int = 64, generator: torch.Generator | None = None, dim: int | None = None
) -> Estimate:
    """Hutchinson's estimator t̂ = mean_j z_jᵀ M z_j, Rademacher z_j; stderr = sample std / sqrt(k).

    Per probe the variance is 2(‖M‖_F² − Σ M_ii²). ``per_param`` splits t̂ over parameter blocks: the block sums
    of z ⊙ Mz are unbiased for the traces of the diagonal blocks of M.
    """
    op = as_operator(op, dim)
    return _weighted_quadratic_trace(op, None, num_probes, _generator(generator), "hutchinson")


def _as_flat_weight(op: CurvatureOperator, a: Tensor | Sequence[Tensor]) -> Tensor:
    """A diagonal preconditioner given flat ``(dim,)`` or per-parameter (aligned with ``op.params``) → ``(dim,)``."""
    if isinstance(a, Tensor):
        flat = a.reshape(-1)
    else:
        a = list(a)
        if len(a) != len(op.block_sizes):
            raise ValueError(f"a has {len(a)} tensors but the operator has {len(op.block_sizes)} parameter blocks")
        for t, n in zip(a, op.block_sizes):
            if t.numel() != n:
                raise ValueError("a per-parameter tensor's size does not match its parameter")
        flat = flatten_tensors(a)
    if flat.numel() != op.dim:
        raise ValueError(f"a has {flat.numel()} elements, the operator acts on {op.dim}")
    return flat.to(dtype=op.dtype, device=op.device)


def precond_trace(
    op: OperatorLike,
    a: Tensor | Sequence[Tensor],
    num_probes: int = 64,
    generator: torch.Generator | None = None,
    dim: int | None = None,
) -> Estimate:
    """Tr(A M A), A = diag(a), as mean_j (A z_j)ᵀ M (A z_j): one product per probe, at v = A z_j.

    This has lower variance than Σ a_i² d̂_i from a diagonal estimate (it is plain Hutchinson on A M A, with per-probe
    variance 2(‖AMA‖_F² − Σ (a_i² M_ii)²)). ``a`` is a flat ``(dim,)`` vector or a list aligned with ``op.params``
    (e.g. an Adam preconditioner a_i = 1/(sqrt(v̂_i) + eps)).
    """
    op = as_operator(op, dim)
    return _weighted_quadratic_trace(op, _as_flat_weight(op, a), num_probes, _generator(generator), "precond_hutchinson")


def hutchinson_diag(
    op: OperatorLike, num_probes: int = 64, generator: torch.Generator | None = None, dim: int | None = None
) -> Estimate:
    """diag(M) ≈ mean_j z_j ⊙ M z_j (Rademacher); ``value``/``stderr`` are ``(dim,)`` tensors (per-element stderr).

    E[z_i (Mz)_i] = M_ii and Var = Σ_{k≠i} M_ik². Uses a running sum and sum of squares, so memory is O(dim).
    ``per_param`` holds the per-parameter views of value and stderr.
    """
    op = as_operator(op, dim)
    gen = _generator(generator)
    _check_count("num_probes", num_probes, 1)
    start = op.num_matvecs
    # Welford's update keeps the variance accurate when the mean dominates (|M_ii| ≫ off-diagonal mass).
    mean = torch.zeros(op.dim, dtype=op.dtype, device=op.device)
    m2 = torch.zeros_like(mean)
    for j in range(num_probes):
        z = rademacher(op.dim, op, gen)
        x = z * op.matvec(z)
        delta = x - mean
        mean += delta / (j + 1)
        m2 += delta * (x - mean)
    se = (m2 / (num_probes - 1) / num_probes).sqrt() if num_probes > 1 else torch.zeros_like(mean)
    per_param = (
        [{"value": v, "stderr": s} for v, s in zip(op.unflatten(mean), op.unflatten(se))] if op.params else None
    )
    return Estimate(
        value=mean,
        stderr=se,
        num_matvecs=op.num_matvecs - start,
        per_param=per_param,
        metadata={"method": "hutchinson_diag", "probes": "rademacher", "num_probes": num_probes},
    )


def _apply_columns(op: CurvatureOperator, x: Tensor) -> Tensor:
    """M X for X of shape ``(dim, k)``, one streamed product per column."""
    return torch.stack([op.matvec(x[:, j].contiguous()) for j in range(x.shape[1])], dim=1)


def hutchpp_core(op: CurvatureOperator, num_matvecs: int, generator: torch.Generator) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Hutch++ as 0-dim float64 device tensors (value, stderr) plus metadata; see :func:`hutchpp_trace`."""
    _check_count("num_matvecs", num_matvecs, 3)
    k = num_matvecs // 3
    n_res = num_matvecs - 2 * k
    s = rademacher(op.dim, op, generator, k)
    g = rademacher(op.dim, op, generator, n_res)
    q, _ = torch.linalg.qr(_apply_columns(op, s))
    t_top = (q * _apply_columns(op, q)).sum().to(torch.float64)
    g_res = g - q @ (q.T @ g)
    quad = (g_res * _apply_columns(op, g_res)).sum(0).to(torch.float64)
    mean, se = _mean_stderr(quad)
    return t_top + mean, se, {"method": "hutch++", "sketch_rank": k, "residual_probes": n_res, "low_rank_trace": t_top}


def hutchpp_trace(
    op: OperatorLike, num_matvecs: int = 60, generator: torch.Generator | None = None, dim: int | None = None
) -> Estimate:
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021): exact trace on a sketched top subspace + Hutchinson on the rest.

    With k = m//3: Q = orth(M S) for Rademacher S (d×k); t̂ = Tr(Qᵀ M Q) + mean_j g_jᵀ P M P g_j over m − 2k Rademacher
    g_j, P = I − QQᵀ. For PSD M with a decaying spectrum the error is O(1/m) instead of O(1/√m). The first term is
    exact given Q, so ``stderr`` is the Hutchinson stderr of the residual term (conditional on Q). Needs m ≥ 3.
    ``per_param`` is None: the projector mixes parameter blocks. Holds the d×k sketch.
    """
    op = as_operator(op, dim)
    start = op.num_matvecs
    value, se, meta = hutchpp_core(op, num_matvecs, _generator(generator))
    meta["low_rank_trace"] = float(meta["low_rank_trace"])
    return Estimate(value=float(value), stderr=float(se), num_matvecs=op.num_matvecs - start, metadata=meta)


def xtrace(
    op: OperatorLike, num_matvecs: int = 60, generator: torch.Generator | None = None, dim: int | None = None
) -> Estimate:
    """XTrace (Epperly, Tropp, Webber 2023): the exchangeable leave-one-out Hutch++ estimator and its error estimate.

    With m = num_matvecs // 2 test vectors Ω = [ω_1 … ω_m] (Rademacher), Y = MΩ, and for each i
    Q_(i) = orth(Y without column i):  t̂_i = Tr(Q_(i)ᵀ M Q_(i)) + ω_iᵀ (I − Q_(i)Q_(i)ᵀ) M (I − Q_(i)Q_(i)ᵀ) ω_i.
    Each t̂_i is unbiased (ω_i is independent of Q_(i)); t̂ = mean_i t̂_i. Only 2m products are needed: with
    Y = QR and Z = MQ, Q_(i) = Q U_i for U_i = orth(R without column i), so every term reduces to m×m algebra on
    H = QᵀZ, R, W = QᵀΩ, T = ZᵀΩ and diag(ΩᵀY). The error estimate is the paper's std(t̂_i)/sqrt(m).
    """
    op = as_operator(op, dim)
    start = op.num_matvecs
    value, se, meta = xtrace_core(op, num_matvecs, _generator(generator))
    return Estimate(value=float(value), stderr=float(se), num_matvecs=op.num_matvecs - start, metadata=meta)


def xtrace_core(op: CurvatureOperator, num_matvecs: int, generator: torch.Generator) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """XTrace as 0-dim float64 device tensors (value, stderr) plus metadata; see :func:`xtrace`."""
    _check_count("num_matvecs", num_matvecs, 4)
    m = num_matvecs // 2
    gen = generator
    omega = rademacher(op.dim, op, gen, m)
    y = _apply_columns(op, omega)
    q, r = torch.linalg.qr(y)
    z = _apply_columns(op, q)
    h = q.T @ z
    h = 0.5 * (h + h.T)  # M is symmetric; symmetrising removes round-off asymmetry from the small algebra
    w = q.T @ omega  # (m, m)
    t = z.T @ omega  # (m, m): column i is Zᵀ ω_i = Qᵀ M ω_i
    omega_y = (omega * y).sum(0)  # ω_iᵀ M ω_i
    ests = torch.empty(m, dtype=op.dtype, device=op.device)
    for i in range(m):
        keep = [j for j in range(m) if j != i]
        u, _ = torch.linalg.qr(r[:, keep])  # (m, m-1): basis of range(Q_(i)) in Q coordinates
        proj = u @ u.T  # Q_(i)Q_(i)ᵀ in Q coordinates
        wi, ti, ri = w[:, i], t[:, i], r[:, i]
        pw = proj @ wi
        # ω_iᵀ(I−P)M(I−P)ω_i = ω_iᵀMω_i − 2 ω_iᵀ Z U Uᵀ w_i + w_iᵀ UUᵀ H UUᵀ w_i, using symmetric M (Qᵀy_i = r_i
        # and Zᵀω_i = t_i both equal QᵀMω_i).
        resid = omega_y[i] - ti @ pw - pw @ ri + pw @ (h @ pw)
        ests[i] = torch.trace(u.T @ h @ u) + resid
    mean, se = _mean_stderr(ests.to(torch.float64))
    return mean, se, {"method": "xtrace", "test_vectors": m, "probes": "rademacher"}




def weighted_operator(op: OperatorLike, a: Tensor | Sequence[Tensor], dim: int | None = None) -> CurvatureOperator:
    """The operator v ↦ A M A v, A = diag(a) (``a`` flat ``(dim,)`` or per-parameter), sharing ``op``'s layout.

    Lets Hutch++/XTrace/Lanczos estimate Tr(A M A) or its spectrum; products are counted on the returned operator.
    """
    base = as_operator(op, dim)
    w = _as_flat_weight(base, a)
    return CurvatureOperator(
        lambda v: w * base.matvec(w * v), base.dim, base.dtype, base.device, params=base.params or None,
        shapes=base.shapes, name=f"A·{base.name}·A",
    )


def top_eigenvalue(
    op: OperatorLike,
    method: str = "lanczos",
    num_iters: int = 30,
    a: Tensor | Sequence[Tensor] | None = None,
    generator: torch.Generator | None = None,
    dim: int | None = None,
    tol: float = 0.0,
) -> Estimate:
    """Top eigenvalue of M, or of A^{1/2} M A^{1/2} (A = diag(a), a ≥ 0) when ``a`` is given.

    The preconditioned eigenvalue governs the stability of preconditioned gradient descent (Adam diverges along a
    direction when η λ_max(A^{1/2} H A^{1/2}) exceeds (2+2β1)/(1−β1)). Methods:

    - ``"power"``: power iteration; converges to the eigenvalue of largest *magnitude* (which is λ_max for a PSD
      operator such as the GGN), at rate |λ_2/λ_1| per product.
    - ``"lanczos"``: Lanczos with full re-orthogonalisation (keeps the ≤ num_iters Krylov vectors), returning the
      algebraically largest Ritz value; much faster convergence and correct for indefinite Hessians.

    ``stderr`` holds the residual norm ‖M u − λ u‖ (with u the unit Ritz/power vector), which bounds the distance
    from ``value`` to the spectrum; ``metadata["eigenvector"]`` is u (flat, in the A^{1/2}-transformed coordinates).
    Stops early when the residual falls below ``tol`` · |λ|.
    """
    base = as_operator(op, dim)
    gen = _generator(generator)
    _check_count("num_iters", num_iters, 1)
    start = base.num_matvecs
    if a is not None:
        a_flat = _as_flat_weight(base, a)
        if bool((a_flat < 0).any()):
            raise ValueError("the preconditioner a must be non-negative (A^{1/2} is taken)")
        sqrt_a = a_flat.sqrt()

        def apply(v: Tensor) -> Tensor:
            return sqrt_a * base.matvec(sqrt_a * v)
    else:
        apply = base.matvec
    v = torch.randn(base.dim, generator=gen, device=gen.device).to(dtype=base.dtype, device=base.device)
    v = v / v.norm()
    if method == "power":
        lam = torch.zeros((), dtype=base.dtype, device=base.device)
        resid = torch.full((), float("inf"), dtype=base.dtype)
        mv = apply(v)
        for _ in range(num_iters):
            lam = v @ mv
            resid = (mv - lam * v).norm()
            if tol > 0 and float(resid) <= tol * abs(float(lam)):
                break
            nrm = mv.norm()
            if float(nrm) == 0.0:
                break
            v = mv / nrm
            mv = apply(v)
        lam = v @ mv
        resid = (mv - lam * v).norm()
        value, err, vec = float(lam), float(resid), v
    elif method == "lanczos":
        basis = [v]
        alphas: list[Tensor] = []
        betas: list[Tensor] = []
        value, err, vec = 0.0, float("inf"), v
        for k in range(min(num_iters, base.dim)):
            wv = apply(basis[k])
            alpha = basis[k] @ wv
            alphas.append(alpha)
            vmat = torch.stack(basis, dim=1)
            # Full re-orthogonalisation (twice is enough) keeps Ritz values free of spurious copies.
            wv = wv - vmat @ (vmat.T @ wv)
            wv = wv - vmat @ (vmat.T @ wv)
            beta = wv.norm()
            tri = torch.diag(torch.stack(alphas))
            if betas:
                off = torch.stack(betas)
                tri = tri + torch.diag(off, 1) + torch.diag(off, -1)
            evals, evecs = torch.linalg.eigh(tri)
            value = float(evals[-1])
            # Residual of the top Ritz pair: |β_k · s_last| (standard Lanczos identity).
            err = float(beta * evecs[-1, -1].abs())
            vec = vmat @ evecs[:, -1]
            if float(beta) <= 1e3 * torch.finfo(base.dtype).eps * max(1.0, abs(value)):
                break  # invariant subspace found: Ritz values are exact eigenvalues
            if tol > 0 and err <= tol * abs(value):
                break
            betas.append(beta)
            basis.append(wv / beta)
    else:
        raise ValueError(f"method must be 'power' or 'lanczos', got {method!r}")
    return Estimate(
        value=value,
        stderr=err,
        num_matvecs=base.num_matvecs - start,
        metadata={"method": method, "eigenvector": vec, "preconditioned": a is not None},
    )
