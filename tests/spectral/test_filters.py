"""Spectral filters: the projector, identity and low-pass limits, bands, learning rates, hypergradient."""

from __future__ import annotations

import math

import pytest
import torch

from speclora.spectral import (
    TABLE3_COEFFICIENTS,
    band_energy,
    band_response,
    coordination_response,
    eigen_lr_response,
    hypergradient_update,
    laplacian,
    low_pass_projector,
    project_low,
    smallest_eigenpairs,
    spectral_filter,
)
from tests.spectral.graphs import cycle


@pytest.fixture
def spectrum():
    ei, w = cycle(8)
    res = smallest_eigenpairs(laplacian(ei, w, 8), 3)
    G = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    return res.vectors, res.values, G


def test_low_pass_projector_is_orthogonal_projector(spectrum):
    U, _, G = spectrum
    P = low_pass_projector(U)
    assert torch.allclose(P, P.T, atol=1e-6)
    assert torch.allclose(P @ P, P, atol=1e-6)
    assert math.isclose(float(torch.trace(P)), 3.0, rel_tol=1e-5)
    assert torch.allclose(project_low(G, U), P @ G, atol=1e-5)


def test_all_ones_is_identity(spectrum):
    U, _, G = spectrum
    assert torch.allclose(spectral_filter(G, U, torch.ones(3), 1.0), G, atol=1e-6)


def test_coordination_epsilon_zero_lies_in_span(spectrum):
    U, _, G = spectrum
    h, rest = coordination_response(3, 0.0)
    out = spectral_filter(G, U, h, rest)
    assert torch.allclose(out - U @ (U.T @ out), torch.zeros_like(G), atol=1e-5)
    assert torch.allclose(out, project_low(G, U), atol=1e-6)
    # ε > 0: P_low G + ε P_high G
    h, rest = coordination_response(3, 0.1)
    P = low_pass_projector(U)
    expected = P @ G + 0.1 * (torch.eye(8) - P) @ G
    assert torch.allclose(spectral_filter(G, U, h, rest), expected, atol=1e-5)
    with pytest.raises(ValueError, match="epsilon"):
        coordination_response(3, 1.5)


def test_filter_is_diagonal_in_the_eigenbasis(spectrum):
    U, _, G = spectrum
    h = torch.tensor([2.0, 0.5, 0.0])
    out = spectral_filter(G, U, h, 0.25)
    assert torch.allclose(U.T @ out, h[:, None] * (U.T @ G), atol=1e-5)
    high = G - U @ (U.T @ G)
    assert torch.allclose(out - U @ (U.T @ out), 0.25 * high, atol=1e-5)
    assert spectral_filter(G.double(), U, h, 0.25).dtype == torch.float64


def test_band_response_table3_fixed_edges():
    values = torch.tensor([0.0, 0.05, 0.1, 0.5, 1.0, 3.0])
    h, rest = band_response(values)
    assert h.tolist() == pytest.approx([1.2, 1.2, 1.0, 0.6, 0.3, 0.1])
    assert rest == pytest.approx(0.1)
    assert band_response(values[:3], rest="boundary")[1] == pytest.approx(1.0)
    assert band_response(values, rest=0.5)[1] == 0.5
    with pytest.raises(ValueError, match="rest"):
        band_response(values, rest="middle")
    with pytest.raises(ValueError, match="edges"):
        band_response(values, TABLE3_COEFFICIENTS, (0.1, 0.05, 0.8, 2.0))


def test_band_response_equal_count():
    values = torch.tensor([0.3, 0.0, 0.2, 0.1])
    h, _ = band_response(values, (1.0, 0.5), edges=None)
    # the two smallest (0.0, 0.1) in band 0, the two largest in band 1
    assert h.tolist() == [0.5, 1.0, 0.5, 1.0]


def test_eigen_lr_response():
    values = torch.tensor([0.0, 1.0])
    h, rest = eigen_lr_response(values, beta=0.5, sigma=1.0)
    assert torch.allclose(h, torch.tensor([1.5, 1 + 0.5 * math.exp(-1.0)]))
    assert rest == 1.0
    with pytest.raises(ValueError, match="sigma"):
        eigen_lr_response(values, 0.5, 0.0)


def test_hypergradient_step_sign(spectrum):
    U, _, G = spectrum
    h = torch.ones(3)
    delta = -0.1 * G  # the last update went down the gradient
    # the gradient persists (⟨G_t, Δ_{t−1}⟩ < 0): larger steps would have helped → h grows
    up = hypergradient_update(h, U, G, delta, lr=0.1)
    assert (up > h).all()
    assert torch.allclose(up, torch.full((3,), math.exp(0.1)), atol=1e-5)  # normalised: cos = −1
    # the gradient flipped (overshoot): h shrinks
    down = hypergradient_update(h, U, -G, delta, lr=0.1)
    assert (down < h).all()
    # unnormalised: ∂L/∂h_i = ⟨U_iᵀG, U_iᵀΔ⟩ exactly
    raw = hypergradient_update(h, U, G, delta, lr=0.1, normalize=False, clip=(1e-3, 1e3))
    grad = ((U.T @ G) * (U.T @ delta)).sum(-1)
    assert torch.allclose(raw, torch.exp(-0.1 * grad), atol=1e-5)
    # clipped
    assert hypergradient_update(h, U, G, delta, lr=10.0, clip=(0.5, 1.5)).max() == 1.5


def test_band_energy_sums_to_total(spectrum):
    U, values, G = spectrum
    e = band_energy(G, U, values, edges=(0.1, 1.0))
    comp = ((U.T @ G) ** 2).sum(-1)
    # cycle C8: λ = 0, 2 − √2 ≈ 0.586 (×2) → bands [0, 0.1]: 1 component, (0.1, 1.0]: 2, (1, ∞): 0
    assert torch.allclose(e[:3], torch.stack([comp[0], comp[1] + comp[2], torch.tensor(0.0)]), atol=1e-5)
    assert torch.allclose(e.sum(), G.pow(2).sum(), rtol=1e-5)
    assert e.shape == (4,)


# ---------------------------------------------------------------- the training step's in-place filters
def _orthonormal(n: int, m: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64))[0]  # (n, m)


@pytest.mark.parametrize("h_rest", [1.0, 0.3])
def test_filter_gradient_is_the_dense_filter_plus_the_high_pass_gradient(h_rest):
    from speclora.spectral.filters import filter_gradient_

    n, m, k, p, gamma = 9, 4, 2, 5, 0.05
    U = _orthonormal(n, m, 0)  # (n, m); its first k columns are U_k
    g = torch.Generator().manual_seed(1)
    G = torch.randn(n, p, generator=g, dtype=torch.float64)
    dtheta = torch.randn(n, p, generator=g, dtype=torch.float64)
    h = torch.rand(m, generator=g, dtype=torch.float64) * 2
    coef = (h - h_rest).unsqueeze(1)  # (m, 1), as the callback holds it
    # dense: (U diag(h) Uᵀ + h_rest (I − U Uᵀ)) G + ∇ γ‖(I − U_k U_kᵀ) ΔΘ‖² = … + 2γ (I − U_k U_kᵀ) ΔΘ
    eye, Uk = torch.eye(n, dtype=torch.float64), U[:, :k]
    want = (U @ torch.diag(h) @ U.T + h_rest * (eye - U @ U.T)) @ G + 2 * gamma * (eye - Uk @ Uk.T) @ dtheta
    out = filter_gradient_(G.clone(), U, U.T @ G, coef, h_rest, gamma, dtheta, Uk.T @ dtheta)
    assert torch.allclose(out, want, atol=1e-12)
    # without a regulariser it is spectral_filter; and it writes into G
    G2 = G.clone()
    plain = filter_gradient_(G2, U, U.T @ G, coef, h_rest)
    assert plain.data_ptr() == G2.data_ptr()
    assert torch.allclose(plain, spectral_filter(G, U, h, h_rest), atol=1e-12)
    # the Dirichlet form: a gradient 2γ R and no low-band term
    R = torch.randn(n, p, generator=g, dtype=torch.float64)
    dirichlet = filter_gradient_(G.clone(), U, U.T @ G, coef, h_rest, gamma, R)
    assert torch.allclose(dirichlet, spectral_filter(G, U, h, h_rest) + 2 * gamma * R, atol=1e-12)


@pytest.mark.parametrize("h_rest", [1.0, 0.5])
def test_filter_update_scales_each_eigencomponent_of_the_update(h_rest):
    from speclora.spectral.filters import filter_update_

    n, m, p = 8, 3, 4
    U = _orthonormal(n, m, 2)
    g = torch.Generator().manual_seed(3)
    before = torch.randn(n, p, generator=g, dtype=torch.float64)
    delta = torch.randn(n, p, generator=g, dtype=torch.float64)
    h = torch.rand(m, generator=g, dtype=torch.float64) * 2
    after = before + delta
    out, C = filter_update_(after.clone(), delta, U, h - h_rest, h_rest)
    # Θ' = Θ_before + (U diag(h) Uᵀ + h_rest (I − U Uᵀ)) Δ
    want = before + (U @ torch.diag(h) @ U.T + h_rest * (torch.eye(n, dtype=torch.float64) - U @ U.T)) @ delta
    assert torch.allclose(out, want, atol=1e-12)
    assert torch.allclose(C, U.T @ delta, atol=1e-12)
    # a skipped step (Δ = 0) leaves Θ_after exactly
    same, _ = filter_update_(before.clone(), torch.zeros_like(delta), U, h - h_rest, h_rest)
    assert torch.equal(same, before)
