"""Aligned signals, EMA gradient correlations against a direct computation, non-finite steps, weights."""

from __future__ import annotations

import math

import pytest
import torch

from speclora.spectral import (
    EDGE_INTER_TASK,
    EdgeCorrelation,
    GraphLayout,
    build_edges,
    edge_weights,
    fixed_weights,
    magnitude_weights,
    stack_signals,
    unstack_signals,
)
from speclora.spectral.correlation import parameter_magnitude_weights
from speclora.spectral.signals import write_signals
from tests.spectral.graphs import path


def test_stack_signals_aligned_layout_and_roundtrip():
    lay = GraphLayout(2, [(0, "q", 3, 3, 2), (0, "fc", 3, 5, 2)])
    g = torch.Generator().manual_seed(0)
    A = [torch.randn(2, 2, 3, generator=g), torch.randn(2, 2, 3, generator=g)]  # (T, r, d_in)
    B = [torch.randn(2, 3, 2, generator=g), torch.randn(2, 5, 2, generator=g)]  # (T, d_out, r)
    sig = stack_signals(lay, A, B)
    # classes: (3, 2) holds A_q, B_q, A_fc (in node order); (5, 2) holds B_fc
    assert [s.shape for s in sig] == [(6, 6), (2, 10)]
    assert torch.equal(sig[0][1], A[0][1].T.reshape(-1))  # node (t=1, q, A): vec(Aᵀ)
    assert torch.equal(sig[0][2], B[0][0].reshape(-1))  # node (t=0, q, B): vec(B)
    assert torch.equal(sig[0][4], A[1][0].T.reshape(-1))
    assert torch.equal(sig[1][1], B[1][1].reshape(-1))
    A2, B2 = unstack_signals(lay, sig)
    assert all(torch.equal(a, b) for a, b in zip(A + B, A2 + B2))
    # into buffers (one cat per class), and back into tensors in place (one multi-tensor copy)
    out = [torch.empty(6, 6), torch.empty(2, 10)]
    assert all(torch.equal(a, b) for a, b in zip(stack_signals(lay, A, B, out=out), sig))
    A3, B3 = [torch.zeros_like(a) for a in A], [torch.zeros_like(b) for b in B]
    write_signals(lay, sig, A3, B3)
    assert all(torch.equal(a, b) for a, b in zip(A + B, A3 + B3))
    with pytest.raises(ValueError, match="slot 0"):
        stack_signals(lay, [A[0].transpose(1, 2), A[1]], B)


def direct_rho(gs, i, j, mu):
    """ρ_ij from the whole gradient history, with bias-corrected EMAs written out term by term."""
    t = len(gs)
    wts = [(1 - mu) * mu ** (t - 1 - s) for s in range(t)]
    sij = sum(w * float(g[i] @ g[j]) for w, g in zip(wts, gs))
    qi = sum(w * float(g[i] @ g[i]) for w, g in zip(wts, gs))
    qj = sum(w * float(g[j] @ g[j]) for w, g in zip(wts, gs))
    return sij / math.sqrt(qi * qj)


def test_ema_correlation_equals_direct_computation():
    ei, _ = path(4)  # edges 0–1, 1–2, 2–3 both ways
    corr = EdgeCorrelation(ei, 4, decay=0.7)
    g = torch.Generator().manual_seed(0)
    gs = [torch.randn(4, 5, generator=g) for _ in range(4)]
    for G in gs:
        assert corr.update(G)
    rho = corr.rho()
    for e, (i, j) in enumerate(ei.T.tolist()):
        assert math.isclose(float(rho[e]), direct_rho(gs, i, j, 0.7), rel_tol=1e-5)
    assert corr.num_updates == 4


def test_sddmm_and_chunked_gathered_dots_agree():
    # two shape classes (nodes 0-5 and 6-11), random pairs within each, in no particular order
    g = torch.Generator().manual_seed(1)
    node_class = torch.tensor([0] * 6 + [1] * 6)
    pairs = {(i, j) for i, j in torch.randint(0, 6, (2, 40), generator=g).T.tolist() if i != j}
    pairs |= {(i + 6, j + 6) for i, j in torch.randint(0, 6, (2, 40), generator=g).T.tolist() if i != j}
    pairs = sorted({(min(i, j), max(i, j)) for i, j in pairs}, key=lambda e: (e[1] * 7 + e[0]) % 11)
    ei = torch.tensor(pairs).T
    ei = torch.cat([ei, ei.flip(0)], dim=1)
    sddmm = EdgeCorrelation(ei, 12, 0.9, node_class=node_class)
    gathered = EdgeCorrelation(ei, 12, 0.9, node_class=node_class, chunk_size=1)
    gathered.use_sddmm = False
    G = [torch.randn(6, 7, generator=g), torch.randn(6, 7, generator=g)]
    sddmm.update(G)
    gathered.update(G)
    assert torch.allclose(sddmm.pair_ema, gathered.pair_ema, atol=1e-6)
    # and both equal the direct dot products
    rows = torch.cat(G)
    direct = 0.1 * (rows[sddmm.pair_index[0]] * rows[sddmm.pair_index[1]]).sum(-1)
    assert torch.allclose(sddmm.pair_ema, direct, atol=1e-6)


def test_nonfinite_and_zero_gradients_are_skipped_and_counted():
    ei, _ = path(3)
    corr = EdgeCorrelation(ei, 3, 0.5)
    G = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    corr.update(G)
    before = corr.state_dict()
    for bad in (float("nan"), float("inf")):
        Gb = G.clone()
        Gb[1, 2] = bad
        flag = corr.update(Gb)
        assert flag.dtype == torch.bool and flag.shape == () and not bool(flag)  # a device flag: not finite
    assert bool(corr.update(torch.zeros(3, 4)))  # finite, but nothing to learn from: not folded in either
    assert corr.num_skipped_nonfinite == 2 and corr.num_skipped_zero == 1 and corr.num_updates == 1
    assert corr.counts.tolist() == [1, 2, 1]
    after = corr.state_dict()
    assert torch.equal(after["pair_ema"], before["pair_ema"]) and torch.equal(after["norm_ema"], before["norm_ema"])
    assert torch.isfinite(corr.rho()).all()


def test_per_class_update_and_state_dict_roundtrip():
    lay = GraphLayout(2, [(0, "fc", 3, 5, 2), (1, "fc", 3, 5, 2)])
    ei, _ = build_edges(lay)
    corr = EdgeCorrelation(ei, lay.num_nodes, 0.9, node_class=lay.node_class)
    g = torch.Generator().manual_seed(0)
    A = [torch.randn(2, 2, 3, generator=g) for _ in range(2)]
    B = [torch.randn(2, 5, 2, generator=g) for _ in range(2)]
    assert corr.update(stack_signals(lay, A, B))
    # single-step EMA: ρ is the cosine of the two aligned gradients
    rows = {int(i): r for (_, ids), sig in zip(lay.shape_classes, stack_signals(lay, A, B)) for i, r in zip(ids, sig)}
    for e, (i, j) in enumerate(ei.T.tolist()):
        cos = torch.nn.functional.cosine_similarity(rows[i], rows[j], dim=0)
        assert math.isclose(float(corr.rho()[e]), float(cos), rel_tol=1e-5, abs_tol=1e-6)
    fresh = EdgeCorrelation(ei, lay.num_nodes, 0.9, node_class=lay.node_class)
    fresh.load_state_dict(corr.state_dict())
    assert torch.equal(fresh.rho(), corr.rho()) and fresh.num_updates == 1


def test_checkpoint_order_of_the_pairs_is_the_sorted_keys():
    # the state writes S in the order of the pair keys i·n + j, whatever the internal (class, row-major) order
    lay = GraphLayout(2, [(0, "q", 3, 3, 2), (0, "fc", 3, 5, 2), (1, "q", 3, 3, 2), (1, "fc", 3, 5, 2)])
    ei, _ = build_edges(lay)
    corr = EdgeCorrelation(ei, lay.num_nodes, 0.0, node_class=lay.node_class)  # μ = 0: the EMA is this step's
    g = torch.Generator().manual_seed(2)
    A = [torch.randn(2, 2, 3, generator=g) for _ in range(4)]
    B = [torch.randn(2, s, 2, generator=g) for s in (3, 5, 3, 5)]
    corr.update(stack_signals(lay, A, B))
    rows = torch.zeros(lay.num_nodes, 10)
    for (_, ids), sig in zip(lay.shape_classes, stack_signals(lay, A, B)):
        rows[ids, : sig.size(1)] = sig
    pairs = sorted({(min(i, j), max(i, j)) for i, j in ei.T.tolist()})
    state = corr.state_dict()
    direct = torch.tensor([float(rows[i] @ rows[j]) for i, j in pairs])
    assert torch.allclose(state["pair_ema"], direct, atol=1e-5)
    assert torch.allclose(state["norm_ema"], rows.square().sum(1), atol=1e-5)  # node order


def test_parameter_magnitude_weights():
    ei, _ = path(4)  # edges (0,1), (1,0), (1,2), (2,1), (2,3), (3,2)
    m = torch.tensor([1.0, 3.0, 0.0, 0.0])
    w = parameter_magnitude_weights(m, ei, alpha=2.0)
    # d_01 = 2/3, d_12 = 3/3, d_23 = 0/0 := 0 (equal magnitudes)
    want = torch.tensor([math.exp(-4 / 3)] * 2 + [math.exp(-2.0)] * 2 + [1.0] * 2)
    assert torch.allclose(w, want)
    with pytest.raises(ValueError, match="alpha"):
        parameter_magnitude_weights(m, ei, -1.0)


def test_edge_across_classes_is_rejected():
    ei, _ = path(2)
    with pytest.raises(ValueError, match="shape classes"):
        EdgeCorrelation(ei, 2, node_class=torch.tensor([0, 1]))


def test_edge_weight_formulas():
    rho = torch.tensor([1.0, -1.0, 0.0, 0.5])
    w = edge_weights(rho, alpha=2.0)
    assert torch.allclose(w, torch.tensor([1.0, 1.0, math.exp(-2.0), math.exp(-1.0)]))
    assert torch.equal(edge_weights(rho, 0.0), torch.ones(4))
    with pytest.raises(ValueError, match="alpha"):
        edge_weights(rho, -1.0)
    ei, _ = path(3)  # edges (0,1), (1,0), (1,2), (2,1)
    m = torch.tensor([1.0, 2.0, 0.0])
    wm = magnitude_weights(m, ei, alpha=1.0)
    # s_01 = 1/2, s_12 = 0/2
    assert torch.allclose(wm, torch.tensor([math.exp(-0.5)] * 2 + [math.exp(-1.0)] * 2))
    et = torch.tensor([0, 1, 2, 1])
    assert torch.equal(fixed_weights(et, (0.5, 1.0, 2.0)), torch.tensor([0.5, 1.0, 2.0, 1.0]))
    assert torch.equal(fixed_weights(et), torch.ones(4))
    with pytest.raises(ValueError, match="one weight per edge kind"):
        fixed_weights(et, (1.0,))
    assert EDGE_INTER_TASK == 1


def test_a_step_the_module_skips_leaves_the_emas_as_they_were():
    # finite LoRA gradients, but the module's flag says the step is skipped (another gradient is not finite)
    ei, _ = path(3)
    corr = EdgeCorrelation(ei, 3, 0.5)
    G = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    corr.update(G)
    before = corr.state_dict()
    flag = corr.update(2 * G, skipped=torch.tensor(True))
    assert not bool(flag) and corr.num_updates == 1 and corr.num_skipped_nonfinite == 1
    assert torch.equal(corr.state_dict()["pair_ema"], before["pair_ema"])
    assert bool(corr.update(2 * G, skipped=torch.tensor(False))) and corr.num_updates == 2
