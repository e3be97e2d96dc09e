"""Per-task gradients on the shared LoRA, for the methods that combine them (CAGrad, Nash-MTL).

The same mechanics as Ortho's (speclora/methods/ortho.py), as plain functions:

    g_t = ∇_θ (s λ_t L_t)            one ``torch.autograd.grad`` per task of the batch, while the graph is alive
                                     (s: the AMP loss scale, as the trainer's backward applies it)
    Ḡ   = mean over ranks of G       under DDP (as DDP averages the total gradient); a task counts where any rank
                                     holds it, so every rank holds the same Ḡ and combines it identically
    θ.grad ← θ.grad − Σ_t ḡ_t + d    the batch's plain contribution swapped for the combination d
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor, nn

if TYPE_CHECKING:
    from speclora.model.module import SpecLoRAModule

__all__ = ["TaskGradients", "loss_scale", "mean_over_ranks", "per_task_gradients", "replace_batch_gradient"]


@dataclass
class TaskGradients:
    """What a gradient-combining method keeps on the module between a step's hooks.

    params: the shared parameters θ (every LoRA layer's A and B); grads: (T, P) this step's per-task gradients
    (rows of absent tasks 0), loss-scaled under AMP; present: (T,) bool; last: the last step's diagnostics.
    """

    params: list[nn.Parameter]
    grads: Tensor | None = None
    present: Tensor | None = None
    last: dict | None = None


def loss_scale(module: SpecLoRAModule) -> float:
    """The AMP loss scale the trainer's backward multiplies the loss by (1.0 without a GradScaler)."""
    trainer = getattr(module, "_trainer", None)
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    return float(scaler.get_scale()) if scaler is not None else 1.0


def per_task_gradients(losses: dict[int, Tensor], params: list[nn.Parameter], num_tasks: int,
                       scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """(T, P) g_t = ∇_θ(scale · losses[t]) flattened over ``params`` (rows of absent tasks 0), (T,) present.

    The graph is kept for the other tasks and the module's total backward."""
    size = sum(p.numel() for p in params)
    ref = params[0]
    grads = torch.zeros(num_tasks, size, dtype=ref.dtype, device=ref.device)  # (T, P)
    present = torch.zeros(num_tasks, dtype=torch.bool, device=ref.device)  # (T,)
    for t, loss in losses.items():
        parts = torch.autograd.grad(scale * loss, params, retain_graph=True, allow_unused=True)
        grads[t] = torch.cat([(q if q is not None else torch.zeros_like(p)).reshape(-1)
                              for q, p in zip(parts, params)])  # (P,)
        present[t] = True
    return grads, present


def mean_over_ranks(grads: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
    """Under DDP: (T, P) the per-task gradients averaged over ranks and (T,) the tasks present on any rank;
    the inputs unchanged in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return grads, present
    grads = grads.clone()
    dist.all_reduce(grads)  # Σ_ranks
    grads /= dist.get_world_size()
    count = present.to(grads.dtype)
    dist.all_reduce(count)
    return grads, count > 0


def replace_batch_gradient(params: list[nn.Parameter], plain: Tensor, combined: Tensor) -> None:
    """θ.grad ← θ.grad − plain + combined, with (P,) vectors over ``params`` flattened in order: what earlier
    micro-batches of a gradient accumulation left in ``.grad`` is kept."""
    delta = combined - plain  # (P,)
    offset = 0
    for p in params:
        step = delta[offset:offset + p.numel()].view_as(p).to(p.dtype)
        offset += p.numel()
        if p.grad is None:
            p.grad = step.clone()
        else:
            p.grad.add_(step)
