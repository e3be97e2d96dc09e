"""SpectralGraphCallback, hook by hook on a hand-sized model (16 nodes), against the math written out here
independently: EMA correlations → w → L_sym → every eigenpair (float64 eigh) → the responses of
docs/method.md. Each test fails if the piece it names is not applied, or applied to the wrong input."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch_geometric.utils import get_laplacian, to_dense_adj

from speclora.spectral.callback import SpectralGraphCallback
from speclora.spectral.correlation import magnitude_weights
from speclora.spectral.filters import hypergradient_step
from speclora.spectral.graph import sparsify_topk
from speclora.spectral.response import RATE_TOL
from tests.spectral.toy import Driver, Toy

# Table 3's coefficients on λ edges that keep clear of the toy graph's eigenvalues (two of which are exactly
# 2 and one 0.2004: on Table 3's own edges a float32 rounding would decide their band)
EDGES = torch.tensor([0.1, 0.5, 0.9, 1.5], dtype=torch.float64)
COEFFS = torch.tensor([1.2, 1.0, 0.6, 0.3, 0.1], dtype=torch.float64)
BANDS = dict(band_edges=EDGES.tolist(), band_coefficients=COEFFS.tolist())
QUIET = dict(log_every=10**6, heatmap_every=0, refresh_every=10**6)
PLAIN = dict(coordination=False, band_filter=False, eigen_lr=False, learned=False, regularizer="none")


def _callback(**kwargs) -> SpectralGraphCallback:
    return SpectralGraphCallback(**{"k": 3, **QUIET, **kwargs})


def _laplacian(cb: SpectralGraphCallback, weight: torch.Tensor) -> torch.Tensor:
    """L_sym = I − D^{-1/2} W D^{-1/2} (n, n) float64, written out from the candidate edges and weights (E,)."""
    n = cb.layout.num_nodes
    W = torch.zeros(n, n, dtype=torch.float64)
    W[cb.edge_index[0], cb.edge_index[1]] = weight.double()
    d = W.sum(1).rsqrt()  # (n,)
    return torch.eye(n, dtype=torch.float64) - d[:, None] * W * d[None, :]


def _cosine_weights(cb: SpectralGraphCallback, G: torch.Tensor, alpha: float = 5.0) -> torch.Tensor:
    """w = exp(−α(1 − |ρ|)) after one EMA step from zero: ρ_ij is the cosine of g_i and g_j."""
    i, j = cb.edge_index
    cos = torch.nn.functional.cosine_similarity(G[i].double(), G[j].double(), dim=-1)  # (E,)
    return torch.exp(-alpha * (1 - cos.abs()))


def _band(values: torch.Tensor) -> torch.Tensor:
    return COEFFS[torch.bucketize(values, EDGES, right=False)]


def test_band_filter_acts_on_the_whole_spectrum():
    cb = _callback(coordination=True, epsilon=0.1, band_filter=True, eigen_lr=False, learned=False,
                   regularizer="none", **BANDS)
    rec = Driver(Toy(), cb).step()
    lam, U = torch.linalg.eigh(_laplacian(cb, _cosine_weights(cb, rec["G"])))  # (16,), (16, 16)
    assert lam[3] - lam[2] > 1e-3  # the low band (k = 3) is well defined
    assert len(set(torch.bucketize(lam, EDGES).tolist())) >= 3  # the spectrum spans several bands
    # h_i = c_i · b(λ_i): c = 1 on the k smallest, ε on the rest; the whole spectrum, exactly
    h = torch.where(torch.arange(16) < 3, 1.0, 0.1) * _band(lam)
    G = rec["G"].double()
    expected = U @ (h[:, None] * (U.T @ G))
    assert torch.allclose(rec["G_filtered"].double(), expected, atol=1e-5)
    # what would pass without the band filter, or with the old rest (0.1 × 0.1): not this
    coordination_only = U[:, :3] @ (U[:, :3].T @ G) + 0.1 * (G - U[:, :3] @ (U[:, :3].T @ G))
    assert (rec["G_filtered"].double() - coordination_only).abs().max() > 1e-2
    assert cb.filters[0].rule == "spectrum" and cb.filters[0].basis.size(1) < 16  # a basis, not all n columns


@pytest.mark.parametrize("rest", ["mean", "last"])
def test_rest_rules_when_only_the_low_band_is_used(rest):
    cb = _callback(coordination=True, epsilon=0.1, band_filter=True, eigen_lr=True, learned=False,
                   regularizer="none", rest_response=rest, **BANDS)
    rec = Driver(Toy(), cb).step()
    L = _laplacian(cb, _cosine_weights(cb, rec["G"]))
    lam, U = torch.linalg.eigh(L)
    Uk = U[:, :3]
    mean = (float(L.trace()) - float(lam[:3].sum())) / (16 - 3)  # (tr L − Σλ_i)/(n − k)
    assert mean == pytest.approx(float(lam[3:].mean()), rel=1e-9)
    h_rest = 0.1 * (float(_band(torch.tensor([mean], dtype=torch.float64))[0]) if rest == "mean" else 0.1)
    G = rec["G"].double()
    low = Uk @ (_band(lam[:3])[:, None] * (Uk.T @ G))
    expected = low + h_rest * (G - Uk @ (Uk.T @ G))
    assert torch.allclose(rec["G_filtered"].double(), expected, atol=1e-5)
    filt = cb.filters[0]
    assert filt.grad_rest == pytest.approx(h_rest) and filt.rest_mean == pytest.approx(mean, rel=1e-5)
    assert filt.rate_rest == pytest.approx(1 + math.exp(-mean / 0.2) if rest == "mean" else 1.0, rel=1e-5)


def test_lobpcg_takes_the_mean_rule_with_the_trace():
    cb = _callback(solver="lobpcg", eigen_lr=False, learned=False, regularizer="none")  # rest: spectrum
    rec = Driver(Toy(), cb).step()
    L = _laplacian(cb, _cosine_weights(cb, rec["G"]))
    lam = torch.linalg.eigvalsh(L)
    filt = cb.filters[0]
    assert cb.last_refresh[0]["method"] == "lobpcg" and filt.rule == "mean" and filt.basis.size(1) == 3
    assert filt.rest_mean == pytest.approx(float(lam[3:].mean()), abs=1e-4)


def test_update_rates_on_the_whole_spectrum():
    cb = _callback(**{**PLAIN, "eigen_lr": True, "beta": 2.0, "sigma": 0.5})
    rec = Driver(Toy(), cb).step()
    lam, U = torch.linalg.eigh(_laplacian(cb, _cosine_weights(cb, rec["G"])))
    delta = (rec["theta_optimizer"] - rec["theta_before"]).double()  # the optimizer's update
    got = (rec["theta_after"] - rec["theta_before"]).double()
    exact = U @ ((1 + 2.0 * torch.exp(-lam / 0.5))[:, None] * (U.T @ delta))  # η_i/η on every component
    filt = cb.filters[0]
    # exact on the basis, the rest at the rate of its mean eigenvalue: within RATE_TOL of it
    assert (got - exact).norm() <= RATE_TOL * filt.rate_rest * delta.norm()
    assert (got - delta).norm() > 0.05 * delta.norm()  # the rates did act
    Uf = filt.basis.double()
    mechanics = filt.rate_rest * delta + Uf @ ((filt.rate.double() - filt.rate_rest)[:, None] * (Uf.T @ delta))
    assert torch.allclose(got, mechanics, atol=1e-5)
    # the old rule (rate 1 beyond the k computed) is the formula it was
    old = _callback(**{**PLAIN, "eigen_lr": True, "beta": 2.0, "sigma": 0.5, "rest_response": "last"})
    rec = Driver(Toy(), old).step()
    Uk = old.vectors[0].double()
    delta = (rec["theta_optimizer"] - rec["theta_before"]).double()
    h = 1 + 2.0 * torch.exp(-old.values[0].double() / 0.5)
    want = Uk @ ((h - 1)[:, None] * (Uk.T @ delta)) + delta
    assert torch.allclose((rec["theta_after"] - rec["theta_before"]).double(), want, atol=1e-5)


def test_hypergradient_reads_the_raw_gradient_and_the_last_raw_update():
    # a strong Dirichlet regulariser: U_kᵀ G' is then not a mere per-row rescaling of U_kᵀ G (which the
    # normalised hypergradient could not tell from U_kᵀ G; the high-pass gradient has no U_k part at all)
    cb = _callback(coordination=True, band_filter=True, eigen_lr=True, learned=True, hyper_lr=0.5,
                   regularizer="dirichlet", gamma=0.5)
    drive = Driver(Toy(), cb)
    recs, hs = [], []
    for _ in range(3):
        recs.append(drive.step())
        hs.append(cb.h_learned[0].clone())
    assert torch.equal(hs[0], torch.ones(3))  # step 0: no previous update yet
    Uk = cb.vectors[0]  # fixed since step 0 (no refresh after it)

    def expected(h, G, delta):
        return hypergradient_step(h, Uk.T @ G, Uk.T @ delta, 0.5, (0.1, 3.0))

    raw_update = [r["theta_optimizer"] - r["theta_before"] for r in recs]
    for t in (1, 2):
        # ∂L(θ_t)/∂h = ⟨U_kᵀ G_t, U_kᵀ Δ_{t−1}⟩: this step's raw gradient, the last step's raw update
        want = expected(hs[t - 1], recs[t]["G"], raw_update[t - 1])
        assert torch.allclose(hs[t], want, atol=1e-6)
    assert (hs[2] - 1).abs().max() > 0.05  # the coefficients moved
    # the inputs it must not take: the filtered gradient, the update of two steps back
    for wrong in (expected(hs[1], recs[2]["G_filtered"], raw_update[1]), expected(hs[1], recs[2]["G"], raw_update[0])):
        assert not torch.allclose(hs[2], wrong, atol=1e-4)
    # the update it keeps is the optimizer's, not the filtered one (the normalised hypergradient cannot tell
    # them apart while U_k stays: the update filter only rescales U_kᵀ Δ; the stored Δ and U_kᵀ Δ can)
    filtered_update = recs[2]["theta_after"] - recs[2]["theta_before"]
    assert torch.equal(cb.delta_prev[0], raw_update[2]) and not torch.allclose(filtered_update, raw_update[2])
    assert torch.allclose(cb._projected(cb._c_delta_prev, 0, cb.delta_prev[0]), Uk.T @ raw_update[2], atol=1e-6)


def test_dirichlet_regulariser_uses_the_graph_of_the_refresh():
    cb = _callback(**{**PLAIN, "regularizer": "dirichlet", "gamma": 0.05, "log_every": 1})
    model = Toy()
    drive = Driver(model, cb)
    first = drive.step()
    second = drive.step()
    L = _laplacian(cb, _cosine_weights(cb, first["G"])).float()  # the refresh was at step 0
    dtheta = second["theta_before"] - cb.theta0[0]
    assert dtheta.abs().max() > 0
    # G' = G + ∇ γ tr(ΔΘᵀ L ΔΘ) = G + 2γ L ΔΘ
    assert torch.allclose(second["G_filtered"], second["G"] + 2 * 0.05 * L @ dtheta, atol=1e-5)
    assert float(model.logged["train/spectral/reg"]) == pytest.approx(
        float(0.05 * (dtheta * (L @ dtheta)).sum()), rel=1e-4)
    # the EMAs have moved since, and the graph they would give is another one
    assert not torch.allclose(cb.edge_weights().double(), _cosine_weights(cb, first["G"]), atol=1e-3)


def test_carried_coefficients_follow_their_eigenvectors(monkeypatch):
    import speclora.spectral.callback_refresh as refresh
    from speclora.spectral.eigen import EigenResult

    def run(carry: str):
        cb = _callback(learned=True, hyper_lr=0.0, rest_response="mean", carry_coefficients=carry,
                       refresh_every=1)
        drive = Driver(Toy(), cb)
        drive.step()
        old_U, old_values = cb.vectors[0].clone(), cb.values[0].clone()
        cb.h_learned[0] = torch.tensor([0.5, 1.5, 2.5])
        old_cd = cb._projected(cb._c_delta_prev, 0, cb.delta_prev[0]).clone()  # U_kᵀ Δ (3, p)
        perm, signs = torch.tensor([2, 0, 1]), torch.tensor([1.0, -1.0, 1.0])
        # the next refresh finds the same eigenvectors in another order, one of them flipped
        monkeypatch.setattr(refresh, "smallest_eigenpairs", lambda *a, **k: EigenResult(
            old_values.clone(), old_U[:, perm] * signs, "dense", 0.0, 0))
        drive.step()
        new_cd = cb._projected(cb._c_delta_prev, 0, cb.delta_prev[0])
        monkeypatch.undo()
        return cb, old_U, old_cd, perm, new_cd

    cb, old_U, old_cd, perm, new_cd = run("overlap")
    assert torch.allclose(cb.h_learned[0], torch.tensor([2.5, 0.5, 1.5]))  # each with its eigenvector
    assert torch.allclose(cb.vectors[0], old_U[:, perm])  # signs aligned with the previous vectors
    assert new_cd.shape == old_cd.shape and torch.allclose(cb.vectors[0].T @ cb.delta_prev[0], new_cd, atol=1e-6)
    cb, *_ = run("index")
    assert torch.equal(cb.h_learned[0], torch.tensor([0.5, 1.5, 2.5]))  # stays with the index (the old rule)


def test_top_k_sparsified_training_graph_is_a_pyg_data():
    cb = _callback(**PLAIN, sparsify_topk=1)
    rec = Driver(Toy(), cb).step()
    w = _cosine_weights(cb, rec["G"]).float()
    ei, ew, _ = sparsify_topk(cb.edge_index, w, 1, 16)
    g = cb.graph
    assert (g.num_nodes, g.edge_index.shape, g.edge_type.shape) == (16, ei.shape, ew.shape)
    assert torch.equal(g.edge_index, ei) and torch.allclose(g.edge_weight, ew)
    assert ei.size(1) < cb.edge_index.size(1) and torch.bincount(ei[0], minlength=16).min() >= 1
    # the Laplacian is the graph's, as torch-geometric takes it
    idx, val = get_laplacian(g.edge_index, g.edge_weight, normalization="sym", num_nodes=16)
    L = to_dense_adj(idx, edge_attr=val, max_num_nodes=16)[0]
    assert torch.allclose(cb.class_laplacian(0).to_dense(), L, atol=1e-6)
    assert torch.allclose(cb.values[0], torch.linalg.eigvalsh(L.double())[:3].float(), atol=1e-5)
    full = _callback(**PLAIN)
    Driver(Toy(), full).step()
    assert full.graph.edge_index.size(1) == full.edge_index.size(1)  # no sparsification: every candidate edge


def test_magnitude_edges_are_parameter_magnitude_differences():
    cb = _callback(**PLAIN, edge_weighting="magnitude", alpha=2.0)
    rec = Driver(Toy(), cb).step()
    m = rec["theta_before"].double().norm(dim=1)  # ‖θ_v‖ at the refresh (node order: one class)
    i, j = cb.edge_index
    want = torch.exp(-2.0 * (m[i] - m[j]).abs() / torch.maximum(m[i], m[j]))
    assert torch.allclose(cb.graph.edge_weight.double(), want, atol=1e-6)
    grad = _callback(**PLAIN, edge_weighting="gradient_magnitude", alpha=2.0)
    rec = Driver(Toy(), grad).step()
    g = (0.1 * rec["G"].square().sum(1)).sqrt()  # sqrt(EMA ‖g‖²) after one step
    assert torch.allclose(grad.graph.edge_weight, magnitude_weights(g, grad.edge_index, 2.0), atol=1e-6)


def test_a_skipped_step_changes_nothing():
    def run(skipped: bool):
        cb = _callback(learned=True, hyper_lr=0.5)
        drive = Driver(Toy(), cb)
        grads = torch.Generator().manual_seed(3)
        steps = [[(torch.randn(2, 1, 2, generator=grads), torch.randn(2, 2, 1, generator=grads)) for _ in range(4)]
                 for _ in range(3)]
        drive.step(dict(enumerate(steps[0])))
        drive.step(dict(enumerate(steps[1])))
        if skipped:
            state = (cb.corr.ema.clone(), cb.h_learned[0].clone(), cb.delta_prev[0].clone())
            rec = drive.step(dict(enumerate(steps[2])), skip=True, poison=True)
            assert torch.equal(rec["theta_after"], rec["theta_before"])  # the update filter maps Δ = 0 to 0
            for a, b in zip(state, (cb.corr.ema, cb.h_learned[0], cb.delta_prev[0])):
                assert torch.equal(a, b)
            assert cb.counters["skipped_nonfinite"] == 1
        drive.step(dict(enumerate(steps[2])))
        return cb, drive.theta()

    (with_skip, theta_a), (without, theta_b) = run(True), run(False)
    # the run goes on exactly as if the bad step had never come
    assert torch.equal(theta_a, theta_b)
    assert torch.equal(with_skip.h_learned[0], without.h_learned[0])
    assert torch.equal(with_skip.corr.ema, without.corr.ema)


def test_resume_with_moved_coefficients_is_exact():
    def fresh():
        return SpectralGraphCallback(k=3, refresh_every=2, log_every=10**6, heatmap_every=0, hyper_lr=0.5,
                                     regularizer="dirichlet", sparsify_topk=2)

    full_cb = fresh()
    full = Driver(Toy(), full_cb, seed=7)
    for _ in range(3):
        full.step()
    saved = io.BytesIO()
    torch.save({"state": full_cb.state_dict(), "model": full.model.state_dict()}, saved)
    assert (full_cb.h_learned[0] - 1).abs().max() > 0.05  # coefficients that moved away from 1
    rest = [full.step() for _ in range(3)]  # steps 3-5, a refresh at 4

    saved.seek(0)
    ckpt = torch.load(saved, weights_only=False)
    model, cb = Toy(seed=5), fresh()  # other initial values: all of it must come from the checkpoint
    model.load_state_dict(ckpt["model"])
    cb.load_state_dict(ckpt["state"])
    resumed = Driver(model, cb)
    resumed.trainer.global_step = 3
    for r in rest:
        grads = {i: (g_a, g_b) for i, (g_a, g_b) in enumerate(_grads_of(r, cb))}
        resumed.step(grads)
    assert torch.equal(resumed.theta(), full.theta())
    assert torch.equal(cb.h_learned[0], full_cb.h_learned[0])
    assert torch.equal(cb.corr.ema, full_cb.corr.ema) and torch.equal(cb.graph_weight, full_cb.graph_weight)


def _grads_of(record, cb):
    """The per-layer (A grad, B grad) a record's stacked raw gradient G came from."""
    from speclora.spectral.signals import unstack_signals

    A, B = unstack_signals(cb.layout, [record["G"]])
    return [(a.contiguous(), b.contiguous()) for a, b in zip(A, B)]
