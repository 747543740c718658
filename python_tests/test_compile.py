"""``torch.compile`` of training steps that call ``pnekern.AdamW.step()`` (CPU, ``backend="cpp"``).

Contract: the fused step op has a fake (Meta) implementation, so Dynamo puts ``torch.ops.pnekern.adamw_step_`` into
the graph instead of breaking around it; ``step()`` without statistics compiles with ``fullgraph=True``; with
statistics the bookkeeping around the kernels may graph-break, and results stay bitwise equal to eager.
"""
from __future__ import annotations

import pytest
import torch

import pnekern

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _model_and_data(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    x, y = torch.randn(32, 8), torch.randn(32, 3)
    return model, x, y


def _require_native():
    if not pnekern.ops.native_available():
        pytest.fail(f"the compiled extension is not available: {pnekern._native.load_error()}; build it with "
                    "`python setup.py build_ext --inplace`")


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("stats", ["trace", pytest.param("diag", marks=pytest.mark.slow)])
def test_compiled_training_step_is_bitwise_eager(stats):
    _require_native()
    results = []
    for compiled in (False, True):
        model, x, y = _model_and_data()
        opt = pnekern.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, backend="cpp", stats=stats,
                            batch_size=32 if stats else None)

        def train_step():
            for xb, yb in ((x[:16], y[:16]), (x[16:], y[16:])):  # two micro-batches: a variance per step
                (torch.nn.functional.mse_loss(model(xb), yb) / 2).backward()
            opt.step()
            opt.zero_grad()

        fn = torch.compile(train_step) if compiled else train_step
        for _ in range(4):
            fn()
        s = opt.last_stats().to_dict() if stats else {}
        results.append(([p.detach().clone() for p in model.parameters()],
                        {k: float(s[k]) for k in ("trace_noise", "trace_precond_noise", "temperature", "pne")
                         if k in s}))
    (pe, se), (pc, sc) = results
    for a, b in zip(pe, pc):
        assert torch.equal(a, b)
    assert se == sc
    if stats:
        assert se["trace_noise"] > 0.0


def test_step_without_stats_compiles_fullgraph_with_the_kernel_in_the_graph():
    _require_native()
    graphs: list[torch.fx.GraphModule] = []

    def capture(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    model_e, x, y = _model_and_data()
    model_c, _, _ = _model_and_data()
    opt_e = pnekern.AdamW(model_e.parameters(), lr=1e-2, backend="cpp")
    opt_c = pnekern.AdamW(model_c.parameters(), lr=1e-2, backend="cpp")

    @torch.compile(backend=capture, fullgraph=True)  # raises on any graph break
    def compiled_step():
        opt_c.step()

    for _ in range(3):
        for model in (model_e, model_c):
            torch.nn.functional.mse_loss(model(x), y).backward()
        opt_e.step()
        compiled_step()
        opt_e.zero_grad()
        opt_c.zero_grad()
    for a, b in zip(model_e.parameters(), model_c.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(opt_e.state.values(), opt_c.state.values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"]) and torch.equal(a["step"], b["step"])
    targets = [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert any("pnekern.adamw_step_" in t for t in targets), targets
