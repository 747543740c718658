"""Exposure history: in-memory log of every step's statistics, JSONL / CSV / TensorBoard sinks and plots.

Records arrive from the optimizer as dicts of 0-dim device tensors. Reading them on the host each step would sync
the device, so the log packs the tensors of ``chunk`` records into one buffer and starts a non-blocking copy to
(pinned) host memory; values are decoded only when the user reads the history. The newest record stays unpacked so
a curvature probe that runs after the step can still amend it (:meth:`ExposureLog.update_last`).
"""
from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .engine import _LazyRow, _PerParamMap, _rows_from_table

__all__ = ["ExposureLog", "SCALAR_FIELDS"]

#: numeric per-step fields (units: see pnekern.stats.StepStats and the README)
SCALAR_FIELDS = (
    "trace_noise", "trace_precond_noise", "grad_norm_sq", "grad_norm_sq_unbiased", "noise_scale", "noise_scale_raw",
    "temperature", "diffusion", "pne", "curvature", "pne_star", "temperature_preclip", "clip_coef",
)
_STATIC_FIELDS = ("step", "lr", "num_contributions", "kappa", "held", "curvature_held")
_PLOT_FIELDS = (("temperature", "NE_t = η κ Tr(AΣA)"), ("pne", "P-NE = Σ D_t  [θ²]"),
                ("noise_scale", "B_simple [examples]"), ("pne_star", "P-NE*_t = NE_t / Curv_t"))


def _is_tensor(v: Any) -> bool:
    return isinstance(v, Tensor)


class _Packed:
    """The tensor values of a run of records, copied to the host asynchronously."""

    __slots__ = ("host", "event", "layout", "compact")

    def __init__(self, tensors: list[Tensor], layout: list[tuple[int, int, str, str | None]],
                 tables: list[Tensor] = (), compact: list[tuple[int, int, list[str], dict[str, list[Any]]]] = ()
                 ) -> None:
        # layout: (position in the packed vector, record offset in chunk, key, per-param name or None); positions
        # past len(tensors) index into the flattened per-parameter tables that follow the scalars.
        # compact: (table position, record offset, names, static values) of each record whose
        # per-parameter rows are decoded straight from its table (rows the user never touched).
        self.layout = layout
        self.compact = compact
        f64 = torch.float64
        parts = []
        if tensors:
            if all(t.dtype is f64 and t.dim() == 0 and not t.requires_grad for t in tensors):
                parts.append(torch.stack(tensors))  # the usual case: skip three no-op conversions per value
            else:
                parts.append(torch.stack([t.detach().reshape(()).to(f64) for t in tensors]))
        parts.extend(m.detach().reshape(-1).to(f64) for m in tables)
        flat = parts[0] if len(parts) == 1 else torch.cat(parts)
        dev = flat.device
        self.event = None
        if dev.type == "cuda":
            self.host = torch.empty(flat.shape, dtype=torch.float64, pin_memory=True)
            self.host.copy_(flat, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = flat.to("cpu")

    def values(self) -> list[float]:
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        return self.host.tolist()


class ExposureLog:
    """History of per-step statistics (one record per optimizer step with statistics).

    Args:
        chunk: records packed per asynchronous device→host copy.
        keep_per_param: keep the per-parameter breakdown (memory ∝ steps × parameters).
        tensorboard: optional ``SummaryWriter``-like object (``add_scalar(tag, value, step)``); records are written
            when they reach the host (every ``chunk`` records and on :meth:`flush`), never forcing a sync per step.
    """

    def __init__(self, chunk: int = 256, keep_per_param: bool = True, tensorboard: Any = None) -> None:
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk={chunk!r} must be a positive int")
        self.chunk = chunk
        self.keep_per_param = keep_per_param
        self.tensorboard = tensorboard
        self._host: list[dict[str, Any]] = []  # decoded records
        self._inflight: list[tuple[list[dict[str, Any]], _Packed]] = []  # skeletons + their packed tensors
        self._pending: list[dict[str, Any]] = []  # raw records (device tensors), newest last
        self._tb_written = 0

    # ------------------------------------------------------------------ writing
    def append(self, record: dict[str, Any]) -> None:
        """Add one step's record (values may be 0-dim device tensors; no sync)."""
        if not isinstance(record, dict):
            raise TypeError(f"record must be a dict, got {type(record).__name__}")
        self._pending.append(dict(record))
        if len(self._pending) > self.chunk:
            self._pack(self._pending[:-1])
            self._pending = self._pending[-1:]

    def update_last(self, updates: dict[str, Any]) -> None:
        """Amend the newest record (e.g. a curvature probe that ran after the step)."""
        if not self._pending:
            raise RuntimeError("update_last: the log is empty")
        self._pending[-1].update(updates)

    def _pack(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        # per device: scalar tensors, their (record, key, name), per-parameter tables, their entries
        by_device: dict[torch.device, tuple[list[Tensor], list[tuple[int, str, str | None]], dict[int, tuple[Tensor, int]],
                                            list[tuple[int, int, int, str, str]], list[tuple[Any, ...]]]] = {}

        def bucket(dev: torch.device) -> tuple[Any, ...]:
            b = by_device.get(dev)
            if b is None:
                b = by_device[dev] = ([], [], {}, [], [])
            return b

        skeletons = []
        for i, rec in enumerate(records):
            skel: dict[str, Any] = {}
            for k, v in rec.items():
                if k == "per_param":
                    continue
                if _is_tensor(v):
                    ts, lay, _, _, _ = bucket(v.device)
                    ts.append(v)
                    lay.append((i, k, None))
                    skel[k] = None
                else:
                    skel[k] = v
            pp_out: dict[str, dict[str, Any]] = {}
            pp = rec.get("per_param") or {}
            compact = pp.compact() if self.keep_per_param and isinstance(pp, _PerParamMap) else None
            if compact is not None:
                # The whole table travels once; only rows the user wrote to go row by row below, and _decode
                # rebuilds the others from the table.
                table, names, static, touched = compact
                m = table.matrix
                _, _, tabs, _, comp = bucket(m.device)
                tabs.setdefault(id(table), (m, len(tabs)))
                comp.append((id(table), i, names, static))
                pp = touched
            if self.keep_per_param:
                for name, d in pp.items():
                    row: dict[str, Any] = {}
                    if isinstance(d, _LazyRow):
                        # Columns still in the step's [P, C] table travel as the whole table: one tensor per record.
                        table, r, done, pending = d.lazy_items()
                        items = done
                        if pending:
                            m = table.matrix
                            _, _, tabs, tlay, _ = bucket(m.device)
                            tabs.setdefault(id(table), (m, len(tabs)))
                            ncol = m.shape[1]
                            for k, c in pending:
                                tlay.append((id(table), r * ncol + c, i, k, name))
                                row[k] = None
                        # keep the key order of the record
                        order = list(d._data)
                    else:
                        items = list(d.items())
                        order = None
                    for k, v in items:
                        if _is_tensor(v):
                            ts, lay, _, _, _ = bucket(v.device)
                            ts.append(v)
                            lay.append((i, k, name))
                            row[k] = None
                        else:
                            row[k] = v
                    pp_out[name] = row if order is None else {k: row[k] for k in order}
            skel["per_param"] = pp_out
            skeletons.append(skel)
        packs = []
        for ts, lay, tabs, tlay, comp in by_device.values():
            layout = [(pos, i, k, name) for pos, (i, k, name) in enumerate(lay)]
            offsets, mats, off = {}, [], len(ts)
            for tid, (m, _) in tabs.items():
                offsets[tid] = off
                mats.append(m)
                off += m.numel()
            layout.extend((offsets[tid] + e, i, k, name) for tid, e, i, k, name in tlay)
            compact_layout = [(offsets[tid], i, names, static) for tid, i, names, static in comp]
            packs.append(_Packed(ts, layout, mats, compact_layout))
        self._inflight.append((skeletons, packs))  # type: ignore[arg-type]
        if self.tensorboard is not None and len(self._inflight) > 1:
            # Decode the previous chunk: its copy has had a whole chunk of steps to complete.
            self._decode(keep_last=1)
            self._write_tensorboard()

    def _decode(self, keep_last: int = 0) -> None:
        n = len(self._inflight) - keep_last
        for skeletons, packs in self._inflight[:n]:
            for pack in packs:  # type: ignore[union-attr]
                vals = pack.values()
                for pos, i, key, name in pack.layout:
                    val = vals[pos]
                    if key == "skipped":
                        val = bool(val)
                    if name is None:
                        skeletons[i][key] = val
                    else:
                        skeletons[i]["per_param"][name][key] = val
                for off, i, names, static in pack.compact:
                    # rows written to went row by row above and are kept; the rest come from the table
                    skeletons[i]["per_param"] = _rows_from_table(names, static, vals, off, skeletons[i]["per_param"])
            self._host.extend(skeletons)
        self._inflight = self._inflight[n:]

    def flush(self) -> None:
        """Bring every record to the host (one sync) and write pending TensorBoard scalars."""
        self._pack(self._pending)
        self._pending = []
        self._decode()
        self._write_tensorboard()

    def _write_tensorboard(self) -> None:
        if self.tensorboard is None:
            return
        for rec in self._host[self._tb_written:]:
            for k in SCALAR_FIELDS:
                v = rec.get(k)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self.tensorboard.add_scalar(f"pnekern/{k}", v, rec["step"])
            for name, d in (rec.get("per_param") or {}).items():
                v = d.get("temperature")
                if isinstance(v, float) and math.isfinite(v):
                    self.tensorboard.add_scalar(f"pnekern/temperature/{name}", v, rec["step"])
        self._tb_written = len(self._host)

    # ------------------------------------------------------------------ reading
    def records(self, per_param: bool = True) -> list[dict[str, Any]]:
        """Every record as plain Python values (syncs once). NaN marks an undefined variance (n = 1)."""
        self.flush()
        if per_param:
            return [dict(r) for r in self._host]
        return [{k: v for k, v in r.items() if k != "per_param"} for r in self._host]

    def __len__(self) -> int:
        inflight = sum(len(s) for s, _ in self._inflight)
        return len(self._host) + inflight + len(self._pending)

    def column(self, key: str, param: str | None = None) -> list[float | None]:
        """One field over all steps (``param`` picks the per-parameter value)."""
        out = []
        for r in self.records(per_param=param is not None):
            if param is None:
                out.append(r.get(key))
            else:
                out.append((r.get("per_param") or {}).get(param, {}).get(key))
        return out

    def summary(self) -> dict[str, Any]:
        """Run-level numbers: steps, final P-NE, mean temperature / noise scale over measured steps, last P-NE*."""
        recs = [r for r in self.records(per_param=False)]
        measured = [r for r in recs if not r.get("held")]

        def mean(key: str) -> float | None:
            vals = [r[key] for r in measured if isinstance(r.get(key), float) and math.isfinite(r[key])]
            return sum(vals) / len(vals) if vals else None

        last = recs[-1] if recs else {}
        return {
            "steps": len(recs), "measured_steps": len(measured), "pne": last.get("pne"),
            "mean_temperature": mean("temperature"), "mean_diffusion": mean("diffusion"),
            "mean_noise_scale_raw": mean("noise_scale_raw"), "noise_scale": last.get("noise_scale"),
            "mean_trace_precond_noise": mean("trace_precond_noise"), "pne_star": last.get("pne_star"),
            "curvature": last.get("curvature"), "kappa": last.get("kappa"),
        }

    def clear(self) -> None:
        """Forget every record (the optimizer's cumulative P-NE is not reset)."""
        self._host, self._inflight, self._pending, self._tb_written = [], [], [], 0

    # ------------------------------------------------------------------ sinks
    @staticmethod
    def _json_value(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None  # strict JSON has no NaN/inf; null means "undefined this step"
        if isinstance(v, dict):
            return {k: ExposureLog._json_value(x) for k, x in v.items()}
        return v

    def to_jsonl(self, path: str | os.PathLike, per_param: bool = True) -> str:
        """Write one JSON object per step (NaN/inf → null). Returns the path."""
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            for r in self.records(per_param=per_param):
                f.write(json.dumps(self._json_value(r)) + "\n")
        return path

    def to_csv(self, path: str | os.PathLike, per_param: bool = False) -> str:
        """Write a CSV with one row per step; ``per_param`` adds ``<name>/<field>`` columns. Returns the path."""
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        recs = self.records(per_param=True)
        cols = list(_STATIC_FIELDS) + list(SCALAR_FIELDS) + ["skipped"]
        pp_cols: list[str] = []
        if per_param:
            seen: dict[str, None] = {}
            for r in recs:
                for name, d in (r.get("per_param") or {}).items():
                    for k in d:
                        seen.setdefault(f"{name}/{k}")
            pp_cols = list(seen)
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols + pp_cols)
            for r in recs:
                row = [r.get(c) for c in cols]
                for c in pp_cols:
                    name, k = c.rsplit("/", 1)
                    row.append((r.get("per_param") or {}).get(name, {}).get(k))
                w.writerow(["" if v is None else v for v in row])
        return path

    def plot(self, path: str | os.PathLike, per_layer: bool = False, params: Iterable[str] | None = None) -> str:
        """Plot temperature, integrated P-NE, noise scale and P-NE* against step (needs matplotlib).

        Held steps (``stats_every`` > 1) are drawn as a dashed continuation; ``per_layer`` adds a panel with the
        per-parameter temperature (``params`` limits which). Returns the path.
        """
        try:
            import matplotlib

            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise RuntimeError("ExposureLog.plot needs matplotlib: pip install 'pnekern[plot]'") from e
        recs = self.records(per_param=per_layer)
        if not recs:
            raise RuntimeError("ExposureLog.plot: nothing to plot yet (no step with statistics)")
        panels = list(_PLOT_FIELDS) + ([("per_layer", "NE_t per parameter")] if per_layer else [])
        fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.2 * len(panels)), sharex=True)
        steps = [r["step"] for r in recs]
        for ax, (key, label) in zip(axes, panels):
            if key == "per_layer":
                names = list(params) if params is not None else list((recs[-1].get("per_param") or {}).keys())
                for name in names:
                    ys = [(r.get("per_param") or {}).get(name, {}).get("temperature") for r in recs]
                    ax.plot(steps, [math.nan if y is None else y for y in ys], label=name, lw=1)
                if names:
                    ax.legend(fontsize=6, ncol=2)
            else:
                ys = [r.get(key) for r in recs]
                ys = [math.nan if y is None else y for y in ys]
                ax.plot(steps, ys, lw=1)
                held = [s for s, r in zip(steps, recs) if r.get("held")]
                if held:
                    ax.plot(held, [y for s, y, r in zip(steps, ys, recs) if r.get("held")], ".", ms=1, alpha=0.4,
                            label="held (not measured)")
                    ax.legend(fontsize=6)
                if key in ("noise_scale", "temperature", "pne_star") and any(y > 0 for y in ys if math.isfinite(y)):
                    ax.set_yscale("log")
            ax.set_ylabel(label, fontsize=7)
        axes[-1].set_xlabel("optimizer step")
        fig.tight_layout()
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
