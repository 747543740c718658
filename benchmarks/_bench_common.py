"""Shared settings and helpers of the pytest-benchmark suites (``pytest benchmarks --benchmark-only``; not in the default run).

Environment:
    PNEKERN_BENCH_SIZES    comma-separated parameter counts (default "4000000,32000000")
    PNEKERN_BENCH_LAYOUTS  comma-separated layouts (default "flat,mixed100"; also transformer, tiny)
    PNEKERN_BENCH_DEVICE   cpu (default) or cuda
    PNEKERN_BENCH_ROUNDS   timed rounds per benchmark (default 15)

These suites time one variant per benchmark (pytest-benchmark's model); for ratios measured interleaved in one run,
with rooflines and a results table, use ``pnekern bench`` (see benchmarks/RESULTS.md).
"""
from __future__ import annotations

import os

import pytest
import torch

from pnekern import bench

SIZES = [int(s) for s in os.environ.get("PNEKERN_BENCH_SIZES", "4000000,32000000").split(",") if s]
LAYOUTS = [s for s in os.environ.get("PNEKERN_BENCH_LAYOUTS", "flat,mixed100").split(",") if s]
DEVICE = os.environ.get("PNEKERN_BENCH_DEVICE", "cpu")
ROUNDS = int(os.environ.get("PNEKERN_BENCH_ROUNDS", "15"))


def fast_backends() -> list[str]:
    """pnekern backends that can be timed on DEVICE (never the Triton interpreter)."""
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        return []
    avail = bench.available_backends(DEVICE)
    return [b for b in ("cpp", "triton", "cuda") if avail[b] is None]


def torch_impls() -> list[str]:
    return ["forloop", "foreach", "fused"]


def run_pedantic(benchmark, fn, *, device: str = DEVICE, rounds: int = ROUNDS, warmup: int = 3) -> None:
    """Time ``fn`` with a device sync inside each round (GPU kernels are asynchronous)."""
    if device.startswith("cuda"):
        def timed():
            fn()
            torch.cuda.synchronize()
    else:
        timed = fn
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=1)
