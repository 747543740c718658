"""The benchmark harness (``pnekern bench``, ``pnekern.bench``): it runs, its files have the documented schema, ratios
come from the same run, and bad requests fail with exit code 2 naming the flag. Tiny sizes; no timing assertions."""
from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import fields

import pytest
import torch

from pnekern import bench
from pnekern.cli import main

TINY_TRAIN = ["--train-d", "3", "--train-k-max", "4", "--train-n-layer", "1", "--train-n-head", "1",
              "--train-d-model", "8", "--train-batch", "8"]


# ------------------------------------------------------------------------------------------------ layouts/helpers
@pytest.mark.parametrize("total", [1000, 7919, 65537, 2_000_000])
@pytest.mark.parametrize("layout", bench.LAYOUTS)
def test_layout_sizes_sum_to_total(layout, total):
    sizes = bench.layout_sizes(total, layout)
    assert sum(sizes) == total
    assert all(s >= 1 for s in sizes)
    expected = {"flat": 1, "mixed100": 100, "transformer": 148, "tiny": max(1, total // 3000)}[layout]
    assert len(sizes) == expected


def test_layout_errors_name_the_flag():
    with pytest.raises(bench.BenchError, match="--layouts"):
        bench.layout_sizes(1000, "bogus")
    with pytest.raises(bench.BenchError, match="--sizes"):
        bench.layout_sizes(10, "transformer")


def test_make_layout_is_contiguous_and_deterministic():
    a = bench.make_layout(5000, "mixed100", seed=3)
    b = bench.make_layout(5000, "mixed100", seed=3)
    assert [t.numel() for t in a] == bench.layout_sizes(5000, "mixed100", seed=3)
    assert all(t.is_contiguous() and t.dtype == torch.float32 for t in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_time_interleaved_and_ratios():
    calls = {"a": 0, "b": 0}

    def fa():
        calls["a"] += 1

    def fb():
        calls["b"] += 1

    samples, inner = bench.time_interleaved({"a": fa, "b": fb}, warmup=1, repeat=4, min_sample_s=0.0)
    assert {k: len(v) for k, v in samples.items()} == {"a": 4, "b": 4}
    assert inner == {"a": 1, "b": 1} and calls == {"a": 5, "b": 5}
    assert bench.paired_ratio([2.0, 4.0, 9.0], [1.0, 2.0, 3.0]) == 2.0
    s = bench.summarize([3.0, 1.0, 2.0, 5.0, 4.0])
    assert s["median_s"] == 3.0 and s["min_s"] == 1.0 and s["max_s"] == 5.0 and 1.0 <= s["p10_s"] <= s["p90_s"] <= 5.0


def test_byte_model():
    assert bench.bytes_per_param("step") == 28
    assert bench.bytes_per_param("triad") == 16 and bench.bytes_per_param("copy") == 12
    off, trace, diag = (bench.bytes_per_param("stats", s, 4) for s in ("off", "trace", "diag"))
    assert off == 8 + 12 * 3 + 28 and trace == off + 32 and diag == off + 4 * 16 + 4


def test_update_markdown_replaces_only_its_device(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(bench.update_markdown(str(path), "cuda: H100", "## CUDA: H100\nold gpu\n"))
    path.write_text(bench.update_markdown(str(path), "cpu: X", "## CPU: X\nfirst\n"))
    path.write_text(bench.update_markdown(str(path), "cpu: X", "## CPU: X\nsecond\n"))
    text = path.read_text()
    assert text.count("## CPU: X") == 1 and "second" in text and "first" not in text
    assert "old gpu" in text and text.startswith("# pnekern benchmark results")


def test_cpu_name_keeps_same_named_cpus_apart():
    zen3 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\n\n" \
           "processor\t: 1\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: other\n"
    zen5 = zen3.replace(": 25\n", ": 26\n", 1)
    assert bench._cpu_name(zen3) == "AMD EPYC (family 25, model 1)"  # the first processor's block only
    assert bench._cpu_name(zen5) == "AMD EPYC (family 26, model 1)"
    keys = {bench.section_key({"device_type": "cpu", "device": bench._cpu_name(t)}) for t in (zen3, zen5)}
    assert len(keys) == 2
    assert bench._cpu_name("model name\t: Some CPU\n") == "Some CPU"  # no family/model fields: the name alone


# ------------------------------------------------------------------------------------------------ the CLI end to end
@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["bench", "--sizes", "3000", "--layouts", "flat", "mixed100", "--sections", "step", "stats", "train",
            "--repeat", "3", "--warmup", "1", "--threads", "1", "--quiet",
            "--json", str(out / "r.json"), "--csv", str(out / "r.csv"), "--markdown", str(out / "RESULTS.md"),
            "--plot", str(out / "plots"), *TINY_TRAIN]
    assert main(argv) == 0
    return out, json.loads((out / "r.json").read_text())


def test_cli_json_schema(cli_run):
    _, data = cli_run
    assert data["schema"] == bench.SCHEMA
    for key in ("device_type", "device", "threads", "torch", "triton", "commit", "logical_cpus", "time_utc"):
        assert key in data["machine"]
    assert data["machine"]["device_type"] == "cpu"
    assert data["config"]["sizes"] == [3000] and data["config"]["micro_batches"] == 4
    assert data["command"].startswith("pnekern bench --sizes 3000")
    names = {f.name for f in fields(bench.BenchRow)}
    assert data["rows"] and all(set(r) == names for r in data["rows"])
    sections = {r["section"] for r in data["rows"]}
    assert sections == {"roofline", "step", "stats", "train"}
    step_variants = {r["variant"] for r in data["rows"] if r["section"] == "step"}
    assert step_variants == {"torch_forloop", "torch_foreach", "torch_fused", "pnekern_cpp"}
    stats_variants = {r["variant"] for r in data["rows"] if r["section"] == "stats"}
    assert stats_variants == {"torch_fused", "pnekern_cpp", "pnekern_cpp+trace", "pnekern_cpp+diag"}
    train_variants = {r["variant"] for r in data["rows"] if r["section"] == "train"}
    assert train_variants == stats_variants | {"pnekern_cpp+diag+noise", "pnekern_cpp+trace+probe"}
    assert all(r["threads"] == 1 and len(r["samples_s"]) == 3 and r["repeat"] == 3 for r in data["rows"])
    # Interpreter timings are never produced, even though the test suite sets TRITON_INTERPRET=1.
    assert not any(r["backend"] == "triton" for r in data["rows"])


def _groups(rows):
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault((r["section"], r["threads"], r["numel"], r["layout"]), []).append(r)
    return out


def test_ratios_come_from_the_same_run(cli_run):
    _, data = cli_run
    rows = data["rows"]
    roof = {(r["threads"], r["numel"]): r for r in rows if r["variant"] == "triad"}
    for (section, threads, numel, layout), group in _groups(rows).items():
        by = {r["variant"]: r for r in group}
        for r in group:
            assert r["median_s"] == statistics.median(r["samples_s"])
            if r["bytes_moved"]:
                assert math.isclose(r["gbps"], r["bytes_moved"] / r["median_s"] / 1e9, rel_tol=1e-12)
            if section in ("step", "stats"):
                fused = by["torch_fused"]
                expect = statistics.median(a / b for a, b in zip(r["samples_s"], fused["samples_s"]))
                assert math.isclose(r["ratio_to_torch_fused"], expect, rel_tol=1e-12)
                assert math.isclose(r["frac_of_triad"], r["gbps"] / roof[(threads, numel)]["gbps"], rel_tol=1e-12)
            if section in ("stats", "train") and r["impl"] == "pnekern":
                off = by[f"pnekern_{r['backend']}"]
                expect = statistics.median(a / b for a, b in zip(r["samples_s"], off["samples_s"]))
                assert math.isclose(r["ratio_to_off"], expect, rel_tol=1e-12)
            if section == "stats" and r["impl"] == "pnekern":
                bare = next(s for s in rows if s["section"] == "step" and s["variant"] == f"pnekern_{r['backend']}"
                            and s["layout"] == layout and s["threads"] == threads and s["numel"] == numel)
                off = by[f"pnekern_{r['backend']}"]
                assert math.isclose(r["overhead_vs_step"], (r["median_s"] - off["median_s"]) / bare["median_s"],
                                    rel_tol=1e-9, abs_tol=1e-12)
                assert r["bytes_ratio_to_off"] == r["bytes_moved"] / off["bytes_moved"]
                assert 0 < r["step_phase_s"] < r["max_s"] + 1e-9
                assert math.isclose(r["step_phase_ratio_to_off"], r["step_phase_s"] / off["step_phase_s"], rel_tol=1e-12)
        if section in ("step", "stats", "train") and "torch_fused" in by:
            assert by["torch_fused"]["ratio_to_torch_fused"] == 1.0


def test_cli_csv_markdown_and_plot(cli_run, tmp_path):
    out, data = cli_run
    with open(out / "r.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(data["rows"])
    assert {"device", "torch", "triton", "commit", "median_s", "gbps", "ratio_to_torch_fused"} <= set(table[0])
    md = (out / "RESULTS.md").read_text()
    assert "## CPU:" in md and "pnekern bench --sizes 3000" in md
    for heading in ("Memory-bandwidth roofline", "Optimizer step", "Statistics overhead", "Training step"):
        assert heading in md
    assert (out / "plots" / "bench_scaling_cpu.png").stat().st_size > 1000
    # A second run appends to the CSV (one header) and replaces this device's markdown section.
    assert main(["bench", "--sizes", "2000", "--layouts", "flat", "--sections", "step", "--repeat", "2",
                 "--warmup", "0", "--quiet", "--csv", str(out / "r.csv"), "--markdown", str(out / "RESULTS.md")]) == 0
    text = (out / "r.csv").read_text()
    assert text.count("device,torch,") == 1 and ",2000," in text and ",3000," in text
    md = (out / "RESULTS.md").read_text()
    assert md.count("## CPU:") == 1 and "--sizes 2000" in md and "--sizes 3000" not in md


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--device", "tpu"], "--device"),
        (["--layouts", "bogus"], "--layouts"),
        (["--sections", "everything"], "--sections"),
        (["--torch", "apex"], "--torch"),
        (["--stats", "full"], "--stats"),
        (["--backends", "nope"], "--backends"),
        (["--backends", "triton"], "--backends"),  # interpreter timings are refused on CPU
        (["--micro-batches", "1"], "--micro-batches"),
        (["--repeat", "0"], "--repeat"),
        (["--threads", "0"], "--threads"),
        (["--sizes", "1000G"], "--sizes"),  # does not fit in memory
        (["--sections", "train", "--train-batch", "6"], "--train-batch"),
    ],
)
def test_bad_arguments_exit_2_naming_the_flag(extra, flag, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(["bench", "--sizes", "2000", "--quiet", "--json", str(out), *extra])
    assert code == 2
    err = capsys.readouterr().err
    assert flag in err and err.startswith("pnekern bench:")
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no partial result files


@pytest.mark.parametrize("extra, flag", [(["--sizes", "lots"], "--sizes"), (["--sizes", "-5"], "--sizes"),
                                          (["--repeat", "x"], "--repeat")])
def test_unparseable_arguments_exit_2(extra, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", *extra])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_cuda_request_without_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main(["bench", "--device", "cuda", "--sizes", "2000"]) == 2
    assert "--device" in capsys.readouterr().err


def test_noise_section_pairs_each_variant_with_its_noise_off_row(tmp_path):
    out = tmp_path / "noise.json"
    rc = main(["bench", "--sections", "noise", "--sizes", "2000", "--layouts", "flat", "mixed100", "--repeat", "3",
               "--warmup", "1", "--threads", "1", "--backends", "cpp", "--json", str(out)])
    assert rc == 0
    rows = [r for r in json.loads(out.read_text())["rows"] if r["section"] == "noise"]
    assert {r["variant"] for r in rows} == {f"pnekern_cpp+noise_{k}" for k in bench.NOISE_VARIANTS}
    for layout in ("flat", "mixed100"):
        group = {r["variant"]: r for r in rows if r["layout"] == layout}
        off = group["pnekern_cpp+noise_off"]
        assert off["ratio_to_off"] == 1.0
        for r in group.values():
            want = statistics.median(a / b for a, b in zip(r["samples_s"], off["samples_s"]))
            assert r["ratio_to_off"] == pytest.approx(want)
        assert group["pnekern_cpp+noise_diag"]["bytes_moved"] == 32 * 2000
