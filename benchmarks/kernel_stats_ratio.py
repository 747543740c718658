"""Kernel-only cost of the fused CPU step's statistics: ``ops.adamw_step_("cpp")`` with stats off vs on.

No Python optimizer around the op, so the ratio is the kernel's own. One fp32 tensor of N elements at step 5;
rounds interleave off/on and the medians are printed. Usage:

    python benchmarks/kernel_stats_ratio.py --numel 32e6 --threads 1 --cols 2 --repeat 11
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from pnekern import _native, ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=float, default=32e6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cols", type=int, choices=(2, 4), default=4, help="stats_out width: 4 (all sums) or 2 (trace)")
    ap.add_argument("--repeat", type=int, default=11)
    a = ap.parse_args()
    _native.require("benchmarks/kernel_stats_ratio.py")
    torch.set_num_threads(a.threads)
    n = int(a.numel)
    gen = torch.Generator().manual_seed(0)
    p, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    m, v = torch.randn(n, generator=gen) * 1e-3, torch.rand(n, generator=gen) * 1e-4
    step = torch.tensor(5.0)
    out = torch.zeros(1, a.cols, dtype=torch.float64)

    def run(with_stats: bool) -> float:
        step.fill_(4.0)  # the op increments it: every round is step 5
        t0 = time.perf_counter()
        ops.adamw_step_("cpp", [p], [g], [m], [v], [], [step], lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.01,
                        eps=1e-8, amsgrad=False, maximize=False, stats_out=out if with_stats else None)
        return time.perf_counter() - t0

    for _ in range(3):
        run(False), run(True)
    off, on = [], []
    for _ in range(a.repeat):
        off.append(run(False))
        on.append(run(True))
    t_off, t_on = statistics.median(off), statistics.median(on)
    print(f"numel={n} threads={a.threads} cols={a.cols}: off {t_off * 1e3:.2f} ms, stats {t_on * 1e3:.2f} ms, "
          f"ratio {t_on / t_off:.3f}")


if __name__ == "__main__":
    main()
