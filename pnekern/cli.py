"""Command line: ``pnekern demo | icl train|eval|sweep | bench | info``."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any


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

    if args.steps is not None and args.steps < 1:
        print(f"pnekern demo: --steps must be >= 1, got {args.steps}", file=sys.stderr)
        return 2
    run_demo(out_dir=args.out, steps=args.steps, seed=args.seed, quick=args.quick, progress=not args.quiet)
    return 0


# ---------------------------------------------------------------------------------------------- pnekern icl ...
def _optional(kind: Any) -> Any:
    """argparse type for an Optional field: 'none'/'null' → None, else ``kind(text)``."""

    def parse(text: str) -> Any:
        if text.strip().lower() in ("none", "null"):
            return None
        return kind(text)

    parse.__name__ = f"optional {kind.__name__}"
    return parse


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"amsgrad\": true}'")
    return value


_FIELD_TYPES = {"int": int, "float": float, "str": str, "Optional[int]": _optional(int),
                "Optional[float]": _optional(float), "Optional[str]": _optional(str), "Dict[str, Any]": _json_object}


def _add_run_config_args(p: argparse.ArgumentParser) -> None:
    """``--config FILE`` plus one flag per :class:`pnekern.icl.runs.RunConfig` field (flags override the file)."""
    import dataclasses

    from .icl.runs import RunConfig

    p.add_argument("--config", default=None, help="JSON file of RunConfig fields (flags below override it)")
    defaults = RunConfig()
    for f in dataclasses.fields(RunConfig):
        kind = _FIELD_TYPES[str(f.type)]
        p.add_argument("--" + f.name.replace("_", "-"), dest=f"cfg_{f.name}", type=kind, default=argparse.SUPPRESS,
                       metavar=f.name.upper(), help=f"(default {getattr(defaults, f.name)!r})")


def _run_config(args: argparse.Namespace) -> Any:
    """RunConfig from --config and the flags; raises ValueError naming the bad field."""
    from .icl.runs import RunConfig

    data: dict = {}
    if args.config:
        try:
            with open(args.config) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--config {args.config}: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"--config {args.config}: must hold a JSON object of RunConfig fields")
    for key, value in vars(args).items():
        if key.startswith("cfg_"):
            data[key[4:]] = value
    return RunConfig.from_dict(data)


def _print_eval(evaluation: dict) -> None:
    from .icl.runs import format_error_table

    print("error / d vs k (noiseless target):")
    print(format_error_table(evaluation["errors_vs_k"], evaluation["excess_over_bayes"]))
    s = evaluation["summary"]
    print(f"mean excess over Bayes {s['mean_excess_over_bayes']:.4f}; error/d k=0 {s['model_error_k0']:.4f} → "
          f"k_max−1 {s['model_error_kmax']:.4f} (Bayes {s['bayes_error_kmax']:.4f})")


def _cmd_icl_train(args: argparse.Namespace) -> int:
    from .icl.runs import evaluate_run, train_run, write_run_files

    cfg = _run_config(args)
    outcome = train_run(cfg, progress=not args.quiet)
    evaluation = None if args.no_eval else evaluate_run(outcome.model, outcome.task, cfg)
    files = write_run_files(args.out, outcome, evaluation)
    if evaluation is not None:
        _print_eval(evaluation)
    print(f"final val loss {outcome.result.final_val_loss:.4f} after {outcome.result.updates} updates "
          f"({outcome.result.stop_reason}); wrote {', '.join(sorted(os.path.basename(p) for p in files.values()))} "
          f"to {args.out}")
    return 0


def _cmd_icl_eval(args: argparse.Namespace) -> int:
    from .icl.runs import evaluate_run, load_run, plot_errors_vs_k, write_json

    cfg, model = load_run(args.run_dir)
    changes = {k: v for k, v in (("eval_samples", args.eval_samples), ("eval_seed", args.eval_seed),
                                 ("n_boot", args.n_boot)) if v is not None}
    cfg = cfg.replace(**changes)
    from .icl.runs import build_task

    evaluation = evaluate_run(model, build_task(cfg), cfg)
    path = write_json(os.path.join(args.run_dir, "eval.json"), dict(evaluation, config=cfg.to_dict()))
    plot_errors_vs_k(evaluation["errors_vs_k"], os.path.join(args.run_dir, "errors_vs_k.png"))
    _print_eval(evaluation)
    print(f"wrote {path}")
    return 0


def _cmd_icl_sweep(args: argparse.Namespace) -> int:
    from .icl.runs import run_sweep

    cfg = _run_config(args)
    sweep = run_sweep(cfg, args.out, seeds=args.seeds, batch_sizes=args.batch_sizes, progress=not args.quiet)
    print(f"{'run':>16} {'excess/Bayes':>12} {'val loss':>9} {'P-NE':>10} {'mean T':>10} {'B_simple':>9}")

    def fmt(v: Any, w: int) -> str:
        return f"{'n/a':>{w}}" if v is None else f"{v:>{w}.4g}"

    for r in sweep["runs"]:
        print(f"{r['run']:>16} {fmt(r['mean_excess_over_bayes'], 12)} {fmt(r['final_val_loss'], 9)} "
              f"{fmt(r['pne'], 10)} {fmt(r['mean_temperature'], 10)} {fmt(r['noise_scale'], 9)}")
    if "spearman_excess_vs_pne" in sweep:
        sp = sweep["spearman_excess_vs_pne"]
        print(f"Spearman ρ(excess error, P-NE) = {sp['rho']:.3f} [{sp['ci_low']:.3f}, {sp['ci_high']:.3f}], "
              f"p = {sp['p_value']:.3g}, n = {sp['n']}")
    print(f"wrote {os.path.join(args.out, 'sweep.json')}")
    return 0


def _cmd_icl(args: argparse.Namespace) -> int:
    try:
        return args.icl_fn(args)
    except (ValueError, FileNotFoundError) as e:  # config errors: fail before training, naming the field
        print(f"pnekern icl {args.icl_cmd}: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pnekern", description="Gradient-noise and curvature kernels for PyTorch")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("demo", help="train an in-context regression transformer with pnekern.AdamW statistics, "
                                     "compare it with Bayes/ridge/OLS and report the exposure")
    p.add_argument("--out", default="demo_out", help="directory for report.json, exposure.jsonl and plots")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's 5-minute budget)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run of the same pipeline")
    p.add_argument("--quiet", action="store_true", help="no per-step progress lines")
    p.set_defaults(fn=_cmd_demo)

    p = sub.add_parser("icl", help="synthetic in-context-learning harness: train | eval | sweep")
    icl = p.add_subparsers(dest="icl_cmd", required=True)
    q = icl.add_parser("train", help="train one run (config file and/or flags) and evaluate it vs baselines")
    q.add_argument("--out", required=True, help="run directory (config.json, model.pt, report.json, ...)")
    q.add_argument("--no-eval", action="store_true", help="skip the error-vs-k evaluation")
    q.add_argument("--quiet", action="store_true")
    _add_run_config_args(q)
    q.set_defaults(fn=_cmd_icl, icl_fn=_cmd_icl_train)
    q = icl.add_parser("eval", help="evaluate a trained run directory against the baselines (writes eval.json)")
    q.add_argument("run_dir")
    q.add_argument("--eval-samples", type=int, default=None)
    q.add_argument("--eval-seed", type=int, default=None)
    q.add_argument("--n-boot", type=int, default=None)
    q.set_defaults(fn=_cmd_icl, icl_fn=_cmd_icl_eval)
    q = icl.add_parser("sweep", help="seeds × batch sizes; resumable; writes OUT/sweep.json")
    q.add_argument("--out", required=True, help="sweep directory (one sub-directory per run)")
    q.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    q.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                   help="batch sizes B (default: the config's); each must be a multiple of --micro-batches")
    q.add_argument("--quiet", action="store_true")
    _add_run_config_args(q)
    q.set_defaults(fn=_cmd_icl, icl_fn=_cmd_icl_sweep)

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
