"""Refuse, before training, an accelerator or a device the machine does not have.

``--trainer.accelerator gpu`` (or ``cuda``) where torch sees no CUDA device, or ``--trainer.devices`` naming a
CUDA device that is not there (``cuda:3``, ``[3]``, ``"0,3"``, or a count above the machine's), fails with a
``ValueError`` naming the setting, the value given and the devices the machine has, instead of Lightning's
"No supported gpu backend found!" or "`devices` selected with `CPUAccelerator` should be an int > 0".

``--trainer.devices cuda:N`` also selects that one device: it becomes ``accelerator: cuda, devices: [N]``.
"""

from __future__ import annotations

import re
from typing import Any

import torch

CUDA_NAMES = ("gpu", "cuda")
_CUDA_DEVICE = re.compile(r"cuda:(\d+)")


def machine_devices() -> str:
    """What torch sees, in words: 'this machine has 2 CUDA devices: cuda:0 (NVIDIA H200), cuda:1 (...)'."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        build = "built without CUDA" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no device visible"
        return f"this machine has no CUDA device (torch {torch.__version__}, {build}); it has: cpu"
    names = ", ".join(f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(count))
    return f"this machine has {count} CUDA device{'s' if count > 1 else ''}: {names}"


def _indices(devices: Any) -> list[int] | None:
    """Explicit device indices in Lightning's ``devices`` value ([0, 2], "0,2"), or None (a count, auto)."""
    if isinstance(devices, (list, tuple)):
        return [int(d) for d in devices]
    if isinstance(devices, str) and "," in devices:
        return [int(d) for d in devices.split(",") if d.strip()]
    return None


def _count(devices: Any) -> int | None:
    """A device count in ``devices`` (2, "2"); None for auto, -1 (all), and index lists."""
    if isinstance(devices, bool):
        return None
    if isinstance(devices, int):
        return devices if devices > 0 else None
    if isinstance(devices, str) and devices.strip().isdigit():
        return int(devices)
    return None


def check_devices(accelerator: Any, devices: Any) -> tuple[Any, Any]:
    """The trainer's ``(accelerator, devices)``, checked against the machine; ``devices: cuda:N`` becomes
    ``("cuda", [N])``. Raises ``ValueError`` naming ``trainer.accelerator`` / ``trainer.devices``."""
    name = accelerator.lower() if isinstance(accelerator, str) else None  # an Accelerator instance: not checked
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if isinstance(devices, str) and (match := _CUDA_DEVICE.fullmatch(devices.strip())):
        if name not in ("auto", *CUDA_NAMES):
            raise ValueError(f"trainer.devices={devices!r} names a CUDA device but trainer.accelerator="
                             f"{accelerator!r}; allowed: trainer.accelerator auto, gpu or cuda with it")
        index = int(match.group(1))
        if index >= available:
            raise ValueError(f"trainer.devices={devices!r}: no CUDA device {index}; {machine_devices()}")
        return "cuda", [index]
    if name in CUDA_NAMES and available == 0:
        raise ValueError(f"trainer.accelerator={accelerator!r}: {machine_devices()}; "
                         "use --trainer.accelerator cpu (or auto)")
    indices = _indices(devices)
    if indices is not None and name in ("auto", *CUDA_NAMES):
        absent = [i for i in indices if not 0 <= i < available]
        if absent:
            raise ValueError(f"trainer.devices={devices!r}: no CUDA device {', '.join(map(str, absent))}; "
                             f"{machine_devices()}")
    count = _count(devices)
    if count is not None and name in CUDA_NAMES and count > available:
        raise ValueError(f"trainer.devices={devices!r} asks for {count} CUDA devices; {machine_devices()}")
    return accelerator, devices
