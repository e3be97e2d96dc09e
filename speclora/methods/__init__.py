"""Multi-task adaptation methods, one file each; ``model.method`` picks one by class name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from speclora.methods.adalora import AdaLoRA
from speclora.methods.base import Method
from speclora.methods.combine import CAGrad, NashMTL
from speclora.methods.famo import FAMO
from speclora.methods.full_ft import FullFT
from speclora.methods.hyperformer import HyperFormer
from speclora.methods.lora_variants import Independent, Shared, Single
from speclora.methods.mtl_lora import MTLLoRA
from speclora.methods.mtlora import MTLoRA
from speclora.methods.ortho import Ortho
from speclora.methods.speclora import SpecLoRA
from speclora.methods.unolora import UnoLoRAStar
from speclora.model.method import resolve_method

METHODS: dict[str, type[Method]] = {m.name: m for m in (Single, Independent, Shared, Ortho, FullFT, UnoLoRAStar, HyperFormer,
                                                 SpecLoRA, AdaLoRA, MTLoRA, FAMO, CAGrad,
                                                 NashMTL, MTLLoRA)}


def get_method(name: str | Method | Mapping[str, Any]) -> Method:
    """A method instance from its registry name (``shared``), class name (``Shared``), or the config value
    :meth:`Method.hparams` writes (``{"class_path": "speclora.methods.Ortho", "init_args": {...}}``, as a
    checkpoint's hyperparameters hold it)."""
    if isinstance(name, Method | Mapping):
        return resolve_method(name)  # the same resolution as the module's
    for cls in METHODS.values():
        if name in (cls.name, cls.__name__):
            return cls()
    raise ValueError(f"model.method={name!r}; allowed: {', '.join(method_names())}")


def method_names() -> list[str]:
    """The class names ``model.method`` takes, in the registry's order."""
    return [cls.__name__ for cls in METHODS.values()]


__all__ = ["CAGrad", "FAMO", "METHODS", "NashMTL", "MTLLoRA", "AdaLoRA", "MTLoRA", "FullFT", "HyperFormer", "Independent", "Method", "Ortho", "Shared", "Single", "SpecLoRA", "UnoLoRAStar",
           "get_method", "method_names"]
