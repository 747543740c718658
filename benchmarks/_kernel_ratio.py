"""Shared pieces of the kernel-only ratio scripts (kernel_stats_ratio.py, kernel_noise_ratio.py)."""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from pnekern import ops


def parser(doc: str) -> argparse.ArgumentParser:
    """The scripts' common options: --numel, --threads, --repeat."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--numel", type=float, default=32e6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=11)
    return ap


def setup(args: argparse.Namespace, script: str) -> int:
    """Checks the extension is built, sets the thread count; returns N."""
    from pnekern import _native

    _native.require(script)
    torch.set_num_threads(args.threads)
    return int(args.numel)


def adamw_state(n: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, torch.Generator]:
    """p, g, m, v (fp32 [n], seeded), a step counter and the generator (for the caller's extra operands)."""
    gen = torch.Generator().manual_seed(0)
    p, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    m, v = torch.randn(n, generator=gen) * 1e-3, torch.rand(n, generator=gen) * 1e-4
    return p, g, m, v, torch.tensor(5.0), gen


def timed_step(state, **extra) -> float:
    """Seconds of one ``ops.adamw_step_("cpp")`` at step 5 with ``extra`` op arguments."""
    p, g, m, v, step, _ = state
    step.fill_(4.0)  # the op increments it: every round is step 5
    t0 = time.perf_counter()
    ops.adamw_step_("cpp", [p], [g], [m], [v], [], [step], lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.01,
                    eps=1e-8, amsgrad=False, maximize=False, **extra)
    return time.perf_counter() - t0


def interleaved_medians(run: Callable[[bool], float], repeat: int) -> tuple[float, float]:
    """3 warm-up rounds, then ``repeat`` rounds of run(False), run(True); the two medians in seconds."""
    for _ in range(3):
        run(False), run(True)
    off, on = [], []
    for _ in range(repeat):
        off.append(run(False))
        on.append(run(True))
    return statistics.median(off), statistics.median(on)
