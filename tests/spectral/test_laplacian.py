"""Laplacians and their exact spectra on hand-sized graphs (path P3, cycle C_n, complete K_n)."""

from __future__ import annotations

import math

import pytest
import torch

from speclora.spectral import laplacian, laplacian_dense, smallest_eigenpairs, spectral_bound
from tests.spectral.graphs import complete, cycle, path, star, undirected


def eigvals(ei, w, n, normalization=None):
    return torch.linalg.eigvalsh(laplacian_dense(ei, w, n, normalization))


def test_path_p3_exact():
    ei, w = path(3)
    assert torch.allclose(eigvals(ei, w, 3), torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64), atol=1e-12)
    # L_sym of P3: degrees (1, 2, 1) → eigenvalues 0, 1, 2
    assert torch.allclose(eigvals(ei, w, 3, "sym"), torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), atol=1e-12)


def test_path_p3_matrix():
    ei, w = path(3)
    expected = torch.tensor([[1.0, -1, 0], [-1, 2, -1], [0, -1, 1]], dtype=torch.float64)
    assert torch.equal(laplacian_dense(ei, w, 3), expected)
    L = laplacian(ei, w, 3)
    assert L.is_sparse and L.dtype == torch.float32 and L.shape == (3, 3)


@pytest.mark.parametrize("n", [5, 6, 8])
def test_cycle_exact(n):
    ei, w = cycle(n)
    expected = sorted(2 - 2 * math.cos(2 * math.pi * j / n) for j in range(n))
    assert torch.allclose(eigvals(ei, w, n), torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    # C_n is 2-regular: L_sym = L / 2
    assert torch.allclose(eigvals(ei, w, n, "sym"), torch.tensor(expected, dtype=torch.float64) / 2, atol=1e-12)


@pytest.mark.parametrize("n", [3, 5])
def test_complete_exact(n):
    ei, w = complete(n)
    expected = torch.tensor([0.0] + [float(n)] * (n - 1), dtype=torch.float64)
    assert torch.allclose(eigvals(ei, w, n), expected, atol=1e-12)
    expected_sym = torch.tensor([0.0] + [n / (n - 1)] * (n - 1), dtype=torch.float64)
    assert torch.allclose(eigvals(ei, w, n, "sym"), expected_sym, atol=1e-12)


def test_weighted_matches_d_minus_w():
    ei, w = undirected([(0, 1), (1, 2), (0, 2)], 3, [1.0, 2.0, 4.0])
    W = torch.zeros(3, 3, dtype=torch.float64)
    W[ei[0], ei[1]] = w.double()
    D = torch.diag(W.sum(1))
    assert torch.allclose(laplacian_dense(ei, w, 3), D - W)
    d = W.sum(1).rsqrt()
    assert torch.allclose(laplacian_dense(ei, w, 3, "sym"), torch.eye(3, dtype=torch.float64) - d[:, None] * W * d)


def test_isolated_node_no_nan():
    ei, w = undirected([(0, 1), (1, 2)], 4)  # node 3 isolated
    L = laplacian_dense(ei, w, 4)
    Ls = laplacian_dense(ei, w, 4, "sym")
    assert torch.isfinite(L).all() and torch.isfinite(Ls).all()
    assert torch.equal(L[3], torch.zeros(4, dtype=torch.float64))
    assert Ls[3, 3] == 1.0 and Ls[3, :3].abs().sum() == 0
    res = smallest_eigenpairs(laplacian(ei, w, 4), 2)
    assert torch.allclose(res.values, torch.zeros(2), atol=1e-6)  # two components: P3 and the isolated node


def test_spectral_bound_is_two_max_degree():
    ei, w = star(4)
    assert spectral_bound(laplacian(ei, w, 5)) == 8.0  # center degree 4
    assert spectral_bound(laplacian_dense(ei, w, 5)) == 8.0


def test_bad_normalization():
    ei, w = path(3)
    with pytest.raises(ValueError, match="normalization"):
        laplacian(ei, w, 3, "rw2")
