"""``speclora``: per-task LoRA adapters coordinated through the spectrum of their parameter graph."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from speclora.methods.base import Method

if TYPE_CHECKING:
    from speclora.model.module import SpecLoRAModule


class SpecLoRA(Method):
    """The seed paper's method (§3.1–3.3): the ``independent`` adapters plus a SpectralGraphCallback.

    The callback is configured under ``trainer.callbacks`` (its constructor arguments are the method's
    options: configs/methods/speclora.yaml and the ablation configs); when none is configured, one with
    the defaults is added.
    """

    name: ClassVar[str] = "speclora"

    def callbacks(self, module: SpecLoRAModule) -> list:
        from speclora.spectral.callback import SpectralGraphCallback

        trainer = module._trainer  # configure_callbacks runs with the trainer attached
        configured = trainer is not None and any(isinstance(cb, SpectralGraphCallback) for cb in trainer.callbacks)
        return [] if configured else [SpectralGraphCallback()]
