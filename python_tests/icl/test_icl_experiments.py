"""Experiment specs (configs/*.json), the RunConfig ``noise`` field, ``pnekern icl sweep --spec`` and
``pnekern icl similarity`` on tiny configs."""
import glob
import json
import math
import os

import pytest

from pnekern.cli import main
from pnekern.icl.experiments import ExperimentSpec, analyze_experiment, load_spec
from pnekern.icl.runs import RunConfig, build_noise_config
from pnekern.icl.similarity_experiment import load_similarity_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_BASE = dict(d=2, k_max=4, n_layer=1, n_head=1, d_model=8, steps=6, batch_size=8, micro_batches=2,
                 log_every=3, probe_every=0, eval_samples=64, n_boot=20, threads=1, stats="diag")


def test_noise_field_builds_a_noise_config():
    cfg = RunConfig(**{**TINY_BASE, "noise": {"emulate_batch_size": 4}})
    nc = build_noise_config(cfg)
    assert nc.emulate_batch_size == 4 and nc.seed == cfg.seed and nc.space == "gradient"
    cfg = RunConfig(**{**TINY_BASE, "steps": 100,
                       "noise": {"schedule": {"kind": "concentrated", "where": "late", "mean": 0.5, "fraction": 0.25}}})
    early = build_noise_config(cfg.replace(noise={"schedule": {"kind": "concentrated", "where": "early",
                                                               "mean": 0.5, "fraction": 0.25}}))
    late = build_noise_config(cfg)
    assert late.schedule(1) == 0.0 and late.schedule(100) == pytest.approx(2.0)
    assert early.schedule(1) == pytest.approx(2.0) and early.schedule(100) == 0.0
    assert math.isclose(early.schedule.integral(1, 100), late.schedule.integral(1, 100))  # equal exposure
    assert build_noise_config(RunConfig(**TINY_BASE)) is None


@pytest.mark.parametrize("noise, match", [
    ({"emulate_batch_size": 4, "bogus": 1}, "unknown key"),
    ({"emulate_batch_size": 16}, "must be <= batch_size"),
    ({"schedule": {"kind": "wiggle"}}, "kind"),
    ({"target": {"diag": 1.0}}, "isotropic"),
    ({"space": "weights", "target": {"isotropic": 1.0}, "additive": True}, "space"),
])
def test_noise_field_errors_name_the_key(noise, match):
    with pytest.raises(ValueError, match=match):
        RunConfig(**{**TINY_BASE, "noise": noise}).validate()


def test_emulate_batch_needs_diag_statistics():
    with pytest.raises(ValueError, match="stats"):
        RunConfig(**{**TINY_BASE, "stats": "trace", "noise": {"emulate_batch_size": 4}}).validate()


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "icl_*.json"))))
def test_shipped_experiment_specs_validate(path):
    spec = load_spec(path)  # validates every condition's RunConfig
    assert len(spec.conditions) >= 2 and spec.seeds


def test_spec_validation_errors():
    good = {"name": "x", "base": TINY_BASE, "seeds": [0, 1], "conditions": [{"name": "a"}, {"name": "b"}]}
    ExperimentSpec.from_dict(good)
    with pytest.raises(ValueError, match="unique"):
        ExperimentSpec.from_dict({**good, "conditions": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(ValueError, match="unknown condition"):
        ExperimentSpec.from_dict({**good, "tost": [{"a": "a", "b": "zz", "margin": 0.1}]})
    with pytest.raises(ValueError, match="condition 'b'"):
        ExperimentSpec.from_dict({**good, "conditions": [{"name": "a"}, {"name": "b", "batch_size": 7}]})
    with pytest.raises(ValueError, match="metric"):
        ExperimentSpec.from_dict({**good, "metrics": ["accuracy"]})


def test_analysis_statistics_on_synthetic_rows():
    spec = ExperimentSpec.from_dict({"name": "x", "base": TINY_BASE, "seeds": [0, 1, 2],
                                     "conditions": [{"name": "a"}, {"name": "b"}], "n_boot": 50,
                                     "tost": [{"a": "a", "b": "b", "margin": 0.5}]})
    rows = []
    for i, (c, v) in enumerate([("a", 1.0), ("a", 1.1), ("a", 0.9), ("b", 1.05), ("b", 0.95), ("b", 1.0)]):
        rows.append({"condition": c, "seed": i % 3, "pne": float(i + 1), "mean_excess_over_bayes": float(i),
                     "icl_gain": -float(i), "late_excess_over_bayes": v, "model_error_kmax": v,
                     "final_val_loss": v, "updates": 6, "examples": 48, "pne_injected": 0.0,
                     "mean_temperature": 1.0})
    a = analyze_experiment(rows, spec)
    sp = {s["metric"]: s for s in a["spearman_vs_pne"]}
    assert sp["mean_excess_over_bayes"]["rho"] == pytest.approx(1.0)
    assert sp["icl_gain"]["rho"] == pytest.approx(-1.0)
    assert all(s["p_holm"] >= s["p_value"] for s in a["spearman_vs_pne"])
    (t,) = a["tost"]
    assert t["diff"] == pytest.approx(-3.0) and not t["equivalent_holm"]  # mean(0,1,2) − mean(3,4,5)


def test_sweep_spec_runs_end_to_end_and_resumes(tmp_path, capsys):
    spec = {"name": "tiny", "base": TINY_BASE, "seeds": [0, 1], "n_boot": 20,
            "conditions": [{"name": "B8", "x": 8}, {"name": "inj4", "x": 4, "noise": {"emulate_batch_size": 4}}],
            "tost": [{"a": "B8", "b": "inj4", "margin": 1.0}]}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    out = tmp_path / "out"
    assert main(["icl", "sweep", "--spec", str(path), "--out", str(out), "--quiet"]) == 0
    result = json.loads((out / "experiment_tiny.json").read_text())
    assert len(result["runs"]) == 4
    inj = [r for r in result["runs"] if r["condition"] == "inj4"]
    real = [r for r in result["runs"] if r["condition"] == "B8"]
    assert all(r["pne_injected"] > 0 for r in inj) and all(r["pne_injected"] == 0 for r in real)
    assert result["analysis"]["spearman_vs_pne"] and result["analysis"]["tost"]
    text = capsys.readouterr().out
    assert "Spearman" in text and "TOST B8 vs inj4" in text
    mtime = os.path.getmtime(out / "B8_seed0" / "report.json")
    assert main(["icl", "sweep", "--spec", str(path), "--out", str(out), "--quiet"]) == 0  # resumes: no retraining
    assert os.path.getmtime(out / "B8_seed0" / "report.json") == mtime
    assert main(["icl", "sweep", "--spec", str(path), "--out", str(out), "--steps", "3"]) == 2  # --spec is whole


def test_similarity_cli_tiny(tmp_path, capsys):
    cfg = {"task": {"name": "induction", "vocab_size": 6, "prefix_len": 3},
           "model": {"n_layer": 2, "n_head": 2, "d_model": 8},
           "train": {"steps": 3, "batch_size": 8},
           "similarity": {"prompts": 2, "query_len": 2}}
    path = tmp_path / "sim.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "sim"
    assert main(["icl", "similarity", str(path), "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "SimAOU" in text and "untrained" in text and "layer_causal_ft" in text
    res = json.loads((out / "similarity.json").read_text())
    for model in ("trained", "untrained"):
        for method in ("ft", "layer_causal_ft", "random"):
            entry = res["results"][model][method]
            for metric in ("sim_aou", "sim_am", "sim_am_delta"):
                assert len(entry[metric]) == 2
                assert all(v is None or -1 - 1e-9 <= v <= 1 + 1e-9 for v in entry[metric])
    try:
        import matplotlib  # noqa: F401
        assert (out / "similarity.png").stat().st_size > 0
    except ImportError:
        pass
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**cfg, "similarity": {"query_len": 6}}))
    assert main(["icl", "similarity", str(bad), "--out", str(out)]) == 2
    with pytest.raises(ValueError, match="unknown key"):
        load_similarity_config({**cfg, "model": {"width": 3}})


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "similarity_*.json"))))
def test_shipped_similarity_configs_validate(path):
    load_similarity_config(path)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "demo_*.json"))))
def test_shipped_run_configs_validate(path):
    with open(path) as f:
        data = json.load(f)
    assert "comment" in data  # how it was run and what it is for
    data.pop("comment")
    RunConfig.from_dict(data)
