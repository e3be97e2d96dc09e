"""``famo``: per-task LoRAs (or one shared LoRA), the task losses weighted by FAMO — one backward, O(1) per step.

FAMO (Liu, Liu, Stone & Liu, NeurIPS 2023, "FAMO: Fast Adaptive Multitask Optimization", Algorithm 1) keeps
one logit ξ_t per task and, at step k, descends on Σ_t c z_t log ℓ_t (z = softmax(ξ)), i.e. weights the task
losses by w_t = c z_t / ℓ_t (speclora.methods.weighting.famo_weights); then it moves ξ against the tasks whose
log-loss fell most over the step (famo_logit_grad), with Adam (the reference code's optimiser of ξ).

In the harness, on a step over a batch holding the tasks S_k:

    ℓ_t        the batch's mean loss of task t (under DDP: over the global batch, all-reduced: every rank
               weighs with the same w)
    ξ update   δ_t = log D_t^(k−1) − log D_t^(k)  for t in S_{k−1} ∩ S_k;  ξ ← Adam(ξ, ∇_ξ zᵀδ + γ ξ)
    w          famo_weights(ξ, ℓ, S_k)
    loss       Σ_t w_t L_t  (the module's Σ_t L_t plus the term ``famo_reweighting`` = Σ_t (w_t − 1) L_t)

The log-loss decrease of the step k−1 → k is measured on the next batch, when its losses are known anyway:
no extra forward, no per-task backward (the paper's "O(1) space and time"; its reference script re-evaluates
the same batch after the step instead, one more forward). All state (ξ, the Adam moments, last step's log-losses)
lives in buffers of the adapted encoder's ``method_state`` (a FAMOState): it moves with the module and is saved in
checkpoints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from speclora.methods.base import Method
from speclora.methods.weighting import adam_update, famo_logit_grad, famo_weights
from speclora.model.adapted import AdaptedEncoder, BuildInputs

if TYPE_CHECKING:
    from speclora.model.module import SpecLoRAModule

__all__ = ["FAMO", "FAMOState", "global_task_losses"]

ADAPTERS = ("per_task", "shared")


class FAMOState(nn.Module):
    """FAMO's state, as buffers (moved with the module, saved in checkpoints).

    logits: (T,) ξ; exp_avg, exp_avg_sq: (T,) Adam's moments of ξ; step: () long, Adam steps taken;
    prev_log_loss: (T,) log D_t of the last step; prev_present: (T,) bool, its tasks; weights: (T,) the last w.
    """

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        for name in ("logits", "exp_avg", "exp_avg_sq", "prev_log_loss", "weights"):
            self.register_buffer(name, torch.zeros(num_tasks))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("prev_present", torch.zeros(num_tasks, dtype=torch.bool))


def global_task_losses(task_loss: Tensor, task_count: Tensor) -> tuple[Tensor, Tensor]:
    """(T,) each task's mean loss over the global batch and (T,) whether any rank holds it.

    Under DDP: Σ_r n_rt L_rt / Σ_r n_rt from one all-reduce of [n·L, n] (the local values otherwise)."""
    n = task_count.detach().float()  # (T,)
    sums = torch.stack([task_loss.detach().float() * n, n])  # (2, T)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        sums = sums.clone()
        dist.all_reduce(sums)  # Σ over ranks
    present = sums[1] > 0  # (T,)
    return sums[0] / sums[1].clamp_min(1.0), present


class FAMO(Method):
    """Task losses weighted by FAMO (loss-based: one backward per step, no per-task gradient).

    Args:
        adapters: ``per_task`` (one LoRA per task, as ``independent``) or ``shared`` (one LoRA for all tasks,
            as ``shared``: FAMO then balances the tasks on one adapter).
        lr: learning rate of the task logits ξ (the reference code's ``w_lr``: 0.025).
        gamma: L2 decay of ξ (the reference code's ``gamma``: 0.01), pulling the weights towards uniform.
        eps: added to every loss before its log and inverse (the losses' minimum is taken as 0).
    """

    name: ClassVar[str] = "famo"
    needs_tasks: ClassVar[str | None] = "weighs tasks against each other"

    def __init__(self, adapters: Literal["per_task", "shared"] = "per_task", lr: float = 0.025, gamma: float = 0.01,
                 eps: float = 1e-8) -> None:
        if adapters not in ADAPTERS:
            raise ValueError(f"model.method.init_args.adapters={adapters!r}; allowed: {', '.join(map(repr, ADAPTERS))}")
        if not lr > 0:
            raise ValueError(f"model.method.init_args.lr={lr!r}; allowed: a number > 0")
        if not gamma >= 0:
            raise ValueError(f"model.method.init_args.gamma={gamma!r}; allowed: a number >= 0")
        if not eps > 0:
            raise ValueError(f"model.method.init_args.eps={eps!r}; allowed: a number > 0")
        self.adapters = adapters
        self.lr = float(lr)
        self.gamma = float(gamma)
        self.eps = float(eps)

    # ------------------------------------------------------------------ construction
    @property
    def one_adapter(self) -> bool:  # a property, not an attribute: hparams() lists public attributes as arguments
        return self.adapters == "shared"

    def build(self, inputs: BuildInputs) -> AdaptedEncoder:
        if inputs.loss_weights != "uniform":
            raise ValueError(f"model.method=FAMO learns the task weights itself; model.loss_weights="
                             f"{inputs.loss_weights!r} would weigh them twice; allowed with FAMO: 'uniform'")
        adapted = super().build(inputs)
        adapted.method_state = FAMOState(inputs.num_tasks)  # buffers: saved in checkpoints
        return adapted

    # ------------------------------------------------------------------ a training step
    def extra_losses(self, module: SpecLoRAModule, batch: dict[str, Tensor], outputs) -> dict[str, Tensor]:
        """Update ξ from the log-loss decrease since the last step, then reweigh: Σ_t (w_t − 1) L_t."""
        state: FAMOState = module.adapted.method_state
        out = outputs.out  # HeadOutput: (T,) task_loss, task_count; no host read below
        losses, present = global_task_losses(out.task_loss, out.task_count)  # (T,), (T,)
        log_loss = torch.log(losses + self.eps)  # (T,) log D_t
        both = present & state.prev_present  # (T,) tasks measured before and after the last update
        delta = state.prev_log_loss - log_loss  # (T,) δ_t = log D_t^(k−1) − log D_t^(k)
        grad = famo_logit_grad(state.logits, delta, both)  # (T,) ∇_ξ zᵀδ (0 without a previous step)
        has_prev = both.any()  # () bool: the first step (or a batch sharing no task with the last) skips the update
        logits = state.logits.clone()
        moments = (state.exp_avg.clone(), state.exp_avg_sq.clone(), state.step.clone())
        adam_update(logits, grad, *moments, lr=self.lr, weight_decay=self.gamma)
        state.logits.copy_(torch.where(has_prev, logits, state.logits))
        for buf, new in zip((state.exp_avg, state.exp_avg_sq, state.step), moments):
            buf.copy_(torch.where(has_prev, new, buf))
        weights = famo_weights(state.logits, losses, present, self.eps)  # (T,) w_t
        state.prev_log_loss.copy_(log_loss.detach())
        state.prev_present.copy_(present)
        state.weights.copy_(weights)
        # the module's loss holds Σ_t λ_t L_t (λ = 1): this term makes it Σ_t w_t L_t
        return {"famo_reweighting": ((weights - module.task_weights) * out.task_loss).sum()}
