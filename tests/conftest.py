"""Shared test setup."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny tensors and tiny models: one intra-op thread. On a busy 2-core machine OpenMP's barrier makes a
    [2, 4] log_softmax take milliseconds instead of microseconds, and a tiny model's step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
