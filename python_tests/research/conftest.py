"""Research-tool tests are tiny and latency-bound: one torch thread (the machine is a shared 2-core box)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
