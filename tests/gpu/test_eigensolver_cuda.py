"""The eigensolver on a CUDA device at 10⁵ nodes: cold and warm LOBPCG on the parameter-shaped and random graphs
of ``speclora.bench.eigensolver`` (k = 32, a 5 % weight change between the two solves). Timings are printed, not
asserted (``python -m speclora.bench.eigensolver --device cuda`` measures them)."""

from __future__ import annotations

import time

import pytest
import torch

from speclora.bench.eigensolver import param_graph, perturb, random_graph
from speclora.spectral import laplacian, smallest_eigenpairs
from tests.gpu.marks import GPU

pytestmark = GPU


def _timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


@pytest.mark.parametrize("graph", ["param", "random"])
def test_a_1e5_node_graph_solves_cold_and_warm_on_cuda(graph):
    g = torch.Generator().manual_seed(0)
    if graph == "param":
        ei, w, n = param_graph(100_000, 8, 4, 8, g)
    else:
        n = 100_000
        ei, w = random_graph(n, 10.0, g)
    ei1, w1 = perturb(ei, w, n, 0.05, g)
    device = torch.device("cuda")
    L0, L1 = laplacian(ei.to(device), w.to(device), n), laplacian(ei1.to(device), w1.to(device), n)
    # no fallback, no previous pairs: a failed cold solve raises EigenSolverError
    opts = dict(solver="lobpcg", fallback_threshold=0, max_iter=300)
    cold, t_cold = _timed(lambda: smallest_eigenpairs(L0, 32, **opts))
    warm, t_warm = _timed(lambda: smallest_eigenpairs(L1, 32, cold.vectors, **opts))
    print(f"{graph} n={n}: cold {t_cold:.3f} s ({cold.iterations} it), warm {t_warm:.3f} s ({warm.iterations} it)")
    for result in (cold, warm):
        assert result.method == "lobpcg", result.message
        assert result.vectors.is_cuda and result.values.is_cuda
        assert result.residual <= 1e-3 and result.ortho_error < 1e-5
    assert warm.iterations < cold.iterations
    if graph == "param":
        assert warm.iterations <= 5  # 2 on the CPU (docs/method.md)
