"""Tests of the compiled CPU operators ``torch.ops.pnekern.adamw_step_`` and ``microbatch_accumulate_``.

Oracles: ``torch.optim.AdamW(foreach=False)`` stepping copies of the same tensors (SPEC §1), and float64 torch
computations of the SPEC §2 statistics. A missing build FAILS these tests (CI builds the extension); nothing here
skips.
"""
from __future__ import annotations

import copy
import glob
import importlib
import math
import os

import pytest
import torch

SIZES = (1, 7, 1023, 65537)  # odd sizes, one straddling the 64K-element chunk boundary
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_extension():
    """Import pnekern._C (registers torch.ops.pnekern); fall back to loading the built .so directly so these tests
    do not depend on the pure-Python package importing. Returns the error text when neither works."""
    try:
        importlib.import_module("pnekern._C")
        return None
    except Exception as exc:  # noqa: BLE001 - reported by the fixture as a failure
        first = f"{type(exc).__name__}: {exc}"
    libs = sorted(glob.glob(os.path.join(ROOT, "pnekern", "_C*.so")))
    if not libs:
        return f"import pnekern._C failed ({first}) and no pnekern/_C*.so is built"
    try:
        torch.ops.load_library(libs[0])
        return None
    except Exception as exc:  # noqa: BLE001
        return f"import pnekern._C failed ({first}); loading {libs[0]} failed: {exc}"


_LOAD_ERROR = _load_extension()


@pytest.fixture
def ops():
    if _LOAD_ERROR is not None or not hasattr(torch.ops.pnekern, "adamw_step_"):
        pytest.fail(f"the compiled extension is not available: {_LOAD_ERROR}. Build it with "
                    "`python setup.py build_ext --inplace`.")
    return torch.ops.pnekern


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _make_state(sizes, dtype, gen, amsgrad):
    params = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    return {
        "params": params,
        "exp_avgs": [torch.zeros_like(p) for p in params],
        "exp_avg_sqs": [torch.zeros_like(p) for p in params],
        "max_exp_avg_sqs": [torch.zeros_like(p) for p in params] if amsgrad else [],
        "state_steps": [torch.tensor(0.0) for _ in params],
    }


def _native_step(ops, st, grads, hp, grad_scale=None, found_inf=None, sumsq_bufs=(), stats_out=None):
    ops.adamw_step_(st["params"], grads, st["exp_avgs"], st["exp_avg_sqs"], st["max_exp_avg_sqs"],
                    st["state_steps"], hp["lr"], hp["betas"][0], hp["betas"][1], hp["weight_decay"], hp["eps"],
                    hp["amsgrad"], hp["maximize"], grad_scale, found_inf, list(sumsq_bufs), stats_out)


def _torch_adamw(params, hp):
    ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = torch.optim.AdamW(ps, lr=hp["lr"], betas=hp["betas"], eps=hp["eps"], weight_decay=hp["weight_decay"],
                            amsgrad=hp["amsgrad"], maximize=hp["maximize"], foreach=False)
    return ps, opt


def _hp(amsgrad=False, maximize=False, weight_decay=1e-2, lr=1e-2):
    return dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)


# ----------------------------------------------------------------------------------------------------------------
# AdamW step vs torch.optim.AdamW(foreach=False)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_fp32_matches_torch_over_20_steps(ops, amsgrad, maximize, weight_decay):
    gen = torch.Generator().manual_seed(0)
    hp = _hp(amsgrad, maximize, weight_decay)
    st = _make_state(SIZES, torch.float32, gen, amsgrad)
    ps, opt = _torch_adamw(st["params"], hp)
    for _ in range(20):
        grads = [torch.randn(n, generator=gen) for n in SIZES]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
        _native_step(ops, st, [g.clone() for g in grads], hp)
    # fp32 with a few roundings that differ from torch's (FMA in its vectorised lerp): ~1 ulp per op per step.
    for i, p in enumerate(ps):
        s = opt.state[p]
        torch.testing.assert_close(st["params"][i], p.detach(), rtol=1e-6, atol=1e-6, msg=f"param {i}")
        torch.testing.assert_close(st["exp_avgs"][i], s["exp_avg"], rtol=1e-6, atol=1e-7, msg=f"exp_avg {i}")
        torch.testing.assert_close(st["exp_avg_sqs"][i], s["exp_avg_sq"], rtol=1e-6, atol=1e-9,
                                   msg=f"exp_avg_sq {i}")
        if amsgrad:
            torch.testing.assert_close(st["max_exp_avg_sqs"][i], s["max_exp_avg_sq"], rtol=1e-6, atol=1e-9)
        assert st["state_steps"][i].item() == s["step"].item() == 20.0


@pytest.mark.parametrize("dtype,ulp", [(torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adamw_low_precision_vs_fp32(ops, dtype, ulp, amsgrad):
    """bf16/fp16 storage, fp32 math: compare with an fp32 AdamW run from the same (rounded) start and gradients.
    The kernel rounds each stored value once per step, so its error must stay within PyTorch's own error (torch's
    foreach=False AdamW run in the low-precision dtype, every op rounded) and within a few ulps per step."""
    gen = torch.Generator().manual_seed(1)
    hp = _hp(amsgrad, weight_decay=0.1)
    steps = 5
    st = _make_state(SIZES, dtype, gen, amsgrad)
    ref_ps, ref_opt = _torch_adamw([p.float() for p in st["params"]], hp)
    low_ps, low_opt = _torch_adamw(st["params"], hp)
    for _ in range(steps):
        grads = [torch.randn(n, generator=gen).to(dtype) for n in SIZES]
        for p, q, g in zip(ref_ps, low_ps, grads):
            p.grad = g.float()
            q.grad = g.clone()
        ref_opt.step()
        low_opt.step()
        _native_step(ops, st, [g.clone() for g in grads], hp)
    for i, ref in enumerate(ref_ps):
        ref = ref.detach().double()
        ours = (st["params"][i].double() - ref).abs()
        torch_err = (low_ps[i].detach().double() - ref).abs()
        assert ours.max() <= 2 * torch_err.max() + 1e-6, (i, ours.max().item(), torch_err.max().item())
        # Per element: at most one rounding per step, each at most an ulp of the value at that time; the value moves
        # by at most ~lr per step, so |value| <= |final| + lr·steps along the way (this keeps the bound meaningful
        # for elements that cross zero).
        bound = steps * ulp * (ref.abs() + hp["lr"] * steps) + 1e-6
        assert bool((ours <= bound).all()), (i, (ours / bound).max().item())
        m_ref = ref_opt.state[ref_ps[i]]["exp_avg"].double()
        m_err = (st["exp_avgs"][i].double() - m_ref).abs().max()
        assert m_err <= steps * ulp * m_ref.abs().max() + 1e-6, (i, m_err.item())


def test_grad_scale_unscales_and_writes_back(ops):
    gen = torch.Generator().manual_seed(2)
    hp = _hp(amsgrad=True)
    scale = 1024.0  # a power of two: scaling and unscaling are exact, so torch on the unscaled grads is the oracle
    st = _make_state(SIZES, torch.float32, gen, True)
    ps, opt = _torch_adamw(st["params"], hp)
    for _ in range(3):
        grads = [torch.randn(n, generator=gen) for n in SIZES]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
        scaled = [g * scale for g in grads]
        _native_step(ops, st, scaled, hp, grad_scale=torch.tensor(scale))
        for g_written, g in zip(scaled, grads):
            assert torch.equal(g_written, g), "grad_scale must write the unscaled gradient back"
    for i, p in enumerate(ps):
        torch.testing.assert_close(st["params"][i], p.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(st["max_exp_avg_sqs"][i], opt.state[p]["max_exp_avg_sq"], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_found_inf_changes_nothing(ops, dtype):
    gen = torch.Generator().manual_seed(3)
    hp = _hp(amsgrad=True)
    st = _make_state(SIZES, dtype, gen, True)
    grads = [torch.randn(n, generator=gen).to(dtype) for n in SIZES]
    _native_step(ops, st, grads, hp)  # one real step so the state is not all zeros
    before = copy.deepcopy(st)
    grads_before = [g.clone() for g in grads]
    sumsq = [torch.rand(n, generator=gen) for n in SIZES]
    stats = torch.full((len(SIZES), 4), float("nan"), dtype=torch.float64)
    _native_step(ops, st, grads, hp, grad_scale=torch.tensor(2.0), found_inf=torch.tensor(1.0),
                 sumsq_bufs=sumsq, stats_out=stats)
    for key, tensors in before.items():
        for i, t in enumerate(tensors):
            assert torch.equal(st[key][i], t), f"{key}[{i}] changed on a found_inf step"
    for g, g0 in zip(grads, grads_before):
        assert torch.equal(g, g0), "grads changed on a found_inf step"
    assert all(s.item() == 1.0 for s in st["state_steps"]), "a skipped step must not be counted"
    assert torch.equal(stats, torch.zeros_like(stats)), "stats of a skipped step are zero"
    # found_inf == 0 is an ordinary step.
    _native_step(ops, st, grads, hp, found_inf=torch.tensor(0.0))
    assert all(s.item() == 2.0 for s in st["state_steps"])


# ----------------------------------------------------------------------------------------------------------------
# Statistics (SPEC §2)


def _stats_reference(g, v_prev, v_new, step, hp, q):
    """float64 oracle of one stats row from the state before/after the step (the second moments are the kernel's
    own fp32 values, promoted; max_exp_avg_sq when amsgrad)."""
    b2, eps = hp["betas"][1], hp["eps"]
    g = g.double()
    if step - 1 > 0:
        a_prev = 1.0 / (v_prev.double().sqrt() / math.sqrt(1 - b2 ** (step - 1)) + eps)
    else:
        a_prev = torch.ones_like(g)
    a_new = 1.0 / (v_new.double().sqrt() / math.sqrt(1 - b2**step) + eps)
    row = [(g * g).sum(), (a_prev**2 * g * g).sum(), (a_new**2 * g * g).sum(),
           (a_new**2 * q.double()).sum() if q is not None else torch.tensor(0.0, dtype=torch.float64)]
    return torch.stack(row)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("with_sumsq", [False, True])
@pytest.mark.parametrize("ncols", [4, 3, 2])
def test_stats_out_matches_float64(ops, amsgrad, with_sumsq, ncols):
    # ncols 2 (trace mode): only Σ g² and Σ a_prev² g², from the kernel's divider-light loop from step 2 on (step 1
    # has a_prev = 1 and takes the full loop). ncols 3 (A_t rows): columns 0, 2, 3, from the loop without a_prev
    # when there are sumsq buffers, else sliced from the full loop.
    gen = torch.Generator().manual_seed(4)
    hp = _hp(amsgrad, maximize=True)
    st = _make_state(SIZES, torch.float32, gen, amsgrad)
    scale = 8.0
    for step in range(1, 4):
        grads = [torch.randn(n, generator=gen) for n in SIZES]
        sumsq = [torch.rand(n, generator=gen) for n in SIZES] if with_sumsq else []
        v_prev = [t.clone() for t in (st["max_exp_avg_sqs"] if amsgrad else st["exp_avg_sqs"])]
        stats = torch.full((len(SIZES), ncols), float("nan"), dtype=torch.float64)  # poison: every cell is written
        _native_step(ops, st, [g * scale for g in grads], hp, grad_scale=torch.tensor(scale), sumsq_bufs=sumsq,
                     stats_out=stats)
        v_new = st["max_exp_avg_sqs"] if amsgrad else st["exp_avg_sqs"]
        for i in range(len(SIZES)):
            want = _stats_reference(grads[i], v_prev[i], v_new[i], step, hp, sumsq[i] if with_sumsq else None)
            want = want[[0, 2, 3]] if ncols == 3 else want[:ncols]
            torch.testing.assert_close(stats[i], want, rtol=1e-5, atol=0.0, msg=f"step {step} tensor {i}")


def test_trace_stats_rows_skip_and_shape(ops):
    # A found_inf step zeroes a 2-column row like a 4-column one; a width other than 2, 3 or 4 is rejected by name.
    gen = torch.Generator().manual_seed(6)
    st = _make_state(SIZES, torch.float32, gen, False)
    grads = [torch.randn(n, generator=gen) for n in SIZES]
    stats = torch.full((len(SIZES), 2), float("nan"), dtype=torch.float64)
    _native_step(ops, st, grads, _hp(), found_inf=torch.tensor(1.0), stats_out=stats)
    assert torch.equal(stats, torch.zeros_like(stats))
    with pytest.raises(RuntimeError, match=r"stats_out must have shape .*\[2, 4\].*\[2, 3\].*\[2, 2\]"):
        _native_step(ops, _make_state(SIZES[:2], torch.float32, gen, False), grads[:2], _hp(),
                     stats_out=torch.empty(2, 5, dtype=torch.float64))


@pytest.mark.parametrize("ncols", [4, 3, 2])
def test_stats_deterministic_across_thread_counts(ops, ncols):
    gen = torch.Generator().manual_seed(5)
    hp = _hp()
    sizes = (300001, 5, 131072)
    st1 = _make_state(sizes, torch.float32, gen, False)
    st2 = copy.deepcopy(st1)
    grads = [torch.randn(n, generator=gen) for n in sizes]
    old = torch.get_num_threads()
    out = []
    try:
        for nthreads, st in ((1, st1), (2, st2)):
            torch.set_num_threads(nthreads)
            for _ in range(2):  # step 2 has a previous state (the trace loop)
                stats = torch.empty(len(sizes), ncols, dtype=torch.float64)
                sumsq = [g.square() for g in grads] if ncols == 3 else []  # the A_t loop needs sumsq buffers
                _native_step(ops, st, [g.clone() for g in grads], hp, sumsq_bufs=sumsq, stats_out=stats)
                out.append(stats)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(out[0], out[2]) and torch.equal(out[1], out[3])
    for a, b in zip(st1["params"], st2["params"]):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------------------
# microbatch_accumulate_


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-6), (torch.float16, 1e-6)])
@pytest.mark.parametrize("with_v", [False, True])
@pytest.mark.parametrize("with_sumsq,assign_first", [(False, False), (True, False), (True, True)])
def test_microbatch_accumulate_matches_float64(ops, dtype, rtol, with_v, with_sumsq, assign_first):
    # The inputs are exactly representable in `dtype`; the sums are over fp32 products accumulated in double, so
    # the tolerance does not depend on the storage dtype. assign_first: the first call overwrites the buffer's
    # random start values (the engine's first contribution of a step) and the second adds.
    gen = torch.Generator().manual_seed(6)
    inv_sqrt_bc2, eps, scale = 1.0 / math.sqrt(1 - 0.999**3), 1e-8, 0.5
    for n in SIZES:
        acc = torch.tensor([1.0, 2.0], dtype=torch.float64)
        want = acc.clone()
        sumsq = torch.rand(n, generator=gen) if with_sumsq else None
        want_sumsq = sumsq.double() if with_sumsq else None
        for call in range(2):
            x = torch.randn(n, generator=gen).to(dtype)
            v = (torch.randn(n, generator=gen) * 1e-2).square().to(dtype) if with_v else None
            assign = assign_first and call == 0
            ops.microbatch_accumulate_(acc, x, v, inv_sqrt_bc2, eps, scale, sumsq, assign)
            y2 = (scale * x.double()) ** 2
            a = 1.0 / (v.double().sqrt() * inv_sqrt_bc2 + eps) if with_v else torch.ones_like(y2)
            want += torch.stack([y2.sum(), (a * a * y2).sum()])
            if with_sumsq:
                before = torch.zeros_like(want_sumsq) if assign else want_sumsq
                want_sumsq = (before.float() + y2.float()).double()  # the buffer is fp32: one rounding per call
        torch.testing.assert_close(acc, want, rtol=1e-5 if with_v else rtol, atol=0.0, msg=f"n={n}")
        if with_sumsq:
            torch.testing.assert_close(sumsq.double(), want_sumsq, rtol=1e-6, atol=0.0)


# ----------------------------------------------------------------------------------------------------------------
# validation, registration, build info


def _valid_call(n=3):
    gen = torch.Generator().manual_seed(7)
    st = _make_state((5,) * n, torch.float32, gen, False)
    grads = [torch.randn(5, generator=gen) for _ in range(n)]
    return st, grads


def test_non_contiguous_grad_is_rejected_by_name(ops):
    st, grads = _valid_call()
    grads[1] = torch.randn(10)[::2]
    with pytest.raises(RuntimeError, match=r"grads\[1\] must be contiguous"):
        _native_step(ops, st, grads, _hp())
    assert all(s.item() == 0.0 for s in st["state_steps"]), "a rejected call must not count a step"


def test_dtype_mismatch_is_rejected_by_name(ops):
    st, grads = _valid_call()
    st["exp_avg_sqs"][2] = st["exp_avg_sqs"][2].double()
    with pytest.raises(RuntimeError, match=r"exp_avg_sqs\[2\] has dtype"):
        _native_step(ops, st, grads, _hp())


def test_bad_stats_out_and_lengths_are_rejected(ops):
    st, grads = _valid_call()
    with pytest.raises(RuntimeError, match=r"stats_out must have shape"):
        _native_step(ops, st, grads, _hp(), stats_out=torch.empty(2, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"stats_out must be float64"):
        _native_step(ops, st, grads, _hp(), stats_out=torch.empty(3, 4))
    with pytest.raises(RuntimeError, match=r"3 params but 2 grads"):
        _native_step(ops, st, grads[:2], _hp())
    with pytest.raises(RuntimeError, match=r"amsgrad=True needs one max_exp_avg_sqs"):
        _native_step(ops, st, grads, _hp(amsgrad=True))
    with pytest.raises(RuntimeError, match=r"acc must be a contiguous float64"):
        ops.microbatch_accumulate_(torch.zeros(2), torch.randn(4), None, 1.0, 1e-8, 1.0, None)
    with pytest.raises(RuntimeError, match=r"v has dtype"):
        ops.microbatch_accumulate_(torch.zeros(2, dtype=torch.float64), torch.randn(4), torch.rand(4).half(), 1.0,
                                   1e-8, 1.0, None)


def test_schema_marks_mutations_and_meta_traces(ops):
    schema = str(ops.adamw_step_.default._schema)
    for arg in ("Tensor(a!)[] params", "Tensor(b!)[] grads", "Tensor(f!)[] state_steps", "Tensor(g!)? stats_out"):
        assert arg in schema
    # Meta tensors dispatch to the registered no-op meta kernel (what FakeTensor tracing uses).
    p = [torch.empty(4, device="meta")]
    ops.adamw_step_(p, [torch.empty(4, device="meta")], [torch.empty(4, device="meta")],
                    [torch.empty(4, device="meta")], [], [torch.tensor(0.0)], 1e-3, 0.9, 0.999, 0.0, 1e-8, False,
                    False, None, None, [], None)
    ops.microbatch_accumulate_(torch.empty(2, dtype=torch.float64, device="meta"), torch.empty(4, device="meta"),
                               None, 1.0, 1e-8, 1.0, None)


def test_build_info(ops):
    mod = importlib.import_module("pnekern._C") if _can_import_c() else None
    if mod is None:
        pytest.fail("pnekern._C does not import as a module (build_info lives there)")
    info = mod.build_info()
    assert {"compiler", "cxx_flags", "openmp", "with_cuda", "backends"} <= set(info)
    assert "cpu" in info["backends"] and "-fno-math-errno" in info["cxx_flags"]
    assert info["openmp"] is not None, "the extension must be built with OpenMP"


def _can_import_c():
    try:
        importlib.import_module("pnekern._C")
        return True
    except Exception:  # noqa: BLE001
        return False


def test_opcheck_schema_fake_and_aot(ops):
    """torch.library.opcheck: mutation annotations match what the kernels write, and the Meta (fake) kernels let
    FakeTensor / AOT dispatch trace the ops."""
    gen = torch.Generator().manual_seed(8)
    st = _make_state((5, 3), torch.float32, gen, True)
    grads = [torch.randn(n, generator=gen) for n in (5, 3)]
    args = (st["params"], grads, st["exp_avgs"], st["exp_avg_sqs"], st["max_exp_avg_sqs"], st["state_steps"], 1e-3,
            0.9, 0.999, 0.01, 1e-8, True, False, torch.tensor(2.0), None, [torch.rand(5), torch.rand(3)],
            torch.empty(2, 4, dtype=torch.float64))
    torch.library.opcheck(ops.adamw_step_.default, args)
    margs = (torch.zeros(2, dtype=torch.float64), torch.randn(7), torch.rand(7), 1.0, 1e-8, 1.0, torch.zeros(7))
    torch.library.opcheck(ops.microbatch_accumulate_.default, margs)


# ----------------------------------------------------------------------------------------------------------------
# ISA dispatch: every level compiled in and supported by this CPU gives bitwise identical results


def _isa_levels():
    if not _can_import_c():
        return []
    mod = importlib.import_module("pnekern._C")
    return list(mod.build_info()["cpu_isa"]["supported"])


def test_cpu_isa_info_and_bad_level_is_rejected(ops):
    mod = importlib.import_module("pnekern._C")
    info = mod.build_info()["cpu_isa"]
    assert info["compiled"][0] == "baseline" and "baseline" in info["supported"]
    assert info["selected"] in info["supported"]
    with pytest.raises((ValueError, RuntimeError), match="avx9"):
        mod.set_cpu_isa("avx9")
    assert mod.cpu_isa() == info["selected"]  # a rejected request changes nothing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("ncols", [4, 3, 2])
def test_isa_levels_are_bitwise_identical(ops, dtype, amsgrad, ncols):
    # ncols 2 without sumsq buffers runs the trace-only stats loop, ncols 3 with them the loop without a_prev.
    mod = importlib.import_module("pnekern._C")
    levels = _isa_levels()
    before = mod.cpu_isa()
    sizes = (1, 17, 1023, 70001)  # tails shorter than a vector and than a stats block, and a chunk boundary
    hp = _hp(amsgrad, maximize=False, weight_decay=0.1)
    results = {}
    try:
        for level in levels:
            mod.set_cpu_isa(level)
            gen = torch.Generator().manual_seed(11)
            st = _make_state(sizes, dtype, gen, amsgrad)
            stats_rows, acc = [], torch.zeros(2, dtype=torch.float64)
            for _ in range(3):
                grads = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
                sumsq = [torch.rand(n, generator=gen) for n in sizes]
                ops.microbatch_accumulate_(acc, grads[-1], st["exp_avg_sqs"][-1], 1.3, 1e-8, 0.5, sumsq[-1])
                stats = torch.empty(len(sizes), ncols, dtype=torch.float64)
                _native_step(ops, st, grads, hp, sumsq_bufs=sumsq if ncols != 2 else [], stats_out=stats)
                stats_rows.append(stats)
            results[level] = [*st["params"], *st["exp_avgs"], *st["exp_avg_sqs"], *st["max_exp_avg_sqs"],
                              *stats_rows, acc]
    finally:
        mod.set_cpu_isa(before)
    base = results[levels[0]]
    for level in levels[1:]:
        for i, (a, b) in enumerate(zip(base, results[level])):
            assert torch.equal(a, b), f"{level} differs from {levels[0]} in output {i}"


# ----------------------------------------------------------------------------------------------------------------
# In-step noise (SPEC §5): portable polynomial log/cos, so every ISA level and thread count gives the same bits


def _noise_args(sizes, gen, mode, rank):
    var = [torch.rand(n, generator=gen) + 0.1 if i % 2 == 0 else torch.tensor([0.7]) for i, n in enumerate(sizes)]
    basis = [torch.randn(n, rank, generator=gen) if rank else torch.empty(0) for n in sizes]
    coef = [torch.randn(rank, generator=gen) if rank else torch.empty(0) for _ in sizes]
    return dict(noise_mode=mode, noise_seed=-12345, noise_counter=7, noise_param_coef=0.05,
                noise_scale=torch.tensor(1.7) if mode != 3 else None, noise_tensor_idx=list(range(len(sizes))),
                noise_var=var, noise_basis=basis if rank else None, noise_coef=coef if rank else None)


def _noisy_step(ops, st, grads, hp, noise, stats_out=None, grad_scale=None):
    ops.adamw_step_(st["params"], grads, st["exp_avgs"], st["exp_avg_sqs"], st["max_exp_avg_sqs"],
                    st["state_steps"], hp["lr"], hp["betas"][0], hp["betas"][1], hp["weight_decay"], hp["eps"],
                    hp["amsgrad"], hp["maximize"], grad_scale, None, [], stats_out, **noise)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode,rank", [(1, 0), (2, 3), (3, 1)])
def test_isa_levels_are_bitwise_identical_with_noise(ops, dtype, mode, rank):
    mod = importlib.import_module("pnekern._C")
    levels = _isa_levels()
    before, threads = mod.cpu_isa(), torch.get_num_threads()
    sizes = (1, 17, 1023, 70001)
    hp = _hp(amsgrad=mode == 2, maximize=mode == 1, weight_decay=0.1)
    results = {}
    try:
        for level, nthreads in [(lv, 2) for lv in levels] + [(levels[0], 1)]:
            mod.set_cpu_isa(level)
            torch.set_num_threads(nthreads)
            gen = torch.Generator().manual_seed(21)
            st = _make_state(sizes, dtype, gen, hp["amsgrad"])
            noise = _noise_args(sizes, gen, mode, rank)
            rows = []
            for _ in range(2):
                grads = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
                stats = torch.empty(len(sizes), 4, dtype=torch.float64)
                _noisy_step(ops, st, grads, hp, noise, stats_out=stats, grad_scale=torch.tensor(4.0))
                rows.append(stats)
                noise["noise_counter"] += 1
            results[level, nthreads] = [*st["params"], *st["exp_avgs"], *st["exp_avg_sqs"], *rows]
    finally:
        mod.set_cpu_isa(before)
        torch.set_num_threads(threads)
    keys = list(results)
    for key in keys[1:]:
        for i, (a, b) in enumerate(zip(results[keys[0]], results[key])):
            assert torch.equal(a, b), f"{key} differs from {keys[0]} in output {i}"


@pytest.mark.parametrize("rank", [1, 2, 4, 5, 8, 9, 12])
def test_in_step_lowrank_part_is_the_references_bits(ops, rank):
    """ε = Σ_j U[e, j]·c_j with δ = 0 (z·0 = 0), read off m of a zero-gradient step with β1 = 0: the kernel's
    compile-time-rank loops (k ≤ 8) and its run-time-stride loop (k > 8) add the columns in the reference's order,
    bit for bit, on every ISA level."""
    from pnekern.reference.adamw import step_noise

    mod = importlib.import_module("pnekern._C")
    before = mod.cpu_isa()
    sizes = (1, 7, 300, 1029)
    gen = torch.Generator().manual_seed(rank)
    basis = [torch.randn(n, rank, generator=gen) for n in sizes]
    coef = [torch.randn(rank, generator=gen) for _ in sizes]
    noise = dict(noise_mode=2, noise_seed=99, noise_counter=3, noise_tensor_idx=list(range(len(sizes))),
                 noise_var=[torch.zeros(1) for _ in sizes], noise_basis=basis, noise_coef=coef)
    want = [step_noise(n, 99, 3, i, torch.zeros(1), basis[i], coef[i]) for i, n in enumerate(sizes)]
    try:
        for level in _isa_levels():
            mod.set_cpu_isa(level)
            st = _make_state(sizes, torch.float32, torch.Generator().manual_seed(0), False)
            _noisy_step(ops, st, [torch.zeros(n) for n in sizes], dict(_hp(), betas=(0.0, 0.999)), noise)
            for i, (m, w) in enumerate(zip(st["exp_avgs"], want)):
                assert torch.equal(m, w), f"{level}, tensor {i}: max |Δ| {float((m - w).abs().max())}"
    finally:
        mod.set_cpu_isa(before)


def test_in_step_normals_match_the_reference_stream(ops):
    """ε = z·1 read off a zero-gradient step (β1 = 0: m = g + ε exactly) against the reference normals: the C++
    polynomial log/cos agree with torch.log/torch.cos to ≤ 1e-6 absolute over 2^20 normals (|z| up to ~5.3)."""
    from pnekern.reference.philox import philox_normal

    n = 1 << 20
    st = _make_state((n,), torch.float32, torch.Generator().manual_seed(0), False)
    st["params"][0].zero_()
    ops.adamw_step_(st["params"], [torch.zeros(n)], st["exp_avgs"], st["exp_avg_sqs"], [], st["state_steps"], 1.0,
                    0.0, 0.9, 0.0, 1.0, False, False, None, None, [], None, noise_mode=2, noise_seed=2**40 + 3,
                    noise_counter=5, noise_tensor_idx=[9], noise_var=[torch.ones(1)])
    want = philox_normal(2**40 + 3, 5, 9, n)
    err = (st["exp_avgs"][0] - want).abs()
    assert float(err.max()) <= 1e-6, float(err.max())
    assert float(want.abs().max()) > 4.5  # the tail is covered


def test_noise_arguments_are_validated_by_name(ops):
    gen = torch.Generator().manual_seed(1)
    st = _make_state((5,), torch.float32, gen, False)
    grads = [torch.randn(5)]
    with pytest.raises(RuntimeError, match=r"noise_mode must be 0"):
        _noisy_step(ops, st, grads, _hp(), dict(noise_mode=4))
    with pytest.raises(RuntimeError, match=r"noise_var\[0\] has 3 elements"):
        _noisy_step(ops, st, grads, _hp(), dict(noise_mode=1, noise_tensor_idx=[0], noise_var=[torch.ones(3)]))
    with pytest.raises(RuntimeError, match=r"noise_basis\[0\] must be a contiguous float32 \[5, k\]"):
        _noisy_step(ops, st, grads, _hp(), dict(noise_mode=1, noise_tensor_idx=[0], noise_var=[torch.ones(1)],
                                                noise_basis=[torch.ones(4, 2)], noise_coef=[torch.ones(2)]))
    with pytest.raises(RuntimeError, match=r"one noise_tensor_idx per param"):
        _noisy_step(ops, st, grads, _hp(), dict(noise_mode=1, noise_tensor_idx=[], noise_var=[torch.ones(1)]))


def test_opcheck_with_noise(ops):
    gen = torch.Generator().manual_seed(8)
    st = _make_state((5, 3), torch.float32, gen, False)
    grads = [torch.randn(n, generator=gen) for n in (5, 3)]
    args = (st["params"], grads, st["exp_avgs"], st["exp_avg_sqs"], [], st["state_steps"], 1e-3, 0.9, 0.999, 0.01,
            1e-8, False, False, torch.tensor(2.0), None, [], torch.empty(2, 4, dtype=torch.float64), 1, 3, 4, 0.0,
            torch.tensor(0.5), [0, 1], [torch.rand(5), torch.rand(1)], [torch.randn(5, 2), torch.empty(0)],
            [torch.randn(2), torch.empty(0)])
    torch.library.opcheck(ops.adamw_step_.default, args)
    schema = str(ops.adamw_step_.default._schema)
    assert "Tensor[]? noise_var=None" in schema and "Tensor(a!)[] params" in schema
