"""Multi-task adaptation methods, one file each; ``model.method`` picks one by class name."""

from __future__ import annotations

import importlib
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

METHODS: dict[str, type[Method]] = {m.name: m for m in (Single, Independent, Shared, Ortho, FullFT, UnoLoRAStar, HyperFormer,
                                                 SpecLoRA, AdaLoRA, MTLoRA, FAMO, CAGrad,
                                                 NashMTL, MTLLoRA)}


def get_method(name: str | Method | Mapping[str, Any]) -> Method:
    """A method instance from its registry name (``shared``), class name (``Shared``), or the config value
    :meth:`Method.hparams` writes (``{"class_path": "speclora.methods.Ortho", "init_args": {...}}``, as a
    checkpoint's hyperparameters hold it)."""
    if isinstance(name, Method):
        return name
    if isinstance(name, Mapping):
        return _from_config(name)
    for cls in METHODS.values():
        if name in (cls.name, cls.__name__):
            return cls()
    raise ValueError(f"model.method={name!r}; allowed: {', '.join(method_names())}")


def method_names() -> list[str]:
    """The class names ``model.method`` takes, in the registry's order."""
    return [cls.__name__ for cls in METHODS.values()]


def _from_config(value: Mapping[str, Any]) -> Method:
    path = value.get("class_path")
    if not isinstance(path, str) or set(value) - {"class_path", "init_args"}:
        raise ValueError(f"model.method={dict(value)!r}; allowed: {{class_path: <a Method class>, init_args: "
                         f"{{...}}}}, the class one of {', '.join(method_names())}")
    cls = next((c for c in METHODS.values() if path in (c.__name__, f"{c.__module__}.{c.__qualname__}")), None)
    if cls is None:  # a method defined outside speclora.methods
        module, _, attr = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr) if module else None
        except ImportError:
            cls = None
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise ValueError(f"model.method.class_path={path!r} is not a Method class; allowed: "
                             f"{', '.join(method_names())}, or the import path of a speclora.methods.Method subclass")
    return cls(**dict(value.get("init_args") or {}))


__all__ = ["CAGrad", "FAMO", "METHODS", "AdaLoRA", "NashMTL", "MTLLoRA", "MTLoRA", "FullFT", "HyperFormer", "Independent", "Method", "Ortho", "Shared", "Single", "SpecLoRA", "UnoLoRAStar",
           "get_method", "method_names"]
