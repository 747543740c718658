"""Noise injection inside :class:`pnekern.AdamW`'s step (SPEC §5): residuals, sampling, exposure, control, checkpoint.

Per step, for each parameter with a gradient (tensor index i in the optimizer's flattened parameter order):

1. ``prepare`` (before anything is mutated): build R = Σ_target − Σ_step (Σ_step from this step's diag/lowrank
   statistics; or Σ_step·(B/B' − 1) to emulate batch B'; or the target itself when additive), clip it to PSD
   (R⁺, infeasible mass tr R⁺ − tr R) and draw ε = sample(R⁺) from the Philox stream keyed (seed, counter, i,
   element). Gradient space: ε is scaled by √c_t (the controller predicts the exposure with A_{t−1}); with
   ``into_second_moment`` the kernel gets a temporary noisy gradient ḡ + ε (p.grad is never modified by the noise).
2. ``after_update`` (after the fused kernel): parameter space picks c_t from the exact A_t and adds
   ζ = η √κ √c_t A_t ε; gradient space without
   ``into_second_moment`` adds ε's share to m and to the update ((1−β1)ε and −(η/bc1)(1−β1) A_t ε: the kernel saw
   the clean gradient, so v never sees ε); with ``into_second_moment`` the statistics row of the clean gradient is
   restored so the *natural* noise is still measured without bias.
3. ``finish`` (after the statistics engine): adds the injected exposure η κ Tr(A c R⁺ A) to ``last_stats()``
   (``temperature``/``diffusion``/``pne`` become totals; parts in ``temperature_sampled``/``temperature_injected``),
   logs c_t, the target and the infeasible mass, and closes the controller loop.

In-step noise (default, ``NoiseConfig.in_step``): for parameters the fused step can take (fp32/bf16/fp16, real,
not parameter space with a controller), ``prepare`` draws nothing: it hands the kernel the residual's operands
(δ, U, c = sqrt(s)·z_r with the k low-rank normals z_r drawn here, the tensor index, seed, counter, and the
controller scale), the kernel generates ε from the same Philox stream per element, and ``after_update`` only does
the exposure accounting (the kernel unscales p.grad and its statistics rows already see the clean gradient). The
Python path above remains for the other parameters and for ``in_step=False``.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from ..reference.adamw import PRECOND_NEW_COLUMNS, PRECOND_NEW_STATS_COLS
from ..stats.engine import StepStats, _to_host, bias_corrected_coefficient, nystrom
from .config import DiagonalTarget, IsotropicTarget, LowRankTarget, NoiseConfig
from .controller import ExposureController
from .covariance import LowRankDiag, psd_clip
from .sampler import lowrank_normals, sample_noise

__all__ = ["NoiseInjector", "NoisyStepStats", "NOISE_FIELDS", "STATE_KEY"]

#: key of the noise state inside ``optimizer.state_dict()`` (torch ignores unknown keys, so checkpoints stay
#: loadable by torch.optim.AdamW).
STATE_KEY = "pnekern_noise"

#: extra per-step fields of :class:`NoisyStepStats` (units as StepStats: temperature θ²/(η·step), diffusion θ²/step).
NOISE_FIELDS = (
    "temperature_sampled", "temperature_injected", "diffusion_sampled", "diffusion_injected", "injection_scale",
    "infeasible_mass", "target",
)


def _scalar(x: float | Tensor) -> float:
    return float(x) if isinstance(x, Tensor) else x


@dataclass
class NoisyStepStats(StepStats):
    """:class:`pnekern.stats.StepStats` of a step with injected noise.

    ``temperature``, ``diffusion``, ``pne`` and ``pne_star`` are totals (natural + injected). Extra fields:
    ``temperature_sampled``/``diffusion_sampled`` (natural, measured from the micro-batches),
    ``temperature_injected``/``diffusion_injected`` (η κ Tr(A c R⁺ A) and η² κ Tr(A c R⁺ A)),
    ``injection_scale`` c_t (dimensionless), ``infeasible_mass`` Σ tr R⁺ − tr R [g²] (clipped, not injected),
    ``target`` (the controller's target for this step in its metric's units, or None).
    """

    temperature_sampled: Tensor | None = None
    temperature_injected: Tensor | None = None
    diffusion_sampled: Tensor | None = None
    diffusion_injected: Tensor | None = None
    injection_scale: Tensor | float | None = None
    infeasible_mass: Tensor | None = None
    target: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        tensors, keys = [], []
        for k in NOISE_FIELDS:
            v = getattr(self, k)
            if isinstance(v, Tensor):
                tensors.append(v.detach().reshape(()).to(torch.float64))
                keys.append(k)
            else:
                out[k] = v
        for k, v in zip(keys, _to_host(tensors)):
            out[k] = v
        return out

    def record(self) -> dict[str, Any]:
        rec = super().record()
        for k in NOISE_FIELDS:
            rec[k] = getattr(self, k)
        return rec


@dataclass
class _Entry:
    """One parameter's noise in the current step."""

    param: Tensor
    index: int
    cov: LowRankDiag  # R⁺ at unit scale [g²], flattened
    mass: Tensor  # infeasible mass tr R⁺ − tr R [g²], 0-dim float64
    eps: Tensor | None  # c_t-scaled draw, parameter's shape, fp32 (fp64 for fp64 params) [g]; None in-step
    in_step: bool = False  # the fused step draws ε (kernel_args) instead of this Python path
    noisy_grad: Tensor | None = None
    rows_pre: tuple[Tensor, Tensor] | None = None  # clean (Σ g², Σ a_prev² g²), float64
    tr_prev: Tensor | None = None  # Tr(A_{t−1} R⁺ A_{t−1}) (trace-mode statistics)
    tr_unit: Tensor | None = None  # Tr(A R⁺ A) with the engine's A, per unit scale
    kernel_var: Tensor | None = None  # in-step operands: δ fp32 [d] or [1]
    kernel_basis: Tensor | None = None  # U fp32 [d, k]
    kernel_coef: Tensor | None = None  # c fp32 [k]


@dataclass
class _StepNoise:
    """The noise of one optimizer step (returned by :meth:`NoiseInjector.prepare`)."""

    injector: "NoiseInjector"
    entries: dict[int, _Entry]
    scale: Tensor | None
    grad_scale: Tensor | None
    measuring: bool
    step: int

    def grad_for(self, p: Tensor) -> Tensor:
        """The gradient the fused kernel should use for ``p`` (a temporary noisy one, or p.grad)."""
        e = self.entries.get(id(p))
        return p.grad if e is None or e.noisy_grad is None else e.noisy_grad

    def kernel_args(self, params: list[Tensor]) -> dict[str, Any]:
        """The ``noise_*`` keyword arguments of ``ops.adamw_step_`` for one bucket (``params`` in bucket order);
        empty when no parameter of the bucket takes its noise in-step."""
        ins = [self.entries.get(id(p)) for p in params]
        ins = [e if e is not None and e.in_step else None for e in ins]
        if not any(ins):
            return {}
        cfg = self.injector.config
        mode = 3 if cfg.space == "parameter" else (1 if cfg.into_second_moment else 2)
        device = params[0].device
        empty = torch.empty(0, dtype=torch.float32, device=device)
        var, basis, coef, idx = [], [], [], []
        for p, e in zip(params, ins):
            if e is None:
                var.append(empty), basis.append(empty), coef.append(empty), idx.append(0)
                continue
            var.append(e.kernel_var), idx.append(e.index)
            basis.append(e.kernel_basis if e.kernel_basis is not None else empty)
            coef.append(e.kernel_coef if e.kernel_coef is not None else empty)
        out: dict[str, Any] = dict(
            noise_mode=mode, noise_seed=self.injector.seed, noise_counter=self.step, noise_tensor_idx=idx,
            noise_var=var, noise_basis=basis, noise_coef=coef,
        )
        if not any(b.numel() for b in basis):
            out["noise_basis"], out["noise_coef"] = [], []
        if mode == 3:
            out["noise_param_coef"] = _scalar(self.injector.optimizer._group_of(params[0])["lr"]) * math.sqrt(
                self.injector.optimizer._stats.current_kappa()
            )
        elif self.scale is not None:
            out["noise_scale"] = self.scale.to(device)
        return out

    def after_update(self, rows: dict[int, Tensor], found_inf: Tensor | None) -> None:
        self.injector._after_update(self, rows, found_inf)

    def finish(self) -> None:
        self.injector._finish(self)


class NoiseInjector:
    """Owns a :class:`NoiseConfig`'s state for one optimizer: targets, Philox seed/counter and the controller.

    Construction validates everything against the optimizer (ValueError naming the argument) before any step.
    """

    def in_step_ok(self, p: Tensor, backend: str) -> bool:
        """Whether the fused step on ``backend`` draws ``p``'s noise itself (see NoiseConfig.in_step)."""
        cfg = self.config
        return (
            cfg.in_step
            and backend in ("cpp", "triton", "cuda", "reference")
            and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and not (cfg.space == "parameter" and self.controller is not None)
        )

    def __init__(self, optimizer: Any, config: NoiseConfig) -> None:
        if not isinstance(config, NoiseConfig):
            raise ValueError(f"noise={config!r} must be a pnekern.NoiseConfig or None")
        self.optimizer = optimizer
        self.config = config
        self.seed = int(config.seed)
        self.counter = 0  # Philox step word: one per optimizer step() that ran the fused step
        self.controller = ExposureController(config.controller) if config.schedule is not None else None
        self._warned_infeasible = False
        self._warned_curvature = False
        self._pending_state: dict[str, Any] | None = None
        self._targets: dict[int, LowRankDiag] = {}
        self._clipped: dict[int, tuple[LowRankDiag, Tensor]] = {}
        self._validate()
        self.attach(optimizer)

    # ------------------------------------------------------------------ validation
    def _params(self) -> list[Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _validate(self) -> None:
        opt, cfg = self.optimizer, self.config
        eng = getattr(opt, "_stats", None)
        if eng is None:
            raise ValueError(
                "noise=NoiseConfig(...) needs the noise statistics (exposure logging, residuals): pass "
                "stats='trace' (additive targets), 'diag' or 'lowrank'"
            )
        if opt.defaults.get("differentiable"):
            raise ValueError("noise=NoiseConfig(...) is not supported with differentiable=True")
        params = self._params()
        for i, p in enumerate(params):
            if p.is_complex():
                raise ValueError(f"noise: parameter {i} (shape {tuple(p.shape)}) is complex; noise injection needs real parameters")
        if cfg.measured and eng.mode not in ("diag", "lowrank"):
            what = (
                f"emulate_batch_size={cfg.emulate_batch_size}" if cfg.emulate_batch_size is not None
                else "a target with additive=False"
            )
            raise ValueError(
                f"noise: {what} subtracts the measured per-element noise Σ_step, which needs stats='diag' or "
                f"'lowrank' (got stats={eng.mode!r}); or pass additive=True to inject the target as is"
            )
        if cfg.measured and eng.stats_every != 1:
            raise ValueError(
                f"noise: a residual built from the measured noise needs the statistics every step "
                f"(stats_every=1, got {eng.stats_every})"
            )
        if cfg.emulate_batch_size is not None:
            b = eng.batch_size
            if b is None:
                raise ValueError("noise: emulate_batch_size needs the real batch size: pass batch_size=B to the optimizer")
            if cfg.emulate_batch_size > b:
                raise ValueError(
                    f"noise: emulate_batch_size={cfg.emulate_batch_size} > batch_size={b} is infeasible: a larger "
                    "batch needs less noise than the step already has (R = Σ_step·(B/B' − 1) < 0)"
                )
        tgt = cfg.target
        if isinstance(tgt, (DiagonalTarget, LowRankTarget)):
            entries = tgt.variances if isinstance(tgt, DiagonalTarget) else tgt.factors
            if len(entries) != len(params):
                raise ValueError(
                    f"noise.target: got {len(entries)} entries but the optimizer has {len(params)} parameters "
                    "(one per parameter in param_groups order; None for none)"
                )
            for i, (p, e) in enumerate(zip(params, entries)):
                if e is None:
                    continue
                n = e.numel() if isinstance(tgt, DiagonalTarget) else e[0].shape[0]
                if n != p.numel():
                    raise ValueError(
                        f"noise.target: entry {i} covers {n} elements but parameter {i} has shape {tuple(p.shape)} "
                        f"({p.numel()} elements)"
                    )

    # ------------------------------------------------------------------ checkpoint
    def attach(self, optimizer: Any) -> None:
        """Register the state_dict hooks on ``optimizer`` (idempotent; again after unpickling, which drops them)."""
        self.optimizer = optimizer
        hooks = getattr(optimizer, "_optimizer_state_dict_post_hooks", {})
        if any(isinstance(h, _StateDictPost) and h.injector is self for h in hooks.values()):
            return
        optimizer.register_state_dict_post_hook(_StateDictPost(self))
        optimizer.register_load_state_dict_pre_hook(_LoadPre(self))
        optimizer.register_load_state_dict_post_hook(_LoadPost(self))

    def state_dict(self) -> dict[str, Any]:
        """Seed, counter and controller state (CPU values)."""
        return {
            "seed": self.seed,
            "counter": self.counter,
            "controller": None if self.controller is None else self.controller.state_dict(),
            "warned_infeasible": self._warned_infeasible,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in ("seed", "counter", "controller"):
            if k not in state:
                raise ValueError(f"noise state is missing {k!r}")
        self.seed = int(state["seed"])
        self.counter = int(state["counter"])
        if self.controller is not None and state["controller"] is not None:
            self.controller.load_state_dict(state["controller"])
        self._warned_infeasible = bool(state.get("warned_infeasible", False))

    # ------------------------------------------------------------------ residuals
    def _target(self, index: int, p: Tensor) -> LowRankDiag | None:
        cached = self._targets.get(index)
        if cached is not None and cached.diag.device == p.device:
            return cached
        tgt = self.config.target
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        d = p.numel()
        if isinstance(tgt, IsotropicTarget):
            out = LowRankDiag(d, torch.tensor(tgt.sigma2, dtype=dtype, device=p.device))
        elif isinstance(tgt, DiagonalTarget):
            v = tgt.variances[index] if index < len(tgt.variances) else None
            out = None if v is None else LowRankDiag(d, v.reshape(-1).to(device=p.device, dtype=dtype))
        elif isinstance(tgt, LowRankTarget):
            f = tgt.factors[index] if index < len(tgt.factors) else None
            if f is None:
                out = None
            else:
                u, s, dd = f
                diag = dd.reshape(-1) if isinstance(dd, Tensor) else torch.tensor(dd)
                diag = diag.to(device=p.device, dtype=dtype)
                if diag.numel() == 1:
                    diag = diag.reshape(())
                out = LowRankDiag(d, diag, u.to(device=p.device, dtype=dtype), s.to(device=p.device, dtype=dtype))
        else:
            out = None
        if out is not None:
            self._targets[index] = out
        return out

    def _capture_scale(self, grad_scale: Tensor | None) -> Tensor | None:
        # The loss scale still carried by the captured contributions (mirrors NoiseStats.finish_step).
        eng = self.optimizer._stats
        if grad_scale is not None:
            return grad_scale
        if eng.grad_scaler is not None:
            return getattr(eng.grad_scaler, "_scale", None)
        return None

    def _measured(self, p: Tensor, grad_scale: Tensor | None) -> LowRankDiag | None:
        """This step's Σ_step of ``p`` (diag, or Nyström U S Uᵀ + D) from the engine's buffers; None if undefined.

        diag Σ_step = c² · n/((n−1)W²) · (Σ_k x_k² − (Σ_k x_k)²/n) with Σ_k x_k = W ḡ / c (SPEC §2; c the recorded
        gradient-clipping coefficient, the loss scale divided out of both sums).
        """
        eng = self.optimizer._stats
        slot = eng.slots.get(id(p))
        if slot is None or slot.sumsq is None or slot.count < 1 or not eng.measuring_this_step():
            return None
        world, _ = eng._world()
        n = float(slot.count * world)
        if n < 2:
            return None
        ct = torch.float64 if p.dtype == torch.float64 else torch.float32
        g = p.grad.reshape(-1).to(ct)
        if grad_scale is not None:
            g = g / grad_scale.to(device=g.device, dtype=ct)
        cap = self._capture_scale(grad_scale)
        inv_cap2 = None if cap is None else cap.to(device=g.device, dtype=ct).reciprocal().square()
        clip = eng.clip_coef
        clip_t = None if clip is None else clip.to(device=g.device, dtype=ct)
        gsum = g * world if clip_t is None else g * world / clip_t
        q = slot.sumsq.reshape(-1).to(ct)
        if inv_cap2 is not None:
            q = q * inv_cap2
        factor = n / ((n - 1.0) * world * world)
        diag = ((q - gsum * gsum / n) * factor).clamp(min=0.0)
        basis = lam = None
        if eng.mode == "lowrank" and slot.sketch is not None:
            omega = eng._omega(slot, g.numel(), g.device)  # the Ω the hooks used this step (step not yet counted)
            sk = slot.sketch.to(ct)
            if inv_cap2 is not None:
                sk = sk * inv_cap2
            y = (sk - torch.outer(gsum, gsum @ omega.to(ct)) / n) * factor
            basis, lam = nystrom(y, omega)
            basis, lam = basis.to(ct), lam.to(ct)
            diag = (diag - (basis * basis) @ lam).clamp(min=0.0)
        if clip_t is not None:
            c2 = clip_t.square()
            diag = diag * c2
            lam = None if lam is None else lam * c2
        return LowRankDiag(p.numel(), diag, basis, lam)

    def _residual(self, p: Tensor, index: int, grad_scale: Tensor | None) -> tuple[LowRankDiag, Tensor] | None:
        """(R⁺, tr R⁺ − tr R) for ``p`` at unit controller scale, or None when no noise applies this step."""
        cfg = self.config
        if cfg.emulate_batch_size is not None:
            meas = self._measured(p, grad_scale)
            if meas is None:
                return None
            ratio = self.optimizer._stats.batch_size / cfg.emulate_batch_size - 1.0
            return psd_clip(meas.scaled(ratio))
        target = self._target(index, p)
        if target is None:
            return None
        if cfg.additive:
            # A fixed residual: clip once per parameter (and device).
            cached = self._clipped.get(index)
            if cached is None or cached[0].diag.device != p.device:
                cached = self._clipped[index] = psd_clip(target)
            return cached
        meas = self._measured(p, grad_scale)
        if meas is None:
            return None
        return psd_clip(target.minus(meas))

    # ------------------------------------------------------------------ the step
    def _metric_divisor(self, device: torch.device) -> Tensor | None:
        """What turns a temperature into the tracked metric: 1 (NE_t) or Curv_t (P-NE*_t); None if unknown yet."""
        if self.config.metric == "temperature":
            return torch.ones((), dtype=torch.float64, device=device)
        curv = self.optimizer._stats.curvature
        if curv is None:
            if not self._warned_curvature:
                warnings.warn(
                    "pnekern noise: metric='pne_star' needs a curvature reference (attach a CurvatureProbe); the "
                    "injection scale is held until one is measured",
                    RuntimeWarning, stacklevel=6,
                )
                self._warned_curvature = True
            return None
        c = curv if isinstance(curv, Tensor) else torch.tensor(float(curv), dtype=torch.float64)
        return c.to(device=device, dtype=torch.float64).clamp(min=1e-12)

    def _eff_lr(self, p: Tensor, step: int) -> float:
        """The coefficient exposure uses for gradient-space noise: η, or the bias-corrected c_s (as the engine)."""
        group = self.optimizer._group_of(p)
        lr = _scalar(group["lr"])
        if self.optimizer._stats.bias_corrected:
            return bias_corrected_coefficient(lr, _scalar(group["betas"][0]), step)
        return lr

    @torch.no_grad()
    def prepare(
        self, todo: list[tuple[int, int, Tensor]], grad_scale: Tensor | None, backends: dict[int, str] | None = None
    ) -> _StepNoise:
        """Draw this step's noise for the parameters in ``todo`` (or, for those whose fused step draws it in-step,
        prepare the kernel's operands); mutates nothing the optimizer owns. ``backends``: id(p) -> the backend the
        step will use for p (None: every parameter takes the Python path)."""
        opt, cfg = self.optimizer, self.config
        eng = opt._stats
        measuring = eng.measuring_this_step()
        index = {id(p): i for i, p in enumerate(self._params())}
        entries: dict[int, _Entry] = {}
        gradient = cfg.space == "gradient"
        into_v = gradient and cfg.into_second_moment
        predict = self.controller is not None and gradient
        for _, _, p in todo:
            i = index[id(p)]
            res = self._residual(p, i, grad_scale)
            if res is None:
                continue
            cov, mass = res
            dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            if backends is not None and self.in_step_ok(p, backends.get(id(p), "")):
                e = _Entry(param=p, index=i, cov=cov, mass=mass, eps=None, in_step=True)
                self._kernel_operands(e)
            else:
                eps = sample_noise(cov, self.seed, self.counter, i, device=p.device, dtype=dtype,
                                   chunk_elems=cfg.chunk_elems)
                e = _Entry(param=p, index=i, cov=cov, mass=mass, eps=eps.view(p.shape))
            if predict or (measuring and (eng.mode == "trace" or into_v)):
                v, inv_sqrt_bc2, adam_eps = opt._precond_for(p)
                a_prev = (
                    torch.ones(p.shape, dtype=torch.float64, device=p.device) if v is None
                    else 1.0 / (v.to(torch.float64).sqrt() * inv_sqrt_bc2 + adam_eps)
                )
                e.tr_prev = cov.precond_trace(a_prev)
                if into_v and measuring and not e.in_step:  # in-step: the kernel's rows see the clean g
                    g64 = p.grad.to(torch.float64)
                    if grad_scale is not None:
                        g64 = g64 / grad_scale.to(device=p.device, dtype=torch.float64)
                    g2 = g64 * g64
                    e.rows_pre = (g2.sum(), (a_prev * a_prev * g2).sum())
            entries[id(p)] = e
        scale = None
        if predict and entries:
            # Gradient space: the scale must be fixed before the kernel; predict the unit exposure with A_{t−1}.
            first = next(iter(entries.values())).param
            div = self._metric_divisor(first.device)
            kappa = eng.current_kappa()
            unit = None
            if div is not None:
                unit = sum(
                    self._eff_lr(e.param, eng.step_count + 1) * kappa * e.tr_prev.to(first.device) for e in entries.values()
                ) / div
            scale = self.controller.scale(cfg.schedule(self.counter + 1), unit)
        for e in entries.values():
            p = e.param
            if e.in_step:
                continue  # the kernel multiplies ε by sqrt(scale) (noise_scale)
            if scale is not None:
                e.eps = e.eps * scale.to(device=p.device, dtype=e.eps.dtype).sqrt()
            if into_v:
                g = p.grad.to(e.eps.dtype)
                noise = e.eps if grad_scale is None else e.eps * grad_scale.to(device=p.device, dtype=e.eps.dtype)
                e.noisy_grad = (g + noise).to(p.grad.dtype)
        if eng.mode != "trace" and not into_v:
            for e in entries.values():
                e.tr_prev = None  # exposure uses A_t (diag/lowrank statistics), computed after the update
        return _StepNoise(self, entries, scale, grad_scale, measuring, self.counter)

    def _kernel_operands(self, e: _Entry) -> None:
        """δ (fp32, [d] or [1]), U (fp32 [d, k]) and c = fp32(sqrt(s)·z_r) for the in-step draw; c is computed
        exactly as sample_noise computes it, so the kernel's ε equals sample_noise's up to the normals' last bits."""
        cov, p = e.cov, e.param
        f32 = torch.float32
        e.kernel_var = cov.diag.reshape(-1).to(device=p.device, dtype=f32).contiguous()
        e.kernel_basis = e.kernel_coef = None
        k = cov.rank
        if k > 0:
            z_r = lowrank_normals(self.seed, self.counter, e.index, cov.numel, k, device=p.device)
            coef = cov.eig.to(device=p.device, dtype=torch.float64).clamp(min=0.0).sqrt() * z_r.to(torch.float64)
            e.kernel_basis = cov.basis.to(device=p.device, dtype=f32).contiguous()
            e.kernel_coef = coef.to(cov.basis.dtype).to(f32)

    @torch.no_grad()
    def _after_update(self, plan: _StepNoise, rows: dict[int, Tensor], found_inf: Tensor | None) -> None:
        opt, cfg = self.optimizer, self.config
        eng = opt._stats
        kappa = eng.current_kappa()
        a_news: dict[int, Tensor] = {id(e.param): opt.preconditioner([e.param])[0] for e in plan.entries.values()}
        if cfg.space == "parameter":
            # ζ is added after the update, so its exposure η κ Tr(A_t R⁺ A_t) is known exactly before drawing c_t.
            for e in plan.entries.values():
                e.tr_unit = e.cov.precond_trace(a_news[id(e.param)])
            if self.controller is not None and plan.entries:
                device = next(iter(plan.entries.values())).param.device
                div = self._metric_divisor(device)
                unit = None
                if div is not None:
                    unit = sum(
                        _scalar(opt._group_of(e.param)["lr"]) * kappa * e.tr_unit.to(device) for e in plan.entries.values()
                    ) / div
                plan.scale = self.controller.scale(cfg.schedule(plan.step + 1), unit)
        for e in plan.entries.values():
            p = e.param
            group = opt._group_of(p)
            state = opt.state[p]
            lr = _scalar(group["lr"])
            beta1 = _scalar(group["betas"][0])
            skip = None if found_inf is None else found_inf.to(p.device).reshape(()) != 0
            a_new = a_news[id(p)]
            if e.in_step:
                # The kernel added ε (or ζ) in-step, unscaled p.grad and kept its statistics rows clean.
                if cfg.space == "gradient":
                    e.tr_unit = e.tr_prev if eng.mode == "trace" and e.tr_prev is not None else e.cov.precond_trace(a_new)
                continue
            ct = e.eps.dtype
            if cfg.space == "parameter":
                # ζ ~ N(0, η² κ A_t (c R⁺) A_t)  [θ²]  (SPEC §5 [fix]: the drafts omit η²)
                eps = e.eps if plan.scale is None else e.eps * plan.scale.to(device=p.device, dtype=ct).sqrt()
                zeta = (lr * math.sqrt(kappa)) * a_new.to(ct) * eps
                new_p = p.to(ct) + zeta
                p.copy_(new_p if skip is None else torch.where(skip, p.to(ct), new_p))
                continue
            if not cfg.into_second_moment:
                # The kernel stepped on the clean gradient; add ε's (linear) share of m and of the update.
                sign = -1.0 if group["maximize"] else 1.0
                step_now = _scalar(state["step"]) if state["step"].device.type == "cpu" else float(state["step"].cpu())
                bc1 = 1.0 - beta1**step_now
                m = state["exp_avg"]
                dm = ((1.0 - beta1) * sign) * e.eps
                dp = (-(lr / bc1) * (1.0 - beta1) * sign) * a_new.to(ct) * e.eps
                new_m, new_p = m.to(ct) + dm, p.to(ct) + dp
                if skip is not None:
                    new_m = torch.where(skip, m.to(ct), new_m)
                    new_p = torch.where(skip, p.to(ct), new_p)
                m.copy_(new_m)
                p.copy_(new_p)
            else:
                if plan.grad_scale is not None:
                    # The kernel unscaled the temporary; honour the fused-AdamW contract for p.grad as well.
                    s = plan.grad_scale.to(device=p.device, dtype=ct)
                    g = p.grad.to(ct) / s
                    p.grad.copy_(g if skip is None else torch.where(skip, p.grad.to(ct), g))
                if e.rows_pre is not None and id(p) in rows:
                    # Natural-noise statistics must see the clean gradient ḡ, not ḡ + ε.
                    old = rows[id(p)]
                    cols = [e.rows_pre[0], e.rows_pre[1]]
                    if old.shape[0] > 2:  # trace-mode rows have only the first two columns
                        g64 = p.grad.to(torch.float64)  # clean and already unscaled (a skipped step's row is zeroed)
                        a64 = a_new.to(torch.float64)
                        cols += [(a64 * a64 * g64 * g64).sum(), old[-1].to(torch.float64)]
                        if old.shape[0] == PRECOND_NEW_STATS_COLS:
                            cols = [cols[c] for c in PRECOND_NEW_COLUMNS]
                    row = torch.stack(cols)
                    row = row.to(old.device)
                    if skip is not None:
                        row = torch.where(skip.to(row.device), torch.zeros_like(row), row)
                    rows[id(p)] = row
            # Gradient space: exposure with the statistics' A (A_{t−1} in trace mode, A_t in diag/lowrank mode).
            e.tr_unit = e.tr_prev if eng.mode == "trace" and e.tr_prev is not None else e.cov.precond_trace(a_new)
        self.counter += 1

    @torch.no_grad()
    def _finish(self, plan: _StepNoise) -> None:
        opt, cfg = self.optimizer, self.config
        eng = opt._stats
        last = eng.last
        if last is None or last.held or last.step != eng.step_count or isinstance(last, NoisyStepStats):
            return
        device = last.pne.device
        f64 = torch.float64
        zero = torch.zeros((), dtype=f64, device=device)
        kappa = last.kappa
        temp_unit, diff_unit, mass = zero.clone(), zero.clone(), zero.clone()
        scale = plan.scale.to(device=device, dtype=f64) if plan.scale is not None else torch.ones((), dtype=f64, device=device)
        per_param_extra: dict[str, dict[str, Tensor]] = {}
        for e in plan.entries.values():
            p = e.param
            if cfg.space == "gradient":
                eff = self._eff_lr(p, eng.step_count)
            else:
                eff = _scalar(opt._group_of(p)["lr"])  # ζ is added directly: its diffusion is η² κ Tr(A cR⁺ A)
            tr = (e.tr_unit if e.tr_unit is not None else zero).to(device=device, dtype=f64)
            t_p, d_p = eff * kappa * tr, eff * eff * kappa * tr
            temp_unit = temp_unit + t_p
            diff_unit = diff_unit + d_p
            m = e.mass.to(device=device, dtype=f64)
            mass = mass + m
            slot = eng.slots.get(id(p))
            if slot is not None:
                per_param_extra[slot.name] = {
                    "temperature_injected": t_p * scale, "diffusion_injected": d_p * scale, "infeasible_mass": m,
                }
        temp_inj, diff_inj = temp_unit * scale, diff_unit * scale
        if last.skipped is not None:
            temp_inj = torch.where(last.skipped, zero, temp_inj)
            diff_inj = torch.where(last.skipped, zero, diff_inj)
        base = {f.name: getattr(last, f.name) for f in fields(StepStats)}
        total_t = last.temperature + temp_inj if last.temperature is not None else temp_inj
        total_d = last.diffusion + diff_inj if last.diffusion is not None else diff_inj
        d_add = torch.nan_to_num(diff_inj, nan=0.0)
        eng.pne = d_add.clone() if eng.pne is None else eng.pne + d_add
        eng.last_diffusion = d_add if eng.last_diffusion is None else eng.last_diffusion + d_add
        t_add = torch.nan_to_num(temp_inj, nan=0.0)
        eng.last_temperature = t_add if eng.last_temperature is None else eng.last_temperature + t_add
        # Schedules run on the optimizer's step number (the noise counter, restored by load_state_dict), not the
        # statistics engine's, so a resumed run sees the same targets.
        step_no = plan.step + 1
        target = None
        if self.controller is not None:
            target = cfg.schedule(step_no)
        base.update(
            temperature=total_t, diffusion=total_d, pne=eng.pne.clone(), pne_star=eng._pne_star(total_t),
            temperature_preclip=None if last.temperature_preclip is None else last.temperature_preclip + temp_inj,
        )
        per_param = {k: dict(v) for k, v in last.per_param.items()}
        for name, extra in per_param_extra.items():
            per_param.setdefault(name, {}).update(extra)
        base["per_param"] = per_param
        new = NoisyStepStats(
            **base, temperature_sampled=last.temperature, temperature_injected=temp_inj,
            diffusion_sampled=last.diffusion, diffusion_injected=diff_inj, injection_scale=scale, infeasible_mass=mass,
            target=target,
        )
        eng.last = new
        eng.log.update_last(new.record())
        self._maybe_warn_infeasible(mass, per_param_extra, last.step, device)
        if self.controller is not None and last.temperature is not None:
            div = self._metric_divisor(device)
            if div is not None:
                self.controller.update(target, total_t / div, last.temperature / div)

    def _maybe_warn_infeasible(self, mass: Tensor, per_param: dict[str, dict[str, Tensor]], step: int, device: torch.device) -> None:
        # One host read per step on CPU; on accelerators only every 100th step (no sync in the hot path).
        if self._warned_infeasible or (device.type != "cpu" and step % 100 != 1):
            return
        if not float(mass) > 0.0:
            return
        names = [n for n, d in per_param.items() if float(d["infeasible_mass"]) > 0.0]
        warnings.warn(
            f"pnekern noise: the target is below the measured gradient noise at step {step}; the negative part of "
            f"the residual was clipped (infeasible mass tr R⁺ − tr R = {float(mass):.4g} g²) in {len(names)} "
            f"parameter(s): {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}. That noise cannot be removed "
            "by injection; see last_stats().infeasible_mass for every step.",
            RuntimeWarning, stacklevel=5,
        )
        self._warned_infeasible = True


class _StateDictPost:
    """state_dict post-hook adding the noise state (a class, not a closure, so optimizers stay picklable)."""

    def __init__(self, injector: NoiseInjector) -> None:
        self.injector = injector

    def __call__(self, optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict[STATE_KEY] = self.injector.state_dict()
        return state_dict


class _LoadPre:
    def __init__(self, injector: NoiseInjector) -> None:
        self.injector = injector

    def __call__(self, optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        # torch passes a shallow copy: popping here does not touch the caller's dict.
        self.injector._pending_state = state_dict.pop(STATE_KEY, None)
        return state_dict


class _LoadPost:
    def __init__(self, injector: NoiseInjector) -> None:
        self.injector = injector

    def __call__(self, optimizer: Any) -> None:
        pending, self.injector._pending_state = self.injector._pending_state, None
        if pending is not None:
            self.injector.load_state_dict(pending)
