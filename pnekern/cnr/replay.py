"""Counterfactual Noise Replay: tangent and adjoint propagation along a recorded run (SPEC §7 with its [fix]es).

Linearized step t (θ_t → θ_{t+1}, ξ_t enters θ_{t+1}), with the optimizer state m (momentum / first moment):

    δm_t     = β_t ⊙ δm_{t−1} + γ_t ⊙ H'_t δθ_t              H'_t = H_t + wd_c I,  H_t = ∇²L_{b_t}(θ_t)
    δθ_{t+1} = ρ_t ⊙ δθ_t − c_t P_t ⊙ δm_t + δξ_t + ε_t · u_t

(the 2×2 block of SPEC §7; for plain SGD β = 0, γ = 1 and it reduces to M_t = I − η_t H'_t):

=================  ======  ========  ==========  ===============  ============  =====
optimizer          β_t     γ_t       ρ_t         c_t              P_t           wd_c
=================  ======  ========  ==========  ===============  ============  =====
SGD                0       1         1           η_t              I             wd
SGD + momentum μ   μ (0*)  1−d (1*)  1           η_t              I             wd
AdamW              β1      1−β1      1 − η_t wd  η_t/(1−β1^t)     A_t (frozen)  0
Adam               β1      1−β1      1           η_t/(1−β1^t)     A_t (frozen)  wd
=================  ======  ========  ==========  ===============  ============  =====

(*) at the step that creates torch's momentum buffer (buf = g). d = dampening. Nesterov and ``maximize`` are not
supported (ValueError). **Adam approximation**: P_t = A_t = diag(1/(sqrt(v̂_t)+eps)) is frozen — the dependence of
v̂ on the gradient is dropped, so Adam predictions are first-order in everything *except* v (documented, SPEC §7).
u_t = (θ_{t+1} − θ_t − ξ_t)/η_t is the update per unit learning rate (every supported update is linear in η_t), so
a relative learning-rate change η_t → η_t(1+ε_t) enters as ε_t · η_t u_t.

Adjoint (a_θ, a_m) with a_θ,T = ∇f(θ_T), a_m,T = 0, per step (one HVP):

    w = a_m − c_t P_t ⊙ a_θ,   a_θ ← ρ_t ⊙ a_θ + H'_t (γ_t ⊙ w),   a_m ← β_t ⊙ w

First order: δf ≈ Σ_t a_θ,t+1 · δξ_t (+ Σ_t ε_t a_θ,t+1 · η_t u_t). The adjoint sweep goes backwards one checkpoint
segment at a time: restore the checkpoint, recompute the segment forwards (θ_t and the coefficients, bitwise equal to
the run), then sweep it backwards — memory ≈ (segment length) × 6d floats plus the checkpoints.

Covariance change of the injected noise (Σ_t → Σ̃_t, zero mean): with probes p_j, signs s_j such that
Σ_j s_j p_j p_jᵀ = ∇²f(θ_T), propagated as adjoints a_j,t,

    ΔE f ≈ ½ Σ_t Σ_j s_j a_j,t+1ᵀ (Σ̃_t − Σ_t) a_j,t+1        (curvature term)

exact when the dynamics are affine and f is quadratic (SGD on a quadratic loss). The **mean-shift term** (the drift of
E θ_T caused by ∇³L acting on the changed covariance) vanishes only for quadratic losses and is *not* computed
here: results carry ``mean_shift="omitted"``.

Exactness: for SGD (with or without momentum) on a quadratic loss the dynamics are affine in θ, so the tangent δθ_T
is exact and δf = ∇f·δθ_T + ½ δθ_Tᵀ∇²f δθ_T (:meth:`CNR.delta_f_from_tangent`) is exact for a quadratic metric; the
adjoint's first-order δf is exact for a linear metric.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .recorder import Recorder, optimizer_params

__all__ = ["CNR", "StepLinearization", "AdjointResult", "CovarianceChange", "exact_hessian_probes"]


@dataclass
class StepLinearization:
    """Coefficients of linearized step t (flat float64 vectors [d]) and the points it was taken at."""

    step: int
    theta: Tensor  # θ_t
    beta: Tensor
    gamma: Tensor
    rho: Tensor
    cp: Tensor  # c_t ⊙ P_t
    wd_c: Tensor
    update: Tensor  # η_t u_t = θ_{t+1} − θ_t − ξ_t (the deterministic update)
    theta_next: Tensor  # θ_{t+1}


@dataclass
class AdjointResult:
    """Adjoints of one terminal vector.

    Attributes:
        adjoints: [T, d] float64, row t = a_θ,t+1 (the sensitivity of f to a perturbation entering θ_{t+1}).
        lr_sensitivity: [T], row t = a_θ,t+1 · η_t u_t (∂f/∂ε_t for η_t → η_t(1+ε_t)).
        grad_f: ∇f(θ_T) [d]. f_value: f(θ_T). num_hvps, seconds: cost of the sweep.
    """

    adjoints: Tensor
    lr_sensitivity: Tensor
    grad_f: Tensor
    f_value: float
    num_hvps: int
    seconds: float

    def delta_f_noise(self, delta_xi: Tensor) -> float:
        """First-order δf for noise changes δξ [T, d] (row t enters θ_{t+1})."""
        if delta_xi.shape != self.adjoints.shape:
            raise ValueError(f"delta_xi must be {tuple(self.adjoints.shape)}, got {tuple(delta_xi.shape)}")
        return float((self.adjoints * delta_xi.to(torch.float64)).sum())

    def delta_f_lr(self, eps: Tensor | float) -> float:
        """First-order δf for relative learning-rate changes ε_t ([T] or a constant)."""
        e = torch.as_tensor(eps, dtype=torch.float64).expand_as(self.lr_sensitivity)
        return float((self.lr_sensitivity * e).sum())


@dataclass
class CovarianceChange:
    """ΔE f for a change of the injected-noise covariance (curvature term only; see module docstring)."""

    delta_expected_f: float
    per_step: Tensor  # [T] contributions
    num_probes: int
    num_hvps: int
    seconds: float
    mean_shift: str = "omitted"
    notes: list[str] = field(default_factory=list)


def _flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])


class _LossModule(nn.Module):
    def __init__(self, model: nn.Module, fn: Callable[[nn.Module, Any], Tensor]) -> None:
        super().__init__()
        self.model = model
        self._fn = fn

    def forward(self, batch: Any) -> Tensor:  # noqa: D401
        return self._fn(self.model, batch)


def exact_hessian_probes(hvp: Callable[[Tensor], Tensor], dim: int, tol: float = 1e-13) -> tuple[Tensor, Tensor]:
    """Probes p_j [k, d] and signs s_j [k] with Σ_j s_j p_j p_jᵀ = M exactly (dense eigendecomposition; small d).

    Builds M column by column with ``dim`` products ``hvp(e_i)``; drops eigenvalues below tol·max|λ|.
    """
    eye = torch.eye(dim, dtype=torch.float64)
    m = torch.stack([hvp(eye[i]) for i in range(dim)], dim=1)
    lam, vec = torch.linalg.eigh(0.5 * (m + m.T))
    keep = lam.abs() > tol * max(float(lam.abs().max()), 1e-300)
    lam, vec = lam[keep], vec[:, keep]
    return (vec * lam.abs().sqrt()).T.contiguous(), torch.sign(lam)


class CNR:
    """Counterfactual replay of a :class:`Recorder`'s run for a scalar metric f(θ_T).

    Args:
        recorder: the recorded run (its optimizer must be SGD/Adam/AdamW from torch or pnekern).
        metric: ``metric(model) -> scalar`` (e.g. a validation loss or one prediction), differentiable in θ.
    """

    def __init__(self, recorder: Recorder, metric: Callable[[nn.Module], Tensor]) -> None:
        if not isinstance(recorder, Recorder):
            raise ValueError(f"recorder must be a pnekern.cnr.Recorder, got {type(recorder).__name__}")
        if not callable(metric):
            raise ValueError("metric must be callable: metric(model) -> scalar tensor")
        if recorder.num_steps == 0:
            raise ValueError("the recorder holds no steps: train with recorder.step(batch) first")
        self.rec = recorder
        self.metric = metric
        self.kind = self._optimizer_kind(recorder.optimizer)
        self.num_hvps = 0
        model, _ = recorder.replica()
        self._loss_mod = _LossModule(model, recorder.loss_fn)
        self._metric_mod = _LossModule(model, lambda m, _: metric(m))
        self._names = ["model." + n for n in recorder.param_names]
        self._shapes = [p.shape for p in recorder.params]
        self._dtype = recorder.params[0].dtype

    # ------------------------------------------------------------------ optimizer support
    @staticmethod
    def _optimizer_kind(opt: torch.optim.Optimizer) -> str:
        for g in opt.param_groups:
            if g.get("maximize", False):
                raise ValueError("CNR: maximize=True is not supported")
        if isinstance(opt, torch.optim.AdamW):
            kind = "adamw"
        elif isinstance(opt, torch.optim.Adam):
            kind = "adamw" if opt.param_groups[0].get("decoupled_weight_decay", False) else "adam"
        elif isinstance(opt, torch.optim.SGD):
            if any(g.get("nesterov", False) for g in opt.param_groups):
                raise ValueError("CNR: Nesterov momentum is not supported (use plain or heavy-ball momentum)")
            kind = "sgd"
        else:
            raise ValueError(
                f"CNR supports torch/pnekern SGD (optionally with momentum), Adam and AdamW; got {type(opt).__name__}"
            )
        if kind != "sgd" and any(g.get("amsgrad", False) for g in opt.param_groups):
            kind += "+amsgrad"
        return kind

    def _unflatten(self, vec: Tensor) -> list[Tensor]:
        out, off = [], 0
        for s in self._shapes:
            n = math.prod(s)
            out.append(vec[off:off + n].reshape(s).to(self._dtype))
            off += n
        return out

    # ------------------------------------------------------------------ derivatives at a flat θ
    def _grad_and_hvp(self, module: nn.Module, theta: Tensor, batch: Any, vecs: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        leaves = [t.detach().requires_grad_(True) for t in self._unflatten(theta)]
        with torch.enable_grad():
            value = functional_call(module, dict(zip(self._names, leaves)), (batch,))
            grads = torch.autograd.grad(value, leaves, create_graph=bool(vecs), allow_unused=True)
            grads = [torch.zeros_like(l) if g is None else g for g, l in zip(grads, leaves)]
            hvs = []
            for i, v in enumerate(vecs):
                live = [j for j, g in enumerate(grads) if g.requires_grad]
                if not live:
                    hvs.append(torch.zeros_like(theta))
                    continue
                vs = self._unflatten(v)
                hv = torch.autograd.grad([grads[j] for j in live], leaves, grad_outputs=[vs[j] for j in live],
                                         retain_graph=i + 1 < len(vecs), allow_unused=True)
                hvs.append(_flat([torch.zeros_like(l) if h is None else h for h, l in zip(hv, leaves)]))
                self.num_hvps += 1
        return torch.cat([value.detach().reshape(1).to(torch.float64), _flat(grads)]), hvs

    def loss_hvp(self, theta: Tensor, batch: Any, vecs: list[Tensor]) -> list[Tensor]:
        """H v for each flat v, H = ∇²loss_fn(model, batch) at the flat θ (float64 results [d])."""
        return self._grad_and_hvp(self._loss_mod, theta, batch, vecs)[1]

    def metric_value_grad(self, theta: Tensor) -> tuple[float, Tensor]:
        """(f(θ), ∇f(θ) [d])."""
        out, _ = self._grad_and_hvp(self._metric_mod, theta, None, [])
        return float(out[0]), out[1:]

    def metric_hvp(self, theta: Tensor, vecs: list[Tensor]) -> list[Tensor]:
        """∇²f(θ) v for each flat v."""
        return self._grad_and_hvp(self._metric_mod, theta, None, vecs)[1]

    # ------------------------------------------------------------------ recompute
    def _coefficients(self, opt: torch.optim.Optimizer, t: int, had_buffer: list[bool]) -> tuple[Tensor, ...]:
        rec = self.rec.records[t]
        betas, gammas, rhos, cps, wds = [], [], [], [], []
        i = 0
        for g, lr in zip(opt.param_groups, rec.lrs):
            for p in g["params"]:
                n = p.numel()
                st = opt.state.get(p, {})
                wd = float(g.get("weight_decay", 0.0))
                if self.kind == "sgd":
                    mu = float(g.get("momentum", 0.0))
                    first = mu == 0.0 or not had_buffer[i]
                    beta, gamma = (0.0, 1.0) if first else (mu, 1.0 - float(g.get("dampening", 0.0)))
                    betas.append(torch.full((n,), beta, dtype=torch.float64))
                    gammas.append(torch.full((n,), gamma, dtype=torch.float64))
                    rhos.append(torch.ones(n, dtype=torch.float64))
                    cps.append(torch.full((n,), lr, dtype=torch.float64))
                    wds.append(torch.full((n,), wd, dtype=torch.float64))
                else:
                    b1, b2 = (float(b) for b in g["betas"])
                    step = float(st["step"])
                    v = st["max_exp_avg_sq"] if g.get("amsgrad", False) else st["exp_avg_sq"]
                    a = 1.0 / (v.detach().to(torch.float64).sqrt() / math.sqrt(1.0 - b2**step) + g["eps"])
                    betas.append(torch.full((n,), b1, dtype=torch.float64))
                    gammas.append(torch.full((n,), 1.0 - b1, dtype=torch.float64))
                    decoupled = self.kind.startswith("adamw")
                    rhos.append(torch.full((n,), 1.0 - lr * wd if decoupled else 1.0, dtype=torch.float64))
                    cps.append((lr / (1.0 - b1**step)) * a.reshape(-1).cpu())
                    wds.append(torch.full((n,), 0.0 if decoupled else wd, dtype=torch.float64))
                i += 1
        return tuple(torch.cat(x) for x in (betas, gammas, rhos, cps, wds))

    def _replay_segment(self, t0: int, t1: int) -> list[StepLinearization]:
        """Restore the checkpoint at t0 and recompute steps t0..t1−1 with their linearizations."""
        model, opt, start = self.rec.restore(t0)
        if start != t0:
            raise RuntimeError(f"no checkpoint at step {t0}")
        params = optimizer_params(opt)
        out = []
        for t in range(t0, t1):
            theta = _flat(params)
            had_buffer = [opt.state.get(p, {}).get("momentum_buffer") is not None for p in params]
            self.rec.replay_step(model, opt, t)
            theta_next = _flat(params)
            rec = self.rec.records[t]
            xi = (_flat(self.rec.noise.sample(t, rec.noise_seed, params)) if self.rec.noise is not None
                  else torch.zeros_like(theta))
            beta, gamma, rho, cp, wd_c = self._coefficients(opt, t, had_buffer)
            out.append(StepLinearization(t, theta, beta, gamma, rho, cp, wd_c, theta_next - theta - xi, theta_next))
        return out

    def _segments(self) -> list[tuple[int, int]]:
        starts = sorted(k for k in self.rec.checkpoints if k < self.rec.num_steps)
        ends = starts[1:] + [self.rec.num_steps]
        return list(zip(starts, ends))

    def final_params(self) -> Tensor:
        """θ_T (flat float64), recomputed from the last checkpoint."""
        t0, t1 = self._segments()[-1]
        return self._replay_segment(t0, t1)[-1].theta_next

    # ------------------------------------------------------------------ adjoint
    def _adjoint_sweep(self, terminal: Tensor, on_step: Callable[[int, Tensor, StepLinearization], None]) -> None:
        """Backward sweep for terminal adjoints ``terminal`` [k, d]; on_step(t, A_{t+1} [k, d], lin) per step."""
        a_th = terminal.clone()
        a_m = torch.zeros_like(a_th)
        for t0, t1 in reversed(self._segments()):
            for lin in reversed(self._replay_segment(t0, t1)):
                rec = self.rec.records[lin.step]
                on_step(lin.step, a_th, lin)
                w = a_m - lin.cp * a_th
                hw = self.loss_hvp(lin.theta, rec.batch, list(lin.gamma * w))
                a_th = lin.rho * a_th + torch.stack(hw) + lin.wd_c * (lin.gamma * w)
                a_m = lin.beta * w

    def adjoint(self) -> AdjointResult:
        """Adjoints a_θ,t+1 of f for every step (T×d floats) and the learning-rate sensitivities."""
        start = time.perf_counter()
        hv0 = self.num_hvps
        theta_T = self.final_params()
        f_val, grad_f = self.metric_value_grad(theta_T)
        T, d = self.rec.num_steps, grad_f.numel()
        adj = torch.zeros(T, d, dtype=torch.float64)
        lr_s = torch.zeros(T, dtype=torch.float64)

        def on_step(t: int, a: Tensor, lin: StepLinearization) -> None:
            adj[t] = a[0]
            lr_s[t] = a[0] @ lin.update

        self._adjoint_sweep(grad_f.unsqueeze(0), on_step)
        return AdjointResult(adj, lr_s, grad_f, f_val, self.num_hvps - hv0, time.perf_counter() - start)

    def covariance_change(
        self,
        delta_cov: Callable[[int], Tensor | float],
        probes: tuple[Tensor, Tensor] | None = None,
    ) -> CovarianceChange:
        """ΔE f ≈ ½ Σ_t Σ_j s_j a_j,t+1ᵀ ΔΣ_t a_j,t+1 (curvature term).

        Args:
            delta_cov: t -> Σ̃_t − Σ_t of the injected noise ξ_t: a float (isotropic), a [d] diagonal or a [d, d]
                matrix [θ²].
            probes: (p [k, d], s [k]) weights s_j with Σ_j s_j p_j p_jᵀ = ∇²f(θ_T): exactly (signed eigen-
                directions, :func:`exact_hessian_probes`, the default: d HVPs of f, small d only), or in expectation
                (Monte Carlo: E[p pᵀ] = ∇²f, e.g. p = J_fᵀ z for a GGN, with s_j = 1/k).
        """
        start = time.perf_counter()
        hv0 = self.num_hvps
        notes = []
        if probes is None:
            theta_T = self.final_params()
            d = theta_T.numel()
            if d > 4096:
                raise ValueError(f"exact Hessian probes need d <= 4096 (d = {d}); pass Monte-Carlo probes")
            probes = exact_hessian_probes(lambda v: self.metric_hvp(theta_T, [v])[0], d)
            notes.append(f"exact probes from the dense ∇²f ({probes[0].shape[0]} directions)")
        p, s = probes
        if p.dim() != 2 or s.shape != (p.shape[0],):
            raise ValueError("probes must be (p [k, d], s [k])")
        per_step = torch.zeros(self.rec.num_steps, dtype=torch.float64)

        def on_step(t: int, a: Tensor, lin: StepLinearization) -> None:
            dc = delta_cov(t)
            dc = torch.as_tensor(dc, dtype=torch.float64)
            if dc.dim() == 0:
                q = (a * a).sum(1) * dc
            elif dc.dim() == 1:
                q = (a * a * dc).sum(1)
            else:
                q = ((a @ dc) * a).sum(1)
            per_step[t] = 0.5 * float((s.to(torch.float64) * q).sum())

        self._adjoint_sweep(p.to(torch.float64), on_step)
        return CovarianceChange(float(per_step.sum()), per_step, p.shape[0], self.num_hvps - hv0,
                                time.perf_counter() - start, notes=notes)

    # ------------------------------------------------------------------ tangent
    def tangent(
        self,
        delta_xi: Callable[[int], Tensor | None] | Tensor | None = None,
        lr_eps: Callable[[int], float] | Tensor | float | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Forward (JVP) propagation of δξ_t [T, d] (or t -> [d]) and relative lr changes ε_t.

        Returns (δθ_T [d], θ_T [d]); one HVP per step, no extra memory beyond one step.
        """
        T = self.rec.num_steps

        def dxi(t: int) -> Tensor | None:
            if delta_xi is None:
                return None
            return delta_xi[t].to(torch.float64) if isinstance(delta_xi, Tensor) else delta_xi(t)

        def eps(t: int) -> float:
            if lr_eps is None:
                return 0.0
            if isinstance(lr_eps, Tensor):
                return float(lr_eps[t]) if lr_eps.dim() else float(lr_eps)
            return float(lr_eps(t)) if callable(lr_eps) else float(lr_eps)

        dth = dm = None
        theta_T = None
        for t0, t1 in self._segments():
            for lin in self._replay_segment(t0, t1):
                t = lin.step
                if dth is None:
                    dth = torch.zeros_like(lin.theta)
                    dm = torch.zeros_like(lin.theta)
                hd = self.loss_hvp(lin.theta, self.rec.records[t].batch, [dth])[0] + lin.wd_c * dth
                dm = lin.beta * dm + lin.gamma * hd
                dth = lin.rho * dth - lin.cp * dm + eps(t) * lin.update
                x = dxi(t)
                if x is not None:
                    dth = dth + x.to(torch.float64)
                theta_T = lin.theta_next
        assert dth is not None and theta_T is not None and T > 0
        return dth, theta_T

    def delta_f_from_tangent(self, delta_theta: Tensor, theta_T: Tensor | None = None,
                             second_order: bool = True) -> float:
        """f(θ_T + δθ) − f(θ_T) ≈ ∇f·δθ (+ ½ δθᵀ∇²f δθ): exact for a quadratic metric."""
        theta_T = self.final_params() if theta_T is None else theta_T
        _, g = self.metric_value_grad(theta_T)
        out = float(g @ delta_theta)
        if second_order:
            out += 0.5 * float(delta_theta @ self.metric_hvp(theta_T, [delta_theta])[0])
        return out

    # ------------------------------------------------------------------ validation by re-running
    def rerun(
        self,
        delta_xi: Callable[[int], Tensor | None] | Tensor | None = None,
        lr_eps: Callable[[int], float] | Tensor | float | None = None,
        from_step: int = 0,
    ) -> tuple[float, Tensor]:
        """Re-run from the checkpoint at or before ``from_step`` with common random numbers (same batches and noise
        seeds), δξ_t added to ξ_t and η_t scaled by (1 + ε_t) for t ≥ from_step. Returns (f(θ̃_T), θ̃_T flat)."""
        model, opt, t0 = self.rec.restore(from_step)
        for t in range(t0, self.rec.num_steps):
            active = t >= from_step
            x = None
            if active and delta_xi is not None:
                x = delta_xi[t] if isinstance(delta_xi, Tensor) else delta_xi(t)
            e = 0.0
            if active and lr_eps is not None:
                if isinstance(lr_eps, Tensor):
                    e = float(lr_eps[t]) if lr_eps.dim() else float(lr_eps)
                else:
                    e = float(lr_eps(t)) if callable(lr_eps) else float(lr_eps)
            self.rec.replay_step(model, opt, t, extra_noise=x, lr_scale=1.0 + e)
        theta = _flat(optimizer_params(opt))
        f_val, _ = self.metric_value_grad(theta)
        return f_val, theta
