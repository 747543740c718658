"""Curvature matrix-vector products over a fixed batch: Hessian (double backward), finite-difference Hessian, GGN.

Every operator acts on the flat concatenation of a list of parameters (``model.parameters()`` order, only those with
``requires_grad``, or an explicit ``params=`` list). For a loss in nats and parameters in units θ, all products
``matvec(v)`` have units nats/θ² · θ = nats/θ, shape ``(dim,)`` and the parameters' dtype/device.

A batch is ``(inputs, targets)`` and the loss is ``loss_fn(model(inputs), targets)``; when ``inputs`` is a tuple it is
unpacked, ``model(*inputs)`` (e.g. in-context models called as ``model(xs, ys)``), and a ``forward(model, inputs)``
callable replaces the call entirely when given.

All products evaluate the model through :func:`torch.func.functional_call` on detached copies of the parameters (and,
in train mode, private copies of the buffers), so they never modify parameters or buffers, never touch ``param.grad``
and never fire tensor hooks registered on the parameters
(the optimizer's micro-batch statistics capture every gradient that reaches a parameter through such hooks). Every
forward pass of one operator replays the same global RNG state (dropout masks agree between products, so the operator
is one fixed matrix) and the caller's RNG stream is left as it was. None of them change the module's train/eval mode:
callers that want the curvature of a model without dropout noise should put it in eval mode first
(:class:`pnekern.probes.CurvatureProbe` does).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp

__all__ = [
    "CurvatureOperator",
    "as_operator",
    "hvp",
    "fd_hvp",
    "ggn_vp",
    "select_params",
    "flatten_tensors",
    "unflatten_vector",
    "call_model",
    "output_hessian_product",
    "split_batch",
    "infer_loss_kind",
    "default_fd_step",
]

Batch = tuple[Any, Any]


def select_params(model: nn.Module, params: Sequence[Tensor] | None = None) -> list[Tensor]:
    """The parameters an operator acts on: ``params`` if given, else those of ``model`` with ``requires_grad``.

    Order is ``model.parameters()`` order (shared parameters appear once), so a flat vector is laid out the same way
    an optimizer's ``param_groups`` built from ``model.parameters()`` would be.
    """
    if params is not None:
        out = list(params)
        if not out:
            raise ValueError("params= is empty: there is nothing for the operator to act on")
        return out
    out = [p for p in model.parameters() if p.requires_grad]
    if not out:
        raise ValueError("the model has no parameter with requires_grad=True")
    return out


def flatten_tensors(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate per-parameter tensors into one flat vector of shape ``(sum numel,)``."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten_vector(vec: Tensor, shapes: Sequence[torch.Size]) -> list[Tensor]:
    """Split a flat vector ``(dim,)`` into views with the given per-parameter shapes (inverse of flatten)."""
    numels = [math.prod(s) for s in shapes]
    if vec.ndim != 1 or vec.numel() != sum(numels):
        raise ValueError(f"expected a flat vector of {sum(numels)} elements, got shape {tuple(vec.shape)}")
    return [chunk.view(s) for chunk, s in zip(torch.split(vec, numels), shapes)]


class CurvatureOperator:
    """A symmetric linear operator M acting on flat parameter-space vectors.

    Attributes:
        dim: length d of the flat vectors M acts on.
        params: the parameter tensors the flat layout refers to (empty for a plain callable).
        shapes: per-block shapes (one block of shape ``(dim,)`` for a plain callable).
        dtype, device: of the vectors ``matvec`` accepts and returns.
        num_matvecs: how many products this operator has computed so far (cost accounting).
        name: what M is ("hessian", "fd_hessian", "ggn[ce]", "callable", ...).
    """

    def __init__(
        self,
        matvec_fn: Callable[[Tensor], Tensor],
        dim: int,
        dtype: torch.dtype,
        device: torch.device,
        params: Sequence[Tensor] | None = None,
        shapes: Sequence[torch.Size] | None = None,
        name: str = "operator",
    ) -> None:
        self._matvec_fn = matvec_fn
        self.dim = int(dim)
        self.dtype = dtype
        self.device = torch.device(device)
        self.params: list[Tensor] = list(params) if params is not None else []
        if shapes is None:
            shapes = [p.shape for p in self.params] if self.params else [torch.Size([self.dim])]
        self.shapes: list[torch.Size] = [torch.Size(s) for s in shapes]
        if sum(math.prod(s) for s in self.shapes) != self.dim:
            raise ValueError("block shapes do not add up to dim")
        self.num_matvecs = 0
        self.name = name

    @property
    def block_sizes(self) -> list[int]:
        """Number of elements of each parameter block, in layout order."""
        return [math.prod(s) for s in self.shapes]

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Per-parameter tensors (aligned with ``params``) → flat ``(dim,)`` vector in this operator's dtype."""
        if len(tensors) != len(self.shapes):
            raise ValueError(f"expected {len(self.shapes)} per-parameter tensors, got {len(tensors)}")
        return flatten_tensors(tensors).to(dtype=self.dtype, device=self.device)

    def unflatten(self, vec: Tensor) -> list[Tensor]:
        """Flat ``(dim,)`` vector → list of views shaped like ``params``."""
        return unflatten_vector(vec, self.shapes)

    def matvec(self, v: Tensor) -> Tensor:
        """M v for a flat vector ``v`` of shape ``(dim,)``; returns shape ``(dim,)``."""
        if v.shape != (self.dim,):
            raise ValueError(f"{self.name}: expected a vector of shape ({self.dim},), got {tuple(v.shape)}")
        out = self._matvec_fn(v.to(dtype=self.dtype, device=self.device))
        self.num_matvecs += 1
        return out.reshape(self.dim)

    __call__ = matvec

    def __repr__(self) -> str:
        return f"CurvatureOperator(name={self.name!r}, dim={self.dim}, dtype={self.dtype}, device={self.device})"


def as_operator(
    op: CurvatureOperator | Callable[[Tensor], Tensor] | Tensor,
    dim: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> CurvatureOperator:
    """Adapt an operator, a plain callable ``v -> M v`` (needs ``dim``) or an explicit ``(d, d)`` matrix."""
    if isinstance(op, CurvatureOperator):
        if dim is not None and dim != op.dim:
            raise ValueError(f"dim={dim} disagrees with the operator's dim={op.dim}")
        return op
    if isinstance(op, Tensor):
        if op.ndim != 2 or op.shape[0] != op.shape[1]:
            raise ValueError("an explicit matrix operator must be square (d, d)")
        mat = op
        return CurvatureOperator(lambda v: mat @ v, mat.shape[0], mat.dtype, mat.device, name="matrix")
    if not callable(op):
        raise TypeError(f"expected a CurvatureOperator, a callable or a square tensor, got {type(op).__name__}")
    if dim is None:
        raise ValueError("a plain callable operator needs dim= (the length of the vectors it acts on)")
    return CurvatureOperator(
        op,
        dim,
        dtype if dtype is not None else torch.get_default_dtype(),
        torch.device(device) if device is not None else torch.device("cpu"),
        name="callable",
    )


def _param_meta(params: Sequence[Tensor]) -> tuple[int, torch.dtype, torch.device]:
    dtypes = {p.dtype for p in params}
    devices = {p.device for p in params}
    if len(dtypes) != 1 or len(devices) != 1:
        # One flat vector has one dtype/device: mixed-precision models need per-group operators.
        raise ValueError(f"params: parameters must share one dtype and device, got {dtypes} / {devices}")
    return sum(p.numel() for p in params), params[0].dtype, params[0].device


ForwardFn = Callable[[nn.Module, Any], Any]


def call_model(model: nn.Module, inputs: Any, forward: ForwardFn | None = None) -> Any:
    """The model's output for ``inputs``: ``forward(model, inputs)`` if given, ``model(*inputs)`` for a tuple of
    inputs (e.g. ``(xs, ys)`` of an in-context model), else ``model(inputs)``."""
    if forward is not None:
        return forward(model, inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` from a batch given as a 2-tuple or 2-list (a DataLoader's ``[x, y]``)."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(
            "batch must be a pair (inputs, targets) with loss = loss_fn(model(inputs), targets); "
            f"got {type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        )
    return batch[0], batch[1]


class _Functional(nn.Module):
    """``model`` seen through ``call_model`` so that functional_call can substitute its parameters.

    functional_call swaps the tensors on the real submodules for the duration of the call, so a ``forward`` callable
    that closes over the original model sees the substituted parameters too. Holding ``model`` as a child does not
    modify it.
    """

    def __init__(self, model: nn.Module, forward: ForwardFn | None) -> None:
        super().__init__()
        self.model = model
        self._forward_fn = forward

    def forward(self, inputs: Any) -> Any:  # noqa: D401 - nn.Module API
        return call_model(self.model, inputs, self._forward_fn)


def _named(model: nn.Module, plist: Sequence[Tensor]) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    out = []
    for p in plist:
        if id(p) not in names:
            raise ValueError("params= contains a tensor that is not a parameter of the model")
        out.append(names[id(p)])
    return out


class _RngReplay:
    """Run every forward of one operator from the same global RNG state, leaving the caller's stream untouched."""

    def __init__(self, device: torch.device) -> None:
        if device.type == "cuda":
            self.devices = [device.index if device.index is not None else torch.cuda.current_device()]
        else:
            self.devices = []
        self.cpu_state = torch.get_rng_state()
        self.cuda_states = [torch.cuda.get_rng_state(d) for d in self.devices]

    @contextlib.contextmanager
    def __call__(self) -> Any:
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu_state)
            for d, s in zip(self.devices, self.cuda_states):
                torch.cuda.set_rng_state(s, d)
            yield


class _ModelEval:
    """Shared machinery: evaluate output/loss at substituted parameter tensors without touching the model."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Tensor],
        batch: Any,
        params: Sequence[Tensor] | None,
        forward: ForwardFn | None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable (e.g. nn.MSELoss()), got {type(loss_fn).__name__}")
        if forward is not None and not callable(forward):
            raise ValueError(f"forward must be a callable forward(model, inputs), got {type(forward).__name__}")
        self.inputs, self.targets = split_batch(batch)
        self.loss_fn = loss_fn
        self.plist = select_params(model, params)
        self.dim, self.dtype, self.device = _param_meta(self.plist)
        self.names = ["model." + n for n in _named(model, self.plist)]
        self.shapes = [p.shape for p in self.plist]
        self.module = _Functional(model, forward)
        self.replay = _RngReplay(self.device)
        self.model = model
        self.buffers = [("model." + n, b) for n, b in model.named_buffers()]

    def output(self, tensors: Sequence[Tensor]) -> Any:
        substitutes = dict(zip(self.names, tensors))
        if self.buffers and any(m.training for m in self.model.modules()):
            # Train-mode forwards update buffers in place (BatchNorm running statistics): give them private copies,
            # so the model's buffers stay as they were (and torch.func transforms see no captured-tensor mutation).
            substitutes.update({n: b.clone() for n, b in self.buffers})
        with self.replay():
            return functional_call(self.module, substitutes, (self.inputs,))

    def loss(self, tensors: Sequence[Tensor]) -> Tensor:
        return self.loss_fn(self.output(tensors), self.targets)

    def leaves(self) -> list[Tensor]:
        """Fresh autograd leaves aliasing the parameter values (hooks on the parameters do not see their grads)."""
        return [p.detach().requires_grad_(True) for p in self.plist]

    def zeros_for_none(self, grads: Sequence[Tensor | None]) -> list[Tensor]:
        # allow_unused: a parameter that does not reach the loss has zero gradient and zero curvature rows.
        return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.plist)]


_NO_DOUBLE_BACKWARD = (
    "hvp: the model's backward pass cannot be differentiated again (double backward is unavailable, e.g. a custom "
    "autograd.Function marked @once_differentiable or a fused kernel). Use pnekern.probes.fd_hvp(model, loss_fn, "
    "batch) (CurvatureProbe(kind='fd_hessian')), which needs only first-order gradients."
)


def _non_differentiable_nodes(roots: Sequence[Any]) -> set[str]:
    """Names of error nodes (``@once_differentiable`` outputs, derivatives not implemented) in a gradient's graph.

    autograd.grad prunes such nodes when they do not lead to the requested inputs, which they never do, so without
    this check the double-backward product would silently miss their contribution (zeros instead of an error).
    """
    seen: set[int] = set()
    bad: set[str] = set()
    stack = [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        name = node.name()
        if name.endswith("Error") or "NotImplemented" in name:
            bad.add(name)
        stack.extend(f for f, _ in node.next_functions if f is not None)
    return bad


def hvp(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    batch: Any,
    params: Sequence[Tensor] | None = None,
    forward: ForwardFn | None = None,
) -> CurvatureOperator:
    """Exact Hessian-vector products H v, H = ∇²_θ loss_fn(model(inputs), targets), by double backward.

    The forward pass and first backward (with ``create_graph=True``) run once, on the first product, and are reused
    by later products, so each product costs one extra backward. The operator describes the curvature at the
    parameter values of its first product; updating the parameters in place afterwards makes autograd raise (the
    cached graph aliases them), so build a new operator after each optimizer step.

    Raises:
        RuntimeError: on the first product, if the model's backward is not itself differentiable (e.g. a custom
            autograd Function marked ``@once_differentiable``, some fused attention kernels), detected either by
            autograd's error or by error nodes in the gradient's graph (which autograd would otherwise skip
            silently, returning zeros); the message names :func:`fd_hvp`, which only needs first derivatives.
    """
    ev = _ModelEval(model, loss_fn, batch, params, forward)
    cache: dict[str, list[Tensor]] = {}

    def grads_with_graph() -> tuple[list[Tensor], list[Tensor]]:
        if "grads" not in cache:
            theta = ev.leaves()
            with torch.enable_grad():
                loss = ev.loss(theta)
                grads = torch.autograd.grad(loss, theta, create_graph=True, allow_unused=True)
            cache["theta"] = theta
            cache["grads"] = ev.zeros_for_none(grads)
            bad = _non_differentiable_nodes([g.grad_fn for g in cache["grads"]])
            if bad:
                # Such nodes are dead ends: autograd would silently return zero for that part of H v.
                raise RuntimeError(_NO_DOUBLE_BACKWARD + f" The gradient's graph contains {sorted(bad)}.")
        return cache["theta"], cache["grads"]

    def matvec(v: Tensor) -> Tensor:
        theta, grads = grads_with_graph()
        vs = unflatten_vector(v, ev.shapes)
        # Gradients that do not depend on θ (no grad_fn) have zero second derivative; autograd.grad rejects them.
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        if not live:
            return torch.zeros(ev.dim, dtype=ev.dtype, device=ev.device)
        try:
            with torch.enable_grad():
                hv = torch.autograd.grad(
                    [grads[i] for i in live],
                    theta,
                    grad_outputs=[vs[i] for i in live],
                    retain_graph=True,
                    allow_unused=True,
                )
        except RuntimeError as err:
            raise RuntimeError(_NO_DOUBLE_BACKWARD + f" Original error: {err}") from err
        return flatten_tensors(ev.zeros_for_none(hv))

    return CurvatureOperator(matvec, ev.dim, ev.dtype, ev.device, params=ev.plist, name="hessian")


def default_fd_step(theta: Tensor, v: Tensor) -> Tensor:
    """Central-difference step h for the direction v at θ (both flat ``(d,)``): a 0-dim tensor, multiplier of v.

    Central differences have truncation error O(h²) and round-off O(eps/h), balanced at h ~ eps^(1/3) in relative
    terms. We make the *perturbation* h·v have root-mean-square size eps^(1/3)·max(1, rms(θ)), so h scales like
    1/‖v‖ and the result does not depend on how v is normalised. Returns 0 for v = 0. Computed on the device (no
    host synchronisation).
    """
    eps = torch.finfo(theta.dtype).eps
    d = max(theta.numel(), 1)
    rms_theta = theta.norm() / math.sqrt(d)
    rms_v = v.norm() / math.sqrt(d)
    step = eps ** (1.0 / 3.0) * rms_theta.clamp(min=1.0) / rms_v
    return torch.where(rms_v > 0, step, torch.zeros_like(step))


def fd_hvp(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    batch: Any,
    h: float | None = None,
    params: Sequence[Tensor] | None = None,
    forward: ForwardFn | None = None,
) -> CurvatureOperator:
    """Hessian-vector products by central finite differences of ordinary gradients.

    H v ≈ (∇L(θ + h v) − ∇L(θ − h v)) / (2h); two forward+backward passes per product, no double backward, so it works
    for models whose backward is not differentiable. The perturbed parameters are separate tensors substituted with
    :func:`torch.func.functional_call`: the model's parameters are never written (nothing to restore, nothing rounded).
    Both gradient evaluations of every product replay the same RNG state, so dropout masks agree between them.
    Truncation error is O(h²‖∇³L‖) and round-off O(eps·‖∇L‖/h): about 1e-5 relative in float32, 1e-10 in float64.

    Args:
        h: step multiplier of v; default :func:`default_fd_step` (≈ eps^(1/3)·max(1, rms θ)/rms v per product).
    """
    ev = _ModelEval(model, loss_fn, batch, params, forward)
    if h is not None and not (isinstance(h, (int, float)) and h > 0 and math.isfinite(h)):
        raise ValueError(f"h must be a positive finite float, got {h!r}")

    def grad_at(theta: list[Tensor]) -> Tensor:
        with torch.enable_grad():
            loss = ev.loss(theta)
            grads = torch.autograd.grad(loss, theta, allow_unused=True)
        return flatten_tensors(ev.zeros_for_none(grads))

    def matvec(v: Tensor) -> Tensor:
        with torch.no_grad():
            base = [p.detach() for p in ev.plist]
            # A user step stays a Python float: copying it to the device would synchronise with the host.
            step: float | Tensor = float(h) if h is not None else default_fd_step(flatten_tensors(base), v)
            vs = unflatten_vector(v, ev.shapes)
            plus = [(b + step * dv).requires_grad_(True) for b, dv in zip(base, vs)]
            minus = [(b - step * dv).requires_grad_(True) for b, dv in zip(base, vs)]
        diff = grad_at(plus) - grad_at(minus)
        with torch.no_grad():
            if not isinstance(step, Tensor):
                return diff / (2.0 * step)
            # The automatic step is 0 only for v = 0, where H v = 0 (avoid 0/0).
            return torch.where(step > 0, diff / (2.0 * step).clamp(min=torch.finfo(ev.dtype).tiny), torch.zeros_like(diff))

    return CurvatureOperator(matvec, ev.dim, ev.dtype, ev.device, params=ev.plist, name="fd_hessian")


def _ce_flat_logits(out: Tensor) -> Tensor:
    """CrossEntropyLoss's layout (N, C) or (N, C, d1, ...) → (M, C) rows, one per likelihood term."""
    if out.ndim == 1:
        return out.unsqueeze(0)
    if out.ndim == 2:
        return out
    return out.movedim(1, -1).reshape(-1, out.shape[1])


def _ce_unflatten(rows: Tensor, like: Tensor) -> Tensor:
    """Inverse of :func:`_ce_flat_logits`: (M, C) rows → the layout of ``like``."""
    if like.ndim <= 2:
        return rows.reshape(like.shape)
    moved = list(like.movedim(1, -1).shape)
    return rows.reshape(moved).movedim(-1, 1)


def _ce_row_weights(out: Tensor, targets: Any, loss_fn: Any) -> Tensor:
    """Per-row factor c_m with Λ = ⊕_m c_m (diag p_m − p_m p_mᵀ), from the criterion's reduction/ignore_index.

    Shape ``(M,)``; mean reduction divides by the number of non-ignored terms, exactly as nn.CrossEntropyLoss does.
    (Label smoothing does not change Λ: the smoothed target only enters the loss linearly.)
    """
    if getattr(loss_fn, "weight", None) is not None:
        raise NotImplementedError("loss='ce' curvature does not support class weights (weight=) yet")
    reduction = getattr(loss_fn, "reduction", None)
    if reduction not in ("mean", "sum"):
        raise ValueError(
            "loss='ce' needs a criterion with reduction 'mean' or 'sum' (e.g. nn.CrossEntropyLoss()) to derive the "
            f"closed-form loss Hessian; got loss_fn with reduction={reduction!r}"
        )
    rows = _ce_flat_logits(out).shape[0]
    mask = torch.ones(rows, dtype=out.dtype, device=out.device)
    ignore_index = getattr(loss_fn, "ignore_index", None)
    if isinstance(targets, Tensor) and not targets.is_floating_point() and ignore_index is not None:
        # Ignored positions contribute neither a term nor a count (nn.CrossEntropyLoss semantics).
        mask = (targets.reshape(-1) != ignore_index).to(out.dtype)
    if reduction == "mean":
        mask = mask / mask.sum().clamp_min(1.0)
    return mask


def _mse_scale(out: Tensor, loss_fn: Any) -> float:
    """Λ = s·I for an MSE criterion: d²/df² of Σ(f−y)² is 2, divided by numel for mean reduction."""
    reduction = getattr(loss_fn, "reduction", None)
    if reduction == "mean":
        return 2.0 / out.numel()
    if reduction == "sum":
        return 2.0
    raise ValueError(
        "loss='mse' needs a criterion with reduction 'mean' or 'sum' (e.g. nn.MSELoss()) to derive the closed-form "
        f"loss Hessian; got loss_fn with reduction={reduction!r}"
    )


def output_hessian_product(out: Tensor, u: Tensor, targets: Any, loss_fn: Any, loss: str) -> Tensor:
    """Λ u where Λ = ∂²loss/∂f² at the model output ``out`` (closed form), ``u`` shaped like ``out``.

    mse: Λ = s I (s = 2/numel for mean reduction, 2 for sum). ce: per row, c_m (p ⊙ u − p (pᵀu)), p = softmax(f).
    """
    if loss == "mse":
        return _mse_scale(out, loss_fn) * u
    if loss == "ce":
        logits = _ce_flat_logits(out)
        uf = _ce_flat_logits(u)
        p = torch.softmax(logits, dim=-1)
        lam_u = p * uf - p * (p * uf).sum(-1, keepdim=True)
        lam_u = lam_u * _ce_row_weights(out, targets, loss_fn).unsqueeze(-1)
        return _ce_unflatten(lam_u, out)
    raise ValueError(f"loss must be 'mse' or 'ce', got {loss!r}")


def infer_loss_kind(loss_fn: Any, loss: str | None) -> str:
    """``loss`` if given ("mse"/"ce"), else inferred from an ``nn.MSELoss`` / ``nn.CrossEntropyLoss`` criterion."""
    if loss is not None:
        if loss not in ("mse", "ce"):
            raise ValueError(f"loss must be 'mse' or 'ce', got {loss!r}")
        # A criterion of the other kind would silently give the wrong Λ.
        if (loss == "ce" and isinstance(loss_fn, nn.MSELoss)) or (loss == "mse" and isinstance(loss_fn, nn.CrossEntropyLoss)):
            raise ValueError(f"loss={loss!r} contradicts loss_fn={type(loss_fn).__name__}")
        return loss
    if isinstance(loss_fn, nn.MSELoss):
        return "mse"
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return "ce"
    raise ValueError(
        "loss= must be given ('mse' or 'ce') when loss_fn is not nn.MSELoss / nn.CrossEntropyLoss: the GGN needs the "
        "closed-form Hessian of the loss in the model output"
    )


def ggn_vp(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    batch: Any,
    loss: str | None = None,
    params: Sequence[Tensor] | None = None,
    forward: ForwardFn | None = None,
) -> CurvatureOperator:
    """Generalised Gauss-Newton products G v = Jᵀ Λ J v, J = ∂ model(inputs) / ∂θ, Λ = ∂²loss/∂f² (closed form).

    J v by forward-mode :func:`torch.func.jvp`, Jᵀ(·) by a cached :func:`torch.func.vjp`, both through
    :func:`torch.func.functional_call`, so the model's parameters are never modified. Λ is derived from the criterion:
    for ``nn.MSELoss`` Λ = (2/N_elements) I with mean reduction (2 I with sum); for ``nn.CrossEntropyLoss`` (logits
    in its (N, C) / (N, C, d...) layout) Λ u = c (p ⊙ u − p pᵀu) per row with c = 1/N_terms (mean) or 1 (sum).
    G is PSD for both losses, unlike the Hessian. The model output must be a tensor.

    Args:
        loss: ``"mse"`` or ``"ce"``; which closed form of Λ to use (None: inferred from ``loss_fn``'s type).
            ``loss_fn`` supplies the reduction.
    """
    loss = infer_loss_kind(loss_fn, loss)
    ev = _ModelEval(model, loss_fn, batch, params, forward)
    primals = tuple(p.detach() for p in ev.plist)

    def f(*theta: Tensor) -> Tensor:
        out = ev.output(theta)
        if not isinstance(out, Tensor):
            raise ValueError(f"ggn_vp needs the model (or forward=) to return a tensor, got {type(out).__name__}")
        return out

    cache: dict[str, Any] = {}

    def matvec(v: Tensor) -> Tensor:
        tangents = tuple(unflatten_vector(v, ev.shapes))
        with torch.enable_grad():
            if "vjp" not in cache:
                cache["out"], cache["vjp"] = vjp(f, *primals)
            out, jv = jvp(f, primals, tangents)
        lam_jv = output_hessian_product(out.detach(), jv.detach(), ev.targets, loss_fn, loss)
        gv = cache["vjp"](lam_jv)
        return flatten_tensors([g.detach() for g in gv])

    return CurvatureOperator(matvec, ev.dim, ev.dtype, ev.device, params=ev.plist, name=f"ggn[{loss}]")
