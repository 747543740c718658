"""Statistics under a GradScaler and under pnekern.clip_grad_norm_: the loss scale and the clip coefficient enter the
captured contributions squared, skipped (found_inf) steps add no exposure."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import pnekern

KEYS = ("trace_noise", "trace_precond_noise", "grad_norm_sq", "temperature", "diffusion", "pne")
BACKENDS = ["reference", "cpp"]


def _drive(backend, *, scale=None, unscale=False, attach=False, clip=None, inf_step=None, steps=3, K=3, mode="diag"):
    """K micro-batches per step of a small MLP; returns every step's to_dict() (and the warnings raised)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = pnekern.AdamW(model.parameters(), lr=1e-2, backend=backend, stats=mode, batch_size=4 * K)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10_000) if scale else None
    if attach:
        opt.noise_stats.grad_scaler = scaler
    out = []
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for step in range(steps):
            for k in range(K):
                g = torch.Generator().manual_seed(100 * step + k)
                x, y = torch.randn(4, 5, generator=g), torch.randn(4, 2, generator=g)
                loss = ((model(x) - y) ** 2).mean() / K
                if step == inf_step and k == 1:
                    loss = loss * float("inf")
                (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                if unscale:
                    scaler.unscale_(opt)
                if clip:
                    pnekern.clip_grad_norm_(model.parameters(), clip)
                scaler.step(opt)
                scaler.update()
            else:
                if clip:
                    pnekern.clip_grad_norm_(model.parameters(), clip)
                opt.step()
            opt.zero_grad()
            out.append(opt.last_stats().to_dict())
    return out, [str(w.message) for w in rec]


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_scale_is_divided_out_of_every_statistic(backend):
    # A power-of-two scale multiplies and divides exactly: the statistics are the unscaled run's bits.
    plain, _ = _drive(backend)
    scaled, _ = _drive(backend, scale=1024.0)
    for a, b in zip(scaled, plain):
        assert not a["skipped"]
        for key in KEYS:
            assert a[key] == b[key], key
        for name, row in a["per_param"].items():
            for key in ("trace_noise", "trace_precond_noise", "grad_norm_sq", "temperature"):
                assert row[key] == b["per_param"][name][key], (name, key)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clipping_scales_the_exposure_by_the_squared_coefficient(backend):
    # First step, trace mode: A_{t-1} comes from the zero state in both runs, so every statistic of the clipped
    # gradient c·ḡ is c² times the unclipped one (diag mode's A_t would see the clipped update).
    plain, _ = _drive(backend, steps=1, mode="trace")
    clipped, _ = _drive(backend, clip=0.05, steps=1, mode="trace")
    a, b = clipped[0], plain[0]
    c = 0.05 / (b["grad_norm_sq"] ** 0.5 + 1e-6)  # torch's coefficient from the pre-clip norm
    assert c < 0.5, "the test must clip"
    assert a["clip_coef"] == pytest.approx(c, rel=1e-7)
    # c·g is rounded to fp32 per element: relative differences of ~1.5e-7 were seen, 1e-6 allows for that.
    for key in ("trace_noise", "trace_precond_noise", "grad_norm_sq", "temperature", "diffusion"):
        assert a[key] == pytest.approx(c * c * b[key], rel=1e-6), key
    assert a["temperature_preclip"] == pytest.approx(b["temperature"], rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unscale_then_clip_under_a_scaler(backend):
    # scaler.unscale_ before step: the step gets no grad_scale, so the engine needs the scaler to divide the loss
    # scale out of the contributions it captured; without it the statistics say so instead of being silently off.
    ref, _ = _drive(backend, clip=0.05)
    attached, msgs = _drive(backend, scale=1024.0, unscale=True, attach=True, clip=0.05)
    assert not [m for m in msgs if "grad_scaler" in m]
    for a, b in zip(attached, ref):  # unscaling by 1/1024 is exact: the same bits as clipping without AMP
        for key in KEYS:
            assert a[key] == b[key], key
    _, msgs = _drive(backend, scale=1024.0, unscale=True, clip=0.05)
    warned = [m for m in msgs if "grad_scaler" in m]
    assert len(warned) == 1 and "unscale_" in warned[0], msgs


@pytest.mark.parametrize("mode", ["trace", "diag"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_skipped_step_adds_no_exposure_and_says_so(backend, mode):
    # An inf loss in one micro-batch: GradScaler flags the step. In trace mode Σ a²x² comes from the (inf)
    # captured contributions, so only the skip mask keeps the exposure at 0.
    out, _ = _drive(backend, scale=1024.0, inf_step=1, mode=mode)
    assert [s["skipped"] for s in out] == [False, True, False]
    assert out[1]["temperature"] == 0.0 and out[1]["diffusion"] == 0.0
    assert out[1]["pne"] == out[0]["pne"]
    assert out[2]["pne"] > out[1]["pne"]
