"""Noise alignment on in-context linear regression with an anisotropic prior Σβ (draft 3, Theorem 1 / Corollary 1).

Question: does NAP noise aligned with Σβ move a trained in-context regressor's predictions toward the Bayes
posterior mean for that Σβ, and does the excess error grow monotonically with the misalignment
‖Σβ − P⁻¹ΛP⁻¹‖_F?

Setup (every choice fixed before looking at results; see ``configs/nap_alignment.json``):

* task: y = xᵀβ + ε, x ~ N(0, I_d), β ~ N(0, Σβ), Σβ = Q diag(λ) Qᵀ with a seeded random rotation Q (so Σβ is not
  diagonal in parameter coordinates), ε ~ N(0, σ²); ``k`` context examples and one query;
* model: one-layer linear self-attention (von Oswald et al. 2023) — the draft's "deep linear attention" surrogate
  at depth 1; its score matrix W_KQ [d+1, d+1] is the block that aggregates the prompt;
* optimizer: :class:`pnekern.optim.NAP` with ``preconditioner="identity"`` (P = I, so P⁻¹ΛP⁻¹ = Λ exactly and the
  misalignment norm is computed without approximation) and ``target="features"`` on W_KQ: the noise covariance is
  2ηT · I ⊗ S with S = U diag(σ) Uᵀ + λI over W_KQ's query-side input (x_q, 0); W_PV gets λI only;
* conditions (same temperature T, same trace of S): ``none`` (no noise), ``isotropic`` (S = tr(Σβ)/d on the x
  block), ``aligned`` (U = eigenvectors of Σβ, σ = its eigenvalues), ``rot<φ>`` (aligned basis rotated by φ in the
  plane of the top and bottom eigenvectors: φ = 90° swaps them);
* metrics on fresh prompts (common random numbers): excess error over the Bayes posterior mean for Σβ (squared
  error / d vs the noiseless target minus Bayes's), the prediction distance E(f − f_Bayes)²/d, and the distance to
  the *isotropic* ridge predictor E(f − f_ridge)²/d (to see whether predictions move *toward Σβ's* Bayes rather than
  just toward any ridge), Spearman ρ of excess error vs ‖Σβ − S_x‖_F over all runs (bootstrap CI).

Run: ``python -m pnekern.icl.nap_alignment configs/nap_alignment.json --out runs/nap`` (writes nap.json, nap.png).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Dict, List

import numpy as np
import torch

from .baselines import BayesPosteriorMean, Ridge
from .models import LinearSelfAttention
from .stats import spearman_with_ci
from .tasks import LinearRegressionTask, make_generator
from .train import compute_loss

DEFAULTS: Dict[str, Any] = {
    "d": 4, "k": 8, "noise_var": 0.25, "eigenvalues": [3.2, 0.5, 0.2, 0.1], "prior_seed": 7,
    "steps": 3000, "batch_size": 128, "lr": 0.01, "preconditioner": "adam", "lam": 0.0, "temperature": 1e-3,
    "conditions": ["none", "isotropic", "aligned", "rot30", "rot60", "rot90"],
    "seeds": [0, 1, 2], "eval_samples": 8192, "eval_seed": 12345, "n_boot": 2000,
}


def _rotation(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def prior(cfg: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """Σβ = Q diag(λ) Qᵀ (float64), its eigenvectors Q (columns in the order of ``eigenvalues``) and λ."""
    lam = torch.tensor(cfg["eigenvalues"], dtype=torch.float64)
    if lam.numel() != cfg["d"]:
        raise ValueError(f"eigenvalues must have d={cfg['d']} entries")
    q = _rotation(cfg["d"], cfg["prior_seed"])
    return {"cov": (q * lam) @ q.T, "Q": q, "lam": lam}


def target_for(condition: str, pr: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor] | None:
    """(basis U [d, r], eigenvalues σ [r]) of the x-block target S_x for a condition; None for ``none``."""
    q, lam = pr["Q"], pr["lam"]
    d = lam.numel()
    if condition == "none":
        return None
    if condition == "isotropic":
        return {"U": torch.eye(d, dtype=torch.float64), "sigma": torch.full((d,), float(lam.mean()), dtype=torch.float64)}
    if condition == "aligned":
        return {"U": q.clone(), "sigma": lam.clone()}
    if condition.startswith("rot"):
        phi = math.radians(float(condition[3:]))
        top, bot = int(torch.argmax(lam)), int(torch.argmin(lam))
        u = q.clone()
        c, s = math.cos(phi), math.sin(phi)
        u[:, top] = c * q[:, top] + s * q[:, bot]
        u[:, bot] = -s * q[:, top] + c * q[:, bot]
        return {"U": u, "sigma": lam.clone()}
    raise ValueError(f"unknown condition {condition!r}: none, isotropic, aligned or rot<degrees>")


def misalignment(condition: str, pr: Dict[str, torch.Tensor]) -> float:
    """‖Σβ − P⁻¹ΛP⁻¹‖_F on the x block with P = I: ‖Σβ − S_x‖_F (S_x = 0 for no noise)."""
    t = target_for(condition, pr)
    s = torch.zeros_like(pr["cov"]) if t is None else (t["U"] * t["sigma"]) @ t["U"].T
    return float(torch.linalg.matrix_norm(pr["cov"] - s))


def train_one(cfg: Dict[str, Any], condition: str, seed: int, pr: Dict[str, torch.Tensor]) -> LinearSelfAttention:
    from ..optim.nap import NAP

    d = cfg["d"]
    task = LinearRegressionTask(d, cfg["k"] + 1, noise_var=cfg["noise_var"], beta_cov=pr["cov"].float())
    model = LinearSelfAttention(d, generator=torch.Generator().manual_seed(seed))
    t = target_for(condition, pr)
    opt = NAP([{"params": [model.W_KQ], "target": "features"}, {"params": [model.W_PV], "target": None}],
              lr=cfg["lr"], preconditioner=cfg["preconditioner"], noise="none" if t is None else "aligned",
              lam=cfg["lam"], temperature=cfg["temperature"], seed=seed, rank=d, capture_gradients=False)
    if t is not None:
        # query-side input of W_KQ is (x_q, 0): embed the d×d target in the first d of d+1 coordinates
        u = torch.zeros(d + 1, d, dtype=torch.float64)
        u[:d] = t["U"]
        opt.set_target(model.W_KQ, u, t["sigma"])
    gen = make_generator(1000 + seed)
    for _ in range(cfg["steps"]):
        batch = task.sample(cfg["batch_size"], gen)
        opt.zero_grad()
        compute_loss(model, batch).backward()
        opt.step()
    return model


@torch.no_grad()
def evaluate(model: LinearSelfAttention, cfg: Dict[str, Any], pr: Dict[str, torch.Tensor]) -> Dict[str, float]:
    d, k = cfg["d"], cfg["k"]
    task = LinearRegressionTask(d, k + 1, noise_var=cfg["noise_var"], beta_cov=pr["cov"].float())
    b = task.sample(cfg["eval_samples"], make_generator(cfg["eval_seed"]))
    xs, ys, xq, yq = b.xs[:, :-1], b.ys[:, :-1], b.xs[:, -1], b.ys_clean[:, -1]
    f = model(xs, ys, xq).double()
    bayes = BayesPosteriorMean(pr["cov"].float(), cfg["noise_var"])(xs, ys, xq).double()
    ridge = Ridge(cfg["noise_var"] / float(pr["lam"].mean()))(xs, ys, xq).double()
    yq = yq.double()
    return {"error": float(((f - yq) ** 2).mean() / d), "bayes_error": float(((bayes - yq) ** 2).mean() / d),
            "ridge_error": float(((ridge - yq) ** 2).mean() / d),
            "excess_over_bayes": float(((f - yq) ** 2).mean() / d - ((bayes - yq) ** 2).mean() / d),
            "dist_to_bayes": float(((f - bayes) ** 2).mean() / d), "dist_to_iso_ridge": float(((f - ridge) ** 2).mean() / d)}


def run(cfg: Dict[str, Any], out_dir: str | None = None, log: Any = print) -> Dict[str, Any]:
    cfg = {**DEFAULTS, **cfg}
    pr = prior(cfg)
    rows: List[Dict[str, Any]] = []
    t0 = time.perf_counter()
    for cond in cfg["conditions"]:
        for seed in cfg["seeds"]:
            model = train_one(cfg, cond, seed, pr)
            row = {"condition": cond, "seed": seed, "misalignment_F": misalignment(cond, pr),
                   **evaluate(model, cfg, pr)}
            rows.append(row)
            log(f"[nap] {cond:>9} seed {seed}: excess {row['excess_over_bayes']:+.5f}, dist→Bayes "
                f"{row['dist_to_bayes']:.5f}, dist→iso-ridge {row['dist_to_iso_ridge']:.5f} "
                f"({time.perf_counter() - t0:.0f} s)")
    summary = []
    for cond in cfg["conditions"]:
        rs = [r for r in rows if r["condition"] == cond]
        e = {"condition": cond, "misalignment_F": rs[0]["misalignment_F"]}
        for key in ("excess_over_bayes", "dist_to_bayes", "dist_to_iso_ridge"):
            v = np.array([r[key] for r in rs])
            e[key] = float(v.mean())
            e[key + "_se"] = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None
        summary.append(e)
    noisy = [r for r in rows if r["condition"] != "none"]
    sp = spearman_with_ci([r["misalignment_F"] for r in noisy], [r["excess_over_bayes"] for r in noisy],
                          n_boot=cfg["n_boot"], seed=0) if len(noisy) >= 3 else None
    out = {"config": cfg, "sigma_beta": pr["cov"].tolist(), "runs": rows, "summary": summary,
           "spearman_excess_vs_misalignment": dataclasses.asdict(sp) if sp else None,
           "elapsed_s": time.perf_counter() - t0}
    if out_dir:
        from .runs import write_json

        os.makedirs(out_dir, exist_ok=True)
        write_json(os.path.join(out_dir, "nap.json"), out)
        _plot(out, os.path.join(out_dir, "nap.png"))
    return out


def _plot(out: Dict[str, Any], path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((axes[0], "excess_over_bayes", "excess error over Bayes(Σβ) / d"),
                           (axes[1], "dist_to_bayes", "E(f − f_Bayes)² / d")):
        for i, s in enumerate(out["summary"]):
            ax.errorbar([s["misalignment_F"]], [s[key]], yerr=[s[key + "_se"] or 0], fmt="o", capsize=3,
                        color=f"C{i}", label=s["condition"])
        ax.set_xlabel("misalignment ‖Σβ − P⁻¹ΛP⁻¹‖_F")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    sp = out.get("spearman_excess_vs_misalignment")
    if sp:
        axes[0].set_title(f"Spearman ρ = {sp['rho']:+.2f} [{sp['ci_low']:+.2f}, {sp['ci_high']:+.2f}] (noisy runs)",
                          fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pnekern.icl.nap_alignment", description=__doc__.split("\n")[0])
    p.add_argument("config", help="JSON with keys of DEFAULTS (missing keys take the defaults)")
    p.add_argument("--out", default="nap_out")
    args = p.parse_args(argv)
    with open(args.config) as f:
        cfg = json.load(f)
    unknown = sorted(set(cfg) - set(DEFAULTS) - {"comment", "command"})
    if unknown:
        print(f"unknown config key(s) {unknown}; known: {sorted(DEFAULTS)}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    out = run({k: v for k, v in cfg.items() if k in DEFAULTS}, args.out)
    print(f"{'condition':>10} {'‖Σβ−Λ‖_F':>9} {'excess/Bayes':>16} {'dist→Bayes':>16} {'dist→iso ridge':>16}")
    for s in out["summary"]:
        print(f"{s['condition']:>10} {s['misalignment_F']:>9.3f} {s['excess_over_bayes']:>+9.5f}±{s['excess_over_bayes_se'] or 0:<6.5f}"
              f" {s['dist_to_bayes']:>9.5f}±{s['dist_to_bayes_se'] or 0:<6.5f} {s['dist_to_iso_ridge']:>9.5f}±{s['dist_to_iso_ridge_se'] or 0:<6.5f}")
    sp = out["spearman_excess_vs_misalignment"]
    if sp:
        print(f"Spearman ρ(excess, misalignment) = {sp['rho']:+.3f} [{sp['ci_low']:+.3f}, {sp['ci_high']:+.3f}], "
              f"p = {sp['p_value']:.3g}, n = {sp['n']}")
    print(f"wrote {os.path.join(args.out, 'nap.json')}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
