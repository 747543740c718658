"""pytest-benchmark suite for the optimizer step (not part of the default test run).

    pytest benchmarks/test_bench_adamw_step.py --benchmark-only --benchmark-group-by=param:numel,param:layout

torch AdamW (for-loop, foreach, fused) vs pnekern.AdamW on every fast backend of the device, plus the copy / triad
bandwidth rooflines at the same size. ``extra_info`` holds the bytes one call moves, so GB/s = bytes / mean time.
Sizes/layouts/device: see benchmarks/conftest.py. No assertions on time: this is a measurement, not a test.
"""
from __future__ import annotations

import pytest
import torch

from _bench_common import DEVICE, LAYOUTS, SIZES, fast_backends, run_pedantic, torch_impls
from pnekern import bench

VARIANTS = [("torch", i) for i in torch_impls()] + [("pnekern", b) for b in fast_backends()]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("impl, which", VARIANTS, ids=[f"{i}_{w}" for i, w in VARIANTS])
def test_adamw_step(benchmark, impl, which, numel, layout):
    src = bench.make_layout(numel, layout, device=DEVICE)
    (grads,) = bench.shared_grads(src, 1, seed=7)
    step, _ = bench.step_callable(impl, which, src, grads)
    benchmark.extra_info.update(bytes_per_call=int(bench.bytes_per_param("step") * numel), n_tensors=len(src),
                                threads=torch.get_num_threads())
    run_pedantic(benchmark, step)


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("kind", ["copy", "triad"])
def test_roofline(benchmark, kind, numel):
    a = torch.empty(numel, device=DEVICE)
    b = torch.randn(numel, device=DEVICE)
    c = torch.randn(numel, device=DEVICE)
    fn = (lambda: a.copy_(b)) if kind == "copy" else (lambda: torch.add(b, c, alpha=0.5, out=a))
    benchmark.extra_info.update(bytes_per_call=int(bench.bytes_per_param(kind) * numel), threads=torch.get_num_threads())
    run_pedantic(benchmark, fn)
