"""ICL tests train tiny models: they are latency-bound, and on a shared 2-core machine a second OpenMP thread makes
them up to 20× slower (threads spin-waiting on a busy core). Run them on one thread and restore the setting."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
