"""Tiny float64 models and dense oracles (Hessian by torch.autograd.functional, GGN by explicit Jacobians).

The oracles are built independently of pnekern.probes: the Hessian from ``torch.autograd.functional.hessian`` of the
loss as a function of the flat parameter vector, the GGN as Jᵀ Λ J with J from
``torch.autograd.functional.jacobian`` and Λ written out as a dense matrix from the loss definition.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.func import functional_call

DT = torch.float64


def _flat_fn(model, fn):
    names = [n for n, p in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def unflat(theta):
        return {n: c.view(s) for n, c, s in zip(names, torch.split(theta, sizes), shapes)}

    def f(theta):
        return fn(lambda *args: functional_call(model, unflat(theta), args))

    return f


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def dense_hessian(model, loss_fn, inputs, targets) -> torch.Tensor:
    f = _flat_fn(model, lambda call: loss_fn(call(inputs), targets))
    return torch.autograd.functional.hessian(f, flat_params(model))


def dense_jacobian(model, inputs) -> torch.Tensor:
    """J of shape (numel(output), d)."""
    f = _flat_fn(model, lambda call: call(inputs).reshape(-1))
    return torch.autograd.functional.jacobian(f, flat_params(model))


def dense_ggn_mse(model, inputs, reduction="mean") -> torch.Tensor:
    j = dense_jacobian(model, inputs)
    scale = 2.0 / j.shape[0] if reduction == "mean" else 2.0
    return scale * j.T @ j


def dense_ggn_ce(model, inputs, reduction="mean") -> torch.Tensor:
    """Logits (N, C): Λ = (1/N) ⊕_n (diag p_n − p_n p_nᵀ) (mean), written as a dense (NC, NC) matrix."""
    with torch.no_grad():
        logits = model(inputs)
    n, c = logits.shape
    p = torch.softmax(logits, -1)
    lam = torch.zeros(n * c, n * c, dtype=logits.dtype)
    for i in range(n):
        lam[i * c:(i + 1) * c, i * c:(i + 1) * c] = torch.diag(p[i]) - torch.outer(p[i], p[i])
    if reduction == "mean":
        lam = lam / n
    j = dense_jacobian(model, inputs)
    return j.T @ lam @ j


def make_linreg(seed: int = 0, n: int = 16, d_in: int = 5, d_out: int = 2):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Linear(d_in, d_out).to(DT)
    # Inputs with unequal scales give the Hessian a spread spectrum (a good test for eigenvalue solvers).
    x = torch.randn(n, d_in, generator=g, dtype=DT) * torch.linspace(0.3, 2.0, d_in, dtype=DT)
    y = torch.randn(n, d_out, generator=g, dtype=DT)
    return SimpleNamespace(model=model, loss_fn=nn.MSELoss(), batch=(x, y), loss="mse")


def make_mlp_ce(seed: int = 0, n: int = 12, d_in: int = 4, hidden: int = 6, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes)).to(DT)
    x = torch.randn(n, d_in, generator=g, dtype=DT)
    y = torch.randint(0, classes, (n,), generator=g)
    return SimpleNamespace(model=model, loss_fn=nn.CrossEntropyLoss(), batch=(x, y), loss="ce")


@pytest.fixture
def linreg():
    return make_linreg()


@pytest.fixture
def mlp_ce():
    return make_mlp_ce()


@pytest.fixture
def oracle():
    return SimpleNamespace(
        hessian=dense_hessian, jacobian=dense_jacobian, ggn_mse=dense_ggn_mse, ggn_ce=dense_ggn_ce,
        flat_params=flat_params, make_linreg=make_linreg, make_mlp_ce=make_mlp_ce,
    )


@pytest.fixture(autouse=True)
def _single_thread():
    """These tests do many tiny float64 ops: one intra-op thread avoids per-op thread wake-ups (several ms each on a
    shared 2-core machine). Restored afterwards so other test directories keep their setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
