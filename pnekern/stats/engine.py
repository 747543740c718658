"""Micro-batch capture and the per-step noise statistics (SPEC §2–§3), shared by every pnekern optimizer.

How it works:
  * a tensor hook on every parameter sees each backward's contribution x_k before autograd adds it to p.grad;
    it accumulates Σ_k‖x_k‖² and Σ_k‖A x_k‖² (trace mode: two float64 scalars per tensor, no per-element memory),
    plus Σ_k x_k² per element (diag mode) or a Nyström sketch Σ_k x_k(x_kᵀΩ) (lowrank mode); a step's first
    contribution overwrites those buffers, so they are never zeroed;
  * the optimizer's fused step returns per-tensor ‖ḡ‖², ‖A_{t-1}ḡ‖², ‖A_t ḡ‖², Σ a_t² q (``STATS_COLUMNS``), or
    only the columns the mode reads (trace: the first two; diag/lowrank: all but ‖A_{t-1}ḡ‖²);
  * :meth:`NoiseStats.finish_step` combines both into unbiased trace estimates, the noise scale and the exposure
    integrals, as device tensors; nothing is read on the host until the user asks.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import ops

__all__ = ["NoiseStats", "StepStats", "StepRows", "STATS_MODES", "KAPPA_MODES", "STATE_KEY", "kappa_value", "engines_for"]

import weakref

_ENGINES: "weakref.WeakSet[NoiseStats]" = weakref.WeakSet()


def engines_for(params: Sequence[Tensor]) -> list["NoiseStats"]:
    """The statistics engines tracking any of ``params`` (used by pnekern.clip_grad_norm_)."""
    ids = {id(p) for p in params}
    return [e for e in list(_ENGINES) if any(pid in ids for pid in e.slots)]

#: key of the statistics engine's state inside ``optimizer.state_dict()`` (torch's load_state_dict ignores unknown
#: keys, so our checkpoints stay loadable by torch.optim.AdamW; a checkpoint without it leaves the engine as is).
STATE_KEY = "pnekern_stats"

STATS_MODES = (None, "trace", "diag", "lowrank")
KAPPA_MODES = ("ema", "heavy_ball", "calibrated")


def kappa_value(kappa: str | float, beta1: float) -> float:
    """Long-run variance amplification of the momentum filter (SPEC §3).

    ``"ema"`` (Adam's m ← β1 m + (1−β1) g): 1. ``"heavy_ball"`` (u ← β1 u + g, the drafts' value): 1/(1−β1)².
    A float is used as given. ``"calibrated"`` starts at the ``"ema"`` value until the calibrator reports.
    """
    if isinstance(kappa, (int, float)) and not isinstance(kappa, bool):
        if not kappa > 0:
            raise ValueError(f"kappa={kappa!r} must be a positive float or one of {KAPPA_MODES}")
        return float(kappa)
    if kappa == "heavy_ball":
        return 1.0 / (1.0 - beta1) ** 2
    if kappa in ("ema", "calibrated"):
        return 1.0
    raise ValueError(f"kappa={kappa!r} is not supported; use one of {KAPPA_MODES} or a positive float")


def bias_corrected_coefficient(lr: float, beta1: float, step: int, horizon: float = 1e-10) -> float:
    """c_s = Σ_{t≥s} η (1−β1) β1^{t−s} / (1−β1^t): total displacement caused by the gradient of step s.

    Assumes the learning rate stays at its current value for the steps that follow (the sum converges after
    ~log(horizon)/log(β1) terms). c_1 ≈ 3.0η at β1 = 0.9 (SPEC §3); large s gives η.
    """
    if beta1 == 0.0:
        return lr
    total, w, t = 0.0, 1.0 - beta1, step
    while w > horizon:
        total += w / (1.0 - beta1**t)
        w *= beta1
        t += 1
    return lr * total


@dataclass
class StepStats:
    """The statistics of one optimizer step. Scalars are 0-dim device tensors (or None) until read.

    Units (θ = parameter units): ``trace_noise`` tr Σ_step [g²], ``trace_precond_noise`` Tr(AΣ_stepA) [θ²/lr²],
    ``grad_norm_sq``/``grad_norm_sq_unbiased`` [g²], ``noise_scale`` B_simple [examples], ``temperature`` NE_t =
    η κ Tr(AΣA) [θ²/step·(1/η)], ``diffusion`` D_t = η² κ Tr(AΣA) [θ²/step], ``pne`` Σ D_t [θ²],
    ``curvature`` Tr(A Ĥ A) [1/θ²·θ²] and ``pne_star`` NE_t / Curv_t [dimensionless].
    """

    step: int
    lr: float
    num_contributions: int
    trace_noise: Tensor | None
    trace_precond_noise: Tensor | None
    grad_norm_sq: Tensor | None
    grad_norm_sq_unbiased: Tensor | None
    noise_scale: Tensor | None
    noise_scale_raw: Tensor | None
    temperature: Tensor | None
    diffusion: Tensor | None
    pne: Tensor
    curvature: Tensor | float | None
    pne_star: Tensor | None
    kappa: float
    held: bool = False
    skipped: Tensor | None = None
    curvature_held: bool = False
    precond: str = "prev"
    per_param: MutableMapping = field(default_factory=dict)  # name -> {field: value}; a lazy mapping (_PerParamMap)
    temperature_preclip: Tensor | None = None
    clip_coef: Tensor | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (one batched device→host transfer). NaN where the variance is undefined (n = 1)."""
        keys = [
            "trace_noise", "trace_precond_noise", "grad_norm_sq", "grad_norm_sq_unbiased", "noise_scale",
            "noise_scale_raw", "temperature", "diffusion", "pne", "curvature", "pne_star", "skipped",
            "temperature_preclip", "clip_coef",
        ]
        tensors, where = [], []
        for k in keys:
            v = getattr(self, k)
            if isinstance(v, Tensor):
                tensors.append(v.detach().reshape(()).to(torch.float64))
                where.append(("top", k, None))
        pp = self.per_param
        compact = pp.compact() if isinstance(pp, _PerParamMap) else None
        # Rows never written to come from the step's [P, 5] table in the same transfer (no P row objects and 5P
        # views per call); rows the user wrote to are read one by one as before.
        rows = compact[3] if compact is not None else pp
        for name, d in rows.items():
            for k, v in d.items():
                if isinstance(v, Tensor):
                    tensors.append(v.detach().reshape(()).to(torch.float64))
                    where.append(("pp", name, k))
        table_at = len(tensors)
        if compact is not None:
            tensors.append(compact[0].matrix.detach().to(torch.float64))
        values = _to_host(tensors)
        out: dict[str, Any] = {
            "step": self.step, "lr": self.lr, "num_contributions": self.num_contributions, "kappa": self.kappa,
            "held": self.held, "curvature_held": self.curvature_held, "precond": self.precond,
        }
        for k in keys:
            v = getattr(self, k)
            out[k] = v if not isinstance(v, Tensor) else None
        per_param: dict[str, dict[str, Any]] = {n: {k: (v if not isinstance(v, Tensor) else None) for k, v in d.items()} for n, d in rows.items()}
        for (kind, a, b), val in zip(where, values):
            if kind == "top":
                out[a] = val
            else:
                per_param[a][b] = val
        if compact is not None:
            _, names, static, _ = compact
            per_param = _rows_from_table(names, static, values[table_at], 0, per_param)
        if out["skipped"] is not None:
            out["skipped"] = bool(out["skipped"])
        out["per_param"] = per_param
        return out

    def record(self) -> dict[str, Any]:
        """The log record: like to_dict() but keeps device tensors (no sync)."""
        rec = {k: getattr(self, k) for k in (
            "step", "lr", "num_contributions", "trace_noise", "trace_precond_noise", "grad_norm_sq",
            "grad_norm_sq_unbiased", "noise_scale", "noise_scale_raw", "temperature", "diffusion", "pne",
            "curvature", "pne_star", "kappa", "held", "skipped", "curvature_held", "temperature_preclip",
            "clip_coef")}
        rec["per_param"] = self.per_param
        return rec


class _PerParamTable:
    """The [P, C] float64 per-parameter statistics of one step (columns ``PER_PARAM_COLUMNS``)."""

    __slots__ = ("matrix",)

    def __init__(self, matrix: Tensor) -> None:
        self.matrix = matrix


#: columns of a step's per-parameter table, in the order of the per-parameter dict
PER_PARAM_COLUMNS = ("trace_noise", "trace_precond_noise", "grad_norm_sq", "temperature", "diffusion")
_COLUMN = {k: j for j, k in enumerate(PER_PARAM_COLUMNS)}


class _Lazy:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<lazy>"

    def __reduce__(self) -> str:
        return "_LAZY"  # pickled by name: the sentinel stays a singleton across pickle/deepcopy


_LAZY = _Lazy()


class _LazyRow(MutableMapping):
    """One parameter's entry of ``StepStats.per_param``: a mapping whose tensor values are views of one row of the
    step's per-parameter table, created on first access. Reads, writes, iteration order and ``dict(row)`` behave
    like the plain dict this replaces (num_contributions, trace_noise, …, lr)."""

    __slots__ = ("_table", "_i", "_data", "_dirty")

    def __init__(self, table: _PerParamTable, i: int, data: dict[str, Any]) -> None:
        self._table = table
        self._i = i
        self._data = data
        self._dirty = False  # written to since creation (reads only cache views of the table)

    def __getitem__(self, key: str) -> Any:
        v = self._data[key]
        if v is _LAZY:
            v = self._data[key] = self._table.matrix[self._i, _COLUMN[key]]
        return v

    def __setitem__(self, key: str, value: Any) -> None:
        self._dirty = True
        self._data[key] = value

    def __delitem__(self, key: str) -> None:
        self._dirty = True
        del self._data[key]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return repr(dict(self))

    def lazy_items(self) -> tuple[_PerParamTable, int, list[tuple[str, Any]], list[tuple[str, int]]]:
        """(table, row, [(key, value) already materialized or static], [(key, column) still in the table])."""
        done, pending = [], []
        for k, v in self._data.items():
            if v is _LAZY:
                pending.append((k, _COLUMN[k]))
            else:
                done.append((k, v))
        return self._table, self._i, done, pending


class _PerParamMap(MutableMapping):
    """``StepStats.per_param``: parameter name -> its row (a :class:`_LazyRow`), each row created on first access.

    A step with P parameters would otherwise build P row objects, and the log would unpack them again when it packs
    the record (~1 ms per record at P = 100, most of trace mode's cost on a 32M-parameter step). Rows never written
    to travel to the log as the one [P, C] table plus the static per-row values. Reads and writes behave like the plain
    ``{name: row}`` dict this replaces; adding or removing a name turns it into that dict (every row created).
    """

    __slots__ = ("_table", "_names", "_static", "_rows", "_index", "_plain")

    def __init__(self, table: _PerParamTable, names: list[str], static: dict[str, list[Any]]) -> None:
        self._table = table
        self._names = names
        self._static = static  # key -> one value per row, in row order (the keys before and after the columns)
        self._rows: dict[str, MutableMapping] = {}  # rows created so far
        self._index: dict[str, int] | None = None
        self._plain: dict[str, Any] | None = None  # set once the key set changes

    def _row(self, i: int) -> _LazyRow:
        st = self._static
        data: dict[str, Any] = {"num_contributions": st["num_contributions"][i]}
        for k in PER_PARAM_COLUMNS:
            data[k] = _LAZY
        data["lr"] = st["lr"][i]
        return _LazyRow(self._table, i, data)

    def __getitem__(self, name: str) -> Any:
        if self._plain is not None:
            return self._plain[name]
        row = self._rows.get(name)
        if row is None:
            if self._index is None:
                self._index = {n: i for i, n in enumerate(self._names)}
            row = self._rows[name] = self._row(self._index[name])  # KeyError for an unknown name
        return row

    def _make_plain(self) -> dict[str, Any]:
        if self._plain is None:
            self._plain = {n: self[n] for n in self._names}
        return self._plain

    def __setitem__(self, name: str, value: Any) -> None:
        self._make_plain()[name] = value

    def __delitem__(self, name: str) -> None:
        del self._make_plain()[name]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._plain if self._plain is not None else self._names)

    def __len__(self) -> int:
        return len(self._plain if self._plain is not None else self._names)

    def __contains__(self, name: object) -> bool:
        if self._plain is not None:
            return name in self._plain
        if self._index is None:
            self._index = {n: i for i, n in enumerate(self._names)}
        return name in self._index

    def __repr__(self) -> str:
        return repr(dict(self))

    def compact(self) -> tuple[_PerParamTable, list[str], dict[str, list[Any]], dict[str, MutableMapping]] | None:
        """(table, names, static values, rows written to since creation) while the key set is the original one,
        else None. A row that was only read still equals its table row."""
        if self._plain is not None:
            return None
        return self._table, self._names, self._static, {n: r for n, r in self._rows.items() if r._dirty}


def _rows_from_table(names: list[str], static: dict[str, list[Any]], flat: list[float], offset: int,
                     done: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Host rows of a step's per-parameter table (a flat row-major copy starting at ``offset``), in ``names``
    order, with the keys of :meth:`_PerParamMap._row`; a name already in ``done`` keeps that row."""
    ncol = len(PER_PARAM_COLUMNS)
    nc, lrs = static["num_contributions"], static["lr"]
    out: dict[str, dict[str, Any]] = {}
    for r, name in enumerate(names):
        row = done.get(name)
        if row is None:
            base = offset + r * ncol
            row = {"num_contributions": nc[r]}
            row.update(zip(PER_PARAM_COLUMNS, flat[base:base + ncol]))
            row["lr"] = lrs[r]
        out[name] = row
    return out


class StepRows(MutableMapping):
    """The fused step's per-tensor statistics rows, as the kernel wrote them: blocks of (params, float64 [P_b, w]
    table), one per kernel call, read as a mapping id(param) -> row [w] (``finish_step``'s ``rows``).

    :meth:`NoiseStats.finish_step` takes the tables as they are; row views are made only for a caller that reads
    or replaces single rows (e.g. the noise injector correcting rows after a step). At 100 tensors the views and
    re-stacking them cost ~0.1 ms per step.
    """

    __slots__ = ("blocks", "_map", "_edited")

    def __init__(self) -> None:
        self.blocks: list[tuple[list[Tensor], Tensor]] = []
        self._map: dict[int, Tensor] | None = None
        self._edited = False

    def add(self, params: list[Tensor], table: Tensor) -> None:
        """Append one kernel call's rows: ``table[i]`` belongs to ``params[i]``."""
        self.blocks.append((params, table))
        self._map = None

    def _rows(self) -> dict[int, Tensor]:
        if self._map is None:
            self._map = {id(p): r for params, t in self.blocks for p, r in zip(params, t.unbind(0))}
        return self._map

    def ids(self) -> tuple[int, ...]:
        """id(param) of every row, in iteration order."""
        if self._edited:
            return tuple(self._rows())
        return tuple(id(p) for params, _ in self.blocks for p in params)

    def table(self) -> Tensor | None:
        """All rows stacked in :meth:`ids` order, or None once a row was replaced or added (then read the rows)."""
        if self._edited or not self.blocks:
            return None
        if len(self.blocks) == 1:
            return self.blocks[0][1]
        return torch.cat([t for _, t in self.blocks])

    def __getitem__(self, pid: int) -> Tensor:
        return self._rows()[pid]

    def __setitem__(self, pid: int, row: Tensor) -> None:
        self._rows()[pid] = row
        self._edited = True

    def __delitem__(self, pid: int) -> None:
        del self._rows()[pid]
        self._edited = True

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._rows())

    def __len__(self) -> int:
        return len(self._rows()) if self._edited else sum(len(params) for params, _ in self.blocks)


def _noise_traces(s1: Tensor, s1_a: Tensor, g2: Tensor, g2_a: Tensor, n: float | Tensor, w2: float,
                  ) -> tuple[Tensor, Tensor]:
    """Per-tensor tr Σ_step and Tr(A Σ_step A) [P] from the sums S1, S1A [P], |ḡ|², |A ḡ|² [P] of n contributions
    (a float shared by all tensors, or [P]) over W workers (w2 = W²), NaN where n < 2.

    SPEC §2: diag Σ_step = n s² / W², s² = (Σx² − (Σx)²/n)/(n−1), Σx = W·p.grad, computed as
    (S1 − W²·(1/n)·|ḡ|²) · n/((n−1)W²): the same IEEE operations, hence the same bits, for a float n and for a
    tensor of that n.
    """
    if isinstance(n, float):
        if n < 2:
            nan = torch.full_like(s1, float("nan"))
            return nan, nan.clone()
        a, b = w2 * (1.0 / n), n / ((n - 1.0) * w2)
        return (s1 - a * g2) * b, (s1_a - a * g2_a) * b
    valid = n >= 2
    # reciprocal, then the product: what torch computes for float / tensor (Tensor.__rtruediv__), written out so
    # that the float path above rounds the same way (w2 / n itself would differ in the last bit, e.g. 9 / 7).
    a, b = n.reciprocal() * w2, n / ((n - 1.0) * w2)  # inf/NaN where n < 2: masked
    return (torch.where(valid, (s1 - a * g2) * b, float("nan")),
            torch.where(valid, (s1_a - a * g2_a) * b, float("nan")))


def _to_host(tensors: list[Tensor]) -> list[Any]:
    """Host values of 0-dim tensors (floats) and of larger ones (flat lists), one copy per device."""
    if not tensors:
        return []
    by_dev: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dev.setdefault(t.device, []).append(i)
    out: list[Any] = [0.0] * len(tensors)
    for idx in by_dev.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx]).cpu().tolist()
        pos = 0
        for i in idx:
            t = tensors[i]
            m = t.numel()
            out[i] = flat[pos] if t.dim() == 0 else flat[pos:pos + m]
            pos += m
    return out


class _WeakBoundMethod:
    """``obj.method`` held through a weak reference to ``obj``; pickles/deep-copies as (function, obj) so that a
    copied engine calls the copied optimizer (rebound when unpickled)."""

    __slots__ = ("func", "ref")

    def __init__(self, func: Callable[..., Any], obj: Any) -> None:
        self.func = func
        self.ref = weakref.ref(obj)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        obj = self.ref()
        if obj is None:
            raise RuntimeError("pnekern stats: the optimizer this statistics engine belonged to no longer exists")
        return self.func(obj, *args, **kwargs)

    def __getstate__(self) -> tuple[Callable[..., Any], Any]:
        return self.func, self.ref()

    def __setstate__(self, state: tuple[Callable[..., Any], Any]) -> None:
        self.func, obj = state
        self.ref = weakref.ref(obj) if obj is not None else (lambda: None)


def _weak_callable(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A bound method held through a weak reference (plain functions are returned unchanged)."""
    if not hasattr(fn, "__self__") or not hasattr(fn, "__func__"):
        return fn
    return _WeakBoundMethod(fn.__func__, fn.__self__)


class _ParamSlot:
    """Per-parameter accumulators for the current step."""

    __slots__ = ("__weakref__", "param", "name", "index", "acc", "count", "sumsq", "sketch", "omega_seed", "handle", "acc_node", "device_key",
                 "cal_idx", "cal_sq", "cal_a", "tail_idx", "tail_buf", "tail_n", "tail_prev_var", "precond", "omega")

    def __init__(self, param: Tensor, name: str, index: int) -> None:
        self.param = param
        self.name = name
        self.index = index
        self.acc = torch.zeros(2, dtype=torch.float64, device=param.device)
        self.count = 0
        self.sumsq: Tensor | None = None
        self.sketch: Tensor | None = None
        self.omega_seed = 0
        self.handle = None
        self.acc_node = None
        self.cal_idx: Tensor | None = None  # κ calibration: fixed coordinate subset of this tensor
        self.cal_sq: Tensor | None = None  # Σ_k x_k² on the subset (float64)
        self.cal_a: Tensor | None = None  # A_{t-1} on the subset, taken at the step's first contribution
        self.tail_idx: Tensor | None = None  # tail index: fixed coordinate subset (diag/lowrank modes)
        # This step's contributions on the subset: rows [0, tail_n), in the gradient's dtype. The buffer is kept
        # between steps, so no tensor is allocated or freed per contribution.
        self.tail_buf: Tensor | None = None
        self.tail_n = 0
        self.tail_prev_var: Tensor | None = None  # per-contribution variance on the subset from the previous step
        # Per-step caches, dropped by NoiseStats.reset(): A_{t−1} does not change between the micro-batches of a
        # step, so (v, 1/sqrt(bc2), eps, backend, dtype) is looked up once per step instead of once per backward.
        self.precond: tuple[Any, ...] | None = None
        self.omega: tuple[int, int, Tensor] | None = None  # (step, d, Ω) of the lowrank sketch, this step only

    # The autograd node and hook handle belong to this process's graph: not pickled; NoiseStats.__setstate__
    # registers a fresh hook on the (copied) parameter.
    _TRANSIENT = ("__weakref__", "handle", "acc_node", "precond", "omega")

    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k, None) for k in self.__slots__ if k not in self._TRANSIENT}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k in self.__slots__:
            if k != "__weakref__":
                setattr(self, k, state.get(k))
        self.count = int(self.count or 0)
        self.tail_n = int(self.tail_n or 0)


class NoiseStats:
    """Gradient-noise statistics engine attached to one optimizer.

    Args:
        optimizer: the optimizer whose parameters are tracked (hooks are registered on them, and on groups added
            later through ``track_group``).
        mode: ``"trace"`` (scalars only), ``"diag"`` (one fp32 Σ_k x_k² buffer per parameter: per-element diag Σ,
            exact A_t), ``"lowrank"`` (diag + a d×r Nyström sketch per parameter).
        precond: callable ``(param) -> (v or None, inv_sqrt_bc2, eps)`` giving Adam's second moment before this
            step's update (A_{t−1}); SGD passes ``lambda p: (None, 1.0, 0.0)`` (A = I).
        beta1: momentum coefficient used by the κ and bias-correction conventions.
        batch_size: examples per optimizer step B (enables ``noise_scale``).
        kappa, bias_corrected, stats_every, rank, gns_beta, backend: see ``pnekern.AdamW``.
        data_parallel: None (auto: torch.distributed initialized with world size > 1), True or False.
        process_group: the group DDP averages over (default: the world).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        mode: str,
        precond: Callable[[Tensor], tuple[Tensor | None, float, float]],
        *,
        beta1: Callable[[Tensor], float],
        batch_size: int | None = None,
        kappa: str | float = "ema",
        bias_corrected: bool = False,
        stats_every: int = 1,
        rank: int = 8,
        gns_beta: float = 0.95,
        backend: str = "auto",
        data_parallel: bool | None = None,
        process_group: Any = None,
        seed: int = 0,
        calibration_coords: int = 4096,
        calibration_every: int = 200,
        calibration_lags: tuple[int, int] | None = None,
        tail_coords: int = 2048,
        tail_pool: int = 1 << 16,
        shrink: Callable[[Tensor], float] | None = None,
    ) -> None:
        if mode not in STATS_MODES or mode is None:
            raise ValueError(f"stats={mode!r} is not a statistics mode; choose one of None, 'trace', 'diag', 'lowrank'")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size={batch_size!r} must be a positive int (examples per optimizer step) or None")
        if isinstance(stats_every, bool) or not isinstance(stats_every, int) or stats_every < 1:
            raise ValueError(f"stats_every={stats_every!r} must be a positive int")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"stats_rank={rank!r} must be a positive int")
        if not 0.0 <= gns_beta < 1.0:
            raise ValueError(f"gns_beta={gns_beta!r} must be in [0, 1)")
        kappa_value(kappa, 0.9)  # validates
        # No strong references back to the optimizer (its bound methods included): the optimizer owns the engine,
        # and a cycle would keep a discarded optimizer's hooks capturing until the garbage collector runs.
        self._optimizer_ref = weakref.ref(optimizer)
        self.mode = mode
        self.precond = _weak_callable(precond)
        self.beta1_of = _weak_callable(beta1)
        self.batch_size = batch_size
        self.kappa = kappa
        self.bias_corrected = bool(bias_corrected)
        self.stats_every = stats_every
        self.rank = rank
        self.backend = backend
        self.data_parallel = data_parallel
        self.process_group = process_group
        self.seed = int(seed)
        self.slots: dict[int, _ParamSlot] = {}
        self._backend_cache: dict[tuple[torch.device, torch.dtype], str] = {}
        #: keep the lowrank test matrix Ω of each tensor from its first contribution of a step to the end of that
        #: step (d×r extra memory during the step, like the sketch; nothing between steps) instead of regenerating
        #: it for every contribution and again at the step — regeneration dominated the lowrank mode's cost.
        self.cache_omega = True
        from .ema import NoiseScaleEMA
        from .log import ExposureLog

        self.gns = NoiseScaleEMA(gns_beta)
        self.log = ExposureLog()
        self.pne: Tensor | None = None
        self.step_count = 0  # optimizer steps seen (host int; includes steps GradScaler skips)
        self.last: StepStats | None = None
        self.last_diffusion: Tensor | None = None
        self.last_temperature: Tensor | None = None
        self.curvature: Tensor | float | None = None
        self.curvature_step: int | None = None
        self.calibrated_kappa: float | None = None
        self.covariances: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        self._warned_single = False
        self.clip_coef: Tensor | None = None
        self.grad_scaler: Any = None  # a GradScaler whose unscale_ runs before step (see finish_step)
        self._warned_unscaled = False
        self.shrink_of = None if shrink is None else _weak_callable(shrink)
        self.calibrator = None
        self.calibration_every = int(calibration_every)
        self.calibration_estimate = None
        if kappa == "calibrated":
            from .kappa import KappaCalibrator

            b1 = max((beta1(p) for g in optimizer.param_groups for p in g["params"]), default=0.9)
            h_min, h_max = calibration_lags or (max(1, math.ceil(5.0 / (1.0 - b1))), max(4, math.ceil(40.0 / (1.0 - b1))))
            if not 1 <= h_min < h_max:
                raise ValueError(f"calibration_lags={calibration_lags!r} must satisfy 1 <= h_min < h_max")
            self.calibrator = KappaCalibrator(h_min=h_min, h_max=h_max)
            self._calibration_coords = int(calibration_coords)
        # Tail index (diag/lowrank modes): a fixed subset of coordinates of every contribution is kept for the
        # step; deviations standardized by the *previous* step's variance feed a ring buffer of samples.
        self.tail_coords = int(tail_coords) if mode in ("diag", "lowrank") else 0
        self._tail_pool = torch.empty(0, dtype=torch.float64)
        self._tail_pool_size = int(tail_pool)
        self._tail_order_cache: tuple[Any, Tensor] | None = None  # (layout key, _tail_order permutation)
        # slot ids -> (slots, subset sizes, variance): previous variances not yet written to the slots
        self._tail_lazy: dict[tuple[int, ...], tuple[list[_ParamSlot], list[int], Tensor]] = {}
        self._tail_pos = 0
        self._tail_filled = 0
        _ENGINES.add(self)
        for gi, group in enumerate(optimizer.param_groups):
            self.track_group(group, gi)

    # ------------------------------------------------------------------ checkpoint / copy
    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Register state_dict hooks that save/restore this engine under ``STATE_KEY`` (idempotent; call it again
        after unpickling, which drops hooks). For optimizers that do not handle the key themselves (pnekern.AdamW
        does, in its state_dict/load_state_dict, and registers no hook)."""
        hooks = getattr(optimizer, "_optimizer_state_dict_post_hooks", None)
        if hooks is None:
            return
        if any(isinstance(h, _StatsStateDictPost) and h.engine is self for h in hooks.values()):
            return
        optimizer.register_state_dict_post_hook(_StatsStateDictPost(self))
        optimizer.register_load_state_dict_pre_hook(_StatsLoadPre(self))
        optimizer.register_load_state_dict_post_hook(_StatsLoadPost(self))

    def invalidate_caches(self) -> None:
        """Forget the per-step preconditioner / Ω caches (the optimizer's state tensors were replaced)."""
        for slot in self.slots.values():
            slot.precond = None
            slot.omega = None

    def _flat_params(self) -> list[Tensor]:
        opt = self.optimizer
        if opt is None:
            return [s.param for s in self.slots.values()]
        return [p for g in opt.param_groups for p in g["params"]]

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue with identical statistics (SPEC §2–§3 state).

        Counters and integrals (``step_count``, P-NE, held exposure), the noise-scale EMAs with their debias
        weights, curvature carry-over, κ calibration (MSD ring buffer and sums), the tail-index pool and, per
        parameter (keyed by its index in param_groups order, like torch's ``state``), the coordinate subsets and
        the previous step's variance. Not included: the exposure history (``optimizer.exposure``; save it with
        ``to_jsonl``), contributions of a step in progress, and the lowrank Ω (regenerated from seed and step).
        Tensors are references, as in torch's ``state_dict``; only tensors, numbers, strings, lists and dicts,
        so ``torch.load(weights_only=True)`` reads it.
        """
        self._flush_tail_prev()
        per_param: dict[int, dict[str, Any]] = {}
        for idx, p in enumerate(self._flat_params()):
            slot = self.slots.get(id(p))
            if slot is None:
                continue
            entry = {k: getattr(slot, k) for k in ("cal_idx", "tail_idx", "tail_prev_var") if getattr(slot, k) is not None}
            if entry:
                per_param[idx] = entry
        est = self.calibration_estimate
        return {
            "version": 1,
            "mode": self.mode,
            "seed": self.seed,
            "step_count": self.step_count,
            "pne": self.pne,
            "last_diffusion": self.last_diffusion,
            "last_temperature": self.last_temperature,
            "curvature": self.curvature,
            "curvature_step": self.curvature_step,
            "calibrated_kappa": self.calibrated_kappa,
            "calibration_estimate": None if est is None else dict(vars(est)),
            "calibrator": None if self.calibrator is None else self.calibrator.state_dict(),
            "gns": self.gns.state_dict(),
            "tail": {"pool": self._tail_pool, "pos": self._tail_pos, "filled": self._tail_filled},
            "warned_single": self._warned_single,
            "per_param": per_param,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (tensors copied to this engine's devices; the optimizer's settings — mode,
        seed, rank, κ convention — stay as constructed). Contributions already captured this step are kept."""
        if not isinstance(state, dict) or "step_count" not in state:
            raise ValueError(f"{STATE_KEY}: not a statistics engine state (missing 'step_count')")
        flat = self._flat_params()
        self._flush_tail_prev()  # slots the saved state does not cover keep their own previous variance
        first = next(iter(self.slots.values()), None)
        device = first.param.device if first is not None else torch.device("cpu")

        def own(t: Any, dev: torch.device = device) -> Any:
            # A copy: loading from a live optimizer's state_dict must not alias its in-place-updated buffers.
            return t.detach().to(device=dev, copy=True) if isinstance(t, Tensor) else t

        self.step_count = int(state["step_count"])
        self.pne = own(state.get("pne"))
        self.last_diffusion = own(state.get("last_diffusion"))
        self.last_temperature = own(state.get("last_temperature"))
        self.curvature = own(state.get("curvature"))
        self.curvature_step = state.get("curvature_step")
        ck = state.get("calibrated_kappa")
        self.calibrated_kappa = None if ck is None else float(ck)
        est = state.get("calibration_estimate")
        if est is not None:
            from .kappa import KappaEstimate

            self.calibration_estimate = KappaEstimate(**est)
        else:
            self.calibration_estimate = None
        if self.calibrator is not None and state.get("calibrator") is not None:
            self.calibrator.load_state_dict(state["calibrator"], device=device)
        if state.get("gns") is not None:
            self.gns.load_state_dict(state["gns"], device=device)
        tail = state.get("tail")
        if tail is not None and self.tail_coords:
            pool = tail["pool"]
            if pool.numel() not in (0, self._tail_pool_size):
                raise ValueError(
                    f"{STATE_KEY}: the saved tail-index pool holds {pool.numel()} samples, this engine's holds "
                    f"{self._tail_pool_size}"
                )
            self._tail_pool = own(pool)
            self._tail_pos = int(tail["pos"])
            self._tail_filled = int(tail["filled"])
        self._warned_single = bool(state.get("warned_single", self._warned_single))
        saved = state.get("per_param") or {}
        for idx, p in enumerate(flat):
            slot = self.slots.get(id(p))
            if slot is None:
                continue
            entry = saved.get(idx, saved.get(str(idx)))  # JSON-style string keys too
            entry = entry or {}
            slot.cal_idx = own(entry.get("cal_idx"), p.device) if self.calibrator is not None else slot.cal_idx
            if self.tail_coords:
                slot.tail_idx = own(entry.get("tail_idx"), p.device)
                slot.tail_buf, slot.tail_n = None, 0  # rows of this step on the old subset: dropped
                slot.tail_prev_var = own(entry.get("tail_prev_var"), p.device)
            slot.precond = None  # torch's load replaced the optimizer's state tensors
            slot.omega = None
        self.last = None
        self.covariances = {}

    def __getstate__(self) -> dict[str, Any]:
        self._flush_tail_prev()  # the copies' slots carry their previous variances
        state = self.__dict__.copy()
        # Strong references inside the pickle (the copy's optimizer is in the same pickle/memo); weak again when
        # loaded. Slots are re-keyed by the copied parameters' ids and re-hooked in __setstate__.
        state["_optimizer_ref"] = self.optimizer
        state["slots"] = list(self.slots.values())
        state["_backend_cache"] = {}
        state["_tail_order_cache"] = None
        state["_slot_cache"] = None  # keyed by this process's parameter ids
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        slots = state.pop("slots")
        optimizer = state.pop("_optimizer_ref")
        self.__dict__.update(state)
        self.__dict__.setdefault("_tail_lazy", {})  # pickled before it existed
        self._optimizer_ref = weakref.ref(optimizer) if optimizer is not None else (lambda: None)
        self._backend_cache = {}
        self._tail_order_cache = None
        self.slots = {}
        for slot in slots:
            self.slots[id(slot.param)] = slot
            if slot.param.requires_grad:
                self._hook_slot(slot)
        self._pack_accs()
        _ENGINES.add(self)

    # ------------------------------------------------------------------ hooks
    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer this engine measures (weakly referenced; None once it is gone)."""
        return self._optimizer_ref()

    def track_group(self, group: dict[str, Any], gi: int) -> None:
        """Register capture hooks on a param group's parameters (called for groups added later too)."""
        names = group.get("param_names")
        for pi, p in enumerate(group["params"]):
            if id(p) in self.slots or not p.requires_grad:
                continue
            name = names[pi] if names is not None else f"group{gi}.param{pi}"
            slot = _ParamSlot(p, name, len(self.slots))
            self._hook_slot(slot)
            self.slots[id(p)] = slot
        self._pack_accs()

    def _pack_accs(self) -> None:
        """Make every slot's [2] accumulator a row of one [S, 2] float64 matrix (slot order), values kept, when
        they share a device: finish_step then reads the matrix without stacking 100 tensors, and reset() zeroes
        it in one call. Called when slots are added and after unpickling."""
        slots = list(self.slots.values())
        self._acc_all = None
        if not slots or len({s.acc.device for s in slots}) != 1:
            return
        mat = torch.stack([s.acc for s in slots])
        for i, s in enumerate(slots):
            s.acc = mat[i]
        self._acc_all = mat

    def _hook_slot(self, slot: _ParamSlot) -> None:
        # Hook the parameter's AccumulateGrad node rather than the tensor: it runs only when a backward()
        # accumulates into p.grad, so torch.autograd.grad calls (curvature probes, gradient penalties, our own
        # brute-force tests) are not mistaken for micro-batch contributions. A tied parameter's uses are
        # summed by autograd before this node runs: one contribution per backward.
        p = slot.param
        with torch.enable_grad():
            node = p.view_as(p).grad_fn.next_functions[0][0]
        slot.acc_node = node  # keep the node alive so the hook stays attached
        slot.handle = node.register_prehook(self._make_hook(slot))

    def remove_hooks(self) -> None:
        for slot in self.slots.values():
            if slot.handle is not None:
                slot.handle.remove()
                slot.handle = None

    def _make_hook(self, slot: _ParamSlot) -> Callable[[tuple[Tensor | None, ...]], None]:
        # The hook lives on an autograd node the parameter references; a strong reference to the engine would keep
        # a discarded optimizer's statistics alive (and running) for as long as the parameter lives.
        engine_ref = weakref.ref(self)
        slot_ref = weakref.ref(slot)

        def hook(grad_outputs: tuple[Tensor | None, ...]) -> None:
            engine, sl = engine_ref(), slot_ref()
            if engine is not None and sl is not None and grad_outputs and grad_outputs[0] is not None:
                engine._capture(sl, grad_outputs[0])
            return None

        return hook

    def measuring_this_step(self) -> bool:
        """Whether the coming step computes statistics (every ``stats_every``-th step, and the first)."""
        return self.step_count % self.stats_every == 0

    def _capture(self, slot: _ParamSlot, x: Tensor) -> None:
        # The hot path: runs once per parameter per backward. Autograd runs hooks with grad mode off unless the
        # backward builds a graph (create_graph=True); only then is a no_grad context worth its ~1 µs.
        if self.step_count % self.stats_every:  # measuring_this_step(), inlined
            return
        if x.is_sparse:
            return  # the optimizer rejects sparse gradients at step time with a clear error
        if torch.is_grad_enabled():
            with torch.no_grad():
                self._capture_impl(slot, x)
        else:
            self._capture_impl(slot, x)

    def _capture_impl(self, slot: _ParamSlot, x: Tensor) -> None:
        if x.is_complex():
            x = torch.view_as_real(x)
        pre = slot.precond
        if pre is None or pre[4] is not x.dtype:
            if pre is None:
                # reset() clears only the slots that captured something (all per-step slot state is set below).
                self.__dict__.setdefault("_touched", []).append(slot)
            # First contribution of this step: A_{t−1} and the kernel choice are fixed until the step.
            v, inv_sqrt_bc2, eps = self.precond(slot.param)
            if v is not None and v.is_complex():
                v = torch.view_as_real(v)
            backend = self._backend_for(x.device, x.dtype)
            pre = slot.precond = (v, inv_sqrt_bc2, eps, backend, x.dtype)
        v, inv_sqrt_bc2, eps, backend, _ = pre
        sumsq = None
        if self.mode != "trace":
            sumsq = slot.sumsq
            if sumsq is None or sumsq.shape != x.shape:
                # fp32 like the kernels' math; float64 parameters keep float64 (the reference path handles them).
                qdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
                sumsq = slot.sumsq = torch.zeros(x.shape, dtype=qdtype, device=x.device)
        # A step's first contribution assigns x² instead of adding it: the buffers are never zeroed between steps
        # (a separate pass over 4 B/param that cost ~0.4 plain steps on the CPU, benchmarks/RESULTS.md).
        first = slot.count == 0
        ops.microbatch_accumulate_(backend, slot.acc, x, v, inv_sqrt_bc2, eps, 1.0, sumsq, first)
        if self.calibrator is not None:
            self._capture_calibration(slot, x, v, inv_sqrt_bc2, eps)
        if self.mode == "lowrank":
            flat = x.reshape(-1).to(torch.float32)
            omega = self._omega(slot, flat.numel(), flat.device)
            proj = flat @ omega  # [r]
            if slot.sketch is None or slot.sketch.shape[0] != flat.numel():
                slot.sketch = torch.zeros(flat.numel(), omega.shape[1], dtype=torch.float32, device=flat.device)
            if first:
                torch.outer(flat, proj, out=slot.sketch)
            else:
                slot.sketch.addr_(flat, proj)
        if self.tail_coords:
            flat_x = x.reshape(-1)
            if slot.tail_idx is None:
                slot.tail_idx = self._subset(slot, flat_x.numel(), flat_x.device, self.tail_coords, salt=11)
            self._tail_capture(slot, flat_x)
        slot.count += 1

    @staticmethod
    def _tail_capture(slot: _ParamSlot, flat_x: Tensor) -> None:
        """Row ``slot.tail_n`` of the slot's tail buffer := this contribution on the subset (float64 at the step)."""
        k, buf, idx = slot.tail_n, slot.tail_buf, slot.tail_idx
        if buf is not None and k < buf.shape[0] and buf.dtype == flat_x.dtype:
            try:
                torch.index_select(flat_x, 0, idx, out=buf[k])
                slot.tail_n = k + 1
                return
            except RuntimeError:  # another device (the model moved): reallocate below
                pass
        # Grow by one row (a step's count is the same from the second step on), keeping this step's earlier rows;
        # a dtype change mid-step promotes, as concatenating them would.
        dtype = flat_x.dtype if buf is None or not k else torch.promote_types(buf.dtype, flat_x.dtype)
        new = torch.empty(k + 1, idx.numel(), dtype=dtype, device=flat_x.device)
        if k:
            new[:k] = buf[:k]
        new[k] = flat_x.index_select(0, idx)
        slot.tail_buf = new
        slot.tail_n = k + 1

    def _backend_for(self, device: torch.device, dtype: torch.dtype) -> str:
        """ops.resolve_backend, memoized per (device, dtype) (it only depends on them and the build)."""
        if self.backend == "reference":
            return "reference"
        key = (device, dtype)
        backend = self._backend_cache.get(key)
        if backend is None:
            backend = self._backend_cache[key] = ops.resolve_backend(self.backend, device, dtype)
        return backend

    def _subset(self, slot: _ParamSlot, numel: int, device: torch.device, coords: int, salt: int = 0) -> Tensor:
        """A fixed random coordinate subset of this tensor, its share of ``coords`` proportional to its size."""
        total = sum(s.param.numel() * (2 if s.param.is_complex() else 1) for s in self.slots.values())
        m = max(1, min(numel, math.ceil(coords * numel / max(total, 1))))
        g = torch.Generator().manual_seed(self.seed * 7 + slot.index + 1 + 1_000_003 * salt)
        return torch.randperm(numel, generator=g)[:m].sort().values.to(device)

    def _calibration_index(self, slot: _ParamSlot, numel: int, device: torch.device) -> Tensor:
        if slot.cal_idx is None:
            slot.cal_idx = self._subset(slot, numel, device, self._calibration_coords)
        return slot.cal_idx

    @torch.no_grad()
    def _collect_tail_samples(self, slots: Sequence[_ParamSlot]) -> None:
        """Standardize this step's deviations by the previous step's variance; refresh that variance.

        Slots with the same contribution count (and device) are handled together, a few tensor ops for all of them:
        per slot the ops cost ~0.1 ms, 15 ms a step for a 148-tensor model. The pool receives exactly what a
        per-slot loop gives: each slot's [n, kept coordinates] block row by row, slot after slot.

        A group's new variance stays one tensor (``_tail_lazy``) until someone reads the slots' ``tail_prev_var``
        (:meth:`_flush_tail_prev`); the next step with the same group takes it as its previous variance directly.
        Splitting it into 100 per-slot views and concatenating them back each step cost ~0.2 ms.
        """
        groups: dict[tuple[int, torch.device], tuple[list[_ParamSlot], list[Tensor]]] = {}
        for s in slots:
            buf, n = s.tail_buf, s.tail_n
            if not n:
                continue
            s.tail_n = 0
            if n < 2:
                continue
            entry = groups.get((n, buf.device))
            if entry is None:
                entry = groups[(n, buf.device)] = ([], [])
            entry[0].append(s)
            entry[1].append(buf if buf.shape[0] == n else buf[:n])
        lazy = self._tail_lazy
        keys = {gk: tuple(map(id, group)) for gk, (group, _) in groups.items()}
        # Each lazy entry must be some group's exact previous variance, else everything goes through the slots.
        # (A slot's subset size is fixed from its first capture until load_state_dict, which flushes.)
        fast = len(lazy) == len(keys) and all(k in lazy for k in keys.values())
        if not fast:
            self._flush_tail_prev()
        new_lazy: dict[tuple[int, ...], tuple[list[_ParamSlot], list[int], Tensor]] = {}
        for gk, (group, bufs) in groups.items():
            n, device = gk
            key = keys[gk]
            ms = lazy[key][1] if fast else [b.shape[1] for b in bufs]
            # Row k: the k-th contribution's samples of every slot side by side (one cat along the columns).
            # Captured in the parameter's dtype; cat promotes, and every float dtype converts to float64 exactly.
            xs = torch.cat(bufs, dim=1).to(torch.float64)
            # Two-pass variance on the centered rows, which the deviations need anyway: Tensor.var(dim=0) on this
            # short, wide [n, Σm] shape took ~240 µs for 2K columns against ~15 µs (same values to ~1e-15).
            centered = xs - xs.mean(dim=0, keepdim=True)
            var = centered.square().sum(dim=0) / (n - 1.0)
            prev_cat: Tensor | None = None
            if fast:
                prev_cat = lazy[key][2]
            else:
                prev = [s.tail_prev_var if s.tail_prev_var is not None and s.tail_prev_var.shape == (m,) else None
                        for s, m in zip(group, ms)]
                if any(pv is not None for pv in prev):
                    # Coordinates without a previous variance get 0 and so drop out with the zero-variance ones.
                    prev_cat = torch.cat([pv if pv is not None else var.new_zeros(m) for pv, m in zip(prev, ms)])
            if prev_cat is not None:
                dev = (centered / prev_cat.sqrt()) * math.sqrt(n / (n - 1.0))
                perm = self._tail_order(n, ms, device)
                keep = (prev_cat > 0).expand(n, -1).reshape(-1)[perm]
                self._tail_push(dev.reshape(-1)[perm][keep])
            new_lazy[key] = (group, ms, var)
        self._tail_lazy = new_lazy

    def _flush_tail_prev(self) -> None:
        """Write the lazily held previous-step variances into the slots' ``tail_prev_var`` (views)."""
        for group, ms, var in self._tail_lazy.values():
            for s, v in zip(group, var.split(ms)):
                s.tail_prev_var = v
        self._tail_lazy = {}

    def _tail_order(self, n: int, ms: list[int], device: torch.device) -> Tensor:
        """Flat indices of an [n, Σms] matrix listing each column block [n, m_i] row by row, block after block."""
        key = (n, tuple(ms), device)
        cached = self._tail_order_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        width = sum(ms)
        idx = torch.arange(n * width, device=device).view(n, width)
        perm = torch.cat([blk.reshape(-1) for blk in idx.split(ms, dim=1)])
        self._tail_order_cache = (key, perm)
        return perm

    def _tail_push(self, samples: Tensor) -> None:
        """Append to the ring: sample i of the call lands at (pos + i) mod size, the same for one call or many."""
        if self._tail_pool.numel() == 0:
            self._tail_pool = torch.zeros(self._tail_pool_size, dtype=torch.float64, device=samples.device)
        size = self._tail_pool_size
        k = samples.numel()
        pos = self._tail_pos
        if k > size:  # only the last `size` survive, at the positions sequential pushes would give them
            pos = (pos + k - size) % size
            samples = samples[-size:]
        m = samples.numel()
        end = pos + m
        if end <= size:
            self._tail_pool[pos:end] = samples
        else:
            first = size - pos
            self._tail_pool[pos:] = samples[:first]
            self._tail_pool[: m - first] = samples[first:]
        self._tail_pos = (self._tail_pos + k) % size
        self._tail_filled = min(size, self._tail_filled + k)

    def tail_index(self, num_boot: int = 200, ci: float = 0.95, block: int | None = None, seed: int = 0) -> Any:
        """α-stable tail index of the micro-batch gradient noise (SPEC §3), with a bootstrap CI.

        Uses the pooled standardized deviations of the last ``tail_pool`` samples (diag/lowrank modes only; each
        coordinate standardized by its variance from the previous measured step, i.e. independent data). Reads
        the pool on the host. Returns :class:`pnekern.stats.TailIndexResult`.
        """
        from .tail import tail_index as _tail_index

        if not self.tail_coords:
            raise RuntimeError("tail_index needs stats='diag' or 'lowrank' (trace mode keeps no per-element samples)")
        if self._tail_filled < 64:
            raise RuntimeError(
                f"tail_index: only {self._tail_filled} samples so far; it needs two measured steps with >= 2 "
                "micro-batches each (the first step only provides the standardizing variance)"
            )
        return _tail_index(self._tail_pool[: self._tail_filled], block, num_boot=num_boot, ci=ci, seed=seed)

    def _capture_calibration(self, slot: _ParamSlot, x: Tensor, v: Tensor | None, inv_sqrt_bc2: float, eps: float) -> None:
        flat = x.reshape(-1)
        idx = self._calibration_index(slot, flat.numel(), flat.device)
        xs = flat.index_select(0, idx).to(torch.float64)
        if slot.count == 0 or slot.cal_sq is None:
            slot.cal_sq = xs * xs
            if v is None:
                slot.cal_a = torch.ones_like(xs)
            else:
                vs = v.reshape(-1).index_select(0, idx).to(torch.float64)
                slot.cal_a = 1.0 / (vs.sqrt() * inv_sqrt_bc2 + eps)
        else:
            slot.cal_sq += xs * xs

    @torch.no_grad()
    def _observe_calibration(self, slots: Sequence[_ParamSlot], lrs: dict[int, float], world: int, group: Any) -> None:
        """Feed the MSD calibrator: θ on the subset after the update and D_t restricted to it (κ = 1)."""
        thetas, diffs = [], []
        for s in slots:
            if s.cal_idx is None or s.cal_sq is None or s.count < 1:
                return
            n = s.count * world
            if n < 2:
                return
            p = s.param
            g = (torch.view_as_real(p.grad) if p.grad.is_complex() else p.grad).reshape(-1)
            gs = g.index_select(0, s.cal_idx).to(torch.float64) * world
            sq = s.cal_sq
            if world > 1:
                import torch.distributed as dist

                sq = sq.clone()
                dist.all_reduce(sq, group=group)
            diag = n * (sq - gs * gs / n) / ((n - 1.0) * world * world)
            lr = lrs[id(p)]
            diffs.append(lr * lr * (s.cal_a * s.cal_a * diag).sum())
            pv = torch.view_as_real(p) if p.is_complex() else p
            thetas.append(pv.detach().reshape(-1).index_select(0, s.cal_idx).to(torch.float64))
        if not thetas:
            return
        shrink = self.shrink_of(slots[0].param) if self.shrink_of is not None else 1.0
        self.calibrator.observe(torch.cat(thetas), torch.stack(diffs).sum(), shrink, step=self.step_count)
        if self.step_count % self.calibration_every == 0:
            est = self.calibrator.estimate()  # one host sync per calibration_every steps
            self.calibration_estimate = est
            if math.isfinite(est.kappa) and est.kappa > 0:
                self.calibrated_kappa = float(est.kappa)

    def _omega(self, slot: _ParamSlot, d: int, device: torch.device) -> Tensor:
        # Ω is regenerated from (seed, step, tensor index) instead of stored across steps: same Ω for every
        # contribution of a step, fresh across steps. Within a step it is kept on the slot (cache_omega).
        cached = slot.omega
        if cached is not None and cached[0] == self.step_count and cached[1] == d and cached[2].device == device:
            return cached[2]
        r = min(self.rank, d)
        g = torch.Generator(device=device)
        g.manual_seed((self.seed * 1_000_003 + self.step_count * 7919 + slot.index) & 0x7FFF_FFFF_FFFF_FFFF)
        omega = torch.randn(d, r, generator=g, device=device, dtype=torch.float32)
        if self.cache_omega:
            slot.omega = (self.step_count, d, omega)
        return omega

    def reset(self) -> None:
        """Drop this step's accumulated contributions (called after each step and by zero_grad).

        The per-element buffers (diag Σx², the lowrank sketch) keep their values: ``count == 0`` marks them unused,
        and the next step's first contribution overwrites them.
        """
        accs: list[Tensor] = []
        touched = self.__dict__.get("_touched")
        for slot in (touched if touched is not None else self.slots.values()):
            if slot.count:
                accs.append(slot.acc)
                slot.count = 0
            slot.tail_n = 0
            slot.precond = None
            slot.omega = None
        if touched is not None:
            touched.clear()
        if accs:
            acc_all = self.__dict__.get("_acc_all")
            if acc_all is not None:
                acc_all.zero_()  # every slot's row; the ones that captured nothing are zero already
            else:
                torch._foreach_zero_(accs)  # one multi-tensor call instead of one zero_() per parameter

    # ------------------------------------------------------------------ step
    def sumsq_buffer(self, p: Tensor) -> Tensor | None:
        """The diag-mode Σ_k x_k² buffer of ``p`` for the fused step (None in trace mode / nothing captured)."""
        slot = self.slots.get(id(p))
        if slot is None or slot.sumsq is None or not slot.count:
            return None
        return slot.sumsq

    def reduce_buffers(self) -> None:
        """Sum the diag-mode Σ_k x_k² buffers over data-parallel workers (call before the fused step reads them)."""
        if self.mode not in ("diag", "lowrank") or not self.measuring_this_step():
            return
        world, group = self._world()
        if world == 1:
            return
        import torch.distributed as dist

        for s in self.slots.values():
            if s.sumsq is not None and s.count:
                dist.all_reduce(s.sumsq, group=group)

    def _world(self) -> tuple[int, Any]:
        dp = self.data_parallel
        if dp is False:
            return 1, None
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            w = dist.get_world_size(self.process_group)
            if w > 1 or dp:
                return w, self.process_group
        if dp:
            raise RuntimeError("data_parallel=True but torch.distributed is not initialized")
        return 1, None

    @torch.no_grad()
    def finish_step(
        self,
        rows: MutableMapping[int, Tensor],
        lrs: dict[int, float],
        *,
        found_inf: Tensor | None = None,
        grad_scale: Tensor | None = None,
        precond: str = "prev",
    ) -> StepStats | None:
        """Combine hook accumulators with the fused step's per-tensor rows into this step's statistics.

        Args:
            rows: id(param) -> float64 [4] row (``STATS_COLUMNS``) for every parameter stepped this time, or [2]
                (its first two columns) when ``precond == "prev"``, or [3] (its columns 0, 2, 3) when
                ``precond == "new"``; every row of a call has the same width. A dict, or the :class:`StepRows`
                of the fused step (its tables are used as they are).
            lrs: id(param) -> the learning rate its group used.
            found_inf: GradScaler's flag; a flagged step contributes no exposure and is marked ``skipped``.
            grad_scale: the loss scale still applied to the captured contributions (divided out here).
            precond: ``"prev"`` (A_{t−1}, trace mode) or ``"new"`` (exact A_t, diag/lowrank modes).
        """
        measuring = self.measuring_this_step()
        self.step_count += 1
        kappa = self.current_kappa()
        if not measuring:
            # Between measurements the exposure rate is held at its last measured value (marked in the log).
            self.reset()
            if self.last_diffusion is None:
                return None
            lr0 = next(iter(lrs.values())) if lrs else 0.0
            self.pne = self.pne + self.last_diffusion if self.pne is not None else self.last_diffusion.clone()
            stats = StepStats(
                step=self.step_count, lr=lr0, num_contributions=0, trace_noise=None, trace_precond_noise=None,
                grad_norm_sq=None, grad_norm_sq_unbiased=None, noise_scale=self.gns.value() if self.batch_size else None,
                noise_scale_raw=None, temperature=self.last_temperature, diffusion=self.last_diffusion,
                pne=self.pne.clone(), curvature=self.curvature, pne_star=self._pne_star(self.last_temperature),
                kappa=kappa, held=True, curvature_held=self.curvature_step is not None,
            )
            self.last = stats
            self.log.append(stats.record())
            return stats

        world, group = self._world()
        # The same parameters step in the same order every step: keep their slots and names between steps.
        key = rows.ids() if isinstance(rows, StepRows) else tuple(rows)
        cached = self.__dict__.get("_slot_cache")
        if cached is not None and cached[0] == key and cached[1] == len(self.slots):
            slots, names, every_row, every_acc = cached[2], cached[3], cached[4], cached[5]
        else:
            slots = [self.slots[pid] for pid in key if pid in self.slots]
            names = [s.name for s in slots]
            every_row = len(slots) == len(key)  # each row has a slot: the kernel's tables are the rows in order
            # Every slot, in slot order: the packed accumulator matrix is this step's [P, 2] block as it is.
            acc_all = self.__dict__.get("_acc_all")
            every_acc = (acc_all is not None and len(slots) == len(self.slots)
                         and all(a is b for a, b in zip(slots, self.slots.values())))
            self._slot_cache = (key, len(self.slots), slots, names, every_row, every_acc)
        counts = [s.count for s in slots]
        # Per tensor: [S1, S1A, n, |g|², |A_{t-1} g|², |A_t g|², Σ a_t² q] from 4-column rows; trace-mode rows
        # (2 columns) stop after |A_{t-1} g|² and A_t rows (3 columns) have no |A_{t-1} g|².
        if not slots:
            self.reset()
            return None
        device = slots[0].acc.device
        same_count = min(counts) == max(counts)
        table = None
        try:
            # One stack per column block instead of three small ops per parameter (same values). The count column
            # is one fill when every parameter saw the same contributions (no host-to-device copy on a GPU).
            rowt = rows.table() if every_row and isinstance(rows, StepRows) else None
            if rowt is None:
                rowt = torch.stack([rows[id(s.param)] for s in slots])
            accs = self._acc_all if every_acc else torch.stack([s.acc for s in slots])
            if accs.device == device and rowt.device == device and accs.dtype == rowt.dtype == torch.float64:
                if same_count:
                    cnt = torch.full((len(slots), 1), float(counts[0]), dtype=torch.float64, device=device)
                else:
                    cnt = torch.tensor(counts, dtype=torch.float64, device=device).unsqueeze(1)
                table = torch.cat([accs, cnt, rowt], dim=1)  # [P, 7]
        except RuntimeError:  # tensors on several devices (a model split over GPUs)
            pass
        if table is None:
            table = torch.stack([
                torch.cat([s.acc.to(device), torch.tensor([float(s.count)], dtype=torch.float64, device=device),
                           rows[id(s.param)].to(device)])
                for s in slots
            ])  # [P, 7]
        if world > 1:
            import torch.distributed as dist

            sums = table[:, :3].contiguous()
            dist.all_reduce(sums, group=group)  # only scalars cross the network
            table[:, :3] = sums
        width = table.shape[1] - 3
        if width not in (2, 3, 4) or (width == 2 and precond != "prev") or (width == 3 and precond != "new"):
            raise RuntimeError(f"finish_step: rows of {width} columns cannot give precond={precond!r} statistics")
        g2_a_col, s1_a_col = (4, 1) if precond == "prev" else ((5, 6) if width == 4 else (4, 5))
        # Columns quadratic in the captured contributions (S1, S1A, Σ a_t² q): the loss scale and clip coefficient
        # enter squared. Rows of 2 columns (trace mode) have no Σ a_t² q.
        sq_cols = [0, 1] if width == 2 else [0, 1, table.shape[1] - 1]
        if grad_scale is None and self.grad_scaler is not None:
            # The user unscaled p.grad explicitly (scaler.unscale_, e.g. for clipping): the captured contributions
            # still carry the loss scale.
            grad_scale = getattr(self.grad_scaler, "_scale", None)
        elif grad_scale is None and found_inf is not None and not self.__dict__.get("_warned_unscaled", False):
            # GradScaler.step passes found_inf without grad_scale only when unscale_ already ran: the loss scale is
            # still in what the hooks captured, and nothing here knows it.
            warnings.warn(
                "pnekern stats: the gradients were unscaled before step() (GradScaler.unscale_, e.g. to clip them), "
                "so the captured micro-batch contributions still carry the loss scale and the noise statistics of "
                "such steps are too large by its square. Set `optimizer.noise_stats.grad_scaler = scaler` once, "
                "after creating the GradScaler.",
                RuntimeWarning,
                stacklevel=4,
            )
            self._warned_unscaled = True
        if grad_scale is not None:
            inv2 = grad_scale.to(device=device, dtype=torch.float64).reciprocal().square()
            table[:, sq_cols] = table[:, sq_cols] * inv2
        clip = None
        if self.clip_coef is not None:
            # p.grad was multiplied by c after capture: the step uses c·ḡ whose noise covariance is c²Σ_step.
            clip = self.clip_coef.to(device=device, dtype=torch.float64)
            table[:, sq_cols] = table[:, sq_cols] * clip.square()
            self.clip_coef = None
        w2 = float(world * world)
        g2 = table[:, 3]
        g2_a = table[:, g2_a_col]
        s1 = table[:, 0]
        s1_a = table[:, s1_a_col]
        # One worker with one count for all slots (the usual case): n is a Python float, 4 fewer [P] ops per column.
        common = world == 1 and same_count
        tr, tr_a = _noise_traces(s1, s1_a, g2, g2_a, float(counts[0]) if common else table[:, 2], w2)
        n_total = int(max(counts) * world) if counts else 0
        if any(c < 2 for c in counts) and world == 1 and not self._warned_single:
            warnings.warn(
                "pnekern stats: a step had fewer than 2 gradient contributions for some parameters, so the noise "
                "variance is undefined there and reported as NaN. Split each batch into >= 2 micro-batches "
                "(call backward once per micro-batch before step()).",
                RuntimeWarning,
                stacklevel=4,
            )
            self._warned_single = True

        lr_list = [lrs[id(s.param)] for s in slots]
        lr0 = lr_list[0]
        if self.bias_corrected:
            eff: Tensor | float = torch.tensor(
                [bias_corrected_coefficient(lr, self.beta1_of(s.param), self.step_count) for lr, s in zip(lr_list, slots)],
                dtype=torch.float64, device=device,
            )
        elif all(lr == lr0 for lr in lr_list):
            eff = lr0  # one learning rate (one group, or equal ones): a scalar, no [P] tensor to build and copy
        else:
            eff = torch.tensor(lr_list, dtype=torch.float64, device=device)
        temp_p = eff * kappa * tr_a
        diff_p = eff * eff * kappa * tr_a
        trace_noise = tr.sum()
        trace_a = tr_a.sum()
        grad_sq = g2.sum()
        grad_sq_unb = grad_sq - trace_noise
        temperature = temp_p.sum()
        diffusion = diff_p.sum()
        skipped = None
        if found_inf is not None:
            skipped = found_inf.to(device=device).reshape(()) != 0
            zero = torch.zeros((), dtype=torch.float64, device=device)
            diffusion = torch.where(skipped, zero, diffusion)
            temperature = torch.where(skipped, zero, temperature)
        temperature_preclip = None if clip is None else temperature / clip.square()
        noise_scale = noise_scale_raw = None
        if self.batch_size is not None:
            num = self.batch_size * trace_noise
            noise_scale_raw = num / grad_sq_unb
            if skipped is None:
                self.gns.update(num, grad_sq_unb)
            else:
                self.gns.update(torch.where(skipped, float("nan"), num), torch.where(skipped, float("nan"), grad_sq_unb))
            noise_scale = self.gns.value()
        # NaN exposure (n = 1) must not poison the integral: it adds nothing and the record says NaN.
        d_add = torch.nan_to_num(diffusion, nan=0.0)
        self.pne = d_add.clone() if self.pne is None else self.pne + d_add
        self.last_diffusion = d_add
        self.last_temperature = torch.nan_to_num(temperature, nan=0.0)
        # Per-parameter breakdown: one [P, 5] table, each row's 0-dim tensors created only when read (building
        # 5P views per step, and packing them into the log, cost more than the rest of finish_step together).
        table_pp = _PerParamTable(torch.stack([tr, tr_a, g2, temp_p, diff_p], dim=1))
        static = {"num_contributions": [c * world for c in counts], "lr": lr_list}
        if len(set(names)) == len(names):
            per_param: MutableMapping = _PerParamMap(table_pp, names, static)
        else:  # repeated names: the dict keeps the last row of each, as it always did
            m = _PerParamMap(table_pp, names, static)
            per_param = {n: m._row(i) for i, n in enumerate(names)}
        if self.mode == "lowrank":
            self._lowrank_factors(slots, table, world)
        if self.tail_coords:
            self._collect_tail_samples(slots)
        if self.calibrator is not None and (skipped is None or skipped.device.type == "cpu" and not bool(skipped)):
            self._observe_calibration(slots, lrs, world, group)
        stats = StepStats(
            step=self.step_count,
            lr=float(lr0),
            num_contributions=n_total,
            trace_noise=trace_noise,
            trace_precond_noise=trace_a,
            grad_norm_sq=grad_sq,
            grad_norm_sq_unbiased=grad_sq_unb,
            noise_scale=noise_scale,
            noise_scale_raw=noise_scale_raw,
            temperature=temperature,
            diffusion=diffusion,
            pne=self.pne.clone(),
            curvature=self.curvature,
            pne_star=self._pne_star(temperature),
            kappa=kappa,
            skipped=skipped,
            curvature_held=self.curvature_step is not None and self.curvature_step != self.step_count,
            precond=precond,
            per_param=per_param,
            temperature_preclip=temperature_preclip,
            clip_coef=clip,
        )
        self.last = stats
        self.log.append(stats.record())
        self.reset()
        return stats

    def _pne_star(self, temperature: Tensor | None, floor: float = 1e-12) -> Tensor | None:
        if temperature is None or self.curvature is None:
            return None
        curv = self.curvature if isinstance(self.curvature, Tensor) else torch.tensor(float(self.curvature), dtype=torch.float64)
        curv = curv.to(device=temperature.device, dtype=torch.float64)
        return temperature / curv.clamp(min=floor)

    def current_kappa(self) -> float:
        if self.kappa == "calibrated" and self.calibrated_kappa is not None:
            return self.calibrated_kappa
        beta1 = next((self.beta1_of(s.param) for s in self.slots.values()), 0.9)
        return kappa_value(self.kappa, beta1)

    def set_curvature(self, value: Tensor | float, step: int | None = None) -> None:
        """Record a curvature reference Curv_t = Tr(A Ĥ A); it is carried forward (flagged) until the next one."""
        if isinstance(value, Tensor):
            value = value.detach().to(torch.float64)
        self.curvature = value
        self.curvature_step = self.step_count if step is None else step

    # ------------------------------------------------------------------ lowrank
    def _lowrank_factors(self, slots: Sequence[_ParamSlot], table: Tensor, world: int) -> None:
        """Nyström factors U S Uᵀ + D of Σ_step per parameter from this step's sketch (SPEC §2)."""
        w2 = float(world * world)
        for i, s in enumerate(slots):
            if s.sketch is None or s.count < 1:
                continue
            n = float(table[i, 2]) if table.device.type == "cpu" else s.count * world
            if n < 2:
                continue
            p = s.param
            g = (torch.view_as_real(p.grad) if p.grad.is_complex() else p.grad).reshape(-1).to(torch.float32)
            omega = self._omega_for_step(s, g.numel(), g.device)
            # Σ_k x_k x_kᵀ Ω − (1/n)(Σx)(Σx)ᵀΩ, Σx = W·p.grad, then the Σ_step scaling n/((n−1)W²).
            gsum = g * world
            y = s.sketch - torch.outer(gsum, gsum @ omega) / n
            y = y * (n / ((n - 1.0) * w2))
            u, lam = nystrom(y, omega)
            diag_sigma = s.sumsq.reshape(-1).to(torch.float32) - gsum * gsum / n
            diag_sigma = diag_sigma * (n / ((n - 1.0) * w2))
            resid = (diag_sigma - (u * u) @ lam).clamp(min=0.0)
            self.covariances[s.name] = (u, lam, resid)

    def _omega_for_step(self, slot: _ParamSlot, d: int, device: torch.device) -> Tensor:
        # finish_step already advanced step_count: regenerate the Ω the hooks used this step.
        self.step_count -= 1
        try:
            return self._omega(slot, d, device)
        finally:
            self.step_count += 1


class _StatsStateDictPost:
    """state_dict post-hook adding the engine state (a class, not a closure, so optimizers stay picklable)."""

    def __init__(self, engine: NoiseStats) -> None:
        self.engine = engine

    def __call__(self, optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict[STATE_KEY] = self.engine.state_dict()
        return state_dict


class _StatsLoadPre:
    def __init__(self, engine: NoiseStats) -> None:
        self.engine = engine

    def __call__(self, optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        # torch passes a shallow copy: popping here does not touch the caller's dict.
        self.engine._pending_state = state_dict.pop(STATE_KEY, None)
        return state_dict


class _StatsLoadPost:
    def __init__(self, engine: NoiseStats) -> None:
        self.engine = engine

    def __call__(self, optimizer: Any) -> None:
        pending = self.engine.__dict__.pop("_pending_state", None)
        if pending is not None:
            self.engine.load_state_dict(pending)
        else:
            self.engine.invalidate_caches()  # the optimizer's state tensors were replaced


def nystrom(y: Tensor, omega: Tensor) -> tuple[Tensor, Tensor]:
    """Stable Nyström approximation C ≈ U diag(λ) Uᵀ from a sketch Y = C Ω (Tropp et al. 2017, shifted).

    Args:
        y: [d, r] sketch of a PSD matrix C.
        omega: [d, r] the test matrix used for the sketch.
    Returns:
        U [d, r] with orthonormal columns and λ [r] ≥ 0 (descending).
    """
    y = y.to(torch.float64)
    omega = omega.to(torch.float64)
    nu = torch.finfo(torch.float32).eps * max(torch.linalg.matrix_norm(y, ord="fro").item(), 1e-30)
    y_nu = y + nu * omega
    b = omega.T @ y_nu
    b = 0.5 * (b + b.T)
    try:
        c = torch.linalg.cholesky(b)
        f = torch.linalg.solve_triangular(c, y_nu.T, upper=False).T
    except RuntimeError:
        # Rank-deficient core (few contributions): fall back to the pseudo-inverse square root.
        evals, evecs = torch.linalg.eigh(b)
        keep = evals > evals.max().clamp(min=0) * 1e-10
        inv_sqrt = evecs[:, keep] / evals[keep].sqrt()
        f = y_nu @ inv_sqrt
    u, sig, _ = torch.linalg.svd(f, full_matrices=False)
    lam = (sig * sig - nu).clamp(min=0.0)
    return u.to(torch.float32), lam.to(torch.float32)


def nan_scalar(device: torch.device | str = "cpu") -> Tensor:
    return torch.tensor(math.nan, dtype=torch.float64, device=device)
