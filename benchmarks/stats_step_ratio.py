"""The stats section's two ratios for one layout, quickly: a full call (K=4 micro-batch backward into the leaves +
step + zero_grad) and ``opt.step()`` alone, stats off / trace / diag on the C++ backend, rounds interleaved,
medians of the timed rounds. For before/after comparisons run it alternately from two builds (PYTHONPATH).

    python benchmarks/stats_step_ratio.py --layout transformer --threads 1 --size 32e6 --rounds 9

``pnekern bench --sections stats`` measures the same callables with more rows and statistics; this script exists
because that run takes tens of minutes at 32M.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from pnekern import bench


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", default="flat", choices=("flat", "mixed100", "transformer"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", type=float, default=32e6, help="total parameters")
    ap.add_argument("--rounds", type=int, default=9, help="rounds after 2 untimed ones")
    a = ap.parse_args()
    if a.rounds < 1 or a.threads < 1 or a.size < 1:
        ap.error("--rounds, --threads and --size must be >= 1")
    torch.set_num_threads(a.threads)
    src = bench.make_layout(int(a.size), a.layout)
    contribs = bench.shared_grads(src, 4, 11)
    modes = ("off", "trace", "diag")
    fns, phase = {}, {}
    for i, s in enumerate(modes):
        phase[s] = []
        fns[s], _ = bench.stats_callable("pnekern", "cpp", s, src, contribs, 1e-3, 1000 * (i + 1), phase[s])
    full = {s: [] for s in modes}
    for _ in range(a.rounds + 2):
        for s in modes:
            t0 = time.perf_counter()
            fns[s]()
            full[s].append(time.perf_counter() - t0)
    med = {s: statistics.median(full[s][2:]) for s in modes}
    step = {s: statistics.median(phase[s][2:]) for s in modes}
    print(f"{a.layout}, {a.threads} thread(s), {int(a.size)} params, {a.rounds} rounds")
    for s in modes:
        print(f"  {s:5s}  full {med[s] * 1e3:8.1f} ms  x off {med[s] / med['off']:.3f}   "
              f"step() {step[s] * 1e3:7.1f} ms  x off {step[s] / step['off']:.3f}")


if __name__ == "__main__":
    main()
