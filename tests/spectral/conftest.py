"""Spectral tests run single-threaded: their matrices are small (k ≤ 8 columns), where intra-op threads
only add overhead, and on a loaded CI box OpenMP spin-waits can make a 0.1 s solve take seconds."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
