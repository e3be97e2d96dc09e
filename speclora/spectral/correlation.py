"""Edge weights from EMA gradient correlations (seed paper §3.1; shared/DESIGN.md "The parameter graph").

For nodes i, j joined by an edge, with g_i the aligned gradient of node i (a p-vector, see ``graph.py``):

    S_ij ← μ S_ij + (1 − μ) ⟨g_i, g_j⟩          Q_i ← μ Q_i + (1 − μ) ‖g_i‖²
    ρ_ij = S_ij / (sqrt(Q_i) sqrt(Q_j) + eps)    w_ij = exp(−α (1 − |ρ_ij|))

The EMAs start at zero and are not bias-corrected: the correction factor (1 − μ^t) is the same in S and in
sqrt(Q_i Q_j), so it cancels in ρ. Alternatives for the ablations (paper's Table 7):
``parameter_magnitude_weights`` (Table 7's "Magnitude-based Edges", §4.3: parameter magnitude differences),
``magnitude_weights`` (gradient magnitudes, the earlier reading) and ``fixed_weights``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from speclora.spectral.graph import EDGE_KINDS
from speclora.spectral.signals import stack_signals, unstack_signals  # noqa: F401  (their former home)

log = logging.getLogger(__name__)


class EdgeCorrelation:
    """EMA of gradient inner products on the edges and of squared gradient norms on the nodes.

    State lives on the undirected pairs (i < j) of ``edge_index``; ``rho()`` returns one value per directed
    edge of ``edge_index`` (both directions equal). Each ``update`` is a few tensor ops per shape class: the
    per-node ‖g_i‖² and the dot products on the pairs as one sampled dense-dense product (SDDMM,
    ``torch.sparse.sampled_addmm``: (G Gᵀ) evaluated only on the sparsity pattern of the pairs, no (P, p)
    gathered copies), no Python loop over nodes or edges. Where the SDDMM kernel is missing (a device or
    dtype without it) the dots are gathered along the pair list in chunks of at most ``chunk_size``
    numbers instead, logged once.

    No host synchronisation: Q and S sit in one device vector ``ema`` = [Q in class order | S in pair order]
    (class order: class 0's nodes, then class 1's, ...; the pairs grouped by class, in the row-major order
    in which the SDDMM returns them), so that a step writes each class's norms and dots into its own slices
    and folds them in with one ``torch.where``: a step whose gradients are not finite (or all zero) leaves
    the EMAs exactly as they were, and is counted on the device (``counts``), read only where asked
    (``num_updates`` etc., ``state_dict``). ``pair_index``/``pair_ema`` are in the internal pair order;
    ``state_dict`` writes S in the order of the sorted pair keys i·n + j and Q in node order.

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
        device = edge_index.device
        ei = edge_index.cpu()
        n = num_nodes
        node_class = torch.zeros(n, dtype=torch.long) if node_class is None else node_class.cpu().long()
        if node_class.numel() != n:
            raise ValueError(f"node_class has {node_class.numel()} entries, num_nodes is {n}")
        pairs = ei[:, ei[0] < ei[1]]  # (2, P): the undirected pairs, i < j
        if bool((node_class[pairs[0]] != node_class[pairs[1]]).any()):
            raise ValueError("an edge joins nodes of different shape classes; their signals cannot be compared")
        self.num_classes = int(node_class.max()) + 1 if n else 0
        # class order of the nodes (ascending id within a class), and each node's position in it
        self.class_order = torch.argsort(node_class * n + torch.arange(n))  # (n,): position → node id
        node_pos = torch.empty(n, dtype=torch.long)  # (n,): node id → position
        node_pos[self.class_order] = torch.arange(n)
        sizes = torch.bincount(node_class, minlength=self.num_classes)  # (C,)
        starts = torch.cumsum(sizes, 0) - sizes  # (C,)
        # pairs grouped by class and row-major within it: sorting by the key of their positions does both
        pos = node_pos[pairs]  # (2, P)
        perm = torch.argsort(pos[0] * n + pos[1])  # (P,)
        self.pair_index, self.pair_pos = pairs[:, perm], pos[:, perm]  # (2, P) node ids, (2, P) positions
        P = self.pair_index.size(1)
        pair_sizes = torch.bincount(node_class[self.pair_index[0]], minlength=self.num_classes)  # (C,)
        pair_starts = torch.cumsum(pair_sizes, 0) - pair_sizes  # (C,)
        self.node_slices = [(int(a), int(a + b)) for a, b in zip(starts, sizes)]
        self.pair_slices = [(int(a), int(a + b)) for a, b in zip(pair_starts, pair_sizes)]
        # the checkpoint order of the pairs: sorted by key i·n + j (node ids), the order of a coalesced edge list
        key = self.pair_index[0] * n + self.pair_index[1]  # (P,)
        sorted_key, self.canonical = torch.sort(key)  # (P,), (P,): canonical position → internal pair
        # directed edge → its pair
        src, dst = ei
        edge_key = torch.minimum(src, dst) * n + torch.maximum(src, dst)  # (E,)
        at = torch.searchsorted(sorted_key, edge_key).clamp(max=max(P - 1, 0))  # (E,)
        if P and not bool((sorted_key[at] == edge_key).all()):
            raise ValueError("edge_index must hold both directions of every edge (use to_undirected)")
        self.edge_to_pair = self.canonical[at] if P else at  # (E,)
        # per class: its pairs' rows in the class (2, P_c) and their pattern (n_c, n_c) in CSR for the SDDMM
        self.class_pair_rows: list[Tensor] = []
        self.class_pattern: list[Tensor] = []
        for (a, b), (pa, pb) in zip(self.node_slices, self.pair_slices):
            rows = self.pair_pos[:, pa:pb] - a  # (2, P_c), row-major already
            self.class_pair_rows.append(rows)
            with warnings.catch_warnings():  # "sparse CSR support is in beta": known, used on purpose
                warnings.simplefilter("ignore")
                coo = torch.sparse_coo_tensor(rows, torch.zeros(rows.size(1)), (b - a, b - a)).coalesce()
                self.class_pattern.append(coo.to_sparse_csr())
        self.use_sddmm = True
        self.ema = torch.zeros(n + P)  # [Q (n,) class order | S (P,)]
        self.counts = torch.zeros(3, dtype=torch.long)  # updates, skipped non-finite, skipped zero
        self._new = torch.zeros(n + P)  # this step's [‖g_i‖² | ⟨g_i, g_j⟩], reused
        self.to(device)

    # ------------------------------------------------------------------ views of the state
    @property
    def device(self) -> torch.device:
        return self.ema.device

    @property
    def pair_ema(self) -> Tensor:
        """S (P,) in ``pair_index`` order (a view)."""
        return self.ema[self.num_nodes :]

    @property
    def norm_ema(self) -> Tensor:
        """Q (n,) in node order (a copy)."""
        out = torch.empty_like(self.ema[: self.num_nodes])
        out[self.class_order] = self.ema[: self.num_nodes]
        return out

    @property
    def num_updates(self) -> int:
        """Steps folded into the EMAs (a host read)."""
        return int(self.counts[0])

    @property
    def num_skipped_nonfinite(self) -> int:
        """Steps left out because a gradient was not finite (a host read)."""
        return int(self.counts[1])

    @property
    def num_skipped_zero(self) -> int:
        """Steps left out because every gradient was exactly zero (a host read)."""
        return int(self.counts[2])

    def to(self, device: torch.device | str) -> EdgeCorrelation:
        """Move the edge structure and the EMAs to ``device`` (in place, exact copies); returns self."""
        device = torch.device(device)
        for name in ("class_order", "pair_index", "pair_pos", "canonical", "edge_to_pair", "ema", "counts", "_new"):
            setattr(self, name, getattr(self, name).to(device))
        with warnings.catch_warnings():  # "sparse CSR support is in beta": known, used on purpose
            warnings.simplefilter("ignore")
            self.class_pair_rows = [t.to(device) for t in self.class_pair_rows]
            self.class_pattern = [t.to(device) for t in self.class_pattern]
        self.use_sddmm = True  # the new device may have the SDDMM kernel: tried again
        return self

    # ------------------------------------------------------------------ the step
    def _dots(self, G: Tensor, c: int, out: Tensor) -> None:
        """⟨g_i, g_j⟩ for the pairs of class c, G (n_c, p), written into ``out`` (P_c,) in pair order."""
        if self.use_sddmm:
            try:
                # (G Gᵀ)_ij on the pattern only; its values come in the pattern's (row-major = pair) order
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    sampled = torch.sparse.sampled_addmm(self.class_pattern[c], G, G.mT, beta=0.0)  # (n_c, n_c)
                out.copy_(sampled.values())
                return
            except (RuntimeError, NotImplementedError) as err:
                self.use_sddmm = False
                log.warning("EdgeCorrelation: no sampled_addmm for %s on %s (%s); gathering the pair dots "
                            "in chunks instead (slower)", G.dtype, G.device, err)
        rows = self.class_pair_rows[c]  # (2, P_c)
        per = max(1, self.chunk_size // max(G.size(1), 1))
        start = 0
        for r in rows.split(per, dim=1):  # ⟨g_i, g_j⟩ = Σ_p G[i, p] G[j, p]
            out[start : start + r.size(1)] = (G[r[0]] * G[r[1]]).sum(-1)  # (≤per,)
            start += r.size(1)

    @torch.no_grad()
    def update(self, G_by_class: Tensor | Sequence[Tensor], skipped: Tensor | None = None) -> Tensor:
        """One EMA step from the stacked aligned gradients, per shape class (n_c, p_c) (``stack_signals``).

        Whether the step goes ahead is the module's one skipped-step flag when given (``skipped``, a () bool:
        the module's check of every gradient, these included, so they are not tested for NaN/inf again); a
        bare use without a module (None) tests G itself. Σ‖g_i‖² is tested for finiteness in either case: with
        a module it guards the sums against float32 overflow (finite gradients whose squares overflow Q).
        Returns a () bool tensor on the device: the step goes ahead and its sums are finite, so G may be used
        (the EMAs, the learned coefficients' hypergradient). Applied only there and where G is not all exactly
        zero (nothing to learn from that, and it would only shrink the EMAs); otherwise the state is left
        exactly as it was. Counted in ``counts`` either way. No host read: device ops (``torch.where``).
        """
        Gs = [G_by_class] if isinstance(G_by_class, Tensor) else list(G_by_class)
        if len(Gs) != self.num_classes:
            raise ValueError(f"expected {self.num_classes} shape classes, got {len(Gs)} gradient tensors")
        n, new = self.num_nodes, self._new
        for c, G in enumerate(Gs):
            (a, b), (pa, pb) = self.node_slices[c], self.pair_slices[c]
            if G.size(0) != b - a:
                raise ValueError(f"class {c}: expected {b - a} rows, got {G.size(0)}")
            G = G.detach().float()  # (n_c, p)
            torch.linalg.vector_norm(G, dim=-1, out=new[a:b])  # ‖g_i‖ (n_c,): a reduction, no (n_c, p) temporary
            self._dots(G, c, new[n + pa : n + pb])  # ⟨g_i, g_j⟩ on the pairs of class c (P_c,)
        q = new[:n].square_()  # ‖g_i‖²
        # a non-finite entry of G makes its ‖g_i‖² (and their sum) non-finite; a finite ‖g‖ bounds the dots
        # (Cauchy–Schwarz). A sum past float32's range is not finite either: such a step would overflow Q.
        total = q.sum()  # ()
        sums_finite, nonzero = torch.isfinite(total), total > 0  # (), ()
        # the step's fate: the module's flag, else G's own test (the same sum)
        usable = sums_finite if skipped is None else ~skipped.to(total.device) & sums_finite  # ()
        ok = usable & nonzero
        # EMA ← μ EMA + (1 − μ) new, where ok (else unchanged, bit for bit)
        new.mul_(1 - self.decay).add_(self.ema, alpha=self.decay)  # (n + P,)
        torch.where(ok, new, self.ema, out=self.ema)
        self.counts.add_(torch.stack([ok, ~usable, usable & ~nonzero]))  # (3,)
        return usable

    # ------------------------------------------------------------------ what the graph reads
    def rho(self) -> Tensor:
        """ρ per directed edge of ``edge_index``: S_ij / (sqrt(Q_i)·sqrt(Q_j) + eps), clamped to [−1, 1]."""
        r = self.ema[: self.num_nodes].sqrt()  # (n,) class order
        i, j = self.pair_pos  # (P,), (P,)
        # ρ_ij = S_ij / (sqrt(Q_i) sqrt(Q_j) + eps)
        rho_pair = (self.pair_ema / (r[i] * r[j] + self.eps)).clamp(-1.0, 1.0)  # (P,)
        return rho_pair[self.edge_to_pair]  # (E,)

    def magnitude(self) -> Tensor:
        """m_i = sqrt(Q_i), the EMA root-mean-square gradient norm of each node, (n,) in node order."""
        return self.norm_ema.sqrt()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Tensor | int | float]:
        """S in the order of the sorted pair keys i·n + j (a coalesced edge list's), Q in node order; the
        counters as numbers (a host read)."""
        updates, nonfinite, zero = self.counts.tolist()
        return {
            "pair_ema": self.pair_ema[self.canonical].clone(),
            "norm_ema": self.norm_ema,
            "num_updates": updates,
            "num_skipped_nonfinite": nonfinite,
            "num_skipped_zero": zero,
            "decay": self.decay,
        }

    def load_state_dict(self, state: dict[str, Tensor | int | float]) -> None:
        pair, norm = torch.as_tensor(state["pair_ema"]), torch.as_tensor(state["norm_ema"])
        P, n = self.pair_index.size(1), self.num_nodes
        if pair.shape != (P,) or norm.shape != (n,):
            raise ValueError(
                f"state for {pair.numel()} pairs / {norm.numel()} nodes does not fit this graph "
                f"({P} pairs / {n} nodes)"
            )
        pair, norm = pair.to(self.ema), norm.to(self.ema)
        self.ema[n:][self.canonical] = pair
        self.ema[:n] = norm[self.class_order]
        self.counts.copy_(torch.tensor([int(state["num_updates"]), int(state["num_skipped_nonfinite"]),
                                        int(state["num_skipped_zero"])]))


def edge_weights(rho: Tensor, alpha: float) -> Tensor:
    """w_ij = exp(−α (1 − |ρ_ij|)) ∈ [e^{−α}, 1] (§3.1). rho: (E,) → (E,)."""
    if alpha < 0:
        raise ValueError(f"alpha (edge-weight sensitivity) must be >= 0, got {alpha}")
    # w = exp(−α (1 − |ρ|))
    return torch.exp(-alpha * (1.0 - rho.abs()))  # (E,)


def magnitude_weights(magnitude: Tensor, edge_index: Tensor, alpha: float, eps: float = 1e-12) -> Tensor:
    """Gradient-magnitude edges (``edge_weighting: gradient_magnitude``; the "magnitude" ablation before
    issue 14, kept under its own name).

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


def parameter_magnitude_weights(norms: Tensor, edge_index: Tensor, alpha: float) -> Tensor:
    """Parameter-magnitude edges: the "Magnitude-based Edges" ablation of Table 7, read from §4.3 ("edge
    weighting schemes based on parameter magnitude differences").

    With m_i = ‖θ_i‖ the Frobenius norm of node i's LoRA matrix (its §3.1 node feature), the relative
    difference d_ij = |m_i − m_j| / max(m_i, m_j) ∈ [0, 1] (0 where both are 0: equal magnitudes) takes the
    place of 1 − |ρ_ij|:
        w_ij = exp(−α d_ij)
    so α means the same as in ``edge_weights`` and the weights share its range [e^{−α}, 1].
    norms: (n,), edge_index: (2, E) → (E,).
    """
    if alpha < 0:
        raise ValueError(f"alpha (edge-weight sensitivity) must be >= 0, got {alpha}")
    mi, mj = norms[edge_index[0]], norms[edge_index[1]]  # (E,), (E,)
    top = torch.maximum(mi, mj)  # (E,)
    # d = |m_i − m_j| / max(m_i, m_j), 0/0 := 0
    d = torch.where(top > 0, (mi - mj).abs() / top.clamp(min=torch.finfo(top.dtype).tiny), torch.zeros_like(top))
    return torch.exp(-alpha * d)  # (E,)


def fixed_weights(edge_type: Tensor, values: Sequence[float] = (1.0, 1.0, 1.0)) -> Tensor:
    """Architecture-only weights: w_ij = values[edge_type_ij], one constant per kind of ``EDGE_KINDS``."""
    if len(values) != len(EDGE_KINDS):
        raise ValueError(f"values must give one weight per edge kind {list(EDGE_KINDS)}, got {list(values)}")
    if any(v < 0 for v in values):
        raise ValueError(f"values (fixed edge weights) must be >= 0, got {list(values)}")
    table = torch.tensor([float(v) for v in values], device=edge_type.device)  # (3,)
    return table[edge_type]  # (E,)

