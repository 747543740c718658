"""Throughput harness behind ``pnekern bench`` and ``benchmarks/`` (timing only, never a test).

Sections of one run (every ratio in a run compares rows measured in the same process, interleaved round by round,
so slow drifts of a shared machine hit all of them alike):

* ``roofline`` — copy and triad on flat fp32 buffers of each size: the memory-bandwidth ceiling of the device.
* ``step``     — one optimizer step, gradients already in ``p.grad``: torch AdamW (for-loop, foreach, fused) and
  ``pnekern.AdamW`` per backend, statistics off.
* ``stats``    — K micro-batch gradients handed to autograd (one ``backward`` per micro-batch into the leaves,
  which is where the statistics hooks capture) + the step + ``zero_grad``: torch fused vs pnekern with
  stats off/trace/diag(/lowrank). ``overhead_vs_step`` = (t_mode − t_off) / t_step(off): what the statistics add
  to the bare step.
* ``noise``    — the fused step op (``pnekern.ops.adamw_step_``, gradients given, statistics off) without noise and
  with in-step gradient-space noise (into v): ``noise_diag`` (per-element δ, one extra fp32 read) and
  ``noise_lowrank4`` (δ + a rank-4 basis U [d, 4] + c [4]); ``ratio_to_off`` = the paired per-round ratio to
  ``noise_off`` of the same backend (the ≤ 1.15 target of the in-step noise). ε is generated per element from the
  Philox stream inside the kernel (no ε tensor).
* ``train``    — a full training step (forward + backward of K micro-batches + step) of a small GPT-style
  regression transformer (the demo's model family): torch fused vs pnekern stats off/trace/diag, plus in-step noise
  (``+diag+noise``) and a GGN curvature probe (``+trace+probe``: 16 output-space probes run on *every* timed step;
  ``probe_overhead_every100`` = (t − t_trace)/100 / t_trace is what it adds at the issue's every=100).

Bytes moved (fp32, per parameter; DRAM traffic, counting the line a pure write allocates):
    step 28 (read p, g, m, v; write p, m, v) · noise +4 (δ) or +20 (δ, U r=4) · copy 12 (read b, write+allocate a) · triad 16 (read b, c; write+allocate a)
    stats section, K micro-batches: accumulation 8 + 12(K−1) (autograd copies the first gradient, adds the rest)
    + capture K·8 (trace: read x, v) or K·16 (diag: read x, v; the first contribution writes Σx², the others read
    and write it) + step 28 (+4 diag: read Σx²).
GB/s = bytes / median time; ``frac_of_triad`` = GB/s / the triad's GB/s at the same size and thread count.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "SCHEMA", "LAYOUTS", "SECTIONS", "STATS_CHOICES", "TORCH_IMPLS", "PNEKERN_BACKENDS",
    "BenchConfig", "BenchRow", "BenchError", "TrainModelConfig",
    "layout_sizes", "make_layout", "time_interleaved", "summarize", "paired_ratio",
    "bytes_per_param", "available_backends", "estimate_peak_bytes", "available_memory",
    "step_callable", "stats_callable", "train_callable", "shared_grads",
    "run_benchmarks", "machine_info", "section_key", "format_tables", "markdown_section", "update_markdown",
    "result_to_json", "rows_to_csv", "plot_scaling",
]

SCHEMA = "pnekern.bench/1"
LAYOUTS = ("flat", "mixed100", "transformer", "tiny")
SECTIONS = ("step", "stats", "train", "noise")
STATS_CHOICES = ("off", "trace", "diag", "lowrank")
TORCH_IMPLS = ("forloop", "foreach", "fused")
PNEKERN_BACKENDS = ("cpp", "triton", "cuda", "reference")
BYTES_PER_PARAM_FP32 = 28  # read p, g, m, v; write p, m, v (fp32)
_ALIGN_FLOATS = 16  # 64-byte steps between buffer offsets


class BenchError(ValueError):
    """A bad benchmark request; ``flag`` names the command-line option at fault."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"{flag}: {message}")
        self.flag = flag


# ---------------------------------------------------------------------------------------------------- layouts
def layout_sizes(total: int, layout: str, seed: int = 0) -> list[int]:
    """Element counts of the tensors of ``layout`` (they sum to ``total``).

    ``flat``: one tensor. ``mixed100``: 100 tensors, a few large matrices and many small vectors (cubed uniform
    weights). ``transformer``: GPT-2-style shapes — 12 blocks of (ln, qkv, proj, ln, fc, fc-proj) weights and biases,
    positional embedding, final ln, and a token embedding taking the rest (148 tensors; width chosen so the blocks hold
    ~70% of ``total``). ``tiny``: ``total // 3000`` tensors of 1000–5000 elements (per-tensor overhead dominates).
    """
    if not isinstance(total, int) or total < 1:
        raise BenchError("--sizes", f"{total!r} must be a positive number of parameters")
    if layout == "flat":
        return [total]
    if layout == "mixed100":
        g = torch.Generator().manual_seed(seed)
        w = torch.rand(100, generator=g, dtype=torch.float64) ** 3 + 1e-3
        sizes = [max(1, int(x)) for x in (w / w.sum() * total).tolist()]
    elif layout == "transformer":
        d = max(1, int(math.sqrt(0.7 * total / 144)))
        if d >= 64:
            d -= d % 8
        block = [d, d, 3 * d * d, 3 * d, d * d, d, d, d, 4 * d * d, 4 * d, 4 * d * d, d]
        sizes = block * 12 + [min(1024, max(1, total // 100)) * d, d, d]
        while sum(sizes) >= total and d > 1:  # tiny totals: shrink until a token embedding fits
            d -= 1
            block = [d, d, 3 * d * d, 3 * d, d * d, d, d, d, 4 * d * d, 4 * d, 4 * d * d, d]
            sizes = block * 12 + [min(1024, max(1, total // 100)) * d, d, d]
        if sum(sizes) >= total:
            raise BenchError("--sizes", f"{total} parameters are too few for the transformer layout (need >= 1000)")
        sizes = [total - sum(sizes)] + sizes  # token embedding first, like GPT-2's wte
        return sizes
    elif layout == "tiny":
        count = max(1, total // 3000)
        g = torch.Generator().manual_seed(seed)
        w = torch.rand(count, generator=g, dtype=torch.float64) + 0.25
        sizes = [max(1, int(x)) for x in (w / w.sum() * total).tolist()]
    else:
        raise BenchError("--layouts", f"{layout!r} is not a layout; choose from {', '.join(LAYOUTS)}")
    sizes[0] += total - sum(sizes)
    if sizes[0] < 1:
        raise BenchError("--sizes", f"{total} parameters are too few for the {layout} layout")
    return sizes


def _offset_empty(numel: int, index: int, dtype: torch.dtype, device: str | torch.device) -> Tensor:
    """An uninitialised contiguous 1-D tensor whose start is shifted by a (index-dependent) multiple of 64 bytes.

    Large allocations come back page-aligned; p, g, m, v at identical page offsets can alias in the cache sets
    (4K aliasing) and make one layout look pathologically slow. Shifting the starts avoids that.
    """
    off = _ALIGN_FLOATS * (1 + (index * 7) % 31)
    return torch.empty(numel + off, dtype=dtype, device=device)[off:]


def make_layout(total: int, layout: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
                seed: int = 0, offset_index: int = 0) -> list[Tensor]:
    """Parameter-like tensors of ``layout`` (see :func:`layout_sizes`), values ~ N(0, 0.1²), starts not page-aligned."""
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for i, n in enumerate(layout_sizes(total, layout, seed)):
        t = _offset_empty(n, offset_index + i, dtype, device)
        t.copy_((torch.randn(n, generator=g) * 0.1).to(dtype))
        out.append(t)
    return out


# ---------------------------------------------------------------------------------------------------- timing
def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(fns: dict[str, Callable[[], Any]], *, warmup: int = 3, repeat: int = 15, device: str = "cpu",
                     min_sample_s: float = 1e-3) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Per-call seconds of every function, ``repeat`` samples each, measured round-robin.

    Each round runs every function once (the order rotates by one per round), so load changes on a shared machine
    affect all variants alike and per-round ratios pair up. Calls shorter than ``min_sample_s`` are repeated inside one
    sample (``inner`` calls, returned per function) to stay above the clock's resolution.
    """
    if warmup < 0 or repeat < 1:
        raise BenchError("--repeat", f"needs repeat >= 1 and warmup >= 0 (got {repeat}, {warmup})")
    inner: dict[str, int] = {}
    for name, fn in fns.items():
        for _ in range(max(warmup, 1)):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            t = time.perf_counter() - t0
        inner[name] = max(1, min(1000, math.ceil(min_sample_s / max(t, 1e-9))))
    names = list(fns)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeat):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn, m = fns[name], inner[name]
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(m):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - t0) / m)
    return samples, inner


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """median, p10, p90, min, max (seconds) of one variant's samples."""
    s = sorted(samples)
    if len(s) >= 2:
        q = statistics.quantiles(s, n=10, method="inclusive")
        p10, p90 = q[0], q[-1]
    else:
        p10 = p90 = s[0]
    return {"median_s": statistics.median(s), "p10_s": p10, "p90_s": p90, "min_s": s[0], "max_s": s[-1]}


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over rounds of a_i / b_i: the ratio of two interleaved variants, robust to drifts between rounds."""
    return statistics.median(x / y for x, y in zip(a, b))


def bytes_per_param(section: str, stats: str = "off", micro_batches: int = 0, elem_bytes: int = 4) -> float:
    """Bytes a configuration moves per parameter (see the module docstring for the model)."""
    scale = elem_bytes / 4
    if section == "step":
        return BYTES_PER_PARAM_FP32 * scale
    if section == "stats":
        k = micro_batches
        accum = 8 + 12 * (k - 1)
        step = 28
        capture = 0
        if stats == "trace":
            capture = 8 * k
        elif stats in ("diag", "lowrank"):
            capture, step = 16 * k, 32  # lowrank: its d×r sketch traffic is not counted
        return (accum + capture + step) * scale
    if section == "noise":
        return (BYTES_PER_PARAM_FP32 + {"off": 0, "diag": 4, "lowrank4": 20}[stats]) * scale
    if section == "copy":
        return 12 * scale
    if section == "triad":
        return 16 * scale
    raise ValueError(f"no byte model for section {section!r}")


# ---------------------------------------------------------------------------------------------------- config
@dataclass
class TrainModelConfig:
    """The training-step model: RegressionTransformer(d, k_max, n_layer, n_head, d_model), batch of ``batch`` tasks
    split into the run's ``micro_batches``."""

    d: int = 20
    k_max: int = 40
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    batch: int = 64


@dataclass
class BenchConfig:
    device: str = "cpu"
    sizes: list[int] = field(default_factory=lambda: [4_000_000, 32_000_000])
    layouts: list[str] = field(default_factory=lambda: ["flat", "mixed100", "transformer"])
    sections: list[str] = field(default_factory=lambda: ["step", "stats"])
    torch_impls: list[str] = field(default_factory=lambda: list(TORCH_IMPLS))
    backends: list[str] | None = None  # None: every fast backend available on the device (reference is opt-in)
    stats: list[str] = field(default_factory=lambda: ["off", "trace", "diag"])
    micro_batches: int = 4
    threads: list[int] | None = None  # None: torch's current setting
    repeat: int = 15
    warmup: int = 3
    train: TrainModelConfig = field(default_factory=TrainModelConfig)
    lr: float = 1e-3
    seed: int = 0


def _torch_fused_supported(device: str) -> bool:
    return device.startswith("cuda") or tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2]) >= (2, 4)


def available_backends(device: str) -> dict[str, str | None]:
    """pnekern backend -> None when it can be timed on ``device``, else why not.

    Triton on CPU tensors runs only in its interpreter, which is for correctness: it is never offered for timing.
    """
    from . import ops

    dev = torch.device(device)
    out: dict[str, str | None] = {}
    for b in PNEKERN_BACKENDS:
        if b == "triton" and dev.type == "cpu":
            out[b] = "the Triton interpreter is for correctness only; Triton timings need --device cuda"
            continue
        try:
            ops.resolve_backend(b, dev, torch.float32)
            out[b] = None
        except Exception as e:  # noqa: BLE001 - the reason is shown to the user
            out[b] = str(e)
    return out


def validate_config(cfg: BenchConfig) -> BenchConfig:
    """Check a request before anything is allocated; raises BenchError naming the flag."""
    if cfg.device not in ("cpu", "cuda") and not re.fullmatch(r"cuda:\d+", cfg.device):
        raise BenchError("--device", f"{cfg.device!r} is not supported (cpu or cuda)")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError("--device", "cuda requested but torch sees no CUDA device")
    if not cfg.sizes or any(not isinstance(n, int) or n < 1 for n in cfg.sizes):
        raise BenchError("--sizes", f"{cfg.sizes!r}: every size must be a positive number of parameters")
    for name, values, choices in (("--layouts", cfg.layouts, LAYOUTS), ("--sections", cfg.sections, SECTIONS),
                                  ("--torch", cfg.torch_impls, TORCH_IMPLS), ("--stats", cfg.stats, STATS_CHOICES)):
        for v in values:
            if v not in choices:
                raise BenchError(name, f"{v!r} is not one of {', '.join(choices)}")
    if not cfg.sections:
        raise BenchError("--sections", "choose at least one of " + ", ".join(SECTIONS))
    if any(s in cfg.sections for s in ("step", "stats", "noise")) and not cfg.layouts:
        raise BenchError("--layouts", "choose at least one layout")
    if "fused" in cfg.torch_impls and not _torch_fused_supported(cfg.device):
        raise BenchError("--torch", f"torch {torch.__version__} has no fused AdamW on {cfg.device}")
    avail = available_backends(cfg.device)
    if cfg.backends is None:
        cfg.backends = [b for b in ("cpp", "triton", "cuda") if avail[b] is None]
    for b in cfg.backends:
        if b not in avail:
            raise BenchError("--backends", f"{b!r} is not a pnekern backend; choose from {', '.join(PNEKERN_BACKENDS)}")
        if avail[b] is not None:
            raise BenchError("--backends", f"{b!r} cannot be timed on {cfg.device}: {avail[b]}")
    if cfg.micro_batches < 2 and ("stats" in cfg.sections or "train" in cfg.sections):
        raise BenchError("--micro-batches", f"{cfg.micro_batches}: the statistics need >= 2 micro-batches per step")
    if cfg.repeat < 1:
        raise BenchError("--repeat", f"{cfg.repeat} must be >= 1")
    if cfg.warmup < 0:
        raise BenchError("--warmup", f"{cfg.warmup} must be >= 0")
    if cfg.threads is not None and any(t < 1 for t in cfg.threads):
        raise BenchError("--threads", f"{cfg.threads}: thread counts must be >= 1")
    t = cfg.train
    if "train" in cfg.sections:
        for name in ("d", "k_max", "n_layer", "n_head", "d_model", "batch"):
            if getattr(t, name) < 1:
                raise BenchError(f"--train-{name.replace('_', '-')}", f"{getattr(t, name)} must be >= 1")
        if t.d_model % t.n_head:
            raise BenchError("--train-d-model", f"{t.d_model} must be a multiple of --train-n-head {t.n_head}")
        if t.batch % cfg.micro_batches:
            raise BenchError("--train-batch", f"{t.batch} must be a multiple of --micro-batches {cfg.micro_batches}")
    for n in cfg.sizes:
        for layout in cfg.layouts:
            layout_sizes(n, layout)  # raises BenchError for sizes a layout cannot hold
    return cfg


def estimate_peak_bytes(cfg: BenchConfig) -> int:
    """Upper estimate of the memory one interleaved group holds at the largest size (fp32)."""
    n = max(cfg.sizes) if cfg.sizes and any(s in cfg.sections for s in ("step", "stats", "noise")) else 0
    backends = cfg.backends or []
    peak = 0
    if "step" in cfg.sections:
        variants = len(cfg.torch_impls) + len(backends)
        peak = max(peak, n * 4 * (1 + 3 * variants + 1))  # shared grads + (p, m, v) each + source values
    if "noise" in cfg.sections:
        peak = max(peak, n * 4 * (1 + 3 * 3 * len(backends) + 1 + 4))  # grads, (p, m, v) × 3 variants, δ, U
    if "stats" in cfg.sections:
        variants = len(backends) * len(cfg.stats) + ("fused" in cfg.torch_impls)
        peak = max(peak, n * 4 * (cfg.micro_batches + 5 * variants + 1))  # K shared grads + (p, g, m, v, q) each
    peak = max(peak, n * 4 * 3)  # roofline buffers
    return peak


def available_memory(device: str) -> int:
    """Bytes free for new allocations on ``device`` (MemAvailable on Linux CPUs)."""
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


# ---------------------------------------------------------------------------------------------------- rows
@dataclass
class BenchRow:
    """One measured configuration; times in seconds (quantiles over ``repeat`` interleaved samples)."""

    section: str            # roofline | step | stats | train
    variant: str            # display name, e.g. torch_fused, pnekern_cpp, pnekern_cpp+trace, triad
    impl: str               # torch | pnekern | roofline
    backend: str            # forloop/foreach/fused | cpp/triton/cuda/reference | copy/triad
    stats: str              # off | trace | diag | lowrank
    layout: str
    numel: int
    n_tensors: int
    threads: int
    micro_batches: int
    median_s: float
    p10_s: float
    p90_s: float
    min_s: float
    max_s: float
    repeat: int
    inner: int
    bytes_moved: int | None = None
    gbps: float | None = None
    frac_of_triad: float | None = None
    ratio_to_torch_fused: float | None = None   # median of per-round ratios to torch_fused in the same group
    ratio_to_off: float | None = None           # same backend, stats off, same group
    overhead_vs_step: float | None = None       # stats: (t − t_off) / t_step(off) of the same backend, same run
    bytes_ratio_to_off: float | None = None     # what the byte model predicts for ratio_to_off
    step_phase_s: float | None = None           # stats: median of opt.step() alone inside the timed calls
    step_phase_ratio_to_off: float | None = None  # stats: step_phase_s / that of the same backend with stats off
    memory_bytes: int | None = None             # held between steps: params, grads, optimizer + statistics state
    probe_overhead_every100: float | None = None  # train "+probe" (probe on every step): (t − t_trace)/100 / t_trace
    samples_s: list[float] = field(default_factory=list)


def _held_bytes(opt: torch.optim.Optimizer, extra: Sequence[Tensor] = ()) -> int:
    seen: set[int] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if isinstance(t, Tensor) and t.numel() > 0:
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()

    for group in opt.param_groups:
        for p in group["params"]:
            add(p)
            add(p.grad)
    for st in opt.state.values():
        for v in st.values():
            add(v)
    stats = getattr(opt, "_stats", None)
    if stats is not None:
        for slot in stats.slots.values():
            add(getattr(slot, "sumsq", None))
            add(getattr(slot, "sketch", None))
    for t in extra:
        add(t)
    return total


def _make_torch_opt(impl: str, params: list[Tensor], lr: float) -> torch.optim.Optimizer:
    kw = {"forloop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[impl]
    return torch.optim.AdamW(params, lr=lr, **kw)


def _make_pnekern_opt(backend: str, stats: str, params: list[Tensor], lr: float, batch_size: int | None = None,
                      ) -> torch.optim.Optimizer:
    import pnekern

    s = None if stats == "off" else stats
    return pnekern.AdamW(params, lr=lr, backend=backend, stats=s, batch_size=batch_size if s else None)


def _leaves(src: list[Tensor], offset_index: int) -> list[Tensor]:
    out = []
    for i, t in enumerate(src):
        p = _offset_empty(t.numel(), offset_index + i, t.dtype, t.device)
        p.copy_(t)
        out.append(torch.nn.Parameter(p))
    return out


def _finish_group(rows: list[BenchRow], triad_gbps: float | None) -> None:
    """Fill GB/s, fraction of triad and ratios between rows of one interleaved group."""
    by = {r.variant: r for r in rows}
    fused = by.get("torch_fused")
    for r in rows:
        if r.bytes_moved:
            r.gbps = r.bytes_moved / r.median_s / 1e9
            if triad_gbps:
                r.frac_of_triad = r.gbps / triad_gbps
        if fused is not None:
            r.ratio_to_torch_fused = paired_ratio(r.samples_s, fused.samples_s)
        if r.impl == "pnekern" and r.section in ("stats", "train"):
            off = by.get(f"pnekern_{r.backend}")
            if off is not None:
                r.ratio_to_off = paired_ratio(r.samples_s, off.samples_s)
                if r.bytes_moved and off.bytes_moved:
                    r.bytes_ratio_to_off = r.bytes_moved / off.bytes_moved


def _row(section: str, variant: str, impl: str, backend: str, stats: str, layout: str, numel: int, n_tensors: int,
         threads: int, k: int, samples: list[float], inner: int, bytes_moved: int | None,
         memory: int | None) -> BenchRow:
    return BenchRow(section=section, variant=variant, impl=impl, backend=backend, stats=stats, layout=layout,
                    numel=numel, n_tensors=n_tensors, threads=threads, micro_batches=k, **summarize(samples),
                    repeat=len(samples), inner=inner, bytes_moved=bytes_moved, memory_bytes=memory,
                    samples_s=list(samples))


def _roofline_group(n: int, cfg: BenchConfig, threads: int) -> list[BenchRow]:
    dev = cfg.device
    a = _offset_empty(n, 0, torch.float32, dev)
    b = _offset_empty(n, 1, torch.float32, dev).normal_()
    c = _offset_empty(n, 2, torch.float32, dev).normal_()
    fns = {"copy": lambda: a.copy_(b), "triad": lambda: torch.add(b, c, alpha=0.5, out=a)}
    samples, inner = time_interleaved(fns, warmup=cfg.warmup, repeat=cfg.repeat, device=dev)
    rows = [_row("roofline", k, "roofline", k, "off", "flat", n, 1, threads, 0, samples[k], inner[k],
                 int(bytes_per_param(k) * n), 3 * 4 * n) for k in fns]
    _finish_group(rows, None)
    triad = rows[1].gbps
    for r in rows:
        r.frac_of_triad = r.gbps / triad
    return rows


def step_callable(impl: str, which: str, src: list[Tensor], grads: list[Tensor], lr: float = 1e-3,
                  offset_index: int = 0) -> tuple[Callable[[], Any], torch.optim.Optimizer]:
    """``opt.step`` of one variant (``impl`` torch|pnekern, ``which`` its torch flavour or pnekern backend) on fresh
    copies of ``src`` whose ``.grad`` are the shared, read-only ``grads``."""
    params = _leaves(src, offset_index)
    for p, gr in zip(params, grads):
        p.grad = gr  # shared and read-only: no optimizer here writes its gradients
    opt = _make_torch_opt(which, params, lr) if impl == "torch" else _make_pnekern_opt(which, "off", params, lr)
    return opt.step, opt


def shared_grads(src: list[Tensor], count: int, seed: int = 0) -> list[list[Tensor]]:
    """``count`` gradient sets ~ N(0, 0.01²) shaped like ``src`` (on its device)."""
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(t.numel(), generator=g) * 1e-2).to(t.device) for t in src] for _ in range(count)]


def _step_group(n: int, layout: str, cfg: BenchConfig, threads: int, triad_gbps: float | None) -> list[BenchRow]:
    src = make_layout(n, layout, device=cfg.device, seed=cfg.seed)
    (grads,) = shared_grads(src, 1, cfg.seed + 7)
    fns: dict[str, Callable[[], Any]] = {}
    meta: dict[str, tuple[str, str, torch.optim.Optimizer]] = {}
    specs = [(f"torch_{i}", "torch", i) for i in cfg.torch_impls] + [(f"pnekern_{b}", "pnekern", b) for b in cfg.backends]
    for vi, (name, impl, which) in enumerate(specs):
        fns[name], opt = step_callable(impl, which, src, grads, cfg.lr, 1000 * (vi + 1))
        meta[name] = (impl, which, opt)
    samples, inner = time_interleaved(fns, warmup=cfg.warmup, repeat=cfg.repeat, device=cfg.device)
    rows = [_row("step", name, impl, which, "off", layout, n, len(src), threads, 0, samples[name], inner[name],
                 int(bytes_per_param("step") * n), _held_bytes(opt)) for name, (impl, which, opt) in meta.items()]
    _finish_group(rows, triad_gbps)
    return rows


NOISE_VARIANTS = ("off", "diag", "lowrank4")


def _noise_group(n: int, layout: str, cfg: BenchConfig, threads: int, triad_gbps: float | None) -> list[BenchRow]:
    from . import ops

    dev = cfg.device
    src = make_layout(n, layout, device=dev, seed=cfg.seed)
    (grads,) = shared_grads(src, 1, cfg.seed + 7)
    g = torch.Generator().manual_seed(cfg.seed + 11)
    var = [(torch.rand(t.numel(), generator=g) * 1e-4).to(dev) for t in src]
    basis = [(torch.randn(t.numel(), 4, generator=g) / max(1.0, t.numel()) ** 0.5).to(dev) for t in src]
    coef = [(torch.randn(4, generator=g) * 1e-2).to(dev) for _ in src]
    fns: dict[str, Callable[[], Any]] = {}
    meta: dict[str, tuple[str, str, list[Tensor]]] = {}
    for bi, backend in enumerate(cfg.backends):
        for vi, kind in enumerate(NOISE_VARIANTS):
            off_i = 1000 * (1 + bi * len(NOISE_VARIANTS) + vi)
            ps = [_offset_empty(t.numel(), off_i + i, t.dtype, dev).copy_(t) for i, t in enumerate(src)]
            ms = [torch.zeros_like(t) for t in src]
            vs = [torch.zeros_like(t) for t in src]
            steps = [torch.tensor(0.0) for _ in src]
            kw: dict[str, Any] = {}
            if kind != "off":
                kw = dict(noise_mode=1, noise_seed=cfg.seed, noise_counter=0, noise_tensor_idx=list(range(len(src))),
                          noise_var=var)
                if kind == "lowrank4":
                    kw.update(noise_basis=basis, noise_coef=coef)

            def fn(backend=backend, ps=ps, ms=ms, vs=vs, steps=steps, kw=kw) -> None:
                if kw:
                    kw["noise_counter"] += 1
                ops.adamw_step_(backend, ps, grads, ms, vs, [], steps, lr=cfg.lr, beta1=0.9, beta2=0.999,
                                weight_decay=1e-2, eps=1e-8, amsgrad=False, maximize=False, **kw)

            name = f"pnekern_{backend}+noise_{kind}"
            fns[name] = fn
            meta[name] = (backend, kind, ps + ms + vs + list(grads) + (var if kind != "off" else [])
                          + (basis if kind == "lowrank4" else []))
    samples, inner = time_interleaved(fns, warmup=cfg.warmup, repeat=cfg.repeat, device=dev)
    rows = []
    for name, (backend, kind, held) in meta.items():
        nbytes = sum(t.numel() * t.element_size() for t in held)
        rows.append(_row("noise", name, "pnekern", backend, kind, layout, n, len(src), threads, 0, samples[name],
                         inner[name], int(bytes_per_param("noise", kind) * n), nbytes))
    _finish_group(rows, triad_gbps)
    by = {r.variant: r for r in rows}
    for r in rows:
        off = by.get(f"pnekern_{r.backend}+noise_off")
        if off is not None:
            r.ratio_to_off = paired_ratio(r.samples_s, off.samples_s)
            r.bytes_ratio_to_off = r.bytes_moved / off.bytes_moved
    return rows


def stats_callable(impl: str, which: str, stats: str, src: list[Tensor], contribs: list[list[Tensor]],
                   lr: float = 1e-3, offset_index: int = 0, step_phase: list[float] | None = None,
                   ) -> tuple[Callable[[], Any], torch.optim.Optimizer]:
    """One step of the stats section: ``backward`` of each micro-batch's gradients (``contribs``: K lists shaped like
    ``src``, shared and read-only) into fresh leaves, then ``step`` and ``zero_grad``. With ``step_phase`` (a list),
    the duration of ``opt.step()`` alone is appended to it on every call."""
    params = _leaves(src, offset_index)
    opt = _make_torch_opt(which, params, lr) if impl == "torch" else _make_pnekern_opt(which, stats, params, lr)
    device = str(src[0].device)

    def step() -> None:
        for grads in contribs:
            torch.autograd.backward(params, grad_tensors=grads)
        if step_phase is None:
            opt.step()
        else:  # time the optimizer step alone too (a device sync on each side of it)
            _sync(device)
            t0 = time.perf_counter()
            opt.step()
            _sync(device)
            step_phase.append(time.perf_counter() - t0)
        opt.zero_grad(set_to_none=True)

    return step, opt


def _variant_specs(cfg: BenchConfig) -> list[tuple[str, str, str, str]]:
    """(name, impl, torch flavour or backend, stats) of the stats and train sections."""
    specs: list[tuple[str, str, str, str]] = []
    if "fused" in cfg.torch_impls:
        specs.append(("torch_fused", "torch", "fused", "off"))
    for b in cfg.backends or []:
        for s in cfg.stats:
            specs.append((f"pnekern_{b}" + ("" if s == "off" else f"+{s}"), "pnekern", b, s))
    return specs


def _stats_group(n: int, layout: str, cfg: BenchConfig, threads: int, triad_gbps: float | None,
                 step_rows: list[BenchRow]) -> list[BenchRow]:
    k = cfg.micro_batches
    src = make_layout(n, layout, device=cfg.device, seed=cfg.seed)
    contribs = shared_grads(src, k, cfg.seed + 11)
    specs = _variant_specs(cfg)
    fns: dict[str, Callable[[], Any]] = {}
    opts: dict[str, torch.optim.Optimizer] = {}
    phases: dict[str, list[float]] = {}
    for vi, (name, impl, which, s) in enumerate(specs):
        phases[name] = []
        fns[name], opts[name] = stats_callable(impl, which, s, src, contribs, cfg.lr, 1000 * (vi + 1), phases[name])
    warmup = max(cfg.warmup, 2)
    samples, inner = time_interleaved(fns, warmup=warmup, repeat=cfg.repeat, device=cfg.device)
    rows = []
    for name, impl, which, s in specs:
        r = _row("stats", name, impl, which, s, layout, n, len(src), threads, k, samples[name], inner[name],
                 int(bytes_per_param("stats", s, k) * n), _held_bytes(opts[name], []))
        r.step_phase_s = statistics.median(phases[name][warmup:] or phases[name])  # timed calls only
        rows.append(r)
    _finish_group(rows, triad_gbps)
    step_by = {r.backend: r for r in step_rows if r.impl == "pnekern" and r.layout == layout and r.numel == n}
    by = {r.variant: r for r in rows}
    for r in rows:
        off = by.get(f"pnekern_{r.backend}")
        bare = step_by.get(r.backend)
        if r.impl == "pnekern" and off is not None and bare is not None:
            r.overhead_vs_step = (r.median_s - off.median_s) / bare.median_s
        if r.impl == "pnekern" and off is not None and off.step_phase_s:
            r.step_phase_ratio_to_off = r.step_phase_s / off.step_phase_s
    return rows


def train_callable(impl: str, which: str, stats: str, model_cfg: TrainModelConfig, micro_batches: int,
                   device: str = "cpu", lr: float = 1e-3, seed: int = 0,
                   ) -> tuple[Callable[[], Any], torch.optim.Optimizer, torch.nn.Module]:
    """One full training step: forward + backward of each of ``micro_batches`` chunks of a fixed batch of in-context
    regression tasks through ``RegressionTransformer``, then ``step`` and ``zero_grad``. Same weights for every
    variant built with the same ``seed``."""
    import torch.nn.functional as F

    from .icl.models import RegressionTransformer

    t, k = model_cfg, micro_batches
    g = torch.Generator().manual_seed(seed + 3)
    xs = torch.randn(t.batch, t.k_max, t.d, generator=g)
    w = torch.randn(t.d, generator=g) / math.sqrt(t.d)
    ys = xs @ w
    chunks = [(x.to(device), y.to(device)) for x, y in zip(xs.chunk(k), ys.chunk(k))]
    torch.manual_seed(seed)  # identical initial weights for every variant
    model = RegressionTransformer(t.d, t.k_max, n_layer=t.n_layer, n_head=t.n_head, d_model=t.d_model).to(device)
    params = list(model.parameters())
    # End-to-end extras of the train section: "<stats>+noise" injects gradient-space noise emulating a batch 4x
    # smaller (in-step); "<stats>+probe" attaches the issue's GGN curvature probe (TRAIN_PROBE_NUM_PROBES output-space
    # probes on random sub-batches of a held-out batch as large as the training batch) every TRAIN_PROBE_EVERY steps.
    base, *extras = stats.split("+")
    if impl == "torch":
        opt = _make_torch_opt(which, params, lr)
    else:
        opt = _make_pnekern_opt(which, base, params, lr, batch_size=t.batch)
        if "noise" in extras:
            import pnekern

            s = None if base == "off" else base
            opt = pnekern.AdamW(params, lr=lr, backend=which, stats=s, batch_size=t.batch,
                                noise=pnekern.NoiseConfig(emulate_batch_size=max(1, t.batch // 4), seed=seed))
        if "probe" in extras:
            from .probes import CurvatureProbe

            hx = torch.randn(t.batch, t.k_max, t.d, generator=g)
            held = ((hx.to(device), (hx @ w).to(device)), (hx @ w).to(device))
            opt.attach_probe(CurvatureProbe(model, torch.nn.MSELoss(), held, every=TRAIN_PROBE_EVERY, kind="ggn",
                                            estimator="output", rows_per_probe="auto",
                                            num_probes=TRAIN_PROBE_NUM_PROBES))

    def step() -> None:
        for x, y in chunks:
            loss = F.mse_loss(model(x, y), y) / k
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, opt, model


#: Steps between curvature probes in the train section's "+probe" variant. 1: every timed step pays for one probe
#: measurement (TRAIN_PROBE_NUM_PROBES output-space GGN probes, ⌈batch/probes⌉ held-out sequences each, one vmapped
#: forward + backward), so the row is the probe's full cost; with ``every=N`` a run pays 1/N of the difference to
#: "+trace". (A larger value would only show up in the tail, not in the reported medians.) The row's
#: ``probe_overhead_every100`` is that share for the issue's configuration, every=100: (t − t_trace)/100 / t_trace.
TRAIN_PROBE_EVERY = 1
#: Probes per measurement in the "+probe" variant (the issue's "16 probes every 100 steps").
TRAIN_PROBE_NUM_PROBES = 16
#: The probe interval whose overhead ``probe_overhead_every100`` reports.
TRAIN_PROBE_REPORT_EVERY = 100


def _train_group(cfg: BenchConfig, threads: int) -> list[BenchRow]:
    k, dev = cfg.micro_batches, cfg.device
    specs = _variant_specs(cfg)
    for b in cfg.backends or []:  # noise and a curvature probe on the full training step (diag / trace statistics)
        specs += [(f"pnekern_{b}+diag+noise", "pnekern", b, "diag+noise"),
                  (f"pnekern_{b}+trace+probe", "pnekern", b, "trace+probe")]
    fns: dict[str, Callable[[], Any]] = {}
    opts: dict[str, torch.optim.Optimizer] = {}
    numel = n_tensors = 0
    for name, impl, which, s in specs:
        fns[name], opts[name], model = train_callable(impl, which, s, cfg.train, k, dev, cfg.lr, cfg.seed)
        numel = sum(p.numel() for p in model.parameters())
        n_tensors = len(list(model.parameters()))
    samples, inner = time_interleaved(fns, warmup=max(cfg.warmup, 2), repeat=cfg.repeat, device=dev)
    rows = [_row("train", name, impl, which, s, "model", numel, n_tensors, threads, k, samples[name], inner[name],
                 None, _held_bytes(opts[name])) for name, impl, which, s in specs]
    _finish_group(rows, None)
    by = {r.variant: r for r in rows}
    for r in rows:
        base = by.get(r.variant[: -len("+probe")]) if r.variant.endswith("+probe") else None
        if base is not None:
            # The probe runs on every timed step (TRAIN_PROBE_EVERY = 1): at every=100 a run pays 1/100 of it.
            r.probe_overhead_every100 = (r.median_s - base.median_s) / TRAIN_PROBE_REPORT_EVERY / base.median_s
    return rows


@contextlib.contextmanager
def _num_threads(n: int | None):
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


def run_benchmarks(cfg: BenchConfig, progress: Callable[[str], None] | None = None) -> list[BenchRow]:
    """Every requested section, for every thread count and size (see the module docstring)."""
    validate_config(cfg)
    say = progress or (lambda _msg: None)
    rows: list[BenchRow] = []
    for threads_req in cfg.threads or [None]:
        with _num_threads(threads_req) as threads:
            for n in cfg.sizes if any(s in cfg.sections for s in ("step", "stats", "noise")) else []:
                say(f"threads {threads} · {n:,} params: roofline")
                roof = _roofline_group(n, cfg, threads)
                rows += roof
                triad = roof[1].gbps
                for layout in cfg.layouts:
                    step_rows: list[BenchRow] = []
                    if "step" in cfg.sections:
                        say(f"threads {threads} · {n:,} params · {layout}: step")
                        step_rows = _step_group(n, layout, cfg, threads, triad)
                        rows += step_rows
                    if "stats" in cfg.sections:
                        say(f"threads {threads} · {n:,} params · {layout}: stats (K={cfg.micro_batches})")
                        rows += _stats_group(n, layout, cfg, threads, triad, step_rows)
                    if "noise" in cfg.sections:
                        say(f"threads {threads} · {n:,} params · {layout}: in-step noise off/diag/lowrank4")
                        rows += _noise_group(n, layout, cfg, threads, triad)
            if "train" in cfg.sections:
                say(f"threads {threads}: training step (K={cfg.micro_batches})")
                rows += _train_group(cfg, threads)
    return rows


# ---------------------------------------------------------------------------------------------------- machine
def _git(*args: str) -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=here,
                              timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001 - not a checkout / no git
        return None


def _cpu_name(cpuinfo: str | None = None) -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (or the given text), with its family and model numbers.

    Virtual machines often report a generic name ("AMD EPYC" for both a Zen 3 and a Zen 5 VM), and the name keys a
    device's section of RESULTS.md, so the numbers keep two such CPUs' sections apart: "AMD EPYC (family 25, model 1)".
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block is enough
            continue
        name, sep, value = line.partition(":")
        if sep:
            fields.setdefault(name.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or "cpu"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Device, core count, versions and commit for a results table."""
    import pnekern

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    commit = _git("rev-parse", "--short", "HEAD")
    if commit is not None and _git("status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"
    is_cuda = device.startswith("cuda")
    return {
        "device_type": "cuda" if is_cuda else "cpu",
        "device": torch.cuda.get_device_name(torch.device(device)) if is_cuda else _cpu_name(),
        "cpu": _cpu_name(),
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "pnekern": pnekern.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": commit,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# ---------------------------------------------------------------------------------------------------- output
def result_to_json(rows: list[BenchRow], info: dict[str, Any], cfg: BenchConfig, command: str | None = None) -> str:
    return json.dumps({"schema": SCHEMA, "machine": info, "config": asdict(cfg), "command": command,
                       "rows": [asdict(r) for r in rows]}, indent=2)


CSV_MACHINE = ("device", "torch", "triton", "commit", "time_utc")


def rows_to_csv(rows: list[BenchRow], info: dict[str, Any], header: bool = True) -> str:
    """CSV of the rows (samples left out) with device, versions and commit on every line, for appending."""
    cols = [f.name for f in fields(BenchRow) if f.name != "samples_s"]
    buf = io.StringIO()
    w = csv.writer(buf)
    if header:
        w.writerow(list(CSV_MACHINE) + cols)
    for r in rows:
        d = asdict(r)
        w.writerow([info.get(c) for c in CSV_MACHINE] + [d[c] for c in cols])
    return buf.getvalue()


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _size(n: int) -> str:
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}K" if n >= 1e3 else str(n)


def format_tables(rows: list[BenchRow]) -> str:
    """Markdown tables (roofline, step, statistics overhead, training step) of one run."""
    out: list[str] = []
    roof = [r for r in rows if r.section == "roofline"]
    if roof:
        out += ["**Memory-bandwidth roofline** (flat fp32 buffers; copy 12 B/elem, triad 16 B/elem incl. write-allocate)",
                "", "| threads | params | kernel | median ms | p10–p90 ms | GB/s |", "|---:|---:|---|---:|---:|---:|"]
        out += [f"| {r.threads} | {_size(r.numel)} | {r.variant} | {r.median_s * 1e3:.3f} | "
                f"{r.p10_s * 1e3:.3f}–{r.p90_s * 1e3:.3f} | {_fmt(r.gbps, '.1f')} |" for r in roof]
        out.append("")
    step = [r for r in rows if r.section == "step"]
    if step:
        out += ["**Optimizer step** (gradients in place; 28 B/param; ratios are medians of per-round ratios)", "",
                "| threads | params | layout | tensors | variant | median ms | p10–p90 ms | GB/s | × torch fused | of triad |",
                "|---:|---:|---|---:|---|---:|---:|---:|---:|---:|"]
        out += [f"| {r.threads} | {_size(r.numel)} | {r.layout} | {r.n_tensors} | {r.variant} | {r.median_s * 1e3:.3f} | "
                f"{r.p10_s * 1e3:.3f}–{r.p90_s * 1e3:.3f} | {_fmt(r.gbps, '.1f')} | {_fmt(r.ratio_to_torch_fused)} | "
                f"{_fmt(r.frac_of_triad)} |" for r in step]
        out.append("")
    st = [r for r in rows if r.section == "stats"]
    if st:
        k = st[0].micro_batches
        out += [f"**Statistics overhead** (K={k} micro-batch backward() into the leaves + step + zero_grad; "
                "'+ vs step' = (t − t_off) / t of the bare step; 'step() alone' = the optimizer step inside those calls; "
                "'held' = params, grads, optimizer and statistics state)", "",
                "| threads | params | layout | variant | median ms | p10–p90 ms | GB/s | × torch fused | × off | "
                "bytes × off | + vs step | step() alone ms | step() × off | held MiB |",
                "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        out += [f"| {r.threads} | {_size(r.numel)} | {r.layout} | {r.variant} | {r.median_s * 1e3:.3f} | "
                f"{r.p10_s * 1e3:.3f}–{r.p90_s * 1e3:.3f} | {_fmt(r.gbps, '.1f')} | {_fmt(r.ratio_to_torch_fused)} | "
                f"{_fmt(r.ratio_to_off, '.3f')} | {_fmt(r.bytes_ratio_to_off)} | "
                f"{_fmt(None if r.overhead_vs_step is None else 100 * r.overhead_vs_step, '+.1f')}"
                f"{'' if r.overhead_vs_step is None else '%'} | "
                f"{_fmt(None if r.step_phase_s is None else r.step_phase_s * 1e3, '.3f')} | "
                f"{_fmt(r.step_phase_ratio_to_off, '.3f')} | "
                f"{_fmt(None if r.memory_bytes is None else r.memory_bytes / 2**20, '.1f')} |"
                for r in st]
        out.append("")
    nz = [r for r in rows if r.section == "noise"]
    if nz:
        out += ["**In-step noise** (fused step op, gradient-space noise into v, ε generated per element in the kernel; "
                "'× off' = median of per-round ratios to the same backend without noise)", "",
                "| threads | params | layout | tensors | variant | median ms | p10–p90 ms | GB/s | × off | bytes × off |",
                "|---:|---:|---|---:|---|---:|---:|---:|---:|---:|"]
        out += [f"| {r.threads} | {_size(r.numel)} | {r.layout} | {r.n_tensors} | {r.variant} | {r.median_s * 1e3:.3f} | "
                f"{r.p10_s * 1e3:.3f}–{r.p90_s * 1e3:.3f} | {_fmt(r.gbps, '.1f')} | {_fmt(r.ratio_to_off, '.3f')} | "
                f"{_fmt(r.bytes_ratio_to_off)} |" for r in nz]
        out.append("")
    tr = [r for r in rows if r.section == "train"]
    if tr:
        k = tr[0].micro_batches
        out += [f"**Training step** (forward + backward of K={k} micro-batches + step; RegressionTransformer, "
                f"{_size(tr[0].numel)} params in {tr[0].n_tensors} tensors)", "",
                "| threads | variant | median ms | p10–p90 ms | × torch fused | × off |", "|---:|---|---:|---:|---:|---:|"]
        out += [f"| {r.threads} | {r.variant} | {r.median_s * 1e3:.2f} | {r.p10_s * 1e3:.2f}–{r.p90_s * 1e3:.2f} | "
                f"{_fmt(r.ratio_to_torch_fused, '.3f')} | {_fmt(r.ratio_to_off, '.3f')} |" for r in tr]
        pr = [r for r in tr if r.probe_overhead_every100 is not None]
        if pr:
            n = TRAIN_PROBE_NUM_PROBES
            out += ["", f"'+probe' runs a GGN CurvatureProbe measurement ({n} output-space probes, each on its own "
                    f"random ⌈batch/{n}⌉ of a held-out batch of the training batch's size; one vmapped "
                    "forward + backward) on every timed step; at every=100 that adds (t − t_trace)/100 / t_trace = "
                    + ", ".join(f"{100 * r.probe_overhead_every100:+.2f}% ({r.threads} thr)" for r in pr)
                    + " to the training step."]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def section_key(info: dict[str, Any]) -> str:
    return f"{info['device_type']}: {info['device']}"


def markdown_section(rows: list[BenchRow], info: dict[str, Any], command: str | None) -> str:
    """The device-named section of ``benchmarks/RESULTS.md`` for one run (machine, versions, command, tables)."""
    threads = sorted({r.threads for r in rows})
    lines = [
        f"## {info['device_type'].upper()}: {info['device']}", "",
        f"- machine: {info['logical_cpus']} logical CPUs ({info['cpu']}); threads measured: "
        f"{', '.join(map(str, threads))}; {info['platform']}",
        f"- versions: torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, python {info['python']}, "
        f"pnekern {info['pnekern']} at commit `{info['commit']}`; measured {info['time_utc']}",
        "- produced by:", "", "```", command or "pnekern bench", "```", "",
        format_tables(rows).rstrip(), "",
    ]
    return "\n".join(lines)


_MD_HEADER = """# pnekern benchmark results

One section per device, each replaced by the latest `pnekern bench ... --markdown benchmarks/RESULTS.md` run on that
device. Every number comes from the command shown in its section; ratios compare rows of the same run, measured
interleaved. Timings of the Triton interpreter are never reported here.
"""


def update_markdown(path: str, key: str, section: str) -> str:
    """Text of ``path`` with the section for ``key`` replaced (or appended), other devices' sections kept."""
    begin, end = f"<!-- pnekern-bench:begin {key} -->", f"<!-- pnekern-bench:end {key} -->"
    block = f"{begin}\n{section.rstrip()}\n{end}\n"
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        text = _MD_HEADER
    i, j = text.find(begin), text.find(end)
    if i >= 0 and j > i:
        return text[:i] + block + text[j + len(end):].lstrip("\n")
    return text.rstrip("\n") + "\n\n" + block


def plot_scaling(rows: list[BenchRow], path: str) -> str:
    """Log-log step time vs parameter count (one panel per layout) and vs tensor count at the largest size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step = [r for r in rows if r.section == "step"]
    if not step:
        raise BenchError("--plot", "needs the step section (--sections step)")
    threads = max(r.threads for r in step)
    step = [r for r in step if r.threads == threads]
    layouts = list(dict.fromkeys(r.layout for r in step))
    variants = list(dict.fromkeys(r.variant for r in step))
    fig, axes = plt.subplots(1, len(layouts) + 1, figsize=(4.2 * (len(layouts) + 1), 3.8), squeeze=False)
    for ax, layout in zip(axes[0], layouts):
        for v in variants:
            pts = sorted((r.numel, r.median_s * 1e3) for r in step if r.layout == layout and r.variant == v)
            ax.loglog([p[0] for p in pts], [p[1] for p in pts], marker="o", label=v)
        roof = sorted((r.numel, r.median_s * 1e3 * 28 / 16) for r in rows
                      if r.section == "roofline" and r.variant == "triad" and r.threads == threads)
        if roof:
            ax.loglog([p[0] for p in roof], [p[1] for p in roof], "k--", marker="x", label="28 B/param at triad GB/s")
        ax.set_title(f"{layout}")
        ax.set_xlabel("parameters")
        ax.set_ylabel("step time [ms]")
        ax.grid(True, which="both", alpha=0.3)
    ax = axes[0][-1]
    n_max = max(r.numel for r in step)
    for v in variants:
        pts = sorted((r.n_tensors, r.median_s * 1e3) for r in step if r.numel == n_max and r.variant == v)
        ax.loglog([p[0] for p in pts], [p[1] for p in pts], marker="o", label=v)
    ax.set_title(f"{_size(n_max)} params: vs tensor count")
    ax.set_xlabel("tensors")
    ax.set_ylabel("step time [ms]")
    ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"AdamW step, {threads} thread(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
