"""pytest-benchmark suite for the cost of the noise statistics (not part of the default test run).

    pytest benchmarks/test_bench_stats_overhead.py --benchmark-only --benchmark-group-by=group

* ``stats step``: K=4 micro-batch gradients handed to autograd (``backward`` into the leaves, where the statistics
  hooks capture) + step + zero_grad, torch fused vs pnekern with stats off/trace/diag;
* ``train step``: forward + backward of K=4 micro-batches + step of a small GPT-style regression transformer.

Overhead = mean(mode) / mean(off) − 1 within a group; ``pnekern bench --sections stats train`` prints these ratios
measured interleaved. No assertions on time.
"""
from __future__ import annotations

import pytest
import torch

from _bench_common import DEVICE, LAYOUTS, SIZES, fast_backends, run_pedantic
from pnekern import bench

K = 4
STATS = ["off", "trace", "diag"]
VARIANTS = [("torch", "fused", "off")] + [("pnekern", b, s) for b in fast_backends() for s in STATS]
IDS = ["torch_fused" if i == "torch" else f"pnekern_{b}_{s}" for i, b, s in VARIANTS]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("impl, which, stats", VARIANTS, ids=IDS)
def test_stats_step(benchmark, impl, which, stats, numel, layout):
    benchmark.group = f"stats step {numel} {layout}"
    src = bench.make_layout(numel, layout, device=DEVICE)
    contribs = bench.shared_grads(src, K, seed=11)
    step, _ = bench.stats_callable(impl, which, stats, src, contribs)
    benchmark.extra_info.update(bytes_per_call=int(bench.bytes_per_param("stats", stats, K) * numel), micro_batches=K,
                                threads=torch.get_num_threads())
    run_pedantic(benchmark, step)


@pytest.mark.parametrize("impl, which, stats", VARIANTS, ids=IDS)
def test_train_step(benchmark, impl, which, stats):
    benchmark.group = "train step"
    step, _, model = bench.train_callable(impl, which, stats, bench.TrainModelConfig(), K, device=DEVICE)
    benchmark.extra_info.update(params=sum(p.numel() for p in model.parameters()), micro_batches=K,
                                threads=torch.get_num_threads())
    run_pedantic(benchmark, step, rounds=max(5, bench.BenchConfig().repeat))
