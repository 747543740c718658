"""Drop-in ``torch.optim.AdamW`` whose step runs on pnekern's fused kernels.

Subclassing ``torch.optim.AdamW`` gives us torch's constructor validation (identical exceptions and messages),
param-group defaults, ``__setstate__`` upgrades, state_dict/load_state_dict device and dtype policy, hooks,
``zero_grad`` and LR-scheduler compatibility for free; only ``step`` is ours.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import _get_scalar_dtype

try:  # the device list torch's capturable check uses (private, present in the torch versions we support)
    from torch.optim.optimizer import _get_capturable_supported_devices
except ImportError:  # pragma: no cover - older/newer torch without it
    def _get_capturable_supported_devices() -> list[str]:
        return ["cuda", "xpu", "hpu", torch._C._get_privateuse1_backend_name()]

from .. import ops
from ..reference.adamw import PRECOND_NEW_STATS_COLS, TRACE_STATS_COLS
from ..noise.config import NoiseConfig
from ..noise.injector import NoiseInjector
from ..stats.engine import STATE_KEY as STATS_STATE_KEY
from ..stats.engine import STATS_MODES, NoiseStats, StepRows, StepStats

__all__ = ["AdamW"]


def _scalar(x: float | Tensor) -> float:
    # Hyperparameters may be 0-dim tensors (Tensor lr/betas). Reading a CPU tensor is not a device sync.
    return float(x) if isinstance(x, Tensor) else x


class AdamW(torch.optim.AdamW):
    """AdamW with torch's exact semantics, computed by a fused pnekern backend.

    Args:
        params, lr, betas, eps, weight_decay, amsgrad, maximize, foreach, capturable, differentiable, fused:
            exactly as ``torch.optim.AdamW`` (same defaults, same validation errors). ``foreach``/``fused`` are
            validated and stored in the param groups (so checkpoints round-trip with torch) but the kernel is chosen
            by ``backend``. ``differentiable=True`` runs torch's own single-tensor path so autograd flows through the
            step.
        backend: ``"auto"`` (default; also settable by env ``PNEKERN_BACKEND``), ``"reference"`` (pure PyTorch,
            fp32 math), ``"cpp"`` (fused OpenMP+SIMD kernel, CPU), ``"triton"``/``"cuda"`` (GPU, where built).
            ``auto`` picks ``cpp`` for CPU fp32/bf16/fp16 tensors and ``reference`` otherwise.
        check_finite: when True, raise RuntimeError before anything changes if a gradient holds NaN/inf
            (costs one host sync per step; off by default).
        stats: gradient-noise statistics measured in the step (SPEC §2): None (off), ``"trace"`` (scalars only,
            no per-element memory; A = A_{t−1}), ``"diag"`` (+ one fp32 buffer per parameter: exact A_t and the
            per-element diag Σ), ``"lowrank"`` (+ a d×``stats_rank`` Nyström sketch: U S Uᵀ + D per parameter).
            Needs n ≥ 2 backward calls (micro-batches) per step; read with :meth:`last_stats`, :attr:`exposure`.
        batch_size: examples per optimizer step B (all micro-batches, all workers); enables ``noise_scale``.
        stats_every: compute statistics every N-th step only; exposure is held (and marked) in between.
        kappa: momentum variance amplification: ``"ema"`` (1, Adam's EMA momentum, default), ``"heavy_ball"``
            (1/(1−β1)², the drafts' convention), ``"calibrated"`` (mean-squared-displacement fit) or a float.
        bias_corrected: use the bias-corrected per-step coefficient c_s instead of η (early steps weigh ~3η).
        stats_rank: rank r of the lowrank sketch. gns_beta: EMA factor of the noise-scale smoothing.
        data_parallel: None = auto (torch.distributed initialized with world size > 1): combine every worker's
            contributions (SPEC §2 DDP formula); ``process_group`` is the group DDP averages over.
        stats_seed: seeds the lowrank sketch's Ω and the coordinate subsets. calibration_every: steps between κ
            fits (``kappa="calibrated"``). tail_coords: coordinates per contribution kept for :meth:`tail_index`
            (diag/lowrank modes).
        noise: :class:`pnekern.NoiseConfig` (SPEC §5): inject gradient- or parameter-space noise toward a target
            covariance / emulated batch size / exposure schedule, from a Philox stream whose seed and counter are in
            ``state_dict()``; ``last_stats()`` then reports totals and parts. None (default): no noise, and the step
            is exactly the one without this argument.

    GradScaler: the step consumes ``grad_scale``/``found_inf`` itself (like torch's ``fused=True``): gradients are
    unscaled in the kernel and a step with ``found_inf`` changes nothing and is not counted.
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str | None = None,
        check_finite: bool = False,
        stats: str | None = None,
        batch_size: int | None = None,
        stats_every: int = 1,
        kappa: str | float = "ema",
        bias_corrected: bool = False,
        stats_rank: int = 8,
        gns_beta: float = 0.95,
        data_parallel: bool | None = None,
        process_group: Any = None,
        stats_seed: int = 0,
        calibration_every: int = 200,
        tail_coords: int = 2048,
        noise: NoiseConfig | None = None,
    ) -> None:
        backend = ops.default_backend() if backend is None else ops.validate_backend(backend)
        if backend in ("auto", "cpp"):
            # Load the extension now, outside any compiled region: torch.compile cannot trace the loader's lock,
            # and a step compiled with fullgraph=True would otherwise fail on its first call.
            ops.native_available()
        if stats not in STATS_MODES:
            raise ValueError(f"stats={stats!r} is not a statistics mode; choose one of None, 'trace', 'diag', 'lowrank'")
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
        )
        if differentiable and backend not in ("auto", "reference"):
            raise ValueError(
                f"differentiable=True needs an autograd-traceable step; backend={backend!r} is a fused kernel. "
                "Use backend='auto' or 'reference'."
            )
        self.backend = backend
        self.check_finite = bool(check_finite)
        self._probes: list[Any] = []
        self._probe_steps = 0  # steps taken, for probes' schedules when statistics are off
        self.last_probe_result: Any = None
        self._stats: NoiseStats | None = None
        if stats is not None:
            self._stats = NoiseStats(
                self, stats, self._precond_for, beta1=self._beta1_for, batch_size=batch_size, kappa=kappa,
                bias_corrected=bias_corrected, stats_every=stats_every, rank=stats_rank, gns_beta=gns_beta,
                backend="reference" if differentiable else backend, data_parallel=data_parallel,
                process_group=process_group, seed=stats_seed, shrink=self._shrink_for,
                calibration_every=calibration_every, tail_coords=tail_coords,
            )
        elif batch_size is not None:
            raise ValueError("batch_size is only used by the noise statistics; pass stats='trace' (or diag/lowrank) too")
        # Our kernels unscale gradients and honour found_inf in-step, so GradScaler hands them over instead of
        # unscaling p.grad in place (torch's fused AdamW contract).
        self._step_supports_amp_scaling = not differentiable
        # Noise injection (SPEC §5, pnekern.noise); validated here, before any step.
        self._noise: NoiseInjector | None = None if noise is None else NoiseInjector(self, noise)

    # Optimizer.__getstate__ keeps only defaults/state/param_groups; our settings must survive deepcopy/pickle.
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["backend"] = self.backend
        state["check_finite"] = self.check_finite
        state["_step_supports_amp_scaling"] = getattr(self, "_step_supports_amp_scaling", False)
        state["_stats"] = getattr(self, "_stats", None)
        state["_probes"] = getattr(self, "_probes", [])
        state["_probe_steps"] = getattr(self, "_probe_steps", 0)
        state["_noise"] = getattr(self, "_noise", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's load_state_dict also calls __setstate__ (with only state/param_groups): keep our current
        # settings then; the defaults are for unpickling objects saved before a setting existed.
        for key, default in (
            ("backend", "auto"), ("check_finite", False), ("_stats", None), ("_probes", []), ("_probe_steps", 0),
            ("last_probe_result", None), ("_noise", None),
        ):
            state.setdefault(key, self.__dict__.get(key, default))
        super().__setstate__(state)
        # The statistics engine re-hooked the copied parameters in its own __setstate__.
        if self._noise is not None:
            self._noise.attach(self)  # torch drops the state_dict hooks on pickling

    def state_dict(self) -> dict[str, Any]:
        """torch's state_dict, plus the statistics engine's state under ``"pnekern_stats"`` (stats enabled).

        torch's load_state_dict ignores the extra key, so torch.optim.AdamW loads our checkpoints.
        """
        sd = super().state_dict()
        if getattr(self, "_stats", None) is not None:
            sd[STATS_STATE_KEY] = self._stats.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load_state_dict; also restores the statistics (when the checkpoint has them) so that the run
        continues with identical ``last_stats()`` and exposure values. A checkpoint without them (e.g. from
        torch.optim.AdamW) leaves the statistics as they are."""
        stats_state = state_dict.get(STATS_STATE_KEY) if isinstance(state_dict, dict) else None
        super().load_state_dict(state_dict)
        stats = getattr(self, "_stats", None)
        if stats is not None:
            if stats_state is not None:
                stats.load_state_dict(stats_state)
            else:
                stats.invalidate_caches()  # the state tensors A_{t−1} is read from were replaced

    # ------------------------------------------------------------------ statistics API
    def _group_of(self, p: Tensor) -> dict[str, Any]:
        # Called from the capture hook for every parameter and micro-batch: cache the lookup. load_state_dict
        # replaces the group dicts, so a cached group is trusted only while it is still one of param_groups.
        cache = self.__dict__.setdefault("_group_cache", {})
        group = cache.get(id(p))
        if group is not None and any(g is group for g in self.param_groups):
            return group
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                cache[id(p)] = group
                return group
        raise KeyError("parameter is not managed by this optimizer")

    def _shrink_for(self, p: Tensor) -> float:
        group = self._group_of(p)
        return 1.0 - _scalar(group["lr"]) * _scalar(group["weight_decay"])

    def _beta1_for(self, p: Tensor) -> float:
        return _scalar(self._group_of(p)["betas"][0])

    def _precond_for(self, p: Tensor) -> tuple[Tensor | None, float, float]:
        """Adam's preconditioner before this step's update: (v, 1/sqrt(bc2), eps); v None before step 1."""
        group = self._group_of(p)
        state = self.state.get(p)
        if not state or "step" not in state:
            return None, 1.0, group["eps"]
        step = float(state["step"]) if state["step"].device.type == "cpu" else None
        if step is None:
            # Device-resident step (capturable/fused): bias correction as a tensor would need a sync here.
            step = float(state["step"].cpu())
        if step <= 0:
            return None, 1.0, group["eps"]
        beta2 = _scalar(group["betas"][1])
        v = state["max_exp_avg_sq"] if group["amsgrad"] and "max_exp_avg_sq" in state else state["exp_avg_sq"]
        return v, 1.0 / (1.0 - beta2**step) ** 0.5, group["eps"]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        stats = getattr(self, "_stats", None)
        if stats is not None:
            stats.track_group(self.param_groups[-1], len(self.param_groups) - 1)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        # Discarded gradients take their captured contributions with them.
        if getattr(self, "_stats", None) is not None:
            self._stats.reset()

    def last_stats(self) -> StepStats | None:
        """Statistics of the most recent step (device tensors; ``.to_dict()`` reads them), or None."""
        if self._stats is None:
            raise RuntimeError("statistics are off: construct the optimizer with stats='trace' (or 'diag'/'lowrank')")
        return self._stats.last

    @property
    def exposure(self) -> Any:
        """The :class:`pnekern.stats.ExposureLog` of every measured step (to_jsonl / to_csv / plot)."""
        if self._stats is None:
            raise RuntimeError("statistics are off: construct the optimizer with stats='trace' (or 'diag'/'lowrank')")
        return self._stats.log

    @property
    def noise_stats(self) -> NoiseStats | None:
        """The statistics engine (None when ``stats=None``)."""
        return self._stats

    def tail_index(self, num_boot: int = 200, ci: float = 0.95, block: int | None = None, seed: int = 0) -> Any:
        """α-stable tail index of the gradient noise with a bootstrap CI (stats='diag'/'lowrank'; reads the host)."""
        if self._stats is None:
            raise RuntimeError("statistics are off: construct the optimizer with stats='diag' or 'lowrank'")
        return self._stats.tail_index(num_boot=num_boot, ci=ci, block=block, seed=seed)

    def preconditioner(self, params: list[Tensor] | None = None) -> list[Tensor]:
        """a = 1/(sqrt(v̂)+eps) per parameter (A_t after the last step; ones before the first), for probes."""
        out = []
        for p in params if params is not None else [q for g in self.param_groups for q in g["params"]]:
            group = self._group_of(p)
            state = self.state.get(p)
            if not state or float(state["step"]) == 0:
                out.append(torch.ones_like(p, dtype=torch.float32) if not p.is_complex() else torch.ones(p.shape, device=p.device))
                continue
            step = float(state["step"])
            v = state["max_exp_avg_sq"] if group["amsgrad"] and "max_exp_avg_sq" in state else state["exp_avg_sq"]
            bc2 = 1.0 - _scalar(group["betas"][1]) ** step
            vv = v.abs() if v.is_complex() else v
            out.append(1.0 / (vv.float().sqrt() / bc2**0.5 + group["eps"]))
        return out

    def attach_probe(self, probe: Any) -> None:
        """Run ``probe.measure(a)`` after every step where ``probe.due(step)``; feeds ``curvature``/``pne_star``.

        ``probe`` is e.g. :class:`pnekern.probes.CurvatureProbe`; it receives this optimizer's current A.
        """
        if not (hasattr(probe, "measure") and hasattr(probe, "due")):
            raise TypeError("attach_probe: probe must have measure(precond) and due(step) (e.g. pnekern.probes.CurvatureProbe)")
        self._probes.append(probe)

    def _run_probes(self) -> None:
        step = self._stats.step_count if self._stats is not None else self._probe_steps
        for probe in self._probes:
            if not probe.due(step):
                continue
            result = probe.measure(self.preconditioner(list(probe.params)))
            self.last_probe_result = result
            if self._stats is not None:
                value = result.value
                flagged = getattr(result, "flagged", None)
                if isinstance(flagged, Tensor) and isinstance(value, Tensor):
                    # A Hessian trace <= 0 makes NE/Curv meaningless (SPEC §3): NaN, not a huge clamped ratio.
                    value = torch.where(flagged, torch.full_like(value, float("nan")), value)
                self._stats.set_curvature(value, step)
                if self._stats.last is not None:
                    last = self._stats.last
                    last.curvature = self._stats.curvature
                    last.curvature_held = False
                    if last.temperature is not None:
                        last.pne_star = self._stats._pne_star(last.temperature)
                        self._stats.log.update_last({"curvature": last.curvature, "pne_star": last.pne_star, "curvature_held": False})

    # ------------------------------------------------------------------ validation (no state changes)
    @staticmethod
    def _param_name(gi: int, pi: int, p: Tensor) -> str:
        return f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)}, dtype {p.dtype}, device {p.device})"

    def _validate(self) -> list[tuple[int, int, Tensor]]:
        """Check every parameter with a gradient before anything is mutated; return (group, index, param)."""
        todo: list[tuple[int, int, Tensor]] = []
        resolved: set[tuple[torch.device, torch.dtype]] = set()  # one backend check per (device, dtype), not per param
        check_backend = not self.defaults["differentiable"]
        for gi, group in enumerate(self.param_groups):
            # torch.optim.AdamW asserts this inside its step (after creating state); the same error, before anything.
            capturable_devices = (_get_capturable_supported_devices()
                                  if group["capturable"] and not torch.compiler.is_compiling() else None)
            for pi, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                if capturable_devices is not None and p.device.type not in capturable_devices:
                    raise AssertionError(
                        "If capturable=True, params and state_steps must be on supported devices: "
                        f"{capturable_devices}. {self._param_name(gi, pi, p)} is not; set capturable=False for its "
                        "param group (torch.optim.AdamW raises this too)"
                    )
                # The parameter's name is formatted only for an error (100 f-strings cost ~0.5 ms per step).
                if g.is_sparse:
                    raise RuntimeError(
                        "AdamW does not support sparse gradients, please consider SparseAdam instead: "
                        f"{self._param_name(gi, pi, p)} has a sparse gradient"
                    )
                if not (p.is_floating_point() or p.is_complex()):
                    raise TypeError("AdamW can only optimize floating-point or complex parameters; "
                                    f"{self._param_name(gi, pi, p)} is not")
                if g.shape != p.shape:
                    raise RuntimeError(f"{self._param_name(gi, pi, p)}: gradient shape {tuple(g.shape)} does not "
                                       "match the parameter")
                if check_backend:
                    # Resolving early turns e.g. "cpp on a CUDA tensor" into an error before any state changes.
                    key = (p.device, p.dtype)
                    if key not in resolved:
                        ops.resolve_backend(self.backend, key[0], ops.storage_dtype(key[1]))
                        resolved.add(key)
                todo.append((gi, pi, p))
        if self.check_finite and todo:
            finite = torch.stack([p.grad.isfinite().all().to("cpu") for _, _, p in todo])
            if not bool(finite.all()):  # explicit opt-in host sync
                gi, pi, p = todo[int((~finite).nonzero()[0])]
                raise RuntimeError(
                    f"check_finite=True: the gradient of {self._param_name(gi, pi, p)} holds NaN or inf; "
                    "nothing was updated (skip this step, lower the learning rate, or use a GradScaler)"
                )
        return todo

    # ------------------------------------------------------------------ state
    def _init_state(self, group: dict[str, Any], p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if len(state) == 0:
            # Same placement and dtypes as torch so state_dicts are interchangeable.
            if group["capturable"] or group["fused"]:
                state["step"] = torch.zeros((), dtype=_get_scalar_dtype(is_fused=group["fused"]), device=p.device)
            else:
                state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif group["amsgrad"] and "max_exp_avg_sq" not in state:
            # amsgrad switched on for a param that already has state (e.g. a torch checkpoint without it).
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def _fused_step(self, todo: list[tuple[int, int, Tensor]]) -> None:
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        stats = self._stats
        measuring = stats is not None and stats.measuring_this_step()
        use_sumsq = measuring and stats.mode in ("diag", "lowrank")
        if use_sumsq:
            stats.reduce_buffers()  # the step's Σ a_t² q column must see every worker's contributions
        # Noise is drawn before anything is mutated (a failing draw leaves params/state untouched).
        noise = None
        if self._noise is not None:
            # Every fused backend (reference, cpp, triton) draws the noise in-step where the injector allows it.
            backends = {
                id(p): ops.resolve_backend(self.backend, p.device, ops.storage_dtype(p.dtype))
                for _, _, p in todo
            }
            noise = self._noise.prepare(todo, grad_scale, backends)
        rows = StepRows()
        lrs: dict[int, float] = {}
        resolved: dict[tuple[torch.device, torch.dtype], str] = {}
        by_group: dict[int, list[Tensor]] = defaultdict(list)
        for gi, _, p in todo:
            by_group[gi].append(p)
        for gi, plist in by_group.items():
            group = self.param_groups[gi]
            beta1, beta2 = group["betas"]
            amsgrad = group["amsgrad"]
            lr = _scalar(group["lr"])
            buckets: dict[tuple[str, torch.device, torch.dtype], dict[str, list[Tensor]]] = {}
            state_of = self.state
            for p in plist:
                # Per-parameter host work runs for every tensor every step: plain loops and locals, no generators
                # (~1.5 µs less per parameter than all(...) over a generator and setdefault with a fresh default).
                state = state_of.get(p)
                if not state or (amsgrad and "max_exp_avg_sq" not in state):
                    state = self._init_state(group, p)
                tensors = [p, p.grad if noise is None else noise.grad_for(p), state["exp_avg"], state["exp_avg_sq"]]
                if amsgrad:
                    tensors.append(state["max_exp_avg_sq"])
                if p.is_complex():
                    tensors = [torch.view_as_real(t) for t in tensors]
                dtype = tensors[0].dtype
                device = p.device
                rkey = (device, dtype)
                backend = resolved.get(rkey)
                if backend is None:
                    backend = resolved[rkey] = ops.resolve_backend(self.backend, device, dtype)
                step_t = state["step"]
                if backend == "triton":
                    for t in tensors:
                        if t.dtype != dtype:
                            backend = "reference"  # mixed storage dtypes (e.g. a loaded fp32 state for bf16 params)
                            break
                elif backend == "cpp":
                    # The fused kernel walks flat memory; strided/mixed-dtype tensors take the reference path.
                    if not (step_t.is_cpu and step_t.dtype == torch.float32):
                        backend = "reference"
                    else:
                        for t in tensors:
                            if t.dtype != dtype or not t.is_contiguous():
                                backend = "reference"
                                break
                bkey = (backend, device, dtype)
                b = buckets.get(bkey)
                if b is None:
                    b = buckets[bkey] = defaultdict(list)
                b["params"].append(tensors[0])
                b["grads"].append(tensors[1])
                b["exp_avgs"].append(tensors[2])
                b["exp_avg_sqs"].append(tensors[3])
                if amsgrad:
                    b["max_exp_avg_sqs"].append(tensors[4])
                b["steps"].append(step_t)
                b["orig"].append(p)
                if use_sumsq:
                    q = stats.sumsq_buffer(p)
                    qdtype = torch.float64 if dtype == torch.float64 else torch.float32
                    b["sumsq"].append(q if q is not None else torch.zeros(tensors[0].shape, dtype=qdtype, device=device))
                lrs[id(p)] = lr
            for (backend, device, _), b in buckets.items():
                stats_out = None
                if measuring:
                    # Trace mode reads only Σ g² and Σ a_prev² g², diag/lowrank only Σ g², Σ a_t² g² and Σ a_t² q:
                    # asking for just those columns lets the CPU kernel skip A_t, or A_{t−1} (a sqrt and a division
                    # per element either way, benchmarks/RESULTS.md).
                    ncols = TRACE_STATS_COLS if stats.mode == "trace" else PRECOND_NEW_STATS_COLS
                    stats_out = torch.empty(len(b["params"]), ncols, dtype=torch.float64, device=device)
                ops.adamw_step_(
                    backend,
                    b["params"],
                    b["grads"],
                    b["exp_avgs"],
                    b["exp_avg_sqs"],
                    b.get("max_exp_avg_sqs", []),
                    b["steps"],
                    lr=lr,
                    beta1=_scalar(beta1),
                    beta2=_scalar(beta2),
                    weight_decay=_scalar(group["weight_decay"]),
                    eps=group["eps"],
                    amsgrad=amsgrad,
                    maximize=group["maximize"],
                    grad_scale=None if grad_scale is None else grad_scale.to(device, non_blocking=True),
                    found_inf=None if found_inf is None else found_inf.to(device, non_blocking=True),
                    sumsq_bufs=b.get("sumsq", []),
                    stats_out=stats_out,
                    **(noise.kernel_args(b["orig"]) if noise is not None else {}),
                )
                if stats_out is not None:
                    rows.add(b["orig"], stats_out)
        if noise is not None:
            noise.after_update(rows, found_inf)
        if stats is not None:
            stats.finish_step(
                rows, lrs, found_inf=found_inf, grad_scale=grad_scale,
                precond="new" if stats.mode in ("diag", "lowrank") else "prev",
            )
        if noise is not None:
            noise.finish()

    def _differentiable_step(self) -> None:
        # Autograd through the update: torch's own single-tensor path (same math), not a fused kernel.
        from torch.optim.adam import adam as _torch_adam

        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
            has_complex = self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
            beta1, beta2 = group["betas"]
            _torch_adam(
                params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                amsgrad=group["amsgrad"], has_complex=has_complex, beta1=beta1, beta2=beta2, lr=group["lr"],
                weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"], foreach=False,
                capturable=group["capturable"], differentiable=True, fused=False,
                grad_scale=None, found_inf=None, decoupled_weight_decay=True,
            )

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step (see ``torch.optim.AdamW.step``).

        Every parameter is validated first; a step that raises leaves parameters and state untouched.
        """
        self._accelerator_graph_capture_health_check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.defaults["differentiable"]:
            prev = torch.is_grad_enabled()
            torch.set_grad_enabled(True)
            try:
                self._validate()
                self._differentiable_step()
            finally:
                torch.set_grad_enabled(prev)
            self._probe_steps += 1
            if self._probes:
                with torch.no_grad():
                    self._run_probes()
            return loss
        todo = self._validate()
        if todo:
            self._fused_step(todo)
        self._probe_steps += 1
        if self._probes:
            self._run_probes()
        return loss
