"""Multi-task adaptation methods, one file each; ``model.method`` picks one by class name."""

from __future__ import annotations

from speclora.methods.adalora import AdaLoRA
from speclora.methods.base import Method
from speclora.methods.full_ft import FullFT
from speclora.methods.hyperformer import HyperFormer
from speclora.methods.lora_variants import Independent, Shared, Single
from speclora.methods.mtlora import MTLoRA
from speclora.methods.ortho import Ortho
from speclora.methods.speclora import SpecLoRA
from speclora.methods.unolora import UnoLoRAStar

METHODS: dict[str, type[Method]] = {m.name: m for m in (Single, Independent, Shared, Ortho, FullFT, UnoLoRAStar, HyperFormer,
                                                 SpecLoRA, AdaLoRA, MTLoRA)}


def get_method(name: str | Method) -> Method:
    """A method instance from its registry name (``shared``) or class name (``Shared``)."""
    if isinstance(name, Method):
        return name
    for cls in METHODS.values():
        if name in (cls.name, cls.__name__):
            return cls()
    raise ValueError(f"model.method={name!r}; allowed: {', '.join(sorted(METHODS))}")


__all__ = ["METHODS", "AdaLoRA", "MTLoRA", "FullFT", "HyperFormer", "Independent", "Method", "Ortho", "Shared", "Single", "SpecLoRA", "UnoLoRAStar",
           "get_method"]
