"""Benchmark of the spectral refresh: warm LOBPCG vs cold LOBPCG vs dense eigh vs scipy's eigsh.

    python -m speclora.bench.eigensolver --sizes 1000 10000 100000 --k 32 [--graph random param]

For each size n, two graphs of the same family (random weights in [0.1, 1]):
  random  Erdős–Rényi-like, n nodes, average degree ≈ 10 (``--degree``);
  param   shaped like the parameter graph (``speclora.spectral.graph``): T tasks × (layers × M modules) slots
          × 2 kinds, square modules, intra + inter-task + inter-layer edges; T = ``--tasks``,
          M = ``--modules``, layers = n / (2·T·M) (rounded), so n is approximate.
Timed, each in the same run and on the same machine:
  cold    ``smallest_eigenpairs`` (LOBPCG path) from a seeded random start, on graph 0;
  warm    the same on graph 1 = graph 0 with every weight scaled by (1 + ``--perturb``·N(0, 1)) (what one
          refresh of the EMA correlations does), started from graph 0's vectors;
  dense   torch.linalg.eigh in float64 (n ≤ ``--dense-max`` only), on graph 1;
  eigsh   scipy.sparse.linalg.eigsh(which="SA") in float64 on graph 1, cold (n ≤ ``--eigsh-max``).
The printed table has seconds, LOBPCG iterations, residuals ‖LU − UΛ‖_F/c and the ratios cold/warm and
eigsh/warm; "err" is max_i min_j |λ_i(warm) − μ_j| over the reference eigenvalues μ (dense eigh where it
ran, else eigsh): how far each computed λ is from a true eigenvalue. It is not an index-wise comparison
because single-vector Lanczos (eigsh) finds one copy of a repeated eigenvalue (e.g. one 0 for a graph of
two components) where a block method finds all, and because a small residual does not guarantee that
the k pairs are exactly the k smallest: near λ_k, in a clustered spectrum, a neighbour can take a pair's
place.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
from torch import Tensor
from torch_geometric.utils import to_undirected

from speclora.spectral import EigenSolverError, GraphLayout, build_edges, laplacian, smallest_eigenpairs


def random_graph(n: int, degree: float, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """≈ n·degree/2 uniform random pairs (both directions), weights in [0.1, 1]."""
    m = int(n * degree / 2)
    src = torch.randint(0, n, (m,), generator=g)  # (m,)
    dst = torch.randint(0, n, (m,), generator=g)  # (m,)
    keep = src != dst
    w = 0.1 + 0.9 * torch.rand(int(keep.sum()), generator=g)  # (m',)
    return to_undirected(torch.stack([src[keep], dst[keep]]), w, num_nodes=n, reduce="max")


def param_graph(n: int, tasks: int, modules: int, rank: int, g: torch.Generator) -> tuple[Tensor, Tensor, int]:
    """The parameter graph of T tasks and ≈ n/(2T) square slots (layers × modules), random weights."""
    layers = max(1, round(n / (2 * tasks * modules)))
    slots = [(layer, f"m{m}", 64, 64, rank) for layer in range(layers) for m in range(modules)]
    layout = GraphLayout(tasks, slots)
    edge_index, _ = build_edges(layout)  # (2, E)
    upper = edge_index[0] < edge_index[1]
    w = 0.1 + 0.9 * torch.rand(int(upper.sum()), generator=g)  # (E/2,)
    ei, w = to_undirected(edge_index[:, upper], w, num_nodes=layout.num_nodes)
    return ei, w, layout.num_nodes


def perturb(edge_index: Tensor, w: Tensor, n: int, scale: float, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """w_ij ← w_ij (1 + scale·ξ_ij), ξ ~ N(0, 1), symmetric, clamped at 0.01."""
    upper = edge_index[0] < edge_index[1]
    w1 = (w[upper] * (1 + scale * torch.randn(int(upper.sum()), generator=g))).clamp(min=0.01)  # (E/2,)
    return to_undirected(edge_index[:, upper], w1, num_nodes=n)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def to_scipy(L: Tensor) -> sp.csr_matrix:
    L = L.coalesce().cpu()
    idx, val = L.indices().numpy(), L.values().double().numpy()
    return sp.csr_matrix((val, (idx[0], idx[1])), shape=tuple(L.shape))


def run(args: argparse.Namespace) -> list[dict[str, object]]:
    device = torch.device(args.device)
    rows: list[dict[str, object]] = []
    for graph in args.graph:
        for size in args.sizes:
            g = torch.Generator().manual_seed(args.seed)
            if graph == "random":
                ei, w = random_graph(size, args.degree, g)
                n = size
            else:
                ei, w, n = param_graph(size, args.tasks, args.modules, args.rank, g)
            ei1, w1 = perturb(ei, w, n, args.perturb, g)
            L0 = laplacian(ei.to(device), w.to(device), n, args.normalization)  # (n, n) sparse
            L1 = laplacian(ei1.to(device), w1.to(device), n, args.normalization)  # (n, n) sparse
            opts = dict(dense_threshold=0, fallback_threshold=0, tol=args.tol, seed=args.seed)
            row: dict[str, object] = {"graph": graph, "n": n, "E": ei.size(1) // 2, "k": args.k}
            try:
                cold, t_cold = timed(partial(smallest_eigenpairs, L0, args.k, max_iter=args.max_iter, **opts), device)
                row.update(cold_s=t_cold, cold_it=cold.iterations, cold_res=cold.residual, cold_ok=True)
                X0 = cold.vectors
            except EigenSolverError as err:  # not converged within --max-iter
                row.update(cold_s=math.nan, cold_it=args.max_iter, cold_res=math.nan, cold_ok=False)
                print(f"# cold LOBPCG failed on {graph} n={n}: {err}")
                X0 = None
            if X0 is not None:
                warm, t_warm = timed(partial(smallest_eigenpairs, L1, args.k, X0, max_iter=args.max_iter, **opts), device)
                row.update(warm_s=t_warm, warm_it=warm.iterations, warm_res=warm.residual, warm_method=warm.method)
                lam = warm.values.double().cpu()
            ref = None
            if n <= args.dense_max:
                dense, row["dense_s"] = timed(partial(torch.linalg.eigvalsh, L1.to_dense().double()), device)
                ref = dense[: args.k + 8].cpu()
            if n <= args.eigsh_max:
                S = to_scipy(L1)
                v0 = np.random.default_rng(args.seed).standard_normal(n)  # ARPACK's usual random start
                start = time.perf_counter()
                vals = spla.eigsh(S, k=args.k, which="SA", tol=args.eigsh_tol, v0=v0, return_eigenvectors=False)
                row["eigsh_s"] = time.perf_counter() - start
                if ref is None:
                    ref = torch.from_numpy(np.sort(vals))
            if ref is not None and X0 is not None:
                # each computed λ_i against the nearest reference eigenvalue
                row["err"] = float((lam[:, None] - ref[None, :]).abs().min(1).values.max())
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


COLUMNS = [
    ("graph", "{:>6}"), ("n", "{:>7}"), ("E", "{:>8}"), ("k", "{:>3}"),
    ("cold_s", "{:>8.3f}"), ("cold_it", "{:>7}"), ("warm_s", "{:>8.3f}"), ("warm_it", "{:>7}"),
    ("warm_method", "{:>7}"), ("warm_res", "{:>8.1e}"), ("cold/warm", "{:>9.1f}"), ("dense_s", "{:>8.2f}"),
    ("eigsh_s", "{:>8.2f}"), ("eigsh/warm", "{:>10.1f}"), ("err", "{:>8.1e}"),
]


def format_row(row: dict[str, object]) -> str:
    row = dict(row)
    if "warm_s" in row and isinstance(row.get("cold_s"), float) and not math.isnan(row["cold_s"]):
        row["cold/warm"] = row["cold_s"] / row["warm_s"]
    if "warm_s" in row and "eigsh_s" in row:
        row["eigsh/warm"] = row["eigsh_s"] / row["warm_s"]
    if row.get("warm_method") == "lobpcg":
        row["warm_method"] = "ok"
    cells = []
    for name, fmt in COLUMNS:
        width = int("".join(ch for ch in fmt.split(":")[1].split(".")[0] if ch.isdigit()))
        value = row.get(name)
        cells.append(fmt.format(value) if value is not None else "-".rjust(width))
    return " ".join(cells)


def header() -> str:
    widths = [int("".join(ch for ch in fmt.split(":")[1].split(".")[0] if ch.isdigit())) for _, fmt in COLUMNS]
    return " ".join(name.rjust(w) for (name, _), w in zip(COLUMNS, widths))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000], help="graph sizes n")
    p.add_argument("--k", type=int, default=32, help="eigenpairs per solve")
    p.add_argument("--graph", nargs="+", choices=["random", "param"], default=["random", "param"])
    p.add_argument("--degree", type=float, default=10.0, help="average degree of the random graph")
    p.add_argument("--tasks", type=int, default=8, help="T of the parameter-shaped graph")
    p.add_argument("--modules", type=int, default=4, help="M of the parameter-shaped graph")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r of the parameter-shaped graph")
    p.add_argument("--normalization", choices=["none", "sym"], default="none")
    p.add_argument("--perturb", type=float, default=0.05, help="relative weight change between the two graphs")
    p.add_argument("--tol", type=float, default=1e-3, help="residual tolerance ‖LU − UΛ‖_F / c")
    p.add_argument("--max-iter", type=int, default=300, help="LOBPCG iterations")
    p.add_argument("--dense-max", type=int, default=5000, help="largest n for dense eigh")
    p.add_argument("--eigsh-max", type=int, default=100000, help="largest n for scipy eigsh")
    p.add_argument("--eigsh-tol", type=float, default=1e-6, help="ARPACK's relative tolerance")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.k < 1 or any(3 * args.k > s for s in args.sizes):
        p.error(f"--k must be >= 1 and every size >= 3k = {3 * args.k} (torch.lobpcg's limit)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    print(
        f"# device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"cpus={os.cpu_count()} load1={load[0]:.1f} k={args.k} tol={args.tol} perturb={args.perturb} "
        f"normalization={args.normalization}"
    )
    print(header(), flush=True)
    run(args)


if __name__ == "__main__":
    main()
