"""pytest configuration of the benchmark suites: skip everything when PNEKERN_BENCH_DEVICE=cuda has no GPU."""
from __future__ import annotations

import pytest
import torch

from _bench_common import DEVICE


def pytest_collection_modifyitems(config, items):
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="PNEKERN_BENCH_DEVICE=cuda but torch sees no CUDA device")
        for item in items:
            item.add_marker(skip)
