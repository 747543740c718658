"""Shared test configuration.

TRITON_INTERPRET must be set before any ``@triton.jit`` decorator runs, so it is set here, before test modules
import kernel modules. CI has no GPU: every Triton kernel is checked on CPU tensors through the interpreter.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Deterministic, quick: CI machines have 2 cores.
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def cpu_backends():
    """The backends that run on CPU tensors (the compiled one must be built: a missing build fails)."""
    return ("reference", "cpp")
