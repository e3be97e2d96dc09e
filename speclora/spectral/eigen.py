"""The k smallest eigenpairs of a graph Laplacian (seed paper §3.2; shared/DESIGN.md "The spectrum").

    L U = U Λ,   Λ = diag(λ_1 ≤ … ≤ λ_k),   UᵀU = I

- n ≤ ``dense_threshold``: dense ``torch.linalg.eigh`` in float64 (exact up to rounding; any orthonormal
  basis of a repeated eigenvalue's eigenspace, e.g. the null space of a disconnected graph).
- above: ``torch.lobpcg(largest=False)`` in float32 on the sparse L (as CSR), warm-started from the
  previous vectors ``X0`` (random from a seeded generator otherwise). A warm start first gets one
  Rayleigh–Ritz step on span(X0) (the step LOBPCG opens with): if that already meets ``tol`` the refresh
  ends there (iterations = 0), at the cost of one product with L.
  torch.lobpcg's weakness at the bottom of a singular PSD spectrum is its stopping test
  ‖r_j‖ / (‖x_j‖ (‖A‖ + |θ_j|)) with ‖A‖ estimated as ‖A X0‖/‖X0‖: for a warm start X0 ≈ null space the
  estimate is ≈ 0 and the test is out of reach. We stop it ourselves instead (a ``tracker`` that sets
  ``force_stop``) on ‖L X − X Λ‖_F / c ≤ tol/2, with Λ the Rayleigh quotients and c = max_i Σ_j |L_ij|
  ≥ λ_max (Gershgorin; 2·max degree for L = D − W). The usual alternative, the largest eigenpairs of the
  shift c·I − L, was measured and rejected: in float32 it stalls near a residual of 1e-5·c (M's entries
  carry c), where L itself reaches about 5e-7·c, at the same iteration counts.
- every result is checked: residual ‖L U − U Λ‖_F / c ≤ ``tol``, ‖UᵀU − I‖_max ≤ ``ortho_tol``, all finite.
  On failure: dense eigh if n ≤ ``fallback_threshold`` ("fallback_dense"), else the previous pairs
  ("kept_previous"); ``EigenResult.method`` and ``.message`` say which and why, for the caller's log.
"""

from __future__ import annotations

import math
import warnings
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


def _csr(L: Tensor) -> Tensor:
    """A sparse COO matrix as CSR: ``torch.matmul(csr, X)`` is about twice as fast as COO's sparse.mm."""
    if not L.is_sparse:
        return L
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return L.to_sparse_csr()  # (n, n) sparse CSR


def _mm(L: Tensor, X: Tensor) -> Tensor:
    return torch.sparse.mm(L, X) if L.is_sparse else torch.matmul(L, X)  # (n, k)


def _residual(L: Tensor, U: Tensor, values: Tensor, c: float) -> float:
    # ‖L U − U Λ‖_F / c
    R = _mm(L, U) - U * values  # (n, k)
    return float(R.norm()) / c


def _rayleigh(L: Tensor, U: Tensor) -> Tensor:
    # λ_j = u_jᵀ L u_j / u_jᵀ u_j
    return (U * _mm(L, U)).sum(0) / (U * U).sum(0)  # (k,)


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


def _rayleigh_ritz(L: Tensor, X: Tensor, c: float) -> tuple[Tensor, Tensor, float]:
    """Best approximations of L's eigenpairs in span(X): the Rayleigh–Ritz step that opens LOBPCG."""
    # X = Q R, QᵀQ = I
    Q = torch.linalg.qr(X).Q  # (n, k)
    LQ = _mm(L, Q)  # (n, k)
    # H = Qᵀ L Q = Z Θ Zᵀ
    H = Q.T @ LQ  # (k, k)
    theta, Z = torch.linalg.eigh((H + H.T) / 2)  # (k,), (k, k) ascending
    # U = Q Z, residual ‖L U − U Θ‖_F / c with L U = (L Q) Z
    U = Q @ Z  # (n, k)
    res = float((LQ @ Z - U * theta).norm()) / c
    return theta, U, res


def _lobpcg(
    L: Tensor, k: int, X0: Tensor | None, c: float, tol: float, max_iter: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, int]:
    """torch.lobpcg(largest=False) on L, stopped by our own residual test. L: (n, n) float32 COO or dense."""
    n = L.size(0)
    Lc = _csr(L)  # (n, n) CSR for the products
    if X0 is None:
        X = torch.randn(n, k, generator=generator, device=L.device, dtype=L.dtype)  # (n, k)
    else:
        # warm start: LOBPCG's first step is a Rayleigh–Ritz on span(X0); done here, it ends the refresh
        # at the cost of one product with L when the previous vectors still meet tol
        theta, X, res = _rayleigh_ritz(Lc, X0.detach().to(device=L.device, dtype=L.dtype), c)  # (k,), (n, k)
        if res <= tol / 2:
            return theta, X, 0
    state = {"iterations": 0}

    def tracker(worker) -> None:  # called once per iteration
        state["iterations"] = int(worker.ivars["istep"])
        X, R = worker.X[:, :k], worker.R[:, :k]  # (n, k), (n, k): R = L X − X Θ
        # residual at the Rayleigh quotients λ_j = x_jᵀ L x_j: r*_j = r_j − x_j (x_jᵀ r_j)/‖x_j‖², so
        # ‖r*_j‖² = ‖r_j‖² − (x_jᵀ r_j)²/‖x_j‖²  (Θ of soft-locked columns may lag behind X)
        rr = (R * R).sum(0) - (X * R).sum(0).pow(2) / (X * X).sum(0)  # (k,)
        # stop as soon as ‖L X − X Λ‖_F / c ≤ tol / 2 (margin for the final check)
        if float(rr.clamp(min=0).sum().sqrt()) / c <= tol / 2:
            worker.bvars["force_stop"] = True

    # torch.lobpcg's own test ‖r_j‖/(‖x_j‖(‖L X0‖/‖X0‖ + |θ_j|)) ≤ tol/(4√k) now only drives soft locking
    _, U = torch.lobpcg(
        Lc, k=k, X=X, niter=max_iter, tol=tol / (4 * math.sqrt(k)), largest=False, tracker=tracker
    )  # (k,), (n, k)
    # λ_j = u_jᵀ L u_j
    values = _rayleigh(Lc, U)  # (k,)
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
        if not bool(torch.isfinite(U).all()):
            raise EigenSolverError(f"eigensolver failed on an n={n} graph ({reason}) and X0 is not finite")
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
