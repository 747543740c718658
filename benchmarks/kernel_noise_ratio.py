"""Kernel-only cost of the fused CPU step's in-step noise: ``ops.adamw_step_("cpp")`` without and with noise.

No Python optimizer around the op, so the ratio is the kernel's own (issue 5's ≤ 1.15 target is about this
ratio). One fp32 tensor of N elements at step 5; ``--mode``: ``into_v`` / ``outside_v`` (gradient space) or
``param``; ``--var``: ``diag`` (per-element δ, one extra fp32 read) or ``iso`` (one δ); ``--rank k`` adds a
low-rank part U [N, k], c [k]. Rounds interleave off/on; the medians are printed. Usage:

    python benchmarks/kernel_noise_ratio.py --numel 32e6 --threads 1 --mode into_v --var diag --repeat 11
"""
from __future__ import annotations

import torch

from _kernel_ratio import adamw_state, interleaved_medians, parser, setup, timed_step  # run as a script
from pnekern.reference.adamw import NOISE_MODES


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--mode", choices=("into_v", "outside_v", "param"), default="into_v")
    ap.add_argument("--var", choices=("diag", "iso"), default="diag")
    ap.add_argument("--rank", type=int, default=0, help="columns of the low-rank part (0: none)")
    a = ap.parse_args()
    n = setup(a, "benchmarks/kernel_noise_ratio.py")
    state = adamw_state(n)
    gen = state[-1]
    var = torch.rand(n, generator=gen) * 1e-2 if a.var == "diag" else torch.tensor([1e-2])
    noise = dict(noise_mode=NOISE_MODES[a.mode], noise_seed=7, noise_counter=5, noise_param_coef=1e-3,
                 noise_tensor_idx=[0], noise_var=[var])
    if a.rank:
        noise.update(noise_basis=[torch.randn(n, a.rank, generator=gen) * 1e-2],
                     noise_coef=[torch.randn(a.rank, generator=gen)])
    t_off, t_on = interleaved_medians(lambda on: timed_step(state, **(noise if on else {})), a.repeat)
    print(f"numel={n} threads={a.threads} mode={a.mode} var={a.var} rank={a.rank}: off {t_off * 1e3:.2f} ms, "
          f"noise {t_on * 1e3:.2f} ms, ratio {t_on / t_off:.3f}")


if __name__ == "__main__":
    main()
