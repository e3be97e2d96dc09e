"""``mtl_lora``: MTL-LoRA (Yang et al., AAAI 2025): a shared A, a task-specific r × r transform Λ_t, and n shared
up-projections B_j mixed per task by learned softmax weights.

"MTL-LoRA: Low-Rank Adaptation for Multi-Task Learning" (arXiv:2410.09437, §3, eq. 5–7), with the initialisation
and defaults of the authors' code (github.com/pUmpKin-Co/MTL-LoRA, ``src/adapter/mlora.py`` and
``script/llama2_7B_mlora_qkvo.sh``). On LoRA slot k (notation of docs/methods.md), for a row of task t:

    y = W x + s · Σ_j w_tj B_j · Λ_t · A · dropout(x),      w_t = softmax(ω_t / τ),   s = alpha / r
      = W x + s · B_t A_t dropout(x),                         A_t = Λ_t A   (r, d_in)
                                                              B_t = Σ_j w_tj B_j   (d_out, r)

Trainable: A (r, d_in) shared, Λ (T, r, r) (or its diagonal (T, r)), B (n, d_out, r), ω (T, n), per slot.
Start: A as LoRA's (the shared seeded draw of inject_lora), Λ_t = I, B_j = 0 (so the model starts as the
backbone), ω ~ U(−1/√n, 1/√n) (kaiming-uniform, as the authors' code).

Each forward composes every task's (A_t, B_t) once (``mtl_lora_adapters``, O(T r (r d_in + n d_out)) per slot)
and hands them to the layers through ``router.weights``; each layer gathers its rows' task matrices, as for
per-task LoRAs. The composed pair is an ordinary LoRA: the export writes it in peft format, one folder per task
(ΔW_t = s (Σ_j w_tj B_j) Λ_t A, the transform merged into A).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from speclora.methods.base import Method
from speclora.model.adapted import AdaptedEncoder, BuildInputs
from speclora.model.lora import LoRASlot, lora_modules

if TYPE_CHECKING:
    from speclora.model.module import SpecLoRAModule

__all__ = ["MTLLoRA", "MTLLoRANet", "mtl_lora_adapters"]


def mtl_lora_adapters(A: Tensor, lam: Tensor, B: Tensor, mix: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Every task's LoRA pair of one slot: (A_t = Λ_t A: (T, r, d_in), B_t = Σ_j w_tj B_j: (T, d_out, r)).

    Args:
        A: (r, d_in) the shared down-projection. lam: (T, r, r) the task transforms Λ_t, or (T, r) their
            diagonals. B: (n, d_out, r) the shared up-projections. mix: (T, n) the mixing logits ω.
        temperature: τ > 0, w_t = softmax(ω_t / τ).
    """
    if lam.dim() == 2:
        a_t = lam.unsqueeze(-1) * A  # (T, r, d_in) = diag(λ_t) A
    else:
        a_t = torch.einsum("tij,jd->tid", lam, A)  # (T, r, d_in) = Λ_t A
    w = torch.softmax(mix.float() / temperature, dim=-1).to(B.dtype)  # (T, n)
    b_t = torch.einsum("tn,nor->tor", w, B)  # (T, d_out, r) = Σ_j w_tj B_j
    return a_t, b_t


class MTLLoRANet(nn.Module):
    """The MTL-LoRA parameters of every slot (entry k of each list belongs to LoRA slot k).

    Args:
        num_tasks: T. slots: the LoRA slots (their shapes). rank: r. num_up: n, the shared B's.
        diagonal: Λ_t diagonal (the authors' ``diagonal_format``) instead of full r × r.
        init_A: per slot, the (r, d_in) start of A. seed: seed of the mixing logits' draw.
    """

    def __init__(self, num_tasks: int, slots: list[LoRASlot], rank: int, num_up: int, diagonal: bool,
                 init_A: list[Tensor], seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(num_up)  # kaiming-uniform (a = √5) on a (T, n) matrix: U(−1/√n, 1/√n)
        eye = torch.ones(num_tasks, rank) if diagonal else torch.eye(rank).repeat(num_tasks, 1, 1)
        self.A = nn.ParameterList(nn.Parameter(a.detach().clone()) for a in init_A)  # (r, d_in) each
        self.lam = nn.ParameterList(nn.Parameter(eye.clone()) for _ in slots)  # (T, r, r) or (T, r), Λ_t = I
        self.B = nn.ParameterList(nn.Parameter(torch.zeros(num_up, s.d_out, rank)) for s in slots)  # (n, d_out, r)
        self.mix = nn.ParameterList(
            nn.Parameter(torch.empty(num_tasks, num_up).uniform_(-bound, bound, generator=gen)) for _ in slots
        )  # (T, n) ω

    def forward(self, temperature: float) -> list[tuple[Tensor, Tensor]]:
        """Per slot k, in slot order: (A_t: (T, r, d_in), B_t: (T, d_out, r)) for every task."""
        return [mtl_lora_adapters(a, lam, b, mix, temperature)
                for a, lam, b, mix in zip(self.A, self.lam, self.B, self.mix, strict=True)]


class MTLLoRA(Method):
    """MTL-LoRA: a shared A, a task-specific low-rank transform Λ_t, n shared B's mixed per task.

    Uses ``model.lora`` (r, alpha, dropout, targets, init_seed) as LoRA does.

    Args:
        num_up: n, the shared up-projections B_j (the authors' runs: 3).
        temperature: τ of the mixing softmax w_t = softmax(ω_t / τ) (the authors' runs: 0.1).
        diagonal: Λ_t diagonal (r parameters per task and slot) instead of a full r × r matrix (the paper's).
    """

    name: ClassVar[str] = "mtl_lora"
    needs_tasks: ClassVar[str | None] = "shares adapters between tasks"

    def __init__(self, num_up: int = 3, temperature: float = 0.1, diagonal: bool = False) -> None:
        if not isinstance(num_up, int) or isinstance(num_up, bool) or num_up < 1:
            raise ValueError(f"model.method.init_args.num_up={num_up!r}; allowed: an integer >= 1")
        if not (isinstance(temperature, int | float) and not isinstance(temperature, bool) and temperature > 0):
            raise ValueError(f"model.method.init_args.temperature={temperature!r}; allowed: a number > 0")
        self.num_up = num_up
        self.temperature = float(temperature)
        self.diagonal = bool(diagonal)

    # ------------------------------------------------------------------ construction
    def build(self, inputs: BuildInputs) -> AdaptedEncoder:
        adapted = super().build(inputs)  # T stacked adapters per layer: the gather path, and storage for the export
        layers = [layer for _, layer in lora_modules(adapted.encoder)]
        for layer in layers:
            layer.lora_A.requires_grad_(False)
            layer.lora_B.requires_grad_(False)
        adapted.method_net = MTLLoRANet(
            num_tasks=inputs.num_tasks, slots=adapted.slots, rank=inputs.lora.r, num_up=self.num_up,
            diagonal=self.diagonal, init_A=[layer.lora_A[0] for layer in layers], seed=inputs.lora.init_seed,
        )
        count = sum(p.numel() for p in adapted.method_net.parameters())
        rank_zero_info(f"mtl_lora: {count:,} parameters (shared A, {inputs.num_tasks} task transforms, "
                       f"{self.num_up} shared B's) on {len(adapted.slots)} LoRA slots")
        return adapted

    # ------------------------------------------------------------------ a training step
    def generate(self, adapted: AdaptedEncoder) -> list[tuple[Tensor, Tensor]]:
        """Per slot: (A_t: (T, r, d_in), B_t: (T, d_out, r)), every task's composed LoRA."""
        return adapted.method_net(self.temperature)

    def before_encode(self, adapted: AdaptedEncoder, batch: dict[str, Tensor]) -> None:
        adapted.router.set_weights(self.generate(adapted))  # once per forward; the layers gather per row

    # ------------------------------------------------------------------ export
    def export(self, module: SpecLoRAModule, out_dir: Path) -> list[Path]:
        """Each task's composed LoRA (A_t = Λ_t A, B_t = Σ_j w_tj B_j) as a peft folder, plus its head."""
        with torch.no_grad():
            for (_, layer), (a_t, b_t) in zip(lora_modules(module.encoder), self.generate(module.adapted), strict=True):
                layer.lora_A.copy_(a_t)  # (T, r, d_in)
                layer.lora_B.copy_(b_t)  # (T, d_out, r)
        return module.export_peft_adapters(out_dir)

    def load(self, module: SpecLoRAModule, in_dir: Path) -> None:
        """Refused: the shared A, the transforms and the mixed B's cannot be recovered from their products."""
        raise ValueError(
            f"model.method=MTLLoRA cannot load adapters from {in_dir}: its exports are the composed per-task LoRAs "
            "in peft format, from which the shared A, Λ_t and B_j cannot be recovered. Evaluate them with "
            "model.method=Independent (same model.lora.targets, r and alpha), or resume MTL-LoRA from a Lightning "
            "checkpoint (--ckpt_path)"
        )
