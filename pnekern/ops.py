"""Dispatch layer: one public function per op, picking the cpp / triton / cuda / reference implementation.

Backends share one signature per op (the reference module documents it). Data flows one way: kernels and the
reference sit below this module; optim/stats/probes call it.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _native
from .reference import adamw as _ref_adamw

__all__ = ["BACKENDS", "resolve_backend", "adamw_step_", "microbatch_accumulate_", "default_backend"]

#: Every backend name a user may request. ``auto`` resolves per device at step time.
BACKENDS = ("auto", "reference", "cpp", "triton", "cuda")

#: dtypes the compiled kernels store (math is always fp32).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def default_backend() -> str:
    """The backend requested by the environment (``PNEKERN_BACKEND``), else ``"auto"``."""
    value = os.environ.get("PNEKERN_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"PNEKERN_BACKEND={value!r} is not a backend; choose one of {', '.join(BACKENDS)}")
    return value


def native_available() -> bool:
    """True when the compiled extension is loaded (loads it on first call; cheap afterwards)."""
    return _native.available()


def validate_backend(backend: str) -> str:
    """Normalise and check a user-supplied backend name (ValueError naming the choices otherwise)."""
    if not isinstance(backend, str) or backend.lower() not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; choose one of {', '.join(BACKENDS)}")
    return backend.lower()


# complex -> the real dtype of torch.view_as_real (a dict lookup: torch.compile cannot trace dtype.to_real()).
_REAL_OF_COMPLEX = {torch.complex32: torch.float16, torch.complex64: torch.float32, torch.complex128: torch.float64}


def storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels see for tensors of ``dtype``: complex tensors step as ``view_as_real``."""
    return _REAL_OF_COMPLEX.get(dtype, dtype)


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """Pick the implementation for tensors on ``device`` with storage ``dtype``.

    ``auto`` gives ``cpp`` on CPU for fp32/bf16/fp16 when the extension is built, ``triton`` on CUDA for those dtypes
    when Triton is importable, ``reference`` otherwise. Explicit ``triton`` runs on CUDA tensors, and on CPU tensors
    only under Triton's interpreter (``TRITON_INTERPRET=1``, how CI tests the kernels). Explicit requests that cannot
    run on the device or dtype raise RuntimeError with the reason (``dtype``: the storage dtype, real for complex).
    """
    if requested == "auto":
        if device.type == "cpu" and dtype in KERNEL_DTYPES and _native.available():
            return "cpp"
        if device.type == "cuda" and dtype in KERNEL_DTYPES and _triton_usable(device) is None:
            return "triton"
        return "reference"
    if requested == "cpp":
        if device.type != "cpu":
            raise RuntimeError(
                f"backend='cpp' runs on CPU tensors but got tensors on {device}; use backend='auto' or 'reference'"
            )
        _native.require("backend='cpp'")
        if dtype not in KERNEL_DTYPES:
            # Checked here, before any tensor is touched: the kernel would reject the dtype mid-step, after the
            # tensors ahead of it in the call were already updated.
            raise RuntimeError(
                f"backend='cpp' supports float32, bfloat16 and float16 storage, got {dtype}; "
                "use backend='auto' (the reference path for other dtypes) or 'reference'"
            )
        return "cpp"
    if requested == "triton":
        reason = _triton_usable(device)
        if reason is not None:
            raise RuntimeError(f"backend='triton' cannot run here: {reason}; use backend='auto' or 'reference'")
        if dtype not in KERNEL_DTYPES:
            raise RuntimeError(
                f"backend='triton' supports float32, bfloat16 and float16 storage, got {dtype}; "
                "use backend='auto' or 'reference'"
            )
        return "triton"
    if requested == "cuda":
        reason = _cuda_usable(device, dtype)
        if reason is not None:
            raise RuntimeError(f"backend='cuda' cannot run here: {reason}; use backend='auto', 'triton' or 'reference'")
        return "cuda"
    return requested


def _cuda_usable(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the CUDA C++ kernels (csrc/cuda, registered for the CUDA dispatch key) can run, else why not."""
    if device.type != "cuda":
        return f"the CUDA C++ kernels run on CUDA tensors, got tensors on {device}"
    mod = _native.require("backend='cuda'")
    if not mod.build_info().get("with_cuda"):
        return ("the compiled extension was built without CUDA sources (rebuild on a machine with a CUDA torch and "
                "toolkit: PNEKERN_BUILD_CUDA=1 pip install --no-build-isolation .)")
    if dtype not in KERNEL_DTYPES:
        return f"the CUDA kernels store float32, bfloat16 or float16, got {dtype}"
    return None


@torch.compiler.assume_constant_result  # environment facts: Dynamo evaluates this once instead of tracing imports
def _triton_usable(device: torch.device) -> str | None:
    """None when the Triton kernels can run on ``device``, else why not."""
    from . import kernels

    if device.type == "cuda":
        if kernels.interpreter_enabled():
            return "TRITON_INTERPRET=1 runs kernels on the CPU, but the tensors are on CUDA"
        return kernels.unavailable_reason()
    if device.type == "cpu":
        if not kernels.interpreter_enabled():
            return "CPU tensors need Triton's interpreter (set TRITON_INTERPRET=1 before importing triton)"
        return kernels.unavailable_reason()
    return f"Triton kernels run on CUDA tensors, got tensors on {device}"


def adamw_step_(
    backend: str,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    amsgrad: bool,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    sumsq_bufs: Sequence[Tensor] = (),
    stats_out: Tensor | None = None,
    noise_mode: int = 0,
    noise_seed: int = 0,
    noise_counter: int = 0,
    noise_param_coef: float = 0.0,
    noise_scale: Tensor | None = None,
    noise_tensor_idx: Sequence[int] = (),
    noise_var: Sequence[Tensor] = (),
    noise_basis: Sequence[Tensor] = (),
    noise_coef: Sequence[Tensor] = (),
) -> None:
    """Fused multi-tensor AdamW step on an already-resolved ``backend`` (see ``reference.adamw_step_``), with the
    optional in-step noise (``noise_*`` arguments, SPEC §5; ``reference.adamw.NOISE_MODES``).

    ``lr`` may be a 0-dim tensor for ``triton`` (read on the device); the other backends take it as a float.
    ``noise_seed`` is a uint64 (passed to the C++ op as int64 two's complement).
    """
    noise = ()
    if noise_mode:
        seed = int(noise_seed) & 0xFFFFFFFFFFFFFFFF
        seed = seed - (1 << 64) if seed >= (1 << 63) else seed
        noise = (int(noise_mode), seed, int(noise_counter) & 0xFFFFFFFF, float(noise_param_coef), noise_scale,
                 [int(i) & 0xFFFFFFFF for i in noise_tensor_idx], list(noise_var), list(noise_basis),
                 list(noise_coef))
    if backend == "triton":
        from .kernels import library as _triton_ops  # registers torch.ops.pnekern_triton (torch.compile-safe)

        lr_t = lr if isinstance(lr, Tensor) else None
        nz = noise if noise else (0, 0, 0, 0.0, None, [], [], [], [])
        _triton_ops.adamw_step_op(
            list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs), list(state_steps),
            0.0 if lr_t is not None else float(lr), lr_t, float(beta1), float(beta2), float(weight_decay),
            float(eps), bool(amsgrad), bool(maximize), grad_scale, found_inf, list(sumsq_bufs), stats_out, *nz,
        )
        return
    args = (
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs), list(state_steps),
        float(lr), float(beta1), float(beta2), float(weight_decay), float(eps), bool(amsgrad), bool(maximize),
        grad_scale, found_inf, list(sumsq_bufs), stats_out, *noise,
    )
    if backend in ("cpp", "cuda"):  # one operator; the dispatcher picks the CPU or CUDA kernel by device
        torch.ops.pnekern.adamw_step_(*args)
    elif backend == "reference":
        _ref_adamw.adamw_step_(*args)
    else:
        raise RuntimeError(f"adamw_step_: backend {backend!r} is not resolved to an implementation")


def microbatch_accumulate_(
    backend: str,
    acc: Tensor,
    x: Tensor,
    v: Tensor | None,
    inv_sqrt_bc2: float,
    eps: float,
    scale: float = 1.0,
    sumsq: Tensor | None = None,
    assign_sumsq: bool = False,
) -> None:
    """Accumulate one gradient contribution's (Σx², Σa²x²) into ``acc`` [2] float64 (and ``sumsq`` += x², or
    ``sumsq`` = x² with ``assign_sumsq``: a step's first contribution, so the buffer needs no zeroing pass)."""
    a = bool(assign_sumsq)
    if backend == "triton":
        from .kernels import library as _triton_ops

        _triton_ops.microbatch_accumulate_op(acc, x, v, float(inv_sqrt_bc2), float(eps), float(scale), sumsq, a)
    elif backend == "cpp" and x.is_contiguous() and (v is None or v.is_contiguous()):
        torch.ops.pnekern.microbatch_accumulate_(acc, x, v, float(inv_sqrt_bc2), float(eps), float(scale), sumsq, a)
    else:
        _ref_adamw.microbatch_accumulate_(acc, x, v, inv_sqrt_bc2, eps, scale, sumsq, a)
