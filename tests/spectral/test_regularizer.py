"""Spectral regularisers: Dirichlet energy against the edge sum, high-pass energy, gradients, checks."""

from __future__ import annotations

import pytest
import torch

from speclora.spectral import (
    dirichlet_energy,
    dirichlet_energy_of,
    high_pass_energy,
    high_pass_energy_projected,
    laplacian,
    laplacian_dense,
)
from tests.spectral.graphs import undirected


def toy():
    ei, w = undirected([(0, 1), (1, 2), (0, 2), (2, 3)], 4, [1.0, 2.0, 0.5, 3.0])
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    theta0 = torch.randn(4, 3, generator=g, dtype=torch.float64)
    return ei, w, theta, theta0


def test_dirichlet_energy_equals_edge_sum_and_trace():
    ei, w, theta, theta0 = toy()
    d = (theta - theta0).detach()
    edge_sum = sum(
        float(w[e]) * float((d[i] - d[j]).pow(2).sum()) for e, (i, j) in enumerate(ei.T.tolist()) if i < j
    )
    Ld = laplacian_dense(ei, w, 4)
    trace = float(torch.trace(d.T @ Ld @ d))
    for L in (laplacian(ei, w, 4), Ld):
        value = dirichlet_energy(theta, theta0, L, gamma=0.02)
        assert value.item() == pytest.approx(0.02 * edge_sum, rel=1e-6)
        assert value.item() == pytest.approx(0.02 * trace, rel=1e-6)


def test_dirichlet_gradient_is_two_gamma_l_delta():
    ei, w, theta, theta0 = toy()
    dirichlet_energy(theta, theta0, laplacian(ei, w, 4), gamma=0.05).backward()
    expected = 2 * 0.05 * laplacian_dense(ei, w, 4) @ (theta - theta0).detach()
    assert torch.allclose(theta.grad, expected, atol=1e-6)


def test_high_pass_energy():
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(6, 2, generator=g)).Q
    theta0 = torch.randn(6, 3, generator=g)
    inside = theta0 + U @ torch.randn(2, 3, generator=g)  # ΔΘ in span(U)
    assert high_pass_energy(inside, theta0, U, 0.03).item() == pytest.approx(0.0, abs=1e-6)
    theta = torch.randn(6, 3, generator=g, requires_grad=True)
    value = high_pass_energy(theta, theta0, U, 0.03)
    P_high = torch.eye(6) - U @ U.T
    d = (theta - theta0).detach()
    assert value.item() == pytest.approx(0.03 * float((P_high @ d).pow(2).sum()), rel=1e-5)
    value.backward()
    assert torch.allclose(theta.grad, 2 * 0.03 * P_high @ d, atol=1e-5)


def test_argument_checks():
    ei, w, theta, theta0 = toy()
    with pytest.raises(ValueError, match="gamma"):
        dirichlet_energy(theta, theta0, laplacian(ei, w, 4), gamma=-0.1)
    with pytest.raises(ValueError, match="same shape"):
        high_pass_energy(theta, theta0[:3], torch.eye(4, 2, dtype=torch.float64), 0.1)
    with pytest.raises(ValueError, match="L must be"):
        dirichlet_energy(theta, theta0, laplacian(ei, w, 5), 0.1)


def test_the_training_step_forms_equal_the_energies():
    # the callback computes the energies from ΔΘ and Uᵀ ΔΘ (or L ΔΘ): the same values as the definitions
    ei, w, theta, theta0 = toy()
    g = torch.Generator().manual_seed(1)
    U = torch.linalg.qr(torch.randn(4, 2, generator=g, dtype=torch.float64)).Q  # (4, 2)
    delta = (theta - theta0).detach()  # (4, 3)
    assert high_pass_energy_projected(delta, U.T @ delta, 0.03).item() == pytest.approx(
        high_pass_energy(theta, theta0, U, 0.03).item(), rel=1e-9)
    Ld = laplacian_dense(ei, w, 4)
    assert dirichlet_energy_of(delta, Ld @ delta, 0.02).item() == pytest.approx(
        dirichlet_energy(theta, theta0, Ld, 0.02).item(), rel=1e-9)
    with pytest.raises(ValueError, match="gamma"):
        high_pass_energy_projected(delta, U.T @ delta, -1.0)
