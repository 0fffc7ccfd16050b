"""Fixtures shared by the calibration tests."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matrices: one thread is faster and immune to other processes competing for the cores
    # (on a busy 2-core machine, 2 threads made small SVDs 10-50x slower).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
