"""Kernel-only cost of the fused CPU step's in-step noise: ``ops.adamw_step_("cpp")`` without and with noise.

No Python optimizer around the op, so the ratio is the kernel's own (issue 5's ≤ 1.15 target is about this
ratio). One fp32 tensor of N elements at step 5; ``--mode``: ``into_v`` / ``outside_v`` (gradient space) or
``param``; ``--var``: ``diag`` (per-element δ, one extra fp32 read) or ``iso`` (one δ); ``--rank k`` adds a
low-rank part U [N, k], c [k]. Rounds interleave off/on; the medians are printed. Usage:

    python benchmarks/kernel_noise_ratio.py --numel 32e6 --threads 1 --mode into_v --var diag --repeat 11
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from pnekern import _native, ops
from pnekern.reference.adamw import NOISE_MODES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=float, default=32e6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mode", choices=("into_v", "outside_v", "param"), default="into_v")
    ap.add_argument("--var", choices=("diag", "iso"), default="diag")
    ap.add_argument("--rank", type=int, default=0, help="columns of the low-rank part (0: none)")
    ap.add_argument("--repeat", type=int, default=11)
    a = ap.parse_args()
    _native.require("benchmarks/kernel_noise_ratio.py")
    torch.set_num_threads(a.threads)
    n = int(a.numel)
    gen = torch.Generator().manual_seed(0)
    p, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    m, v = torch.randn(n, generator=gen) * 1e-3, torch.rand(n, generator=gen) * 1e-4
    var = torch.rand(n, generator=gen) * 1e-2 if a.var == "diag" else torch.tensor([1e-2])
    step = torch.tensor(5.0)
    noise = dict(noise_mode=NOISE_MODES[a.mode], noise_seed=7, noise_counter=5, noise_param_coef=1e-3,
                 noise_tensor_idx=[0], noise_var=[var])
    if a.rank:
        noise.update(noise_basis=[torch.randn(n, a.rank, generator=gen) * 1e-2],
                     noise_coef=[torch.randn(a.rank, generator=gen)])

    def run(with_noise: bool) -> float:
        step.fill_(4.0)  # the op increments it: every round is step 5
        t0 = time.perf_counter()
        ops.adamw_step_("cpp", [p], [g], [m], [v], [], [step], lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.01,
                        eps=1e-8, amsgrad=False, maximize=False, **(noise if with_noise else {}))
        return time.perf_counter() - t0

    for _ in range(3):
        run(False), run(True)
    off, on = [], []
    for _ in range(a.repeat):
        off.append(run(False))
        on.append(run(True))
    t_off, t_on = statistics.median(off), statistics.median(on)
    print(f"numel={n} threads={a.threads} mode={a.mode} var={a.var} rank={a.rank}: off {t_off * 1e3:.2f} ms, "
          f"noise {t_on * 1e3:.2f} ms, ratio {t_on / t_off:.3f}")


if __name__ == "__main__":
    main()
