"""The research experiment drivers on seconds-long settings: CNR predicted vs realized δf (MLP, SGD+momentum, where
the first-order replay is exact up to second-order terms), and the NAP alignment driver's bookkeeping."""
import math

import pytest
import torch

from pnekern.cnr.experiment import icl_setup, mlp_setup, run_setup
from pnekern.icl import nap_alignment as nap


def test_cnr_mlp_counterfactuals_rank_and_error_scale():
    res = run_setup(mlp_setup(10, opt_name="sgd_momentum"), n_cf=8, scales=(0.25, 1.0), checkpoint_every=4,
                    log=lambda *a: None)
    lo, hi = res["per_scale"]
    assert lo["spearman"] > 0.95 and hi["spearman"] > 0.95
    assert lo["median_rel_error"] < 0.05
    # the residual is the second-order term: it grows ~linearly with the scale of the counterfactual
    assert 2.0 < hi["median_rel_error"] / lo["median_rel_error"] < 8.0
    c = res["cost"]
    assert c["adjoint_hvps"] == 10 and c["recorder_bytes"] > 0 and c["adjoint_s_per_step"] > 0


def test_cnr_icl_setup_runs():
    res = run_setup(icl_setup(4, opt_name="adamw"), n_cf=3, scales=(1.0,), checkpoint_every=2, log=lambda *a: None)
    (e,) = res["per_scale"]
    assert len(e["predicted"]) == len(e["realized"]) == 3 and all(math.isfinite(v) for v in e["predicted"])


def test_nap_alignment_targets_and_misalignment():
    cfg = dict(nap.DEFAULTS)
    pr = nap.prior(cfg)
    torch.testing.assert_close(pr["cov"], (pr["Q"] * pr["lam"]) @ pr["Q"].T)
    assert nap.misalignment("aligned", pr) == pytest.approx(0.0, abs=1e-12)
    mis = [nap.misalignment(c, pr) for c in ("rot30", "rot60", "rot90")]
    assert mis[0] < mis[1] < mis[2]  # rotating the top eigenvector toward the bottom one
    iso = nap.target_for("isotropic", pr)
    assert float(iso["sigma"].sum()) == pytest.approx(float(pr["lam"].sum()))  # same trace as aligned
    with pytest.raises(ValueError):
        nap.target_for("sideways", pr)


def test_nap_alignment_driver_smoke():
    out = nap.run({"steps": 5, "seeds": [0, 1], "conditions": ["none", "aligned", "rot90"], "eval_samples": 256,
                   "n_boot": 20}, log=lambda *a: None)
    assert len(out["runs"]) == 6 and out["spearman_excess_vs_misalignment"]["n"] == 4
    assert all(math.isfinite(r["excess_over_bayes"]) for r in out["runs"])
