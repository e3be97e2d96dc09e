"""FAMO: the weights and the logit update on hand-sized toys, the module's reweighted loss, the CLI run."""

from __future__ import annotations

import math

import pytest
import torch

from speclora.methods import FAMO
from speclora.methods.famo import FAMOState, global_task_losses
from speclora.methods.weighting import adam_update, famo_logit_grad, famo_weights, masked_softmax
from speclora.model.module import SpecLoRAModule
from tests.cli_args import fit_args

TASKS = ["rte", "stsb", "copa"]


# ---------------------------------------------------------------- the math, exact values
def test_weights_on_two_tasks_by_hand():
    # z = (1/2, 1/2), ℓ = (1, 2): c = 1 / (1/2 + 1/4) = 4/3, w = c z / ℓ = (2/3, 1/3)
    w = famo_weights(torch.zeros(2, dtype=torch.float64), torch.tensor([1.0, 2.0], dtype=torch.float64),
                     torch.tensor([True, True]), eps=0.0)
    assert torch.allclose(w, torch.tensor([2 / 3, 1 / 3], dtype=torch.float64), rtol=0, atol=1e-15)


def test_an_absent_task_gets_no_weight_and_the_others_renormalise():
    # logits (0, log 3, 5) with task 2 absent: z = (1/4, 3/4, 0); ℓ = (1, 3): c = 1/(1/4 + 1/4) = 2, w = (1/2, 1/2, 0)
    logits = torch.tensor([0.0, math.log(3.0), 5.0], dtype=torch.float64)
    w = famo_weights(logits, torch.tensor([1.0, 3.0, 0.0], dtype=torch.float64), torch.tensor([True, True, False]),
                     eps=0.0)
    assert torch.allclose(w, torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64), rtol=0, atol=1e-15)


def test_the_weighted_gradient_is_famos_log_loss_gradient():
    # Σ_t w_t ∇ℓ_t = ∇ Σ_t c z_t log ℓ_t, on two quadratic losses of θ ∈ R^3
    theta = torch.tensor([0.3, -1.2, 0.7], dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[1.0, 0.0, 2.0], [-1.0, 1.0, 0.0]], dtype=torch.float64)
    losses = ((theta - targets) ** 2).sum(1)  # (2,)
    logits = torch.tensor([0.4, -0.2], dtype=torch.float64)
    w = famo_weights(logits, losses, torch.tensor([True, True]), eps=0.0)
    (ours,) = torch.autograd.grad((w * losses).sum(), theta, retain_graph=True)
    z = torch.softmax(logits, 0)
    c = 1.0 / (z / losses.detach()).sum()
    (famo,) = torch.autograd.grad((c * z * losses.log()).sum(), theta)
    assert torch.allclose(ours, famo, rtol=1e-12, atol=0)


def test_logit_gradient_by_hand():
    # z = (1/2, 1/2), δ = (1, 0): ∂zᵀδ/∂ξ = z ⊙ (δ − zᵀδ) = (1/4, −1/4): task 0 improved, its logit is pushed down
    g = famo_logit_grad(torch.zeros(2), torch.tensor([1.0, 0.0]), torch.tensor([True, True]))
    assert g.tolist() == [0.25, -0.25]
    # a task outside the mask neither moves nor counts: the same answer with a third, masked task
    g3 = famo_logit_grad(torch.tensor([0.0, 0.0, 9.0]), torch.tensor([1.0, 0.0, 7.0]), torch.tensor([True, True, False]))
    assert g3.tolist() == [0.25, -0.25, 0.0]
    # it is the autograd gradient of zᵀδ
    xi = torch.tensor([0.3, -0.5, 1.1], dtype=torch.float64, requires_grad=True)
    delta = torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64)
    (ref,) = torch.autograd.grad(torch.softmax(xi, 0) @ delta, xi)
    assert torch.allclose(famo_logit_grad(xi.detach(), delta, torch.ones(3, dtype=torch.bool)), ref, rtol=1e-12)


def test_adam_update_is_torchs_adam_with_l2_decay():
    xi = torch.tensor([0.1, -0.3, 0.2])
    ref = xi.clone().requires_grad_(True)
    opt = torch.optim.Adam([ref], lr=0.025, weight_decay=0.01)
    m, v, step = torch.zeros(3), torch.zeros(3), torch.zeros((), dtype=torch.long)
    for k in range(4):
        grad = torch.tensor([0.5, -1.0, 0.25]) * (k + 1)
        adam_update(xi, grad, m, v, step, lr=0.025, weight_decay=0.01)
        ref.grad = grad.clone()
        opt.step()
        assert torch.allclose(xi, ref.detach(), rtol=1e-5, atol=1e-6), k
    assert int(step) == 4


def test_state_moves_with_the_module_and_the_math_stays_on_its_device():
    state = FAMOState(3).to("meta")
    assert all(b.device.type == "meta" for b in state.buffers())
    # the functions create nothing on another device: on meta inputs they return meta tensors
    w = famo_weights(state.logits, state.prev_log_loss, state.prev_present)
    g = famo_logit_grad(state.logits, state.prev_log_loss, state.prev_present)
    adam_update(state.logits, g, state.exp_avg, state.exp_avg_sq, state.step, lr=0.1)
    assert w.device.type == g.device.type == state.logits.device.type == "meta"


def test_single_process_global_losses_are_the_local_ones():
    losses, present = global_task_losses(torch.tensor([0.5, 0.0, 2.0]), torch.tensor([4.0, 0.0, 2.0]))
    assert losses.tolist() == [0.5, 0.0, 2.0] and present.tolist() == [True, False, True]


def test_masked_softmax_of_nothing_is_zero():
    assert masked_softmax(torch.zeros(2), torch.tensor([False, False])).tolist() == [0.0, 0.0]


# ---------------------------------------------------------------- options
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"adapters": "moe"}, r"model.method.init_args.adapters='moe'; allowed: 'per_task', 'shared'"),
    ({"lr": 0.0}, r"model.method.init_args.lr=0.0; allowed: a number > 0"),
    ({"gamma": -1.0}, r"model.method.init_args.gamma=-1.0"),
    ({"eps": 0.0}, r"model.method.init_args.eps=0.0"),
])
def test_bad_options_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FAMO(**kwargs)


def test_refuses_one_task_and_size_weights(tiny_backbone):
    with pytest.raises(ValueError, match=r"model.method=FAMO .* data.tasks has 1"):
        SpecLoRAModule(["rte"], backbone=tiny_backbone, method="famo")
    with pytest.raises(ValueError, match=r"model.loss_weights='size' .* allowed with FAMO: 'uniform'"):
        SpecLoRAModule(TASKS, backbone=tiny_backbone, method="famo", loss_weights="size")


# ---------------------------------------------------------------- the module
@pytest.mark.parametrize("adapters", ["per_task", "shared"])
def test_a_step_minimises_the_famo_weighted_loss_and_the_next_updates_the_logits(tiny_backbone, batch, adapters):
    torch.manual_seed(0)
    module = SpecLoRAModule(TASKS, backbone=tiny_backbone, method=FAMO(adapters=adapters, lr=0.1)).eval()
    assert module.router.num_adapters == (1 if adapters == "shared" else 3)
    state = module.adapted.method_state
    _, out = module.batch_loss(batch)
    losses = out.task_loss.detach()  # (T,) all three tasks are present
    assert bool((out.task_count > 0).all())

    loss = module.training_step(batch, 0)
    # first step: ξ = 0 (no previous step to learn from), w = c z / ℓ with z uniform
    assert state.logits.tolist() == [0.0, 0.0, 0.0] and int(state.step) == 0
    z = torch.full((3,), 1 / 3)
    c = 1 / (z / (losses + 1e-8)).sum()
    w = c * z / (losses + 1e-8)
    assert torch.allclose(state.weights, w, rtol=1e-6)
    assert torch.allclose(loss, (w * losses).sum(), rtol=1e-5)

    # second step: the last log-losses were one nat higher for task 0, so task 0 "improved" most
    state.prev_log_loss.add_(torch.tensor([1.0, 0.0, 0.0]))
    delta = state.prev_log_loss - torch.log(losses + 1e-8)  # (T,)
    xi = torch.zeros(3)
    adam_update(xi, famo_logit_grad(xi, delta, torch.ones(3, dtype=torch.bool)), torch.zeros(3), torch.zeros(3),
                torch.zeros((), dtype=torch.long), lr=0.1, weight_decay=0.01)
    module.training_step(batch, 1)
    assert int(state.step) == 1
    assert torch.allclose(state.logits, xi, atol=1e-6)
    assert state.logits[0] < 0 < state.logits[1]  # weight moves away from the task that improved most
    assert torch.allclose(state.weights, famo_weights(xi, losses, torch.ones(3, dtype=torch.bool)), rtol=1e-5)


def test_state_is_saved_and_restored(tiny_backbone):
    module = SpecLoRAModule(TASKS, backbone=tiny_backbone, method="famo")
    module.adapted.method_state.logits.copy_(torch.tensor([0.1, -0.2, 0.3]))
    module.adapted.method_state.step.fill_(5)
    state = {k: v for k, v in module.state_dict().items() if k.startswith("adapted.method_state.")}
    assert set(state) == {f"adapted.method_state.{n}" for n in ("logits", "exp_avg", "exp_avg_sq", "prev_log_loss",
                                                                "weights", "step", "prev_present")}
    other = SpecLoRAModule(TASKS, backbone=tiny_backbone, method="famo")
    other.load_state_dict(module.state_dict())
    restored = other.adapted.method_state
    assert restored.logits.tolist() == pytest.approx([0.1, -0.2, 0.3]) and int(restored.step) == 5


# ---------------------------------------------------------------- the CLI, 3 steps
def test_famo_runs_from_the_cli(tiny_backbone, data_root, cache, tmp_path):
    from speclora.cli import main

    cli = main(["fit", *fit_args(tiny_backbone, data_root, cache, tmp_path / "runs", "methods/famo.yaml",
                                 "suites/small.yaml", steps=3, batch_size=16)])
    assert isinstance(cli.model.method, FAMO) and cli.trainer.global_step == 3
    metrics = cli.trainer.callback_metrics
    for key in ("train/loss", "train/famo_reweighting", "val/average"):
        assert key in metrics, f"{key} not logged; logged: {sorted(metrics)}"
    state = cli.model.adapted.method_state
    assert int(state.step) >= 1 and bool(state.logits.ne(0).any())  # the logits learned from steps 2 and 3
    folders = cli.model.export_adapters(tmp_path / "export")
    assert len(folders) == 3 and all((f / "adapter_config.json").is_file() for f in folders)
