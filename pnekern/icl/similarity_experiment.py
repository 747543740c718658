"""``pnekern icl similarity CONFIG``: ZS / ICL / FT and layer-causal FT on a trained symbolic-task model, with
SimAOU / SimAM / SimAMΔ per layer and two controls (a random K/V update of the FT norm, and the same measurement
on an untrained model of the same shape).

Config (JSON; every section optional except ``task``)::

    {"task": {"name": "induction", "vocab_size": 16, "prefix_len": 8},
     "model": {"n_layer": 2, "n_head": 2, "d_model": 32},
     "train": {"steps": 400, "batch_size": 32, "lr": 3e-3, "seed": 0},
     "similarity": {"prompts": 16, "query_len": 3, "ft_steps": 1, "ft_lr": 0.01, "ft_targets": "lm", "seed": 0}}

Each prompt is one task sequence split into demonstrations (all but the last ``query_len`` tokens) and the query
(the last ``query_len`` tokens). FT fine-tunes a copy's K/V rows on the demonstrations with next-token targets
(``ft_targets="lm"``: every position predicts the next demonstration token, the standard FT-on-demonstrations
setting; ``"task"``: only the task's scored positions inside the demonstrations). Metric definitions and choices:
:mod:`pnekern.icl.similarity`, :mod:`pnekern.icl.layer_causal`.

Outputs: a table on stdout, ``OUT/similarity.json`` (per model × method × layer: mean and the standard error over
prompts of each metric, NaN counts, training losses), and ``OUT/similarity.png`` (one panel per metric, metric vs
layer, trained solid and untrained dashed).
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from typing import Any, Dict, Optional

import torch

from .layer_causal import SIMILARITY_METHODS, icl_ft_similarity
from .models import SequenceTransformer
from .tasks import IGNORE_INDEX, make_generator, make_task
from .train import evaluate_loss, train

__all__ = ["SIMILARITY_DEFAULTS", "load_similarity_config", "run_similarity", "format_similarity",
           "plot_similarity"]

SIMILARITY_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "model": {"n_layer": 2, "n_head": 2, "d_model": 32},
    "train": {"steps": 400, "batch_size": 32, "lr": 3e-3, "seed": 0},
    "similarity": {"prompts": 16, "query_len": 3, "ft_steps": 1, "ft_lr": 0.01, "ft_targets": "lm", "seed": 0,
                   "methods": list(SIMILARITY_METHODS)},
}
METRIC_NAMES = ("sim_aou", "sim_am", "sim_am_delta")


def load_similarity_config(data: Any) -> Dict[str, Any]:
    """Merge a config (dict or path) with the defaults; raise ValueError naming an unknown section or key."""
    if isinstance(data, str):
        try:
            with open(data) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{data}: {e}") from None
    if not isinstance(data, dict) or "task" not in data or not isinstance(data["task"], dict):
        raise ValueError("similarity config must be a JSON object with a 'task' object (e.g. {\"name\": \"induction\"})")
    unknown = sorted(set(data) - {"task", "comment", "command"} - set(SIMILARITY_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown config section(s) {unknown}; known: task, {', '.join(SIMILARITY_DEFAULTS)}")
    cfg: Dict[str, Any] = {"task": dict(data["task"])}
    for section, defaults in SIMILARITY_DEFAULTS.items():
        given = data.get(section, {})
        if not isinstance(given, dict):
            raise ValueError(f"{section} must be an object")
        bad = sorted(set(given) - set(defaults))
        if bad:
            raise ValueError(f"{section}: unknown key(s) {bad}; known: {sorted(defaults)}")
        cfg[section] = {**defaults, **given}
    s = cfg["similarity"]
    for key in ("prompts", "query_len"):
        if isinstance(s[key], bool) or not isinstance(s[key], int) or s[key] < 1:
            raise ValueError(f"similarity.{key} must be an integer >= 1, got {s[key]!r}")
    if s["ft_targets"] not in ("lm", "task"):
        raise ValueError(f"similarity.ft_targets must be 'lm' or 'task', got {s['ft_targets']!r}")
    bad_methods = [m for m in s["methods"] if m not in SIMILARITY_METHODS]
    if bad_methods or not s["methods"]:
        raise ValueError(f"similarity.methods {s['methods']!r}: choose from {SIMILARITY_METHODS}")
    task = make_task(**cfg["task"])  # raises naming a bad task field
    if not hasattr(task, "total_vocab"):
        raise ValueError(f"task {cfg['task'].get('name')!r} is not a token task; similarity needs a symbolic task "
                         "(induction, copy, reverse)")
    if s["query_len"] >= task.sequence_length:
        raise ValueError(f"similarity.query_len ({s['query_len']}) must be < the task's sequence length "
                         f"({task.sequence_length}): the demonstrations would be empty")
    return cfg


def _build_model(cfg: Dict[str, Any], task: Any, seed: int) -> SequenceTransformer:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = cfg["model"]
        return SequenceTransformer(task.total_vocab, task.sequence_length, n_layer=m["n_layer"], n_head=m["n_head"],
                                   d_model=m["d_model"])


def _prompts(task: Any, cfg: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    s = cfg["similarity"]
    batch = task.sample(s["prompts"], make_generator(s["seed"] + 1000))
    tq = s["query_len"]
    tokens, targets = batch.tokens, batch.targets
    demo, query = tokens[:, :-tq], tokens[:, -tq:]
    if s["ft_targets"] == "lm":
        demo_targets = demo.roll(-1, 1)
        demo_targets[:, -1] = IGNORE_INDEX  # the last demonstration token's successor is the query: not seen in FT
    else:
        demo_targets = targets[:, :-tq].clone()
        demo_targets[:, -1] = IGNORE_INDEX
    return {"demo": demo, "demo_targets": demo_targets, "query": query, "tokens": tokens, "targets": targets}


def _summarize(res: Any) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for method, per in res.per_prompt.items():
        entry: Dict[str, Any] = {"nan_count": res.nan_count[method]}
        for name in METRIC_NAMES:
            x = per[name]  # [B, L]
            n = (~x.isnan()).sum(0).clamp(min=1).to(torch.float64)
            mean = x.nanmean(0)
            var = ((x - mean).pow(2)).nansum(0) / (n - 1).clamp(min=1)
            entry[name] = mean.tolist()
            entry[name + "_se"] = (var / n).sqrt().tolist()
        out[method] = entry
    return out


def run_similarity(config: Any, out_dir: Optional[str] = None, *, log: Any = print) -> Dict[str, Any]:
    """Train the model (config ``train``), measure SimAOU/SimAM/SimAMΔ per layer for the FT variants on the trained
    and on an untrained model, and write the JSON + plot to ``out_dir`` (when given)."""
    cfg = load_similarity_config(config)
    task = make_task(**cfg["task"])
    tr, s = cfg["train"], cfg["similarity"]
    t0 = time.perf_counter()
    model = _build_model(cfg, task, tr["seed"])
    untrained = copy.deepcopy(model)
    val = task.sample(512, make_generator(tr["seed"] + 1))
    loss_untrained = evaluate_loss(untrained, val)
    result_train = train(model, task, steps=tr["steps"], batch_size=tr["batch_size"], lr=tr["lr"],
                         seed=tr["seed"], log_every=max(1, tr["steps"]), progress=False)
    t_train = time.perf_counter() - t0
    log(f"trained {tr['steps']} steps in {t_train:.1f} s: task loss {loss_untrained:.3f} (untrained) → "
        f"{result_train.final_val_loss:.3f} nats/token")
    p = _prompts(task, cfg)
    results: Dict[str, Any] = {}
    for name, m in (("trained", model), ("untrained", untrained)):
        res = icl_ft_similarity(m, p["demo"], p["demo_targets"], p["query"], steps=s["ft_steps"], lr=s["ft_lr"],
                                methods=s["methods"], seed=s["seed"])
        results[name] = _summarize(res)
    out = {"config": cfg, "n_layer": cfg["model"]["n_layer"], "task_loss": {
        "untrained": loss_untrained, "trained": result_train.final_val_loss, "units": "nats per scored token"},
        "results": results, "elapsed_s": time.perf_counter() - t0,
        "note": "mean and standard error over prompts; NaN cosines (zero updates) are excluded and counted"}
    if out_dir is not None:
        from .runs import write_json

        os.makedirs(out_dir, exist_ok=True)
        out["files"] = {"json": os.path.join(out_dir, "similarity.json")}
        png = plot_similarity(out, os.path.join(out_dir, "similarity.png"))
        if png:
            out["files"]["png"] = png
        write_json(out["files"]["json"], out)
    return out


def format_similarity(out: Dict[str, Any]) -> str:
    """Table: one row per (model, method, layer): SimAOU, SimAM, SimAMΔ as mean ± SE over prompts."""
    head = f"{'model':<10}{'method':<17}{'layer':>5}" + "".join(f"{n:>20}" for n in ("SimAOU", "SimAM", "SimAMΔ"))
    lines = [head]
    for model_name, methods in out["results"].items():
        for method, entry in methods.items():
            for layer in range(out["n_layer"]):
                cells = []
                for n in METRIC_NAMES:
                    v, se = entry[n][layer], entry[n + "_se"][layer]
                    cells.append(f"{'nan':>20}" if v is None or math.isnan(v) else f"{v:>+11.4f} ± {se:<6.4f}")
                lines.append(f"{model_name:<10}{method:<17}{layer:>5}" + "".join(cells))
    return "\n".join(lines)


def plot_similarity(out: Dict[str, Any], path: str) -> Optional[str]:
    """One panel per metric: value vs layer for each method (trained solid, untrained dashed), ±SE bars."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    layers = list(range(out["n_layer"]))
    colors = {"ft": "C0", "layer_causal_ft": "C1", "random": "C2"}
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), sharex=True)
    for ax, n, title in zip(axes, METRIC_NAMES, ("SimAOU", "SimAM", "SimAMΔ")):
        for model_name, ls in (("trained", "-"), ("untrained", "--")):
            for method, entry in out["results"][model_name].items():
                ax.errorbar(layers, entry[n], yerr=entry[n + "_se"], ls=ls, marker="o", ms=4, capsize=2,
                            color=colors.get(method, "k"), label=f"{method} ({model_name})")
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_title(title)
        ax.set_xlabel("layer")
        ax.set_xticks(layers)
    axes[0].set_ylabel("cosine (mean ± SE over prompts)")
    axes[-1].legend(fontsize=7)
    task = out["config"]["task"]
    fig.suptitle(f"ICL vs FT on {task.get('name')} ({out['config']['similarity']['prompts']} prompts)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
