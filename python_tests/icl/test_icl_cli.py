"""`pnekern demo` and `pnekern icl train|eval|sweep` through cli.main (small configs, temporary directories)."""
import json
import os

import pytest

from pnekern.cli import main
from pnekern.icl.runs import RunConfig

try:
    import matplotlib  # noqa: F401
    HAVE_MPL = True
except ImportError:
    HAVE_MPL = False

TINY = ["--d", "2", "--k-max", "4", "--n-layer", "1", "--n-head", "1", "--d-model", "8", "--steps", "6",
        "--batch-size", "8", "--micro-batches", "2", "--log-every", "3", "--probe-every", "3", "--probe-batch", "16",
        "--eval-samples", "64", "--n-boot", "20", "--threads", "1", "--quiet"]


def test_demo_quick_writes_a_complete_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--quiet", "--out", str(out), "--seed", "3"]) == 0
    report = json.loads((out / "report.json").read_text())
    cfg = report["config"]
    assert cfg["seed"] == 3 and cfg["micro_batches"] >= 2 and cfg["stats"] == "trace"
    errs = report["errors_vs_k"]
    K = cfg["k_max"]
    assert errs["k"] == list(range(K))
    for name in ("model", "bayes", "ridge", "ols"):
        assert len(errs[name]) == K and all(v is None or v >= 0 for v in errs[name]), name
        ci = errs["ci"][name]
        assert all(lo <= m <= hi for lo, m, hi in zip(ci["low"], errs[name], ci["high"])), name
    assert errs["target"] == "clean" and errs["normalized_by_d"] is True
    # every baseline predicts 0 without context: identical k = 0 column on the same sequences
    assert errs["bayes"][0] == errs["ols"][0] == errs["ridge"][0]
    # Bayes is the best predictor on average (Monte Carlo on 256 sequences; allow a little slack at each k)
    assert sum(errs["bayes"]) <= sum(errs["ols"]) and sum(errs["bayes"]) <= sum(errs["model"])
    assert len(report["excess_over_bayes"]["mean"]) == K
    assert report["final_loss"]["val"] > 0 and report["training"]["updates"] == cfg["steps"]
    exp = report["exposure"]
    for key in ("pne", "mean_temperature", "noise_scale"):
        assert key in exp
    assert exp["pne"] is not None and exp["pne"] > 0 and exp["mean_temperature"] > 0
    assert report["curvature_probe"]["status"] in ("attached", "unavailable")
    if report["curvature_probe"]["status"] == "attached":
        assert exp["curvature_measurements"] and "pne_star" in exp
    lines = (out / "exposure.jsonl").read_text().splitlines()
    assert len(lines) == cfg["steps"]
    assert json.loads(lines[-1])["step"] == cfg["steps"]
    for name in ("config.json", "model.pt"):
        assert (out / name).exists()
    if HAVE_MPL:
        assert (out / "errors_vs_k.png").stat().st_size > 0 and (out / "exposure.png").stat().st_size > 0
    text = capsys.readouterr().out
    assert "excess/Bayes" in text and "P-NE" in text


def test_icl_train_then_eval(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["icl", "train", "--out", str(run), "--seed", "1", *TINY]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["config"]["d"] == 2 and report["training"]["updates"] == 6
    assert len(report["errors_vs_k"]["model"]) == 4
    assert main(["icl", "eval", str(run), "--eval-samples", "32", "--n-boot", "10"]) == 0
    ev = json.loads((run / "eval.json").read_text())
    assert ev["errors_vs_k"]["n_samples"] == 32 and ev["config"]["seed"] == 1
    # evaluation reads the saved weights: same sequences and n_samples give the same model curve
    assert main(["icl", "eval", str(run), "--eval-samples", "64", "--n-boot", "20"]) == 0
    ev2 = json.loads((run / "eval.json").read_text())
    assert ev2["errors_vs_k"]["model"] == pytest.approx(report["errors_vs_k"]["model"], rel=1e-6)


def test_icl_config_file_and_flag_override(tmp_path):
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps({"d": 3, "k_max": 5, "noise_var": 0.2}))
    run = tmp_path / "run"
    assert main(["icl", "train", "--config", str(cfg_path), "--out", str(run), "--no-eval", *TINY[4:],
                 "--probe-every", "0"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["d"] == 3 and cfg["k_max"] == 5 and cfg["noise_var"] == 0.2 and cfg["steps"] == 6


@pytest.mark.parametrize("flags,field", [
    (["--micro-batches", "3"], "micro_batches"),  # batch 8 is not a multiple of 3
    (["--micro-batches", "1", "--batch-size", "8"], "micro_batches"),  # stats need >= 2 contributions
    (["--d-model", "10", "--n-head", "3"], "n_head"),
    (["--noise-var", "-1"], "noise_var"),
    (["--token-format", "bogus"], "token_format"),
    (["--optimizer-kwargs", '{"no_such_option": 1}'], "optimizer_kwargs"),
])
def test_icl_config_errors_fail_before_training(tmp_path, capsys, flags, field):
    run = tmp_path / "run"
    assert main(["icl", "train", "--out", str(run), *TINY, *flags]) == 2
    assert field in capsys.readouterr().err
    assert not (run / "report.json").exists()


def test_unknown_config_file_field(tmp_path, capsys):
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps({"d": 3, "kmax": 5}))
    assert main(["icl", "train", "--config", str(cfg_path), "--out", str(tmp_path / "r")]) == 2
    assert "kmax" in capsys.readouterr().err
    with pytest.raises(ValueError, match="k_max"):
        RunConfig(k_max=0).validate()


def test_icl_sweep_resumes_without_redoing_runs(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["icl", "sweep", "--out", str(out), "--seeds", "0", "1", "--batch-sizes", "4", "8", *TINY,
            "--probe-every", "0"]
    assert main(args) == 0
    sweep = json.loads((out / "sweep.json").read_text())
    assert [r["run"] for r in sweep["runs"]] == ["bs4_seed0", "bs4_seed1", "bs8_seed0", "bs8_seed1"]
    assert "spearman_excess_vs_pne" in sweep
    assert all(r["pne"] is not None for r in sweep["runs"])
    # simulate an interrupted sweep: one run lost its report; a rerun redoes only that one
    os.remove(out / "bs8_seed1" / "report.json")
    mtime = (out / "bs4_seed0" / "report.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    text = capsys.readouterr().out
    assert text.count("done already") == 3 and "bs8_seed1: training" in text
    assert (out / "bs4_seed0" / "report.json").stat().st_mtime_ns == mtime
    assert json.loads((out / "sweep.json").read_text())["runs"][3]["run"] == "bs8_seed1"


def test_icl_run_config_and_report_alias(tmp_path, capsys):
    """`pnekern icl run CONFIG` trains what the file says; `icl report RUN_DIR` is `icl eval`; a second config errors."""
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps({"d": 3, "k_max": 5, "seed": 4}))
    run = tmp_path / "run"
    assert main(["icl", "run", str(cfg_path), "--out", str(run), *TINY[4:]]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["d"] == 3 and cfg["k_max"] == 5 and cfg["seed"] == 4
    assert main(["icl", "report", str(run), "--eval-samples", "32", "--n-boot", "10"]) == 0
    assert json.loads((run / "eval.json").read_text())["errors_vs_k"]["n_samples"] == 32
    assert main(["icl", "run", str(cfg_path), "--config", str(cfg_path), "--out", str(tmp_path / "b"),
                 *TINY[4:]]) == 2
    assert "config once" in capsys.readouterr().err


def test_icl_sweep_spec_given_twice_is_an_error(tmp_path, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text("{}")
    assert main(["icl", "sweep", str(spec), "--spec", str(spec), "--out", str(tmp_path / "s")]) == 2
    assert "spec once" in capsys.readouterr().err
