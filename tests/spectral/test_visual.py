"""The coordination heatmap's orders: one clustering serves the TensorBoard image and the bench figure."""

from __future__ import annotations

import numpy as np
import torch

from speclora.spectral.visual import cluster_linkage, cluster_order, diverging


def _two_blocks() -> torch.Tensor:
    # nodes {0, 2} and {1, 3} move together (|ρ| = 0.9), across the blocks |ρ| = 0.1
    R = torch.full((4, 4), 0.1)
    for i, j in ((0, 2), (1, 3)):
        R[i, j] = R[j, i] = -0.9 if i == 1 else 0.9  # the sign does not matter: distance 1 − |ρ|
    R.fill_diagonal_(1.0)
    return R


def test_cluster_order_puts_each_block_together():
    order = cluster_order(_two_blocks()).tolist()
    assert sorted(order) == [0, 1, 2, 3]
    pos = {node: i for i, node in enumerate(order)}
    assert abs(pos[0] - pos[2]) == 1 and abs(pos[1] - pos[3]) == 1


def test_linkage_of_a_tensor_and_of_an_array_agree():
    R = _two_blocks()
    Z_tensor, Z_array = cluster_linkage(R), cluster_linkage(R.numpy().astype(np.float64))
    assert Z_tensor.shape == (3, 4)
    assert np.allclose(Z_tensor, Z_array)
    assert np.isclose(Z_tensor[0, 2], 0.1)  # the first merge at distance 1 − 0.9
    assert cluster_linkage(torch.ones(1, 1)) is None and cluster_order(torch.ones(1, 1)).tolist() == [0]


def test_diverging_colours():
    rgb = diverging(torch.tensor([[-1.0, 0.0, 1.0]]))  # (3, 1, 3)
    assert rgb[:, 0, 0].tolist() == [0.0, 0.0, 1.0]  # −1 blue
    assert rgb[:, 0, 1].tolist() == [1.0, 1.0, 1.0]  # 0 white
    assert rgb[:, 0, 2].tolist() == [1.0, 0.0, 0.0]  # +1 red
