"""Controlled-noise ICL experiments: named conditions × seeds, per-run ICL metrics, and the statistics of the
drafts' protocol (Spearman ρ of an ICL metric vs integrated P-NE with a bootstrap CI, TOST equivalence of
condition pairs, Holm–Bonferroni over the family of tests).

An *experiment spec* is a JSON object (the files in ``configs/``) read by ``pnekern icl sweep --spec FILE``::

    {"name": "batch_size", "description": "...",
     "base": {RunConfig fields},                      # shared by every condition
     "seeds": [0, 1, 2],
     "conditions": [{"name": "B8", "x": 8, "batch_size": 8}, ...],   # RunConfig overrides per condition
     "metrics": ["mean_excess_over_bayes", "icl_gain"],              # optional: metrics tested against P-NE
     "tost": [{"a": "B8", "b": "inj8", "metric": "mean_excess_over_bayes", "margin": 0.02}]}   # optional

Run directories are ``OUT/<condition>_seed<seed>`` (resumable: a finished run's report.json is read back, so
specs that share a condition name and an output directory share its runs — the batch-size and injected-noise specs
do); ``OUT/experiment_<name>.json`` holds every run's metrics and the statistics, ``OUT/experiment_<name>.png``
the figure.

Per-run ICL metrics (all squared error / d against the noiseless target, evaluated on the same fresh sequences):

- ``mean_excess_over_bayes``: mean over k = 0..k_max−1 of E(f − x_qᵀμ)²/d (μ the Bayes posterior mean);
- ``late_excess_over_bayes``: the same mean over k ≥ d only (where in-context learning has to do the work);
- ``icl_gain``: error(k=0) − error(k=k_max−1) of the model (how much the context helps; larger is better);
- ``final_val_loss`` (y², noisy targets, mean over positions), ``updates``, ``examples`` (updates × batch).

Exposure: ``pne`` (total integrated P-NE = Σ_t η_t² κ Tr(AΣA), θ², natural + injected), ``pne_injected`` (the
injected part), ``mean_temperature`` (NE_t averaged over steps).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from .runs import RunConfig, evaluate_run, train_run, write_json, write_run_files
from .stats import holm_bonferroni, spearman_with_ci, tost_two_sample

__all__ = ["ExperimentSpec", "load_spec", "run_metrics", "run_experiment", "analyze_experiment",
           "plot_experiment", "format_experiment", "METRICS"]

#: per-run metrics an experiment can test (see the module docstring); "lower is better" except icl_gain
METRICS = ("mean_excess_over_bayes", "late_excess_over_bayes", "icl_gain", "model_error_kmax", "final_val_loss")


@dataclass
class ExperimentSpec:
    """A validated experiment spec (see the module docstring for the JSON layout)."""

    name: str
    base: Dict[str, Any]
    seeds: List[int]
    conditions: List[Dict[str, Any]]
    description: str = ""
    metrics: List[str] = field(default_factory=lambda: ["mean_excess_over_bayes", "icl_gain"])
    tost: List[Dict[str, Any]] = field(default_factory=list)
    n_boot: int = 2000

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "ExperimentSpec":
        if not isinstance(data, dict):
            raise ValueError("experiment spec must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"comment", "command"})
        if unknown:
            raise ValueError(f"experiment spec: unknown key(s) {unknown}; known: {sorted(known)}")
        for key in ("name", "base", "seeds", "conditions"):
            if key not in data:
                raise ValueError(f"experiment spec: missing {key!r}")
        spec = cls(**{k: v for k, v in data.items() if k in known})
        spec.validate()
        return spec

    def validate(self) -> None:
        if not self.conditions:
            raise ValueError("experiment spec: conditions must not be empty")
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds):
            raise ValueError(f"experiment spec: seeds must be a non-empty list of integers, got {self.seeds!r}")
        names = [c.get("name") for c in self.conditions]
        if any(not isinstance(n, str) or not n or "/" in n for n in names):
            raise ValueError(f"experiment spec: every condition needs a non-empty 'name' without '/', got {names}")
        if len(set(names)) != len(names):
            raise ValueError(f"experiment spec: condition names must be unique, got {names}")
        for m in self.metrics:
            if m not in METRICS:
                raise ValueError(f"experiment spec: metric {m!r} is not one of {METRICS}")
        for t in self.tost:
            if set(t) - {"a", "b", "metric", "margin"} or not {"a", "b", "margin"} <= set(t):
                raise ValueError(f"experiment spec: tost entries need a, b, margin (and optional metric), got {t}")
            if t["a"] not in names or t["b"] not in names:
                raise ValueError(f"experiment spec: tost pair {t['a']!r}/{t['b']!r} names an unknown condition")
            if t.get("metric", self.metrics[0]) not in METRICS or not float(t["margin"]) > 0:
                raise ValueError(f"experiment spec: tost {t}: metric must be in {METRICS} and margin > 0")
        for c in self.conditions:  # every run config is validated before the first one trains
            self.run_config(c["name"], self.seeds[0])

    def condition(self, name: str) -> Dict[str, Any]:
        for c in self.conditions:
            if c["name"] == name:
                return c
        raise KeyError(name)

    def run_config(self, condition: str, seed: int) -> RunConfig:
        over = {k: v for k, v in self.condition(condition).items() if k not in ("name", "x", "label")}
        try:
            return RunConfig.from_dict({**self.base, **over, "seed": seed})
        except ValueError as e:
            raise ValueError(f"condition {condition!r}: {e}") from None


def load_spec(path: str) -> ExperimentSpec:
    """Read and validate an experiment spec file."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--spec {path}: {e}") from None
    return ExperimentSpec.from_dict(data)


def _injected_pne(records: Sequence[Dict[str, Any]]) -> float:
    total = 0.0
    for r in records:
        v = r.get("diffusion_injected")
        if isinstance(v, (int, float)) and math.isfinite(v):
            total += float(v)
    return total


def run_metrics(report: Dict[str, Any], cfg: RunConfig) -> Dict[str, Any]:
    """The per-run ICL metrics and exposure of a run report (see the module docstring)."""
    errs = report["errors_vs_k"]
    ks = errs["k"]
    ex = report["excess_over_bayes"]["mean"]
    late = [e for k, e in zip(ks, ex) if k >= cfg.d]
    exp = report.get("exposure", {})
    return {
        "mean_excess_over_bayes": float(np.mean(ex)),
        "late_excess_over_bayes": float(np.mean(late)) if late else None,
        "icl_gain": float(errs["model"][0] - errs["model"][-1]),
        "model_error_kmax": float(errs["model"][-1]),
        "final_val_loss": report["final_loss"]["val"],
        "updates": report["training"]["updates"],
        "examples": report["training"]["updates"] * cfg.batch_size,
        "stop_reason": report["training"]["stop_reason"],
        "reached_target": report["training"]["stop_reason"] == "target_loss" if cfg.target_loss is not None else None,
        "elapsed_s": report["training"]["elapsed_s"],
        "pne": exp.get("pne"),
        "pne_injected": report.get("pne_injected", 0.0),
        "mean_temperature": exp.get("mean_temperature"),
        "noise_scale": exp.get("noise_scale"),
    }


def run_experiment(spec: ExperimentSpec, out_dir: str, *, progress: bool = False,
                   log: Callable[[str], Any] = print) -> Dict[str, Any]:
    """Train and evaluate every (condition, seed); write ``out_dir/experiment_<name>.json`` (+ figure); return it."""
    os.makedirs(out_dir, exist_ok=True)
    rows: List[Dict[str, Any]] = []
    for cond in spec.conditions:
        for seed in spec.seeds:
            cfg = spec.run_config(cond["name"], seed)
            run = f"{cond['name']}_seed{seed}"
            run_dir = os.path.join(out_dir, run)
            report_path = os.path.join(run_dir, "report.json")
            if os.path.exists(report_path):
                log(f"[{spec.name}] {run}: done already, reading {report_path}")
            else:
                t0 = time.perf_counter()
                outcome = train_run(cfg, progress=progress)
                evaluation = evaluate_run(outcome.model, outcome.task, cfg)
                recs = outcome.optimizer.exposure.records(per_param=False) \
                    if getattr(outcome.optimizer, "noise_stats", None) is not None else []
                write_run_files(run_dir, outcome, evaluation, extra={"pne_injected": _injected_pne(recs)})
                log(f"[{spec.name}] {run}: {outcome.result.updates} updates ({outcome.result.stop_reason}), "
                    f"val {outcome.result.final_val_loss:.4f}, mean excess over Bayes "
                    f"{evaluation['excess_over_bayes']['mean_over_k']:.4f} ({time.perf_counter() - t0:.0f} s)")
            with open(report_path) as f:
                report = json.load(f)
            rows.append({"condition": cond["name"], "x": cond.get("x"), "seed": seed, "run": run,
                         **run_metrics(report, cfg),
                         "errors_vs_k": report["errors_vs_k"]["model"],
                         "bayes_vs_k": report["errors_vs_k"].get("bayes")})
    result = {"name": spec.name, "description": spec.description, "spec": dataclasses.asdict(spec),
              "runs": rows, "k": None}
    with open(os.path.join(out_dir, f"{spec.conditions[0]['name']}_seed{spec.seeds[0]}", "report.json")) as f:
        result["k"] = json.load(f)["errors_vs_k"]["k"]
    result["analysis"] = analyze_experiment(rows, spec)
    write_json(os.path.join(out_dir, f"experiment_{spec.name}.json"), result)
    png = plot_experiment(result, os.path.join(out_dir, f"experiment_{spec.name}.png"))
    if png:
        result["figure"] = png
    return result


def _condition_summary(rows: List[Dict[str, Any]], spec: ExperimentSpec) -> List[Dict[str, Any]]:
    out = []
    for cond in spec.conditions:
        rs = [r for r in rows if r["condition"] == cond["name"]]
        entry: Dict[str, Any] = {"condition": cond["name"], "x": cond.get("x"), "n": len(rs),
                                 "reached_target": sum(1 for r in rs if r.get("reached_target"))}
        for key in METRICS + ("pne", "pne_injected", "updates", "examples", "mean_temperature"):
            vals = [r[key] for r in rs if isinstance(r.get(key), (int, float))]
            entry[key] = float(np.mean(vals)) if vals else None
            entry[key + "_sd"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
        out.append(entry)
    return out


def analyze_experiment(rows: List[Dict[str, Any]], spec: ExperimentSpec) -> Dict[str, Any]:
    """Spearman ρ (bootstrap CI) of each metric vs P-NE over all runs, TOST per listed pair, Holm–Bonferroni
    over each family (the Spearman tests; the TOST tests)."""
    out: Dict[str, Any] = {"conditions": _condition_summary(rows, spec), "spearman_vs_pne": [], "tost": []}
    for m in spec.metrics:
        pairs = [(r["pne"], r[m]) for r in rows if isinstance(r.get("pne"), (int, float))
                 and isinstance(r.get(m), (int, float))]
        if len(pairs) < 3:
            continue
        res = spearman_with_ci([p[0] for p in pairs], [p[1] for p in pairs], n_boot=spec.n_boot, seed=0)
        out["spearman_vs_pne"].append({"metric": m, **dataclasses.asdict(res)})
    if out["spearman_vs_pne"]:
        rej, adj = holm_bonferroni([s["p_value"] for s in out["spearman_vs_pne"]])
        for s, r, a in zip(out["spearman_vs_pne"], rej, adj):
            s.update(p_holm=float(a), significant_holm=bool(r))
    for t in spec.tost:
        m = t.get("metric", spec.metrics[0])
        xa = [r[m] for r in rows if r["condition"] == t["a"] and isinstance(r.get(m), (int, float))]
        xb = [r[m] for r in rows if r["condition"] == t["b"] and isinstance(r.get(m), (int, float))]
        if len(xa) < 2 or len(xb) < 2:
            continue
        margin = float(t["margin"])
        res = tost_two_sample(xa, xb, -margin, margin)
        out["tost"].append({"a": t["a"], "b": t["b"], "metric": m, "margin": margin, "mean_a": float(np.mean(xa)),
                            "mean_b": float(np.mean(xb)), **dataclasses.asdict(res)})
    if out["tost"]:
        rej, adj = holm_bonferroni([t["p_value"] for t in out["tost"]])
        for t, r, a in zip(out["tost"], rej, adj):
            t.update(p_holm=float(a), equivalent_holm=bool(r))
    return out


def format_experiment(result: Dict[str, Any]) -> str:
    """Plain-text tables: per condition (mean ± sd over seeds; ``hit`` = runs that reached the matched-loss target
    before the step cap), Spearman vs P-NE, TOST."""
    a = result["analysis"]
    lines = [f"experiment {result['name']}: {len(result['runs'])} runs"]
    lines.append(f"{'condition':>14} {'n':>2} {'hit':>3} {'updates':>8} {'val loss':>9} {'excess':>16} {'late excess':>16} "
                 f"{'ICL gain':>16} {'P-NE':>10} {'P-NE inj':>10}")

    def ms(c: Dict[str, Any], key: str) -> str:
        v, sd = c.get(key), c.get(key + "_sd")
        if v is None:
            return f"{'n/a':>16}"
        return f"{v:>8.4f}±{sd:<7.4f}" if sd is not None else f"{v:>16.4f}"

    for c in a["conditions"]:
        lines.append(f"{c['condition']:>14} {c['n']:>2} {c['reached_target']:>3} {c['updates'] or 0:>8.0f} {c['final_val_loss'] or 0:>9.4f} "
                     f"{ms(c, 'mean_excess_over_bayes')} {ms(c, 'late_excess_over_bayes')} {ms(c, 'icl_gain')} "
                     f"{c['pne'] or 0:>10.4g} {c['pne_injected'] or 0:>10.4g}")
    for s in a["spearman_vs_pne"]:
        lines.append(f"Spearman ρ({s['metric']}, P-NE) = {s['rho']:+.3f} [{s['ci_low']:+.3f}, {s['ci_high']:+.3f}] "
                     f"(95% bootstrap), p = {s['p_value']:.3g}, Holm p = {s['p_holm']:.3g}, n = {s['n']}")
    for t in a["tost"]:
        lines.append(f"TOST {t['a']} vs {t['b']} on {t['metric']}: diff {t['diff']:+.4f}, margin ±{t['margin']}, "
                     f"p = {t['p_value']:.3g}, Holm p = {t['p_holm']:.3g} → "
                     f"{'equivalent' if t['equivalent_holm'] else 'not shown equivalent'}")
    return "\n".join(lines)


def plot_experiment(result: Dict[str, Any], path: str) -> Optional[str]:
    """Two panels: error/d vs k per condition (mean over seeds, Bayes dashed) and mean excess over Bayes vs P-NE
    (one point per run). None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows, k = result["runs"], result["k"]
    names = list(dict.fromkeys(r["condition"] for r in rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, n in enumerate(names):
        rs = [r for r in rows if r["condition"] == n]
        c = colors[i % len(colors)]
        ax1.plot(k, np.mean([r["errors_vs_k"] for r in rs], axis=0), marker="o", ms=3, color=c, label=n)
        xs = [r["pne"] for r in rs]
        ax2.scatter(xs, [r["mean_excess_over_bayes"] for r in rs], color=c, label=n, s=25)
    if rows and rows[0].get("bayes_vs_k"):
        ax1.plot(k, rows[0]["bayes_vs_k"], "k--", lw=1, label="Bayes")
    ax1.set_xlabel("in-context examples k")
    ax1.set_ylabel("error / d (noiseless target), mean over seeds")
    ax1.set_yscale("log")
    ax1.legend(fontsize=7)
    ax2.set_xscale("log")
    ax2.set_xlabel("integrated P-NE  Σ η² κ Tr(AΣA)  [θ²]")
    ax2.set_ylabel("mean excess error over Bayes / d")
    sp = [s for s in result["analysis"]["spearman_vs_pne"] if s["metric"] == "mean_excess_over_bayes"]
    if sp:
        s = sp[0]
        ax2.set_title(f"Spearman ρ = {s['rho']:+.2f} [{s['ci_low']:+.2f}, {s['ci_high']:+.2f}]", fontsize=9)
    ax2.legend(fontsize=7)
    import textwrap

    title = result["name"] + (": " + result["description"] if result.get("description") else "")
    fig.suptitle(textwrap.fill(title, 150), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
