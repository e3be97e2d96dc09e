"""Benchmark of the spectral refresh: warm LOBPCG vs cold LOBPCG vs dense eigh vs scipy's eigsh.

    python -m speclora.bench.eigensolver --sizes 1000 10000 100000 --k 32 [--graph random param] [--device cuda]

For each size n, two graphs of the same family (random weights in [0.1, 1]):
  random  Erdős–Rényi-like, n nodes, average degree ≈ 10 (``--degree``);
  param   shaped like the parameter graph (``speclora.spectral.graph``): T tasks × (layers × M modules) slots
          × 2 kinds, square modules, intra + inter-task + inter-layer edges; T = ``--tasks``,
          M = ``--modules``, layers = n / (2·T·M) (rounded), so n is approximate.
Timed, each in the same run and on the same machine:
  cold    ``smallest_eigenpairs`` (LOBPCG path) from a seeded random start, on graph 0;
  warm    the same on graph 1 = graph 0 with every weight scaled by (1 + ``--perturb``·N(0, 1)) (what one
          refresh of the EMA correlations does), started from graph 0's vectors;
  dense   ``smallest_eigenpairs``' own dense path on graph 1 (n ≤ ``--dense-max`` only): float64
          ``torch.linalg.eigh`` with vectors and the solver's checks, what a dense refresh costs in training;
  eigsh   scipy.sparse.linalg.eigsh(which="SA") in float64 on graph 1, cold (n ≤ ``--eigsh-max``).
The printed table has seconds, LOBPCG iterations, residuals ‖LU − UΛ‖_F/c, the orthonormality error
‖UᵀU − I‖_max of the warm solve ("orth") and the ratios cold/warm and eigsh/warm; "err" is
max_i min_j |λ_i(warm) − μ_j| over the reference eigenvalues μ (dense eigh where it ran, else eigsh): how far
each computed λ is from a true eigenvalue. It is not an index-wise comparison because single-vector Lanczos
(eigsh) finds one copy of a repeated eigenvalue (e.g. one 0 for a graph of two components) where a block
method finds all, and because a small residual does not guarantee that the k pairs are exactly the k
smallest: near λ_k, in a clustered spectrum, a neighbour can take a pair's place. A failed solve is a
line of its own ("# cold LOBPCG failed ...") and a dash in the table, never an exception.
Where two or more sizes were solved both densely and by LOBPCG, the size at which they take equally long
(:func:`crossover`) is printed at the end.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
from torch import Tensor
from torch_geometric.utils import to_undirected

from speclora.bench import measure
from speclora.spectral import EigenSolverError, GraphLayout, build_edges, laplacian, smallest_eigenpairs

MODULE = "speclora.bench.eigensolver"


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


def orthonormality(U: Tensor) -> float:
    """‖UᵀU − I‖_max in float64."""
    U = U.double()
    return float((U.T @ U - torch.eye(U.size(1), dtype=U.dtype, device=U.device)).abs().max())


def run(args: argparse.Namespace, emit: Callable[[dict], None] | None = None) -> list[dict[str, object]]:
    """Measure every (graph, size) of ``args``; print a row each, hand ``emit`` a report record each."""
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, device, emit)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, device: torch.device, emit: Callable[[dict], None] | None) -> list[dict]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    print(
        f"# device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"cpus={os.cpu_count()} load1={load[0]:.1f} k={args.k} tol={args.tol} perturb={args.perturb} "
        f"normalization={args.normalization}"
    )
    print(header(), flush=True)
    warm_up(args, device)
    rows: list[dict[str, object]] = []
    for size in args.sizes:  # the small graphs of every family first: a run that is cut short has them
        for graph in args.graph:
            row = measure_one(args, graph, size, device)
            rows.append(row)
            print(format_row(row), flush=True)
            if emit is not None:
                emit(row_record(args, graph, size, row))
    for vs in ("warm", "cold"):
        for graph in args.graph:
            cross = crossover([r for r in rows if r["graph"] == graph], vs)
            if cross is None:
                continue
            print(f"# crossover dense eigh / {vs} LOBPCG on {graph}: {describe_crossover(cross)}", flush=True)
            if emit is not None:
                emit(measure.record("eigensolver crossover", {"graph": graph, "k": args.k, "vs": vs,
                                                              "bound": cross["bound"]},
                                    {"crossover_n": cross["n"]}, measure.command(MODULE, args.argv, graph=[graph])))
    return rows


def warm_up(args: argparse.Namespace, device: torch.device) -> None:
    """One small solve by each path first, so that no timed solve pays for loading kernels or libraries."""
    ei, w, n = param_graph(3 * args.k + 64, args.tasks, args.modules, args.rank, torch.Generator().manual_seed(1))
    n = max(n, 3 * args.k)
    L = laplacian(ei.to(device), w.to(device), n, args.normalization)  # (n, n) sparse
    for dense_threshold in (0, n):
        try:
            smallest_eigenpairs(L, args.k, dense_threshold=dense_threshold, fallback_threshold=0, tol=args.tol,
                                ortho_tol=args.ortho_tol, max_iter=args.max_iter, seed=args.seed)
        except EigenSolverError:
            pass  # a warm-up only: the timed solves report their own failures
    measure.synchronize(device)


def measure_one(args: argparse.Namespace, graph: str, size: int, device: torch.device) -> dict[str, object]:
    """Cold, warm and dense solves of one graph (module docstring); a failure is a row entry, not an exception."""
    g = torch.Generator().manual_seed(args.seed)
    if graph == "random":
        ei, w = random_graph(size, args.degree, g)
        n = size
    else:
        ei, w, n = param_graph(size, args.tasks, args.modules, args.rank, g)
    ei1, w1 = perturb(ei, w, n, args.perturb, g)
    L0 = laplacian(ei.to(device), w.to(device), n, args.normalization)  # (n, n) sparse
    L1 = laplacian(ei1.to(device), w1.to(device), n, args.normalization)  # (n, n) sparse
    opts = dict(dense_threshold=0, fallback_threshold=0, tol=args.tol, ortho_tol=args.ortho_tol, seed=args.seed)
    row: dict[str, object] = {"graph": graph, "n": n, "E": ei.size(1) // 2, "k": args.k, "failures": {}}
    X0, lam = None, None
    try:
        cold, t_cold = timed(partial(smallest_eigenpairs, L0, args.k, max_iter=args.max_iter, **opts), device)
        row.update(cold_s=t_cold, cold_it=cold.iterations, cold_res=cold.residual,
                   cold_orth=orthonormality(cold.vectors))
        X0 = cold.vectors
    except EigenSolverError as err:  # no convergence within --max-iter, or a check failed
        row["failures"]["cold"] = str(err)
        print(f"# cold LOBPCG failed on {graph} n={n}: {err}")
    if X0 is not None:
        warm, t_warm = timed(partial(smallest_eigenpairs, L1, args.k, X0, max_iter=args.max_iter, **opts), device)
        row.update(warm_s=t_warm, warm_it=warm.iterations, warm_res=warm.residual, warm_method=warm.method,
                   warm_orth=orthonormality(warm.vectors))
        if warm.method == "lobpcg":
            lam = warm.values.double().cpu()
        else:  # kept the previous pairs: the refresh failed
            row["failures"]["warm"] = warm.message
            print(f"# warm LOBPCG failed on {graph} n={n}: {warm.message}")
    ref = None
    if n <= args.dense_max:
        # the solver's own dense path (float64 eigh with vectors, checked): what a dense refresh costs
        dense_opts = dict(opts, dense_threshold=n)
        try:
            dense, row["dense_s"] = timed(partial(smallest_eigenpairs, L1, min(n, args.k + 8), **dense_opts),
                                          device)
            ref = dense.values.double().cpu()
        except (EigenSolverError, RuntimeError) as err:  # e.g. out of memory
            row["failures"]["dense"] = f"{type(err).__name__}: {err}"
    if n <= args.eigsh_max:
        S = to_scipy(L1)
        v0 = np.random.default_rng(args.seed).standard_normal(n)  # ARPACK's usual random start
        start = time.perf_counter()
        vals = spla.eigsh(S, k=args.k, which="SA", tol=args.eigsh_tol, v0=v0, return_eigenvectors=False)
        row["eigsh_s"] = time.perf_counter() - start
        if ref is None:
            ref = torch.from_numpy(np.sort(vals))
    if ref is not None and lam is not None:
        # each computed λ_i against the nearest reference eigenvalue
        row["err"] = float((lam[:, None] - ref[None, :]).abs().min(1).values.max())
    return row


FIGURES = ("cold_s", "cold_it", "cold_res", "cold_orth", "warm_s", "warm_it", "warm_res", "warm_orth", "dense_s",
           "eigsh_s", "err")


def row_record(args: argparse.Namespace, graph: str, size: int, row: dict[str, object]) -> dict[str, object]:
    """The report record of one row: its figures and the command that measures this row alone."""
    figures = {name: row.get(name) for name in FIGURES}
    if "cold_s" in row and "warm_s" in row:
        figures["cold/warm"] = row["cold_s"] / row["warm_s"]
    if "dense_s" in row and "warm_s" in row and not row["failures"].get("warm"):
        figures["dense/warm"] = row["dense_s"] / row["warm_s"]
    labels = {"graph": graph, "n": row["n"], "E": row["E"], "k": row["k"]}
    return measure.record("eigensolver scaling", labels, figures,
                          measure.command(MODULE, args.argv, graph=[graph], sizes=[size]), row["failures"])


def crossover(rows: list[dict[str, object]], vs: str = "warm") -> dict[str, object] | None:
    """The size n at which a ``vs`` (warm or cold) LOBPCG solve and the dense solve take equally long.

    Interpolated log-log between the two measured sizes that bracket it: with r(n) = t_dense / t_lobpcg,
    log n* = log n_a + (log n_b − log n_a) · (−log r_a) / (log r_b − log r_a). Where no pair brackets it,
    the nearest measured size is a bound: ``bound`` = "above" (dense faster everywhere, n* > n) or
    "below" (LOBPCG faster everywhere, n* < n). None with fewer than two sizes timed both ways.
    """
    timed_both = sorted((r["n"], r["dense_s"] / r[f"{vs}_s"]) for r in rows
                        if "dense_s" in r and f"{vs}_s" in r and not r["failures"].get(vs))
    if len(timed_both) < 2:
        return None
    for (n_a, r_a), (n_b, r_b) in zip(timed_both, timed_both[1:]):
        if r_a <= 1.0 < r_b or r_a >= 1.0 > r_b:  # the ratio crosses 1 between n_a and n_b
            frac = -math.log(r_a) / (math.log(r_b) - math.log(r_a))
            return {"n": math.exp(math.log(n_a) + frac * (math.log(n_b) - math.log(n_a))), "bound": "interpolated",
                    "between": (n_a, n_b)}
    if timed_both[-1][1] < 1.0:  # dense faster at every size
        return {"n": float(timed_both[-1][0]), "bound": "above", "between": None}
    return {"n": float(timed_both[0][0]), "bound": "below", "between": None}


def describe_crossover(cross: dict[str, object]) -> str:
    if cross["bound"] == "interpolated":
        lo, hi = cross["between"]
        return f"n ≈ {cross['n']:.0f} (between {lo} and {hi}): dense below, LOBPCG above"
    if cross["bound"] == "above":
        return f"dense faster at every size up to n = {cross['n']:.0f}"
    return f"LOBPCG faster at every size from n = {cross['n']:.0f}"


COLUMNS = [
    ("graph", "{:>6}"), ("n", "{:>7}"), ("E", "{:>8}"), ("k", "{:>3}"),
    ("cold_s", "{:>8.3f}"), ("cold_it", "{:>7}"), ("warm_s", "{:>8.3f}"), ("warm_it", "{:>7}"),
    ("warm_method", "{:>7}"), ("warm_res", "{:>8.1e}"), ("warm_orth", "{:>8.1e}"), ("cold/warm", "{:>9.1f}"),
    ("dense_s", "{:>8.3f}"), ("eigsh_s", "{:>8.2f}"), ("eigsh/warm", "{:>10.1f}"), ("err", "{:>8.1e}"),
]


def format_row(row: dict[str, object]) -> str:
    row = dict(row)
    if "warm_s" in row and isinstance(row.get("cold_s"), float) and not math.isnan(row["cold_s"]):
        row["cold/warm"] = row["cold_s"] / row["warm_s"]
    if "warm_s" in row and "eigsh_s" in row:
        row["eigsh/warm"] = row["eigsh_s"] / row["warm_s"]
    if "warm_method" in row:
        row["warm_method"] = "ok" if row["warm_method"] == "lobpcg" else "failed"
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
    p.add_argument("--ortho-tol", type=float, default=1e-3, help="orthonormality tolerance ‖UᵀU − I‖_max")
    p.add_argument("--max-iter", type=int, default=300, help="LOBPCG iterations")
    p.add_argument("--dense-max", type=int, default=5000, help="largest n for dense eigh")
    p.add_argument("--eigsh-max", type=int, default=100000, help="largest n for scipy eigsh")
    p.add_argument("--eigsh-tol", type=float, default=1e-6, help="ARPACK's relative tolerance")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.argv = argv
    try:
        measure.check_device(args.device)
    except ValueError as err:
        p.error(str(err))
    if args.k < 1 or any(3 * args.k > s for s in args.sizes):
        p.error(f"--k must be >= 1 and every size >= 3k = {3 * args.k} (torch.lobpcg's limit)")
    return args


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
