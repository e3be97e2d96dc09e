"""``ortho``: one shared LoRA; conflicting task gradients projected orthogonally, in A and B separately.

Ortho-LoRA (seeds/ortho-lora-summary.txt, abstract: "a gradient projection method specifically tailored for
the bipartite structure of LoRA ... projects conflicting task gradients onto the orthogonal complement of each
other within the intrinsic LoRA subspace"). A step on a batch holding the tasks S:

    g_t = ∇_θ (λ_t L_t)                  t ∈ S; θ the shared LoRA parameters (every lora_A and lora_B)
    g_t^b                                the part of g_t in block b (``blocks="ab"``: all A / all B)
    g_i^b ← g_i^b − (⟨g_i^b, g_j^b⟩ / ‖g_j^b‖²) g_j^b   wherever ⟨g_i^b, g_j^b⟩ < 0   (project_conflicts)
    ∇_θ ← Σ_t g_t'                        replaces Σ_t g_t in θ.grad; the heads keep their plain gradients

The per-task gradients come from the module's one backward (``task_grads: rows``, the default: summed per task
from the LoRA layers' per-row activations, speclora/methods/task_grads.py) or from one ``torch.autograd.grad``
per task in ``extra_losses`` (``backward``: |S| extra backward passes per step); the same gradients up to float
rounding. ``after_backward`` projects them and rewrites ``.grad``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from torch import Tensor, nn

from speclora.methods.task_grads import (
    RowGradients,
    TaskGradientMethod,
    check_task_grads,
    replace_batch_gradient,
)
from speclora.metrics import conflict_rate
from speclora.model.adapted import AdaptedEncoder, BuildInputs
from speclora.model.lora import lora_modules

if TYPE_CHECKING:
    from speclora.model.module import SpecLoRAModule

__all__ = ["Ortho", "OrthoState", "block_index", "draw_orders", "project_conflicts"]

BLOCKS = ("ab", "all", "matrix")
ORDERS = ("random", "fixed")


def project_conflicts(grads: Tensor, blocks: Tensor | None = None, order: Tensor | None = None) -> Tensor:
    """Project each task's gradient off the gradients it conflicts with, block by block (PCGrad, Yu et al. 2020).

    For every task i, for j in ``order[i]`` (the other tasks), within every block b of coordinates::

        if ⟨g_i^b, g_j^b⟩ < 0:   g_i^b ← g_i^b − (⟨g_i^b, g_j^b⟩ / ‖g_j^b‖²) g_j^b

    g_i on the right is task i's gradient as projected so far; g_j is always task j's *original* gradient,
    so every task is projected against the same references whatever the order. For two tasks the order does
    not matter and the results never conflict: ⟨g_1', g_2'⟩ = ⟨g_1, g_2⟩(cos² − 1) ≥ 0 in each block. For
    three or more tasks a later projection can undo an earlier one (as in PCGrad); the order then matters.
    A pair with a zero gradient never conflicts, so no division by zero occurs.

    Args:
        grads: (T, P) one flattened gradient per task.
        blocks: (P,) long, the block of each coordinate (Ortho-LoRA: 0 for the A coordinates, 1 for the B
            ones); ``None``: one block.
        order: (T, T - 1) long, ``order[i]`` the other tasks in the sequence g_i is projected against;
            ``None``: ascending task index (a fixed, reproducible order).

    Returns:
        (T, P) the projected gradients, in the dtype of ``grads`` (computed in float32 or float64).
    """
    if grads.ndim != 2:
        raise ValueError(f"grads: expected (T, P), got shape {tuple(grads.shape)}")
    t, p = grads.shape
    if blocks is None:
        blocks = torch.zeros(p, dtype=torch.long, device=grads.device)
    if tuple(blocks.shape) != (p,):
        raise ValueError(f"blocks: expected shape (P,) = ({p},), got {tuple(blocks.shape)}")
    others = [[j for j in range(t) if j != i] for i in range(t)]
    rows = others if order is None else order.tolist()
    if order is not None and (tuple(order.shape) != (t, t - 1) or any(sorted(r) != o for r, o in zip(rows, others))):
        raise ValueError(f"order: expected (T, T - 1) = ({t}, {t - 1}), row i a permutation of the tasks other "
                         f"than i; got {rows}")
    g = grads.double() if grads.dtype == torch.float64 else grads.float()  # (T, P)
    blocks = blocks.to(g.device)
    out = torch.empty_like(g)  # (T, P)
    # In coefficient space: g_i' = g_i − Σ_j c_ij g_j within a block, so ⟨g_i', g_j⟩ = D_ij − Σ_m c_im D_mj with
    # D = G Gᵀ the block's Gram matrix: T² scalar updates per block instead of T² passes over its coordinates.
    for b in torch.unique(blocks).tolist():
        idx = (blocks == b).nonzero().squeeze(1)  # (P_b,)
        gb = g.index_select(1, idx)  # (T, P_b)
        gram = (gb @ gb.T).tolist()  # (T, T) D_ij = ⟨g_i^b, g_j^b⟩, as Python floats: T² tiny steps follow
        coef = [[0.0] * t for _ in range(t)]  # (T, T) c_ij
        for i in range(t):
            for j in rows[i]:
                # ⟨g_i^b (projected so far), g_j^b⟩ = D_ij − Σ_m c_im D_mj
                dot = gram[i][j] - sum(coef[i][m] * gram[m][j] for m in range(t))
                if dot < 0 and gram[j][j] > 0:  # a conflict (D_jj > 0 holds but for float underflow)
                    # g_i^b ← g_i^b − (⟨g_i^b, g_j^b⟩ / ‖g_j^b‖²) g_j^b
                    coef[i][j] += dot / gram[j][j]
        c = torch.tensor(coef, dtype=g.dtype, device=g.device)  # (T, T)
        out.index_copy_(1, idx, gb - c @ gb)  # (T, P_b) g' = (I − C) G
    return out.to(grads.dtype)


def block_index(params: list[Tensor], kinds: list[str], blocks: str) -> Tensor:
    """(P,) long: the projection block of each coordinate of ``params`` flattened and concatenated.

    ``ab``: 0 for every A coordinate, 1 for every B one (Ortho-LoRA's bipartite split); ``all``: one block
    (plain PCGrad on the shared LoRA, an ablation); ``matrix``: each LoRA matrix its own block.
    ``kinds[k]`` is ``"A"`` or ``"B"`` for ``params[k]``.
    """
    if blocks == "ab":
        ids = [0 if kind == "A" else 1 for kind in kinds]
    elif blocks == "all":
        ids = [0] * len(params)
    elif blocks == "matrix":
        ids = list(range(len(params)))
    else:
        raise ValueError(f"model.method.init_args.blocks={blocks!r}; allowed: {', '.join(map(repr, BLOCKS))}")
    sizes = torch.tensor([q.numel() for q in params])  # (K,)
    return torch.repeat_interleave(torch.tensor(ids, dtype=torch.long), sizes)  # (P,)


def draw_orders(num_tasks: int, seed: int, step: int) -> Tensor:
    """(T, T - 1) long: for each task i a random permutation of the others (PCGrad's shuffled order).

    Drawn from a generator seeded by (seed, step): reproducible, the same on every rank, unchanged by resume,
    and it leaves the global RNG (dropout) untouched.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    rows = []
    for i in range(num_tasks):
        others = torch.tensor([j for j in range(num_tasks) if j != i], dtype=torch.long)  # (T - 1,)
        rows.append(others[torch.randperm(num_tasks - 1, generator=gen)])
    return torch.stack(rows) if rows else torch.zeros(0, max(num_tasks - 1, 0), dtype=torch.long)


@dataclass
class OrthoState:
    """Ortho's state between a step's hooks, the adapted encoder's ``work`` (the method keeps its config).

    params: the shared LoRA parameters, A and B of every LoRA layer in slot order; kinds: "A"/"B" of each;
    grads: (T, P) this step's per-task gradients of λ_t L_t (rows of absent tasks 0), loss-scaled under AMP;
    present: (T,) bool, the tasks of the batch; conflict_rate: of the last step (None: fewer than 2 tasks);
    rows: the capture of ``task_grads: rows`` (None for ``backward``).
    """

    params: list[nn.Parameter]
    kinds: list[str]
    grads: Tensor | None = None
    present: Tensor | None = None
    conflict_rate: float | None = None
    blocks: dict[torch.device, Tensor] = field(default_factory=dict)
    rows: RowGradients | None = None


class Ortho(TaskGradientMethod):
    """One LoRA shared by all tasks; conflicting task gradients projected orthogonally, in A and B separately.

    Args:
        blocks: where projections act. ``ab`` (Ortho-LoRA's "bipartite structure", summary abstract): all A
            coordinates form one block and all B coordinates another; ``all``: one block (PCGrad on the shared
            LoRA, for ablation); ``matrix``: every LoRA matrix its own block.
        order: the order each g_i is projected against the others (matters for 3+ tasks). ``random``: a fresh
            permutation per task and step, as PCGrad; ``fixed``: ascending task index.
        seed: seed of the ``random`` order (combined with the global step).
        task_grads: how the per-task gradients are taken. ``rows``: summed per task from per-row activations
            during the module's one backward (no extra backward); ``backward``: one backward per task of the
            batch (the paper's recipe, |S| extra passes); the same gradients up to float rounding.

    Task weights: the per-task gradients are those of λ_t L_t, so their unprojected sum is the plain gradient;
    since a projection is invariant to the scale of g_j and linear in g_i, g_i' = λ_i · proj(∇L_i).
    """

    name: ClassVar[str] = "ortho"
    needs_tasks: ClassVar[str | None] = "projects conflicting gradients between tasks"
    one_adapter = True

    def __init__(self, blocks: Literal["ab", "all", "matrix"] = "ab", order: Literal["random", "fixed"] = "random",
                 seed: int = 0, task_grads: Literal["rows", "backward"] = "rows") -> None:
        if blocks not in BLOCKS:
            raise ValueError(f"model.method.init_args.blocks={blocks!r}; allowed: {', '.join(map(repr, BLOCKS))}")
        if order not in ORDERS:
            raise ValueError(f"model.method.init_args.order={order!r}; allowed: {', '.join(map(repr, ORDERS))}")
        self.blocks = blocks
        self.order = order
        self.seed = seed
        self.task_grads = check_task_grads(task_grads)

    # ------------------------------------------------------------------ construction
    def build(self, inputs: BuildInputs) -> AdaptedEncoder:
        adapted = super().build(inputs)
        params, kinds, layers = [], [], [layer for _, layer in lora_modules(adapted.encoder)]
        for layer in layers:
            params += [layer.lora_A, layer.lora_B]  # (1, r, d_in), (1, d_out, r)
            kinds += ["A", "B"]
        # the step's per-task gradients, between its hooks (``rows``: captured in the one backward)
        adapted.work = OrthoState(params, kinds, rows=self.row_capture(layers))
        return adapted

    # ------------------------------------------------------------------ a training step
    def after_backward(self, module: SpecLoRAModule, per_task_losses: dict[int, Tensor]) -> None:
        """θ.grad ← θ.grad − Σ_t g_t + Σ_t g_t': the batch's plain contribution replaced by the projected one
        (what earlier micro-batches of a gradient accumulation put in θ.grad is kept)."""
        state: OrthoState = module.adapted.work
        taken = self.take_task_gradients(module)  # (T, P), (T,)
        if taken is None:
            return
        grads, present = taken
        rows = present.nonzero().squeeze(1)  # (S,) tasks of the batch
        if len(rows) < 2:
            state.conflict_rate = None
            return
        g = grads[rows]  # (S, P)
        state.conflict_rate = conflict_rate(g) if bool(torch.isfinite(g).all()) else None
        if state.conflict_rate is not None and getattr(module, "_trainer", None) is not None:
            module.log("train/conflict_rate", state.conflict_rate, batch_size=1)
        blocks = state.blocks.get(g.device)
        if blocks is None:
            blocks = state.blocks[g.device] = block_index(state.params, state.kinds, self.blocks).to(g.device)
        order = draw_orders(len(rows), self.seed, module.global_step) if self.order == "random" else None
        # θ.grad ← θ.grad − Σ_t g_t + Σ_t g_t'
        replace_batch_gradient(state.params, g.sum(0), project_conflicts(g, blocks, order).sum(0))
