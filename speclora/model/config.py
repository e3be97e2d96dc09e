"""The LoRA and optimiser hyperparameters of the LightningModule (``--model.lora.*``, ``--model.optim.*``).

Frozen dataclasses whose fields are the CLI keys; a checkpoint's hyperparameters hold them as plain dicts
(``dataclasses.asdict``), which :func:`config_from` turns back into the dataclass.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA hyperparameters (Hu et al. 2021).

    Args:
        r: rank of every adapter.
        alpha: scaling numerator; the update is (alpha / r)·B A.
        dropout: dropout on the adapter's input.
        targets: module name suffixes to adapt; null = the attention query, key, value and output
            projections of the backbone's architecture.
        init_seed: seed of the shared initial A (all tasks start from the same A, DESIGN.md).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    targets: list[str] | None = None
    init_seed: int = 0

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"model.lora.r={self.r}; allowed: an integer >= 1")
        if not self.alpha > 0:
            raise ValueError(f"model.lora.alpha={self.alpha}; allowed: a number > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.lora.dropout={self.dropout}; allowed: 0 <= dropout < 1")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup and linear (or no) decay.

    Args:
        lr: peak learning rate of the adapters.
        head_lr: learning rate of the task heads (default: lr).
        weight_decay: decoupled weight decay (heads and adapters).
        warmup_ratio: share of the run spent warming up linearly from 0.
        schedule: ``linear`` decays to 0 at the last step; ``constant`` holds the peak after warmup.
        betas: AdamW betas.
        fused: torch's fused AdamW (one kernel for all parameters; it also skips a non-finite step on the
            device, without a host read); null = fused where torch has it for the parameters (CPU, CUDA).
    """

    lr: float = 5e-4
    head_lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    schedule: Literal["linear", "constant"] = "linear"
    betas: tuple[float, float] = (0.9, 0.999)
    fused: bool | None = None

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"model.optim.lr={self.lr}; allowed: a number > 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"model.optim.warmup_ratio={self.warmup_ratio}; allowed: 0 <= warmup_ratio < 1")
        if self.schedule not in ("linear", "constant"):
            raise ValueError(f"model.optim.schedule={self.schedule!r}; allowed: 'linear', 'constant'")


def config_from(value: Any, cls: type, key: str) -> Any:
    """A config dataclass from itself or from its fields as a dict (a checkpoint's hyperparameters)."""
    if not isinstance(value, Mapping):
        return value
    fields = dict(value)
    if "betas" in fields:
        fields["betas"] = tuple(fields["betas"])
    try:
        return cls(**fields)
    except TypeError as err:
        raise ValueError(f"{key}={fields!r}: {err}; allowed fields: {', '.join(cls.__dataclass_fields__)}") from err
