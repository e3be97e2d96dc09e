"""The k smallest eigenpairs of a graph Laplacian (seed paper §3.2; shared/DESIGN.md "The spectrum").

    L U = U Λ,   Λ = diag(λ_1 ≤ … ≤ λ_k),   UᵀU = I

- n ≤ ``dense_threshold``: dense ``torch.linalg.eigh`` in float64 (exact up to rounding; any orthonormal
  basis of a repeated eigenvalue's eigenspace, e.g. the null space of a disconnected graph).
- above: ``torch.lobpcg`` in float32 on the sparse matrix, warm-started from the previous vectors ``X0``
  (random from a seeded generator otherwise). It is run for the *largest* eigenpairs of the shifted
  matrix M = c·I − L, with c = max_i Σ_j |L_ij| ≥ λ_max (Gershgorin; 2·max degree for L = D − W): M is
  positive semi-definite, its largest eigenvalues c − λ_i are the smallest of L, and torch.lobpcg's
  stopping test ‖r_j‖ / (‖x_j‖ (‖A‖ + |θ_j|)), with ‖A‖ estimated as ‖A X0‖/‖X0‖, is then measured against
  c. Run directly with ``largest=False`` on L, a warm start X0 ≈ null space makes that estimate ≈ 0 and
  the test unreachable (the known weakness of torch.lobpcg at the bottom of a singular PSD spectrum). The
  eigenvalues are then recomputed as Rayleigh quotients λ_j = u_jᵀ L u_j from L itself, not as c − θ_j,
  which would lose the small λ_j to cancellation in float32.
- every result is checked: residual ‖L U − U Λ‖_F / c ≤ ``tol``, ‖UᵀU − I‖_max ≤ ``ortho_tol``, all finite.
  On failure: dense eigh if n ≤ ``fallback_threshold`` ("fallback_dense"), else the previous pairs
  ("kept_previous"); ``EigenResult.method`` and ``.message`` say which and why, for the caller's log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from speclora.spectral.laplacian import spectral_bound

DENSE_THRESHOLD = 2000  # n up to which the dense solver is the first choice (eigh of 2000² ≈ 1 s on 2 cores)
FALLBACK_DENSE_THRESHOLD = 4000  # n up to which a failed LOBPCG falls back to dense eigh (≈ 10 s on 2 cores)
METHODS = ("dense", "lobpcg", "fallback_dense", "kept_previous")


@dataclass
class EigenResult:
    """k smallest eigenpairs. values: (k,) ascending, vectors: (n, k) orthonormal columns, both float32.

    method: "dense" | "lobpcg" | "fallback_dense" | "kept_previous". residual: ‖L U − U Λ‖_F / c (c the
    Gershgorin bound of L). iterations: LOBPCG iterations (0 for dense). message: why a fallback happened.
    """

    values: Tensor
    vectors: Tensor
    method: str
    residual: float
    iterations: int
    message: str = ""


class EigenSolverError(RuntimeError):
    """No usable eigenpairs: every solver failed and there were no previous pairs to keep."""


def check_k(n: int, k: int) -> None:
    """Check that k eigenpairs can be asked of an n-node graph: 1 ≤ k and n ≥ 3k (torch.lobpcg's limit)."""
    if k < 1:
        raise ValueError(f"k (number of eigenpairs) must be >= 1, got k={k}")
    if n < 3 * k:
        raise ValueError(
            f"k={k} eigenpairs need a graph of at least 3k={3 * k} nodes (torch.lobpcg's limit), "
            f"but the graph has n={n} nodes: lower k to at most {n // 3}"
        )


def _residual(L: Tensor, U: Tensor, values: Tensor, c: float) -> float:
    # ‖L U − U Λ‖_F / c
    R = (torch.sparse.mm(L, U) if L.is_sparse else L @ U) - U * values  # (n, k)
    return float(R.norm()) / c


def _rayleigh(L: Tensor, U: Tensor) -> Tensor:
    # λ_j = u_jᵀ L u_j / u_jᵀ u_j
    LU = torch.sparse.mm(L, U) if L.is_sparse else L @ U  # (n, k)
    return (U * LU).sum(0) / (U * U).sum(0)  # (k,)


def _verify(L: Tensor, U: Tensor, values: Tensor, c: float, tol: float, ortho_tol: float) -> tuple[bool, float, str]:
    if not (bool(torch.isfinite(values).all()) and bool(torch.isfinite(U).all())):
        return False, math.nan, "non-finite eigenpairs"
    res = _residual(L, U, values, c)
    # ‖UᵀU − I‖_max
    ortho = float((U.T @ U - torch.eye(U.size(1), dtype=U.dtype, device=U.device)).abs().max())
    if not res <= tol:
        return False, res, f"residual {res:.3g} > tol {tol:.3g}"
    if not ortho <= ortho_tol:
        return False, res, f"orthonormality error {ortho:.3g} > {ortho_tol:.3g}"
    return True, res, ""


def _dense(L: Tensor, k: int) -> tuple[Tensor, Tensor]:
    Ld = (L.to_dense() if L.is_sparse else L).to(torch.float64)  # (n, n)
    # L = U Λ Uᵀ, ascending
    values, vectors = torch.linalg.eigh(Ld)  # (n,), (n, n)
    return values[:k], vectors[:, :k]  # (k,), (n, k)


def _lobpcg(
    L: Tensor, k: int, X0: Tensor | None, c: float, tol: float, max_iter: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, int]:
    n = L.size(0)
    # M = c·I − L  (PSD; its largest eigenpairs are L's smallest)
    if L.is_sparse:
        diag = torch.arange(n, device=L.device).repeat(2, 1)  # (2, n)
        M = torch.sparse_coo_tensor(
            torch.cat([L.indices(), diag], 1), torch.cat([-L.values(), L.values().new_full((n,), c)]), (n, n)
        ).coalesce()  # (n, n) sparse
    else:
        M = c * torch.eye(n, dtype=L.dtype, device=L.device) - L  # (n, n)
    if X0 is None:
        X = torch.randn(n, k, generator=generator, device=L.device, dtype=L.dtype)  # (n, k)
    else:
        X = X0.detach().to(device=L.device, dtype=L.dtype).clone()  # (n, k)
    state = {"iterations": 0}

    def tracker(worker) -> None:  # called once per iteration
        state["iterations"] = int(worker.ivars["istep"])
        # stop as soon as ‖M X − X Θ‖_F / c = ‖L X − X Λ‖_F / c ≤ tol / 2 (margin for the check in L)
        if float(worker.R[:, :k].norm()) / c <= tol / 2:
            worker.bvars["force_stop"] = True

    # torch.lobpcg's own per-column test ‖r_j‖/(‖x_j‖(‖M‖ + θ_j)) ≈ ‖r_j‖/(2c) ≤ tol/(4√k) implies the above
    theta, U = torch.lobpcg(
        M, k=k, X=X, niter=max_iter, tol=tol / (4 * math.sqrt(k)), largest=True, tracker=tracker
    )  # (k,), (n, k)
    values = _rayleigh(L, U)  # (k,)
    order = torch.argsort(values)  # (k,)
    return values[order], U[:, order], state["iterations"]


def smallest_eigenpairs(
    L: Tensor,
    k: int,
    X0: Tensor | None = None,
    *,
    previous_values: Tensor | None = None,
    dense_threshold: int = DENSE_THRESHOLD,
    fallback_threshold: int = FALLBACK_DENSE_THRESHOLD,
    tol: float = 1e-3,
    ortho_tol: float = 1e-3,
    max_iter: int = 200,
    seed: int = 0,
    generator: torch.Generator | None = None,
) -> EigenResult:
    """The k smallest eigenpairs of a symmetric PSD Laplacian L (n, n), sparse COO or dense.

    Args:
        k: number of pairs; 1 ≤ k ≤ n, and n ≥ 3k when LOBPCG is used (``check_k``).
        X0: (n, k) previous eigenvectors: LOBPCG's warm start, and the pairs kept if every solver fails.
        previous_values: (k,) the eigenvalues that went with X0 (kept with them); if None, the kept values
            are X0's Rayleigh quotients under L.
        dense_threshold: n up to which dense eigh (float64) is used. fallback_threshold: n up to which a
            failed LOBPCG falls back to dense eigh.
        tol: bound on ‖L U − U Λ‖_F / c (c = Gershgorin bound of L). ortho_tol: bound on ‖UᵀU − I‖_max.
        max_iter: LOBPCG iterations. seed / generator: the random start when X0 is None (same seed, same
            start on every rank).
    Returns:
        ``EigenResult`` with float32 values (k,) and vectors (n, k), whatever L's dtype.
    Raises:
        ValueError on bad arguments; EigenSolverError if every solver fails and X0 is None.
    """
    if L.dim() != 2 or L.size(0) != L.size(1):
        raise ValueError(f"L must be a square (n, n) matrix, got shape {tuple(L.shape)}")
    n = L.size(0)
    if not 1 <= k <= n:
        raise ValueError(f"k (number of eigenpairs) must be in [1, n={n}], got k={k}")
    if X0 is not None and tuple(X0.shape) != (n, k):
        raise ValueError(f"X0 must have shape (n={n}, k={k}), got {tuple(X0.shape)}")
    if previous_values is not None and previous_values.numel() != k:
        raise ValueError(f"previous_values must have k={k} entries, got {previous_values.numel()}")
    if tol <= 0 or ortho_tol <= 0 or max_iter < 1:
        raise ValueError(f"tol, ortho_tol must be > 0 and max_iter >= 1, got {tol}, {ortho_tol}, {max_iter}")
    # the spectral math runs in float32 (float64 for the dense solve), whatever the input dtype
    L = (L.coalesce() if L.is_sparse else L).to(torch.float32)
    values_of_L = L.values() if L.is_sparse else L
    c = spectral_bound(L) if bool(torch.isfinite(values_of_L).all()) else math.nan
    scale = c if c > 0 else 1.0  # an edgeless graph has L = 0: any orthonormal basis, residual 0

    def keep_previous(reason: str) -> EigenResult:
        if X0 is None:
            raise EigenSolverError(f"eigensolver failed on an n={n} graph ({reason}) and there are no previous pairs")
        U = X0.detach().to(device=L.device, dtype=torch.float32)  # (n, k)
        if previous_values is not None:
            vals = previous_values.detach().to(device=L.device, dtype=torch.float32)  # (k,)
        elif math.isfinite(c):
            vals = _rayleigh(L, U)  # (k,)
        else:
            raise EigenSolverError(f"{reason}; X0 is given but previous_values is not, and L is not finite")
        res = _residual(L, U, vals, scale) if math.isfinite(c) else math.nan
        return EigenResult(vals, U, "kept_previous", res, 0, reason)

    def dense(method: str, reason: str = "") -> EigenResult | None:
        try:
            values, vectors = _dense(L, k)  # (k,), (n, k) float64
        except RuntimeError:
            return None
        ok, res, why = _verify(L.to(torch.float64), vectors, values, scale, tol, ortho_tol)
        if not ok:
            return None
        return EigenResult(values.float(), vectors.float(), method, res, 0, reason)

    if not math.isfinite(c):
        return keep_previous("L has non-finite entries")
    if n <= dense_threshold:
        return dense("dense") or keep_previous("dense eigh failed")
    check_k(n, k)
    if generator is None:
        generator = torch.Generator(device=L.device).manual_seed(seed)
    try:
        values, vectors, iters = _lobpcg(L, k, X0, scale, tol, max_iter, generator)
        ok, res, why = _verify(L, vectors, values, scale, tol, ortho_tol)
    except RuntimeError as err:  # e.g. a Cholesky failure inside torch.lobpcg
        ok, res, why, iters = False, math.nan, f"torch.lobpcg raised {type(err).__name__}: {err}", max_iter
    if ok:
        return EigenResult(values, vectors, "lobpcg", res, iters)
    reason = f"LOBPCG failed after {iters} iterations: {why}"
    if n <= fallback_threshold:
        return dense("fallback_dense", reason) or keep_previous(reason + "; dense eigh failed too")
    return keep_previous(reason)
