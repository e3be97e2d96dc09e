"""CAGrad and Nash-MTL: the combinations on hand-sized toys, the module's rewritten gradients, the CLI run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from speclora.methods import CAGrad, NashMTL
from speclora.methods.task_grads import mean_over_ranks, replace_batch_gradient
from speclora.methods.weighting import (
    cagrad_coefficients,
    cagrad_direction,
    conflict_share,
    nash_coefficients,
)
from speclora.model.lora import lora_modules
from speclora.model.module import SpecLoRAModule
from tests.cli_args import fit_args
from tests.methods.modules import conflicting_module

TASKS = ["rte", "stsb", "copa"]


# ---------------------------------------------------------------- CAGrad, exact values
@pytest.mark.parametrize("c", [0.0, 0.4, 0.5, 2.0])
def test_cagrad_on_orthogonal_unit_gradients(c):
    # g₁ = e₁, g₂ = e₂: w* = (1/2, 1/2) by symmetry, g_w = g₀ = (1/2, 1/2), ‖g₀‖ = 1/√2, so
    # d = g₀ + (c ‖g₀‖ / ‖g₀‖) g₀ = (1 + c) g₀, and with the rescale (1 + c) / (1 + c²) g₀
    g = torch.eye(2, dtype=torch.float64)
    assert torch.allclose(cagrad_direction(g, c, rescale=False), torch.full((2,), (1 + c) / 2, dtype=torch.float64),
                          atol=1e-9)
    assert torch.allclose(cagrad_direction(g, c), torch.full((2,), (1 + c) / (2 * (1 + c * c)), dtype=torch.float64),
                          atol=1e-9)


def _worst_improvement(g: np.ndarray, d: np.ndarray) -> np.ndarray:
    return (d @ g.T).min(axis=-1)  # min_t ⟨g_t, d⟩


@pytest.mark.parametrize("grads", [
    [[1.0, 0.0], [-0.8, 0.3]],            # strongly conflicting
    [[2.0, 1.0], [-0.5, 1.5]],            # mildly conflicting, unequal norms
    [[1.0, 0.2], [0.3, 1.0], [-0.6, 0.9]],  # three tasks in the plane
])
@pytest.mark.parametrize("c", [0.3, 0.8])
def test_cagrad_maximises_the_worst_improvement_in_the_ball(grads, c):
    """The primal CAGrad problem, solved by brute force over a dense grid of the ball ‖d − g₀‖ ≤ c‖g₀‖."""
    g = np.array(grads)
    g0 = g.mean(0)
    radius = c * np.linalg.norm(g0)
    d = cagrad_coefficients(g @ g.T, c, rescale=False) @ g  # (2,)
    assert np.linalg.norm(d - g0) <= radius * (1 + 1e-9)  # feasible
    angles = np.linspace(0, 2 * math.pi, 8_001)[:, None]  # (A, 1)
    radii = np.linspace(0, 1, 51)[None, :, None] * radius  # (1, R, 1)
    circle = np.stack([np.cos(angles), np.sin(angles)], -1)  # (A, 1, 2)
    grid = (g0 + radii * circle).reshape(-1, 2)  # (A·R, 2) points of the ball
    best = _worst_improvement(g, grid).max()
    got = _worst_improvement(g, d[None])[0]
    assert got >= best - 1e-6 * np.abs(best)  # no point of the grid does better
    assert got <= best + 2e-3 * np.abs(best) + 1e-9  # and the grid comes close to it (the test is not vacuous)
    assert got > _worst_improvement(g, g0[None])[0]  # better for the worst task than the average gradient


def test_cagrad_module_coefficients_sum_to_the_plain_step_at_c_zero():
    gram = np.array([[1.0, -0.5], [-0.5, 2.0]])
    assert np.allclose(CAGrad(c=0.0).coefficients(gram, 1.0), [1.0, 1.0])
    assert np.allclose(cagrad_coefficients(np.zeros((3, 3)), 0.4), np.full(3, 1 / 3) / 1.16)  # no gradient: g₀ = 0


# ---------------------------------------------------------------- Nash-MTL, exact values
def test_nash_on_orthogonal_gradients_by_hand():
    # g₁ = (2, 0), g₂ = (0, 1): K = diag(4, 1), α_t² K_tt = 1, α = (1/2, 1), d = Gα = (1, 1): ⟨g_t, d⟩ = 1/α_t
    alpha, ok = nash_coefficients(np.diag([4.0, 1.0]), normalize=False, ridge=0.0)
    assert ok and np.allclose(alpha, [0.5, 1.0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("rho", [-0.5, 0.0, 0.6])
def test_nash_on_two_unit_gradients_at_an_angle(rho):
    # K = [[1, ρ], [ρ, 1]]: by symmetry α₁ = α₂ = a with a²(1 + ρ) = 1, so a = 1/√(1 + ρ)
    alpha, ok = nash_coefficients(np.array([[1.0, rho], [rho, 1.0]]), normalize=False, ridge=0.0)
    assert ok and np.allclose(alpha, 1 / math.sqrt(1 + rho), rtol=1e-12)


def test_nash_solves_k_alpha_equals_one_over_alpha_and_normalising_scales_alpha():
    g = np.random.default_rng(0).normal(size=(4, 7))  # four tasks in R^7
    k = g @ g.T
    alpha, ok = nash_coefficients(k, normalize=False, ridge=0.0)
    assert ok and (alpha > 0).all()
    assert np.allclose(k @ alpha, 1 / alpha, rtol=1e-9)  # every task's utility ⟨g_t, d⟩ = 1/α_t
    assert math.isclose(float(alpha @ k @ alpha), 4.0, rel_tol=1e-9)  # ‖d‖² = S
    normed, ok = nash_coefficients(k, normalize=True, ridge=0.0)  # K/N has the solution √N α
    assert ok and np.allclose(normed, math.sqrt(np.linalg.norm(k)) * alpha, rtol=1e-9)


def test_nash_is_invariant_to_the_scale_of_a_task():
    g = np.random.default_rng(1).normal(size=(3, 5))
    scaled = g * np.array([[3.0], [1.0], [0.25]])
    a, _ = nash_coefficients(g @ g.T, normalize=False, ridge=0.0)
    b, _ = nash_coefficients(scaled @ scaled.T, normalize=False, ridge=0.0)
    assert np.allclose(a @ g, b @ scaled, rtol=1e-9)  # the same direction d


def test_nash_on_opposed_gradients_stays_finite():
    g = np.array([[1.0, 0.5], [-1.0, -0.5]])  # no direction helps both: no bargaining solution
    alpha, ok = nash_coefficients(g @ g.T)  # the ridge keeps the potential bounded
    assert ok and np.isfinite(alpha).all() and np.linalg.norm(alpha @ g) < 1e-3
    nan, ok = nash_coefficients(np.array([[np.nan, 0.0], [0.0, 1.0]]))
    assert not ok and np.isnan(nan).all()


def test_conflict_share_counts_negative_pairs():
    assert conflict_share(np.array([[1.0, -1.0, 0.5], [-1.0, 1.0, 0.2], [0.5, 0.2, 1.0]])) == pytest.approx(1 / 3)
    assert conflict_share(np.ones((1, 1))) is None


# ---------------------------------------------------------------- options
@pytest.mark.parametrize(("cls", "kwargs", "message"), [
    (CAGrad, {"c": -0.1}, r"model.method.init_args.c=-0.1; allowed: a number >= 0"),
    (NashMTL, {"max_norm": -1.0}, r"model.method.init_args.max_norm=-1.0"),
    (NashMTL, {"tol": 0.0}, r"model.method.init_args.tol=0.0"),
    (NashMTL, {"max_iter": 0}, r"model.method.init_args.max_iter=0"),
    (CAGrad, {"task_grads": "per_row"}, r"model.method.init_args.task_grads='per_row'; allowed: 'rows', 'backward'"),
])
def test_bad_options_name_the_key(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


@pytest.mark.parametrize("name", ["cagrad", "nash_mtl"])
def test_refuses_one_task(tiny_backbone, name):
    with pytest.raises(ValueError, match=r"data.tasks has 1: \['rte'\]; give two or more tasks"):
        SpecLoRAModule(["rte"], backbone=tiny_backbone, method=name)


def test_single_process_sync_is_the_identity_and_replacement_keeps_accumulated_gradients():
    g, present = torch.randn(3, 5), torch.tensor([True, False, True])
    out, seen = mean_over_ranks(g, present)
    assert out is g and seen is present
    p = torch.nn.Parameter(torch.zeros(2, 2))
    p.grad = torch.ones(2, 2)  # an earlier micro-batch (1) plus this batch's plain sum (here 2)
    p.grad += 2.0
    replace_batch_gradient([p], torch.full((4,), 2.0), torch.full((4,), 5.0))
    assert p.grad.tolist() == [[6.0, 6.0], [6.0, 6.0]]


# ---------------------------------------------------------------- the module
def _module(tiny_backbone: str, method) -> SpecLoRAModule:
    return conflicting_module(tiny_backbone, method, TASKS)


@pytest.mark.parametrize("method", [CAGrad(c=0.5), NashMTL(max_norm=0.0), NashMTL(max_norm=2.0),
                                    CAGrad(c=0.5, task_grads="backward"), NashMTL(max_norm=0.0, task_grads="backward")],
                         ids=["cagrad", "nash", "nash-clipped", "cagrad-backward", "nash-backward"])
def test_a_step_writes_the_combination_into_the_shared_lora(tiny_backbone, batch, method):
    module = _module(tiny_backbone, method)
    params = module.adapted.work.params
    assert len(params) == 2 * len(lora_modules(module.encoder)) and all(p.shape[0] == 1 for p in params)
    heads = list(module.heads.parameters())

    # reference, computed here: per-task gradients of λ_t L_t on the shared LoRA, combined by the pure functions
    outputs = module(batch)
    weighted = {t: module.task_weights[t] * o.loss for t, o in outputs.items()}
    assert sorted(weighted) == [0, 1, 2]
    g = torch.stack([torch.cat([x.reshape(-1) for x in torch.autograd.grad(weighted[t], params, retain_graph=True)])
                     for t in sorted(weighted)])  # (3, P)
    head_ref = torch.autograd.grad(sum(weighted.values()), heads)
    gram = (g.double() @ g.double().T).numpy()
    if isinstance(method, CAGrad):
        want = 3 * cagrad_direction(g, 0.5)  # S·d
    else:
        alpha, _ = nash_coefficients(gram)
        want = torch.as_tensor(alpha, dtype=g.dtype) @ g
        if method.max_norm > 0:
            assert want.norm() > method.max_norm  # the clip acts
            want = want * (method.max_norm / want.norm())
    assert not torch.allclose(want, g.sum(0), rtol=1e-3), "the combination is the plain sum: the test is vacuous"

    module.zero_grad()
    loss = module.training_step(batch, 0)
    loss.backward()
    module.on_after_backward()
    got = torch.cat([p.grad.reshape(-1) for p in params])
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-4)
    for p, ref in zip(heads, head_ref):  # the heads keep their plain gradients
        assert torch.allclose(p.grad, ref, atol=1e-6, rtol=1e-4)
    assert module.adapted.work.grads is None and module.adapted.work.last["tasks"] == [0, 1, 2]


@pytest.mark.parametrize("config", ["cagrad", "nash_mtl"])
def test_runs_from_the_cli(config, tiny_backbone, data_root, cache, tmp_path):
    from speclora.cli import main

    cli = main(["fit", *fit_args(tiny_backbone, data_root, cache, tmp_path / "runs", f"methods/{config}.yaml",
                                 "suites/small.yaml", batch_size=16)])
    assert cli.model.method.name == config and cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    for key in ("train/loss", "train/conflict_rate", "val/average"):
        assert key in metrics, f"{key} not logged; logged: {sorted(metrics)}"
    folders = cli.model.export_adapters(tmp_path / "export")
    assert len(folders) == 3 and all((f / "adapter_config.json").is_file() for f in folders)


def test_nash_clip_compares_the_unscaled_norm():
    d = torch.tensor([3.0, 4.0]) * 1024.0  # ‖d‖ = 5 before the AMP loss scale 1024
    clipped = NashMTL(max_norm=1.0).limit(d, 1024.0)
    assert torch.allclose(clipped, torch.tensor([0.6, 0.8]) * 1024.0)
    assert torch.equal(NashMTL(max_norm=10.0).limit(d, 1024.0), d)  # under the limit: unchanged
    assert torch.equal(NashMTL(max_norm=0.0).limit(d, 1.0), d)  # 0: no clip


def test_row_gradients_of_a_layer_by_hand():
    from speclora.methods.task_grads import row_task_gradients

    # one token per row, r = 1: y = W x + c B A h, rows 0 and 2 of task 0, row 1 of task 1
    h = torch.tensor([[[1.0, 2.0]], [[0.0, 1.0]], [[3.0, 0.0]]])  # (N=3, L=1, d_in=2)
    delta = torch.tensor([[[1.0]], [[2.0]], [[-1.0]]])  # (N, L, d_out=1)
    A, B = torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0]])  # (1, 2), (1, 1)
    onehot = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    grad_a, grad_b = row_task_gradients(h, delta, A, B, onehot, scaling=0.5)
    # ∂/∂B = c Σ δ (A h): task 0: 0.5 (1·3 + (−1)·3) = 0; task 1: 0.5 · 2 · 1 = 1
    assert grad_b.flatten().tolist() == [0.0, 1.0]
    # ∂/∂A = c Σ (B δ) hᵀ: task 0: 0.5 (2·[1, 2] − 2·[3, 0]) = [−2, 2]; task 1: 0.5 · 4 · [0, 1] = [0, 2]
    assert grad_a.reshape(2, 2).tolist() == [[-2.0, 2.0], [0.0, 2.0]]


def test_rows_and_backward_give_the_same_per_task_gradients_with_dropout(tiny_backbone, batch):
    """In training mode (encoder and LoRA dropout on): the per-row sums equal one autograd.grad per task."""
    module = _module(tiny_backbone, NashMTL(max_norm=0.0)).train()
    state = module.adapted.work
    torch.manual_seed(3)
    loss = module.training_step(batch, 0)
    loss.backward()
    rows = state.rows.disarm()  # (T, P), before after_backward consumes it
    assert rows is not None and rows.abs().sum() > 0
    module.zero_grad()
    torch.manual_seed(3)  # the same dropout masks
    out = module(batch)
    grads = torch.stack([torch.cat([x.reshape(-1) for x in torch.autograd.grad(
        module.task_weights[t] * out[t].loss, state.params, retain_graph=True)]) for t in range(3)])
    torch.testing.assert_close(rows, grads, atol=1e-6, rtol=1e-4)
