"""Output-space GGN estimator (CurvatureProbe(kind="ggn", estimator="output")): Tr(A Jᵀ Λ J A) from one vjp per probe.

Oracles are independent of pnekern.probes: the Jacobian J of the flat model output w.r.t. the flat parameters from
torch.autograd.functional.jacobian, Λ written out densely from the loss definition, exact = Σ_i a_i² (JᵀΛJ)_ii.
Checked on an MLP with MSE, an MLP with cross-entropy and a tiny RegressionTransformer, for whole-batch probes and
for per-probe random sub-batches (rows_per_probe): agreement within 3 SE, unbiasedness over many seeds, stderr
coverage, vectorised == looped == a dense re-computation with the same random draws, per-parameter breakdown, and
side-effect freedom.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.func import functional_call

from pnekern.icl.models import RegressionTransformer
from pnekern.probes import CurvatureProbe, output_space_ggn_trace

DT = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def _call(model, inputs):
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def dense_jacobian(model, inputs):
    """(numel(output), d) Jacobian of the flat output w.r.t. the flat parameters (model.parameters() order)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(t):
        params = {n: c.view(s) for n, c, s in zip(names, torch.split(t, sizes), shapes)}
        return _call(lambda *a: functional_call(model, params, a), inputs).reshape(-1)

    return torch.autograd.functional.jacobian(f, theta)


def dense_lambda(model, inputs, loss):
    """Λ = ∂²loss/∂f² (mean reduction) as a dense matrix over the flat output, and its output's shape."""
    with torch.no_grad():
        out = _call(model, inputs)
    if loss == "mse":
        return 2.0 / out.numel() * torch.eye(out.numel(), dtype=out.dtype), out.shape
    n, c = out.shape
    p = torch.softmax(out, -1)
    lam = torch.zeros(n * c, n * c, dtype=out.dtype)
    for i in range(n):
        lam[i * c:(i + 1) * c, i * c:(i + 1) * c] = (torch.diag(p[i]) - torch.outer(p[i], p[i])) / n
    return lam, out.shape


def make_mlp_mse(seed=0, n=12):
    g = gen(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    x = torch.randn(n, 4, generator=g, dtype=DT)
    y = torch.randn(n, 3, generator=g, dtype=DT)
    return SimpleNamespace(model=model, loss_fn=nn.MSELoss(), batch=(x, y), loss="mse")


def make_mlp_ce(seed=0, n=12):
    g = gen(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    x = torch.randn(n, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (n,), generator=g)
    with torch.no_grad():
        model[2].weight.mul_(4.0)  # confident, unequal softmax rows: a non-trivial Λ
    return SimpleNamespace(model=model, loss_fn=nn.CrossEntropyLoss(), batch=(x, y), loss="ce")


def make_transformer(seed=0, n=6):
    g = gen(seed)
    torch.manual_seed(seed)
    model = RegressionTransformer(2, 4, n_layer=1, n_head=2, d_model=8, token_format="pair").to(DT)
    for p in model.parameters():  # away from the GPT-2 init's zero biases / unit LayerNorms
        with torch.no_grad():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=DT))
    xs = torch.randn(n, 4, 2, generator=g, dtype=DT)
    ys = xs @ torch.randn(2, generator=g, dtype=DT)
    return SimpleNamespace(model=model, loss_fn=nn.MSELoss(), batch=((xs, ys), ys), loss="mse")


MAKERS = {"mlp_mse": make_mlp_mse, "mlp_ce": make_mlp_ce, "transformer": make_transformer}


def _setup(name, seed=0):
    m = MAKERS[name](seed)
    j = dense_jacobian(m.model, m.batch[0])
    lam, shape = dense_lambda(m.model, m.batch[0], m.loss)
    d = j.shape[1]
    a = torch.exp(torch.empty(d, dtype=DT).uniform_(-1.5, 1.5, generator=gen(100 + seed)))
    ggn_diag = torch.einsum("oi,op,pi->i", j, lam, j)
    m.exact = float((a**2 * ggn_diag).sum())
    sizes = [p.numel() for p in m.model.parameters()]
    m.exact_blocks = [float(c.sum()) for c in torch.split(a**2 * ggn_diag, sizes)]
    m.j, m.lam, m.out_shape, m.a = j, lam, shape, a
    m.a_list = [c.view(p.shape) for c, p in zip(torch.split(a, sizes), m.model.parameters())]
    return m


@pytest.fixture(scope="module")
def setups():
    return {name: _setup(name) for name in MAKERS}


ROWS = [None, 4]


@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("rows", ROWS)
def test_estimate_within_three_standard_errors(setups, name, rows):
    m = setups[name]
    # One fixed draw: the samples are squared norms (skewed), so a low estimate comes with a small stderr and
    # |z| > 3 happens in ~1% of seeds (coverage itself is checked over many seeds below).
    probe = CurvatureProbe(m.model, m.loss_fn, m.batch, num_probes=128, seed=1, rows_per_probe=rows)
    assert probe.estimator == "output"  # the default for kind="ggn"
    res = probe.measure(m.a_list)
    v, se = float(res.value), float(res.stderr)
    assert res.estimator == "output" and res.num_matvecs == 128 and res.value.dtype == DT
    assert 0 < se < 0.5 * m.exact
    assert abs(v - m.exact) < 3 * se, (name, rows, v, m.exact, se)
    # per-parameter breakdown: sums to the total, each block within 4 SE of its exact block trace
    assert res.per_param is not None and len(res.per_param) == len(m.exact_blocks)
    assert sum(float(b["value"]) for b in res.per_param) == pytest.approx(v, rel=1e-12)
    for b, ex in zip(res.per_param, m.exact_blocks):
        assert abs(float(b["value"]) - ex) <= 4 * float(b["stderr"]) + 1e-12 * m.exact, (name, rows, b, ex)


def _values(m, seeds, num_probes, rows):
    vals, ses = [], []
    for s in seeds:
        est = output_space_ggn_trace(m.model, m.loss_fn, m.batch, a=m.a, num_probes=num_probes, generator=gen(s),
                                     rows_per_probe=rows)
        vals.append(est.value)
        ses.append(est.stderr)
    return torch.tensor(vals, dtype=DT), torch.tensor(ses, dtype=DT)


@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("rows", ROWS)
def test_unbiased_over_seeds(setups, name, rows):
    m = setups[name]
    vals, _ = _values(m, range(300), 4, rows)
    se_mean = float(vals.std()) / math.sqrt(len(vals))
    assert abs(float(vals.mean()) - m.exact) < 3 * se_mean, (name, rows, float(vals.mean()), m.exact, se_mean)
    assert se_mean < 0.1 * m.exact  # the check has power: a 30% bias (e.g. a wrong Λ factor) would be caught


@pytest.mark.parametrize("name", ["mlp_mse", "mlp_ce"])
@pytest.mark.parametrize("rows", ROWS)
def test_stderr_is_calibrated(setups, name, rows):
    m = setups[name]
    vals, ses = _values(m, range(1000, 1120), 32, rows)
    coverage = float(((vals - m.exact).abs() <= 2 * ses).to(DT).mean())
    assert 0.88 <= coverage <= 0.99, (name, rows, coverage)
    # the reported stderr matches the actual spread of the estimates across seeds
    ratio = float(ses.mean()) / float(vals.std())
    assert 0.8 < ratio < 1.2, (name, rows, ratio)


@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("rows", ROWS)
def test_vectorised_equals_loop_and_dense_recomputation(setups, name, rows):
    m = setups[name]
    k = 6
    kw = dict(a=m.a, num_probes=k, rows_per_probe=rows)
    from pnekern.probes._output_space import output_space_samples

    vec, meta_v = output_space_samples(m.model, m.loss_fn, m.batch, generator=gen(9), vectorize=True, **kw)
    loop, meta_l = output_space_samples(m.model, m.loss_fn, m.batch, generator=gen(9), vectorize=False, **kw)
    chunked, _ = output_space_samples(m.model, m.loss_fn, m.batch, generator=gen(9), vectorize=True, chunk_size=4, **kw)
    assert meta_v["vectorized"] is True and "vmap_error" not in meta_v and meta_l["vectorized"] is False
    assert vec.shape == (len(m.exact_blocks), k)
    torch.testing.assert_close(vec, loop, rtol=1e-12, atol=0)
    torch.testing.assert_close(chunked, loop, rtol=1e-12, atol=0)
    # Dense re-computation with the documented draw order: subsets first, then ξ_j per probe.
    expected = _ce_expected(m, rows, k) if m.loss == "ce" else _mse_expected(m, rows, k)
    torch.testing.assert_close(vec.sum(0), torch.tensor(expected, dtype=DT), rtol=1e-10, atol=0)


def _mse_expected(m, rows, k):
    """MSE samples (N/m)·‖A Jᵀ √s ξ‖² with ξ zero outside the probe's rows (same draws as the estimator)."""
    g = gen(9)
    n = m.out_shape[0]
    if rows is not None:
        subsets = [torch.randperm(n, generator=g)[:rows] for _ in range(k)]
    per_row = math.prod(m.out_shape[1:])
    lam_half = _sqrt_psd(m.lam)  # Λ = s I → √s I
    out = []
    for j in range(k):
        idx = torch.arange(n) if rows is None else subsets[j]
        xi = (2 * torch.randint(0, 2, (len(idx),) + tuple(m.out_shape[1:]), generator=g) - 1).to(DT).reshape(-1)
        flat = (idx[:, None] * per_row + torch.arange(per_row)[None, :]).reshape(-1)  # output entries of the rows
        xi_full = torch.zeros(m.j.shape[0], dtype=DT)
        xi_full[flat] = xi
        out.append((n / len(idx)) * float(((m.a * (m.j.T @ (lam_half @ xi_full))) ** 2).sum()))
    return out


def _sqrt_psd(mat):
    w, v = torch.linalg.eigh(mat)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def _ce_expected(m, rows, k):
    """CE samples with the factor L_m = √c (diag √p − p √pᵀ) written out densely per row (same draws)."""
    g = gen(9)
    with torch.no_grad():
        logits = m.model(m.batch[0])
    n, c = logits.shape
    p = torch.softmax(logits, -1)
    if rows is not None:
        subsets = [torch.randperm(n, generator=g)[:rows] for _ in range(k)]
    out = []
    for j in range(k):
        idx = torch.arange(n) if rows is None else subsets[j]
        xi = (2 * torch.randint(0, 2, (len(idx), c), generator=g) - 1).to(DT)
        u = torch.zeros(n * c, dtype=DT)
        for r, i in enumerate(idx.tolist()):
            lf = (torch.diag(p[i].sqrt()) - torch.outer(p[i], p[i].sqrt())) / math.sqrt(n)
            u[i * c:(i + 1) * c] = lf @ xi[r]
        out.append((n / len(idx)) * float(((m.a * (m.j.T @ u)) ** 2).sum()))
    return out


def test_ce_factor_squares_to_lambda():
    p = torch.softmax(torch.randn(5, dtype=DT, generator=gen(1)), -1)
    lf = torch.diag(p.sqrt()) - torch.outer(p, p.sqrt())
    torch.testing.assert_close(lf @ lf.T, torch.diag(p) - torch.outer(p, p), rtol=0, atol=1e-15)


def test_rows_per_probe_auto_and_whole_batch_equivalence(setups):
    m = setups["mlp_mse"]
    # rows_per_probe ≥ N is the whole batch (same draws, same numbers)
    r_all = CurvatureProbe(m.model, m.loss_fn, m.batch, num_probes=8, rows_per_probe=99).measure(m.a)
    r_none = CurvatureProbe(m.model, m.loss_fn, m.batch, num_probes=8).measure(m.a)
    assert float(r_all.value) == float(r_none.value) and r_none.metadata["rows_per_probe"] == "all"
    r_auto = CurvatureProbe(m.model, m.loss_fn, m.batch, num_probes=4, rows_per_probe="auto").measure(m.a)
    assert r_auto.metadata["rows_per_probe"] == 3  # ⌈12 / 4⌉


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3))
        self.frozen_bn = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.frozen_bn(self.body(x)))


@pytest.mark.parametrize("eval_mode", [True, False])
@pytest.mark.parametrize("options", [dict(), dict(vectorize=True), dict(rows_per_probe=4),
                                     dict(rows_per_probe=4, vectorize=False)])
def test_output_estimator_leaves_model_grads_modes_buffers_and_rng_as_found(eval_mode, options):
    torch.manual_seed(0)
    net = _Net().to(DT)
    net.train()
    net.frozen_bn.eval()
    x, y = torch.randn(10, 4, dtype=DT), torch.randn(10, 2, dtype=DT)
    net(x)
    hooked = []
    for p in net.parameters():
        p.grad = torch.randn_like(p)
        p.register_hook(lambda g: hooked.append(g))
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    bufs = {n: b.clone() for n, b in net.named_buffers()}
    modes = {n: m.training for n, m in net.named_modules()}
    rng = torch.get_rng_state()
    probe = CurvatureProbe(net, nn.MSELoss(), [(x, y), (x[:6], y[:6])], num_probes=4, eval_mode=eval_mode, **options)
    r0, r1 = probe.measure(), probe.measure()
    assert r0.estimator == "output" and (r0.batch_index, r1.batch_index) == (0, 1)
    assert r0.mode == ("eval" if eval_mode else "train")
    assert math.isfinite(float(r0.value)) and float(r0.value) > 0
    assert all(torch.equal(p, params[n]) for n, p in net.named_parameters())
    assert all(torch.equal(p.grad, grads[n]) for n, p in net.named_parameters())
    assert all(torch.equal(b, bufs[n]) for n, b in net.named_buffers())
    assert {n: m.training for n, m in net.named_modules()} == modes
    assert torch.equal(torch.get_rng_state(), rng)
    assert hooked == []  # tensor hooks on the parameters (the optimizer's statistics) never fire


def test_defaults_and_bad_arguments(setups):
    m = setups["mlp_ce"]
    assert CurvatureProbe(m.model, m.loss_fn, m.batch).estimator == "output"
    assert CurvatureProbe(m.model, m.loss_fn, m.batch, kind="hessian").estimator == "hutchinson"
    assert CurvatureProbe(m.model, m.loss_fn, m.batch, estimator="hutchinson").estimator == "hutchinson"
    bad = [
        (dict(kind="hessian", estimator="output"), "output"),
        (dict(rows_per_probe=0), "rows_per_probe"),
        (dict(rows_per_probe="some"), "rows_per_probe"),
        (dict(estimator="hutchinson", rows_per_probe=4), "output"),
        (dict(vectorize="yes"), "vectorize"),
        (dict(probe_chunk=0), "probe_chunk"),
    ]
    for kwargs, word in bad:
        with pytest.raises(ValueError, match=word):
            CurvatureProbe(m.model, m.loss_fn, m.batch, **kwargs)
    # sub-batches need a leading batch dimension on every input tensor
    probe = CurvatureProbe(m.model, m.loss_fn, m.batch, rows_per_probe=2,
                           forward=lambda mod, inp: mod(inp[0]) + 0 * inp[1].sum())
    probe.batches = [((m.batch[0], torch.ones(3, dtype=DT)), m.batch[1])]
    with pytest.raises(ValueError, match="leading batch dimension"):
        probe.measure()
