"""The coordination heatmap (seed paper, Figure 3): |ρ| between LoRA matrices, as an image tensor.

No plotting library: the picture is built as a (3, H, W) float tensor that TensorBoard's ``add_image``
takes, with a diverging colour scale (blue −1, white 0, red +1) as in the paper's figure.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.cluster.hierarchy import leaves_list, linkage
from scipy.spatial.distance import squareform
from torch import Tensor

from speclora.spectral.graph import GraphLayout


def correlation_matrix(rho: Tensor, edge_index: Tensor, num_nodes: int) -> Tensor:
    """Dense (n, n) ρ with ρ_ii = 1 and 0 where there is no edge, on rho's device. rho: (E,), edge_index: (2, E)."""
    R = torch.zeros(num_nodes, num_nodes, device=rho.device)  # (n, n)
    R[edge_index[0].to(rho.device), edge_index[1].to(rho.device)] = rho.float()
    R.fill_diagonal_(1.0)
    return R


def task_layer_order(layout: GraphLayout) -> Tensor:
    """Node order by (task, layer, module, kind): task blocks along the diagonal."""
    key = (((layout.node_task * 1000 + layout.node_layer) * 100 + layout.node_module) * 2 + layout.node_kind)
    return torch.argsort(key)  # (n,)


def cluster_linkage(R: Tensor | np.ndarray) -> np.ndarray | None:
    """Average-linkage hierarchical clustering of the nodes on the distance 1 − |ρ|: scipy's (n − 1, 4)
    linkage matrix, or None for fewer than 2 nodes. R: (n, n) ρ, a tensor or an array. The TensorBoard
    heatmap (:func:`coordination_image`) and the bench figure (speclora.bench.plots) both order by it."""
    R = torch.as_tensor(R)
    # D_ij = max(0, 1 − |ρ_ij|), symmetrised, D_ii = 0
    D = (1.0 - R.abs()).clamp_min(0).cpu().numpy().astype(np.float64)  # (n, n)
    np.fill_diagonal(D, 0.0)
    D = (D + D.T) / 2
    if D.shape[0] < 2:
        return None
    return linkage(squareform(D, checks=False), method="average")


def cluster_order(R: Tensor) -> Tensor:
    """Leaf order of average-linkage hierarchical clustering on the distance 1 − |ρ| (:func:`cluster_linkage`)."""
    Z = cluster_linkage(R)
    if Z is None:
        return torch.arange(R.shape[0])
    return torch.as_tensor(leaves_list(Z), dtype=torch.long)


def diverging(R: Tensor) -> Tensor:
    """ρ ∈ [−1, 1] (n, n) → RGB (3, n, n): −1 blue, 0 white, +1 red."""
    pos, neg = R.clamp(0, 1), (-R).clamp(0, 1)  # (n, n)
    red = 1.0 - neg
    green = 1.0 - pos - neg
    blue = 1.0 - pos
    return torch.stack([red, green.clamp(0, 1), blue]).clamp(0, 1)  # (3, n, n)


def coordination_image(rho: Tensor, edge_index: Tensor, layout: GraphLayout, scale: int = 2) -> Tensor:
    """Two panels side by side: ordered by task and layer (left), by hierarchical clustering (right).

    Returns (3, n·scale, (2n + 2)·scale) in [0, 1], nearest-neighbour upscaled by ``scale``.
    """
    R = correlation_matrix(rho, edge_index, layout.num_nodes).cpu()  # (n, n): drawn on the host
    left = task_layer_order(layout)
    right = cluster_order(R)
    panels = [diverging(R[left][:, left]), torch.ones(3, R.size(0), 2), diverging(R[right][:, right])]
    image = torch.cat(panels, dim=2)  # (3, n, 2n + 2)
    return image.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
