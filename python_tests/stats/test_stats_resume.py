"""Checkpoints and copies of an optimizer with statistics: state_dict resumes bitwise, deepcopy/pickle re-hook."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import pnekern
from pnekern.noise import NoiseConfig, lowrank
from pnekern.stats import KappaCalibrator
from pnekern.stats.engine import STATE_KEY

MODES = ["trace", "diag", "lowrank"]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))


def _drive(model, opt, first: int, steps: int, K: int = 3):
    out = []
    for t in range(first, first + steps):
        g = torch.Generator().manual_seed(1000 + t)
        for _ in range(K):
            x = torch.randn(4, 3, generator=g)
            (model(x).pow(2).mean() / K).backward()
        opt.step()
        opt.zero_grad()
        out.append(opt.last_stats().to_dict())
    return out


def _roundtrip(sd):
    # Through torch.save / torch.load(weights_only=True): the engine state holds only plain types and tensors.
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "extra", [{}, {"stats_every": 2}, {"kappa": "calibrated", "bias_corrected": True, "calibration_every": 3}],
    ids=["plain", "stats_every", "calibrated"],
)
def test_state_dict_resumes_statistics_bitwise(mode, extra):
    kw = dict(lr=1e-2, stats=mode, batch_size=12, stats_rank=2, **extra)

    def make(params):
        o = pnekern.AdamW(params, **kw)
        if o.noise_stats.calibrator is not None:  # short lags so that κ̂ is fitted within the test
            o.noise_stats.calibrator = KappaCalibrator(h_min=1, h_max=4, num_lags=4, warmup=0)
        return o

    model = _model()
    opt = make(model.parameters())
    _drive(model, opt, 0, 7)
    sd = _roundtrip(opt.state_dict())
    assert sd[STATE_KEY]["step_count"] == 7
    msd = copy.deepcopy(model.state_dict())
    tail = _drive(model, opt, 7, 8)
    model2 = _model()
    model2.load_state_dict(msd)
    opt2 = make(model2.parameters())
    opt2.load_state_dict(sd)
    tail2 = _drive(model2, opt2, 7, 8)
    # Every field of every step, per-parameter entries included (NaN-safe comparison through repr).
    assert repr(tail) == repr(tail2)
    assert repr(opt.exposure.records()[-8:]) == repr(opt2.exposure.records())
    if mode != "trace":
        assert torch.equal(opt.noise_stats._tail_pool, opt2.noise_stats._tail_pool)
    if extra.get("kappa") == "calibrated":
        a, b = opt.noise_stats.calibrator.state_dict(), opt2.noise_stats.calibrator.state_dict()
        assert a["num_obs"] == b["num_obs"] == 15
        assert opt2.noise_stats.calibrated_kappa is not None
        assert opt.noise_stats.calibrated_kappa == opt2.noise_stats.calibrated_kappa
        assert torch.equal(a["ring"], b["ring"]) and torch.equal(a["msd_sum"], b["msd_sum"])


def test_loading_does_not_alias_the_source_optimizer():
    model = _model()
    opt = pnekern.AdamW(model.parameters(), stats="diag", batch_size=12)
    _drive(model, opt, 0, 3)
    model2 = copy.deepcopy(model)
    opt2 = pnekern.AdamW(model2.parameters(), stats="diag", batch_size=12)
    opt2.load_state_dict(opt.state_dict())  # a live state_dict, not a copy
    pool = opt.noise_stats._tail_pool.clone()
    _drive(model2, opt2, 3, 2)
    assert torch.equal(opt.noise_stats._tail_pool, pool)
    assert opt.noise_stats.step_count == 3 and opt2.noise_stats.step_count == 5


def test_checkpoints_interchange_with_torch_adamw():
    model = _model()
    opt = pnekern.AdamW(model.parameters(), lr=1e-2, stats="trace", batch_size=12)
    _drive(model, opt, 0, 3)
    sd = opt.state_dict()
    plain = torch.optim.AdamW(copy.deepcopy(model).parameters(), lr=1e-2)
    plain.load_state_dict(sd)  # the extra key does not bother torch
    assert STATE_KEY in sd, "loading must not consume the caller's dict"
    # A torch checkpoint (no engine state) loads and leaves the statistics as they were.
    ours = pnekern.AdamW(model.parameters(), lr=1e-2, stats="trace", batch_size=12)
    ours.load_state_dict(plain.state_dict())
    assert ours.noise_stats.step_count == 0
    assert len(ours._optimizer_state_dict_post_hooks) == 0
    _drive(model, ours, 3, 2)
    assert ours.last_stats().step == 2


@pytest.mark.filterwarnings("ignore:pnekern noise")
def test_noise_lowrank_target_resumes_bitwise():
    d = 8
    torch.manual_seed(3)
    u = torch.linalg.qr(torch.randn(d, 2))[0]
    cfg = NoiseConfig(target=lowrank([(u, torch.tensor([0.5, 0.2]), 0.01)]), seed=11)
    beta = torch.linspace(-1.0, 1.0, d)

    def drive(w, opt, first, steps):
        out = []
        for t in range(first, first + steps):
            g = torch.Generator().manual_seed(t)
            x = torch.randn(16, d, generator=g)
            y = x @ beta + torch.randn(16, generator=g)
            opt.zero_grad()
            for xs, ys in zip(x.chunk(4), y.chunk(4)):
                (0.5 * ((xs @ w - ys) ** 2).mean() / 4).backward()
            opt.step()
            out.append(opt.last_stats().to_dict())
        return out

    w = nn.Parameter(beta.clone())
    opt = pnekern.AdamW([w], lr=1e-3, stats="lowrank", stats_rank=3, batch_size=16, noise=cfg)
    drive(w, opt, 0, 5)
    saved_w, sd = w.detach().clone(), copy.deepcopy(opt.state_dict())
    tail = drive(w, opt, 5, 6)
    w2 = nn.Parameter(saved_w)
    opt2 = pnekern.AdamW([w2], lr=1e-3, stats="lowrank", stats_rank=3, batch_size=16, noise=cfg)
    opt2.load_state_dict(sd)
    tail2 = drive(w2, opt2, 5, 6)
    assert torch.equal(w, w2)
    assert repr(tail) == repr(tail2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_captures_its_own_model(mode, how):
    model = _model()
    opt = pnekern.AdamW(model.parameters(), lr=1e-2, stats=mode, batch_size=12, stats_rank=2)
    _drive(model, opt, 0, 2)
    pair = (model, opt)
    model2, opt2 = copy.deepcopy(pair) if how == "deepcopy" else pickle.loads(pickle.dumps(pair))
    assert opt2.param_groups[0]["params"][0] is next(model2.parameters())
    assert opt2.noise_stats is not opt.noise_stats and opt2.noise_stats.optimizer is opt2
    eng, eng2 = opt.noise_stats, opt2.noise_stats
    for _ in range(3):
        model2(torch.randn(4, 3)).pow(2).mean().backward()
    assert all(s.count == 0 for s in eng.slots.values()), "the original captured the copy's backward"
    assert all(s.count == 3 for s in eng2.slots.values())
    model(torch.randn(4, 3)).pow(2).mean().backward()
    assert all(s.count == 1 for s in eng.slots.values()) and all(s.count == 3 for s in eng2.slots.values())
    opt2.step()
    assert opt2.last_stats().to_dict()["num_contributions"] == 3 and eng2.step_count == 3
    assert STATE_KEY in opt2.state_dict() and len(opt2._optimizer_state_dict_post_hooks) == 0
    # The copy continues exactly like the original would have.
    opt.zero_grad()
    opt2.zero_grad()
    model3, opt3 = copy.deepcopy(pair)
    assert repr(_drive(model, opt, 10, 3)) == repr(_drive(model3, opt3, 10, 3))


def test_precond_cache_follows_the_step_and_load():
    # A_{t−1} is looked up once per step: after step() (and after load_state_dict) the next contribution must see
    # the new second moment, exactly as a fresh lookup per contribution would.
    model = _model()
    opt = pnekern.AdamW(model.parameters(), lr=1e-2, stats="trace", batch_size=12)
    twin_model = copy.deepcopy(model)
    twin = pnekern.AdamW(twin_model.parameters(), lr=1e-2, stats="trace", batch_size=12)
    _drive(model, opt, 0, 3)
    _drive(twin_model, twin, 0, 3)
    for t in range(3, 6):  # clear the cache before every contribution: the uncached path
        g = torch.Generator().manual_seed(1000 + t)
        for _ in range(3):
            x = torch.randn(4, 3, generator=g)
            for slot in twin.noise_stats.slots.values():
                slot.precond = None
            (twin_model(x).pow(2).mean() / 3).backward()
        twin.step()
        twin.zero_grad()
    ref = [r for r in twin.exposure.records()[3:]]
    _drive(model, opt, 3, 3)
    assert repr(opt.exposure.records()[3:]) == repr(ref)
