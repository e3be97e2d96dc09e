"""Spectral filters on the parameter graph (seed paper §3.2-3.3, Tables 2-3; DESIGN.md "Using the spectrum").

With G ∈ R^{n×p} the stacked aligned gradients (or updates) of one shape class, U ∈ R^{n×k} the k smallest
Laplacian eigenvectors (orthonormal columns), λ ∈ R^k their eigenvalues and a response h(λ):

    G' = U diag(h) Uᵀ G + h_rest (G − U Uᵀ G)

h acts on the k computed components; h_rest on everything outside span(U), i.e. on the eigencomponents
with eigenvalues ≥ λ_k that were not computed. Each ``*_response`` function below returns (h, h_rest) for
one use of the spectrum; ``spectral_filter`` applies any of them. The filter math runs in U's dtype
(float32) and returns G's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# The paper's Table 3: bands of λ, closed on the right ([0, 0.05], (0.05, 0.2], …, (2.0, ∞)), and the
# filtering coefficient of each band (ultra-low, low, medium, high, ultra-high).
TABLE3_EDGES: tuple[float, ...] = (0.05, 0.2, 0.8, 2.0)
TABLE3_COEFFICIENTS: tuple[float, ...] = (1.2, 1.0, 0.6, 0.3, 0.1)
# The paper's Table 2: bands of λ for the energy census ([0, 0.1], (0.1, 0.5], (0.5, 1.0], (1.0, ∞)).
TABLE2_EDGES: tuple[float, ...] = (0.1, 0.5, 1.0)


def _check(G: Tensor, U: Tensor) -> None:
    if G.dim() != 2 or U.dim() != 2 or G.size(0) != U.size(0):
        raise ValueError(f"G must be (n, p) and U (n, k) with the same n, got {tuple(G.shape)} and {tuple(U.shape)}")


def project_low(G: Tensor, U: Tensor) -> Tensor:
    """P_low G = U Uᵀ G. G: (n, p), U: (n, k) → (n, p)."""
    _check(G, U)
    # P_low G = U (Uᵀ G)
    return (U @ (U.T @ G.to(U.dtype))).to(G.dtype)  # (n, p)


def low_pass_projector(U: Tensor) -> Tensor:
    """P_low = U Uᵀ as a dense (n, n) matrix (small n only): the orthogonal projector onto span(U)."""
    return U @ U.T  # (n, n)


def spectral_filter(G: Tensor, U: Tensor, h: Tensor, h_rest: float = 1.0) -> Tensor:
    """G' = U diag(h) Uᵀ G + h_rest (G − U Uᵀ G). G: (n, p), U: (n, k), h: (k,) → (n, p).

    Computed as U diag(h − h_rest) (Uᵀ G) + h_rest G: one (k, p) projection, no (n, n) matrix.
    """
    _check(G, U)
    if h.numel() != U.size(1):
        raise ValueError(f"h must have one coefficient per eigenvector (k={U.size(1)}), got {h.numel()}")
    Gf = G.to(U.dtype)  # (n, p)
    # C = Uᵀ G
    C = U.T @ Gf  # (k, p)
    # G' = U diag(h − h_rest) C + h_rest G
    out = U @ ((h.to(U) - h_rest).unsqueeze(1) * C) + h_rest * Gf  # (n, p)
    return out.to(G.dtype)


def coordination_response(
    k: int, epsilon: float, device: torch.device | str | None = None
) -> tuple[Tensor, float]:
    """Gradient coordination (§3.3): g' = P_low g + ε P_high g, i.e. h = 1 (k,) on ``device``, h_rest = ε ≪ 1."""
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon (high-frequency share kept) must be in [0, 1], got {epsilon}")
    return torch.ones(k, device=device), float(epsilon)


def _bands(values: Tensor, num_bands: int, edges: Sequence[float] | None) -> Tensor:
    """Band index per eigenvalue: by fixed λ edges (closed on the right), or equal-count bands if None."""
    k = values.numel()
    if edges is None:
        # equal-count: the j-th smallest of k eigenvalues goes to band ⌊j·B/k⌋
        rank = torch.argsort(torch.argsort(values))  # (k,)
        return torch.div(rank * num_bands, k, rounding_mode="floor")  # (k,)
    if len(edges) != num_bands - 1 or any(b <= a for a, b in zip(edges[:-1], edges[1:])):
        raise ValueError(f"edges must be {num_bands - 1} increasing λ values for {num_bands} bands, got {list(edges)}")
    boundaries = torch.tensor(edges, dtype=values.dtype, device=values.device)  # (B−1,)
    # band b holds (edges[b−1], edges[b]]
    return torch.bucketize(values, boundaries, right=False)  # (k,)


def band_response(
    values: Tensor,
    coefficients: Sequence[float] = TABLE3_COEFFICIENTS,
    edges: Sequence[float] | None = TABLE3_EDGES,
    rest: str | float = "last",
) -> tuple[Tensor, float]:
    """Piecewise-constant h by eigenvalue band (the paper's Table 3 by default).

    Bands are cut at fixed λ edges, closed on the right, because Table 3 gives its bands as λ-ranges
    ([0, 0.05], (0.05, 0.2], (0.2, 0.8], (0.8, 2.0], (2.0, ∞)); these suit L_sym, whose spectrum is in
    [0, 2]. ``edges=None`` cuts the k computed eigenvalues into equal-count bands instead (B bands of ≈ k/B
    eigenvalues, lowest first), a scale-free choice for an unnormalised L.

    Args:
        values: (k,) eigenvalues. coefficients: one per band (B). edges: B − 1 increasing λ, or None.
        rest: h_rest for the uncomputed components (λ ≥ λ_k): "last" = the highest band's coefficient
            (Table 3's noise suppression; default, as most of the uncomputed spectrum lies high), "boundary"
            = the coefficient of the band holding λ_k, or a number.
    Returns:
        h (k,), h_rest.
    """
    if len(coefficients) < 1:
        raise ValueError("coefficients must hold at least one band coefficient")
    band = _bands(values, len(coefficients), edges)  # (k,)
    table = torch.tensor(list(coefficients), dtype=values.dtype, device=values.device)  # (B,)
    h = table[band]  # (k,)
    if rest == "last":
        h_rest = float(coefficients[-1])
    elif rest == "boundary":
        h_rest = float(h[torch.argmax(values)])
    elif isinstance(rest, (int, float)) and not isinstance(rest, bool):
        h_rest = float(rest)
    else:
        raise ValueError(f"rest must be 'last', 'boundary' or a number, got {rest!r}")
    return h, h_rest


def eigen_lr_response(values: Tensor, beta: float, sigma: float) -> tuple[Tensor, float]:
    """Per-eigencomponent learning rates (§3.3): η_i / η_base = 1 + β exp(−λ_i / σ).

    Meant for the optimizer's update Δθ (after Adam), DESIGN.md. h_rest = 1: the uncomputed components
    have λ ≥ λ_k, taken as high frequency where exp(−λ/σ) ≈ 0 (η = η_base).
    """
    if beta < 0:
        raise ValueError(f"beta (adaptation strength) must be >= 0, got {beta}")
    if sigma <= 0:
        raise ValueError(f"sigma (frequency cutoff) must be > 0, got {sigma}")
    # h_i = 1 + β exp(−λ_i/σ)
    return 1.0 + beta * torch.exp(-values.clamp(min=0) / sigma), 1.0  # (k,)


def hypergradient_update(
    h: Tensor,
    U: Tensor,
    G_t: Tensor,
    Delta_prev: Tensor,
    lr: float,
    clip: tuple[float, float] = (0.01, 2.0),
    normalize: bool = True,
    eps: float = 1e-12,
) -> Tensor:
    """One hypergradient step on the filter coefficients (learned coefficients, §3.2; DESIGN.md).

    With θ_t = θ_{t−1} + U diag(h) Uᵀ Δ_{t−1} + …, the derivative of the loss at θ_t is
        ∂L(θ_t)/∂h_i = ⟨U_iᵀ G_t, U_iᵀ Δ_{t−1}⟩
    (G_t the new gradient, Δ_{t−1} the last unfiltered update, both (n, p)). With ``normalize`` it is
    divided by ‖U_iᵀG_t‖·‖U_iᵀΔ_{t−1}‖ (a cosine in [−1, 1], so ``lr`` does not depend on the gradients'
    scale). Multiplicative step, which keeps h > 0, then clipped:
        h_i ← clip(h_i · exp(−lr · ∂L/∂h_i), clip[0], clip[1])
    A gradient that keeps pointing against the last update (⟨G_t, Δ_{t−1}⟩ < 0) raises h_i.
    Returns the new h (k,).
    """
    _check(G_t, U)
    _check(Delta_prev, U)
    # U_iᵀ G_t and U_iᵀ Δ_{t−1}, for all i at once
    cg = U.T @ G_t.to(U.dtype)  # (k, p)
    cd = U.T @ Delta_prev.to(U.dtype)  # (k, p)
    return hypergradient_step(h, cg, cd, lr, clip, normalize, eps)


def hypergradient_step(
    h: Tensor,
    cg: Tensor,
    cd: Tensor,
    lr: float,
    clip: tuple[float, float] = (0.01, 2.0),
    normalize: bool = True,
    eps: float = 1e-12,
) -> Tensor:
    """``hypergradient_update`` from the projections cg = Uᵀ G_t and cd = Uᵀ Δ_{t−1}, both (k, p) → h (k,).

    For callers that already hold Uᵀ G_t (the gradient filter needs it too): saves two (n, k, p) products.
    """
    if cg.shape != cd.shape or cg.dim() != 2 or cg.size(0) != h.numel():
        raise ValueError(f"cg and cd must both be (k={h.numel()}, p), got {tuple(cg.shape)} and {tuple(cd.shape)}")
    if lr < 0:
        raise ValueError(f"lr (hypergradient step) must be >= 0, got {lr}")
    if not 0 < clip[0] <= clip[1]:
        raise ValueError(f"clip must be (low, high) with 0 < low <= high, got {clip}")
    # ∂L/∂h_i = ⟨U_iᵀG_t, U_iᵀΔ_{t−1}⟩
    grad = (cg * cd).sum(-1)  # (k,)
    if normalize:
        grad = grad / (cg.norm(dim=-1) * cd.norm(dim=-1) + eps)  # (k,)
    # h ← clip(h · exp(−lr ∂L/∂h))
    return (h.to(cg.dtype) * torch.exp(-lr * grad)).clamp(clip[0], clip[1])  # (k,)


def band_energy(G: Tensor, U: Tensor, values: Tensor, edges: Sequence[float] | None = TABLE2_EDGES) -> Tensor:
    """Energy of G per eigenvalue band (the paper's Table 2), plus what lies outside span(U).

    e_b = Σ_{i: λ_i in band b} ‖U_iᵀ G‖²  for the B = len(edges) + 1 bands (cut as in ``band_response``;
    ``edges=None`` is not allowed here), and a last entry ‖G − U Uᵀ G‖²: the energy of the uncomputed
    components. The entries sum to ‖G‖² (U orthonormal); divide by it for Table 2's shares.
    Returns (B + 1,).
    """
    _check(G, U)
    if edges is None:
        raise ValueError("band_energy needs explicit λ edges")
    Gf = G.to(U.dtype)  # (n, p)
    C = U.T @ Gf  # (k, p)
    # ‖U_iᵀ G‖² per component
    comp = C.pow(2).sum(-1)  # (k,)
    band = _bands(values.to(U.dtype), len(edges) + 1, edges)  # (k,)
    per_band = torch.zeros(len(edges) + 1, dtype=U.dtype, device=U.device).index_add_(0, band, comp)  # (B,)
    # ‖(I − U Uᵀ) G‖²
    rest = (Gf - U @ C).pow(2).sum()  # ()
    return torch.cat([per_band, rest.view(1)])  # (B + 1,)


# ------------------------------------------------------------------ the training step's in-place filters
def filter_gradient_(
    G: Tensor,
    U: Tensor,
    C: Tensor,
    coef: Tensor,
    h_rest: float,
    gamma: float = 0.0,
    reg: Tensor | None = None,
    reg_low: Tensor | None = None,
) -> Tensor:
    """G' = h_rest G + U diag(h − h_rest) Uᵀ G + 2γ (R − U_k R_low), written into G (the training step's
    own stacked copy) and returned. G: (n, p), U: (n, m), C = Uᵀ G: (m, p), coef = h − h_rest: (m,) or
    (m, 1); a regulariser's gradient 2γ R (n, p), minus 2γ U_k R_low with R_low: (k, p), k ≤ m, on U's
    first k columns (the high-pass one: R = Θ − Θ₀, R_low = U_kᵀ (Θ − Θ₀); the Dirichlet one: R = L (Θ − Θ₀),
    no R_low). Same result as :func:`spectral_filter` plus the regulariser's gradient, in one pass.
    """
    low = coef.reshape(-1, 1) * C  # (m, p): diag(h − h_rest) Uᵀ G
    out = G if h_rest == 1.0 else G.mul_(h_rest)  # (n, p): h_rest G
    if reg is not None:
        out = out.add_(reg, alpha=2 * gamma)  # + 2γ R
    if reg_low is not None:
        low[: reg_low.shape[0]].sub_(reg_low, alpha=2 * gamma)  # − 2γ R_low on the first k rows
    return out.addmm_(U, low)  # (n, p): + U (diag(h − h_rest) Uᵀ G − 2γ R_low)


def filter_update_(after: Tensor, delta: Tensor, U: Tensor, coef: Tensor, h_rest: float) -> tuple[Tensor, Tensor]:
    """Θ' = Θ_before + h_rest Δ + U diag(h − h_rest) Uᵀ Δ = Θ_after + (h_rest − 1) Δ + U diag(coef) Uᵀ Δ, written
    into ``after`` (Θ_after = Θ_before + Δ, the optimizer's result); Δ: (n, p), U: (n, m), coef = h − h_rest:
    (m,). Returns (Θ', Uᵀ Δ: (m, p)); Δ = 0 (a skipped step) leaves Θ_after exactly."""
    C = U.T @ delta  # (m, p) = Uᵀ Δ
    if h_rest != 1.0:
        after = after.add_(delta, alpha=h_rest - 1.0)  # Θ_after + (h_rest − 1) Δ
    return after.addmm_(U, coef.unsqueeze(1) * C), C  # (n, p), (m, p)


def remember_update(prev: Tensor | None, c_prev: Tensor | None, delta: Tensor, c_delta: Tensor,
                    go: Tensor) -> tuple[Tensor, Tensor]:
    """The update memory of the learned coefficients: Δ_{t} (n, p) and its low-band coefficients U_kᵀ Δ_{t}
    (k, p) for the next hypergradient, where the step went ahead (``go``, a () bool device flag); else the
    previous ones kept (zeros before the first). ``prev`` is updated in place; no host read."""
    c_new = torch.where(go, c_delta, c_prev if c_prev is not None else 0.0)  # (k, p)
    new = torch.where(go, delta, 0.0) if prev is None else torch.where(go, delta, prev, out=prev)  # (n, p)
    return new, c_new
