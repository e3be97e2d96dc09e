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
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from speclora.model.config import OptimConfig
from speclora.model.step import fused_supported, supports_found_inf


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


def fused_setting(fused: bool | None, clip: float | None, loss_scaled: bool, precision: str | None) -> bool | None:
    """``model.optim.fused`` as the trainer allows it. Under fp16 AMP (``loss_scaled``: a GradScaler) a fused
    AdamW unscales the gradients inside its own step, so nothing can clip them first: with a clip, ``None``
    (auto) becomes False (logged) and True is refused. Without a loss scale (bf16-mixed, 32-true) a fused
    AdamW is fine: the module clips its gradients itself (:func:`clip_unscaled_gradients`)."""
    if fused is False or not clip or not loss_scaled:
        return fused
    if fused:
        raise ValueError(
            f"model.optim.fused=true cannot run with trainer.precision={precision!r} and "
            f"trainer.gradient_clip_val={clip}: a fused AdamW unscales fp16 gradients inside its step, after "
            "clipping would have seen them still scaled; allowed: model.optim.fused null or false, "
            "trainer.precision bf16-mixed or 32-true, or trainer.gradient_clip_val 0")
    rank_zero_info(f"trainer.precision={precision!r} with gradient clipping: AdamW runs unfused "
                   "(a fused AdamW unscales fp16 gradients inside its step, after the clip)")
    return False


def clip_unscaled_gradients(optimizer: torch.optim.Optimizer, clip_val: float | None, algorithm: str | None,
                            precision_plugin) -> bool:
    """Clip, in place, the gradients of a fused optimizer under AMP without a loss scale (bf16-mixed), which
    Lightning's AMP plugin refuses to; returns whether it clipped (False: Lightning's own path applies). As
    Lightning's plain precision: ``value`` clamps each entry to ±clip_val; ``norm`` (default) scales every
    parameter's gradient so that ‖g‖₂ ≤ clip_val over all of them."""
    unscaled_amp = isinstance(precision_plugin, MixedPrecision) and precision_plugin.scaler is None
    if not (clip_val and unscaled_amp and supports_found_inf(optimizer)):
        return False
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if algorithm == "value":
        torch.nn.utils.clip_grad_value_(params, clip_val)
    else:
        torch.nn.utils.clip_grad_norm_(params, clip_val)
    return True
