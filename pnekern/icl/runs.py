"""Runs of the ICL harness: a validated config, training with ``pnekern.AdamW`` statistics and an optional curvature
probe, evaluation against the closed-form baselines, report files, and resumable sweeps.

This is the engine behind ``pnekern demo`` and ``pnekern icl train|eval|sweep``. ``pnekern.optim`` and
``pnekern.probes`` are imported inside the functions that need them, so importing :mod:`pnekern.icl` stays cheap
and never depends on the optimizer or probe packages being importable.

Files a run directory holds (all written atomically, so an interrupted run never leaves a half-written result):

- ``config.json`` — the :class:`RunConfig`;
- ``model.pt`` — the trained model's ``state_dict``;
- ``train.json`` — final losses, tokens/updates seen, stop reason, a thinned loss/exposure history;
- ``exposure.jsonl`` — one record per optimizer step (``ExposureLog.to_jsonl``);
- ``eval.json`` / ``report.json`` — errors vs k for the model and the baselines, with bootstrap CIs;
- ``errors_vs_k.png``, ``exposure.png`` when matplotlib is installed.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .baselines import OLS, Averaging, BayesPosteriorMean, OneStepGD, Ridge
from .evaluate import error_vs_k, excess_error_over_bayes
from .models import TOKEN_FORMATS, RegressionTransformer
from .tasks import LinearRegressionTask, make_generator
from .train import TrainResult, train

__all__ = [
    "RunConfig",
    "RegressionProbeAdapter",
    "build_task",
    "build_model",
    "build_optimizer",
    "make_curvature_probe",
    "build_noise_config",
    "RunOutcome",
    "train_run",
    "evaluate_run",
    "exposure_summary",
    "exposure_history",
    "write_json",
    "write_run_files",
    "plot_errors_vs_k",
    "format_error_table",
    "load_run",
    "run_sweep",
]

#: baselines evaluated next to the model, in table order
BASELINE_NAMES = ("bayes", "ridge", "ols", "one_step_gd", "averaging")


@dataclass
class RunConfig:
    """Everything that defines one ICL training run (in-context linear regression, GPT-style model).

    Task: ``d`` input dimension, ``k_max`` examples per sequence, ``noise_var`` σ² of the label noise (y² units),
    β ~ N(0, I_d). Model: :class:`RegressionTransformer` with ``n_layer``/``n_head``/``d_model`` and
    ``token_format`` ("pair" by default: it learns in far fewer steps than Garg et al.'s "interleaved").
    Optimization: ``pnekern.AdamW(lr, weight_decay, stats=stats, batch_size=batch_size, **optimizer_kwargs)``,
    ``steps`` updates of ``batch_size`` sequences split into ``micro_batches`` backward calls (the gradient-noise
    statistics need ≥ 2), warm-up + cosine LR schedule. ``optimizer_kwargs`` carries other options of the optimizer
    straight through. ``noise``: injected noise as a JSON object, turned into ``pnekern.NoiseConfig`` by
    :func:`build_noise_config` (see there for the keys), e.g. ``{"emulate_batch_size": 16}`` or
    ``{"schedule": {"kind": "concentrated", "where": "early", "mean": 2e-3}}``.
    Probe: a GGN curvature probe every ``probe_every`` steps on a fixed held-out batch of ``probe_batch``
    sequences with ``probe_vectors`` output-space probes per measurement, each on its own random
    ⌈probe_batch/probe_vectors⌉ of those sequences (``probe_every=0`` turns it off). Evaluation: ``eval_samples`` fresh sequences from ``eval_seed`` (common random
    numbers for every predictor), ``n_boot`` bootstrap resamples. ``threads``: torch intra-op threads during the
    run (None leaves the setting alone; tiny models run fastest on 1).
    """

    d: int = 4
    k_max: int = 8
    noise_var: float = 0.1
    n_layer: int = 2
    n_head: int = 2
    d_model: int = 32
    token_format: str = "pair"
    steps: int = 3000
    batch_size: int = 64
    micro_batches: int = 4
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: Optional[int] = None
    min_lr_ratio: float = 0.1
    grad_clip: Optional[float] = None
    seed: int = 0
    stats: Optional[str] = "trace"
    optimizer_kwargs: Dict[str, Any] = field(default_factory=dict)
    noise: Optional[Dict[str, Any]] = None
    probe_every: int = 100
    probe_batch: int = 256
    probe_vectors: int = 8
    target_loss: Optional[float] = None
    target_eps: float = 0.0
    max_tokens: Optional[int] = None
    log_every: int = 100
    eval_samples: int = 2048
    eval_seed: int = 12345
    n_boot: int = 500
    threads: Optional[int] = None

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "RunConfig":
        """Build and validate a config; unknown keys raise ValueError naming them."""
        if not isinstance(data, dict):
            raise ValueError(f"config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; known fields: {sorted(known)}")
        cfg = cls(**data)
        cfg.validate()
        return cfg

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "RunConfig":
        """A validated copy with ``changes`` applied."""
        return RunConfig.from_dict({**self.to_dict(), **changes})

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field (before any training starts)."""

        def pos_int(name: str, minimum: int = 1, optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")

        def real(name: str, minimum: float, strict: bool = False, optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < minimum or (strict and v == minimum):
                op = ">" if strict else ">="
                raise ValueError(f"{name} must be a finite number {op} {minimum}, got {v!r}")

        for name in ("d", "k_max", "n_layer", "n_head", "d_model", "steps", "batch_size", "micro_batches",
                     "log_every", "probe_batch", "probe_vectors"):
            pos_int(name)
        pos_int("eval_samples", 2)
        pos_int("n_boot", 10)
        pos_int("probe_every", 0)
        pos_int("warmup_steps", 0, optional=True)
        pos_int("max_tokens", 1, optional=True)
        pos_int("threads", 1, optional=True)
        for name in ("seed", "eval_seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be an integer, got {v!r}")
        real("noise_var", 0.0)
        real("lr", 0.0, strict=True)
        real("weight_decay", 0.0)
        real("target_eps", 0.0)
        real("grad_clip", 0.0, strict=True, optional=True)
        real("target_loss", 0.0, optional=True)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.token_format not in TOKEN_FORMATS:
            raise ValueError(f"token_format must be one of {TOKEN_FORMATS}, got {self.token_format!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.batch_size % self.micro_batches:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of micro_batches "
                             f"({self.micro_batches})")
        if self.stats not in (None, "trace", "diag", "lowrank"):
            raise ValueError(f"stats must be null, 'trace', 'diag' or 'lowrank', got {self.stats!r}")
        if self.stats is not None and self.micro_batches < 2:
            raise ValueError("micro_batches must be >= 2 when stats is on: a single backward call per step gives "
                             "no gradient-noise variance")
        if self.probe_every and self.stats is None:
            raise ValueError("probe_every needs stats on (the probe feeds the optimizer's P-NE*); set probe_every=0")
        if not isinstance(self.optimizer_kwargs, dict):
            raise ValueError(f"optimizer_kwargs must be an object, got {self.optimizer_kwargs!r}")
        if self.noise is not None:
            if "noise" in self.optimizer_kwargs:
                raise ValueError("give the noise config either as the noise field or in optimizer_kwargs, not both")
            build_noise_config(self)  # validates every key and value before training
        reserved = {"params", "lr", "weight_decay", "stats", "batch_size"} & set(self.optimizer_kwargs)
        if reserved:
            raise ValueError(f"optimizer_kwargs must not set {sorted(reserved)}: they are config fields of their own")


# ---------------------------------------------------------------------- builders
_NOISE_KEYS = ("target", "emulate_batch_size", "additive", "space", "into_second_moment", "schedule", "metric",
               "controller", "seed")
_SCHEDULE_KINDS = ("constant", "ramp", "concentrated", "piecewise")


def _build_schedule(spec: Any, steps: int) -> Any:
    from ..noise import schedules as sch

    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return sch.constant(float(spec))
    if not isinstance(spec, dict) or spec.get("kind") not in _SCHEDULE_KINDS:
        raise ValueError(f"noise.schedule must be a number or an object with kind in {_SCHEDULE_KINDS}, got {spec!r}")
    args = {k: v for k, v in spec.items() if k != "kind"}
    kind = spec["kind"]
    try:
        if kind == "constant":
            return sch.constant(**args)
        if kind == "ramp":
            return sch.ramp(**args)
        if kind == "piecewise":
            return sch.piecewise([tuple(w) for w in args.pop("windows")], **args)
        args.setdefault("total_steps", steps)  # equal integral over the run's planned updates
        return sch.concentrated(**args)
    except TypeError as e:
        raise ValueError(f"noise.schedule {spec!r}: {e}") from None


def build_noise_config(cfg: "RunConfig") -> Any:
    """``pnekern.NoiseConfig`` from the JSON object ``cfg.noise`` (None when there is none).

    Keys (all optional, see :class:`pnekern.NoiseConfig`): ``emulate_batch_size`` (B' ≤ batch_size; needs
    ``stats`` "diag" or "lowrank"), ``target`` ({"isotropic": σ²} in g² per element), ``additive``, ``space``
    ("gradient" | "parameter"), ``into_second_moment``, ``schedule`` (a number = constant target, or
    {"kind": "constant"|"ramp"|"concentrated"|"piecewise", ...} with the arguments of
    :mod:`pnekern.noise.schedules`; "concentrated" defaults ``total_steps`` to ``cfg.steps``), ``metric``
    ("temperature" | "pne_star"), ``controller`` (ControllerConfig fields), ``seed`` (default ``cfg.seed``).
    Raises ValueError naming the bad key.
    """
    spec = cfg.noise
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ValueError(f"noise must be a JSON object or null, got {spec!r}")
    unknown = sorted(set(spec) - set(_NOISE_KEYS))
    if unknown:
        raise ValueError(f"noise: unknown key(s) {unknown}; known: {list(_NOISE_KEYS)}")
    from ..noise import NoiseConfig, isotropic
    from ..noise.controller import ControllerConfig

    kw = {k: v for k, v in spec.items() if k not in ("target", "schedule", "controller")}
    kw.setdefault("seed", cfg.seed)
    if "target" in spec:
        t = spec["target"]
        if not isinstance(t, dict) or set(t) != {"isotropic"}:
            raise ValueError(f"noise.target must be {{\"isotropic\": sigma2}} in a JSON config, got {t!r}")
        kw["target"] = isotropic(t["isotropic"])
    if "schedule" in spec:
        kw["schedule"] = _build_schedule(spec["schedule"], cfg.steps)
    if "controller" in spec:
        try:
            kw["controller"] = ControllerConfig(**spec["controller"])
        except TypeError as e:
            raise ValueError(f"noise.controller: {e}") from None
    eb = spec.get("emulate_batch_size")
    if eb is not None:
        if cfg.stats not in ("diag", "lowrank"):
            raise ValueError("noise.emulate_batch_size needs stats 'diag' or 'lowrank' (it scales the measured Σ_step)")
        if isinstance(eb, int) and not isinstance(eb, bool) and eb > cfg.batch_size:
            raise ValueError(f"noise.emulate_batch_size ({eb}) must be <= batch_size ({cfg.batch_size}): "
                             "a larger emulated batch needs negative noise")
    if spec.get("target") is not None and not spec.get("additive", False) and cfg.stats not in ("diag", "lowrank"):
        raise ValueError("noise.target without additive=true subtracts the measured Σ_step: needs stats 'diag' or "
                         "'lowrank' (or set additive: true)")
    try:
        return NoiseConfig(**kw)
    except TypeError as e:
        raise ValueError(f"noise: {e}") from None


def build_task(cfg: RunConfig) -> LinearRegressionTask:
    """The in-context linear regression task of ``cfg`` (β ~ N(0, I_d), y = xᵀβ + ε, ε ~ N(0, σ²))."""
    return LinearRegressionTask(cfg.d, cfg.k_max, noise_var=cfg.noise_var)


def build_model(cfg: RunConfig) -> RegressionTransformer:
    """A freshly initialised :class:`RegressionTransformer`; its weights are a function of ``cfg.seed`` only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return RegressionTransformer(cfg.d, cfg.k_max, n_layer=cfg.n_layer, n_head=cfg.n_head, d_model=cfg.d_model,
                                     token_format=cfg.token_format)


def build_optimizer(cfg: RunConfig, params: Sequence[Tensor]) -> torch.optim.Optimizer:
    """``pnekern.AdamW`` with the config's statistics mode and noise-control options."""
    from ..optim.adamw import AdamW  # lazy: keeps `import pnekern.icl` independent of the optimizer package

    kwargs = dict(cfg.optimizer_kwargs)
    noise = build_noise_config(cfg)
    if noise is not None:
        kwargs["noise"] = noise
    if cfg.stats is not None:
        kwargs.update(stats=cfg.stats, batch_size=cfg.batch_size)
    try:
        return AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **kwargs)
    except TypeError as e:  # an option this optimizer does not know
        raise ValueError(f"optimizer_kwargs: pnekern.AdamW rejected {sorted(cfg.optimizer_kwargs)}: {e}") from None


class RegressionProbeAdapter(nn.Module):
    """Presents a regression model as ``model(inputs) -> outputs`` for the curvature probes.

    The probes call ``model(inputs)`` with a single tensor; here ``inputs`` packs the context as
    [B, k, d+1] = (x_i, y_i) and the output is the model's [B, k] predictions, so ``nn.MSELoss()(output, ys)`` is
    exactly the training loss of :func:`pnekern.icl.compute_loss`. The wrapped model's parameters are shared, so the
    probe measures the very tensors the optimizer updates.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @staticmethod
    def pack(xs: Tensor, ys: Tensor) -> Tensor:
        """xs [B,k,d], ys [B,k] → [B,k,d+1]."""
        return torch.cat([xs, ys.unsqueeze(-1)], dim=-1)

    def forward(self, packed: Tensor) -> Tensor:
        return self.model(packed[..., :-1], packed[..., -1])


def make_curvature_probe(model: nn.Module, task: LinearRegressionTask,
                         cfg: RunConfig) -> Tuple[Optional[Any], Dict[str, Any]]:
    """A GGN curvature probe on a fixed held-out batch (seed ``cfg.seed + 2``), or None with the reason.

    Returns:
        (probe or None, info) where info records ``status`` ("attached", "off" or "unavailable"), the batch and
        the kind, for the report.
    """
    info: Dict[str, Any] = {"every": cfg.probe_every, "kind": "ggn", "batch": cfg.probe_batch,
                            "num_probes": cfg.probe_vectors, "estimator": "output",
                            "rows_per_probe": -(-cfg.probe_batch // cfg.probe_vectors),
                            "batch_seed": cfg.seed + 2, "loss": "mse (mean over positions)"}
    if not cfg.probe_every:
        return None, dict(info, status="off")
    try:
        from ..probes import CurvatureProbe  # being written in parallel; the demo runs without it
    except ImportError as e:
        return None, dict(info, status="unavailable", reason=f"pnekern.probes.CurvatureProbe: {e}")
    device = next(model.parameters()).device
    batch = task.sample(cfg.probe_batch, make_generator(cfg.seed + 2, device))
    adapter = RegressionProbeAdapter(model)
    probe_batch = (RegressionProbeAdapter.pack(batch.xs, batch.ys), batch.ys)
    try:
        # Output-space GGN probes, each on its own random ⌈probe_batch/probe_vectors⌉ held-out sequences (unbiased
        # for the whole held-out batch, i.i.d. probes): one measurement ≈ one forward + backward over probe_batch.
        probe = CurvatureProbe(adapter, nn.MSELoss(), probe_batch, every=cfg.probe_every, kind="ggn",
                               estimator="output", rows_per_probe="auto", num_probes=cfg.probe_vectors,
                               seed=cfg.seed)
    except Exception as e:  # an interface mismatch must not kill the run: report it instead
        return None, dict(info, status="unavailable", reason=f"CurvatureProbe(...) failed: {type(e).__name__}: {e}")
    return probe, dict(info, status="attached")


# ---------------------------------------------------------------------- training
@dataclass
class RunOutcome:
    """A trained run: the model, its optimizer (with the exposure log), the training result and probe info."""

    config: RunConfig
    task: LinearRegressionTask
    model: RegressionTransformer
    optimizer: torch.optim.Optimizer
    result: TrainResult
    probe: Dict[str, Any]


class _Threads:
    """Context manager that sets torch's intra-op thread count and restores it."""

    def __init__(self, n: Optional[int]) -> None:
        self.n = n
        self.prev = torch.get_num_threads()

    def __enter__(self) -> "_Threads":
        if self.n is not None:
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.set_num_threads(self.prev)


def train_run(cfg: RunConfig, *, progress: bool = True, checkpoint_dir: Optional[str] = None) -> RunOutcome:
    """Train one run of ``cfg`` (validated first, so config errors fail before any training)."""
    cfg.validate()
    task = build_task(cfg)
    model = build_model(cfg)
    holder: Dict[str, Any] = {}

    def make_optimizer(params: Any) -> torch.optim.Optimizer:
        opt = build_optimizer(cfg, list(params))
        probe, info = make_curvature_probe(model, task, cfg)
        if probe is not None:
            opt.attach_probe(probe)
        holder.update(opt=opt, probe=info)
        return opt

    with _Threads(cfg.threads):
        result = train(model, task, steps=cfg.steps, batch_size=cfg.batch_size, micro_batches=cfg.micro_batches,
                       make_optimizer=make_optimizer, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
                       min_lr_ratio=cfg.min_lr_ratio, grad_clip=cfg.grad_clip, seed=cfg.seed,
                       log_every=cfg.log_every, target_loss=cfg.target_loss, target_eps=cfg.target_eps,
                       max_tokens=cfg.max_tokens, checkpoint_dir=checkpoint_dir, progress=progress)
    return RunOutcome(cfg, task, model, holder["opt"], result, holder["probe"])


# ---------------------------------------------------------------------- evaluation
def _baselines(task: LinearRegressionTask) -> Dict[str, Any]:
    out: Dict[str, Any] = {"bayes": BayesPosteriorMean(task.beta_cov, task.noise_var), "ols": OLS(),
                           "one_step_gd": OneStepGD(None, task.noise_var, task.beta_cov), "averaging": Averaging()}
    if task.noise_var > 0:
        out["ridge"] = Ridge(task.noise_var / float(task.beta_cov[0, 0]))  # λ = σ²/τ² (isotropic prior)
    return {name: out[name] for name in BASELINE_NAMES if name in out}


def evaluate_run(model: nn.Module, task: LinearRegressionTask, cfg: RunConfig) -> Dict[str, Any]:
    """Errors vs k (normalized by d, against the noiseless target x_qᵀβ) for the model and the baselines, with
    percentile-bootstrap CIs, and the model's excess error over the Bayes posterior mean.

    All predictors see the same ``cfg.eval_samples`` sequences (seed ``cfg.eval_seed``).

    Returns:
        ``{"errors_vs_k": {"k", "model", <baselines>..., "ci": {name: {"low", "high"}}, "target", ...},
        "excess_over_bayes": {"mean", "ci_low", "ci_high", "mean_over_k", "max_over_k"}, "summary": {...}}``.
    """
    kw = dict(n_samples=cfg.eval_samples, seed=cfg.eval_seed, n_boot=cfg.n_boot)
    curves = {"model": error_vs_k(model, task, target="clean", **kw)}
    for name, est in _baselines(task).items():
        curves[name] = error_vs_k(est, task, target="clean", **kw)
    excess = excess_error_over_bayes(model, task, **kw)
    errors: Dict[str, Any] = {"k": curves["model"].k.tolist()}
    for name, c in curves.items():
        errors[name] = c.mean.tolist()
    errors["ci"] = {name: {"low": c.ci_low.tolist(), "high": c.ci_high.tolist()} for name, c in curves.items()}
    errors.update(target="clean", normalized_by_d=True, n_samples=cfg.eval_samples, ci_level=curves["model"].ci,
                  note="squared error / d against the noiseless target x_q·β; k = context examples used")
    ex = {"mean": excess.mean.tolist(), "ci_low": excess.ci_low.tolist(), "ci_high": excess.ci_high.tolist(),
          "mean_over_k": float(excess.mean.mean()), "max_over_k": float(excess.mean.max()),
          "target": "bayes", "normalized_by_d": True}
    model_err = curves["model"].mean
    summary = {
        "model_error_k0": float(model_err[0]), "model_error_kmax": float(model_err[-1]),
        "bayes_error_kmax": float(curves["bayes"].mean[-1]),
        "ridge_error_kmax": float(curves["ridge"].mean[-1]) if "ridge" in curves else None,
        "mean_excess_over_bayes": ex["mean_over_k"],
        # ICL: the model's error at the largest k is clearly below its own zero-context error
        "learned_icl": bool(curves["model"].ci_high[-1] < curves["model"].ci_low[0]),
    }
    return {"errors_vs_k": errors, "excess_over_bayes": ex, "summary": summary}


def format_error_table(errors: Dict[str, Any], excess: Optional[Dict[str, Any]] = None) -> str:
    """Plain-text table of error/d vs k (rows k, columns model and baselines)."""
    names = ["model"] + [n for n in BASELINE_NAMES if n in errors]
    head = f"{'k':>3} " + " ".join(f"{n:>11}" for n in names) + ("  excess/Bayes" if excess else "")
    lines = [head]
    for i, k in enumerate(errors["k"]):
        row = f"{k:>3} " + " ".join(f"{errors[n][i]:>11.4f}" for n in names)
        if excess:
            row += f"  {excess['mean'][i]:>12.4f}"
        lines.append(row)
    return "\n".join(lines)


# ---------------------------------------------------------------------- exposure
def _finite(v: Any) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def exposure_history(opt: torch.optim.Optimizer, max_points: int = 200) -> List[Dict[str, Any]]:
    """Thinned per-step exposure (step, lr, temperature, diffusion, pne, noise_scale, curvature, pne_star)."""
    log = getattr(opt, "exposure", None) if getattr(opt, "noise_stats", None) is not None else None
    if log is None:
        return []
    recs = log.records(per_param=False)
    stride = max(1, math.ceil(len(recs) / max_points))
    keep = recs[::stride] + ([recs[-1]] if recs and (len(recs) - 1) % stride else [])
    keys = ("step", "lr", "temperature", "diffusion", "pne", "noise_scale", "trace_precond_noise", "curvature",
            "pne_star", "curvature_held", "held")
    return [{k: (r.get(k) if isinstance(r.get(k), (bool, str)) else _finite(r.get(k))) for k in keys} for r in keep]


def exposure_summary(opt: torch.optim.Optimizer) -> Dict[str, Any]:
    """Run-level exposure: final P-NE [θ²], mean temperature NE_t, last/mean noise scale B_simple [examples],
    last curvature Tr(AĤA) and P-NE* when a probe ran, and the curvature measurements (step, value)."""
    if getattr(opt, "noise_stats", None) is None:
        return {"status": "off"}
    log = opt.exposure
    recs = log.records(per_param=False)
    if hasattr(log, "summary"):
        out = {k: (_finite(v) if not isinstance(v, (bool, str)) else v) for k, v in log.summary().items()}
    else:  # older ExposureLog: compute the same numbers from the records
        temps = [_finite(r.get("temperature")) for r in recs]
        temps = [t for t in temps if t is not None]
        last = recs[-1] if recs else {}
        out = {"steps": len(recs), "pne": _finite(last.get("pne")),
               "mean_temperature": sum(temps) / len(temps) if temps else None,
               "noise_scale": _finite(last.get("noise_scale")), "pne_star": _finite(last.get("pne_star")),
               "curvature": _finite(last.get("curvature"))}
    out["curvature_measurements"] = [
        {"step": r.get("step"), "curvature": _finite(r.get("curvature")), "pne_star": _finite(r.get("pne_star"))}
        for r in recs if r.get("curvature") is not None and not r.get("curvature_held")
    ]
    out["units"] = {"pne": "θ² (Σ η² κ Tr(AΣA))", "mean_temperature": "η κ Tr(AΣA)",
                    "noise_scale": "examples (B_simple)", "pne_star": "dimensionless (NE_t / Tr(AĤA))"}
    return out


# ---------------------------------------------------------------------- files
def write_json(path: str, obj: Any) -> str:
    """Write JSON atomically (temp file + rename); NaN/inf become null."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(clean(obj), f, indent=2, default=str)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a report should get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def plot_errors_vs_k(errors: Dict[str, Any], path: str, title: str = "") -> Optional[str]:
    """Error/d vs k for the model (with its CI band) and the baselines; None when matplotlib is missing."""
    if not _have_matplotlib():
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    k = errors["k"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ["model"] + [n for n in BASELINE_NAMES if n in errors]:
        style = dict(lw=2.2, color="k") if name == "model" else dict(lw=1.2, ls="--")
        ax.plot(k, errors[name], marker="o", ms=3, label=name, **style)
        if name == "model":
            ci = errors["ci"]["model"]
            ax.fill_between(k, ci["low"], ci["high"], color="k", alpha=0.15, lw=0)
    ax.set_xlabel("in-context examples k")
    ax.set_ylabel("squared error / d (noiseless target)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_run_files(out_dir: str, outcome: RunOutcome, evaluation: Optional[Dict[str, Any]] = None,
                    report_name: str = "report.json", extra: Optional[Dict[str, Any]] = None) -> Dict[str, str]:
    """Write config.json, model.pt, exposure.jsonl, the report and the PNGs into ``out_dir``.

    Returns:
        name → path of every file written.
    """
    os.makedirs(out_dir, exist_ok=True)
    files: Dict[str, str] = {}
    cfg, opt, res = outcome.config, outcome.optimizer, outcome.result
    files["config"] = write_json(os.path.join(out_dir, "config.json"), cfg.to_dict())
    model_path = os.path.join(out_dir, "model.pt")
    tmp = model_path + ".tmp"
    torch.save(outcome.model.state_dict(), tmp)
    os.replace(tmp, model_path)
    files["model"] = model_path
    if getattr(opt, "noise_stats", None) is not None:
        path = os.path.join(out_dir, "exposure.jsonl")
        try:
            opt.exposure.to_jsonl(path, per_param=False)  # the per-parameter breakdown is 40× larger
        except TypeError:
            opt.exposure.to_jsonl(path)
        files["exposure_jsonl"] = path
    history = [{k: v for k, v in h.items() if k != "stats"} for h in res.history]
    report: Dict[str, Any] = {
        "config": cfg.to_dict(),
        "final_loss": {"train": res.final_train_loss, "val": res.final_val_loss,
                       "units": "mean squared error over all k positions, noisy targets (y²)"},
        "training": {"updates": res.updates, "tokens_seen": res.tokens_seen, "stop_reason": res.stop_reason,
                     "elapsed_s": res.elapsed_s, "loss_history": history},
        "exposure": exposure_summary(opt),
        "exposure_history": exposure_history(opt),
        "curvature_probe": outcome.probe,
    }
    if evaluation is not None:
        report.update(evaluation)
    if extra:
        report.update(extra)
    files["report"] = write_json(os.path.join(out_dir, report_name), report)
    if evaluation is not None:
        p = plot_errors_vs_k(evaluation["errors_vs_k"], os.path.join(out_dir, "errors_vs_k.png"),
                             title=f"in-context regression d={cfg.d}, σ²={cfg.noise_var}, {res.updates} steps")
        if p:
            files["errors_png"] = p
    if _have_matplotlib() and getattr(opt, "noise_stats", None) is not None and len(opt.exposure):
        files["exposure_png"] = opt.exposure.plot(os.path.join(out_dir, "exposure.png"))
    return files


def load_run(run_dir: str) -> Tuple[RunConfig, RegressionTransformer]:
    """The config and trained model of a run directory written by :func:`write_run_files`."""
    cfg_path = os.path.join(run_dir, "config.json")
    model_path = os.path.join(run_dir, "model.pt")
    for p in (cfg_path, model_path):
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p} not found: is {run_dir!r} a run directory (pnekern icl train --out)?")
    with open(cfg_path) as f:
        cfg = RunConfig.from_dict(json.load(f))
    model = build_model(cfg)
    model.load_state_dict(torch.load(model_path, map_location="cpu", weights_only=True))
    return cfg, model


# ---------------------------------------------------------------------- sweeps
def _run_name(cfg: RunConfig) -> str:
    return f"bs{cfg.batch_size}_seed{cfg.seed}"


def run_sweep(base: RunConfig, out_dir: str, *, seeds: Sequence[int], batch_sizes: Optional[Sequence[int]] = None,
              progress: bool = True, log: Any = print) -> Dict[str, Any]:
    """Train and evaluate every (batch size, seed) condition; write ``out_dir/sweep.json``.

    Resumable: a condition whose ``report.json`` exists is read back, not re-run (reports are written atomically,
    so a killed run leaves none). Every condition is validated before the first one trains. With ≥ 3 finished runs
    the report holds Spearman ρ (bootstrap CI) of the mean excess error over Bayes against the final P-NE.
    """
    batch_sizes = list(batch_sizes) if batch_sizes else [base.batch_size]
    if not seeds:
        raise ValueError("seeds: need at least one seed")
    configs = [base.replace(batch_size=int(b), seed=int(s)) for b in batch_sizes for s in seeds]
    rows: List[Dict[str, Any]] = []
    for cfg in configs:
        run_dir = os.path.join(out_dir, _run_name(cfg))
        report_path = os.path.join(run_dir, "report.json")
        if os.path.exists(report_path):
            log(f"[sweep] {_run_name(cfg)}: done already, reading {report_path}")
            with open(report_path) as f:
                report = json.load(f)
        else:
            log(f"[sweep] {_run_name(cfg)}: training {cfg.steps} steps")
            t0 = time.perf_counter()
            outcome = train_run(cfg, progress=progress)
            evaluation = evaluate_run(outcome.model, outcome.task, cfg)
            write_run_files(run_dir, outcome, evaluation)
            with open(report_path) as f:
                report = json.load(f)
            log(f"[sweep] {_run_name(cfg)}: mean excess over Bayes "
                f"{evaluation['excess_over_bayes']['mean_over_k']:.4f} ({time.perf_counter() - t0:.0f} s)")
        exp = report.get("exposure", {})
        rows.append({"run": _run_name(cfg), "batch_size": cfg.batch_size, "seed": cfg.seed,
                     "final_val_loss": report["final_loss"]["val"],
                     "mean_excess_over_bayes": report["excess_over_bayes"]["mean_over_k"],
                     "model_error_kmax": report["summary"]["model_error_kmax"],
                     "pne": exp.get("pne"), "mean_temperature": exp.get("mean_temperature"),
                     "noise_scale": exp.get("noise_scale"), "pne_star": exp.get("pne_star")})
    sweep: Dict[str, Any] = {"base_config": base.to_dict(), "seeds": list(seeds), "batch_sizes": batch_sizes,
                             "runs": rows}
    pairs = [(r["pne"], r["mean_excess_over_bayes"]) for r in rows
             if r["pne"] is not None and r["mean_excess_over_bayes"] is not None]
    if len(pairs) >= 3:
        from .stats import spearman_with_ci

        res = spearman_with_ci([p[0] for p in pairs], [p[1] for p in pairs], seed=0)
        sweep["spearman_excess_vs_pne"] = dataclasses.asdict(res)
    write_json(os.path.join(out_dir, "sweep.json"), sweep)
    return sweep
