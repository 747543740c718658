"""Triton kernels (the GPU backend, ``backend="triton"``): one module per op, ``_<op>_kernel`` + a launcher with the
same signature as the reference op (``pnekern.reference``).

Importing this package never imports Triton; the op modules do, on first use (``pnekern.ops`` imports them lazily).
On CPU tensors the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, how CI without a GPU tests them).

Modules:
    adamw_step            fused multi-tensor AdamW step + per-tensor noise statistics (``adamw_step_``)
    microbatch_accumulate S1 reductions of one gradient contribution + diag sum-of-squares (``microbatch_accumulate_``)
    philox                Philox4x32-10 / the pnekern Gaussian stream (``philox_normal``), and ``@triton.jit`` helpers
                          for kernels that sample in-step
"""
from __future__ import annotations

import functools
import importlib
import os

__all__ = ["available", "unavailable_reason", "interpreter_enabled"]


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """None when ``import triton`` works, else why it does not (a diagnosis for error messages)."""
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as exc:  # noqa: BLE001 - any import failure means the backend is unavailable
        return f"import triton failed ({type(exc).__name__}: {exc}); install it with `pip install triton`"
    return None


def available() -> bool:
    """Whether Triton is importable (not whether a GPU exists)."""
    return unavailable_reason() is None


def interpreter_enabled() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``): then CPU tensors are allowed.

    Triton reads the variable when a kernel module is imported; set it before the first Triton call.
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip() in ("1", "true", "True")
