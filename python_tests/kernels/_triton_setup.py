"""Shared setup of the Triton kernel tests: the interpreter on CPU tensors (CI) or the GPU natively.

TRITON_INTERPRET must be set before triton is imported (python_tests/conftest.py sets it; repeated here so a module
imported on its own behaves the same).
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def triton_device() -> str:
    """The device the Triton tests run on; skips the module when Triton is missing or nothing can run it."""
    pytest.importorskip("triton")
    from pnekern import kernels

    if kernels.interpreter_enabled():
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("TRITON_INTERPRET=0 and no CUDA device: nothing can run the Triton kernels", allow_module_level=True)
    return "cpu"
