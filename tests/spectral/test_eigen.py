"""k smallest eigenpairs: dense path, LOBPCG (cold and warm) against exact spectra, and the fallbacks."""

from __future__ import annotations

import math

import pytest
import torch

from speclora.spectral import (
    EigenSolverError,
    check_k,
    laplacian,
    laplacian_dense,
    smallest_eigenpairs,
    spectral_bound,
)
from tests.spectral.graphs import cycle, path, undirected


def _random_connected(n: int, extra: int, g: torch.Generator):
    """A ring plus ``extra`` random chords, random weights in [0.5, 1.5]."""
    pairs = [(i, (i + 1) % n) for i in range(n)]
    a = torch.randint(0, n, (extra,), generator=g)
    b = torch.randint(0, n, (extra,), generator=g)
    pairs += [(int(i), int(j)) for i, j in zip(a, b) if i != j]
    w = (0.5 + torch.rand(len(pairs), generator=g)).tolist()
    ei, w = undirected(pairs, n, w)
    return ei, w


def product_graph(n1: int = 60, n2: int = 50, seed: int = 0):
    """Cartesian product G1 □ G2 (n1·n2 nodes): L = L1 ⊗ I + I ⊗ L2, spectrum {λ_i + μ_a}, known exactly."""
    g = torch.Generator().manual_seed(seed)
    ei1, w1 = _random_connected(n1, 2 * n1, g)
    ei2, w2 = _random_connected(n2, 2 * n2, g)
    # node (i, a) ↦ i·n2 + a
    a = torch.arange(n2)
    src1 = (ei1[0][:, None] * n2 + a).reshape(-1)
    dst1 = (ei1[1][:, None] * n2 + a).reshape(-1)
    i = torch.arange(n1)
    src2 = (i[:, None] * n2 + ei2[0]).reshape(-1)
    dst2 = (i[:, None] * n2 + ei2[1]).reshape(-1)
    ei = torch.stack([torch.cat([src1, src2]), torch.cat([dst1, dst2])])
    w = torch.cat([w1.repeat_interleave(n2), w2.repeat(n1)])
    lam1 = torch.linalg.eigvalsh(laplacian_dense(ei1, w1, n1))
    lam2 = torch.linalg.eigvalsh(laplacian_dense(ei2, w2, n2))
    spectrum = (lam1[:, None] + lam2[None, :]).reshape(-1).sort().values
    return laplacian(ei, w, n1 * n2), spectrum


@pytest.fixture(scope="module")
def product():
    return product_graph()


@pytest.fixture(scope="module")
def cold(product):
    L, _ = product
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    res = smallest_eigenpairs(L, 8, dense_threshold=0, tol=1e-4, max_iter=500)
    torch.set_num_threads(threads)
    return res


def test_dense_exact_path_and_cycle():
    ei, w = path(3)
    res = smallest_eigenpairs(laplacian(ei, w, 3), 3)
    assert res.method == "dense" and res.iterations == 0
    assert res.values.dtype == torch.float32 and res.vectors.shape == (3, 3)
    assert torch.allclose(res.values, torch.tensor([0.0, 1.0, 3.0]), atol=1e-6)
    ei, w = cycle(8)
    res = smallest_eigenpairs(laplacian(ei, w, 8, "sym"), 3)
    expected = torch.tensor([0.0, 1 - math.cos(2 * math.pi / 8), 1 - math.cos(2 * math.pi / 8)])
    assert torch.allclose(res.values, expected, atol=1e-6)
    assert res.residual < 1e-6


def test_dense_whole_spectrum_returns_the_rest():
    ei, w = cycle(8)
    L = laplacian(ei, w, 8, "sym")
    res = smallest_eigenpairs(L, 3, whole=True)
    assert res.rest_values.shape == (5,) and res.rest_vectors.shape == (8, 5)
    every = torch.cat([res.values, res.rest_values])
    assert torch.allclose(every, torch.linalg.eigvalsh(L.to_dense()), atol=1e-6)
    U = torch.cat([res.vectors, res.rest_vectors], dim=1).double()  # (8, 8)
    assert torch.allclose(U.T @ U, torch.eye(8, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(U @ torch.diag(every.double()) @ U.T, L.to_dense().double(), atol=1e-6)
    assert smallest_eigenpairs(L, 3).rest_values is None  # only when asked
    # LOBPCG knows k pairs only; its dense fallback returns the rest when asked
    ei, w = cycle(60)
    assert smallest_eigenpairs(laplacian(ei, w, 60), 4, dense_threshold=0, whole=True).rest_values is None
    fell = smallest_eigenpairs(laplacian(ei, w, 60), 4, dense_threshold=0, tol=1e-6, max_iter=1, whole=True)
    assert fell.method == "fallback_dense" and fell.rest_values.shape == (56,)


def test_lobpcg_cold_matches_exact_spectrum(product, cold):
    L, spectrum = product
    k = 8
    assert spectrum[k] - spectrum[k - 1] > 1e-2  # the k-dimensional subspace is well separated
    assert cold.method == "lobpcg", cold.message
    assert torch.allclose(cold.values.double(), spectrum[:k], atol=1e-4)
    assert torch.allclose(cold.vectors.T @ cold.vectors, torch.eye(k), atol=1e-4)
    assert cold.residual <= 1e-4


def test_lobpcg_warm_matches_exact_spectrum(product, cold):
    L, spectrum = product
    k = 8
    # warm: previous vectors, slightly perturbed (as after one refresh)
    g = torch.Generator().manual_seed(1)
    X0 = cold.vectors + 1e-3 * torch.randn(cold.vectors.shape, generator=g)
    warm = smallest_eigenpairs(L, k, X0, dense_threshold=0, tol=1e-4, max_iter=500)
    assert warm.method == "lobpcg", warm.message
    assert warm.iterations < cold.iterations
    assert torch.allclose(warm.values.double(), spectrum[:k], atol=1e-4)
    # same subspace: ‖P_cold − P_warm‖ small
    P_cold = cold.vectors @ cold.vectors.T
    P_warm = warm.vectors @ warm.vectors.T
    assert (P_cold - P_warm).norm() < 1e-2


def test_warm_start_exact_previous_needs_no_iteration(product, cold):
    L, spectrum = product
    again = smallest_eigenpairs(L, 8, cold.vectors, dense_threshold=0, tol=1e-4)
    assert again.method == "lobpcg" and again.iterations == 0
    assert torch.allclose(again.values.double(), spectrum[:8], atol=1e-4)


def test_check_k_names_k_and_n():
    check_k(30, 10)
    with pytest.raises(ValueError, match=r"k=4.*n=10"):
        check_k(10, 4)
    with pytest.raises(ValueError, match="k=0"):
        check_k(10, 0)
    ei, w = cycle(10)
    with pytest.raises(ValueError, match=r"k=4.*n=10"):
        smallest_eigenpairs(laplacian(ei, w, 10), 4, dense_threshold=0)
    with pytest.raises(ValueError, match="k"):
        smallest_eigenpairs(laplacian(ei, w, 10), 11)


def test_disconnected_graph_null_space():
    # 6 disjoint random graphs of 100 nodes: 6 zero eigenvalues, through LOBPCG (n = 600 ≥ 3k)
    g = torch.Generator().manual_seed(0)
    eis, ws = [], []
    for c in range(6):
        ei, w = _random_connected(100, 100, g)
        eis.append(ei + 100 * c)
        ws.append(w)
    L = laplacian(torch.cat(eis, 1), torch.cat(ws), 600)
    for dense_threshold in (0, 1000):
        res = smallest_eigenpairs(L, 6, dense_threshold=dense_threshold, tol=1e-5, max_iter=500)
        assert res.method == ("lobpcg" if dense_threshold == 0 else "dense"), res.message
        assert res.values.abs().max() < 1e-4
        assert torch.allclose(res.vectors.T @ res.vectors, torch.eye(6), atol=1e-4)
        # each vector lies in the null space: constant on every component
        blocks = res.vectors.view(6, 100, 6)
        assert (blocks - blocks.mean(1, keepdim=True)).abs().max() < 1e-3


def test_nan_in_laplacian_keeps_previous():
    ei, w = cycle(30)
    L = laplacian(ei, w, 30)
    prev = smallest_eigenpairs(L, 3)
    bad = laplacian(ei, torch.where(torch.arange(w.numel()) == 0, torch.nan, w), 30)
    res = smallest_eigenpairs(bad, 3, prev.vectors, previous_values=prev.values)
    assert res.method == "kept_previous" and "non-finite" in res.message
    assert torch.equal(res.values, prev.values) and torch.equal(res.vectors, prev.vectors)
    with pytest.raises(EigenSolverError):
        smallest_eigenpairs(bad, 3)


def test_lobpcg_failure_falls_back_to_dense():
    ei, w = cycle(60)
    L = laplacian(ei, w, 60)
    res = smallest_eigenpairs(L, 4, dense_threshold=0, tol=1e-6, max_iter=1)
    assert res.method == "fallback_dense" and "LOBPCG failed" in res.message
    expected = sorted(2 - 2 * math.cos(2 * math.pi * j / 60) for j in range(60))[:4]
    assert torch.allclose(res.values, torch.tensor(expected), atol=1e-6)


def test_lobpcg_failure_above_fallback_keeps_previous():
    ei, w = cycle(60)
    L = laplacian(ei, w, 60)
    prev = smallest_eigenpairs(L, 4)
    X0 = torch.linalg.qr(torch.randn(60, 4, generator=torch.Generator().manual_seed(0))).Q
    res = smallest_eigenpairs(L, 4, X0, dense_threshold=0, fallback_threshold=0, tol=1e-6, max_iter=1)
    assert res.method == "kept_previous" and torch.equal(res.vectors, X0)
    # without previous_values the kept values are X0's Rayleigh quotients
    assert torch.allclose(res.values, (X0 * (L @ X0)).sum(0), atol=1e-5)
    assert not torch.allclose(res.values, prev.values)


def test_float64_and_float16_inputs_give_float32():
    ei, w = path(3)
    for dtype in (torch.float64, torch.float16):
        res = smallest_eigenpairs(laplacian(ei, w, 3, dtype=dtype), 2)
        assert res.values.dtype == torch.float32 and res.vectors.dtype == torch.float32


def test_seeded_cold_start_is_reproducible():
    L, _ = product_graph(30, 20)
    a = smallest_eigenpairs(L, 4, dense_threshold=0, tol=1e-4, max_iter=500, seed=3)
    b = smallest_eigenpairs(L, 4, dense_threshold=0, tol=1e-4, max_iter=500, seed=3)
    assert torch.equal(a.vectors, b.vectors) and torch.equal(a.values, b.values)


def test_final_orthonormalisation_absorbs_float32_drift(product, monkeypatch):
    # LOBPCG's iterations in float32 leave a basis of the right span that is not quite orthonormal (1.3e-3
    # measured on a GPU after 238 iterations, > ortho_tol): the result must be the orthonormal Ritz basis of
    # that span, not a failure (here with no fallback and no previous pairs: a failure would raise)
    import speclora.spectral.eigen as eigen

    L, spectrum = product
    real = torch.lobpcg

    def drifting(*args, **kwargs):
        values, X = real(*args, **kwargs)  # (k,), (n, k)
        k = X.size(1)
        mix = torch.eye(k) + 3e-3 * torch.randn(k, k, generator=torch.Generator().manual_seed(0))  # (k, k)
        return values, X @ mix  # same span, ‖XᵀX − I‖_max ≈ 6e-3

    monkeypatch.setattr(eigen.torch, "lobpcg", drifting)
    res = smallest_eigenpairs(L, 8, dense_threshold=0, fallback_threshold=0, tol=1e-4, max_iter=500)
    assert res.method == "lobpcg", res.message
    assert res.ortho_error < 1e-5
    assert torch.allclose(res.values.double(), spectrum[:8], atol=1e-4)
    assert bool((res.values[1:] >= res.values[:-1]).all())


def test_rayleigh_ritz_orthonormalises_any_basis_of_the_span(product, cold):
    from speclora.spectral.eigen import _csr, _rayleigh_ritz

    L, spectrum = product
    c = spectral_bound(L)
    g = torch.Generator().manual_seed(0)
    for scale in (1e-2, 10.0):  # mildly skewed (Cholesky QR) and badly conditioned (Householder QR)
        mix = torch.eye(8) + scale * torch.randn(8, 8, generator=g)  # (8, 8)
        theta, U, LU = _rayleigh_ritz(_csr(L), cold.vectors @ mix)
        assert (U.double().T @ U.double() - torch.eye(8, dtype=torch.float64)).abs().max() < 1e-5, scale
        assert torch.allclose(theta.double(), spectrum[:8], atol=1e-4)
        assert torch.allclose(LU, L @ U, atol=1e-5)
        assert (LU - U * theta).norm() / c <= 1.01 * cold.residual  # the span's Ritz pairs: as good as cold's


def test_solver_choice():
    from speclora.spectral.eigen import DENSE_THRESHOLDS, dense_threshold_for

    assert dense_threshold_for("cpu") == DENSE_THRESHOLDS["cpu"] == 2000
    assert dense_threshold_for(torch.device("cuda", 1)) == DENSE_THRESHOLDS["cuda"]
    assert dense_threshold_for("meta") == DENSE_THRESHOLDS["cpu"]  # other device types: the CPU's
    L = laplacian(*cycle(60), 60)
    assert smallest_eigenpairs(L, 4).method == "dense"  # auto: 60 nodes are below the CPU crossover
    lob = smallest_eigenpairs(L, 4, solver="lobpcg", tol=1e-5, max_iter=500)
    assert lob.method == "lobpcg" and lob.ortho_error < 1e-5
    assert smallest_eigenpairs(L, 4, dense_threshold=0, solver="dense").method == "dense"
    with pytest.raises(ValueError, match=r"solver='eigsh'.*auto, dense, lobpcg"):
        smallest_eigenpairs(L, 4, solver="eigsh")
    with pytest.raises(ValueError, match=r"k=30.*n=60"):
        smallest_eigenpairs(L, 30, solver="lobpcg")


def test_ieee_float32_restores_the_process_precision():
    from speclora.spectral.devices import ieee_float32

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # TF32 through the legacy API, as Lightning suggests
        with ieee_float32():
            assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cuda.matmul.allow_tf32  # readable: no mix of the legacy and new APIs
    finally:
        torch.set_float32_matmul_precision(before)
    assert not torch.backends.cuda.matmul.allow_tf32
