"""The optimiser and learning-rate schedule of the LightningModule (``--model.optim.*``, OptimConfig).

AdamW over three parameter groups: the encoder's trainable weights (adapters; every weight for full
fine-tuning) and a method's own modules at ``lr``, the task heads at ``head_lr``. The schedule scales
every group's rate by

    f(s) = (s + 1) / (w + 1)                   for s < w   (linear warmup, w = ⌊warmup_ratio · S⌋)
    f(s) = max(0, (S − s) / max(1, S − w))     after it    (``linear``; ``constant``: f = 1)

with S the run's optimizer steps, stepped once per optimizer step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from speclora.model.config import OptimConfig
from speclora.model.step import fused_supported


def warmup_steps(total: int, ratio: float) -> int:
    """w = ⌊ratio · total⌋, the warmup's optimizer steps."""
    return int(math.floor(ratio * total))


def schedule_factor(cfg: OptimConfig, total: int):
    """f(s) of the module docstring, for ``LambdaLR``."""
    warmup = int(cfg.warmup_ratio * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def adamw_with_schedule(cfg: OptimConfig, encoder: nn.Module, heads: nn.Module, method_net: nn.Module | None,
                        total: int) -> dict:
    """Lightning's ``configure_optimizers`` answer: AdamW over the groups adapters / heads / method (empty
    groups left out; fused where torch has it for the parameters unless ``cfg.fused`` says) and the
    schedule, stepped every optimizer step."""
    adapter_params = [p for n, p in encoder.named_parameters() if p.requires_grad]
    head_params = [p for p in heads.parameters() if p.requires_grad]
    method_params = [p for p in (method_net or nn.Module()).parameters() if p.requires_grad]
    groups = [
        {"params": adapter_params, "lr": cfg.lr, "name": "adapters"},
        {"params": head_params, "lr": cfg.head_lr or cfg.lr, "name": "heads"},
        {"params": method_params, "lr": cfg.lr, "name": "method"},
    ]
    params = [p for g in groups for p in g["params"]]
    fused = fused_supported(params) if cfg.fused is None else cfg.fused
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas,
        fused=fused or None,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_factor(cfg, total))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
