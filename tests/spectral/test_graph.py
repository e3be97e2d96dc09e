"""The parameter graph: node numbering, hand-counted edges, top-k sparsification, statistics, features."""

from __future__ import annotations

import math

import pytest
import torch

from speclora.spectral import (
    EDGE_INTER_LAYER,
    EDGE_INTER_TASK,
    EDGE_INTRA,
    GraphLayout,
    build_edges,
    class_subgraph,
    graph_statistics,
    node_features,
    sparsify_topk,
    to_pyg,
)
from tests.spectral.graphs import complete, star, undirected


def toy() -> GraphLayout:
    """2 tasks, 2 layers, 1 square module: 8 nodes, node = (s·2 + kind)·2 + t."""
    return GraphLayout(2, [(0, "query", 4, 4, 2), (1, "query", 4, 4, 2)])


def pairs(edge_index, edge_type, code):
    ei = edge_index[:, edge_type == code]
    return sorted({(min(i, j), max(i, j)) for i, j in ei.T.tolist()})


def test_node_order_and_attributes():
    lay = toy()
    assert lay.num_nodes == 8
    assert lay.node_task.tolist() == [0, 1, 0, 1, 0, 1, 0, 1]
    assert lay.node_kind.tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    assert lay.node_layer.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert lay.node_id(task=1, slot=1, kind=0) == 5
    assert lay.node_signal_dim.tolist() == [8] * 8
    assert len(lay.shape_classes) == 1 and lay.shape_classes[0][0] == (4, 2)


def test_toy_edges_hand_counted():
    lay = toy()
    edge_index, edge_type = build_edges(lay)
    # intra: A–B of each (t, s): 2 tasks × 2 slots
    assert pairs(edge_index, edge_type, EDGE_INTRA) == [(0, 2), (1, 3), (4, 6), (5, 7)]
    # inter-task: (s, kind) across the 2 tasks: 2 slots × 2 kinds
    assert pairs(edge_index, edge_type, EDGE_INTER_TASK) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    # inter-layer: (t, kind) in layers 0–1: 2 tasks × 2 kinds
    assert pairs(edge_index, edge_type, EDGE_INTER_LAYER) == [(0, 4), (1, 5), (2, 6), (3, 7)]
    # both directions, no duplicates, no self-loops
    assert edge_index.size(1) == 24
    assert set(map(tuple, edge_index.T.tolist())) == {(j, i) for i, j in edge_index.T.tolist()}
    assert (edge_index[0] != edge_index[1]).all()


def test_kinds_subset_and_unknown_kind():
    ei, et = build_edges(toy(), kinds=("inter_task",))
    assert ei.size(1) == 8 and (et == EDGE_INTER_TASK).all()
    with pytest.raises(ValueError, match="inter_tsk"):
        build_edges(toy(), kinds=("inter_tsk",))


def test_non_square_module_has_no_intra_edges_and_two_classes():
    lay = GraphLayout(3, [(0, "fc1", 4, 8, 2), (1, "fc1", 4, 8, 2)])
    assert [key for key, _ in lay.shape_classes] == [(4, 2), (8, 2)]
    ei, et = build_edges(lay)
    assert (et != EDGE_INTRA).all()
    # inter-task: 2 slots × 2 kinds × 3 pairs; inter-layer: 3 tasks × 2 kinds
    assert len(pairs(ei, et, EDGE_INTER_TASK)) == 12
    assert len(pairs(ei, et, EDGE_INTER_LAYER)) == 6
    assert (lay.node_class[ei[0]] == lay.node_class[ei[1]]).all()
    # class 1 (the B nodes) relabelled to rows 0..5
    sub, _ = class_subgraph(lay, ei, None, 1)
    assert sub.max() == 5 and sub.size(1) == 2 * (6 + 3)


def test_inter_layer_links_consecutive_carrying_layers():
    lay = GraphLayout(1, [(0, "q", 4, 4, 2), (2, "q", 4, 4, 2), (4, "q", 4, 4, 2), (0, "v", 4, 4, 2)])
    ei, et = build_edges(lay, kinds=("inter_layer",))
    # layers 0–2 and 2–4 of "q", both kinds; "v" sits alone
    assert pairs(ei, et, EDGE_INTER_LAYER) == [(0, 2), (1, 3), (2, 4), (3, 5)]


def test_layout_rejects_duplicates_and_bad_tasks():
    with pytest.raises(ValueError, match="appears twice"):
        GraphLayout(2, [(0, "q", 4, 4, 2), (0, "q", 4, 4, 2)])
    with pytest.raises(ValueError, match="num_tasks"):
        GraphLayout(0, [(0, "q", 4, 4, 2)])


def test_sparsify_topk_keeps_either_endpoints_top_k():
    # star with center 0 and leaves 1..4 of weights 4, 3, 2, 1; plus edge 3–4 of weight 0.5
    ei, w = undirected([(0, 1), (0, 2), (0, 3), (0, 4), (3, 4)], 5, [4.0, 3.0, 2.0, 1.0, 0.5])
    out, ow, keep = sparsify_topk(ei, w, k=1)
    kept = sorted({(min(i, j), max(i, j)) for i, j in out.T.tolist()})
    # center keeps 0–1; leaves 1, 2, 3 and 4 keep their heaviest edge: 0–1, 0–2, 0–3, 0–4 (1 > 0.5)
    assert kept == [(0, 1), (0, 2), (0, 3), (0, 4)]
    assert keep.sum() == out.size(1) == 8
    assert set(map(tuple, out.T.tolist())) == {(j, i) for i, j in out.T.tolist()}
    assert torch.equal(ow, w[keep])
    with pytest.raises(ValueError, match="k"):
        sparsify_topk(ei, w, 0)


def test_clustering_triangle_one_star_zero():
    ei, _ = complete(3)
    stats = graph_statistics(ei, torch.zeros(ei.size(1), dtype=torch.long), 3)
    assert stats["combined"]["clustering"] == 1.0 and stats["intra"]["clustering"] == 1.0
    ei, _ = star(4)
    stats = graph_statistics(ei, torch.zeros(ei.size(1), dtype=torch.long), 5)
    assert stats["combined"]["clustering"] == 0.0
    assert stats["combined"]["num_edges"] == 4 and stats["combined"]["average_degree"] == 8 / 5


def test_statistics_of_toy():
    lay = toy()
    stats = graph_statistics(*build_edges(lay), lay.num_nodes)
    for kind in ("intra", "inter_task", "inter_layer"):
        assert stats[kind] == {"num_nodes": 8, "num_edges": 4, "average_degree": 1.0, "clustering": 0.0}
    # the toy graph is the cube: 3-regular, bipartite, no triangles
    assert stats["combined"] == {"num_nodes": 8, "num_edges": 12, "average_degree": 3.0, "clustering": 0.0}
    # 3 tasks: the inter-task cliques are triangles
    lay3 = GraphLayout(3, [(0, "q", 4, 4, 2)])
    s3 = graph_statistics(*build_edges(lay3, ("inter_task",)), lay3.num_nodes)
    assert s3["inter_task"]["clustering"] == 1.0


def test_node_features_exact():
    A = torch.zeros(2, 2, 3)  # (T, r, d_in)
    A[0, 0, 0], A[0, 1, 1] = 3.0, 1.0  # singular values 3, 1
    A[1, 0, 0] = 2.0  # rank 1
    B = torch.zeros(2, 3, 2)  # (T, d_out, r): all zero
    f = node_features([A], [B])
    assert f.shape == (4, 4)
    assert torch.allclose(f[0], torch.tensor([math.sqrt(10), 3.0, 4.0, 3.0]))
    eps = torch.finfo(torch.float32).eps
    assert torch.allclose(f[1, :3], torch.tensor([2.0, 2.0, 2.0])) and math.isclose(f[1, 3], 1 / eps, rel_tol=1e-5)
    assert torch.equal(f[2:], torch.zeros(2, 4))
    assert torch.isfinite(f).all()


def test_to_pyg():
    lay = toy()
    ei, et = build_edges(lay)
    w = torch.ones(ei.size(1))
    data = to_pyg(lay, ei, w, et, torch.zeros(8, 4))
    assert data.num_nodes == 8 and data.x.shape == (8, 4) and data.is_undirected()
    assert torch.equal(data.task, lay.node_task) and data.module_names == ["query"]
    assert torch.equal(data.edge_type, et)


def test_training_graph_is_a_pyg_data():
    from speclora.spectral.graph import training_graph

    lay = GraphLayout(3, [(0, "q", 4, 4, 2), (1, "q", 4, 4, 2)])
    ei, et = build_edges(lay)
    w = torch.rand(ei.size(1), generator=torch.Generator().manual_seed(0))
    w = (w + w[torch.argsort(ei[1] * lay.num_nodes + ei[0])]) / 2  # symmetric: w_ij = w_ji
    full, keep = training_graph(ei, et, w, lay.num_nodes)
    assert keep.all() and full.num_nodes == lay.num_nodes and torch.equal(full.edge_index, ei)
    assert torch.equal(full.edge_weight, w) and torch.equal(full.edge_type, et)
    sparse, keep = training_graph(ei, et, w, lay.num_nodes, topk=1)
    want_ei, want_w, want_keep = sparsify_topk(ei, w, 1, lay.num_nodes)
    assert torch.equal(sparse.edge_index, want_ei) and torch.equal(sparse.edge_weight, want_w)
    assert torch.equal(keep, want_keep) and torch.equal(sparse.edge_type, et[keep])
    assert sparse.num_edges < full.num_edges
