"""Spectral regularisers added to the loss (seed paper §3.3; shared/DESIGN.md "Using the spectrum").

With Θ ∈ R^{n×p} the stacked aligned LoRA parameters of one shape class (``stack_signals``, differentiable),
Θ_0 their initial values and ΔΘ = Θ − Θ_0:

    high-pass energy   γ ‖(I − U Uᵀ) ΔΘ‖_F²                  (§3.3's L_spectral = ‖Δθ − P_low Δθ‖²)
    Dirichlet energy   γ tr(ΔΘᵀ L ΔΘ) = γ Σ_{i<j} w_ij ‖Δθ_i − Δθ_j‖²    (L = D − W)

Both are differentiable in Θ (U, L and Θ_0 are constants). γ in [0.01, 0.05] by default (paper §4, the
sensitivity analysis).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _delta(Theta: Tensor, Theta0: Tensor, gamma: float) -> Tensor:
    if gamma < 0:
        raise ValueError(f"gamma (spectral regularisation weight) must be >= 0, got {gamma}")
    if Theta.dim() != 2 or Theta.shape != Theta0.shape:
        raise ValueError(f"Theta and Theta0 must be (n, p) of the same shape, got {tuple(Theta.shape)} and {tuple(Theta0.shape)}")
    return Theta - Theta0.detach()  # (n, p)


def high_pass_energy(Theta: Tensor, Theta0: Tensor, U: Tensor, gamma: float) -> Tensor:
    """γ ‖(I − U Uᵀ)(Θ − Θ_0)‖_F². Theta, Theta0: (n, p), U: (n, k) orthonormal → scalar."""
    delta = _delta(Theta, Theta0, gamma)  # (n, p)
    if U.dim() != 2 or U.size(0) != delta.size(0):
        raise ValueError(f"U must be (n={delta.size(0)}, k), got {tuple(U.shape)}")
    U = U.detach().to(delta.dtype)
    # (I − U Uᵀ) ΔΘ = ΔΘ − U (Uᵀ ΔΘ)
    high = delta - U @ (U.T @ delta)  # (n, p)
    return gamma * high.pow(2).sum()  # ()


def high_pass_energy_projected(delta: Tensor, c_delta: Tensor, gamma: float) -> Tensor:
    """The high-pass energy from ΔΘ and its low-band coefficients C = Uᵀ ΔΘ (U orthonormal), the form the
    training step computes (it holds C already): delta (n, p), c_delta (k, p) → scalar.

        γ ‖(I − U Uᵀ) ΔΘ‖² = γ (‖ΔΘ‖² − ‖Uᵀ ΔΘ‖²)     (clamped at 0 against rounding)

    Its gradient in Θ, 2γ ΔΘ − 2γ U C, is what the callback adds to the adapters' gradients.
    """
    if gamma < 0:
        raise ValueError(f"gamma (spectral regularisation weight) must be >= 0, got {gamma}")
    energy = torch.linalg.vector_norm(delta).square() - c_delta.square().sum()  # ()
    return gamma * energy.clamp_min(0)  # ()


def dirichlet_energy(Theta: Tensor, Theta0: Tensor, L: Tensor, gamma: float) -> Tensor:
    """γ tr(ΔΘᵀ L ΔΘ), which for L = D − W equals γ Σ_{undirected (i,j)} w_ij ‖Δθ_i − Δθ_j‖².

    Theta, Theta0: (n, p); L: (n, n) sparse COO or dense Laplacian (``laplacian``; with L_sym it is the
    normalised Dirichlet energy) → scalar. Computed as ⟨ΔΘ, L ΔΘ⟩ with one sparse product, so no
    (E, p) tensor of edge differences is built.
    """
    delta = _delta(Theta, Theta0, gamma)  # (n, p)
    if L.dim() != 2 or L.size(0) != L.size(1) or L.size(0) != delta.size(0):
        raise ValueError(f"L must be (n={delta.size(0)}, n), got {tuple(L.shape)}")
    L = L.detach().to(delta.dtype)
    # L ΔΘ
    LD = torch.sparse.mm(L, delta) if L.is_sparse else L @ delta  # (n, p)
    return dirichlet_energy_of(delta, LD, gamma)


def dirichlet_energy_of(delta: Tensor, l_delta: Tensor, gamma: float) -> Tensor:
    """γ tr(ΔΘᵀ L ΔΘ) from ΔΘ (n, p) and L ΔΘ (n, p), the form the training step computes (it adds
    ∇ = 2γ L ΔΘ to the gradients) → scalar."""
    # tr(ΔΘᵀ L ΔΘ) = Σ_{i,p} ΔΘ_ip (L ΔΘ)_ip
    return gamma * (delta * l_delta).sum()  # ()


def regularizer_terms(kind: str, gamma: float, theta: Tensor, theta0: Tensor, U_k: Tensor | None = None,
                      c_theta0: Tensor | None = None, laplacian: Tensor | None = None,
                      out: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
    """The training step's form of a regulariser: the terms of its gradient for ``filters.filter_gradient_``
    and its value, from Θ, Θ_0: (n, p) (no autograd).

    ``highpass``: R = ΔΘ (written into ``out`` when given), R_low = U_kᵀ ΔΘ = U_kᵀ Θ − c_theta0 (k, p) with
    c_theta0 = U_kᵀ Θ_0 (the caller's cache), value γ(‖ΔΘ‖² − ‖R_low‖²); ∇ = 2γ R − 2γ U_k R_low.
    ``dirichlet``: R = L ΔΘ (``laplacian`` L sparse (n, n)), no R_low, value γ tr(ΔΘᵀ L ΔΘ); ∇ = 2γ R.
    Returns (R, R_low, value).
    """
    if kind == "highpass":
        reg = torch.sub(theta, theta0, out=out)  # (n, p) ΔΘ
        reg_low = U_k.T @ theta - c_theta0  # (k, p) U_kᵀ ΔΘ
        return reg, reg_low, high_pass_energy_projected(reg, reg_low, gamma)
    if kind == "dirichlet":
        delta = theta - theta0  # (n, p)
        reg = torch.sparse.mm(laplacian, delta)  # (n, p) L ΔΘ
        return reg, None, dirichlet_energy_of(delta, reg, gamma)
    raise ValueError(f"regularizer={kind!r}; allowed: highpass, dirichlet")
