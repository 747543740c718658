"""Noise-Aligned Preconditioning (NAP, draft 3; SPEC §6 with its [fix] items).

One step, per parameter tensor with a gradient (d elements, flattened):

    θ ← θ·(1 − η·wd) − η · P ĝ + ξ,        ξ ~ N(0, 2 η T_t · Λ_t)

* ``preconditioner="adam"``: ĝ = m̂ (torch AdamW moments), P = A_t = diag(1/(sqrt(v̂_t)+eps)) — exactly the ``1/denom``
  of ``torch.optim.AdamW`` after this step's v update. ``"identity"``: ĝ = g, P = I (plain SGLD-style SGD).
* ``noise="aligned"`` (the draft's NAP): Λ_t = P (U Σ_r Uᵀ + λ I) P, U (d×r) orthonormal, Σ_r = diag(σ) ≥ 0.
* ``noise="langevin"``: Λ_t = P. **[fix]** shaped noise P(·)P is *not* posterior sampling: with a constant P and
  no momentum (β1 = 0), θ ← θ − ηP∇L + N(0, 2ηT·P) has stationary density ∝ exp(−L/T) (preconditioned Langevin);
  P(UΣUᵀ+λI)P does not, whatever U, Σ. With Adam's slowly varying P the divergence correction Γ(θ) (pSGLD) and
  the momentum are neglected — the "langevin" mode is then approximate, as documented in SPEC §6.
* ``noise="none"``: no injection (the noiseless control; target estimation still runs).

Which covariance U Σ_r Uᵀ estimates (the **[fix]** "say which covariance"), per param group ``target``:

* ``"gradient"`` — (a) per-task gradient covariance in *parameter space*: U is d_layer × r over the flattened
  parameter. Samples are the gradient contributions of each backward call (a tensor hook on the parameter, like the
  statistics engine's micro-batch capture, SPEC §2): run one backward per task (or per group of tasks) before
  ``step``. They are centered by their mean (n ≥ 2 contributions) — with one contribution per step by a running
  mean of the step gradients instead. Units of Σ: g² (gradient units squared).
* ``"features"`` — (b) layer-input feature second moment E[φφᵀ] of an ``nn.Linear`` registered with
  :meth:`NAP.track_features` (forward pre-hook, rows of the input, *uncentered* as in draft 3 Theorem 2); the weight
  W [d_out, d_in] gets the Kronecker covariance I_out ⊗ (U Σ_r Uᵀ + λ I) with U d_in × r (every row of W shares the
  input covariance). Units of Σ: input units squared. Untracked parameters of such a group (biases) get λ I.
* ``None`` — no estimate: λ I only, unless :meth:`NAP.set_target` fixed a target (e.g. Σβ for a readout).

The estimate is a scale-normalised Oja streaming PCA with Rayleigh–Ritz eigenvalues (SPEC §6: U ← qr(U + η_o C U)),
run once per step from the contributions collected since the last step:

    Y = C U (from a d×r sketch Σ_k x_k (x_kᵀU), never the d×d matrix),  B = Uᵀ Y = Q diag(w) Qᵀ,
    U ← qr(U Q + η_o(t) · Y Q / tr C),  σ ← (1−ρ) σ + ρ w         (ρ = 1 − ``cov_beta``; σ = w on the first update)

Dividing by tr C ≥ λ_max(C) makes η_o dimensionless and keeps every step a contraction for η_o ≤ 1; the QR is the
re-orthonormalisation (columns sign-fixed so diag R > 0). ``oja_lr`` may be a float or a schedule ``t -> η_o``.

Temperature: ``temperature`` is a float T or a schedule ``t -> T_t`` (t the 1-based step), e.g. the draft's decay.
Units: T absorbs whatever the product η·Λ lacks to be θ² — callers choose it to reach a target exposure.

Reproducible noise: the normals of parameter i at its step s come from a ``torch.Generator`` seeded with
splitmix64(seed, s, i) (:func:`nap_noise_seed`), so a step's noise is a pure function of (seed, step, parameter
index): saving/loading the state_dict resumes the identical stream, and a replay (pnekern.cnr) can regenerate it.
The seed lives in the param group (``seed``); per-parameter state holds step, moments, U, σ and the running mean.
Contributions collected but not yet consumed by a step are transient and are not saved.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["NAP", "nap_noise_seed", "NAP_NOISE_MODES", "NAP_TARGETS", "NAP_PRECONDITIONERS"]

NAP_NOISE_MODES = ("aligned", "langevin", "none")
NAP_TARGETS = (None, "gradient", "features")
NAP_PRECONDITIONERS = ("adam", "identity")

_MASK64 = (1 << 64) - 1
_FP64_KEYS = ("U", "sigma", "grad_mean")


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def nap_noise_seed(seed: int, step: int, index: int) -> int:
    """The torch.Generator seed of parameter ``index``'s noise at its 1-based ``step`` (a 63-bit int)."""
    return _splitmix64(_splitmix64(_splitmix64(seed) ^ step) ^ index) & ((1 << 63) - 1)


def _check_schedule(name: str, value: Any, lo: float, hi: float | None = None, lo_open: bool = False) -> Any:
    if callable(value):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number or a callable schedule step -> value")
    if value < lo or (lo_open and value == lo) or (hi is not None and value > hi):
        rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}{']' if hi is not None else ')'}"
        raise ValueError(f"{name}={value!r} must lie in {rng}")
    return float(value)


def _eval_schedule(name: str, value: Any, step: int) -> float:
    v = value(step) if callable(value) else value
    v = float(v)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} schedule returned {v!r} at step {step}; it must be finite and >= 0")
    return v


class _Sketch:
    """Contributions x_k ∈ R^d collected between two steps, reduced to Σ_k x_k, Σ_k ‖x_k‖², Σ_k x_k(x_kᵀU)."""

    def __init__(self) -> None:
        self.n = 0
        self.sum: Tensor | None = None
        self.sumsq = 0.0
        self.xxu: Tensor | None = None

    def add(self, x: Tensor, basis: Tensor) -> None:
        """x [n, d] rows (any float dtype), basis U [d, r] (float64)."""
        x = x.detach().to(torch.float64).reshape(x.shape[0], -1)
        s = x.sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.sumsq += float(x.square().sum())
        y = x.T @ (x @ basis)
        self.xxu = y if self.xxu is None else self.xxu + y
        self.n += x.shape[0]


class NAP(torch.optim.Optimizer):
    """Noise-Aligned Preconditioning: preconditioned (Adam or identity) steps plus shaped Gaussian noise.

    Args:
        params: iterable of parameters or param-group dicts (as torch optimizers).
        lr: η ≥ 0 (float). betas, eps, weight_decay: AdamW's (decoupled weight decay; ``preconditioner="adam"``).
        preconditioner: ``"adam"`` (P = A_t, torch AdamW step) or ``"identity"`` (P = I, θ ← θ − ηg).
        noise: ``"aligned"`` | ``"langevin"`` | ``"none"`` (module docstring).
        target: ``None`` | ``"gradient"`` | ``"features"`` — which covariance U Σ_r Uᵀ estimates (module docstring).
        rank: r ≥ 1 (clipped to d per parameter). lam: λ ≥ 0, the isotropic floor [units of Σ].
        temperature: T ≥ 0 or a schedule ``t -> T_t``. oja_lr: η_o ∈ (0, 1] or a schedule ``t -> η_o``.
        cov_beta: EMA factor of the eigenvalue estimate σ, in [0, 1) (0 = latest Ritz values only).
        seed: noise seed, int in [0, 2^63) (stored in the param group).
        capture_gradients: register the per-backward gradient hooks for ``target="gradient"`` (default True).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        preconditioner: str = "adam",
        noise: str = "aligned",
        target: str | None = "gradient",
        rank: int = 8,
        lam: float = 1e-3,
        temperature: float | Callable[[int], float] = 1.0,
        oja_lr: float | Callable[[int], float] = 0.5,
        cov_beta: float = 0.9,
        seed: int = 0,
        capture_gradients: bool = True,
    ) -> None:
        if isinstance(lr, Tensor) or not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr >= 0:
            raise ValueError(f"lr={lr!r} must be a float >= 0")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= float(b) < 1.0 for b in betas)):
            raise ValueError(f"betas={betas!r} must be two floats in [0, 1)")
        if not eps >= 0:
            raise ValueError(f"eps={eps!r} must be >= 0")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay={weight_decay!r} must be >= 0")
        if preconditioner not in NAP_PRECONDITIONERS:
            raise ValueError(f"preconditioner={preconditioner!r}; choose one of {NAP_PRECONDITIONERS}")
        if noise not in NAP_NOISE_MODES:
            raise ValueError(f"noise={noise!r}; choose one of {NAP_NOISE_MODES}")
        if target not in NAP_TARGETS:
            raise ValueError(f"target={target!r}; choose one of {NAP_TARGETS}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank={rank!r} must be an int >= 1")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            raise ValueError(f"lam={lam!r} must be a finite float >= 0")
        temperature = _check_schedule("temperature", temperature, 0.0)
        oja_lr = _check_schedule("oja_lr", oja_lr, 0.0, 1.0, lo_open=True)
        if not 0.0 <= cov_beta < 1.0:
            raise ValueError(f"cov_beta={cov_beta!r} must lie in [0, 1)")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < (1 << 63):
            raise ValueError(f"seed={seed!r} must be an int in [0, 2^63)")
        defaults = dict(
            lr=float(lr), betas=(float(betas[0]), float(betas[1])), eps=float(eps), weight_decay=float(weight_decay),
            preconditioner=preconditioner, noise=noise, target=target, rank=rank, lam=float(lam),
            cov_beta=float(cov_beta), seed=seed,
        )
        # Schedules may be callables, which a state_dict cannot hold: they stay on the instance.
        self.temperature = temperature
        self.oja_lr = oja_lr
        self._sketches: dict[int, _Sketch] = {}
        self._hooks: list[Any] = []
        self._feature_modules: dict[int, nn.Module] = {}
        super().__init__(params, defaults)
        for group in self.param_groups:
            for key in ("preconditioner", "noise", "target"):
                allowed = {"preconditioner": NAP_PRECONDITIONERS, "noise": NAP_NOISE_MODES, "target": NAP_TARGETS}[key]
                if group[key] not in allowed:
                    raise ValueError(f"param group {key}={group[key]!r}; choose one of {allowed}")
            for p in group["params"]:
                if not p.is_floating_point():
                    raise ValueError(f"NAP optimizes floating-point parameters; got dtype {p.dtype}")
        self._index = {id(p): i for i, p in enumerate(q for g in self.param_groups for q in g["params"])}
        if capture_gradients:
            for group in self.param_groups:
                if group["target"] == "gradient":
                    for p in group["params"]:
                        if p.requires_grad:
                            self._hooks.append(p.register_hook(self._make_grad_hook(p)))

    # ------------------------------------------------------------------ helpers
    def _group_of(self, p: Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise ValueError("the tensor is not a parameter of this NAP optimizer")

    def _basis_dim(self, p: Tensor, group: dict[str, Any]) -> int:
        # features: U lives in the input space of the Linear weight [d_out, d_in]; otherwise the flattened tensor.
        if group["target"] == "features" and p.dim() == 2:
            return int(p.shape[1])
        return p.numel()

    def _pca_state(self, p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if "U" not in state:
            group = self._group_of(p)
            dim = self._basis_dim(p, group)
            r = min(group["rank"], dim)
            gen = torch.Generator().manual_seed(nap_noise_seed(group["seed"], 0, self._index[id(p)]))
            q, _ = torch.linalg.qr(torch.randn(dim, r, generator=gen, dtype=torch.float64))
            state["U"] = q.to(p.device)
            state["sigma"] = torch.zeros(r, dtype=torch.float64, device=p.device)
            state["pca_updates"] = 0
            state["target_fixed"] = False
        return state

    def _make_grad_hook(self, p: Tensor) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            self.observe(p, grad.reshape(1, -1))
        return hook

    # ------------------------------------------------------------------ public API
    def observe(self, p: Tensor, samples: Tensor) -> None:
        """Add covariance samples for parameter ``p`` (consumed by the next :meth:`step`).

        Args:
            p: a parameter of this optimizer whose group has ``target`` "gradient" or "features".
            samples: [n, D] rows; D = p.numel() (gradient target) or d_in = p.shape[1] (features target).
        """
        group = self._group_of(p)
        if group["target"] is None:
            raise ValueError("observe: this parameter's group has target=None (nothing is estimated)")
        state = self._pca_state(p)
        if state["target_fixed"]:
            return
        dim = state["U"].shape[0]
        if samples.dim() != 2 or samples.shape[1] != dim:
            raise ValueError(f"observe: samples must be [n, {dim}] for this parameter, got {tuple(samples.shape)}")
        if samples.shape[0] == 0:
            return
        self._sketches.setdefault(id(p), _Sketch()).add(samples, state["U"])

    def track_features(self, module: nn.Module) -> None:
        """Estimate the input-feature covariance of an ``nn.Linear`` for its weight (group target "features").

        A forward pre-hook adds the input rows x [..., d_in] → [N, d_in] of every forward run with gradients enabled
        (evaluation forwards under ``torch.no_grad`` are ignored).
        """
        if not isinstance(module, nn.Linear):
            raise ValueError(f"track_features supports nn.Linear modules, got {type(module).__name__}")
        w = module.weight
        group = self._group_of(w)
        if group["target"] != "features":
            raise ValueError("track_features: the module's weight must be in a param group with target='features'")

        def pre_hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            if torch.is_grad_enabled():
                x = args[0]
                self.observe(mod.weight, x.detach().reshape(-1, x.shape[-1]))

        self._feature_modules[id(w)] = module
        self._hooks.append(module.register_forward_pre_hook(pre_hook))

    def set_target(self, p: Tensor, basis: Tensor, eigenvalues: Tensor) -> None:
        """Fix the target U Σ Uᵀ of ``p`` (no estimation afterwards), e.g. Σβ of a readout, or a rotated control.

        Args:
            basis: U [D, r] with orthonormal columns (D as in :meth:`observe`; for a group with target None, the
                flattened parameter). eigenvalues: σ [r] ≥ 0 [units of Σ].
        """
        state = self._pca_state(p)
        dim = state["U"].shape[0]
        if basis.dim() != 2 or basis.shape[0] != dim or basis.shape[1] < 1:
            raise ValueError(f"set_target: basis must be [{dim}, r] with r >= 1, got {tuple(basis.shape)}")
        if eigenvalues.shape != (basis.shape[1],):
            raise ValueError(f"set_target: eigenvalues must be [{basis.shape[1]}], got {tuple(eigenvalues.shape)}")
        if not bool((eigenvalues >= 0).all()) or not bool(torch.isfinite(eigenvalues).all()):
            raise ValueError("set_target: eigenvalues must be finite and >= 0 (a covariance)")
        b = basis.detach().to(torch.float64)
        if not torch.allclose(b.T @ b, torch.eye(b.shape[1], dtype=torch.float64), atol=1e-6):
            raise ValueError("set_target: basis columns must be orthonormal (use torch.linalg.qr / eigh)")
        state["U"] = b.to(p.device).clone()
        state["sigma"] = eigenvalues.detach().to(device=p.device, dtype=torch.float64).clone()
        state["target_fixed"] = True
        self._sketches.pop(id(p), None)

    def target_covariance(self, p: Tensor) -> Tensor:
        """S = U Σ Uᵀ + λ I as a dense float64 matrix [D, D] (the un-preconditioned target; for small D)."""
        group = self._group_of(p)
        state = self._pca_state(p)
        u, s = state["U"], state["sigma"]
        return (u * s) @ u.T + group["lam"] * torch.eye(u.shape[0], dtype=torch.float64, device=u.device)

    def noise_covariance(self, p: Tensor) -> Tensor:
        """2 η T_t Λ_t over the flattened parameter, dense float64 [d, d], for the *next* step (small d; tests).

        Uses the current preconditioner state (a step that updates v changes P; with a constant gradient it does not).
        """
        group = self._group_of(p)
        state = self.state.get(p, {})
        step = int(state.get("step", 0)) + 1
        temp = _eval_schedule("temperature", self.temperature, step)
        scale = 2.0 * group["lr"] * temp
        d = p.numel()
        if group["noise"] == "none":
            return torch.zeros(d, d, dtype=torch.float64)
        a = self._precond(p, group, state, step).reshape(-1).to(torch.float64)
        if group["noise"] == "langevin":
            return scale * torch.diag(a)
        s = self.target_covariance(p).cpu()
        if group["target"] == "features" and p.dim() == 2:
            s = torch.kron(torch.eye(p.shape[0], dtype=torch.float64), s)
        a = a.cpu()
        return scale * a[:, None] * s * a[None, :]

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        # Discarded gradients take their captured contributions with them (as pnekern.AdamW's statistics).
        self._sketches.clear()

    def remove_hooks(self) -> None:
        """Detach the gradient / feature hooks this optimizer registered."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for key in ("temperature", "oja_lr", "_index"):
            state[key] = getattr(self, key, None)
        state["_sketches"] = {}
        state["_hooks"] = []
        state["_feature_modules"] = {}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load_state_dict, keeping the float64 estimator buffers (U, σ, running mean) in float64.

        torch casts every floating state tensor to its parameter's dtype; the PCA state is kept in float64 so that
        a save/load round trip reproduces the run bit for bit.
        """
        keep = {
            pid: {k: v for k, v in st.items() if k in _FP64_KEYS and isinstance(v, Tensor)}
            for pid, st in state_dict["state"].items()
        }
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params):
            for k, v in keep.get(pid, {}).items():
                self.state[p][k] = v.to(device=p.device, dtype=torch.float64).clone()

    # ------------------------------------------------------------------ step
    def _precond(self, p: Tensor, group: dict[str, Any], state: dict[str, Any], step: int) -> Tensor:
        """a (shape of p): the diagonal of P for the step whose v is in ``state`` (ones for identity / no v yet)."""
        if group["preconditioner"] == "identity" or "exp_avg_sq" not in state:
            return torch.ones_like(p)
        bc2 = 1.0 - group["betas"][1] ** max(int(state["step"]), 1)
        return 1.0 / (state["exp_avg_sq"].sqrt() / math.sqrt(bc2) + group["eps"])

    def _update_pca(self, p: Tensor, group: dict[str, Any], state: dict[str, Any], step: int) -> None:
        sk = self._sketches.pop(id(p), None)
        if sk is None or sk.n == 0 or state["target_fixed"]:
            return
        u = state["U"]
        center = group["target"] == "gradient"
        if center and sk.n >= 2:
            mean = sk.sum / sk.n
            cu = (sk.xxu - sk.n * torch.outer(mean, mean @ u)) / (sk.n - 1)
            trace = (sk.sumsq - sk.n * float(mean.square().sum())) / (sk.n - 1)
        elif center:
            # One contribution per step: center by the running mean of the step gradients (EMA, cov_beta).
            x = sk.sum
            prev = state.get("grad_mean")
            state["grad_mean"] = x.clone() if prev is None else group["cov_beta"] * prev + (1 - group["cov_beta"]) * x
            if prev is None:
                return  # no mean to center by yet
            xc = x - prev
            cu = torch.outer(xc, xc @ u)
            trace = float(xc.square().sum())
        else:
            cu = sk.xxu / sk.n
            trace = sk.sumsq / sk.n
        if not trace > 0:
            return
        b = u.T @ cu
        w, q = torch.linalg.eigh(0.5 * (b + b.T))
        w, q = w.flip(0).clamp(min=0.0), q.flip(1)
        eta_o = _eval_schedule("oja_lr", self.oja_lr, step)
        new_u, r = torch.linalg.qr(u @ q + (eta_o / trace) * (cu @ q))
        signs = torch.sign(torch.diagonal(r))
        signs[signs == 0] = 1.0
        state["U"] = new_u * signs
        rho = 1.0 - group["cov_beta"]
        state["sigma"] = w if state["pca_updates"] == 0 else (1 - rho) * state["sigma"] + rho * w
        state["pca_updates"] += 1

    def _sample(self, p: Tensor, group: dict[str, Any], state: dict[str, Any], a: Tensor, scale: float,
                gen: torch.Generator) -> Tensor:
        """ξ with covariance ``scale`` · Λ_t, shape of p (normals drawn on the CPU, float64, then moved)."""
        if group["noise"] == "langevin":
            z = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.device)
            return (math.sqrt(scale) * a.to(torch.float64).sqrt() * z).to(p.dtype)
        u, s, lam = state["U"], state["sigma"].clamp(min=0.0), group["lam"]
        r = u.shape[1]
        if group["target"] == "features" and p.dim() == 2:
            d_out, d_in = p.shape
            zr = torch.randn(d_out, r, generator=gen, dtype=torch.float64).to(p.device)
            zd = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64).to(p.device)
            z = (zr * s.sqrt()) @ u.T + math.sqrt(lam) * zd  # rows ~ N(0, UΣUᵀ + λI)
        else:
            zr = torch.randn(r, generator=gen, dtype=torch.float64).to(p.device)
            zd = torch.randn(p.numel(), generator=gen, dtype=torch.float64).to(p.device)
            z = (u @ (s.sqrt() * zr) + math.sqrt(lam) * zd).reshape(p.shape)
        return (math.sqrt(scale) * a.to(torch.float64) * z).to(p.dtype)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One NAP step for every parameter with a gradient; returns the closure's loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("NAP does not support sparse gradients")
                state = self._pca_state(p) if group["target"] is not None else self.state[p]
                if "step" not in state:
                    state["step"] = 0
                state["step"] += 1
                step = state["step"]
                if group["target"] is not None:
                    self._update_pca(p, group, state, step)
                g = p.grad
                p.mul_(1.0 - lr * wd)
                if group["preconditioner"] == "adam":
                    if "exp_avg" not in state:
                        state["exp_avg"] = torch.zeros_like(p)
                        state["exp_avg_sq"] = torch.zeros_like(p)
                    m, v = state["exp_avg"], state["exp_avg_sq"]
                    m.lerp_(g, 1.0 - beta1)
                    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                    a = self._precond(p, group, state, step)
                    p.addcmul_(m, a, value=-lr / (1.0 - beta1**step))
                else:
                    a = torch.ones_like(p)
                    p.add_(g, alpha=-lr)
                if group["noise"] == "none":
                    continue
                temp = _eval_schedule("temperature", self.temperature, step)
                scale = 2.0 * lr * temp
                if scale == 0.0:
                    continue
                if group["target"] is None and "U" not in state and group["noise"] == "aligned":
                    self._pca_state(p)  # λI only (σ = 0) unless set_target was called
                gen = torch.Generator().manual_seed(nap_noise_seed(group["seed"], step, self._index[id(p)]))
                p.add_(self._sample(p, group, state, a, scale, gen))
        return loss
