"""The Triton launchers registered as torch.library custom ops (``torch.ops.pnekern_triton``): schema, mutation and
fake-tensor checks (``torch.library.opcheck``), and ``torch.compile(fullgraph=True)`` of a step on the Triton backend
records the launch as one node instead of breaking the graph. CPU tensors under the interpreter in CI."""
from __future__ import annotations

import pytest
import torch
from _triton_setup import triton_device

DEVICE = triton_device()

import pnekern  # noqa: E402
from pnekern.kernels import library  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _inputs(n=(5, 33), noise=False):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(k, generator=gen).to(DEVICE) for k in n]
    args = [
        ps, [torch.randn(k, generator=gen).to(DEVICE) for k in n], [torch.zeros(k, device=DEVICE) for k in n],
        [torch.zeros(k, device=DEVICE) for k in n], [], [torch.tensor(0.0) for _ in n],
        1e-2, None, 0.9, 0.999, 0.1, 1e-8, False, False, None, None,
        [torch.rand(k, generator=gen).to(DEVICE) for k in n], torch.zeros(len(n), 4, dtype=torch.float64, device=DEVICE),
    ]
    if noise:
        args += [1, 7, 3, 0.0, None, list(range(len(n))), [torch.full((k,), 0.01, device=DEVICE) for k in n], [], []]
    else:
        args += [0, 0, 0, 0.0, None, [], [], [], []]
    return args


@pytest.mark.parametrize("noise", [False, True])
def test_adamw_op_matches_the_launcher_and_passes_opcheck(noise):
    from pnekern.kernels.adamw_step import adamw_step_

    a, b = _inputs(noise=noise), _inputs(noise=noise)
    library.adamw_step_op(*a)
    b_launch = list(b)
    b_launch[6] = b[6]  # lr float; lr_tensor None is dropped for the launcher
    adamw_step_(*b_launch[:7], *b_launch[8:])
    for x, y in zip(a[0] + a[2] + a[3] + [a[17]], b[0] + b[2] + b[3] + [b[17]]):
        assert torch.equal(x, y)
    torch.library.opcheck(torch.ops.pnekern_triton.adamw_step_.default, tuple(_inputs(noise=noise)),
                          test_utils=("test_schema", "test_faketensor"))


def test_microbatch_op_passes_opcheck():
    gen = torch.Generator().manual_seed(1)
    args = (torch.zeros(2, dtype=torch.float64, device=DEVICE), torch.randn(37, generator=gen).to(DEVICE),
            torch.rand(37, generator=gen).to(DEVICE), 1.2, 1e-8, 0.5, torch.zeros(37, device=DEVICE))
    torch.library.opcheck(torch.ops.pnekern_triton.microbatch_accumulate_.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_compiled_triton_step_is_one_node_and_matches_eager():
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def make():
        torch.manual_seed(0)
        return torch.nn.Linear(6, 3).to(DEVICE)

    me, mc = make(), make()
    oe = pnekern.AdamW(me.parameters(), lr=1e-2, backend="triton")
    oc = pnekern.AdamW(mc.parameters(), lr=1e-2, backend="triton")

    @torch.compile(backend=capture, fullgraph=True)
    def step():
        oc.step()

    x = torch.randn(8, 6, device=DEVICE)
    for _ in range(2):
        for m in (me, mc):
            m(x).square().mean().backward()
        oe.step()
        step()
        oe.zero_grad()
        oc.zero_grad()
    for a, b in zip(me.parameters(), mc.parameters()):
        assert torch.equal(a, b)
    targets = [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert any("pnekern_triton.adamw_step_" in t for t in targets), targets
