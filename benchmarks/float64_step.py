"""float64 parameters: ``pnekern.AdamW`` (``backend="auto"`` runs them on the reference path: there is no float64
C++ kernel) against torch's AdamW ``fused=True`` and ``foreach=True`` on the same list, rounds interleaved,
medians of the timed steps (wall time, one thread).

    python benchmarks/float64_step.py --tensors 100 --numel 10000 --steps 30
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import pnekern


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tensors", type=int, default=100)
    ap.add_argument("--numel", type=int, default=10_000, help="elements per tensor")
    ap.add_argument("--steps", type=int, default=30, help="steps per variant; the first 5 are not timed")
    a = ap.parse_args()
    if a.tensors < 1 or a.numel < 1 or a.steps <= 5:
        ap.error("--tensors and --numel must be >= 1, --steps > 5")
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    src = [torch.randn(a.numel, generator=gen, dtype=torch.float64) for _ in range(a.tensors)]
    grads = [torch.randn(a.numel, generator=gen, dtype=torch.float64) for _ in range(a.tensors)]

    def params() -> list[torch.nn.Parameter]:
        ps = [torch.nn.Parameter(t.clone()) for t in src]
        for p, g in zip(ps, grads):
            p.grad = g  # shared and read-only
        return ps

    opts = {
        "torch fused=True": torch.optim.AdamW(params(), fused=True),
        "torch foreach=True": torch.optim.AdamW(params(), foreach=True),
        "pnekern auto": pnekern.AdamW(params()),
    }
    times: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(a.steps):
        for k, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            times[k].append(time.perf_counter() - t0)
    print(f"{a.tensors} x {a.numel} float64, 1 thread, median step")
    base = statistics.median(times["torch fused=True"][5:])
    for k, t in times.items():
        m = statistics.median(t[5:])
        print(f"  {k:20s} {m * 1e3:8.3f} ms  x fused {m / base:.2f}")


if __name__ == "__main__":
    main()
