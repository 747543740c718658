"""pytest-benchmark suite for the optimizer step (not part of the default test run).

    pytest benchmarks/ --benchmark-only --benchmark-group-by=param:numel,param:layout

Compares torch AdamW (for-loop, foreach, fused) with pnekern.AdamW(backend="cpp") and the copy / triad
bandwidth rooflines at the same size, in one run. Set PNEKERN_BENCH_SIZES (e.g. "4000000,32000000").
"""
from __future__ import annotations

import os

import pytest
import torch

import pnekern
from pnekern.bench import make_layout

SIZES = [int(s) for s in os.environ.get("PNEKERN_BENCH_SIZES", "4000000,32000000").split(",")]

VARIANTS = {
    "torch_forloop": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False),
    "torch_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
    "torch_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
    "pnekern_cpp": lambda ps: pnekern.AdamW(ps, lr=1e-3, backend="cpp"),
}


@pytest.mark.parametrize("layout", ["flat", "mixed100"])
@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_adamw_step(benchmark, variant, numel, layout):
    ps = [torch.nn.Parameter(p) for p in make_layout(numel, layout)]
    for p in ps:
        p.grad = torch.randn_like(p) * 1e-2
    opt = VARIANTS[variant](ps)
    benchmark.extra_info["bytes_per_step"] = 28 * numel
    benchmark.pedantic(opt.step, rounds=15, warmup_rounds=3)


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("kind", ["copy", "triad"])
def test_roofline(benchmark, kind, numel):
    a, b, c = torch.empty(numel), torch.randn(numel), torch.randn(numel)
    if kind == "copy":
        benchmark.extra_info["bytes_per_step"] = 8 * numel
        benchmark.pedantic(lambda: a.copy_(b), rounds=15, warmup_rounds=3)
    else:
        benchmark.extra_info["bytes_per_step"] = 16 * numel
        benchmark.pedantic(lambda: torch.add(b, c, alpha=0.5, out=a), rounds=15, warmup_rounds=3)
