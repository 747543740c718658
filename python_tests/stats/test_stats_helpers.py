"""EMA, tail index, κ calibrator and exposure log: unit tests against closed forms and synthetic data."""
from __future__ import annotations

import json
import math

import pytest
import torch

import pnekern
from pnekern.stats import (
    DebiasedEMA, ExposureLog, KappaCalibrator, NoiseScaleEMA, mohammadi_alpha, sample_symmetric_stable,
    standardized_deviations, tail_index,
)
from pnekern.stats.engine import STATE_KEY


# ---------------------------------------------------------------- EMA
def test_debiased_ema_matches_closed_form_and_skips_nonfinite():
    ema = DebiasedEMA(0.9)
    assert ema.value() is None
    xs = [3.0, float("nan"), 1.0, float("inf"), 2.0]
    for x in xs:
        ema.update(torch.tensor(x, dtype=torch.float64))
    finite = [3.0, 1.0, 2.0]
    s = 0.0
    for x in finite:
        s = 0.9 * s + 0.1 * x
    assert float(ema.value()) == pytest.approx(s / (1 - 0.9**3), rel=1e-12)
    # beta = 0: the last finite value
    e0 = DebiasedEMA(0.0)
    for x in xs:
        e0.update(x)
    assert float(e0.value()) == 2.0
    with pytest.raises(ValueError, match="beta"):
        DebiasedEMA(1.0)


def test_noise_scale_ema_divides_last_and_clamps_denominator():
    gns = NoiseScaleEMA(0.5)
    nums, dens = [4.0, 8.0, 6.0], [2.0, 1.0, 3.0]
    for n, d in zip(nums, dens):
        gns.update(torch.tensor(n, dtype=torch.float64), torch.tensor(d, dtype=torch.float64))
    en = DebiasedEMA(0.5)
    ed = DebiasedEMA(0.5)
    for n, d in zip(nums, dens):
        en.update(n)
        ed.update(d)
    assert float(gns.value()) == pytest.approx(float(en.value()) / float(ed.value()), rel=1e-12)
    # ratio of EMAs, not EMA of ratios
    assert float(gns.value()) != pytest.approx(sum(n / d for n, d in zip(nums, dens)) / 3, rel=1e-3)
    assert len(gns.pairs) == 3
    neg = NoiseScaleEMA(0.0)
    neg.update(torch.tensor(5.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64))
    assert float(neg.value()) == math.inf


# ---------------------------------------------------------------- tail index
@pytest.mark.parametrize("alpha", [1.2, 1.6, 2.0])
def test_mohammadi_recovers_stable_index(alpha):
    g = torch.Generator().manual_seed(0)
    x = sample_symmetric_stable(alpha, 200_000, generator=g)
    est = float(mohammadi_alpha(x, generator=g))
    assert abs(est - alpha) < 0.1, est


def test_pooling_unequal_scales_biases_alpha_and_standardizing_fixes_it():
    """SPEC §3 [fix]: Gaussian noise with per-coordinate scales looks heavy-tailed when pooled raw."""
    g = torch.Generator().manual_seed(1)
    n, d = 8, 20_000
    scale = torch.exp(2.0 * torch.randn(d, generator=g))  # scales spanning orders of magnitude
    contrib = torch.randn(n, d, generator=g) * scale
    raw = (contrib - contrib.mean(0)).reshape(-1)
    biased = tail_index(raw, num_boot=0).alpha
    # Scale from independent data (a previous step's contributions), never from the same samples.
    prev = torch.randn(64, d, generator=g) * scale
    z = standardized_deviations(contrib, prev.std(0))
    fixed = tail_index(z, num_boot=50, seed=2)
    assert biased < 1.6, biased
    assert abs(fixed.alpha - 2.0) < 0.12, fixed
    assert fixed.ci_low <= fixed.alpha <= fixed.ci_high


def test_tail_index_bad_input():
    with pytest.raises(ValueError, match="blocks"):
        mohammadi_alpha(torch.randn(5), block=4)
    with pytest.raises(ValueError, match="ci"):
        tail_index(torch.randn(100), ci=1.5)
    with pytest.raises(ValueError, match="contributions"):
        standardized_deviations(torch.randn(1, 5), torch.ones(5))


# ---------------------------------------------------------------- κ calibrator (direct)
@pytest.mark.parametrize("beta,heavy", [(0.9, False), (0.8, True)])
def test_kappa_calibrator_on_momentum_filters(beta, heavy):
    """White noise through EMA momentum (κ = 1) and heavy-ball momentum (κ = 1/(1−β)²), with weight decay."""
    g = torch.Generator().manual_seed(3)
    d, steps, lr, shrink = 2000, 2500, 1e-2, 1.0 - 1e-4
    theta = torch.zeros(d, dtype=torch.float64)
    m = torch.zeros(d, dtype=torch.float64)
    cal = KappaCalibrator(h_min=math.ceil(5 / (1 - beta)), h_max=math.ceil(30 / (1 - beta)))
    for _ in range(steps):
        x = torch.randn(d, generator=g, dtype=torch.float64)
        m = beta * m + x if heavy else beta * m + (1 - beta) * x
        theta = shrink * theta - lr * m
        cal.observe(theta, torch.tensor(lr * lr * d, dtype=torch.float64), shrink)
    est = cal.estimate()
    want = 1 / (1 - beta) ** 2 if heavy else 1.0
    assert abs(est.kappa / want - 1) < 0.1, est
    assert est.num_obs == steps - cal.warmup


def test_kappa_calibrator_handles_gaps_and_errors():
    cal = KappaCalibrator(h_min=2, h_max=8, warmup=0)
    assert math.isnan(cal.estimate().kappa)
    for t in range(0, 60, 2):  # every second step observed (stats_every=2)
        cal.observe(torch.full((3,), float(t)), 1.0, step=t)
    est = cal.estimate()
    assert all(h % 2 == 0 for h in est.lags), est.lags  # odd lags never have a matching snapshot
    with pytest.raises(ValueError, match="step"):
        cal.observe(torch.zeros(3), 1.0, step=10)
    with pytest.raises(ValueError, match="h_min"):
        KappaCalibrator(h_min=5, h_max=5)


# ---------------------------------------------------------------- exposure log
def _trained_opt(steps=7, chunk=3, stats_every=1):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    opt = pnekern.AdamW(model.parameters(), lr=1e-2, stats="trace", batch_size=8, stats_every=stats_every)
    opt.noise_stats.log.chunk = chunk
    for _ in range(steps):
        for _ in range(2):
            x = torch.randn(4, 4)
            model(x).pow(2).mean().div(2).backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_exposure_log_records_match_step_stats_and_chunking():
    opt = _trained_opt()
    log = opt.exposure
    assert len(log) == 7
    last = opt.last_stats().to_dict()
    recs = log.records()
    assert [r["step"] for r in recs] == list(range(1, 8))
    for k in ("temperature", "pne", "trace_noise", "noise_scale"):
        assert recs[-1][k] == pytest.approx(last[k], rel=1e-12)
    # P-NE is the running sum of the per-step diffusion
    assert recs[-1]["pne"] == pytest.approx(sum(r["diffusion"] for r in recs), rel=1e-9)
    assert set(recs[0]["per_param"]) == set(last["per_param"])


def test_per_param_rows_in_the_log_whether_or_not_they_were_touched():
    """Rows nobody wrote to go to the log as the step's table (reading them all below does not change that); rows
    written to, and a mapping whose keys changed, go row by row. Both must decode to the values StepStats gives,
    in parameter order, with the user's edits kept."""
    from pnekern.stats.engine import PER_PARAM_COLUMNS, _PerParamMap

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    opt = pnekern.AdamW(model.parameters(), lr=1e-2, stats="trace")
    opt.noise_stats.log.chunk = 2
    want = []
    for step in range(5):
        for _ in range(3):
            model(torch.randn(4, 3)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        pp = opt.last_stats().per_param
        assert isinstance(pp, _PerParamMap)
        names = list(pp)
        assert len(pp) == len(names) == 4 and names[0] in pp and "nope" not in pp
        if step == 1:
            pp[names[2]]["note"] = "seen"  # a touched row with an extra key
        if step == 3:
            pp["extra"] = {"tag": 1.0}  # a new key: the mapping becomes a plain dict
        if step == 4:
            del pp[names[0]]
        want.append({n: {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in pp[n].items()} for n in pp})
        with pytest.raises(KeyError):
            pp["nope"]
    recs = opt.exposure.records()
    for rec, w in zip(recs, want):
        assert list(rec["per_param"]) == list(w)
        for n, row in w.items():
            got = rec["per_param"][n]
            assert list(got) == list(row), (rec["step"], n)
            for k, v in row.items():
                # the same float64 values, read through another path: equal, not close
                assert got[k] == (pytest.approx(v, rel=0, abs=0, nan_ok=True) if isinstance(v, float) else v), (n, k)
    first = recs[0]["per_param"][names[1]]
    assert list(first) == ["num_contributions", *PER_PARAM_COLUMNS, "lr"]
    assert first["num_contributions"] == 3 and first["lr"] == 1e-2
    assert recs[1]["per_param"][names[2]]["note"] == "seen"


def test_step_stats_to_dict_reads_untouched_rows_from_the_table():
    """to_dict() takes rows nobody wrote to from the step's table in one transfer: the same values, keys and order
    as reading every row; a row written to keeps the written value."""
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = pnekern.AdamW([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 3e-3}],
                        stats="trace", batch_size=8)
    for _ in range(2):
        for _ in range(3):
            model(torch.randn(5, 3)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    s = opt.last_stats()
    fast = s.to_dict()["per_param"]
    want = {n: {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in row.items()}
            for n, row in s.per_param.items()}
    assert list(fast) == list(want)
    for n, row in want.items():
        assert list(fast[n]) == list(row)
        for k, v in row.items():
            assert fast[n][k] == pytest.approx(v, rel=0, abs=0, nan_ok=True), (n, k)
    first = next(iter(s.per_param))
    s.per_param[first]["temperature"] = torch.tensor(123.0)
    again = s.to_dict()["per_param"]
    assert again[first]["temperature"] == 123.0 and list(again) == list(want)
    assert {r["lr"] for r in again.values()} == {1e-3, 3e-3}


def test_exposure_log_held_steps_and_update_last():
    opt = _trained_opt(steps=6, stats_every=3)
    recs = opt.exposure.records()
    assert [r["held"] for r in recs] == [False, True, True, False, True, True]
    assert recs[1]["diffusion"] == recs[0]["diffusion"]
    log = ExposureLog()
    with pytest.raises(RuntimeError, match="empty"):
        log.update_last({"curvature": 1.0})
    log.append({"step": 1, "pne": torch.tensor(2.0)})
    log.update_last({"curvature": torch.tensor(4.0)})
    assert log.records()[0]["curvature"] == 4.0


def test_exposure_log_sinks(tmp_path):
    opt = _trained_opt()
    p = opt.exposure.to_jsonl(tmp_path / "run" / "exposure.jsonl")
    lines = [json.loads(s) for s in open(p)]
    assert len(lines) == 7 and lines[-1]["step"] == 7
    assert "per_param" in lines[0]
    c = opt.exposure.to_csv(tmp_path / "exposure.csv", per_param=True)
    rows = open(c).read().strip().splitlines()
    assert len(rows) == 8
    header = rows[0].split(",")
    assert "temperature" in header and any(h.endswith("/temperature") for h in header)

    class Writer:
        def __init__(self):
            self.calls = []

        def add_scalar(self, tag, value, step):
            self.calls.append((tag, value, step))

    w = Writer()
    opt.exposure.tensorboard = w
    opt.exposure.flush()
    assert ("pnekern/pne", opt.exposure.records()[-1]["pne"], 7) in w.calls
    n = len(w.calls)
    opt.exposure.flush()  # nothing new: nothing written twice
    assert len(w.calls) == n
    summary = opt.exposure.summary()
    assert summary["steps"] == 7 and summary["pne"] == pytest.approx(opt.exposure.records()[-1]["pne"])


def test_exposure_log_plot(tmp_path):
    pytest.importorskip("matplotlib")
    opt = _trained_opt()
    path = opt.exposure.plot(tmp_path / "exposure.png", per_layer=True)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- tail index inside the optimizer
@pytest.mark.parametrize("alpha", [2.0, 1.5])
def test_optimizer_tail_index_on_synthetic_noise(alpha):
    g = torch.Generator().manual_seed(4)
    d, K = 4000, 8
    p = torch.zeros(d, requires_grad=True)
    scale = torch.exp(torch.randn(d, generator=g))  # per-coordinate scales: pooling raw would bias α̂
    opt = pnekern.AdamW([p], lr=1e-4, stats="diag", tail_coords=1000)
    with pytest.raises(RuntimeError, match="samples"):
        opt.tail_index()
    for _ in range(6):
        for _ in range(K):
            p.backward(scale * sample_symmetric_stable(alpha, d, generator=g, dtype=torch.float32))
        opt.step()
        opt.zero_grad()
    res = opt.tail_index(num_boot=50)
    assert res.num_samples == 5 * K * 1000
    assert abs(res.alpha - alpha) < 0.2, res
    with pytest.raises(RuntimeError, match="diag"):
        pnekern.AdamW([torch.zeros(2, requires_grad=True)], stats="trace").tail_index()


def _per_slot_tail_oracle(steps, pool_size):
    """The tail pool a plain per-parameter loop builds: for each measured step and each parameter with n >= 2
    contributions, (x − mean)/sqrt(previous variance)·sqrt(n/(n−1)) over coordinates whose previous variance is > 0,
    row by row; samples appended to a ring one at a time."""
    prev, ring, pos, filled = {}, [0.0] * pool_size, 0, 0
    for contribs in steps:  # {param index: [n, m] float64 samples}
        for i, xs in contribs.items():
            n = xs.shape[0]
            var = xs.var(dim=0, unbiased=True)
            pv = prev.get(i)
            if pv is not None and pv.shape == var.shape:
                keep = pv > 0
                dev = (xs - xs.mean(dim=0, keepdim=True))[:, keep] / pv[keep].sqrt() * math.sqrt(n / (n - 1.0))
                for v in dev.reshape(-1).tolist():
                    ring[pos] = v
                    pos = (pos + 1) % pool_size
                    filled = min(pool_size, filled + 1)
            prev[i] = var
    return torch.tensor(ring, dtype=torch.float64), pos, filled, prev


@pytest.mark.parametrize("pool", [1 << 16, 500])
def test_optimizer_tail_pool_matches_a_per_parameter_loop(pool):
    # Several parameters (one with always-zero coordinates, one missing a step's contributions), grouped and
    # vectorized in the engine, must give the pool a per-parameter loop gives, in the same order; pool=500 wraps
    # the ring within one step.
    g = torch.Generator().manual_seed(9)
    params = [torch.zeros(n, requires_grad=True) for n in (300, 7, 1000, 64)]
    opt = pnekern.AdamW(params, lr=1e-4, stats="diag", tail_coords=400)
    eng = opt.noise_stats
    eng._tail_pool_size = pool  # the engine's tail_pool argument (AdamW keeps the default); nothing pushed yet
    steps = []
    for step in range(5):
        K = 3 if step != 2 else 4
        contribs = {}
        for k in range(K):
            for i, p in enumerate(params):
                if i == 3 and step in (1, 4):
                    continue  # no contribution to this one this step (and in the last: it keeps step 3's variance)
                x = torch.randn(p.numel(), generator=g) * (i + 1)
                if i == 0:
                    x[:50] = 0.0  # zero variance: dropped by the standardization
                p.backward(x)
                contribs.setdefault(i, []).append(x)
        # The oracle's samples come from the contributions themselves on each parameter's fixed subset, not from
        # the engine's capture buffers (a capture that wrote the wrong rows must fail here).
        steps.append({i: torch.stack([x[eng.slots[id(params[i])].tail_idx] for x in xs]).to(torch.float64)
                      for i, xs in contribs.items() if len(xs) >= 2})
        opt.step()
        opt.zero_grad()
    ring, pos, filled, prev = _per_slot_tail_oracle(steps, pool)
    assert eng._tail_filled == filled and eng._tail_pos == pos
    torch.testing.assert_close(eng._tail_pool, ring, rtol=1e-12, atol=0.0)
    # The engine holds the last variances as one tensor; the state_dict must see every parameter's own, including
    # the one that missed a step and so kept an older variance.
    saved = opt.state_dict()[STATE_KEY]["per_param"]
    assert sorted(saved) == sorted(prev)
    for i, pv in prev.items():
        torch.testing.assert_close(saved[i]["tail_prev_var"], pv, rtol=1e-12, atol=0.0)


def test_noise_traces_give_the_same_bits_for_a_shared_and_a_per_tensor_count():
    # finish_step takes the float-count path when every tensor saw the same contributions and the tensor path
    # otherwise; a tensor with the same count must give the same bits, and counts below 2 NaN.
    from pnekern.stats.engine import _noise_traces

    g = torch.Generator().manual_seed(4)
    cols = [torch.rand(37, generator=g, dtype=torch.float64) * 10 ** torch.randint(-6, 6, (37,), generator=g)
            for _ in range(4)]
    for n, w2 in [(2.0, 1.0), (3.0, 1.0), (8.0, 4.0), (7.0, 9.0)]:
        a = _noise_traces(*cols, n, w2)
        b = _noise_traces(*cols, torch.full((37,), n, dtype=torch.float64), w2)
        for x, y in zip(a, b):
            assert torch.equal(x, y)
        # and the textbook form n (S1 − W² |ḡ|²/n) / ((n − 1) W²), to rounding
        s1, s1_a, g2, g2_a = cols
        torch.testing.assert_close(a[0], n * (s1 - w2 * g2 / n) / ((n - 1) * w2), rtol=1e-12, atol=0)
        torch.testing.assert_close(a[1], n * (s1_a - w2 * g2_a / n) / ((n - 1) * w2), rtol=1e-12, atol=0)
    counts = torch.tensor([1.0, 2.0, 0.0, 5.0] * 9 + [3.0], dtype=torch.float64)
    tr, tr_a = _noise_traces(*cols, counts, 1.0)
    assert torch.isnan(tr[counts < 2]).all() and torch.isnan(tr_a[counts < 2]).all()
    assert torch.isfinite(tr[counts >= 2]).all()
    for v in (1.0, 0.0):
        assert all(torch.isnan(t).all() for t in _noise_traces(*cols, v, 1.0))
