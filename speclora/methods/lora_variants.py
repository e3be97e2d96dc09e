"""The plain LoRA arrangements of DESIGN.md: ``single``, ``independent`` and ``shared``."""

from __future__ import annotations

from typing import ClassVar

from speclora.methods.base import Method
from speclora.tasks import TaskSpec


class Independent(Method):
    """One LoRA adapter per task, all trained together on mixed batches, no coupling ("vanilla LoRA")."""

    name: ClassVar[str] = "independent"


class Single(Method):
    """One task, one adapter, trained alone: the reference of ITR and IC."""

    name: ClassVar[str] = "single"

    def check(self, specs: list[TaskSpec]) -> None:
        if len(specs) != 1:
            raise ValueError(
                f"model.method=Single trains one task alone but data.tasks has {len(specs)}: "
                f"{[s.name for s in specs]}; give one task, or use method Independent"
            )


class Shared(Method):
    """One LoRA adapter shared by every task, with per-task heads (UnoLoRA; the seed paper's "MTLoRA")."""

    name: ClassVar[str] = "shared"
    one_adapter = True

