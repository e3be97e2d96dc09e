"""response.py: the responses on the whole spectrum and on the rest, and coefficients carried across refreshes."""

from __future__ import annotations

import math

import pytest
import torch

from speclora.spectral.laplacian import laplacian, laplacian_trace
from speclora.spectral.response import (
    RATE_TOL,
    ResponseSettings,
    align_signs,
    carry_coefficients,
    class_filter,
    rest_mean_eigenvalue,
)
from tests.spectral.graphs import path


def _orthonormal(n: int, seed: int = 0) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]


# eigenvalues of a made-up 10-node spectrum: k = 2 low, the rest across Table 3's bands
VALUES = torch.tensor([0.0, 0.04, 0.15, 0.5, 0.9, 1.0, 1.05, 1.1, 1.2, 1.9], dtype=torch.float64)


def _filter(settings: ResponseSettings, k: int = 2):
    U = _orthonormal(10)
    return class_filter(VALUES[:k], U[:, :k], settings, VALUES[k:], U[:, k:], trace=float(VALUES.sum())), U


def test_whole_spectrum_gradient_response_is_exact_on_a_small_basis():
    settings = ResponseSettings(eigen_lr=False)
    filt, U = _filter(settings)
    # Table 3 by band: 1.2 1.2 | 1.0 0.6 0.3 0.3 0.3 0.3 0.3 0.3; the rest × ε = 0.1
    want = torch.tensor([1.2, 1.2, 0.1, 0.06] + [0.03] * 6, dtype=torch.float64)
    assert filt.grad_rest == pytest.approx(0.03)  # the rest's most frequent response
    assert filt.basis.size(1) == 4 and filt.grad_cols == 4  # k = 2, and the two rest vectors of other bands
    G = torch.randn(10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = filt.grad_rest * G + filt.basis @ ((filt.grad - filt.grad_rest)[:, None] * (filt.basis.T @ G))
    assert torch.allclose(got, U @ (want[:, None] * (U.T @ G)), atol=1e-12)


def test_whole_spectrum_rates_within_the_tolerance():
    settings = ResponseSettings(coordination=False, band_filter=False, beta=1.0, sigma=0.2)
    filt, U = _filter(settings)
    rates = 1 + torch.exp(-VALUES / 0.2)
    assert filt.grad_cols == 2  # no gradient response beyond the low band
    in_basis = set((U.T @ filt.basis).abs().argmax(dim=0).tolist())  # the eigenvector of each basis column
    inside = [i for i in range(2, 10) if i not in in_basis]  # the rest's, on the complement
    assert inside and all(abs(float(rates[i]) - filt.rate_rest) <= RATE_TOL * filt.rate_rest for i in inside)
    assert filt.rest_mean == pytest.approx(float(VALUES[inside].mean()))
    assert filt.rate_rest == pytest.approx(1 + math.exp(-filt.rest_mean / 0.2))
    # the rates of the basis columns are exact
    for j in range(filt.basis.size(1)):
        i = int((U.T @ filt.basis[:, j]).abs().argmax())
        assert float(filt.rate[j]) == pytest.approx(float(rates[i]))


def test_mean_and_last_rules():
    U = _orthonormal(10)
    trace = float(VALUES.sum())
    mean = class_filter(VALUES[:2], U[:, :2], ResponseSettings(rest="mean"), trace=trace)
    lam = (trace - float(VALUES[:2].sum())) / 8  # = the mean of the other eight
    assert mean.rest_mean == pytest.approx(float(VALUES[2:].mean())) == pytest.approx(lam)
    assert mean.grad_rest == pytest.approx(0.1 * 0.3) and mean.rate_rest == pytest.approx(1 + math.exp(-lam / 0.2))
    assert mean.basis.size(1) == 2 and mean.rule == "mean"
    last = class_filter(VALUES[:2], U[:, :2], ResponseSettings(rest="last"), trace=trace)
    assert last.grad_rest == pytest.approx(0.1 * 0.1) and last.rate_rest == 1.0
    # "spectrum" without the rest's pairs (LOBPCG): the mean rule
    only_k = class_filter(VALUES[:2], U[:, :2], ResponseSettings(rest="spectrum"), trace=trace)
    assert only_k.rule == "mean" and only_k.grad_rest == mean.grad_rest
    with pytest.raises(ValueError, match="trace"):
        class_filter(VALUES[:2], U[:, :2], ResponseSettings(rest="mean"))
    with pytest.raises(ValueError, match="rest_response='nope'"):
        ResponseSettings(rest="nope")


def test_no_rest_when_k_is_n():
    U = _orthonormal(4)
    filt = class_filter(VALUES[:4], U, ResponseSettings(), VALUES[:0], U[:, :0], trace=float(VALUES[:4].sum()))
    assert filt.basis.size(1) == 4 and math.isnan(filt.rest_mean) and filt.rate_rest == 1.0
    assert math.isnan(rest_mean_eigenvalue(1.0, VALUES[:4], 4))


def test_carried_coefficients_permutation_cluster_and_new_direction():
    U = _orthonormal(6)
    old, h = U[:, :3], torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64)
    # reordered and flipped: each keeps its own
    new = torch.stack([-old[:, 2], old[:, 0], old[:, 1]], dim=1)
    assert torch.allclose(carry_coefficients(h, old, new), torch.tensor([3.0, 0.5, 2.0], dtype=torch.float64))
    # a degenerate pair {1, 2} rotated by 30°: the overlap-weighted mean of its coefficients
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    rotated = torch.stack([old[:, 0], c * old[:, 1] + s * old[:, 2], -s * old[:, 1] + c * old[:, 2]], dim=1)
    got = carry_coefficients(h, old, rotated)
    assert torch.allclose(got, torch.tensor([0.5, c * c * 2 + s * s * 3, s * s * 2 + c * c * 3], dtype=torch.float64))
    assert float(got[1:].sum()) == pytest.approx(5.0)  # the cluster's total is kept
    # a direction outside the old low band starts from 1
    fresh = torch.stack([old[:, 0], old[:, 1], U[:, 4]], dim=1)
    assert torch.allclose(carry_coefficients(h, old, fresh), torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64))
    # signs aligned with the old vectors
    assert torch.allclose(align_signs(new, old), torch.stack([old[:, 2], old[:, 0], old[:, 1]], dim=1))


def test_laplacian_trace():
    ei, w = path(5)
    for norm in (None, "sym"):
        L = laplacian(ei, w, 5, norm)
        assert laplacian_trace(L) == pytest.approx(float(L.to_dense().trace()))
        assert laplacian_trace(L.to_dense()) == pytest.approx(float(torch.linalg.eigvalsh(L.to_dense()).sum()), rel=1e-5)
    assert laplacian_trace(laplacian(ei, w, 5, "sym")) == pytest.approx(5.0)  # L_sym: 1 per connected node


def test_update_response_is_the_rates_times_the_learned_coefficients_on_the_low_band():
    from speclora.spectral.response import ClassFilter, update_response

    rate = torch.tensor([1.5, 1.2, 1.1, 1.05])  # (m,) e(λ): k = 2 low-band columns, then 2 extra
    filt = ClassFilter(basis=torch.eye(4), values=torch.zeros(2), k=2, grad=torch.ones(4), grad_rest=1.0,
                       rate=rate, rate_rest=1.0, rest_mean=float("nan"), rule="mean", grad_cols=4)
    learned = torch.tensor([2.0, 0.5])  # (k,)
    assert torch.equal(update_response(filt, learned, True, True), torch.tensor([3.0, 0.6, 1.1, 1.05]))
    assert torch.equal(update_response(filt, learned, False, True), torch.tensor([2.0, 0.5, 1.0, 1.0]))
    assert torch.equal(update_response(filt, None, True, True), rate)  # before the first learned step
    assert torch.equal(update_response(filt, learned, True, False), rate)
    assert update_response(filt, learned, False, False) is None
    assert torch.equal(filt.rate, torch.tensor([1.5, 1.2, 1.1, 1.05]))  # not written into
