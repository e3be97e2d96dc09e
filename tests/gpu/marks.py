"""GPU tests are marked ``gpu`` (left out of the default run; ``-m gpu`` selects them) and skipped without CUDA:

    python -m pytest -q -m gpu tests/gpu

Every module here sets ``pytestmark = GPU``; ``TWO_GPUS`` is for the tests that need a ``cuda:1``.
"""

from __future__ import annotations

import pytest
import torch

GPU = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"),
]
TWO_GPUS = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                              reason="needs two CUDA devices")
