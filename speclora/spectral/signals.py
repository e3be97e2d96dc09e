"""Aligned node signals: per-slot LoRA tensors ↔ one (n_c, p_c) matrix per shape class (shared/DESIGN.md,
"The parameter graph"; node numbering in ``graph.py``).

Node v = (t, s, A|B) carries vec(Aᵀ) (d_in·r numbers) or vec(B) (d_out·r), so that in a shape class every
column means the same entry (i, j) of a (d, r) matrix. A class's rows are its nodes in ascending id, i.e.
slot by slot, the T rows of A then the T rows of B: stacking a class is one ``torch.cat`` of its blocks (one
op, not one copy per block), and writing it back one multi-tensor copy (``torch._foreach_copy_``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from speclora.spectral.graph import KIND_A, KIND_B, GraphLayout


def _slot_places(layout: GraphLayout) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Per slot, (class, first row) of its A block and of its B block; computed once per layout."""
    places = getattr(layout, "_slot_places", None)
    if places is None:
        places = []
        for s in range(layout.num_slots):
            ids = [layout.node_id(0, s, kind) for kind in (KIND_A, KIND_B)]
            places.append(tuple((int(layout.node_class[i]), int(layout.node_class_row[i])) for i in ids))
        layout._slot_places = places
    return places


def _check(layout: GraphLayout, A: Sequence[Tensor], B: Sequence[Tensor]) -> None:
    if len(A) != layout.num_slots or len(B) != layout.num_slots:
        raise ValueError(f"expected {layout.num_slots} A and B tensors (one per slot), got {len(A)} and {len(B)}")
    T = layout.num_tasks
    for s, (a, b) in enumerate(zip(A, B)):
        _, _, d_in, d_out, r = layout.slots[s]
        if tuple(a.shape) != (T, r, d_in) or tuple(b.shape) != (T, d_out, r):
            raise ValueError(
                f"slot {s} {layout.slots[s]}: expected A (T={T}, r={r}, d_in={d_in}) and B ({T}, {d_out}, {r}), "
                f"got {tuple(a.shape)} and {tuple(b.shape)}"
            )


def _blocks(layout: GraphLayout, A: Sequence[Tensor], B: Sequence[Tensor]) -> list[list[Tensor]]:
    """Per class, its (T, d, r) blocks in row order: Aᵀ (T, d_in, r) and B (T, d_out, r) views, no copy."""
    blocks: list[list[Tensor]] = [[] for _ in layout.shape_classes]
    places = _slot_places(layout)
    for s, (a, b) in enumerate(zip(A, B)):
        (ca, _), (cb, _) = places[s]
        blocks[ca].append(a.transpose(1, 2))  # Aᵀ: (T, r, d_in) → (T, d_in, r)
        blocks[cb].append(b)  # (T, d_out, r)
    return blocks


def stack_signals(
    layout: GraphLayout, A: Sequence[Tensor], B: Sequence[Tensor], out: Sequence[Tensor] | None = None
) -> list[Tensor]:
    """Stack per-slot LoRA tensors (parameters, gradients or updates) into aligned node signals.

    Args:
        A: per slot, (T, r, d_in); B: per slot, (T, d_out, r) (``layout.slots`` order).
        out: optional per-class buffers (n_c, p_c) to write into (no new allocation; not differentiable).
    Returns:
        per shape class (``layout.shape_classes`` order), (n_c, p_c) with row i the signal of the class's
        i-th node: vec(Aᵀ) (d_in·r numbers) for A nodes, vec(B) (d_out·r) for B nodes. Differentiable.
    """
    _check(layout, A, B)
    result = []
    for ((d, r), ids), blocks in zip(layout.shape_classes, _blocks(layout, A, B)):
        c, n_c = len(result), ids.numel()
        if out is not None:
            # one cat per class straight into the buffer, seen as (n_c, d, r)
            torch.cat(blocks, dim=0, out=out[c].view(n_c, d, r))
            result.append(out[c])  # (n_c, p_c)
        else:
            result.append(torch.cat(blocks, dim=0).reshape(n_c, d * r))  # (n_c, p_c)
    return result


def unstack_signals(layout: GraphLayout, signals: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Inverse of ``stack_signals``: per shape class (n_c, p_c) → per slot A (T, r, d_in), B (T, d_out, r)
    (views of the class tensors where their layout allows)."""
    if len(signals) != len(layout.shape_classes):
        raise ValueError(f"expected {len(layout.shape_classes)} shape classes, got {len(signals)} tensors")
    T = layout.num_tasks
    A: list[Tensor] = []
    B: list[Tensor] = []
    places = _slot_places(layout)
    for s, (_, _, d_in, d_out, r) in enumerate(layout.slots):
        (ca, ra), (cb, rb) = places[s]
        A.append(signals[ca][ra : ra + T].reshape(T, d_in, r).transpose(1, 2))  # (T, r, d_in)
        B.append(signals[cb][rb : rb + T].reshape(T, d_out, r))  # (T, d_out, r)
    return A, B


@torch.no_grad()
def write_signals(layout: GraphLayout, signals: Sequence[Tensor], A: Sequence[Tensor], B: Sequence[Tensor]) -> None:
    """Copy per-class signals (n_c, p_c) into the per-slot tensors A (T, r, d_in) and B (T, d_out, r) in place,
    as one multi-tensor copy (converting to their dtype)."""
    _check(layout, A, B)
    src_A, src_B = unstack_signals(layout, signals)
    torch._foreach_copy_([*A, *B], [*src_A, *src_B])
