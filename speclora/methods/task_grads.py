"""Per-task gradients on the shared LoRA, for the methods that combine them (CAGrad, Nash-MTL).

Two ways to the same g_t = ∇_θ (s λ_t L_t) (s: the AMP loss scale, as the trainer's backward applies it):

- ``backward``: one ``torch.autograd.grad`` per task of the batch (:func:`per_task_gradients`),
  while the graph is alive — |S| extra backward passes;
- ``rows`` (:class:`RowGradients`): none extra. The sequences of a batch never interact in an encoder
  (attention and LayerNorm act within a sequence), so the total loss's gradient at LoRA layer k's output,
  δ_n = ∂(Σ_t λ_t L_t)/∂y_n, is that of row n's own task alone, and with h_n = dropout(x_n), z_n = A h_n:

      ∂(λ_t L_t)/∂B = c Σ_{n∈t} Σ_l δ_nl z_nlᵀ,      ∂(λ_t L_t)/∂A = c Σ_{n∈t} Σ_l (Bᵀ δ_nl) h_nlᵀ

  (c = alpha / r), summed per task during the module's one backward, from the activations autograd keeps
  anyway. Exact up to the order of float sums (a test compares it with ``backward``).

Then:
    Ḡ   = mean over ranks of G       under DDP (as DDP averages the total gradient); a task counts where any rank
                                     holds it, so every rank holds the same Ḡ and combines it identically
    θ.grad ← θ.grad − Σ_t ḡ_t + d    the batch's plain contribution swapped for the combination d
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from speclora.methods.base import Method

if TYPE_CHECKING:
    from speclora.model.adapted import AdaptedEncoder
    from speclora.model.module import SpecLoRAModule

__all__ = ["TASK_GRADS", "RowGradients", "TaskGradientMethod", "TaskGradients", "check_task_grads", "loss_scale",
           "mean_over_ranks", "per_task_gradients", "replace_batch_gradient", "row_task_gradients"]

TASK_GRADS = ("rows", "backward")


def check_task_grads(value: str) -> str:
    """The ``task_grads`` option of a method that takes per-task gradients: ``rows`` or ``backward``."""
    if value not in TASK_GRADS:
        raise ValueError(f"model.method.init_args.task_grads={value!r}; allowed: {', '.join(map(repr, TASK_GRADS))}")
    return value


@dataclass
class TaskGradients:
    """What a gradient-combining method keeps between a step's hooks (the adapted encoder's ``work``).

    params: the shared parameters θ (every LoRA layer's A and B); grads: (T, P) this step's per-task gradients
    (rows of absent tasks 0), loss-scaled under AMP; present: (T,) bool; last: the last step's diagnostics;
    rows: the capture of the ``rows`` way (None for ``backward``).
    """

    params: list[nn.Parameter]
    grads: Tensor | None = None
    present: Tensor | None = None
    last: dict | None = None
    rows: RowGradients | None = None


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


def row_task_gradients(h: Tensor, delta: Tensor, A: Tensor, B: Tensor, onehot: Tensor, scaling: float
                       ) -> tuple[Tensor, Tensor]:
    """Per-task gradients of one single-adapter LoRA layer y = W x + c B A h from per-row activations.

    Args:
        h: (N, L, d_in) the layer's LoRA input dropout(x). delta: (N, L, d_out) ∂(Σ_t λ_t L_t)/∂y.
        A: (r, d_in), B: (d_out, r). onehot: (N, T) float, row n's task. scaling: c = alpha / r.

    Returns:
        (T, r, d_in) ∂(λ_t L_t)/∂A and (T, d_out, r) ∂(λ_t L_t)/∂B, in float32 (or float64 for float64 inputs).
    """
    dtype = torch.float64 if delta.dtype == torch.float64 else torch.float32
    n = h.shape[0]
    h, delta = h.reshape(n, -1, h.shape[-1]).to(dtype), delta.reshape(n, -1, delta.shape[-1]).to(dtype)
    A, B, onehot = A.to(dtype), B.to(dtype), onehot.to(dtype)
    z = h @ A.T  # (N, L, r) = A h
    u = delta @ B  # (N, L, r) = Bᵀ δ
    per_row_b = torch.bmm(delta.transpose(1, 2), z)  # (N, d_out, r) = Σ_l δ_nl z_nlᵀ
    per_row_a = torch.bmm(u.transpose(1, 2), h)  # (N, r, d_in) = Σ_l (Bᵀ δ_nl) h_nlᵀ
    t = onehot.shape[1]
    grad_b = scaling * (onehot.T @ per_row_b.reshape(n, -1)).view(t, *B.shape)  # (T, d_out, r)
    grad_a = scaling * (onehot.T @ per_row_a.reshape(n, -1)).view(t, *A.shape)  # (T, r, d_in)
    return grad_a, grad_b


class RowGradients:
    """Per-task gradients of the shared LoRA layers, summed during the module's one backward.

    A forward hook on each layer's dropout keeps h = dropout(x); a hook on each layer's output tensor takes
    δ = ∂L/∂y when the backward reaches it and adds the layer's per-task gradients (:func:`row_task_gradients`)
    into a (T, P) buffer laid out as ``params`` ([A_0, B_0, A_1, B_1, ...] flattened). Capturing is armed per
    forward (:meth:`arm`) and only while gradients are enabled, so evaluation holds nothing.
    """

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers
        self.offsets: list[tuple[int, int]] = []  # per layer: where its A and its B start in P
        offset = 0
        for layer in layers:
            a, b = layer.lora_A[0], layer.lora_B[0]
            self.offsets.append((offset, offset + a.numel()))
            offset += a.numel() + b.numel()
        self.size = offset
        self.onehot: Tensor | None = None  # (N, T) of the armed forward
        self.grads: Tensor | None = None  # (T, P)
        self._inputs: dict[int, Tensor] = {}
        for k, layer in enumerate(layers):
            layer.dropout.register_forward_hook(self._keep_input(k))
            layer.register_forward_hook(self._watch_output(k))

    def arm(self, seq_task: Tensor, num_tasks: int) -> None:
        """Capture the next forward's per-task gradients; rows belong to the tasks ``seq_task`` (N,)."""
        ref = self.layers[0].lora_A
        self.onehot = torch.nn.functional.one_hot(seq_task.long().to(ref.device), num_tasks).to(ref.dtype)  # (N, T)
        self.grads = torch.zeros(num_tasks, self.size, dtype=torch.float32 if ref.dtype != torch.float64
                                 else torch.float64, device=ref.device)  # (T, P)
        self._inputs = {}

    def disarm(self) -> Tensor | None:
        """(T, P) the gradients summed since :meth:`arm` (None if not armed); stops capturing."""
        grads, self.grads, self.onehot, self._inputs = self.grads, None, None, {}
        return grads

    def _keep_input(self, k: int):
        def hook(module, inputs, output) -> None:
            if self.onehot is not None and torch.is_grad_enabled():
                self._inputs[k] = output  # (N, L, d_in) h = dropout(x), kept by autograd anyway
        return hook

    def _watch_output(self, k: int):
        def hook(module, inputs, output) -> None:
            if self.onehot is None or not torch.is_grad_enabled() or not output.requires_grad:
                return
            h, onehot, grads = self._inputs.pop(k), self.onehot, self.grads
            a_at, b_at = self.offsets[k]

            def on_grad(delta: Tensor) -> None:  # δ = ∂L/∂y, (N, L, d_out)
                layer = self.layers[k]
                A, B = layer.lora_A[0].detach(), layer.lora_B[0].detach()
                grad_a, grad_b = row_task_gradients(h, delta, A, B, onehot, layer.scaling)
                grads[:, a_at:a_at + A.numel()] += grad_a.reshape(len(grad_a), -1).to(grads.dtype)
                grads[:, b_at:b_at + B.numel()] += grad_b.reshape(len(grad_b), -1).to(grads.dtype)

            output.register_hook(on_grad)
        return hook


class TaskGradientMethod(Method):
    """A method that rewrites the shared LoRA's gradient from its per-task gradients g_t (Ortho, CAGrad,
    Nash-MTL): how g_t are taken, by ``task_grads``, and handed to the method's ``after_backward``.

    The adapted encoder's ``work`` holds the step's state: ``params`` (θ), ``grads`` (T, P), ``present`` (T,)
    and ``rows`` (the :class:`RowGradients` capture of ``rows``, None for ``backward``), as :class:`TaskGradients`.
    """

    base: ClassVar[bool] = True  # a shared base, no method of its own (left out of model.method's choices)
    task_grads: str = "rows"

    def row_capture(self, layers: list[nn.Module]) -> RowGradients | None:
        """The ``rows`` capture on the shared LoRA layers (laid out as their A, B in order); None for ``backward``."""
        return RowGradients(layers) if self.task_grads == "rows" else None

    def before_encode(self, adapted: AdaptedEncoder, batch: dict[str, Tensor]) -> None:
        """``rows``: capture this forward's per-row activations and output gradients (when gradients are on:
        a training step; evaluation runs without them)."""
        if self.task_grads == "rows" and torch.is_grad_enabled():
            adapted.work.rows.arm(batch["seq_task"], adapted.num_tasks)

    def extra_losses(self, module: SpecLoRAModule, batch: dict[str, Tensor], outputs) -> dict[str, Tensor]:
        """``backward``: take g_t = ∇_θ(s·λ_t L_t) for each task of the batch (s: the AMP loss scale); adds no
        loss term. (``rows``: the gradients come with the module's backward.)"""
        state = module.adapted.work
        if self.task_grads == "rows":
            state.present = outputs.out.task_count > 0  # (T,) tasks with labelled rows
            return {}
        losses = {t: module.task_weights[t] * out.loss for t, out in outputs.items() if out.loss is not None}
        # g_t = ∇_θ (s λ_t L_t), the graph kept for the other tasks and the total backward
        state.grads, state.present = per_task_gradients(losses, state.params, len(module.specs), loss_scale(module))
        return {}

    def take_task_gradients(self, module: SpecLoRAModule) -> tuple[Tensor, Tensor] | None:
        """In ``after_backward``: (T, P) this micro-batch's g_t averaged over ranks, loss-scaled as the backward,
        and (T,) the tasks present on any rank; released from the state. None where none were taken."""
        state = module.adapted.work
        if self.task_grads == "rows":
            state.grads = state.rows.disarm()  # (T, P) summed during the backward
        if state.grads is None or state.present is None:
            return None
        grads, present = mean_over_ranks(state.grads, state.present)
        state.grads = state.present = None
        return grads, present
