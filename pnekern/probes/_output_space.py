"""Output-space GGN trace estimator: Tr(A G A) = Tr(A Jᵀ Λ J A) from one vector-Jacobian product per probe.

Write the loss Hessian in the model output as Λ = L Lᵀ (closed form): MSE with reduction mean, Λ = s I and L = √s I
(s = 2/numel; 2 for sum); softmax cross-entropy, per likelihood row m, Λ_m = c_m (diag p − p pᵀ) = L_m L_mᵀ with
L_m = √c_m (diag √p − p √pᵀ) (Σ p = 1; c_m = 1/N_terms for mean, 1 for sum). With ξ Rademacher in output space and
u = L ξ, E[u uᵀ] = Λ, so ‖A Jᵀ u‖² is an unbiased sample of Tr(A Jᵀ Λ J A): one backward per probe, no
forward-mode product, and all probes share one forward.

Sub-batches (``rows_per_probe = m < N``): probe j draws its own uniform subset S_j of m of the N examples (rows along
the leading dimension of the batch), independently of the other probes, and returns (N/m) ‖A J_{S_j}ᵀ L_{S_j} ξ_j‖²
(L with the *whole* batch's normalisation). Cross-example terms vanish in expectation over ξ, so each sample is still
unbiased for the whole batch's Tr(A G A), the samples are i.i.d. (sample std / √k is a calibrated standard error), and
one probe costs a forward + backward over m rows instead of N. All probes' sub-batches run as one vmapped
forward + vjp (per-probe gradients, like per-example gradients). This needs examples that do not interact in the
forward (no train-mode BatchNorm) and a loss that is a sum over examples (MSE / CE with mean or sum reduction).

Everything runs through :func:`torch.func.functional_call` on detached parameter copies: parameters, ``.grad``,
hooks, modes, buffers and the caller's RNG stream are left as found (see :mod:`pnekern.probes._operators`).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from ._estimators import Estimate, _as_flat_weight, _check_count, _generator, _mean_stderr
from ._operators import (
    CurvatureOperator,
    ForwardFn,
    _ce_flat_logits,
    _ce_row_weights,
    _ce_unflatten,
    _ModelEval,
    _mse_scale,
    infer_loss_kind,
)

__all__ = ["output_space_samples", "output_space_ggn_trace", "output_factor_product", "auto_chunk"]

#: Default bound on the per-probe gradients one vectorised chunk holds: chunk × dim ≤ this many elements
#: (2^25 ≈ 33.5M, 134 MB in float32); the vmapped backward's activation gradients scale with the chunk too.
CHUNK_ELEMENTS = 1 << 25


def auto_chunk(num_probes: int, dim: int, max_elements: int = CHUNK_ELEMENTS) -> int:
    """Probes per vectorised chunk: all of them unless chunk × dim would exceed ``max_elements``."""
    return max(1, min(num_probes, max_elements // max(dim, 1)))


def _ce_factor(logits_rows: Tensor, xi_rows: Tensor, sqrt_w: Tensor) -> Tensor:
    """L ξ per row: √w (√p ⊙ ξ − p (√p · ξ)), rows (M, C)."""
    p = torch.softmax(logits_rows, dim=-1)
    sp = p.sqrt()
    return sqrt_w.unsqueeze(-1) * (sp * xi_rows - p * (sp * xi_rows).sum(-1, keepdim=True))


def output_factor_product(out: Tensor, xi: Tensor, targets: Any, loss_fn: Any, loss: str) -> Tensor:
    """u = L ξ with L Lᵀ = Λ = ∂²loss/∂f² at the model output ``out`` (the whole batch), ``xi`` shaped like ``out``."""
    if loss == "mse":
        return math.sqrt(_mse_scale(out, loss_fn)) * xi
    if loss == "ce":
        sqrt_w = _ce_row_weights(out, targets, loss_fn).sqrt()
        return _ce_unflatten(_ce_factor(_ce_flat_logits(out), _ce_flat_logits(xi), sqrt_w), out)
    raise ValueError(f"loss must be 'mse' or 'ce', got {loss!r}")


def _rademacher_like(shape: Sequence[int], dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Tensor:
    z = torch.randint(0, 2, tuple(shape), generator=gen, device=gen.device)
    return (2 * z - 1).to(dtype=dtype, device=device)


def _num_rows(targets: Any) -> int:
    if not isinstance(targets, Tensor) or targets.ndim == 0:
        raise ValueError("rows_per_probe needs tensor targets with a leading batch dimension")
    return targets.shape[0]


def _index_rows(inputs: Any, idx: Tensor, n: int) -> Any:
    """Rows ``idx`` of every batched tensor in ``inputs`` (a tensor or a tuple/list of tensors and constants)."""
    def take(x: Any) -> Any:
        if isinstance(x, Tensor):
            if x.ndim == 0 or x.shape[0] != n:
                raise ValueError(
                    f"rows_per_probe: an input tensor of shape {tuple(x.shape)} has no leading batch dimension of "
                    f"size {n} (the targets'); use rows_per_probe=None (whole batch)"
                )
            return x.index_select(0, idx.to(x.device))
        return x
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(take(x) for x in inputs)
    return take(inputs)


def _stack_rows(inputs: Any, idx: Tensor, n: int) -> tuple[Any, Any]:
    """``idx`` (k, m) → inputs with a leading probe dimension (k, m, ...), plus vmap's in_dims for them."""
    flat = idx.reshape(-1)
    sub = _index_rows(inputs, flat, n)

    def shape(x: Any) -> tuple[Any, Any]:
        if isinstance(x, Tensor):
            return x.reshape(idx.shape + x.shape[1:]), 0
        return x, None
    if isinstance(inputs, (tuple, list)):
        pairs = [shape(x) for x in sub]
        return type(inputs)(p[0] for p in pairs), tuple(p[1] for p in pairs)
    return shape(sub)


class _SubBatchLoss:
    """Whole-batch normalisation of Λ for sub-batches: MSE scale s, or CE row weights √w per sub-batch row."""

    def __init__(self, loss_fn: Any, loss: str, targets: Tensor, n: int, m: int, out_sub: Tensor) -> None:
        self.loss = loss
        if out_sub.ndim == 0 or out_sub.shape[0] != m:
            raise ValueError(
                f"rows_per_probe: the model output for {m} rows has shape {tuple(out_sub.shape)}; it needs a leading "
                "batch dimension (use rows_per_probe=None)"
            )
        if loss == "mse":
            reduction = getattr(loss_fn, "reduction", None)
            if reduction not in ("mean", "sum"):
                _mse_scale(out_sub, loss_fn)  # raises the usual message
            self.s = 2.0 / (out_sub.numel() // m * n) if reduction == "mean" else 2.0
            return
        if getattr(loss_fn, "weight", None) is not None:
            raise NotImplementedError("loss='ce' curvature does not support class weights (weight=) yet")
        reduction = getattr(loss_fn, "reduction", None)
        if reduction not in ("mean", "sum"):
            _ce_row_weights(out_sub, None, loss_fn)  # raises the usual message
        rows_per_example = _ce_flat_logits(out_sub).shape[0] // m
        ignore_index = getattr(loss_fn, "ignore_index", None)
        if not targets.is_floating_point() and ignore_index is not None:
            mask = (targets != ignore_index).reshape(n, -1).to(out_sub.dtype)
            if mask.shape[1] != rows_per_example:
                raise ValueError("rows_per_probe: targets and model output disagree on the rows per example")
        else:
            mask = torch.ones(n, rows_per_example, dtype=out_sub.dtype, device=out_sub.device)
        if reduction == "mean":
            mask = mask / mask.sum().clamp_min(1.0)
        self.sqrt_w = mask.sqrt()  # (n, rows per example)

    def weights(self, idx: Tensor) -> Tensor | None:
        """(k, m·r) √w for the rows of each sub-batch (CE), None for MSE."""
        if self.loss == "mse":
            return None
        return self.sqrt_w.index_select(0, idx.reshape(-1).to(self.sqrt_w.device)).reshape(idx.shape[0], -1)

    def factor(self, out: Tensor, xi: Tensor, sqrt_w: Tensor | None) -> Tensor:
        if self.loss == "mse":
            return math.sqrt(self.s) * xi
        return _ce_unflatten(_ce_factor(_ce_flat_logits(out), _ce_flat_logits(xi), sqrt_w), out)


def output_space_samples(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    batch: Any,
    loss: str | None = None,
    a: Tensor | Sequence[Tensor] | None = None,
    num_probes: int = 16,
    generator: torch.Generator | None = None,
    params: Sequence[Tensor] | None = None,
    forward: ForwardFn | None = None,
    rows_per_probe: int | str | None = None,
    vectorize: bool | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Per-block samples (N/m)·‖A_b [Jᵀ L ξ_j]_b‖² of the output-space estimator: float64 ``(num_blocks, num_probes)``
    on the parameters' device (no host synchronisation), plus metadata. Summing over blocks gives i.i.d. unbiased
    samples of Tr(A G A); see :func:`output_space_ggn_trace` for the arguments.

    Draw order (reproducible, independent of ``vectorize``/``chunk_size``): with sub-batches, the k subsets first
    (``torch.randperm(N)[:m]`` each), then per probe ξ_j = 2·randint(0, 2, output shape) − 1.
    """
    loss = infer_loss_kind(loss_fn, loss)
    _check_count("num_probes", num_probes, 1)
    if vectorize is not None and not isinstance(vectorize, bool):
        raise ValueError(f"vectorize must be a bool or None, got {vectorize!r}")
    if chunk_size is not None:
        _check_count("chunk_size", chunk_size, 1)
    ev = _ModelEval(model, loss_fn, batch, params, forward)
    gen = _generator(generator)
    layout = CurvatureOperator(lambda v: v, ev.dim, ev.dtype, ev.device, params=ev.plist)
    weight = None if a is None else _as_flat_weight(layout, a)
    weights = None if weight is None else [w.view(p.shape).to(torch.float64)
                                           for w, p in zip(torch.split(weight, layout.block_sizes), ev.plist)]
    chunk = chunk_size if chunk_size is not None else auto_chunk(num_probes, ev.dim)
    n = m = None
    if rows_per_probe is not None:
        n = _num_rows(ev.targets)
        if rows_per_probe == "auto":
            m = -(-n // num_probes)  # ceil: one measurement touches about N rows in all
        else:
            m = _check_count("rows_per_probe", rows_per_probe, 1)
        if m >= n:
            m = None  # the whole batch: share one forward
    blocks = torch.empty(len(ev.plist), num_probes, dtype=torch.float64, device=ev.device)
    primals = tuple(p.detach() for p in ev.plist)

    def block_sq(grads: Sequence[Tensor], batched: bool) -> Tensor:
        """(num_blocks, b) or (num_blocks,) Σ (a ⊙ g)² per block, in float64."""
        rows = []
        for i, g in enumerate(grads):
            g = g.to(torch.float64)
            if weights is not None:
                g = g * weights[i]
            rows.append((g * g).reshape(g.shape[0], -1).sum(-1) if batched else (g * g).sum())
        return torch.stack(rows)

    meta: dict[str, Any] = {"method": "output_space", "probes": "rademacher", "num_probes": num_probes,
                            "rows_per_probe": m if m is not None else "all", "chunk_size": chunk}
    if m is None:
        # Whole batch: one forward shared by all probes, one vjp (backward) per probe.
        theta = ev.leaves()
        with torch.enable_grad():
            out = ev.output(theta)
        if not isinstance(out, Tensor):
            raise ValueError(f"the model (or forward=) must return a tensor, got {type(out).__name__}")
        f = out.detach()
        # On CPU the vmapped backward is flop/bandwidth-bound and slower than a loop; on GPUs it saves launches.
        vec = vectorize if vectorize is not None else ev.device.type == "cuda"
        factor = output_factor_product
        meta["vectorized"] = vec
        for start in range(0, num_probes, chunk if vec else 1):
            stop = min(num_probes, start + (chunk if vec else 1))
            xis = [_rademacher_like(f.shape, f.dtype, f.device, gen) for _ in range(start, stop)]
            last = stop == num_probes
            if vec:
                u = torch.stack([factor(f, xi, ev.targets, loss_fn, loss) for xi in xis])
                grads = torch.autograd.grad(out, theta, grad_outputs=u, retain_graph=not last, allow_unused=True,
                                            is_grads_batched=True)
                grads = [torch.zeros((stop - start,) + p.shape, dtype=p.dtype, device=p.device) if g is None else g
                         for g, p in zip(grads, ev.plist)]
                blocks[:, start:stop] = block_sq(grads, True)
            else:
                u = factor(f, xis[0], ev.targets, loss_fn, loss)
                grads = torch.autograd.grad(out, theta, grad_outputs=u, retain_graph=not last, allow_unused=True)
                blocks[:, start] = block_sq(ev.zeros_for_none(grads), False)
        return blocks, meta

    # Sub-batches: every probe its own forward + backward over m rows, vmapped over the probes.
    assert n is not None
    idx = torch.stack([torch.randperm(n, generator=gen, device=gen.device)[:m] for _ in range(num_probes)])
    idx = idx.to(ev.device)
    with torch.no_grad():
        probe_shape_out = _sub_output(ev, primals, _index_rows(ev.inputs, idx[0], n))
    if not isinstance(probe_shape_out, Tensor):
        raise ValueError(f"the model (or forward=) must return a tensor, got {type(probe_shape_out).__name__}")
    sub = _SubBatchLoss(loss_fn, loss, ev.targets, n, m, probe_shape_out)
    sqrt_w = sub.weights(idx)
    out_shape, dtype = probe_shape_out.shape, probe_shape_out.dtype
    scale = n / m
    vec = vectorize if vectorize is not None else True
    meta.update(vectorized=vec, rows=n)

    def one(x: Any, xi: Tensor, w: Tensor | None) -> tuple[Tensor, ...]:
        out, pull = vjp(lambda *th: _sub_output(ev, th, x), *primals)
        return pull(sub.factor(out, xi, w))

    def run_loop(start: int, stop: int, xis: list[Tensor]) -> None:
        for j in range(start, stop):
            x = _index_rows(ev.inputs, idx[j], n)
            grads = one(x, xis[j - start], None if sqrt_w is None else sqrt_w[j])
            blocks[:, j] = scale * block_sq(grads, False)

    for start in range(0, num_probes, chunk):
        stop = min(num_probes, start + chunk)
        xis = [_rademacher_like(out_shape, dtype, ev.device, gen) for _ in range(start, stop)]
        if not vec:
            run_loop(start, stop, xis)
            continue
        x, in_dims = _stack_rows(ev.inputs, idx[start:stop], n)
        xi = torch.stack(xis)
        w = None if sqrt_w is None else sqrt_w[start:stop]
        try:
            grads = vmap(one, in_dims=(in_dims, 0, None if w is None else 0), randomness="different")(x, xi, w)
        except Exception as err:  # noqa: BLE001 - a model vmap cannot batch (data-dependent code, in-place buffers)
            meta["vectorized"] = vec = False
            meta["vmap_error"] = f"{type(err).__name__}: {err}"[:300]
            run_loop(start, stop, xis)
            continue
        blocks[:, start:stop] = scale * block_sq(grads, True)
    return blocks, meta


def _sub_output(ev: _ModelEval, tensors: Sequence[Tensor], inputs: Any) -> Any:
    """The model's output for ``inputs`` at substituted parameters (``ev.output`` with other inputs)."""
    substitutes = dict(zip(ev.names, tensors))
    if ev.buffers and any(mod.training for mod in ev.model.modules()):
        substitutes.update({name: b.clone() for name, b in ev.buffers})
    with ev.replay():
        return functional_call(ev.module, substitutes, (inputs,))


def output_space_ggn_trace(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    batch: Any,
    loss: str | None = None,
    a: Tensor | Sequence[Tensor] | None = None,
    num_probes: int = 16,
    generator: torch.Generator | None = None,
    params: Sequence[Tensor] | None = None,
    forward: ForwardFn | None = None,
    rows_per_probe: int | str | None = None,
    vectorize: bool | None = None,
    chunk_size: int | None = None,
) -> Estimate:
    """Tr(A G A) (Tr G for ``a=None``), G = Jᵀ Λ J the GGN of ``loss_fn(model(inputs), targets)``, by output-space
    Hutchinson: mean_j ‖A Jᵀ L ξ_j‖² with Λ = L Lᵀ and Rademacher ξ_j in output space; stderr = sample std / √k.

    Per probe one backward (vjp) and no jvp; the whole-batch variant shares one forward between the probes. Its
    per-probe variance is 2(‖M‖_F² − Σ M_ii²) for M = Lᵀ J A² Jᵀ L, which has the same nonzero spectrum as A G A
    (so ‖M‖_F = ‖AGA‖_F: comparable to parameter-space Hutchinson, at about half the cost per probe).

    Args:
        loss: "mse" or "ce" (None: inferred from the criterion's type); the criterion supplies the reduction.
        a: diagonal preconditioner, flat ``(dim,)`` or per parameter; None for A = I.
        rows_per_probe: None: every probe uses the whole batch. An int m < N: each probe uses its own uniformly drawn
            m of the N examples (leading dimension of targets and of every input tensor) and is scaled by N/m, so it
            stays unbiased for the whole batch and the probes stay i.i.d.; cost per probe ∝ m. "auto": m = ⌈N/k⌉
            (one measurement then costs about one forward + backward over N rows, whatever k).
        vectorize: batch the probes into one vmapped computation (default: always for sub-batches; for the whole
            batch only on CUDA, where it saves launches; on CPU the batched backward was slower than a loop).
            Falls back to a loop when vmap cannot batch the model (recorded in ``metadata["vmap_error"]``).
        chunk_size: probes per vectorised call (default: all, unless chunk × dim > 2^25 elements).

    ``per_param`` splits the estimate over parameter blocks (each block's samples are unbiased for Tr of its diagonal
    block of A G A).
    """
    blocks, meta = output_space_samples(
        model, loss_fn, batch, loss=loss, a=a, num_probes=num_probes, generator=generator, params=params,
        forward=forward, rows_per_probe=rows_per_probe, vectorize=vectorize, chunk_size=chunk_size,
    )
    mean, se = _mean_stderr(blocks.sum(0))
    bm, bs = _mean_stderr(blocks)
    per_param = [{"value": float(v), "stderr": float(s)} for v, s in zip(bm.tolist(), bs.tolist())]
    return Estimate(value=float(mean), stderr=float(se), num_matvecs=num_probes, per_param=per_param, metadata=meta)
