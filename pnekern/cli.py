"""Command line: ``pnekern demo | icl train|eval|sweep|similarity | bench | info``."""
from __future__ import annotations

import argparse
import contextlib
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
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 4M or 1000000") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _cmd_info(args: argparse.Namespace) -> int:
    import pnekern

    print(json.dumps(pnekern.build_info(), indent=2, default=str))
    return 0


def _write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so a failed run never leaves a partial file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _bench_command_line(argv: list[str] | None) -> str:
    import shlex

    args = sys.argv[1:] if argv is None else argv
    return "pnekern " + " ".join(shlex.quote(a) for a in args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    cfg = bench.BenchConfig(
        device=args.device, sizes=args.sizes, layouts=args.layouts, sections=args.sections, torch_impls=args.torch,
        backends=args.backends, stats=args.stats, micro_batches=args.micro_batches, threads=args.threads,
        repeat=args.repeat, warmup=args.warmup, seed=args.seed,
        train=bench.TrainModelConfig(d=args.train_d, k_max=args.train_k_max, n_layer=args.train_n_layer,
                                     n_head=args.train_n_head, d_model=args.train_d_model, batch=args.train_batch),
    )
    try:
        bench.validate_config(cfg)
        if args.plot and "step" not in cfg.sections:
            raise bench.BenchError("--plot", "needs the step section (--sections step ...)")
        for flag, path in (("--json", args.json), ("--csv", args.csv), ("--markdown", args.markdown)):
            if path and os.path.isdir(path):
                raise bench.BenchError(flag, f"{path!r} is a directory; give a file path")
        if args.plot and os.path.exists(args.plot) and not os.path.isdir(args.plot):
            raise bench.BenchError("--plot", f"{args.plot!r} exists and is not a directory")
        # Every interleaved group holds all its variants at once; refuse sizes that cannot fit before allocating.
        need, avail = bench.estimate_peak_bytes(cfg), bench.available_memory(cfg.device)
        if need > 0.8 * avail:
            raise bench.BenchError(
                "--sizes", f"{max(cfg.sizes):,} params need about {need / 2**30:.1f} GiB but only {avail / 2**30:.1f} "
                f"GiB is free on {cfg.device}; choose smaller --sizes (or fewer --backends/--stats/--torch variants)")
    except bench.BenchError as e:
        print(f"pnekern bench: {e}", file=sys.stderr)
        return 2
    if args.csv and os.path.exists(args.csv):
        with open(args.csv) as f:
            first = f.readline().strip()
        expected = bench.rows_to_csv([], {}, header=True).strip()
        if first != expected:
            print(f"pnekern bench: --csv {args.csv!r} exists with a different header; choose a new file",
                  file=sys.stderr)
            return 2

    command = _bench_command_line(args.argv)
    progress = None if args.quiet else (lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True))
    rows = bench.run_benchmarks(cfg, progress=progress)
    info = bench.machine_info(cfg.device)
    print(f"{info['device_type']}: {info['device']} | threads {', '.join(str(t) for t in sorted({r.threads for r in rows}))}"
          f" | torch {info['torch']} | triton {info['triton']} | commit {info['commit']}")
    print(bench.format_tables(rows))
    written = []
    if args.json:
        _write_atomic(args.json, bench.result_to_json(rows, info, cfg, command))
        written.append(args.json)
    if args.csv:
        # Appends (header on a new file): one file can collect runs of several machines and commits.
        old = ""
        if os.path.exists(args.csv):
            with open(args.csv) as f:
                old = f.read()
        _write_atomic(args.csv, old + bench.rows_to_csv(rows, info, header=not old))
        written.append(args.csv)
    if args.markdown:
        text = bench.update_markdown(args.markdown, bench.section_key(info), bench.markdown_section(rows, info, command))
        _write_atomic(args.markdown, text)
        written.append(args.markdown)
    if args.plot:
        os.makedirs(args.plot, exist_ok=True)
        name = f"bench_scaling_{info['device_type']}.png"
        written.append(bench.plot_scaling(rows, os.path.join(args.plot, name)))
    if written:
        print(f"wrote {', '.join(written)}")
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
                "Optional[float]": _optional(float), "Optional[str]": _optional(str), "Dict[str, Any]": _json_object,
                "Optional[Dict[str, Any]]": _optional(_json_object)}


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
        data.pop("comment", None)  # free-text note (the configs/ files say how they were run)
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


def _cmd_icl_spec_sweep(args: argparse.Namespace) -> int:
    from .icl.experiments import format_experiment, load_spec, run_experiment

    spec = load_spec(args.spec)
    if args.seeds_given:
        spec.seeds = list(args.seeds)
        spec.validate()
    result = run_experiment(spec, args.out, progress=not args.quiet,
                            log=(lambda msg: None) if args.quiet else print)
    print(format_experiment(result))
    print(f"wrote {os.path.join(args.out, f'experiment_{spec.name}.json')}" +
          (f", {result['figure']}" if result.get("figure") else ""))
    return 0


def _cmd_icl_similarity(args: argparse.Namespace) -> int:
    from .icl.similarity_experiment import format_similarity, run_similarity

    out = run_similarity(args.config_file, args.out, log=(lambda msg: None) if args.quiet else print)
    print(format_similarity(out))
    print(f"wrote {', '.join(out['files'].values())}")
    return 0


def _cmd_icl_run(args: argparse.Namespace) -> int:
    if args.config is not None:
        raise ValueError("give the config once: `pnekern icl run CONFIG` (or `icl train --config CONFIG`)")
    args.config = args.run_config
    return _cmd_icl_train(args)


def _cmd_icl_sweep(args: argparse.Namespace) -> int:
    from .icl.runs import run_sweep

    if args.spec_file is not None:
        if args.spec is not None:
            raise ValueError("give the spec once: `pnekern icl sweep CONFIG` or `--spec CONFIG`, not both")
        args.spec = args.spec_file

    if args.spec:
        flags = [k[4:] for k in vars(args) if k.startswith("cfg_")]
        if args.config or flags or args.batch_sizes:
            raise ValueError("--spec holds the whole experiment; do not combine it with --config, --batch-sizes or "
                             f"RunConfig flags ({', '.join('--' + f.replace('_', '-') for f in flags)})")
        return _cmd_icl_spec_sweep(args)
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
    if getattr(args, "icl_cmd", None) == "sweep":
        args.seeds_given = args.seeds is not None
        if args.seeds is None:
            args.seeds = [0, 1, 2]
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

    p = sub.add_parser("icl", help="synthetic in-context-learning harness: run | train | eval (report) | sweep | similarity")
    icl = p.add_subparsers(dest="icl_cmd", required=True)
    q = icl.add_parser("train", help="train one run (config file and/or flags) and evaluate it vs baselines")
    q.add_argument("--out", required=True, help="run directory (config.json, model.pt, report.json, ...)")
    q.add_argument("--no-eval", action="store_true", help="skip the error-vs-k evaluation")
    q.add_argument("--quiet", action="store_true")
    _add_run_config_args(q)
    q.set_defaults(fn=_cmd_icl, icl_fn=_cmd_icl_train)
    q = icl.add_parser("run", help="train and evaluate the run a config file describes: `icl run CONFIG --out DIR` "
                                   "(= icl train --config CONFIG)")
    q.add_argument("run_config", metavar="CONFIG", help="RunConfig JSON (e.g. configs/demo_long.json)")
    q.add_argument("--out", required=True, help="run directory (config.json, model.pt, report.json, ...)")
    q.add_argument("--no-eval", action="store_true", help="skip the error-vs-k evaluation")
    q.add_argument("--quiet", action="store_true")
    _add_run_config_args(q)
    q.set_defaults(fn=_cmd_icl, icl_fn=_cmd_icl_run)
    q = icl.add_parser("eval", aliases=["report"],
                       help="evaluate a trained run directory against the baselines (writes eval.json and "
                            "errors_vs_k.png); `report` is the same command")
    q.add_argument("run_dir")
    q.add_argument("--eval-samples", type=int, default=None)
    q.add_argument("--eval-seed", type=int, default=None)
    q.add_argument("--n-boot", type=int, default=None)
    q.set_defaults(fn=_cmd_icl, icl_fn=_cmd_icl_eval)
    q = icl.add_parser("sweep", help="seeds × batch sizes, or an experiment spec (--spec configs/*.json) of named "
                                     "conditions with Spearman/TOST/Holm; resumable; writes OUT/sweep.json or "
                                     "OUT/experiment_<name>.json")
    q.add_argument("spec_file", metavar="CONFIG", nargs="?", default=None,
                   help="experiment spec JSON, as --spec (`pnekern icl sweep configs/icl_batch_size.json --out D`)")
    q.add_argument("--out", required=True, help="sweep directory (one sub-directory per run)")
    q.add_argument("--spec", default=None,
                   help="experiment spec JSON (base RunConfig + named conditions + seeds + tests), e.g. "
                        "configs/icl_batch_size.json; prints per-condition means, Spearman ρ vs P-NE, TOST")
    q.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="seeds (default 0 1 2; with --spec: overrides the spec's seeds)")
    q.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                   help="batch sizes B (default: the config's); each must be a multiple of --micro-batches")
    q.add_argument("--quiet", action="store_true")
    _add_run_config_args(q)
    q.set_defaults(fn=_cmd_icl, icl_fn=_cmd_icl_sweep)
    q = icl.add_parser("similarity", help="ZS/ICL/FT and layer-causal FT: SimAOU/SimAM/SimAMΔ per layer with "
                                          "random-update and untrained-model controls (table, JSON, plot)")
    q.add_argument("config_file", metavar="CONFIG", help="JSON: task, model, train, similarity sections")
    q.add_argument("--out", default="similarity_out", help="directory for similarity.json and similarity.png")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(fn=_cmd_icl, icl_fn=_cmd_icl_similarity)

    p = sub.add_parser(
        "bench", help="optimizer-step throughput vs torch AdamW and the bandwidth roofline; statistics overhead; "
                      "training-step overhead",
        description="Interleaved timings of torch AdamW (for-loop/foreach/fused) and pnekern.AdamW backends with "
                    "copy/triad rooflines, statistics overhead and a full training step. Ratios compare rows of the "
                    "same run.")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--sizes", nargs="+", type=_parse_size, default=[4_000_000, 32_000_000],
                   help="total parameters per layout, e.g. 1M 4M 32M (default 4M 32M)")
    p.add_argument("--layouts", nargs="+", default=["flat", "mixed100", "transformer"],
                   help="flat | mixed100 | transformer | tiny (default flat mixed100 transformer)")
    p.add_argument("--sections", nargs="+", default=["step", "stats"],
                   help="step | stats | train | noise (default step stats)")
    p.add_argument("--torch", nargs="+", default=["forloop", "foreach", "fused"],
                   help="torch.optim.AdamW variants: forloop foreach fused (default all)")
    p.add_argument("--backends", nargs="+", default=None,
                   help="pnekern backends: cpp triton cuda reference (default: the fast ones available on the device)")
    p.add_argument("--stats", nargs="+", default=["off", "trace", "diag"],
                   help="statistics modes for the stats/train sections: off trace diag lowrank (default off trace diag)")
    p.add_argument("--micro-batches", type=int, default=4, help="K backward calls per step (stats/train; default 4)")
    p.add_argument("--threads", nargs="+", type=int, default=None,
                   help="CPU thread counts to measure one after another (default: torch's current setting)")
    p.add_argument("--repeat", type=int, default=15, help="timed samples per variant (default 15)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per variant first (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-d", type=int, default=20, help="training step: input dimension d (default 20)")
    p.add_argument("--train-k-max", type=int, default=40, help="training step: examples per context (default 40)")
    p.add_argument("--train-n-layer", type=int, default=4, help="training step: layers (default 4)")
    p.add_argument("--train-n-head", type=int, default=4, help="training step: heads (default 4)")
    p.add_argument("--train-d-model", type=int, default=256, help="training step: width (default 256)")
    p.add_argument("--train-batch", type=int, default=64, help="training step: tasks per step, all micro-batches")
    p.add_argument("--json", default=None, help="write machine info, config and every row (with samples) here")
    p.add_argument("--csv", default=None, help="append the rows (with device, versions, commit) to this CSV")
    p.add_argument("--markdown", default=None,
                   help="replace this device's section of a results file, e.g. benchmarks/RESULTS.md")
    p.add_argument("--plot", default=None, help="directory for the log-log scaling PNG (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(fn=_cmd_bench)

    p = sub.add_parser("info", help="print build_info(): versions, flags and available backends")
    p.set_defaults(fn=_cmd_info)

    args = parser.parse_args(argv)
    args.argv = argv
    return int(args.fn(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
