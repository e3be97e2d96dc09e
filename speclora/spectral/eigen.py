"""The k smallest eigenpairs of a graph Laplacian (seed paper §3.2; shared/DESIGN.md "The spectrum").

    L U = U Λ,   Λ = diag(λ_1 ≤ … ≤ λ_k),   UᵀU = I

Two solvers, chosen by ``solver`` (``auto`` | ``dense`` | ``lobpcg``); ``auto`` takes dense eigh for
n ≤ ``dense_threshold``, whose default is the crossover of L's device type (``DENSE_THRESHOLDS``):
- dense: ``torch.linalg.eigh`` in float64 (exact up to rounding; any orthonormal basis of a repeated
  eigenvalue's eigenspace, e.g. the null space of a disconnected graph).
- lobpcg: ``torch.lobpcg(largest=False)`` in float32 on the sparse L (as CSR), warm-started from the
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
  After the iterations, one more Rayleigh–Ritz step on span(X), with the k×k algebra in float64, makes the
  basis orthonormal: over a few hundred float32 iterations X drifts from orthonormality (measured on a GPU:
  ‖XᵀX − I‖_max = 1.3e-3 after 238 iterations at n = 10⁵, a healthy spectrum that then failed the check),
  while the subspace it spans is what LOBPCG converged.
- every result is checked: residual ‖L U − U Λ‖_F / c ≤ ``tol``, ‖UᵀU − I‖_max ≤ ``ortho_tol`` (in
  float64), all finite. On failure: dense eigh if n ≤ ``fallback_threshold`` ("fallback_dense"), else the
  previous pairs ("kept_previous"); ``EigenResult.method`` and ``.message`` say which and why, for the
  caller's log.
The whole solve runs in IEEE float32/float64 whatever the process's TF32 setting (a TF32 product has a
10-bit mantissa: it would put 1e-3 errors in the orthonormality check itself).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from speclora.spectral.devices import ieee_float32
from speclora.spectral.laplacian import spectral_bound

DENSE_THRESHOLD = 2000  # CPU: n up to which the dense solver is the first choice (eigh of 2000² ≈ 1 s on 2 cores)
# n up to which ``solver="auto"`` takes dense eigh, per device type (other types: the CPU value).
# cpu: the earlier default (eigh of 2000² ≈ 1 s on the project's 2-core CPU). cuda: provisional, NOT measured
# (no GPU was at hand); dense eigh on a GPU stays fast to a few thousand nodes. Measure it on the device with
#   python -m speclora.bench.eigensolver --device cuda --sizes 1000 2000 4000 8000 --dense-max 8000
# (the crossover is where dense_s meets warm_s) and override it with ``dense_threshold``.
DENSE_THRESHOLDS: dict[str, int] = {"cpu": DENSE_THRESHOLD, "cuda": 4000}
FALLBACK_DENSE_THRESHOLD = 4000  # n up to which a failed LOBPCG falls back to dense eigh (≈ 10 s on 2 cores)
SOLVERS = ("auto", "dense", "lobpcg")
METHODS = ("dense", "lobpcg", "fallback_dense", "kept_previous")


@dataclass
class EigenResult:
    """k smallest eigenpairs. values: (k,) ascending, vectors: (n, k) orthonormal columns, both float32.

    method: "dense" | "lobpcg" | "fallback_dense" | "kept_previous". residual: ‖L U − U Λ‖_F / c (c the
    Gershgorin bound of L). iterations: LOBPCG iterations (0 for dense). message: why a fallback happened.
    ortho_error: ‖UᵀU − I‖_max of the returned vectors (NaN where not measured: kept pairs).
    rest_values (n − k,) ascending, rest_vectors (n, n − k): the other n − k eigenpairs, when a dense solve
    was asked for the whole spectrum (``whole=True``); None otherwise.
    """

    values: Tensor
    vectors: Tensor
    method: str
    residual: float
    iterations: int
    message: str = ""
    ortho_error: float = math.nan
    rest_values: Tensor | None = None
    rest_vectors: Tensor | None = None


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


def dense_threshold_for(device: torch.device | str) -> int:
    """The n up to which ``solver="auto"`` takes dense eigh on ``device`` (``DENSE_THRESHOLDS``)."""
    kind = torch.device(device).type
    return DENSE_THRESHOLDS.get(kind, DENSE_THRESHOLDS["cpu"])


def _csr(L: Tensor) -> Tensor:
    """A sparse COO matrix as CSR: ``torch.matmul(csr, X)`` is about twice as fast as COO's sparse.mm."""
    if not L.is_sparse:
        return L
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return L.to_sparse_csr()  # (n, n) sparse CSR


def _mm(L: Tensor, X: Tensor) -> Tensor:
    return torch.sparse.mm(L, X) if L.is_sparse else torch.matmul(L, X)  # (n, k)


def _residual(L: Tensor, U: Tensor, values: Tensor, c: float, LU: Tensor | None = None) -> float:
    # ‖L U − U Λ‖_F / c  (L U given when the caller has it)
    R = (_mm(L, U) if LU is None else LU) - U * values  # (n, k)
    return float(R.norm()) / c


def _rayleigh(L: Tensor, U: Tensor) -> Tensor:
    # λ_j = u_jᵀ L u_j / u_jᵀ u_j
    return (U * _mm(L, U)).sum(0) / (U * U).sum(0)  # (k,)


GRAM_CHUNK = 1 << 16  # rows per float64 block of ``_gram64``


def _gram64(A: Tensor, B: Tensor) -> Tensor:
    """Aᵀ B (k, m) accumulated in float64 from float32 (n, k) and (n, m), in row blocks of ``GRAM_CHUNK``
    through two reused float64 buffers: a float32 product's error grows with n (≈ 3e-5 measured at
    n = 3000), too much to measure or restore orthonormality with, and whole float64 copies of (n, k)
    blocks cost their allocation at every call."""
    n = A.size(0)
    rows = min(n, GRAM_CHUNK)
    a = torch.empty(rows, A.size(1), dtype=torch.float64, device=A.device)  # (rows, k)
    b = a if B is A else torch.empty(rows, B.size(1), dtype=torch.float64, device=A.device)  # (rows, m)
    out = torch.zeros(A.size(1), B.size(1), dtype=torch.float64, device=A.device)  # (k, m)
    for i in range(0, n, rows):
        m = min(rows, n - i)
        a[:m].copy_(A[i : i + m])
        if B is not A:
            b[:m].copy_(B[i : i + m])
        out.addmm_(a[:m].T, b[:m])  # += A_iᵀ B_i
    return out


def _ortho_error(U: Tensor) -> float:
    # ‖UᵀU − I‖_max, accumulated in float64: the check must not add float32 rounding of its own
    gram = _gram64(U, U) if U.dtype != torch.float64 else U.T @ U  # (k, k)
    return float((gram - torch.eye(U.size(1), dtype=torch.float64, device=U.device)).abs().max())


def _verify(
    L: Tensor, U: Tensor, values: Tensor, c: float, tol: float, ortho_tol: float, LU: Tensor | None = None
) -> tuple[bool, float, float, str]:
    """(ok, residual, orthonormality error, why not)."""
    if not (bool(torch.isfinite(values).all()) and bool(torch.isfinite(U).all())):
        return False, math.nan, math.nan, "non-finite eigenpairs"
    res = _residual(L, U, values, c, LU)
    ortho = _ortho_error(U)
    if not res <= tol:
        return False, res, ortho, f"residual {res:.3g} > tol {tol:.3g}"
    if not ortho <= ortho_tol:
        return False, res, ortho, f"orthonormality error {ortho:.3g} > {ortho_tol:.3g}"
    return True, res, ortho, ""


def _dense(L: Tensor) -> tuple[Tensor, Tensor]:
    Ld = (L.to_dense() if L.is_sparse else L).to(torch.float64)  # (n, n)
    # L = U Λ Uᵀ, ascending
    return torch.linalg.eigh(Ld)  # (n,), (n, n)


def _rayleigh_ritz(L: Tensor, X: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Best approximations of L's eigenpairs in span(X) (the Rayleigh–Ritz step that opens LOBPCG), on an
    orthonormal basis whatever X's drift.

    Q = X R⁻¹ with R the Cholesky factor of XᵀX accumulated in float64 (``_gram64``; Cholesky QR), then the
    projected problem H = Qᵀ L Q solved in float64. The (n, k) blocks stay float32: U = Q Y has
    ‖UᵀU − I‖ at float32 rounding (≈ 1e-7·κ(X)) whatever ‖XᵀX − I‖ was, and the one product with L is
    reused for L Q and L U. A badly conditioned X (κ ≳ 100) takes Householder QR instead.
    Returns the Ritz values Θ (k,) ascending, the vectors U (n, k) and L U (n, k), all float32.
    """
    k = X.size(1)
    X = X.to(L.dtype)  # (n, k)
    LX = _mm(L, X)  # (n, k): the one product with L
    # XᵀX = RᵀR,  Q = X R⁻¹ (QᵀQ = I),  L Q = (L X) R⁻¹
    R, info = torch.linalg.cholesky_ex(_gram64(X, X), upper=True)  # (k, k)
    d = R.diagonal().abs()  # (k,)
    if int(info) == 0 and bool(d.min() > 1e-2 * d.max()):
        R_inv = torch.linalg.solve_triangular(
            R, torch.eye(k, dtype=R.dtype, device=R.device), upper=True).to(X.dtype)  # (k, k)
        Q, LQ = X @ R_inv, LX @ R_inv  # (n, k), (n, k)
    else:
        # X far from orthonormal (Q would carry float32 rounding × κ(X)) or rank-deficient: Householder QR,
        # whatever directions it completes span(X) with
        Q = torch.linalg.qr(X).Q  # (n, k)
        LQ = _mm(L, Q)  # (n, k)
    # H = Qᵀ L Q = Y Θ Yᵀ
    H = (Q.T @ LQ).to(torch.float64)  # (k, k)
    theta, Y = torch.linalg.eigh((H + H.T) / 2)  # (k,), (k, k) ascending
    # U = Q Y,  L U = (L Q) Y
    Y = Y.to(X.dtype)
    return theta.to(X.dtype), Q @ Y, LQ @ Y  # (k,), (n, k), (n, k)


def _lobpcg(
    L: Tensor, k: int, X0: Tensor | None, c: float, tol: float, max_iter: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, int]:
    """torch.lobpcg(largest=False) on L, stopped by our own residual test, then orthonormalised.

    L: (n, n) float32 CSR, COO or dense. Returns values (k,) ascending, U (n, k), L U (n, k), iterations.
    """
    n = L.size(0)
    Lc = _csr(L)  # (n, n) CSR for the products
    if X0 is None:
        X = torch.randn(n, k, generator=generator, device=L.device, dtype=L.dtype)  # (n, k)
    else:
        # warm start: LOBPCG's first step is a Rayleigh–Ritz on span(X0); done here, it ends the refresh
        # at the cost of one product with L when the previous vectors still meet tol
        theta, X, LX = _rayleigh_ritz(Lc, X0.detach().to(device=L.device, dtype=L.dtype))  # (k,), (n, k) × 2
        if _residual(Lc, X, theta, c, LX) <= tol / 2:
            return theta, X, LX, 0
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
    _, X = torch.lobpcg(
        Lc, k=k, X=X, niter=max_iter, tol=tol / (4 * math.sqrt(k)), largest=False, tracker=tracker
    )  # (k,), (n, k)
    # the final orthonormalisation: Ritz pairs of span(X) on an orthonormal basis, ascending
    values, U, LU = _rayleigh_ritz(Lc, X)  # (k,), (n, k), (n, k)
    return values, U, LU, state["iterations"]


def smallest_eigenpairs(
    L: Tensor,
    k: int,
    X0: Tensor | None = None,
    *,
    previous_values: Tensor | None = None,
    dense_threshold: int | None = None,
    fallback_threshold: int = FALLBACK_DENSE_THRESHOLD,
    tol: float = 1e-3,
    ortho_tol: float = 1e-3,
    max_iter: int = 200,
    seed: int = 0,
    generator: torch.Generator | None = None,
    solver: str = "auto",
    whole: bool = False,
) -> EigenResult:
    """The k smallest eigenpairs of a symmetric PSD Laplacian L (n, n), sparse COO or dense.

    Args:
        k: number of pairs; 1 ≤ k ≤ n, and n ≥ 3k when LOBPCG is used (``check_k``).
        X0: (n, k) previous eigenvectors: LOBPCG's warm start, and the pairs kept if every solver fails.
        previous_values: (k,) the eigenvalues that went with X0 (kept with them); if None, the kept values
            are X0's Rayleigh quotients under L.
        dense_threshold: with ``solver="auto"``, n up to which dense eigh (float64) is used; None: the
            crossover of L's device type (``dense_threshold_for``). fallback_threshold: n up to which a
            failed LOBPCG falls back to dense eigh.
        tol: bound on ‖L U − U Λ‖_F / c (c = Gershgorin bound of L). ortho_tol: bound on ‖UᵀU − I‖_max.
        max_iter: LOBPCG iterations. seed / generator: the random start when X0 is None (same seed, same
            start on every rank).
        solver: "auto" (dense up to ``dense_threshold``, LOBPCG above), "dense" or "lobpcg" (any n ≥ 3k).
        whole: when the solve is dense (``dense`` or ``fallback_dense``), also return the other n − k pairs
            (``EigenResult.rest_values``, ``rest_vectors``): eigh computes them anyway.
    Returns:
        ``EigenResult`` with float32 values (k,) and vectors (n, k) on L's device, whatever L's dtype.
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
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r}; allowed: {', '.join(SOLVERS)}")
    if dense_threshold is None:
        dense_threshold = dense_threshold_for(L.device)
    with ieee_float32():
        return _solve(L, k, X0, previous_values, dense_threshold, fallback_threshold, tol, ortho_tol, max_iter,
                      seed, generator, solver, whole)


def _solve(
    L: Tensor, k: int, X0: Tensor | None, previous_values: Tensor | None, dense_threshold: int,
    fallback_threshold: int, tol: float, ortho_tol: float, max_iter: int, seed: int,
    generator: torch.Generator | None, solver: str, whole: bool,
) -> EigenResult:
    n = L.size(0)
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
            all_values, all_vectors = _dense(L)  # (n,), (n, n) float64
        except RuntimeError:
            return None
        values, vectors = all_values[:k], all_vectors[:, :k]  # (k,), (n, k)
        ok, res, ortho, _ = _verify(L.to(torch.float64), vectors, values, scale, tol, ortho_tol)
        if not ok or (whole and not bool(torch.isfinite(all_values).all() and torch.isfinite(all_vectors).all())):
            return None
        rest = (all_values[k:].float(), all_vectors[:, k:].float()) if whole else (None, None)
        return EigenResult(values.float(), vectors.float(), method, res, 0, reason, ortho, *rest)

    if not math.isfinite(c):
        return keep_previous("L has non-finite entries")
    if solver == "dense" or (solver == "auto" and n <= dense_threshold):
        return dense("dense") or keep_previous("dense eigh failed")
    check_k(n, k)
    if generator is None:
        generator = torch.Generator(device=L.device).manual_seed(seed)
    Lc = _csr(L)  # (n, n) CSR for the products
    try:
        values, vectors, LU, iters = _lobpcg(Lc, k, X0, scale, tol, max_iter, generator)
        ok, res, ortho, why = _verify(Lc, vectors, values, scale, tol, ortho_tol, LU)
    except RuntimeError as err:  # e.g. a Cholesky failure inside torch.lobpcg
        ok, res, ortho, iters = False, math.nan, math.nan, max_iter
        why = f"torch.lobpcg raised {type(err).__name__}: {err}"
    if ok:
        return EigenResult(values, vectors, "lobpcg", res, iters, "", ortho)
    reason = f"LOBPCG failed after {iters} iterations: {why}"
    if n <= fallback_threshold:
        return dense("fallback_dense", reason) or keep_previous(reason + "; dense eigh failed too")
    return keep_previous(reason)
