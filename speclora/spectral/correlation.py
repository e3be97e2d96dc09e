"""Edge weights from EMA gradient correlations (seed paper §3.1; shared/DESIGN.md "The parameter graph").

For nodes i, j joined by an edge, with g_i the aligned gradient of node i (a p-vector, see ``graph.py``):

    S_ij ← μ S_ij + (1 − μ) ⟨g_i, g_j⟩          Q_i ← μ Q_i + (1 − μ) ‖g_i‖²
    ρ_ij = S_ij / (sqrt(Q_i) sqrt(Q_j) + eps)    w_ij = exp(−α (1 − |ρ_ij|))

The EMAs start at zero and are not bias-corrected: the correction factor (1 − μ^t) is the same in S and in
sqrt(Q_i Q_j), so it cancels in ρ. Alternatives for the ablations (paper's Table 7): ``magnitude_weights``
and ``fixed_weights``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from speclora.spectral.graph import EDGE_KINDS, KIND_A, KIND_B, GraphLayout

log = logging.getLogger(__name__)


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
    if len(A) != layout.num_slots or len(B) != layout.num_slots:
        raise ValueError(f"expected {layout.num_slots} A and B tensors (one per slot), got {len(A)} and {len(B)}")
    T = layout.num_tasks
    blocks: list[list[Tensor]] = [[] for _ in layout.shape_classes]
    places = _slot_places(layout)
    # node order is (slot, kind, task): per slot, the T rows of A then the T rows of B
    for s, (a, b) in enumerate(zip(A, B)):
        _, _, d_in, d_out, r = layout.slots[s]
        if tuple(a.shape) != (T, r, d_in) or tuple(b.shape) != (T, d_out, r):
            raise ValueError(
                f"slot {s} {layout.slots[s]}: expected A (T={T}, r={r}, d_in={d_in}) and B ({T}, {d_out}, {r}), "
                f"got {tuple(a.shape)} and {tuple(b.shape)}"
            )
        (ca, ra), (cb, rb) = places[s]
        if out is not None:
            # one strided copy per block straight into the buffer: Aᵀ (T, d_in, r) rows, B (T, d_out, r) rows
            out[ca][ra : ra + T].view(T, d_in, r).copy_(a.transpose(1, 2))
            out[cb][rb : rb + T].view(T, d_out, r).copy_(b)
            continue
        # Aᵀ: (T, r, d_in) → (T, d_in, r) → (T, d_in·r)
        blocks[ca].append(a.transpose(1, 2).reshape(T, -1))
        # B: (T, d_out, r) → (T, d_out·r)
        blocks[cb].append(b.reshape(T, -1))
    if out is not None:
        return list(out)  # [(n_c, p_c)]
    return [torch.cat(bl) for bl in blocks]  # [(n_c, p_c)]


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


def unstack_signals(layout: GraphLayout, signals: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Inverse of ``stack_signals``: per shape class (n_c, p_c) → per slot A (T, r, d_in), B (T, d_out, r)."""
    if len(signals) != len(layout.shape_classes):
        raise ValueError(f"expected {len(layout.shape_classes)} shape classes, got {len(signals)} tensors")
    T = layout.num_tasks
    A: list[Tensor] = []
    B: list[Tensor] = []
    places = _slot_places(layout)
    for s, (_, _, d_in, d_out, r) in enumerate(layout.slots):
        for kind, out in ((KIND_A, A), (KIND_B, B)):
            c, row = places[s][kind]
            block = signals[c][row : row + T]  # (T, p)
            if kind == KIND_A:
                out.append(block.reshape(T, d_in, r).transpose(1, 2))  # (T, r, d_in)
            else:
                out.append(block.reshape(T, d_out, r))  # (T, d_out, r)
    return A, B


class EdgeCorrelation:
    """EMA of gradient inner products on the edges and of squared gradient norms on the nodes.

    State lives on the undirected pairs (i < j) of ``edge_index``; ``rho()`` returns one value per directed
    edge of ``edge_index`` (both directions equal). Each ``update`` is a few tensor ops per shape class: the
    per-node ‖g_i‖² and the dot products on the pairs as one sampled dense-dense product (SDDMM,
    ``torch.sparse.sampled_addmm``: (G Gᵀ) evaluated only on the sparsity pattern of the pairs, no (P, p)
    gathered copies), no Python loop over nodes or edges. Where the SDDMM kernel is missing (a device or
    dtype without it) the dots are gathered along the pair list in chunks of at most ``chunk_size``
    numbers instead, logged once.

    Args:
        edge_index: (2, E), both directions present, no edge across shape classes.
        num_nodes: n.
        decay: μ ∈ [0, 1), the EMA decay.
        node_class: (n,) shape-class index per node (``layout.node_class``); None: a single class.
        eps: added to sqrt(Q_i)·sqrt(Q_j) in ρ (a node with zero gradient history has ρ = 0).
        chunk_size: most gathered numbers (pairs × p) held at once in the dot products.
    """

    def __init__(
        self,
        edge_index: Tensor,
        num_nodes: int,
        decay: float = 0.99,
        node_class: Tensor | None = None,
        eps: float = 1e-12,
        chunk_size: int = 1 << 24,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay (EMA μ) must be in [0, 1), got {decay}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.decay, self.eps, self.chunk_size, self.num_nodes = decay, eps, chunk_size, num_nodes
        src, dst = edge_index  # (E,), (E,)
        # the undirected pairs: the directed edges with i < j
        upper = src < dst  # (E,)
        self.pair_index = edge_index[:, upper]  # (2, P)
        # directed edge → its pair: key min·n + max looked up among the sorted pair keys
        pair_key = self.pair_index[0] * num_nodes + self.pair_index[1]  # (P,)
        sorted_key, perm = torch.sort(pair_key)  # (P,), (P,)
        edge_key = torch.minimum(src, dst) * num_nodes + torch.maximum(src, dst)  # (E,)
        pos = torch.searchsorted(sorted_key, edge_key).clamp(max=max(len(sorted_key) - 1, 0))  # (E,)
        if len(sorted_key) and not bool((sorted_key[pos] == edge_key).all()):
            raise ValueError("edge_index must hold both directions of every edge (use to_undirected)")
        self.edge_to_pair = perm[pos] if len(sorted_key) else pos  # (E,)
        node_class = torch.zeros(num_nodes, dtype=torch.long) if node_class is None else node_class.cpu()
        if node_class.numel() != num_nodes:
            raise ValueError(f"node_class has {node_class.numel()} entries, num_nodes is {num_nodes}")
        pi = self.pair_index.cpu()
        if bool((node_class[pi[0]] != node_class[pi[1]]).any()):
            raise ValueError("an edge joins nodes of different shape classes; their signals cannot be compared")
        self.num_classes = int(node_class.max()) + 1 if num_nodes else 0
        # per class: its node ids (n_c,), and its pairs (P_c,) with their rows in the class (P_c,) × 2
        row = torch.empty(num_nodes, dtype=torch.long)  # (n,)
        self.class_nodes: list[Tensor] = []
        self.class_pairs: list[Tensor] = []
        self.class_pair_rows: list[Tensor] = []
        for c in range(self.num_classes):
            ids = (node_class == c).nonzero().view(-1)  # (n_c,)
            row[ids] = torch.arange(ids.numel())
            pairs = (node_class[pi[0]] == c).nonzero().view(-1)  # (P_c,)
            self.class_nodes.append(ids.to(edge_index.device))
            self.class_pairs.append(pairs.to(edge_index.device))
            self.class_pair_rows.append(row[pi[:, pairs]].to(edge_index.device))  # (2, P_c)
        # per class: the pairs as a CSR pattern (n_c, n_c) for the SDDMM, and the CSR order of the pairs
        self.class_pattern: list[Tensor | None] = []
        self.class_pattern_order: list[Tensor] = []
        for c, rows in enumerate(self.class_pair_rows):
            n_c = self.class_nodes[c].numel()
            order = torch.argsort(rows[0] * n_c + rows[1])  # (P_c,): CSR (row-major) order of the pairs
            with warnings.catch_warnings():  # "sparse CSR support is in beta": known, used on purpose
                warnings.simplefilter("ignore")
                pattern = torch.sparse_coo_tensor(rows[:, order], torch.zeros(order.numel(), device=rows.device),
                                                  (n_c, n_c)).to_sparse_csr()
            self.class_pattern.append(pattern)
            self.class_pattern_order.append(order)
        self.use_sddmm = True
        self.pair_ema = torch.zeros(self.pair_index.size(1), device=edge_index.device)  # S: (P,)
        self.norm_ema = torch.zeros(num_nodes, device=edge_index.device)  # Q: (n,)
        self.num_updates = 0
        self.num_skipped_nonfinite = 0
        self.num_skipped_zero = 0

    @property
    def device(self) -> torch.device:
        return self.pair_ema.device

    def to(self, device: torch.device | str) -> EdgeCorrelation:
        """Move the edge structure and the EMAs to ``device`` (in place, exact copies); returns self."""
        device = torch.device(device)
        self.pair_index, self.edge_to_pair = self.pair_index.to(device), self.edge_to_pair.to(device)
        self.pair_ema, self.norm_ema = self.pair_ema.to(device), self.norm_ema.to(device)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": known, used on purpose
            warnings.simplefilter("ignore")
            for name in ("class_nodes", "class_pairs", "class_pair_rows", "class_pattern", "class_pattern_order"):
                setattr(self, name, [t.to(device) for t in getattr(self, name)])
        self.use_sddmm = True  # the new device may have the SDDMM kernel: tried again
        return self

    def _dots(self, G: Tensor, c: int) -> Tensor:
        """⟨g_i, g_j⟩ for the pairs of class c, G (n_c, p) → (P_c,), in ``class_pair_rows[c]`` order."""
        if self.use_sddmm:
            try:
                # (G Gᵀ)_ij on the pattern only; values come in CSR order
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    sampled = torch.sparse.sampled_addmm(self.class_pattern[c], G, G.mT, beta=0.0)  # (n_c, n_c)
                out = torch.empty_like(sampled.values())  # (P_c,)
                out[self.class_pattern_order[c]] = sampled.values()
                return out
            except (RuntimeError, NotImplementedError) as err:
                self.use_sddmm = False
                log.warning("EdgeCorrelation: no sampled_addmm for %s on %s (%s); gathering the pair dots "
                            "in chunks instead (slower)", G.dtype, G.device, err)
        rows = self.class_pair_rows[c]  # (2, P_c)
        per = max(1, self.chunk_size // max(G.size(1), 1))
        # ⟨g_i, g_j⟩ = Σ_p G[i, p] G[j, p]
        parts = [(G[r[0]] * G[r[1]]).sum(-1) for r in rows.split(per, dim=1)]  # [(≤per,)]
        return torch.cat(parts) if parts else G.new_zeros(0)  # (P_c,)

    @torch.no_grad()
    def update(self, G_by_class: Tensor | Sequence[Tensor]) -> bool:
        """One EMA step from the stacked aligned gradients, per shape class (n_c, p_c) (``stack_signals``).

        Returns True if applied; False if the step was skipped, because some gradient is non-finite
        (counted in ``num_skipped_nonfinite``; the state is left untouched) or all gradients are exactly
        zero (``num_skipped_zero``; nothing to learn from, and applying it would only shrink the EMAs).
        """
        Gs = [G_by_class] if isinstance(G_by_class, Tensor) else list(G_by_class)
        if len(Gs) != self.num_classes:
            raise ValueError(f"expected {self.num_classes} shape classes, got {len(Gs)} gradient tensors")
        q_new = torch.zeros_like(self.norm_ema)  # (n,)
        s_new = torch.zeros_like(self.pair_ema)  # (P,)
        for c, G in enumerate(Gs):
            if G.size(0) != self.class_nodes[c].numel():
                raise ValueError(f"class {c}: expected {self.class_nodes[c].numel()} rows, got {G.size(0)}")
            G = G.detach().float()  # (n_c, p)
            # ‖g_i‖² (a reduction: no (n_c, p) temporary)
            q_new[self.class_nodes[c]] = torch.linalg.vector_norm(G, dim=-1).square()  # (n_c,)
            # ⟨g_i, g_j⟩ on the pairs of class c
            s_new[self.class_pairs[c]] = self._dots(G, c)  # (P_c,)
        # a non-finite entry of G makes its ‖g_i‖² non-finite; a finite ‖g‖ bounds the dots (Cauchy–Schwarz)
        # both tests in one host synchronisation (it decides whether the step is filtered at all)
        finite, nonzero = torch.stack([torch.isfinite(q_new).all() & torch.isfinite(s_new).all(),
                                       (q_new > 0).any()]).tolist()
        if not finite:
            self.num_skipped_nonfinite += 1
            return False
        if not nonzero:
            self.num_skipped_zero += 1
            return False
        mu = self.decay
        # S ← μ S + (1 − μ) ⟨g_i, g_j⟩ ;  Q ← μ Q + (1 − μ) ‖g_i‖²
        self.pair_ema.mul_(mu).add_(s_new, alpha=1 - mu)  # (P,)
        self.norm_ema.mul_(mu).add_(q_new, alpha=1 - mu)  # (n,)
        self.num_updates += 1
        return True

    def rho(self) -> Tensor:
        """ρ per directed edge of ``edge_index``: S_ij / (sqrt(Q_i)·sqrt(Q_j) + eps), clamped to [−1, 1]."""
        i, j = self.pair_index  # (P,), (P,)
        r = self.norm_ema.sqrt()  # (n,)
        # ρ_ij = S_ij / (sqrt(Q_i) sqrt(Q_j) + eps)
        rho_pair = (self.pair_ema / (r[i] * r[j] + self.eps)).clamp(-1.0, 1.0)  # (P,)
        return rho_pair[self.edge_to_pair]  # (E,)

    def magnitude(self) -> Tensor:
        """m_i = sqrt(Q_i), the EMA root-mean-square gradient norm of each node, (n,)."""
        return self.norm_ema.sqrt()

    def state_dict(self) -> dict[str, Tensor | int | float]:
        return {
            "pair_ema": self.pair_ema.clone(),
            "norm_ema": self.norm_ema.clone(),
            "num_updates": self.num_updates,
            "num_skipped_nonfinite": self.num_skipped_nonfinite,
            "num_skipped_zero": self.num_skipped_zero,
            "decay": self.decay,
        }

    def load_state_dict(self, state: dict[str, Tensor | int | float]) -> None:
        pair, norm = torch.as_tensor(state["pair_ema"]), torch.as_tensor(state["norm_ema"])
        if pair.shape != self.pair_ema.shape or norm.shape != self.norm_ema.shape:
            raise ValueError(
                f"state for {pair.numel()} pairs / {norm.numel()} nodes does not fit this graph "
                f"({self.pair_ema.numel()} pairs / {self.norm_ema.numel()} nodes)"
            )
        self.pair_ema.copy_(pair)
        self.norm_ema.copy_(norm)
        self.num_updates = int(state["num_updates"])
        self.num_skipped_nonfinite = int(state["num_skipped_nonfinite"])
        self.num_skipped_zero = int(state["num_skipped_zero"])


def edge_weights(rho: Tensor, alpha: float) -> Tensor:
    """w_ij = exp(−α (1 − |ρ_ij|)) ∈ [e^{−α}, 1] (§3.1). rho: (E,) → (E,)."""
    if alpha < 0:
        raise ValueError(f"alpha (edge-weight sensitivity) must be >= 0, got {alpha}")
    # w = exp(−α (1 − |ρ|))
    return torch.exp(-alpha * (1.0 - rho.abs()))  # (E,)


def magnitude_weights(magnitude: Tensor, edge_index: Tensor, alpha: float, eps: float = 1e-12) -> Tensor:
    """Magnitude-based edges (the "Magnitude-based Edges" ablation of Table 7).

    With m_i = sqrt(EMA‖g_i‖²) (``EdgeCorrelation.magnitude``), the similarity of update sizes
    s_ij = min(m_i, m_j) / max(m_i, m_j) ∈ [0, 1] takes the place of |ρ_ij| in the same exponential:
        w_ij = exp(−α (1 − s_ij))
    so α means the same as in ``edge_weights`` and the weights share its range [e^{−α}, 1]. Two nodes with
    zero history get s = 0. magnitude: (n,), edge_index: (2, E) → (E,).
    """
    if alpha < 0:
        raise ValueError(f"alpha (edge-weight sensitivity) must be >= 0, got {alpha}")
    mi, mj = magnitude[edge_index[0]], magnitude[edge_index[1]]  # (E,), (E,)
    # s = min(m_i, m_j) / max(m_i, m_j)
    s = torch.minimum(mi, mj) / torch.maximum(mi, mj).clamp(min=eps)  # (E,)
    return torch.exp(-alpha * (1.0 - s))  # (E,)


def fixed_weights(edge_type: Tensor, values: Sequence[float] = (1.0, 1.0, 1.0)) -> Tensor:
    """Architecture-only weights: w_ij = values[edge_type_ij], one constant per kind of ``EDGE_KINDS``."""
    if len(values) != len(EDGE_KINDS):
        raise ValueError(f"values must give one weight per edge kind {list(EDGE_KINDS)}, got {list(values)}")
    if any(v < 0 for v in values):
        raise ValueError(f"values (fixed edge weights) must be >= 0, got {list(values)}")
    table = torch.tensor([float(v) for v in values], device=edge_type.device)  # (3,)
    return table[edge_type]  # (E,)

