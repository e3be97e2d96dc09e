"""Graph Laplacians of the parameter graph (seed paper §3.2; shared/DESIGN.md "The spectrum").

    L     = D − W                          D_ii = Σ_j w_ij
    L_sym = I − D^{-1/2} W D^{-1/2}

built with ``torch_geometric.utils.get_laplacian``. An isolated node (d_i = 0) gets no NaN: D^{-1/2} is
taken as 0 there, so its row of L is 0 and its row of L_sym is e_i (PyG's convention: L_sym_ii = 1, i.e. an
isolated node carries the eigenvalue 1 in L_sym and 0 in L).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch_geometric.utils import get_laplacian

NORMALIZATIONS: tuple[str | None, ...] = (None, "sym")


def _check_normalization(normalization: str | None) -> str | None:
    if normalization == "none":
        return None
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be None (L = D − W) or 'sym' (L_sym), got {normalization!r}")
    return normalization


def laplacian(
    edge_index: Tensor,
    edge_weight: Tensor | None,
    num_nodes: int,
    normalization: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The Laplacian as a coalesced sparse COO tensor (n, n) of ``dtype`` (float32 by default).

    Args:
        edge_index: (2, E), both directions of every undirected edge. edge_weight: (E,) ≥ 0, or None (1).
        normalization: None for L = D − W, "sym" for L_sym = I − D^{-1/2} W D^{-1/2}.
    """
    normalization = _check_normalization(normalization)
    w = None if edge_weight is None else edge_weight.to(dtype)  # (E,)
    # L = D − W  |  L_sym = I − D^{-1/2} W D^{-1/2}   (diagonal entries appended as self-loops)
    idx, val = get_laplacian(edge_index, w, normalization=normalization, dtype=dtype, num_nodes=num_nodes)
    return torch.sparse_coo_tensor(idx, val, (num_nodes, num_nodes), check_invariants=False).coalesce()  # (n, n) sparse


def laplacian_dense(
    edge_index: Tensor,
    edge_weight: Tensor | None,
    num_nodes: int,
    normalization: str | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """The same Laplacian as a dense (n, n) tensor (float64 by default), for small n."""
    return laplacian(edge_index, edge_weight, num_nodes, normalization, dtype).to_dense()  # (n, n)


def laplacian_trace(L: Tensor) -> float:
    """tr L = Σ_i λ_i, from the diagonal of a sparse (coalesced) or dense (n, n) L (a host read).

    For L = D − W it is Σ_i d_i; for L_sym the number of nodes with an edge (plus PyG's 1 per isolated node).
    With the k computed eigenvalues it gives the mean of the n − k others, (tr L − Σ_{i≤k} λ_i) / (n − k).
    """
    if L.is_sparse:
        L = L.coalesce()
        idx = L.indices()  # (2, nnz)
        return float(L.values()[idx[0] == idx[1]].double().sum())
    return float(L.diagonal().double().sum())


def spectral_bound(L: Tensor) -> float:
    """Gershgorin bound c = max_i Σ_j |L_ij| ≥ λ_max(L), for a sparse or dense (n, n) L.

    For L = D − W it is 2·max_i d_i; for L_sym it can exceed the exact bound 2 when degrees vary.
    """
    if L.is_sparse:
        L = L.coalesce()
        # c = max_i Σ_j |L_ij|
        rows = torch.zeros(L.size(0), dtype=L.dtype, device=L.device)  # (n,)
        rows.index_add_(0, L.indices()[0], L.values().abs())
    else:
        rows = L.abs().sum(-1)  # (n,)
    return float(rows.max()) if rows.numel() else 0.0
