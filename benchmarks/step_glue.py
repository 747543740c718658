"""Where ``opt.step()``'s time goes with statistics on: the C++ kernel call vs the host work around it (validation,
bucketing, ``finish_step``), as thread time per step, stats off / trace / diag, for one layout.

    python benchmarks/step_glue.py --layout mixed100 --size 32e6 --steps 30

Each mode runs its own optimizer for ``--steps`` calls (K=4 micro-batch backward into the leaves, step, zero_grad);
the first 5 are not timed; medians are printed. Thread time leaves out the other vCPU's noise but not cache misses:
after a 32M-parameter kernel the host work runs with cold caches (compare ``--size 1e6``).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import pnekern.optim.adamw as adamw_mod
from pnekern import _native, bench, ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", default="mixed100", choices=("flat", "mixed100", "transformer"))
    ap.add_argument("--size", type=float, default=32e6, help="total parameters")
    ap.add_argument("--steps", type=int, default=30, help="steps per mode; the first 5 are not timed")
    ap.add_argument("--modes", default="off,trace,diag")
    a = ap.parse_args()
    if a.steps <= 5 or a.size < 1:
        ap.error("--steps must be > 5 and --size >= 1")
    _native.require("benchmarks/step_glue.py")
    torch.set_num_threads(1)
    src = bench.make_layout(int(a.size), a.layout)
    contribs = bench.shared_grads(src, 4, 11)
    kernel_times: list[float] = []
    real_op = ops.adamw_step_

    def timed_op(*args, **kwargs):  # type: ignore[no-untyped-def]
        t0 = time.thread_time()
        real_op(*args, **kwargs)
        kernel_times.append(time.thread_time() - t0)

    adamw_mod.ops.adamw_step_ = timed_op  # the optimizer calls ops.adamw_step_ through its module
    try:
        print(f"{a.layout}, {len(src)} tensors, {int(a.size)} params, 1 thread, thread time per step (median)")
        base = None
        for mode in a.modes.split(","):
            params = bench._leaves(src, 1000)
            opt = bench._make_pnekern_opt("cpp", mode, params, 1e-3)
            kernel_times.clear()
            step_times = []
            for _ in range(a.steps):
                for grads in contribs:
                    torch.autograd.backward(params, grad_tensors=grads)
                t0 = time.thread_time()
                opt.step()
                step_times.append(time.thread_time() - t0)
                opt.zero_grad()
            if len(kernel_times) != len(step_times):
                raise RuntimeError(f"{mode}: expected one kernel call per step, got {len(kernel_times)}")
            st = statistics.median(step_times[5:])
            kt = statistics.median(kernel_times[5:])
            glue = statistics.median([s - k for s, k in zip(step_times[5:], kernel_times[5:])])
            base = base or (st, kt)
            print(f"  {mode:5s} step() {st * 1e3:7.2f} ms (x off {st / base[0]:.3f})  kernel {kt * 1e3:7.2f} ms "
                  f"(x off {kt / base[1]:.3f})  host {glue * 1e3:6.3f} ms")
    finally:
        adamw_mod.ops.adamw_step_ = real_op


if __name__ == "__main__":
    main()
