"""Hand-sized graphs for the spectral tests: edge lists with both directions, as build_edges gives."""

from __future__ import annotations

import torch
from torch_geometric.utils import to_undirected


def undirected(pairs: list[tuple[int, int]], n: int, weights: list[float] | None = None):
    """(2, E) both directions and (E,) weights from a list of undirected pairs."""
    ei = torch.tensor(pairs, dtype=torch.long).T  # (2, E/2)
    w = torch.ones(ei.size(1)) if weights is None else torch.tensor(weights, dtype=torch.float32)
    return to_undirected(ei, w, num_nodes=n)


def path(n: int):
    return undirected([(i, i + 1) for i in range(n - 1)], n)


def cycle(n: int):
    return undirected([(i, (i + 1) % n) for i in range(n)], n)


def complete(n: int):
    return undirected([(i, j) for i in range(n) for j in range(i + 1, n)], n)


def star(leaves: int):
    return undirected([(0, i) for i in range(1, leaves + 1)], leaves + 1)
