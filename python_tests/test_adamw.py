"""Differential tests: pnekern.AdamW against torch.optim.AdamW, step by step, state buffer by state buffer."""
from __future__ import annotations

import copy
import io
import os

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import pnekern
from pnekern import _native

BACKENDS = ["reference", "cpp"]
STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a-b| / max |b| (0 when both are zero): scale-free per-tensor difference."""
    a, b = a.detach(), b.detach()
    if torch.is_complex(a):
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    a, b = a.double(), b.double()
    num = (a - b).abs().max().item() if a.numel() else 0.0
    den = b.abs().max().item() if b.numel() else 0.0
    return num / den if den > 0 else num


def mlp(seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def odd_params(seed: int = 0, dtype=torch.float32) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(n, generator=g).to(dtype)) for n in (1, 7, 1023, 65537)]


def set_grads(params, step: int, seed: int = 0, dtype=None):
    g = torch.Generator().manual_seed(seed * 100003 + step)
    for p in params:
        grad = torch.randn(p.shape, generator=g, dtype=torch.float32) * (1.0 + step % 3)
        p.grad = grad.to(dtype or p.dtype)


def model_grads(model: nn.Module, step: int):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(8, 6, generator=g).to(next(model.parameters()).dtype)
    model.zero_grad(set_to_none=True)
    ((model(x) ** 2).mean()).backward()


def run_pair(make_params, opt_kwargs, backend, steps=50, torch_kwargs=None):
    """Step torch (for-loop) and pnekern on identical copies; return (max diff params, max diff state, torch fused diff)."""
    torch_kwargs = dict(opt_kwargs if torch_kwargs is None else torch_kwargs)
    pa, pb, pc = make_params(), make_params(), make_params()
    ref = torch.optim.AdamW(pa, foreach=False, **torch_kwargs)
    fused = torch.optim.AdamW(pc, fused=True, **torch_kwargs)
    ours = pnekern.AdamW(pb, backend=backend, **opt_kwargs)
    worst_p = worst_s = worst_fused = 0.0
    for t in range(steps):
        for ps in (pa, pb, pc):
            set_grads(ps, t)
        ref.step()
        ours.step()
        fused.step()
        for a, b, c in zip(pa, pb, pc):
            worst_p = max(worst_p, max_rel_diff(b, a))
            worst_fused = max(worst_fused, max_rel_diff(c, a))
            sa, sb = ref.state[a], ours.state[b]
            assert set(sa) == set(sb)
            assert float(sa["step"]) == float(sb["step"])
            for k in STATE_KEYS:
                if k in sa:
                    assert sa[k].dtype == sb[k].dtype
                    worst_s = max(worst_s, max_rel_diff(sb[k], sa[k]))
    return worst_p, worst_s, worst_fused


# ----------------------------------------------------------------------------- torch's own OptimizerInfo inputs
def _optim_inputs():
    from torch.testing._internal.common_optimizers import optim_inputs_func_adamw

    return optim_inputs_func_adamw(device="cpu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("idx", range(5))
def test_optiminfo_configs_match_torch(backend, idx):
    inputs = _optim_inputs()
    assert len(inputs) == 5, "torch's AdamW OptimizerInfo inputs changed; update the README count"
    kwargs = inputs[idx].kwargs
    wp, ws, wf = run_pair(lambda: list(mlp().parameters()), kwargs, backend)
    if backend == "reference":
        assert wp <= 1e-6 and ws <= 1e-6, (wp, ws)
    else:
        # Fused kernels reorder fp32 arithmetic; stay within 2x torch's own fused-vs-for-loop gap (floored at
        # a few ulps because torch's fused CPU kernel is sometimes bitwise equal to the loop).
        assert wp <= 2 * max(wf, 1e-6), (wp, wf)
        assert ws <= 2 * max(wf, 1e-6), (ws, wf)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=1e-2, weight_decay=0.0),
        dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05, amsgrad=True),
        dict(lr=2e-3, weight_decay=0.1, maximize=True, amsgrad=True),
    ],
    ids=["no_wd", "amsgrad", "maximize_amsgrad"],
)
def test_odd_sizes_50_steps(backend, kwargs):
    wp, ws, wf = run_pair(odd_params, kwargs, backend)
    bound = 1e-6 if backend == "reference" else 2 * max(wf, 1e-6)
    assert wp <= bound and ws <= bound, (wp, ws, wf)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_lr_and_betas(backend):
    kw_ours = dict(lr=torch.tensor(0.01), betas=(torch.tensor(0.9), torch.tensor(0.99)), weight_decay=0.1)
    wp, ws, _ = run_pair(odd_params, kw_ours, backend, steps=20, torch_kwargs=dict(lr=0.01, betas=(0.9, 0.99), weight_decay=0.1))
    assert wp <= (1e-6 if backend == "reference" else 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_groups_and_add_param_group(backend):
    def groups(ps):
        return [
            {"params": ps[:2], "lr": 1e-2, "weight_decay": 0.0},
            {"params": ps[2:3], "betas": (0.5, 0.9), "amsgrad": True},
        ]

    pa, pb = odd_params(1), odd_params(1)
    ref = torch.optim.AdamW(groups(pa), lr=1e-3, foreach=False)
    ours = pnekern.AdamW(groups(pb), lr=1e-3, backend=backend)
    for t in range(30):
        if t == 10:
            ref.add_param_group({"params": pa[3:], "lr": 5e-3, "maximize": True})
            ours.add_param_group({"params": pb[3:], "lr": 5e-3, "maximize": True})
        set_grads(pa, t)
        set_grads(pb, t)
        ref.step()
        ours.step()
    for a, b in zip(pa, pb):
        assert max_rel_diff(b, a) <= 2e-6
        assert float(ref.state[a]["step"]) == float(ours.state[b]["step"])
    assert float(ours.state[pb[3]]["step"]) == 20


# ----------------------------------------------------------------------------- contract details
@pytest.mark.parametrize("backend", BACKENDS)
def test_none_grad_skipped_and_zero_grad_no_wd_bitwise(backend):
    ps = odd_params()
    before = [p.detach().clone() for p in ps]
    opt = pnekern.AdamW(ps, weight_decay=0.0, backend=backend)
    ps[0].grad = torch.zeros_like(ps[0])
    ps[2].grad = torch.zeros_like(ps[2])
    opt.step()
    assert ps[1] not in opt.state and ps[3] not in opt.state
    assert float(opt.state[ps[0]]["step"]) == 1
    for p, b in zip(ps, before):
        assert torch.equal(p.detach(), b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grads_not_modified(backend):
    ps = odd_params()
    set_grads(ps, 0)
    grads = [p.grad.clone() for p in ps]
    opt = pnekern.AdamW(ps, weight_decay=0.1, maximize=True, backend=backend)
    for _ in range(3):
        opt.step()
    for p, g in zip(ps, grads):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_roundtrip_with_torch(backend, tmp_path):
    pa, pb = odd_params(2), odd_params(2)
    ref = torch.optim.AdamW(pa, lr=1e-2, amsgrad=True, foreach=False)
    ours = pnekern.AdamW(pb, lr=1e-2, amsgrad=True, backend=backend)
    for t in range(5):
        set_grads(pa, t)
        set_grads(pb, t)
        ref.step()
        ours.step()
    sd = ours.state_dict()
    for s in sd["state"].values():
        assert set(s) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        assert s["step"].dtype == torch.float32 and s["step"].device.type == "cpu" and s["step"].dim() == 0
    # Save with torch.save, load with weights_only=True (plain tensors and python containers only).
    path = tmp_path / "ckpt.pt"
    torch.save({"ours": sd, "ref": ref.state_dict()}, path)
    blob = torch.load(path, weights_only=True)
    # Cross-load: torch's checkpoint into a fresh pnekern optimizer and ours into a fresh torch optimizer.
    pc, pd = [p.detach().clone().requires_grad_() for p in pa], [p.detach().clone().requires_grad_() for p in pb]
    ours2 = pnekern.AdamW(pc, lr=1.0, amsgrad=True, backend=backend)
    ours2.load_state_dict(blob["ref"])
    ref2 = torch.optim.AdamW(pd, lr=1.0, amsgrad=True, foreach=False)
    ref2.load_state_dict(blob["ours"])
    assert ours2.param_groups[0]["lr"] == 1e-2 and ref2.param_groups[0]["lr"] == 1e-2
    for t in range(5, 15):
        for ps in (pa, pb, pc, pd):
            set_grads(ps, t)
        for o in (ref, ours, ours2, ref2):
            o.step()
    for a, b, c, d in zip(pa, pb, pc, pd):
        assert max_rel_diff(c, a) <= 2e-6  # ours continuing torch's run
        assert max_rel_diff(d, b) <= 2e-6  # torch continuing ours
        assert max_rel_diff(b, a) <= 2e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_found_inf_changes_nothing(backend):
    scaler_a = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler_b = torch.amp.GradScaler("cpu", init_scale=1024.0)
    pa, pb = odd_params(3), odd_params(3)
    ref = torch.optim.AdamW(pa, lr=1e-2, fused=True)  # torch's own in-kernel unscale contract
    ours = pnekern.AdamW(pb, lr=1e-2, backend=backend)
    assert ours._step_supports_amp_scaling
    for t in range(8):
        for ps, scaler in ((pa, scaler_a), (pb, scaler_b)):
            g = torch.Generator().manual_seed(t)
            targets = [torch.randn(p.shape, generator=g) for p in ps]
            if t == 3:
                targets[2][5] = float("inf")
            for p in ps:
                p.grad = None
            loss = sum((p * tg).sum() for p, tg in zip(ps, targets))  # d loss / d p = tg
            scaler.scale(loss).backward()
        before = [p.detach().clone() for p in pb]
        state_before = copy.deepcopy(ours.state_dict()["state"])
        scaler_a.step(ref)
        scaler_b.step(ours)
        scaler_a.update()
        scaler_b.update()
        if t == 3:
            for p, b in zip(pb, before):
                assert torch.equal(p.detach(), b)
            for k, s in ours.state_dict()["state"].items():
                for key in s:
                    assert torch.equal(s[key], state_before[k][key]), key
    assert scaler_b.get_scale() == scaler_a.get_scale()
    for a, b in zip(pa, pb):
        assert float(ref.state[a]["step"]) == float(ours.state[b]["step"]) == 7
        assert max_rel_diff(b, a) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_lr_scheduler_and_hooks(backend):
    ma, mb = mlp(4), mlp(4)
    ref = torch.optim.AdamW(ma.parameters(), lr=1e-2, foreach=False)
    ours = pnekern.AdamW(mb.parameters(), lr=1e-2, backend=backend)
    sa = torch.optim.lr_scheduler.OneCycleLR(ref, max_lr=5e-2, total_steps=20)
    sb = torch.optim.lr_scheduler.OneCycleLR(ours, max_lr=5e-2, total_steps=20)
    calls = []
    h1 = ours.register_step_pre_hook(lambda opt, a, k: calls.append("pre"))
    h2 = ours.register_step_post_hook(lambda opt, a, k: calls.append("post"))
    h3 = register_optimizer_step_pre_hook(
        lambda opt, a, k: calls.append("gpre") if opt is ours else None
    )
    try:
        for t in range(20):
            model_grads(ma, t)
            model_grads(mb, t)
            ref.step()
            ours.step()
            sa.step()
            sb.step()
            assert ref.param_groups[0]["lr"] == ours.param_groups[0]["lr"]
    finally:
        h1.remove(), h2.remove(), h3.remove()
    assert calls == ["gpre", "pre", "post"] * 20
    for a, b in zip(ma.parameters(), mb.parameters()):
        assert max_rel_diff(b, a) <= 2e-6
    ours.zero_grad()
    assert all(p.grad is None for p in mb.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_deepcopy_keeps_backend_and_state(backend):
    ps = odd_params()
    opt = pnekern.AdamW(ps, lr=1e-2, backend=backend, check_finite=True)
    set_grads(ps, 0)
    opt.step()
    ps2, twin = copy.deepcopy((ps, opt))  # one memo: the copy's state is keyed by the copied params
    assert twin.backend == backend and twin.check_finite
    assert twin.param_groups[0]["params"][0] is ps2[0] and ps2[0] in twin.state
    for t in range(1, 4):
        set_grads(ps, t)
        set_grads(ps2, t)
        opt.step()
        twin.step()
    for a, b in zip(ps, ps2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_complex_params(backend):
    def make():
        g = torch.Generator().manual_seed(5)
        return [nn.Parameter(torch.randn(33, dtype=torch.complex64, generator=g)), nn.Parameter(torch.randn(4, 5, generator=g))]

    pa, pb = make(), make()
    ref = torch.optim.AdamW(pa, lr=1e-2, amsgrad=True, foreach=False)
    ours = pnekern.AdamW(pb, lr=1e-2, amsgrad=True, backend=backend)
    for t in range(10):
        for ps in (pa, pb):
            g = torch.Generator().manual_seed(t)
            for p in ps:
                p.grad = torch.randn(p.shape, dtype=p.dtype, generator=g)
        ref.step()
        ours.step()
    for a, b in zip(pa, pb):
        assert b.dtype == a.dtype
        assert max_rel_diff(b, a) <= 2e-6
        assert ours.state[b]["exp_avg"].dtype == a.dtype


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_low_precision_cpp_matches_fp32_math_reference(dtype, tol):
    # Both backends do fp32 math on low-precision storage; they differ only by rounding order.
    pa, pb = odd_params(6, dtype), odd_params(6, dtype)
    ra = pnekern.AdamW(pa, lr=1e-3, backend="reference")
    rb = pnekern.AdamW(pb, lr=1e-3, backend="cpp")
    for t in range(10):
        set_grads(pa, t)
        set_grads(pb, t)
        ra.step()
        rb.step()
    for a, b in zip(pa, pb):
        assert b.dtype == dtype and rb.state[b]["exp_avg"].dtype == dtype
        # at most a couple of storage ulps apart
        assert (a.float() - b.float()).abs().max().item() <= tol * a.float().abs().max().item()


def test_differentiable_matches_torch():
    def run(cls, **kw):
        torch.manual_seed(0)
        w = torch.randn(5, requires_grad=True)
        p = w.clone()  # non-leaf: autograd flows from the optimized param back to w
        p.retain_grad()
        opt = cls([p], lr=torch.tensor(0.1), differentiable=True, **kw)
        p.grad = torch.linspace(-1, 1, 5)
        opt.step()
        p.sum().backward()
        return p.detach(), w.grad

    pa, ga = run(torch.optim.AdamW)
    pb, gb = run(pnekern.AdamW)
    assert torch.equal(pa, pb) and torch.equal(ga, gb)


# ----------------------------------------------------------------------------- errors
def _error_inputs():
    from torch.testing._internal.common_optimizers import OptimizerErrorEnum, optim_error_inputs_func_adamw

    return OptimizerErrorEnum, optim_error_inputs_func_adamw(device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("idx", range(12))
def test_torch_error_inputs_same_exceptions(idx):
    enum, inputs = _error_inputs()
    assert len(inputs) == 12, "torch's AdamW error inputs changed; update the README count"
    e = inputs[idx]
    params = e.optimizer_error_input.params
    if params is None:
        params = [nn.Parameter(torch.randn(2, 3))]
    kwargs = e.optimizer_error_input.kwargs

    def construct_and_step():
        opt = pnekern.AdamW(params, **kwargs)
        if e.error_on == enum.STEP_ERROR:
            opt.step()

    if issubclass(e.error_type, Warning):
        with pytest.warns(e.error_type, match=e.error_regex):
            construct_and_step()
    else:
        with pytest.raises(e.error_type, match=e.error_regex):
            construct_and_step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_grad_names_param_and_changes_nothing(backend):
    good = nn.Parameter(torch.randn(10))
    emb = nn.Parameter(torch.randn(4, 3))
    opt = pnekern.AdamW([{"params": [good]}, {"params": [emb]}], backend=backend)
    good.grad = torch.ones(10)
    emb.grad = torch.sparse_coo_tensor([[0, 2]], torch.ones(2, 3), (4, 3))
    before = good.detach().clone()
    with pytest.raises(RuntimeError, match=r"sparse.*param_groups\[1\]\['params'\]\[0\]"):
        opt.step()
    assert torch.equal(good.detach(), before) and len(opt.state) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_capturable_on_cpu_raises_like_torch_and_changes_nothing(backend):
    # torch.optim.AdamW(capturable=True) refuses CPU params at step() with an AssertionError; a drop-in must too,
    # but before any state exists (torch creates the state first).
    p = nn.Parameter(torch.randn(7))
    p.grad = torch.randn(7)
    with pytest.raises(AssertionError, match="capturable=True") as torch_err:
        _torch_capturable_step(p)
    good = nn.Parameter(torch.randn(5))
    good.grad = torch.ones(5)
    opt = pnekern.AdamW([{"params": [good]}, {"params": [p], "capturable": True}], backend=backend)
    before = [good.detach().clone(), p.detach().clone()]
    named = r"capturable=True.*param_groups\[1\]\['params'\]\[0\].*device cpu.*capturable=False"
    with pytest.raises(AssertionError, match=named) as ours:
        opt.step()
    assert str(torch_err.value) in str(ours.value)  # torch's sentence, then which parameter and the fix
    assert torch.equal(good.detach(), before[0]) and torch.equal(p.detach(), before[1]) and len(opt.state) == 0
    opt.param_groups[1]["capturable"] = False  # the fix the message names
    opt.step()
    assert not torch.equal(p.detach(), before[1])


def _torch_capturable_step(p: nn.Parameter) -> None:
    q = nn.Parameter(p.detach().clone())
    q.grad = p.grad.clone()
    torch.optim.AdamW([q], capturable=True).step()


def test_non_floating_param_type_error():
    p = torch.zeros(3, dtype=torch.int64)
    opt = pnekern.AdamW([p])
    p.grad = torch.ones(3, dtype=torch.int64)
    with pytest.raises(TypeError, match=r"floating-point.*param_groups\[0\]"):
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_finite_raises_before_any_change(backend):
    ps = odd_params()
    opt = pnekern.AdamW(ps, backend=backend, check_finite=True)
    set_grads(ps, 0)
    opt.step()
    snap = [p.detach().clone() for p in ps]
    sd = copy.deepcopy(opt.state_dict())
    set_grads(ps, 1)
    ps[3].grad[100] = float("nan")
    with pytest.raises(RuntimeError, match=r"check_finite.*param_groups\[0\]\['params'\]\[3\]"):
        opt.step()
    for p, s in zip(ps, snap):
        assert torch.equal(p.detach(), s)
    for k, s in opt.state_dict()["state"].items():
        for key in s:
            assert torch.equal(s[key], sd["state"][k][key])


def test_backend_selection_and_errors(monkeypatch):
    with pytest.raises(ValueError, match="backend='nope'"):
        pnekern.AdamW([nn.Parameter(torch.zeros(1))], backend="nope")
    monkeypatch.setenv("PNEKERN_BACKEND", "reference")
    assert pnekern.AdamW([nn.Parameter(torch.zeros(1))]).backend == "reference"
    monkeypatch.setenv("PNEKERN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="PNEKERN_BACKEND"):
        pnekern.AdamW([nn.Parameter(torch.zeros(1))])
    monkeypatch.delenv("PNEKERN_BACKEND")
    p = nn.Parameter(torch.zeros(3))
    opt = pnekern.AdamW([p], backend="triton")
    p.grad = torch.ones(3)
    # Triton runs CPU tensors only under its interpreter (how CI tests the kernels); without it: a clear error.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="triton"):
        opt.step()
    assert float(opt.state.get(p, {}).get("step", 0)) == 0


def test_missing_native_module_fails_at_call_time(monkeypatch):
    monkeypatch.setattr(_native, "_tried", True)
    monkeypatch.setattr(_native, "_module", None)
    monkeypatch.setattr(_native, "_error", ImportError("simulated"))
    p = nn.Parameter(torch.zeros(3))
    opt = pnekern.AdamW([p], backend="cpp")  # construction is fine
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="no-build-isolation"):
        opt.step()
    auto = pnekern.AdamW([p], backend="auto")  # auto falls back to the reference
    auto.step()
    assert float(auto.state[p]["step"]) == 1
    assert "cpp" not in pnekern.build_info()["backends"]
    assert pnekern.build_info()["backends"][0] == "reference"


def test_build_info_reports_compiled_cpp_backend():
    info = pnekern.build_info()
    assert info["native"] is not None, info.get("load_error")
    assert "cpp" in info["backends"]
    assert "-fno-math-errno" in info["native"]["cxx_flags"]
