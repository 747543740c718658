"""Exposure schedules, the closed-loop controller, checkpoint/resume of the noise stream, and input validation."""
from __future__ import annotations

import copy

import pytest
import torch

import pnekern
from pnekern.noise import (
    ControllerConfig, NoiseConfig, concentrated, constant, diagonal, equal_exposure_pair, isotropic, lowrank,
    piecewise, ramp,
)

f64 = torch.float64
D, LR = 8, 1e-3


# ---------------------------------------------------------------------------------------------- schedules
def test_schedules_values_and_integrals():
    assert constant(2.5)(1) == 2.5 and constant(2.5)(10_000) == 2.5
    r = ramp(1.0, 3.0, steps=10, begin=1)
    assert r(1) == 1.0 and r(6) == pytest.approx(2.0) and r(11) == 3.0 and r(500) == 3.0
    pw = piecewise([(3, 5, 2.0), (6, 6, 4.0), (10, 12, 1.0)], default=0.5)
    assert [pw(t) for t in range(1, 14)] == [0.5, 0.5, 2.0, 2.0, 2.0, 4.0, 0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 0.5]
    for total, frac in ((100, 0.25), (37, 0.3), (10, 1.0)):
        early, late = equal_exposure_pair(total, mean=2.0, fraction=frac, baseline=0.5)
        assert early.integral(1, total) == pytest.approx(2.0 * total, rel=1e-12)
        assert late.integral(1, total) == pytest.approx(2.0 * total, rel=1e-12)
        w = max(1, round(frac * total))
        assert early(1) > early(total) or w == total
        assert late(total) > late(1) or w == total


# ---------------------------------------------------------------------------------------------- controller
def regression_run(noise: NoiseConfig | None, steps: int, salt: int = 0, stats: str = "trace", batch: int = 16,
                   micro: int = 4, dtype=f64, record_every: int = 0):
    """Linear regression from the optimum (natural temperature ≈ η·d for Adam); returns the model, optimizer, logs."""
    beta = torch.linspace(-1.0, 1.0, D, dtype=dtype)
    w = torch.nn.Parameter(beta.clone())
    opt = pnekern.AdamW([w], lr=LR, weight_decay=0.0, stats=stats, batch_size=batch, noise=noise)
    return w, opt, drive(w, opt, beta, 0, steps, salt, batch, micro)


def drive(w, opt, beta, first: int, steps: int, salt: int, batch: int = 16, micro: int = 4):
    out = []
    for t in range(first, first + steps):
        g = torch.Generator().manual_seed(7919 * salt + t)
        x = torch.randn(batch, D, generator=g, dtype=w.dtype)
        y = x @ beta + torch.randn(batch, generator=g, dtype=w.dtype)
        opt.zero_grad()
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            (0.5 * ((xs @ w - ys) ** 2).mean() / micro).backward()
        opt.step()
        out.append(opt.last_stats().to_dict())
    return out


@pytest.mark.parametrize("space,into_v", [("parameter", True), ("gradient", False)])
def test_controller_tracks_a_constant_target(space, into_v):
    target = 3.0 * LR * D  # natural temperature is ≈ η·d here (a²Σ ≈ 1 per coordinate)
    cfg = NoiseConfig(schedule=constant(target), space=space, into_second_moment=into_v, seed=1)
    _, _, log = regression_run(cfg, 200, salt=1)
    measured = torch.tensor([r["temperature"] for r in log])
    natural = torch.tensor([r["temperature_sampled"] for r in log])
    assert float(natural.mean()) < 0.6 * target, "the target must be above the natural noise for this test"
    assert abs(float(measured[50:].mean()) / target - 1.0) < 0.10
    assert all(r["target"] == pytest.approx(target) for r in log)
    scales = torch.tensor([r["injection_scale"] for r in log])
    assert bool((scales > 0).all()) and float(scales.std()) > 0  # the loop acts
    for r in log:  # totals are natural + injected, post-clip
        assert r["temperature"] == pytest.approx(r["temperature_sampled"] + r["temperature_injected"], rel=1e-9)


def test_controller_tracks_a_ramp():
    sched = ramp(2.0 * LR * D, 5.0 * LR * D, steps=150)
    _, _, log = regression_run(NoiseConfig(schedule=sched, space="parameter", seed=2), 200, salt=2)
    ratio = torch.tensor([r["temperature"] / r["target"] for r in log])
    assert abs(float(ratio[40:].mean()) - 1.0) < 0.10
    assert abs(float(ratio[150:].mean()) - 1.0) < 0.10


def test_early_and_late_schedules_deliver_equal_exposure():
    total = 160
    early, late = equal_exposure_pair(total, mean=3.0 * LR * D, fraction=0.25, baseline=1.5 * LR * D)
    delivered = {}
    for name, sched in (("early", early), ("late", late)):
        _, _, log = regression_run(NoiseConfig(schedule=sched, space="parameter", seed=3), total, salt=3)
        delivered[name] = sum(r["temperature"] for r in log)
    assert abs(delivered["early"] / delivered["late"] - 1.0) < 0.05
    for v in delivered.values():
        assert abs(v / early.integral(1, total) - 1.0) < 0.10


def test_pne_star_metric_needs_a_curvature_reference():
    with pytest.warns(RuntimeWarning, match="curvature"):
        regression_run(NoiseConfig(schedule=1.0, metric="pne_star"), 2)


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("space,into_v", [("gradient", True), ("gradient", False), ("parameter", True)])
def test_resume_reproduces_the_trajectory_bitwise(space, into_v):
    cfg = NoiseConfig(emulate_batch_size=4, schedule=ramp(2.0 * LR * D, 4.0 * LR * D, 20), space=space,
                      into_second_moment=into_v, seed=2**40 + 9)
    beta = torch.linspace(-1.0, 1.0, D)
    w = torch.nn.Parameter(beta.clone())
    opt = pnekern.AdamW([w], lr=LR, stats="diag", batch_size=16, noise=cfg)
    drive(w, opt, beta, 0, 6, salt=4)
    saved_w, saved_opt = w.detach().clone(), copy.deepcopy(opt.state_dict())
    tail = drive(w, opt, beta, 6, 6, salt=4)
    w2 = torch.nn.Parameter(saved_w.clone())
    opt2 = pnekern.AdamW([w2], lr=LR, stats="diag", batch_size=16, noise=cfg)
    opt2.load_state_dict(saved_opt)
    assert opt2._noise.counter == 6
    tail2 = drive(w2, opt2, beta, 6, 6, salt=4)
    assert torch.equal(w, w2)
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt.state[w][k], opt2.state[w2][k])
    assert [r["injection_scale"] for r in tail] == [r["injection_scale"] for r in tail2]


def test_checkpoint_stays_torch_compatible_and_survives_pickling():
    w, opt, _ = regression_run(NoiseConfig(target=isotropic(0.1), additive=True, seed=5), 3, dtype=torch.float32)
    sd = opt.state_dict()
    assert sd["pnekern_noise"]["seed"] == 5 and sd["pnekern_noise"]["counter"] == 3
    plain = torch.optim.AdamW([torch.nn.Parameter(w.detach().clone())], lr=LR)
    plain.load_state_dict(sd)  # the extra key is ignored by torch
    # Loading does not consume the caller's dict, keeps the optimizer's settings and registers no second hook.
    opt.load_state_dict(sd)
    assert "pnekern_noise" in sd
    assert opt._noise is not None and opt._stats is not None
    assert len(opt._optimizer_state_dict_post_hooks) == 1
    assert opt.state_dict()["pnekern_noise"]["counter"] == 3


# ---------------------------------------------------------------------------------------------- validation
def _p(*shape):
    return torch.nn.Parameter(torch.zeros(*shape))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: pnekern.AdamW([_p(3)], stats="diag", batch_size=8, noise=NoiseConfig(emulate_batch_size=16)),
         "emulate_batch_size=16 > batch_size=8"),
        (lambda: pnekern.AdamW([_p(3)], stats="diag", noise=NoiseConfig(emulate_batch_size=4)), "batch_size"),
        (lambda: pnekern.AdamW([_p(3)], stats="trace", batch_size=8, noise=NoiseConfig(emulate_batch_size=4)),
         "stats='diag'"),
        (lambda: pnekern.AdamW([_p(3)], noise=NoiseConfig(target=isotropic(1.0), additive=True)), "stats="),
        (lambda: pnekern.AdamW([_p(3)], stats="diag", batch_size=8, stats_every=2,
                               noise=NoiseConfig(emulate_batch_size=4)), "stats_every"),
        (lambda: pnekern.AdamW([_p(3)], stats="trace", noise="isotropic"), "noise="),
        (lambda: pnekern.AdamW([_p(3)], stats="trace", differentiable=True,
                               noise=NoiseConfig(target=isotropic(1.0), additive=True)), "differentiable"),
        (lambda: pnekern.AdamW([_p(3), _p(2, 2)], stats="diag",
                               noise=NoiseConfig(target=diagonal([torch.ones(3), torch.ones(5)]))),
         "entry 1 covers 5 elements but parameter 1 has shape \\(2, 2\\)"),
        (lambda: pnekern.AdamW([_p(3)], stats="diag", noise=NoiseConfig(target=diagonal([torch.ones(3)] * 2))),
         "2 entries but the optimizer has 1"),
        (lambda: isotropic(-1.0), "sigma2"),
        (lambda: diagonal([torch.tensor([1.0, -1.0])]), r"variances\[0\]"),
        (lambda: lowrank([(torch.ones(3, 2), torch.ones(3), 0.1)]), r"factors\[0\] S"),
        (lambda: lowrank([(torch.ones(3, 2), -torch.ones(2), 0.1)]), r"factors\[0\] S"),
        (lambda: NoiseConfig(target=isotropic(1.0), space="weights"), "space"),
        (lambda: NoiseConfig(target=isotropic(1.0), space="parameter", into_second_moment=False),
         "into_second_moment"),
        (lambda: NoiseConfig(), "target"),
        (lambda: NoiseConfig(target=isotropic(1.0), emulate_batch_size=2), "either target or emulate_batch_size"),
        (lambda: NoiseConfig(emulate_batch_size=0), "emulate_batch_size"),
        (lambda: NoiseConfig(schedule="high"), "schedule"),
        (lambda: NoiseConfig(schedule=1.0, metric="loss"), "metric"),
        (lambda: NoiseConfig(target=isotropic(1.0), seed=-1), "seed"),
        (lambda: NoiseConfig(target=isotropic(1.0), chunk_elems=0), "chunk_elems"),
        (lambda: ControllerConfig(kp=-1.0), "kp"),
        (lambda: ControllerConfig(min_scale=2.0), "min_scale"),
        (lambda: ramp(0.0, 1.0, steps=0), "steps"),
        (lambda: concentrated(10, 1.0, "middle"), "where"),
        (lambda: concentrated(10, 1.0, "early", baseline=2.0), "baseline"),
        (lambda: piecewise([(3, 5, 1.0), (4, 6, 1.0)]), r"windows\[1\]"),
        (lambda: constant(-1.0), "value"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()
