"""Curvature summaries that need no matrix-vector product: sampled-label GGN trace, SAM sharpness, Gaussian flatness.

All evaluate the model through :func:`torch.func.functional_call` on separate parameter tensors (see
:mod:`pnekern.probes._operators`): the model's parameters, ``param.grad``, tensor hooks, train/eval mode and the
caller's RNG stream are left exactly as they were. Losses are in the criterion's units (nats for cross-entropy),
parameters in units θ.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ._estimators import Estimate, _as_flat_weight, _check_count, _generator, _mean_stderr
from ._operators import (
    CurvatureOperator,
    ForwardFn,
    _ce_flat_logits,
    _ce_row_weights,
    _ce_unflatten,
    _ModelEval,
    _mse_scale,
    flatten_tensors,
    infer_loss_kind,
    unflatten_vector,
)

__all__ = ["sampled_label_ggn_trace", "sampled_label_samples", "sam_sharpness", "perturbation_sharpness", "local_entropy"]


def _uniform(shape: Sequence[int], like: Tensor, generator: torch.Generator) -> Tensor:
    u = torch.rand(tuple(shape), generator=generator, device=generator.device, dtype=torch.float64)
    return u.to(device=like.device)


def _normal(shape: Sequence[int], like: Tensor, generator: torch.Generator) -> Tensor:
    z = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float64)
    return z.to(device=like.device)


def _onehot(idx: Tensor, like: Tensor) -> Tensor:
    """Rows e_idx shaped like ``like`` (M, C); scatter instead of F.one_hot, whose range check syncs on CUDA."""
    return torch.zeros_like(like).scatter_(-1, idx.reshape(-1, 1).to(like.device), 1.0)


class _LabelCotangent:
    """u = √w ⊙ ∂ℓ/∂f with labels drawn from the model (labels="model") or the true targets (labels="true").

    Writing the loss as Σ_m w_m ℓ_m(f_m) (m over likelihood terms: rows for cross-entropy, elements for MSE) with
    Λ_m = ∇²ℓ_m = E_{ŷ~model}[∇ℓ_m ∇ℓ_mᵀ] (Fisher identity), the vector ĝ = Jᵀu has E[ĝĝᵀ] = Σ_m w_m J_mᵀΛ_m J_m = GGN
    because the terms are independent with zero mean. Everything that does not depend on the draw (softmax, weights)
    is computed once; ``draw`` returns a tensor shaped like ``out``.
    """

    def __init__(self, out: Tensor, targets: Any, loss_fn: Any, loss: str) -> None:
        self.f = out.detach()
        self.loss = loss
        self.targets = targets
        if loss == "ce":
            self.logits = _ce_flat_logits(self.f).to(torch.float64)
            self.sqrt_w = _ce_row_weights(self.f, targets, loss_fn).to(torch.float64).sqrt().unsqueeze(-1)
            self.p = torch.softmax(self.logits, dim=-1)
        else:
            self.s = _mse_scale(self.f, loss_fn)  # Λ = s I; per element ℓ = (f − y)², w = s/2, ∇ℓ = 2(f − y)

    def draw(self, labels: str, generator: torch.Generator) -> Tensor:
        f = self.f
        if self.loss == "ce":
            c = self.logits.shape[-1]
            if labels == "model":
                # Gumbel-max: an exact categorical draw without torch.multinomial's host round trip.
                gumbel = -torch.log(-torch.log(_uniform(self.logits.shape, f, generator).clamp_min(1e-300)))
                onehot = _onehot((self.logits + gumbel).argmax(-1), self.p)
            else:
                t = self.targets
                if not isinstance(t, Tensor):
                    raise ValueError("labels='true' needs tensor targets")
                if t.is_floating_point() and t.shape == f.shape:
                    onehot = _ce_flat_logits(t.detach()).to(torch.float64)  # class probabilities
                else:
                    idx = t.reshape(-1).clamp(0, c - 1)  # ignored rows have w = 0 anyway
                    onehot = _onehot(idx, self.p)
            return _ce_unflatten(self.sqrt_w * (self.p - onehot), f).to(f.dtype)
        if labels == "model":
            # y ~ N(f, ½) makes (f − y)² the negative log-likelihood up to a constant: √w·∇ℓ = √s · ε.
            return (math.sqrt(self.s) * _normal(f.shape, f, generator)).to(f.dtype)
        if not isinstance(self.targets, Tensor) or self.targets.shape != f.shape:
            raise ValueError("labels='true' with loss='mse' needs targets shaped like the model output")
        return (math.sqrt(2.0 * self.s) * (f - self.targets.detach())).to(f.dtype)


def sampled_label_samples(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    batch: Any,
    loss: str | None = None,
    a: Tensor | Sequence[Tensor] | None = None,
    num_samples: int = 16,
    labels: str = "model",
    generator: torch.Generator | None = None,
    params: Sequence[Tensor] | None = None,
    forward: ForwardFn | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Per-block samples ‖A_b ĝ_b‖² of the sampled-label estimator: float64 ``(num_blocks, num_samples)`` tensor on the
    parameters' device (no host synchronisation), plus the parameter list. See :func:`sampled_label_ggn_trace`."""
    loss = infer_loss_kind(loss_fn, loss)
    if labels not in ("model", "true"):
        raise ValueError(f"labels must be 'model' or 'true', got {labels!r}")
    _check_count("num_samples", num_samples, 1)
    ev = _ModelEval(model, loss_fn, batch, params, forward)
    gen = _generator(generator)
    layout = CurvatureOperator(lambda v: v, ev.dim, ev.dtype, ev.device, params=ev.plist)
    weight = None if a is None else _as_flat_weight(layout, a)
    theta = ev.leaves()
    with torch.enable_grad():
        out = ev.output(theta)
    if not isinstance(out, Tensor):
        raise ValueError(f"the model (or forward=) must return a tensor, got {type(out).__name__}")
    count = 1 if labels == "true" else num_samples  # true labels are deterministic: one sample says it all
    samples = torch.empty(len(ev.plist), count, dtype=torch.float64, device=ev.device)
    cotangent = _LabelCotangent(out, ev.targets, loss_fn, loss)
    for j in range(count):
        u = cotangent.draw(labels, gen)
        grads = torch.autograd.grad(out, theta, grad_outputs=u, retain_graph=j + 1 < count, allow_unused=True)
        g = flatten_tensors(ev.zeros_for_none(grads))
        if weight is not None:
            g = weight * g
        sq = (g.to(torch.float64) ** 2)
        samples[:, j] = torch.stack([c.sum() for c in torch.split(sq, layout.block_sizes)])
    return samples, ev.plist


def sampled_label_ggn_trace(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    batch: Any,
    loss: str | None = None,
    a: Tensor | Sequence[Tensor] | None = None,
    num_samples: int = 16,
    labels: str = "model",
    generator: torch.Generator | None = None,
    params: Sequence[Tensor] | None = None,
    forward: ForwardFn | None = None,
) -> Estimate:
    """Tr(A·GGN·A) from gradients with labels drawn from the model's predictive distribution (one backward each).

    For a mean-reduced loss over b likelihood terms, ḡ_ŷ = ∇L with labels ŷ ~ p_model satisfies
    E[b ‖A ḡ_ŷ‖²] = Tr(A G A) exactly (G = GGN = Fisher of the model's predictive distribution): the per-term
    gradients have zero mean under the model's own labels, so cross terms vanish. Implemented as one forward and
    one vector-Jacobian product per sample with the output cotangent √w ⊙ ∂ℓ/∂f (cross-entropy: categorical labels
    from softmax; MSE: Gaussian labels y ~ N(f, ½), the likelihood whose NLL is (f − y)²). ``value`` and ``stderr``
    are in the units of a² times the loss Hessian; ``per_param`` splits the trace over parameter blocks.

    With ``labels="true"`` the same statistic uses the dataset's labels: b‖A ḡ_y‖² is an empirical-Fisher-type
    quantity (plus the squared mean gradient), NOT an estimate of the GGN; it is offered to show the difference.

    Args:
        loss: "ce" or "mse" (None: inferred from ``nn.CrossEntropyLoss`` / ``nn.MSELoss``); ``loss_fn`` supplies the
            reduction (and ignore_index). Label smoothing does not affect the estimator (it uses the likelihood).
        a: diagonal preconditioner, flat ``(dim,)`` or per-parameter; None for A = I.
        num_samples: label draws (each one backward through the retained forward graph).
    """
    samples, plist = sampled_label_samples(
        model, loss_fn, batch, loss=loss, a=a, num_samples=num_samples, labels=labels, generator=generator,
        params=params, forward=forward,
    )
    mean, se = _mean_stderr(samples.sum(0))
    bmean, bse = _mean_stderr(samples)
    return Estimate(
        value=float(mean),
        stderr=float(se),
        num_matvecs=samples.shape[1],
        per_param=[{"value": float(m), "stderr": float(s)} for m, s in zip(bmean.tolist(), bse.tolist())],
        metadata={"method": "sampled_label", "labels": labels, "num_samples": samples.shape[1]},
    )


def sam_sharpness(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    batch: Any,
    rho: float = 0.05,
    params: Sequence[Tensor] | None = None,
    forward: ForwardFn | None = None,
) -> Estimate:
    """SAM sharpness S_ρ = L(θ + ρ g/‖g‖) − L(θ), g = ∇L(θ) on ``batch`` (Foret et al. 2021), in loss units.

    ρ is a Euclidean radius in parameter units θ. The perturbed loss is evaluated on a separate copy of the
    parameters (functional_call), so the model's parameters are bit-for-bit what they were (nothing is subtracted
    back), ``param.grad`` is untouched and both evaluations use the same RNG state (same dropout mask). For a
    quadratic loss S_ρ = ρ‖g‖ + ½ρ² ĝᵀHĝ exactly (ĝ = g/‖g‖). ``stderr`` is 0 (deterministic); ``metadata`` holds
    ``loss``, ``perturbed_loss`` and ``grad_norm``. A zero gradient gives S_ρ = 0 (the direction is undefined).
    """
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not (rho > 0 and math.isfinite(rho)):
        raise ValueError(f"rho must be a positive finite float, got {rho!r}")
    ev = _ModelEval(model, loss_fn, batch, params, forward)
    theta = ev.leaves()
    with torch.enable_grad():
        loss0 = ev.loss(theta)
        grads = torch.autograd.grad(loss0, theta, allow_unused=True)
    with torch.no_grad():
        g = flatten_tensors(ev.zeros_for_none(grads))
        gnorm = g.norm()
        scale = torch.where(gnorm > 0, rho / gnorm.clamp_min(torch.finfo(g.dtype).tiny), torch.zeros_like(gnorm))
        pert = [p.detach() + scale * d for p, d in zip(ev.plist, unflatten_vector(g, ev.shapes))]
        loss1 = ev.loss(pert)
        value = loss1.detach().to(torch.float64) - loss0.detach().to(torch.float64)
    return Estimate(
        value=float(value),
        stderr=0.0,
        num_matvecs=0,
        metadata={"method": "sam", "rho": float(rho), "loss": float(loss0.detach()), "perturbed_loss": float(loss1),
                  "grad_norm": float(gnorm)},
    )


def perturbation_sharpness(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    batch: Any,
    sigmas: Sequence[float] = (1e-3, 1e-2, 1e-1),
    num_samples: int = 16,
    generator: torch.Generator | None = None,
    params: Sequence[Tensor] | None = None,
    forward: ForwardFn | None = None,
) -> dict[float, Estimate]:
    """Average-case flatness: E_ε[L(θ + σε)] − L(θ), ε ~ N(0, I_d), at each radius σ (parameter units θ).

    For small σ this is ½σ² Tr(H) + O(σ⁴) (the linear term averages out; exactly ½σ² Tr(H) for a quadratic loss).
    Antithetic pairs ±ε are used (the odd-order terms, including the gradient term, cancel within a pair), so each
    sample costs two forwards. Returns ``{σ: Estimate}`` with loss-unit values and standard errors over the
    ``num_samples`` pairs.
    """
    _check_count("num_samples", num_samples, 1)
    sig = [float(s) for s in sigmas]
    if not sig or any(not (s > 0 and math.isfinite(s)) for s in sig):
        raise ValueError(f"sigmas must be a non-empty list of positive radii, got {sigmas!r}")
    ev = _ModelEval(model, loss_fn, batch, params, forward)
    gen = _generator(generator)
    out: dict[float, Estimate] = {}
    with torch.no_grad():
        base = [p.detach() for p in ev.plist]
        loss0 = ev.loss(base).to(torch.float64)
        for s in sig:
            vals = torch.empty(num_samples, dtype=torch.float64, device=ev.device)
            for j in range(num_samples):
                eps = torch.randn(ev.dim, generator=gen, device=gen.device, dtype=torch.float64)
                eps = eps.to(dtype=ev.dtype, device=ev.device)
                parts = unflatten_vector(eps, ev.shapes)
                lp = ev.loss([b + s * e for b, e in zip(base, parts)]).to(torch.float64)
                lm = ev.loss([b - s * e for b, e in zip(base, parts)]).to(torch.float64)
                vals[j] = 0.5 * (lp + lm) - loss0
            mean, se = _mean_stderr(vals)
            out[s] = Estimate(
                value=float(mean), stderr=float(se), num_matvecs=0,
                metadata={"method": "gaussian_perturbation", "sigma": s, "num_pairs": num_samples,
                          "loss": float(loss0)},
            )
    return out


def local_entropy(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    batch: Any,
    gamma: float,
    beta: float = 1.0,
    num_steps: int = 200,
    burn_in: int = 100,
    num_lambdas: int = 6,
    step_size: float | None = None,
    generator: torch.Generator | None = None,
    params: Sequence[Tensor] | None = None,
    forward: ForwardFn | None = None,
) -> Estimate:
    """Local entropy of Entropy-SGD (Chaudhari et al. 2017), relative to a flat loss, by short Langevin chains.

        LE(θ) = log E_{θ' ~ N(θ, I/(βγ))} exp(−β (L(θ') − L(θ)))          [nats; 0 for a flat loss]

    i.e. the log of the Gibbs partition function of Entropy-SGD's local measure minus that of a flat landscape.
    Larger (closer to 0) means a wider, flatter basin at scale 1/sqrt(βγ) θ. For a quadratic loss with gradient g
    and Hessian eigenvalues h_i, LE = −½ Σ log(1 + h_i/γ) + (β/2) gᵀ(H + γI)⁻¹g (the tests check this).

    Estimated by thermodynamic integration, LE = −∫₀¹ E_λ[β(L(θ') − L(θ))] dλ over the tilted measures
    p_λ(θ') ∝ exp(−λβ(L(θ') − L(θ)) − βγ/2 ‖θ' − θ‖²), at ``num_lambdas`` Gauss–Legendre nodes. Each node runs a
    Metropolis-adjusted Langevin chain (MALA: exact for any step size; the first node starts from an exact draw of the
    λ = 0 Gaussian, each later node where the previous one ended) with ``burn_in`` steps that adapt the step size
    toward 57% acceptance, then ``num_steps`` recorded steps. The standard error combines batch means of each chain
    (5 batches); the quadrature error is not included (it is small when λ ↦ E_λ varies slowly, i.e.
    h_i/γ of order 10 or less; raise ``num_lambdas`` for sharper basins). Cost: num_lambdas × (burn_in + num_steps)
    loss-and-gradient evaluations.

    Args:
        gamma: coupling γ > 0 [1/θ²] (Entropy-SGD's scope; the local measure's width is 1/sqrt(βγ)).
        beta: inverse temperature β > 0 [1/nats].
        step_size: initial MALA step h [θ²·β⁻¹·...]; default 0.1/(βγ).
    Returns:
        :class:`Estimate` with ``value`` = LE [nats] and ``stderr``; ``metadata`` has ``local_loss`` (E_1[L(θ')] − L(θ),
        nats), ``gibbs_mean_shift`` (‖E_1[θ'] − θ‖, θ; Entropy-SGD's gradient is γ(θ − E_1[θ'])), ``acceptance`` per
        node and the nodes/weights.
    """
    for name, v in (("gamma", gamma), ("beta", beta)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{name} must be a positive finite float, got {v!r}")
    _check_count("num_steps", num_steps, 10)
    _check_count("num_lambdas", num_lambdas, 1)
    if isinstance(burn_in, bool) or not isinstance(burn_in, int) or burn_in < 0:
        raise ValueError(f"burn_in must be an int >= 0, got {burn_in!r}")
    if step_size is not None and (isinstance(step_size, bool) or not isinstance(step_size, (int, float))
                                  or not (step_size > 0 and math.isfinite(step_size))):
        raise ValueError(f"step_size must be a positive finite float or None, got {step_size!r}")
    import numpy as np  # numpy is a run-time dependency; imported here to keep `import pnekern.probes` light

    ev = _ModelEval(model, loss_fn, batch, params, forward)
    gen = _generator(generator)
    nodes, weights = np.polynomial.legendre.leggauss(int(num_lambdas))
    nodes, weights = (nodes + 1.0) / 2.0, weights / 2.0  # [−1, 1] → [0, 1]
    theta = flatten_tensors([p.detach() for p in ev.plist]).to(torch.float64)
    bg = float(beta) * float(gamma)

    def loss_and_grad(x: Tensor) -> tuple[Tensor, Tensor]:
        leaves = [t.to(ev.dtype).requires_grad_(True) for t in unflatten_vector(x.to(ev.dtype), ev.shapes)]
        with torch.enable_grad():
            loss = ev.loss(leaves)
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        g = flatten_tensors([torch.zeros_like(t) if d is None else d for d, t in zip(grads, leaves)])
        return loss.detach().to(torch.float64), g.to(torch.float64)

    loss0, _ = loss_and_grad(theta)
    means, ses, accs = [], [], []
    local_loss = shift = None
    x_start: Tensor | None = None
    h_start = 0.0
    for lam in nodes.tolist():
        lb = lam * float(beta)

        def energy(l: Tensor, x: Tensor) -> Tensor:
            return lb * (l - loss0) + 0.5 * bg * (x - theta).square().sum()

        def grad_u(g: Tensor, x: Tensor) -> Tensor:
            return lb * g + bg * (x - theta)

        if x_start is None:
            # λ → 0 is the Gaussian N(θ, I/(βγ)): start from an exact draw of it; later (larger) λ start where the
            # previous chain ended, with its adapted step, so burn-in only has to cover the change in λ.
            z = torch.randn(theta.numel(), generator=gen, device=gen.device, dtype=torch.float64).to(theta.device)
            x_start = theta + z / math.sqrt(bg)
            h_start = float(step_size) if step_size is not None else 0.1 / bg
        x, h = x_start, h_start
        lx, gx = loss_and_grad(x)
        ux, gux = energy(lx, x), grad_u(gx, x)
        rec_u = torch.empty(num_steps, dtype=torch.float64)
        xsum = torch.zeros_like(theta)
        accepted = 0
        for it in range(burn_in + num_steps):
            noise = torch.randn(theta.numel(), generator=gen, device=gen.device, dtype=torch.float64).to(theta.device)
            y = x - h * gux + math.sqrt(2.0 * h) * noise
            ly, gy = loss_and_grad(y)
            uy, guy = energy(ly, y), grad_u(gy, y)
            # log q(x | y) − log q(y | x) for the Langevin proposal N(z − h ∇U(z), 2h I).
            log_q = -((x - y + h * guy).square().sum() - (y - x + h * gux).square().sum()) / (4.0 * h)
            log_a = float(ux - uy + log_q)
            u = torch.rand((), generator=gen, device=gen.device, dtype=torch.float64).item()
            ok = math.isfinite(log_a) and math.log(max(u, 1e-300)) < min(0.0, log_a)
            if ok:
                x, lx, gx, ux, gux = y, ly, gy, uy, guy
            if it < burn_in:
                # Robbins–Monro step-size adaptation toward 57% acceptance (burn-in only, so the recorded chain is
                # an exact MALA chain with a fixed step).
                h *= math.exp(((1.0 if ok else 0.0) - 0.574) / math.sqrt(it + 1.0))
            else:
                accepted += int(ok)
                rec_u[it - burn_in] = float(beta) * float(lx - loss0)
                xsum += x
        x_start, h_start = x, h
        nb = 5  # batch means of num_steps/5 steps: the chain is autocorrelated
        batch_means = rec_u[: (num_steps // nb) * nb].reshape(nb, -1).mean(1)
        mean, se = _mean_stderr(batch_means)
        means.append(float(rec_u.mean()))
        ses.append(float(se))
        accs.append(accepted / num_steps)
        local_loss = float(rec_u.mean()) / float(beta)
        shift = float((xsum / num_steps - theta).norm())
    value = -sum(w * m for w, m in zip(weights.tolist(), means))
    stderr = math.sqrt(sum((w * s) ** 2 for w, s in zip(weights.tolist(), ses)))
    return Estimate(
        value=float(value), stderr=float(stderr), num_matvecs=0,
        metadata={"method": "local_entropy_mala_ti", "gamma": float(gamma), "beta": float(beta),
                  "nodes": nodes.tolist(), "weights": weights.tolist(), "acceptance": accs,
                  "local_loss": local_loss, "gibbs_mean_shift": shift, "loss": float(loss0),
                  "num_evaluations": int(num_lambdas) * (burn_in + num_steps) + 1},
    )
