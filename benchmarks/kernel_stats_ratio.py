"""Kernel-only cost of the fused CPU step's statistics: ``ops.adamw_step_("cpp")`` with stats off vs on.

No Python optimizer around the op, so the ratio is the kernel's own. One fp32 tensor of N elements at step 5;
rounds interleave off/on and the medians are printed. Usage:

    python benchmarks/kernel_stats_ratio.py --numel 32e6 --threads 1 --cols 2 --repeat 11
    python benchmarks/kernel_stats_ratio.py --numel 32e6 --threads 1 --cols 3 --sumsq --repeat 11   # diag mode

With ``--sumsq`` the stats step also reads a diag-mode Σx² buffer (4 more bytes per element: 32/28 = 1.14× the
bytes of the plain step).
"""
from __future__ import annotations

import torch

from _kernel_ratio import adamw_state, interleaved_medians, parser, setup, timed_step  # run as a script


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--cols", type=int, choices=(2, 3, 4), default=4,
                    help="stats_out width: 4 (all sums), 3 (diag/lowrank: no a_prev) or 2 (trace: no a_new)")
    ap.add_argument("--sumsq", action="store_true", help="the stats step reads a sumsq buffer (diag mode)")
    a = ap.parse_args()
    n = setup(a, "benchmarks/kernel_stats_ratio.py")
    state = adamw_state(n)
    out = torch.zeros(1, a.cols, dtype=torch.float64)
    q = [torch.rand(n, generator=state[-1])] if a.sumsq else []
    t_off, t_on = interleaved_medians(
        lambda on: timed_step(state, stats_out=out, sumsq_bufs=q) if on else timed_step(state), a.repeat)
    print(f"numel={n} threads={a.threads} cols={a.cols} sumsq={a.sumsq}: off {t_off * 1e3:.2f} ms, "
          f"stats {t_on * 1e3:.2f} ms, ratio {t_on / t_off:.3f}")


if __name__ == "__main__":
    main()
