"""The parameter graph of multi-task LoRA (seed paper §3.1, Table 1; shared/DESIGN.md "The parameter graph").

One node per LoRA matrix v = (task t, slot s, kind A|B), where a slot s = (layer l, module m) is one
adapted linear layer. With T tasks and S slots there are n = 2·T·S nodes, numbered

    node(t, s, kind) = (s · 2 + kind) · T + t          kind: 0 = A, 1 = B

so the T tasks of one (slot, kind) are consecutive, and the rows of a stacked ``(T, ...)`` LoRA parameter
land on consecutive nodes.

Aligned signal: A ∈ R^{r×d_in} is read as Aᵀ (d_in×r) and B ∈ R^{d_out×r} as is, so a node's signal has
shape (d, r) with d = d_in for A and d = d_out for B, and p = d·r numbers. Nodes of different signal
shape form different *shape classes*; no edge joins two classes.

Edges, three kinds (the paper's Table 1):
    intra        A–B of the same (t, s), only when d_in == d_out (same signal shape)
    inter_task   the same (s, kind) across tasks, every pair of tasks (a T-clique)
    inter_layer  the same (t, module, kind) in adjacent layers: consecutive entries of the sorted list of
                 layers that carry that module (so a module adapted only on layers 0, 2, 4 links 0–2–4)
Edge lists are undirected and hold *both directions*: (i, j) and (j, i) each appear once, coalesced
(sorted by source, then target), as torch_geometric expects for ``get_laplacian``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor
from torch_geometric.data import Data
from torch_geometric.utils import coalesce, subgraph, to_undirected

from speclora.checks import is_int_in

# Edge kinds, in the order of their integer code in ``edge_type``.
EDGE_KINDS: tuple[str, ...] = ("intra", "inter_task", "inter_layer")
EDGE_INTRA, EDGE_INTER_TASK, EDGE_INTER_LAYER = 0, 1, 2
KIND_A, KIND_B = 0, 1

Slot = tuple[int, str, int, int, int]  # (layer, module, d_in, d_out, r)


@dataclass(eq=False)
class GraphLayout:
    """Node numbering and per-node attributes of the parameter graph.

    Args:
        num_tasks: T, the number of tasks (≥ 1).
        slots: one ``(layer, module, d_in, d_out, r)`` per adapted linear layer, in the order the
            caller stacks its LoRA parameters; (layer, module) pairs must be unique.

    Attributes (all of length n = 2·T·S, indexed by node id):
        node_task, node_slot, node_layer, node_module (index into ``modules``), node_kind,
        node_rows (d of the aligned (d, r) signal), node_rank (r), node_signal_dim (p = d·r),
        node_class (index into ``shape_classes``), node_class_row (row of the node in its class).
        shape_classes: ``[((d, r), node ids (n_c,) ascending), ...]`` in order of first appearance.
    """

    num_tasks: int
    slots: list[Slot]
    modules: list[str] = field(init=False)
    shape_classes: list[tuple[tuple[int, int], Tensor]] = field(init=False)

    def __post_init__(self) -> None:
        if not is_int_in(self.num_tasks, 1):
            raise ValueError(f"num_tasks must be an integer >= 1, got {self.num_tasks!r}")
        if len(self.slots) == 0:
            raise ValueError("slots must hold at least one (layer, module, d_in, d_out, r) entry, got []")
        self.slots = [tuple(s) for s in self.slots]  # type: ignore[misc]
        seen: set[tuple[int, str]] = set()
        for s in self.slots:
            if len(s) != 5:
                raise ValueError(f"each slot must be (layer, module, d_in, d_out, r), got {s!r}")
            layer, module, d_in, d_out, r = s
            if (layer, module) in seen:
                raise ValueError(f"slot (layer={layer}, module={module!r}) appears twice in slots")
            seen.add((layer, module))
            if min(d_in, d_out, r) < 1:
                raise ValueError(f"slot {s!r}: d_in, d_out and r must be >= 1")
        self.modules = sorted({s[1] for s in self.slots})
        T, S = self.num_tasks, len(self.slots)
        # node = (s·2 + kind)·T + t  ⇒  a (S, 2, T) grid of ids
        grid = torch.arange(2 * S * T).view(S, 2, T)  # (S, 2, T)
        self._grid = grid
        slot_idx = torch.arange(S).view(S, 1, 1).expand(S, 2, T)  # (S, 2, T)
        kind = torch.arange(2).view(1, 2, 1).expand(S, 2, T)  # (S, 2, T)
        task = torch.arange(T).view(1, 1, T).expand(S, 2, T)  # (S, 2, T)
        layer = torch.tensor([s[0] for s in self.slots])  # (S,)
        module = torch.tensor([self.modules.index(s[1]) for s in self.slots])  # (S,)
        # aligned rows: d_in for A (read as Aᵀ), d_out for B
        rows = torch.tensor([[s[2], s[3]] for s in self.slots])  # (S, 2)
        rank = torch.tensor([s[4] for s in self.slots])  # (S,)
        self.node_task = task.reshape(-1)  # (n,)
        self.node_slot = slot_idx.reshape(-1)  # (n,)
        self.node_kind = kind.reshape(-1)  # (n,)
        self.node_layer = layer[self.node_slot]  # (n,)
        self.node_module = module[self.node_slot]  # (n,)
        self.node_rows = rows.unsqueeze(-1).expand(S, 2, T).reshape(-1)  # (n,)
        self.node_rank = rank[self.node_slot]  # (n,)
        self.node_signal_dim = self.node_rows * self.node_rank  # (n,)
        # shape classes: nodes with the same aligned signal shape (d, r)
        keys: list[tuple[int, int]] = []
        node_class = torch.empty(self.num_nodes, dtype=torch.long)  # (n,)
        for s in range(S):
            for k in (KIND_A, KIND_B):
                key = (int(rows[s, k]), int(rank[s]))
                if key not in keys:
                    keys.append(key)
                node_class[grid[s, k]] = keys.index(key)
        self.node_class = node_class
        self.shape_classes = [(key, (node_class == c).nonzero().view(-1)) for c, key in enumerate(keys)]
        node_class_row = torch.empty(self.num_nodes, dtype=torch.long)  # (n,)
        for _, ids in self.shape_classes:
            node_class_row[ids] = torch.arange(ids.numel())
        self.node_class_row = node_class_row

    @property
    def num_slots(self) -> int:
        return len(self.slots)

    @property
    def num_nodes(self) -> int:
        return 2 * self.num_tasks * len(self.slots)

    def node_id(self, task: int, slot: int, kind: int) -> int:
        """node(t, s, kind) = (s·2 + kind)·T + t."""
        return (slot * 2 + kind) * self.num_tasks + task


def build_edges(
    layout: GraphLayout, kinds: Sequence[str] = EDGE_KINDS
) -> tuple[Tensor, Tensor]:
    """Candidate edges of the parameter graph (§3.1), both directions, coalesced.

    Returns:
        edge_index: (2, E) long, every undirected edge as (i, j) and (j, i).
        edge_type: (E,) long, codes of ``EDGE_KINDS`` (0 intra, 1 inter_task, 2 inter_layer).
    """
    unknown = [k for k in kinds if k not in EDGE_KINDS]
    if unknown:
        raise ValueError(f"kinds: unknown edge kind(s) {unknown}; allowed: {list(EDGE_KINDS)}")
    T, grid = layout.num_tasks, layout._grid  # grid: (S, 2, T)
    src: list[Tensor] = []
    dst: list[Tensor] = []
    typ: list[Tensor] = []

    def add(a: Tensor, b: Tensor, code: int) -> None:
        src.append(a.reshape(-1))
        dst.append(b.reshape(-1))
        typ.append(torch.full((a.numel(),), code, dtype=torch.long))

    if "intra" in kinds:
        # A(t,s) — B(t,s) where the aligned shapes agree: d_in == d_out
        square = torch.tensor([s[2] == s[3] for s in layout.slots])  # (S,)
        add(grid[square, KIND_A], grid[square, KIND_B], EDGE_INTRA)  # (S_sq, T) each
    if "inter_task" in kinds and T > 1:
        # (t, s, kind) — (t', s, kind) for every t < t'
        a, b = torch.triu_indices(T, T, offset=1)  # (T(T-1)/2,) each
        flat = grid.reshape(-1, T)  # (2S, T)
        add(flat[:, a], flat[:, b], EDGE_INTER_TASK)  # (2S, T(T-1)/2) each
    if "inter_layer" in kinds:
        # (t, l, m, kind) — (t, l', m, kind) with l' the next layer carrying module m
        for module in layout.modules:
            ss = sorted((s[0], i) for i, s in enumerate(layout.slots) if s[1] == module)
            for (_, i), (_, j) in zip(ss[:-1], ss[1:]):
                si, sj = layout.slots[i], layout.slots[j]
                for kind, col in ((KIND_A, 2), (KIND_B, 3)):
                    if si[col] == sj[col] and si[4] == sj[4]:  # same aligned shape (d, r)
                        add(grid[i, kind], grid[j, kind], EDGE_INTER_LAYER)  # (T,) each
    n = layout.num_nodes
    if not src:
        return torch.empty(2, 0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    edge_index = torch.stack([torch.cat(src), torch.cat(dst)])  # (2, E/2)
    edge_type = torch.cat(typ)  # (E/2,)
    # both directions, sorted by (source, target); kinds never overlap, so "reduce" is moot
    edge_index, edge_type = to_undirected(edge_index, edge_type, num_nodes=n, reduce="max")
    return edge_index, edge_type  # (2, E), (E,)


def sparsify_topk(
    edge_index: Tensor, edge_weight: Tensor, k: int, num_nodes: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Keep an undirected edge {i, j} if it is among the k heaviest edges of i *or* of j.

    The result stays symmetric (both directions kept or dropped together). Ties are broken by edge order.

    Args:
        edge_index: (2, E), both directions present. edge_weight: (E,), symmetric.
        k: neighbours kept per node (≥ 1).
    Returns:
        edge_index (2, E'), edge_weight (E',), keep (E,) bool mask (to filter ``edge_type`` alike).
    """
    if k < 1:
        raise ValueError(f"k (top-k neighbours per node) must be >= 1, got {k}")
    E = edge_index.size(1)
    if E == 0:
        return edge_index, edge_weight, torch.zeros(0, dtype=torch.bool, device=edge_index.device)
    n = int(edge_index.max()) + 1 if num_nodes is None else num_nodes
    src, dst = edge_index  # (E,), (E,)
    # order edges by weight (descending), then stably by source: each source's edges, heaviest first
    order = torch.argsort(edge_weight, descending=True, stable=True)  # (E,)
    order = order[torch.argsort(src[order], stable=True)]  # (E,)
    # rank of an edge among its source's edges = position − first position of that source
    deg = torch.bincount(src, minlength=n)  # (n,)
    start = torch.cumsum(deg, 0) - deg  # (n,)
    rank = torch.empty(E, dtype=torch.long, device=src.device)  # (E,)
    rank[order] = torch.arange(E, device=src.device) - start[src[order]]
    top = rank < k  # (E,) in the top-k of its source
    # an undirected pair survives if either direction is in its source's top-k
    key = torch.minimum(src, dst) * n + torch.maximum(src, dst)  # (E,)
    keep = torch.isin(key, key[top])  # (E,)
    return edge_index[:, keep], edge_weight[keep], keep


def training_graph(
    edge_index: Tensor, edge_type: Tensor, edge_weight: Tensor, num_nodes: int, topk: int | None = None
) -> tuple[Data, Tensor]:
    """The weighted graph the spectrum is taken from, as a torch-geometric ``Data`` (edge_index, edge_weight,
    edge_type, num_nodes), optionally sparsified to each node's ``topk`` heaviest edges (``sparsify_topk``).

    Returns the graph and the (E,) bool mask of the candidate edges it kept.
    """
    if topk is None:
        keep = torch.ones(edge_index.size(1), dtype=torch.bool, device=edge_index.device)  # (E,)
        return Data(edge_index=edge_index, edge_weight=edge_weight, edge_type=edge_type, num_nodes=num_nodes), keep
    ei, w, keep = sparsify_topk(edge_index, edge_weight, topk, num_nodes)  # (2, E'), (E',), (E,)
    return Data(edge_index=ei, edge_weight=w, edge_type=edge_type[keep], num_nodes=num_nodes), keep


def class_subgraph(
    layout: GraphLayout, edge_index: Tensor, edge_weight: Tensor | None, class_index: int
) -> tuple[Tensor, Tensor | None]:
    """The edges of one shape class, relabelled to the class's rows 0..n_c−1 (``layout.shape_classes``)."""
    if not 0 <= class_index < len(layout.shape_classes):
        raise ValueError(f"class_index must be in [0, {len(layout.shape_classes)}), got {class_index}")
    ids = layout.shape_classes[class_index][1].to(edge_index.device)  # (n_c,)
    ei, ew = subgraph(ids, edge_index, edge_weight, relabel_nodes=True, num_nodes=layout.num_nodes)
    return ei, ew  # (2, E_c), (E_c,)


def class_edges(layout: GraphLayout, edge_index: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Per shape class: its edges relabelled to the class's rows (2, E_c), and their positions in
    ``edge_index`` (E_c,) (what the class's EMA correlations and graph weights are read at)."""
    positions = torch.arange(edge_index.size(1), device=edge_index.device)  # (E,)
    per_class = [class_subgraph(layout, edge_index, positions, c) for c in range(len(layout.shape_classes))]
    return [ei for ei, _ in per_class], [ids for _, ids in per_class]  # [(2, E_c)], [(E_c,)]


def node_features(A: Sequence[Tensor], B: Sequence[Tensor]) -> Tensor:
    """Per-node matrix statistics (§3.1): Frobenius, spectral, nuclear norm, condition number.

    Args:
        A: per slot, (T, r, d_in). B: per slot, (T, d_out, r). Same slot order as the layout.
    Returns:
        (n, 4) float32 in layout node order, columns [‖M‖_F, ‖M‖_2, ‖M‖_*, κ(M)].

    κ(M) = σ_max / max(σ_min, ε·σ_max, tiny) with ε the float32 machine epsilon: finite (≤ 1/ε ≈ 8.4e6) for
    a rank-deficient matrix, and 0 for the all-zero matrix (e.g. B at initialisation). Singular values of
    Aᵀ and A are the same, so the aligned reading does not matter here.
    """
    if len(A) != len(B):
        raise ValueError(f"A and B must list the same slots, got {len(A)} and {len(B)} entries")
    rows: list[Tensor] = []
    for a, b in zip(A, B):
        for m in (a, b):
            # σ_1 ≥ … ≥ σ_min(r,d) per task
            sv = torch.linalg.svdvals(m.detach().float())  # (T, min(r, d))
            fro = sv.pow(2).sum(-1).sqrt()  # ‖M‖_F = sqrt(Σσ²)    (T,)
            spec = sv[:, 0]  # ‖M‖_2 = σ_max   (T,)
            nuc = sv.sum(-1)  # ‖M‖_* = Σσ   (T,)
            floor = torch.clamp(spec * torch.finfo(torch.float32).eps, min=torch.finfo(torch.float32).tiny)
            cond = spec / torch.maximum(sv[:, -1], floor)  # κ = σ_max/σ_min, inf-safe   (T,)
            rows.append(torch.stack([fro, spec, nuc, cond], dim=-1))  # (T, 4)
    return torch.cat(rows)  # (n, 4)


def to_pyg(
    layout: GraphLayout,
    edge_index: Tensor,
    edge_weight: Tensor | None = None,
    edge_type: Tensor | None = None,
    node_features: Tensor | None = None,
) -> Data:
    """The graph as a ``torch_geometric.data.Data`` with the layout's per-node attributes.

    ``x`` holds the node features (n, 4) if given; ``task``, ``layer``, ``module`` (index into
    ``module_names``), ``kind``, ``signal_dim`` and ``shape_class`` are (n,) long tensors.
    """
    n = layout.num_nodes
    if node_features is not None and node_features.size(0) != n:
        raise ValueError(f"node_features has {node_features.size(0)} rows, the layout has {n} nodes")
    return Data(
        x=node_features,
        edge_index=edge_index,
        edge_weight=edge_weight,
        edge_type=edge_type,
        num_nodes=n,
        task=layout.node_task,
        layer=layout.node_layer,
        module=layout.node_module,
        kind=layout.node_kind,
        signal_dim=layout.node_signal_dim,
        shape_class=layout.node_class,
        module_names=list(layout.modules),
    )


def _stats(edge_index: Tensor, n: int, nodes: int | None) -> dict[str, float]:
    """Nodes, undirected edges, average degree and average local clustering of one (sub)graph."""
    ei = coalesce(edge_index, num_nodes=n).cpu().numpy()  # (2, E)
    ei = ei[:, ei[0] != ei[1]]
    adj = sp.csr_matrix((np.ones(ei.shape[1]), (ei[0], ei[1])), shape=(n, n))  # binary, symmetric
    deg = np.asarray(adj.sum(1)).ravel()  # (n,)
    # triangles through i: t_i = ½ (A³)_ii = ½ Σ_j (A²)_ij A_ij
    tri = np.asarray((adj @ adj).multiply(adj).sum(1)).ravel() / 2  # (n,)
    # C_i = 2 t_i / (d_i (d_i − 1)), and 0 where d_i < 2 (networkx convention)
    denom = deg * (deg - 1)
    local = np.divide(2 * tri, denom, out=np.zeros(n), where=denom > 0)  # (n,)
    touched = deg > 0 if nodes is None else np.ones(n, dtype=bool)
    count = int(touched.sum())
    num_edges = ei.shape[1] // 2
    return {
        "num_nodes": count,
        "num_edges": num_edges,
        "average_degree": 2 * num_edges / count if count else 0.0,
        "clustering": float(local[touched].mean()) if count else 0.0,
    }


def graph_statistics(edge_index: Tensor, edge_type: Tensor, num_nodes: int) -> dict[str, dict[str, float]]:
    """The paper's Table 1: per edge kind and combined, nodes, edges, average degree, clustering.

    For one kind, "nodes" counts the nodes that have at least one edge of that kind and the averages run
    over them; "combined" counts all ``num_nodes``. Clustering is the mean local clustering coefficient
    C_i = 2 t_i / (d_i(d_i−1)) of the unweighted graph (t_i triangles through i; C_i = 0 where d_i < 2),
    computed with sparse products (t_i = ½ (A³)_ii). Edges are counted undirected.
    """
    out: dict[str, dict[str, float]] = {}
    for code, name in enumerate(EDGE_KINDS):
        out[name] = _stats(edge_index[:, edge_type == code], num_nodes, None)
    out["combined"] = _stats(edge_index, num_nodes, num_nodes)
    return out
