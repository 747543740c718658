"""Host-side cost of the statistics per step: ``NoiseStats.finish_step`` (thread time, median and mean over the
timed steps; the mean includes the exposure log's packing every 256 records) and ``StepStats.to_dict()``, for one
layout on the C++ backend. For before/after comparisons run it alternately from two builds (PYTHONPATH).

    python benchmarks/stats_host_overhead.py --layout mixed100 --size 1e6 --steps 300 --mode trace
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from pnekern import bench


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", default="mixed100", choices=("flat", "mixed100", "transformer"))
    ap.add_argument("--size", type=float, default=1e6, help="total parameters")
    ap.add_argument("--steps", type=int, default=300, help="steps; the first 20 are not timed")
    ap.add_argument("--mode", default="trace", choices=("trace", "diag", "lowrank"))
    a = ap.parse_args()
    if a.steps <= 20 or a.size < 1:
        ap.error("--steps must be > 20 and --size >= 1")
    torch.set_num_threads(1)
    src = bench.make_layout(int(a.size), a.layout)
    contribs = bench.shared_grads(src, 4, 11)
    params = bench._leaves(src, 1000)
    opt = bench._make_pnekern_opt("cpp", a.mode, params, 1e-3)
    eng = opt.noise_stats
    finish = eng.finish_step
    times: list[float] = []

    def timed_finish(*args, **kwargs):  # type: ignore[no-untyped-def]
        t0 = time.thread_time()
        out = finish(*args, **kwargs)
        times.append(time.thread_time() - t0)
        return out

    eng.finish_step = timed_finish  # instance attribute: the optimizer calls it through the engine
    for _ in range(a.steps):
        for grads in contribs:
            torch.autograd.backward(params, grad_tensors=grads)
        opt.step()
        opt.zero_grad(set_to_none=True)
    td = []
    s = opt.last_stats()
    for _ in range(50):
        t0 = time.perf_counter()
        s.to_dict()
        td.append(time.perf_counter() - t0)
    t = times[20:]
    print(f"{a.layout}, {len(src)} tensors, {int(a.size)} params, {a.mode}: finish_step median "
          f"{statistics.median(t) * 1e6:.0f} us, mean {statistics.mean(t) * 1e6:.0f} us; "
          f"to_dict() median {statistics.median(td) * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
