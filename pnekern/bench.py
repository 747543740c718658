"""Step-throughput harness shared by ``pnekern bench`` and ``benchmarks/`` (timing only, never a test).

Every row of one run is measured in the same process on the same buffers' sizes, so ratios between rows are
meaningful; absolute numbers depend on the machine, which is recorded with the results.
"""
from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["make_layout", "time_fn", "step_benchmark", "machine_info", "BenchRow", "format_table", "LAYOUTS"]

LAYOUTS = ("flat", "mixed100")
BYTES_PER_PARAM_FP32 = 28  # read p, g, m, v; write p, m, v (fp32)


def make_layout(total: int, layout: str, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0) -> list[torch.Tensor]:
    """Parameter tensors of ``total`` elements: one flat tensor, or 100 tensors of mixed sizes.

    Sizes in ``mixed100`` follow a deterministic spread (a few large matrices and many small vectors, like a
    transformer) and are never exact powers of two, so buffers don't land at pathological strides.
    """
    if layout == "flat":
        sizes = [total]
    elif layout == "mixed100":
        g = torch.Generator().manual_seed(seed)
        w = torch.rand(100, generator=g) ** 3 + 1e-3
        sizes = [max(1, int(x)) for x in (w / w.sum() * total).tolist()]
        sizes[0] += total - sum(sizes)
    else:
        raise ValueError(f"layout={layout!r} is not known; choose one of {', '.join(LAYOUTS)}")
    return [torch.randn(n, dtype=dtype, device=device) * 0.1 for n in sizes]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], *, warmup: int = 3, repeat: int = 15, device: str = "cpu") -> dict[str, float]:
    """Median/min/quantiles of wall time (seconds) over ``repeat`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return {"median": statistics.median(times), "min": times[0], "p10": q[0], "p90": q[-1]}


@dataclass
class BenchRow:
    """One measured configuration. ``seconds`` is the median step time; GB/s counts ``bytes_moved``."""

    name: str
    layout: str
    numel: int
    seconds: float
    p10: float
    p90: float
    bytes_moved: int
    gbps: float = 0.0
    ratio_to: dict[str, float] = field(default_factory=dict)

    def finish(self) -> "BenchRow":
        self.gbps = self.bytes_moved / self.seconds / 1e9
        return self


def _optimizer_step_fn(params: list[torch.Tensor], make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]):
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    for p in ps:
        p.grad = torch.randn_like(p) * 1e-2
    opt = make(ps)
    return opt.step


def step_benchmark(
    sizes: list[int],
    layouts: list[str],
    *,
    device: str = "cpu",
    repeat: int = 15,
    variants: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] | None = None,
) -> list[BenchRow]:
    """Time AdamW steps of every variant plus copy/triad rooflines for each (size, layout)."""
    import pnekern

    if variants is None:
        variants = {
            "torch_forloop": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False),
            "torch_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
            "torch_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
            "pnekern_cpp": lambda ps: pnekern.AdamW(ps, lr=1e-3, backend="cpp"),
        }
    rows: list[BenchRow] = []
    for n in sizes:
        for layout in layouts:
            params = make_layout(n, layout, device=device)
            group: list[BenchRow] = []
            for name, make in variants.items():
                fn = _optimizer_step_fn(params, make)
                t = time_fn(fn, repeat=repeat, device=device)
                group.append(BenchRow(name, layout, n, t["median"], t["p10"], t["p90"], BYTES_PER_PARAM_FP32 * n).finish())
                del fn
            # Rooflines on one flat buffer of the same size (layout-independent by construction).
            a = torch.empty(n, device=device)
            b = torch.randn(n, device=device)
            c = torch.randn(n, device=device)
            t = time_fn(lambda: a.copy_(b), repeat=repeat, device=device)
            group.append(BenchRow("copy", layout, n, t["median"], t["p10"], t["p90"], 8 * n).finish())
            t = time_fn(lambda: torch.add(b, c, alpha=0.5, out=a), repeat=repeat, device=device)
            # triad: read b, c; write a (+ the line the write allocates) = 16 B/element
            group.append(BenchRow("triad", layout, n, t["median"], t["p10"], t["p90"], 16 * n).finish())
            by = {r.name: r for r in group}
            for r in group:
                if "torch_fused" in by:
                    r.ratio_to["torch_fused"] = r.seconds / by["torch_fused"].seconds
                r.ratio_to["triad_gbps"] = r.gbps / by["triad"].gbps
            rows.extend(group)
    return rows


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Device, versions and commit for a results table."""
    import pnekern

    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else _cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "pnekern": pnekern.__version__,
        "python": platform.python_version(),
    }
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - not a checkout
        info["commit"] = None
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def format_table(rows: list[BenchRow]) -> str:
    """Markdown table: median ms, p10–p90, GB/s, ratio to torch fused, fraction of triad bandwidth."""
    out = ["| params | layout | variant | median ms | p10–p90 ms | GB/s | vs torch fused | vs triad GB/s |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(
            f"| {r.numel / 1e6:.0f}M | {r.layout} | {r.name} | {r.seconds * 1e3:.2f} | "
            f"{r.p10 * 1e3:.2f}–{r.p90 * 1e3:.2f} | {r.gbps:.1f} | "
            f"{r.ratio_to.get('torch_fused', float('nan')):.2f} | {r.ratio_to.get('triad_gbps', float('nan')):.2f} |"
        )
    return "\n".join(out)


def rows_to_json(rows: list[BenchRow], info: dict[str, Any]) -> str:
    return json.dumps({"machine": info, "rows": [asdict(r) for r in rows]}, indent=2)
