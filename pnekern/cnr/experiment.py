"""CNR validation experiment (SPEC §7): predicted vs realized δf for counterfactual noise changes, with common random
numbers, on a small MLP and on the ICL transformer; a scale sweep that shows where the linearization breaks; the
cost (seconds and bytes) per step.

For each setup a run of T steps is recorded (parameter-space noise ξ_t ~ N(0, std² I), checkpoints every c steps).
Counterfactuals: n fixed perturbation directions z_j [T, d] (seeded normals, each scaled to per-element std
``noise_std``), applied at scale s: δξ = s · z_j. Predicted δf = Σ_t a_{t+1} · δξ_t (one adjoint sweep for all);
realized δf = f(re-run with the same batches and noise seeds, ξ_t + δξ_t) − f(re-run without). Per scale: Spearman ρ
over the n counterfactuals, median and max relative error |pred − real| / |real|.

Run: ``python -m pnekern.cnr.experiment --out runs/cnr`` (``--quick`` for a seconds-long version).
"""
from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any, Callable, Dict, List

import numpy as np
import torch
from torch import nn

from .recorder import GaussianNoise, Recorder
from .replay import CNR

SCALES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def _rank_corr(a: List[float], b: List[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def _optimizer(name: str, params: Any) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    raise ValueError(f"optimizer {name!r}: adamw or sgd_momentum")


_OPT_TEXT = {"adamw": "AdamW lr 3e-3 wd 0.01 (CNR freezes A_t: v's dependence on δξ is dropped)",
             "sgd_momentum": "SGD lr 0.05 momentum 0.9 (linearization first-order exact)"}


def mlp_setup(steps: int, seed: int = 0, opt_name: str = "adamw") -> Dict[str, Any]:
    """3→32→1 tanh MLP regressing sin(2x₀) + x₁x₂ (float64), batch 16, ξ std 1e-3."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(256, 3, generator=g, dtype=torch.float64)
    y = torch.sin(2 * X[:, 0]) + X[:, 1] * X[:, 2]
    Xv = torch.randn(64, 3, generator=g, dtype=torch.float64)
    yv = torch.sin(2 * Xv[:, 0]) + Xv[:, 1] * Xv[:, 2]
    torch.manual_seed(seed + 1)
    model = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 1)).double()
    opt = _optimizer(opt_name, model.parameters())

    def loss_fn(m: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        return ((m(X[idx]).squeeze(-1) - y[idx]) ** 2).mean()

    batches = [torch.randint(0, 256, (16,), generator=g) for _ in range(steps)]
    return {"name": f"mlp/{opt_name}", "model": model, "opt": opt, "loss_fn": loss_fn, "batches": batches,
            "metric": lambda m: ((m(Xv).squeeze(-1) - yv) ** 2).mean(), "noise_std": 1e-3,
            "description": f"MLP 3-32-1 tanh, {_OPT_TEXT[opt_name]}, batch 16, float64"}


def icl_setup(steps: int, seed: int = 0, opt_name: str = "adamw") -> Dict[str, Any]:
    """The ICL transformer (RegressionTransformer d=2, k≤4, 1 layer, width 8, float64) on in-context linear regression,
    16 sequences a step (batches regenerated from their seed, so nothing is stored); f = val loss."""
    from ..icl.models import RegressionTransformer
    from ..icl.tasks import LinearRegressionTask, make_generator
    from ..icl.train import compute_loss

    task = LinearRegressionTask(2, 4, noise_var=0.1)
    torch.manual_seed(seed)
    model = RegressionTransformer(2, 4, n_layer=1, n_head=1, d_model=8, token_format="pair").double()
    opt = _optimizer(opt_name, model.parameters())

    def batch_of(s: int) -> Any:
        b = task.sample(16, make_generator(s))
        b.xs, b.ys = b.xs.double(), b.ys.double()
        return b

    def loss_fn(m: nn.Module, s: int) -> torch.Tensor:
        return compute_loss(m, batch_of(s))

    val = task.sample(256, make_generator(10_000 + seed))
    val.xs, val.ys = val.xs.double(), val.ys.double()
    return {"name": f"icl/{opt_name}", "model": model, "opt": opt, "loss_fn": loss_fn,
            "batches": [100 * seed + t for t in range(steps)], "metric": lambda m: compute_loss(m, val),
            "noise_std": 1e-3,
            "description": f"RegressionTransformer d=2 k<=4, 1 layer, 1 head, width 8 (pair tokens), {_OPT_TEXT[opt_name]}, "
                           "16 sequences/step, float64; f = MSE on 256 held-out sequences"}


def run_setup(setup: Dict[str, Any], n_cf: int, scales: tuple, checkpoint_every: int, log: Callable = print
              ) -> Dict[str, Any]:
    model, opt = setup["model"], setup["opt"]
    rec = Recorder(model, opt, setup["loss_fn"], noise=GaussianNoise(setup["noise_std"]),
                   checkpoint_every=checkpoint_every, seed=1)
    t0 = time.perf_counter()
    for b in setup["batches"]:
        rec.step(b)
    t_train = time.perf_counter() - t0
    T, d = rec.num_steps, rec.dim
    cnr = CNR(rec, setup["metric"])
    f0, _ = cnr.rerun()
    t1 = time.perf_counter()
    adj = cnr.adjoint()
    t_adj = time.perf_counter() - t1
    g = torch.Generator().manual_seed(123)
    dirs = [setup["noise_std"] * torch.randn(T, d, generator=g, dtype=torch.float64) for _ in range(n_cf)]
    per_scale = []
    t_rerun = 0.0
    for s in scales:
        pred, real = [], []
        for z in dirs:
            pred.append(adj.delta_f_noise(s * z))
            t2 = time.perf_counter()
            real.append(cnr.rerun(delta_xi=s * z)[0] - f0)
            t_rerun += time.perf_counter() - t2
        rel = [abs(p - r) / abs(r) if r != 0 else math.inf for p, r in zip(pred, real)]
        entry = {"scale": s, "predicted": pred, "realized": real, "spearman": _rank_corr(pred, real),
                 "median_rel_error": float(np.median(rel)), "max_rel_error": float(np.max(rel)),
                 "sign_agreement": float(np.mean([np.sign(p) == np.sign(r) for p, r in zip(pred, real)]))}
        per_scale.append(entry)
        log(f"[cnr] {setup['name']:>18} s={s:<5} ρ={entry['spearman']:+.3f} median rel err "
            f"{entry['median_rel_error']:.3g} max {entry['max_rel_error']:.3g} signs {entry['sign_agreement']:.2f}")
    n_reruns = len(scales) * n_cf
    return {
        "setup": setup["name"], "description": setup["description"], "steps": T, "params": d,
        "noise_std": setup["noise_std"], "f0": f0, "counterfactuals": n_cf,
        "counterfactual": "δξ = s·z_j, z_j ~ N(0, noise_std² I) per step and element (seeded), common random numbers",
        "per_scale": per_scale,
        "cost": {"train_s_per_step": t_train / T, "adjoint_s_per_step": t_adj / T, "adjoint_hvps": adj.num_hvps,
                 "rerun_s_per_step": t_rerun / (n_reruns * T),
                 "recorder_bytes": rec.nbytes(), "recorder_bytes_per_step": rec.nbytes() / T,
                 "adjoints_bytes": adj.adjoints.numel() * adj.adjoints.element_size(),
                 "checkpoint_every": checkpoint_every,
                 "segment_bytes_estimate": 6 * d * 8 * checkpoint_every,
                 "note": "adjoint cost = recompute + 1 HVP per step; predicted δf for any number of counterfactuals "
                         "is one dot product each after the sweep; the stored adjoints are T·d float64"},
    }


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pnekern.cnr.experiment", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="cnr_out")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--counterfactuals", type=int, default=8)
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="12 steps, 8 counterfactuals, scales ¼..2")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    steps = 12 if args.quick else args.steps
    scales = SCALES[:4] if args.quick else SCALES
    results = [run_setup(make(steps, opt_name=o), args.counterfactuals, scales, args.checkpoint_every)
               for make in (mlp_setup, icl_setup) for o in ("sgd_momentum", "adamw")]
    os.makedirs(args.out, exist_ok=True)
    from ..icl.runs import write_json

    write_json(os.path.join(args.out, "cnr.json"), {"results": results, "command": "python -m pnekern.cnr.experiment "
                                                    + " ".join(argv if argv is not None else [])})
    _plot(results, os.path.join(args.out, "cnr.png"))
    print(f"{'setup':>18} {'scale':>5} {'Spearman':>9} {'median rel err':>15} {'max rel err':>12}")
    for r in results:
        for e in r["per_scale"]:
            print(f"{r['setup']:>18} {e['scale']:>5} {e['spearman']:>+9.3f} {e['median_rel_error']:>15.3g} "
                  f"{e['max_rel_error']:>12.3g}")
        c = r["cost"]
        print(f"{r['setup']:>18}: d={r['params']}, T={r['steps']}: train {1e3 * c['train_s_per_step']:.2f} ms/step, "
              f"adjoint {1e3 * c['adjoint_s_per_step']:.2f} ms/step, re-run {1e3 * c['rerun_s_per_step']:.2f} ms/step; "
              f"recorder {c['recorder_bytes_per_step']:.0f} B/step, adjoints {c['adjoints_bytes']} B")
    print(f"wrote {os.path.join(args.out, 'cnr.json')}")
    return 0


def _plot(results: List[Dict[str, Any]], path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 4))
    for ax, r in zip(np.atleast_1d(axes), results):
        for i, e in enumerate(r["per_scale"]):
            ax.scatter(e["realized"], e["predicted"], s=14, color=f"C{i}",
                       label=f"s={e['scale']}: ρ={e['spearman']:+.2f}, med rel {e['median_rel_error']:.2g}")
        lim = max(max(abs(v) for e in r["per_scale"] for v in e["realized"] + e["predicted"]), 1e-12)
        ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.8)
        ax.set_xscale("symlog", linthresh=lim / 1e3)
        ax.set_yscale("symlog", linthresh=lim / 1e3)
        ax.set_xlabel("realized δf (re-run, common random numbers)")
        ax.set_ylabel("predicted δf (adjoint)")
        ax.set_title(f"{r['setup']} (d={r['params']}, T={r['steps']})", fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
