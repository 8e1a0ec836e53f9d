"""Fixtures shared by the test modules."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread unless a test asks for more (on 2 shared cores, OpenMP spin-waits make 2-thread
    runs 20-50x slower); the caller's count is restored whatever a test does."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
