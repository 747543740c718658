"""Command line: ``pnekern demo | bench | info``."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile


def _parse_size(text: str) -> int:
    t = text.strip().upper()
    mult = 1
    if t.endswith("K"):
        mult, t = 1_000, t[:-1]
    elif t.endswith("M"):
        mult, t = 1_000_000, t[:-1]
    elif t.endswith("G"):
        mult, t = 1_000_000_000, t[:-1]
    try:
        value = int(float(t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes: {text!r} is not a size like 4M or 1000000") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--sizes: {text!r} must be positive")
    return value


def _cmd_info(args: argparse.Namespace) -> int:
    import pnekern

    print(json.dumps(pnekern.build_info(), indent=2, default=str))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from . import bench

    if args.device not in ("cpu", "cuda"):
        print(f"pnekern bench: --device {args.device!r} is not supported (cpu or cuda)", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("pnekern bench: --device cuda requested but torch sees no CUDA device", file=sys.stderr)
        return 2
    for layout in args.layouts:
        if layout not in bench.LAYOUTS:
            print(f"pnekern bench: --layouts {layout!r} unknown; choose from {', '.join(bench.LAYOUTS)}", file=sys.stderr)
            return 2
    # Each variant holds p, g, m, v (+ the roofline buffers); refuse sizes that cannot fit before allocating.
    need = max(args.sizes) * 4 * 8
    if args.device == "cpu":
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    else:
        avail = torch.cuda.mem_get_info()[0]
    if need > 0.8 * avail:
        print(
            f"pnekern bench: {max(args.sizes):,} params need about {need / 2**30:.1f} GiB but only "
            f"{avail / 2**30:.1f} GiB is free on {args.device}; choose smaller --sizes",
            file=sys.stderr,
        )
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = bench.step_benchmark(args.sizes, args.layouts, device=args.device, repeat=args.repeat)
    info = bench.machine_info(args.device)
    print(f"device: {info['device']} | threads {info['threads']} | torch {info['torch']} | commit {info['commit']}")
    print(bench.format_table(rows))
    if args.json:
        # Write atomically so an interrupted run leaves no partial result file.
        directory = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(bench.rows_to_json(rows, info))
        os.replace(tmp, args.json)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out_dir=args.out, steps=args.steps, seed=args.seed)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pnekern", description="Gradient-noise and curvature kernels for PyTorch")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("demo", help="train a small model with pnekern.AdamW and report noise statistics")
    p.add_argument("--out", default="demo_out", help="directory for report.json and plots")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's budget)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_cmd_demo)

    p = sub.add_parser("bench", help="optimizer-step throughput vs torch AdamW and the bandwidth roofline")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", nargs="+", type=_parse_size, default=[4_000_000, 32_000_000])
    p.add_argument("--layouts", nargs="+", default=["flat", "mixed100"])
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the rows and machine info here")
    p.set_defaults(fn=_cmd_bench)

    p = sub.add_parser("info", help="print build_info(): versions, flags and available backends")
    p.set_defaults(fn=_cmd_info)

    args = parser.parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
