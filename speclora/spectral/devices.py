"""Devices and precision of the spectral state (shared/DESIGN.md: "All the callback's state lives on the device
of the LoRA parameters"; "The spectral math runs in float32 … whatever the training precision").

Pure helpers, no Lightning state: moving nested containers of tensors, IEEE float32 products whatever the
process asked for (TF32), and a broadcast from rank 0 that keeps each rank's own device.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor


def move_to(x: Any, device: torch.device) -> Any:
    """``x`` with every tensor in it (through lists, tuples and dicts) moved to ``device``: exact copies."""
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(move_to(v, device) for v in x)
    if isinstance(x, dict):
        return {key: move_to(v, device) for key, v in x.items()}
    return x


@contextmanager
def ieee_float32() -> Iterator[None]:
    """float32 products in full IEEE precision inside, whatever the process set (TF32 on CUDA, reduced
    precision in oneDNN); restored on exit. A TF32 product keeps a 10-bit mantissa: 1e-3 relative errors, the
    size of the eigensolver's own tolerances. Uses the per-backend ``fp32_precision`` settings, which read and
    restore consistently whether the process set TF32 with the new or with the legacy API."""
    backends = [b for b in (torch.backends.cuda.matmul, getattr(torch.backends.mkldnn, "matmul", None))
                if b is not None and hasattr(b, "fp32_precision")]
    previous = [b.fp32_precision for b in backends]
    for b in backends:
        b.fp32_precision = "ieee"
    try:
        yield
    finally:
        for b, p in zip(backends, previous):
            b.fp32_precision = p


@contextmanager
def float32_math(device: torch.device) -> Iterator[None]:
    """The spectral math in IEEE float32 on ``device`` whatever the training precision: no autocast, no TF32."""
    with ieee_float32():
        if torch.amp.is_autocast_available(device.type):
            with torch.autocast(device.type, enabled=False):
                yield
        else:
            yield


def broadcast_from_rank0(strategy: Any, tensor: Tensor) -> Tensor:
    """Rank 0's ``tensor`` on every rank, on this rank's own device (cuda:N): an in-place collective when
    torch.distributed runs, not the strategy's pickled object broadcast (which unpickles a GPU tensor on the
    sender's device). Every rank passes a tensor of the same shape and dtype."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        tensor = tensor.contiguous()
        torch.distributed.broadcast(tensor, src=0)
        return tensor
    return strategy.broadcast(tensor, src=0).to(tensor.device)


def broadcast_optional_from_rank0(strategy: Any, tensor: Tensor | None, shape: tuple[int, ...],
                                  like: Tensor) -> Tensor | None:
    """Rank 0's optional ``tensor`` (of ``shape``, with ``like``'s dtype and device) on every rank: whether it
    exists is broadcast first, so that ranks that differ in having one still agree (None on every rank when
    rank 0 has none)."""
    flag = broadcast_from_rank0(strategy, torch.tensor([tensor is not None], dtype=torch.long, device=like.device))
    if not bool(flag[0]):
        return None
    buffer = tensor if tensor is not None else torch.zeros(shape, dtype=like.dtype, device=like.device)
    return broadcast_from_rank0(strategy, buffer)
