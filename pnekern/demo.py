"""``pnekern demo``: the README's main job.

Trains a small regression MLP with ``pnekern.AdamW`` (fused backend) next to ``torch.optim.AdamW`` on the same
data and prints a per-step table showing both follow the same trajectory. Later stages of the project extend
this into the noise/curvature/ICL demo.
"""
from __future__ import annotations

import json
import os
import time

import torch
from torch import nn

import pnekern


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))


def run_demo(out_dir: str = "demo_out", steps: int | None = None, seed: int = 0) -> dict:
    """Train for ``steps`` (default 600) steps; write ``out_dir/report.json``; return the report."""
    steps = 600 if steps is None else steps
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(16, 1, generator=g)
    ours_model, ref_model = _model(seed), _model(seed)
    ours = pnekern.AdamW(ours_model.parameters(), lr=3e-3, weight_decay=1e-2)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=3e-3, weight_decay=1e-2, foreach=False)
    backend = "cpp" if "cpp" in pnekern.build_info()["backends"] else "reference"
    print(f"pnekern {pnekern.__version__} demo: AdamW backend={backend}, torch {torch.__version__}")
    print(f"{'step':>6} {'loss (pnekern)':>15} {'loss (torch)':>13} {'max |Δθ|':>10} {'ms/step':>8}")
    history = []
    t_start = time.perf_counter()
    for step in range(1, steps + 1):
        x = torch.randn(256, 16, generator=g)
        y = torch.sin(x @ w_true) + 0.1 * torch.randn(256, 1, generator=g)
        t0 = time.perf_counter()
        losses = []
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        ms = (time.perf_counter() - t0) * 1e3
        if step % max(1, steps // 20) == 0 or step == 1:
            diff = max((a - b).abs().max().item() for a, b in zip(ours_model.parameters(), ref_model.parameters()))
            row = {"step": step, "loss": losses[0].item(), "loss_torch": losses[1].item(), "max_param_diff": diff, "ms": ms}
            history.append(row)
            print(f"{step:>6} {row['loss']:>15.5f} {row['loss_torch']:>13.5f} {diff:>10.2e} {ms:>8.2f}")
    report = {
        "backend": backend,
        "steps": steps,
        "seconds": time.perf_counter() - t_start,
        "history": history,
        "build_info": pnekern.build_info(),
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    print(f"wrote {os.path.join(out_dir, 'report.json')} ({report['seconds']:.1f} s)")
    return report
