"""Triton fused AdamW step (pnekern.kernels.adamw_step) against the reference op (pnekern.reference.adamw), which
is itself checked against torch.optim.AdamW: odd sizes, many tensors per launch, fp32/bf16/fp16 storage, amsgrad,
maximize, weight decay, Tensor lr, grad_scale/found_inf, the statistics rows (NaN-poisoned before the call)."""
from __future__ import annotations

import copy

import pytest
import torch
from _triton_setup import triton_device

DEVICE = triton_device()

from pnekern import ops  # noqa: E402
from pnekern.kernels import adamw_step as tk  # noqa: E402
from pnekern.reference import adamw as ref  # noqa: E402

SIZES = (1, 7, 1023, 65537)
SMALL = (1, 7, 1023)

# Tolerance next to the dtype: (params/state rtol, atol). Both sides do fp32 math and round once per stored value, so
# they agree to the last bit except where an intermediate lands on a rounding boundary: one storage ulp.
DTYPES = [
    pytest.param(torch.float32, 2e-6, 1e-7, id="fp32"),
    pytest.param(torch.bfloat16, 2.0**-7, 1e-6, id="bf16"),
    pytest.param(torch.float16, 2.0**-10, 1e-6, id="fp16"),
]


def _state(sizes, dtype, amsgrad, seed=0, steps_device="cpu", steps_dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=gen).to(dtype).to(DEVICE) for n in sizes]
    return {
        "params": params,
        "exp_avgs": [torch.zeros_like(p) for p in params],
        "exp_avg_sqs": [torch.zeros_like(p) for p in params],
        "max_exp_avg_sqs": [torch.zeros_like(p) for p in params] if amsgrad else [],
        "state_steps": [torch.tensor(0.0, dtype=steps_dtype, device=steps_device) for _ in params],
    }


def _step(fn, st, grads, hp, **kw):
    fn(st["params"], grads, st["exp_avgs"], st["exp_avg_sqs"], st["max_exp_avg_sqs"], st["state_steps"],
       hp.get("lr_t", hp["lr"]) if fn is tk.adamw_step_ else hp["lr"], hp["beta1"], hp["beta2"],
       hp["weight_decay"], hp["eps"], hp["amsgrad"], hp["maximize"], kw.get("grad_scale"), kw.get("found_inf"),
       kw.get("sumsq_bufs", []), kw.get("stats_out"))


def _hp(amsgrad=False, maximize=False, weight_decay=0.1, lr=1e-2, beta1=0.9):
    return dict(lr=lr, beta1=beta1, beta2=0.999, eps=1e-8, weight_decay=weight_decay, amsgrad=amsgrad,
                maximize=maximize)


def _assert_state_close(a, b, rtol, atol, what=""):
    for key in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        for i, (x, y) in enumerate(zip(a[key], b[key])):
            assert x.dtype == y.dtype
            torch.testing.assert_close(x.cpu().float(), y.cpu().float(), rtol=rtol, atol=atol,
                                       msg=lambda m, key=key, i=i: f"{what} {key}[{i}]: {m}")
    assert [float(s) for s in a["state_steps"]] == [float(s) for s in b["state_steps"]]


@pytest.mark.parametrize("dtype,rtol,atol", DTYPES)
@pytest.mark.parametrize("amsgrad,maximize,weight_decay,beta1", [
    (False, False, 0.0, 0.9), (True, True, 0.1, 0.9), (False, True, 0.1, 0.3),  # beta1=0.3: torch.lerp's 2nd formula
])
def test_step_and_stats_match_reference(dtype, rtol, atol, amsgrad, maximize, weight_decay, beta1):
    hp = _hp(amsgrad, maximize, weight_decay, beta1=beta1)
    sizes = SIZES if dtype == torch.float32 else SMALL
    ours = _state(sizes, dtype, amsgrad)
    want = copy.deepcopy(ours)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        grads = [torch.randn(n, generator=gen).to(dtype).to(DEVICE) for n in sizes]
        sumsq = [torch.rand(n, generator=gen).to(DEVICE) for n in sizes] if step != 1 else []
        stats = torch.full((len(sizes), 4), float("nan"), dtype=torch.float64, device=DEVICE)  # poison
        stats_ref = torch.empty_like(stats)
        _step(ref.adamw_step_, want, [g.clone() for g in grads], hp, sumsq_bufs=sumsq, stats_out=stats_ref)
        _step(tk.adamw_step_, ours, [g.clone() for g in grads], hp, sumsq_bufs=sumsq, stats_out=stats)
        _assert_state_close(ours, want, rtol, atol, f"step {step}")
        assert bool(torch.isfinite(stats).all()), "every stats cell must be written"
        if not sumsq:
            assert bool((stats[:, 3] == 0).all())
        # statistics: fp32 per-element products, fp32 block sums, fp64 across blocks
        torch.testing.assert_close(stats.cpu(), stats_ref.cpu(), rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("ncols", [4, 3, 2])
def test_many_small_tensors_one_launch(ncols):
    # ncols 2: the trace-mode rows (the first two sums), ncols 3 the A_t rows (columns 0, 2, 3), sliced from the
    # full kernel's rows.
    gen = torch.Generator().manual_seed(2)
    sizes = [int(n) for n in torch.randint(1, 300, (60,), generator=gen)] + [0, 5]  # an empty tensor too
    hp = _hp(amsgrad=True)
    ours = _state(sizes, torch.float32, True, seed=3)
    want = copy.deepcopy(ours)
    for _ in range(2):
        grads = [torch.randn(n, generator=gen).to(DEVICE) for n in sizes]
        stats = torch.full((len(sizes), ncols), float("nan"), dtype=torch.float64, device=DEVICE)
        stats_ref = torch.empty_like(stats)
        sumsq = [g.square() + 1.0 for g in grads]
        want_before = copy.deepcopy(want)
        _step(ref.adamw_step_, want, [g.clone() for g in grads], hp, sumsq_bufs=sumsq, stats_out=stats_ref)
        _step(tk.adamw_step_, ours, [g.clone() for g in grads], hp, sumsq_bufs=sumsq, stats_out=stats)
        torch.testing.assert_close(stats.cpu(), stats_ref.cpu(), rtol=1e-5, atol=0.0)
        if ncols == 3:  # the reference's own columns: Σ g², Σ a_new² g², Σ a_new² q of its full row
            full = torch.empty(len(sizes), 4, dtype=torch.float64, device=DEVICE)
            _step(ref.adamw_step_, copy.deepcopy(want_before), [g.clone() for g in grads], hp, sumsq_bufs=sumsq,
                  stats_out=full)
            assert torch.equal(stats_ref, full[:, [0, 2, 3]])
    _assert_state_close(ours, want, 2e-6, 1e-7)
    assert stats[len(sizes) - 2].tolist() == [0.0] * ncols  # the empty tensor's row


def test_matches_torch_adamw_directly():
    """The oracle chain's first link, on the kernel itself: torch.optim.AdamW(foreach=False), 10 steps."""
    hp = _hp(amsgrad=True, weight_decay=0.1)
    st = _state(SMALL, torch.float32, True, seed=4)
    ps = [torch.nn.Parameter(p.detach().clone()) for p in st["params"]]
    opt = torch.optim.AdamW(ps, lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"],
                            weight_decay=hp["weight_decay"], amsgrad=True, foreach=False)
    gen = torch.Generator().manual_seed(5)
    for _ in range(10):
        grads = [torch.randn(n, generator=gen).to(DEVICE) for n in SMALL]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
        _step(tk.adamw_step_, st, grads, hp)
    for i, p in enumerate(ps):
        torch.testing.assert_close(st["params"][i], p.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(st["max_exp_avg_sqs"][i], opt.state[p]["max_exp_avg_sq"], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_scale_unscales_and_writes_back(dtype):
    hp = _hp()
    ours = _state(SMALL, dtype, False, seed=6)
    want = copy.deepcopy(ours)
    gen = torch.Generator().manual_seed(7)
    scale = torch.tensor(1024.0, device=DEVICE)
    for _ in range(2):
        grads = [(torch.randn(n, generator=gen) * 1024).to(dtype).to(DEVICE) for n in SMALL]
        g_ours, g_ref = [g.clone() for g in grads], [g.clone() for g in grads]
        stats = torch.full((len(SMALL), 4), float("nan"), dtype=torch.float64, device=DEVICE)
        stats_ref = torch.empty_like(stats)
        _step(ref.adamw_step_, want, g_ref, hp, grad_scale=scale, stats_out=stats_ref)
        _step(tk.adamw_step_, ours, g_ours, hp, grad_scale=scale, stats_out=stats)
        for a, b, g in zip(g_ours, g_ref, grads):
            assert torch.equal(a, b), "the unscaled gradient is written back"
            assert not torch.equal(a, g)
        torch.testing.assert_close(stats.cpu(), stats_ref.cpu(), rtol=1e-5, atol=0.0)
    _assert_state_close(ours, want, 2e-6 if dtype == torch.float32 else 2.0**-7, 1e-7)


def test_found_inf_changes_nothing_and_is_not_counted():
    hp = _hp(amsgrad=True)
    st = _state(SMALL, torch.bfloat16, True, seed=8)
    gen = torch.Generator().manual_seed(9)
    grads = [torch.randn(n, generator=gen).to(torch.bfloat16).to(DEVICE) for n in SMALL]
    _step(tk.adamw_step_, st, [g.clone() for g in grads], hp)
    before = copy.deepcopy(st)
    g_before = [g.clone() for g in grads]
    sumsq = [torch.rand(n, generator=gen).to(DEVICE) for n in SMALL]
    stats = torch.full((len(SMALL), 4), float("nan"), dtype=torch.float64, device=DEVICE)
    _step(tk.adamw_step_, st, grads, hp, grad_scale=torch.tensor(2.0, device=DEVICE),
          found_inf=torch.tensor(1.0, device=DEVICE), sumsq_bufs=sumsq, stats_out=stats)
    for key, tensors in before.items():
        for i, t in enumerate(tensors):
            assert torch.equal(st[key][i], t), f"{key}[{i}] changed on a found_inf step"
    for g, g0 in zip(grads, g_before):
        assert torch.equal(g, g0), "grads changed on a found_inf step"
    assert torch.equal(stats, torch.zeros_like(stats)), "stats of a skipped step are zero"
    _step(tk.adamw_step_, st, grads, hp, found_inf=torch.tensor(0.0, device=DEVICE))
    assert all(float(s) == 2.0 for s in st["state_steps"])
    assert not torch.equal(st["params"][2], before["params"][2])


def test_tensor_lr_and_device_steps_match_float_lr():
    """lr as a 0-dim tensor and float64 step counters on the params' device (the capturable layout) give the same
    step as a float lr with CPU float32 counters."""
    hp = _hp(amsgrad=False, weight_decay=0.05)
    a = _state(SMALL, torch.float32, False, seed=10)
    b = _state(SMALL, torch.float32, False, seed=10, steps_device=DEVICE, steps_dtype=torch.float64)
    gen = torch.Generator().manual_seed(11)
    hp_t = dict(hp, lr_t=torch.tensor(hp["lr"], dtype=torch.float64, device=DEVICE))
    for _ in range(3):
        grads = [torch.randn(n, generator=gen).to(DEVICE) for n in SMALL]
        _step(tk.adamw_step_, a, [g.clone() for g in grads], hp)
        _step(tk.adamw_step_, b, [g.clone() for g in grads], hp_t)
    for x, y in zip(a["params"], b["params"]):
        assert torch.equal(x, y)
    assert all(s.device.type == torch.device(DEVICE).type and float(s) == 3.0 for s in b["state_steps"])


def test_non_contiguous_buffers_are_written_back():
    hp = _hp()
    ours = _state((6,), torch.float32, False, seed=12)
    ours = {k: [t.reshape(2, 3).t() if t.dim() == 1 else t for t in v] for k, v in ours.items()}
    want = copy.deepcopy(ours)
    g = torch.randn(2, 3).t().to(DEVICE)
    assert not ours["params"][0].is_contiguous()
    _step(ref.adamw_step_, want, [g.clone()], hp)
    _step(tk.adamw_step_, ours, [g.clone()], hp)
    _assert_state_close(ours, want, 2e-6, 1e-7)


def test_stats_are_deterministic():
    hp = _hp()
    a = _state((5000, 3), torch.float32, False, seed=13)
    b = copy.deepcopy(a)
    g = [torch.randn(n).to(DEVICE) for n in (5000, 3)]
    out = []
    for st in (a, b):
        stats = torch.empty(2, 4, dtype=torch.float64, device=DEVICE)
        _step(tk.adamw_step_, st, [x.clone() for x in g], hp, stats_out=stats)
        out.append(stats)
    assert torch.equal(out[0], out[1])


def test_validation_errors():
    st = _state((3, 4), torch.float32, False)
    hp = _hp()
    with pytest.raises(RuntimeError, match=r"grads\[1\] has dtype"):
        _step(tk.adamw_step_, st, [torch.zeros(3, device=DEVICE), torch.zeros(4, dtype=torch.float16,
                                                                             device=DEVICE)], hp)
    with pytest.raises(RuntimeError, match="stats_out must have shape"):
        _step(tk.adamw_step_, st, [torch.zeros(3, device=DEVICE), torch.zeros(4, device=DEVICE)], hp,
              stats_out=torch.empty(3, 4, dtype=torch.float64, device=DEVICE))
    with pytest.raises(RuntimeError, match="amsgrad=True needs"):
        _step(tk.adamw_step_, st, [torch.zeros(3, device=DEVICE), torch.zeros(4, device=DEVICE)],
              dict(hp, amsgrad=True))
    assert [float(s) for s in st["state_steps"]] == [0.0, 0.0], "a rejected call counts nothing"


def test_dispatch_through_ops():
    assert ops.resolve_backend("triton", torch.device(DEVICE), torch.float32) == "triton"
    st = _state(SMALL, torch.float32, False, seed=14)
    want = copy.deepcopy(st)
    grads = [torch.randn(n).to(DEVICE) for n in SMALL]
    hp = _hp()
    kw = dict(lr=hp["lr"], beta1=hp["beta1"], beta2=hp["beta2"], weight_decay=hp["weight_decay"], eps=hp["eps"],
              amsgrad=False, maximize=False)
    ops.adamw_step_("triton", st["params"], [g.clone() for g in grads], st["exp_avgs"], st["exp_avg_sqs"], [],
                    st["state_steps"], **kw)
    ops.adamw_step_("reference", want["params"], [g.clone() for g in grads], want["exp_avgs"],
                    want["exp_avg_sqs"], [], want["state_steps"], **kw)
    _assert_state_close(st, want, 2e-6, 1e-7)
