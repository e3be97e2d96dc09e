"""Every tensor a SpectralGraphCallback holds, for the device tests (CPU and GPU)."""

from __future__ import annotations

import torch
from torch_geometric.data import Data

from speclora.spectral.callback import SpectralGraphCallback
from speclora.spectral.correlation import EdgeCorrelation
from speclora.spectral.response import ClassFilter


def state_tensors(callback: SpectralGraphCallback) -> dict[str, torch.Tensor]:
    """Found by walking the callback's attributes (lists, tuples, dicts, the EdgeCorrelation, the filters, the
    torch-geometric graph), so that state added later is checked too. The layout (node numbering) is structure kept on the CPU; layers are the
    model's own modules."""
    found: dict[str, torch.Tensor] = {}

    def walk(name: str, x) -> None:
        if isinstance(x, torch.Tensor):
            found[name] = x
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(f"{name}[{i}]", v)
        elif isinstance(x, dict):
            for key, v in x.items():
                walk(f"{name}[{key!r}]", v)
        elif isinstance(x, (EdgeCorrelation, ClassFilter)):
            for key, v in vars(x).items():
                walk(f"{name}.{key}", v)
        elif isinstance(x, Data):
            for key, v in x.items():
                walk(f"{name}.{key}", v)

    for key, value in vars(callback).items():
        if key not in ("layers", "layout"):
            walk(key, value)
    return found


def off_device(callback: SpectralGraphCallback, device: torch.device | str) -> dict[str, torch.device]:
    """The state tensors that are not on ``device`` (an empty dict when all are)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return {name: t.device for name, t in state_tensors(callback).items() if t.device != device}
