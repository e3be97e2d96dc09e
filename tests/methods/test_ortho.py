"""Ortho: the projection on hand-sized toys, the module's rewritten gradients, the CLI run."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from speclora.methods import task_grads as task_grads_module
from speclora.methods.ortho import (
    Ortho,
    block_index,
    draw_orders,
    project_conflicts,
)
from speclora.methods.task_grads import loss_scale, mean_over_ranks
from speclora.metrics import conflict_rate
from speclora.model.lora import lora_modules
from speclora.model.module import SpecLoRAModule
from tests.cli_args import fit_args
from tests.methods.modules import conflicting_module

REPO = Path(__file__).resolve().parents[2]
TASKS = ["rte", "stsb", "copa"]


# ---------------------------------------------------------------- the projection, exact values
def test_two_conflicting_tasks_project_onto_each_others_complement():
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])  # <g1, g2> = -1: a conflict
    out = project_conflicts(g)
    # g1' = g1 - (-1 / 2) g2 = (0.5, 0.5);  g2' = g2 - (-1 / 1) g1 = (0, 1)
    assert torch.allclose(out, torch.tensor([[0.5, 0.5], [0.0, 1.0]]))
    assert out[0] @ g[1] == 0 and out[1] @ g[0] == 0  # each is orthogonal to the other's original
    assert out[0] @ out[1] >= 0


def test_a_and_b_are_projected_separately():
    # coordinates 0-1 are the A block, 2-3 the B block; A conflicts (-1), B does not (+2), the whole does not (+1)
    g = torch.tensor([[1.0, 0.0, 1.0, 1.0], [-1.0, 1.0, 2.0, 0.0]])
    blocks = torch.tensor([0, 0, 1, 1])
    out = project_conflicts(g, blocks)
    assert torch.allclose(out, torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.0, 1.0, 2.0, 0.0]]))
    assert torch.equal(project_conflicts(g), g)  # one block: no conflict, nothing changes


def test_no_conflict_returns_the_input_exactly():
    g = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.0, 3.0], [0.0, 1.0, 1.0]])  # all inner products >= 0
    assert torch.equal(project_conflicts(g, order=draw_orders(3, seed=0, step=5)), g)
    zero = torch.tensor([[0.0, 0.0], [-1.0, 1.0]])  # a zero gradient conflicts with nothing
    assert torch.equal(project_conflicts(zero), zero)


def test_three_tasks_fixed_order_exact():
    g = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # only (1, 2) conflicts
    out = project_conflicts(g)
    assert torch.allclose(out, torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))


def test_the_given_order_is_followed():
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [-1.0, -2.0]])
    # g1 against g2 then g3: (0.5, 0.5) -> (0.5, 0.5) - (-1.5 / 5) (-1, -2) = (0.2, -0.1)
    first = project_conflicts(g, order=torch.tensor([[1, 2], [0, 2], [0, 1]]))
    # g1 against g3 then g2: (1, 0) - (-1 / 5)(-1, -2) = (0.8, -0.4) -> - (-1.2 / 2)(-1, 1) = (0.2, 0.2)
    second = project_conflicts(g, order=torch.tensor([[2, 1], [0, 2], [0, 1]]))
    assert torch.allclose(first[0], torch.tensor([0.2, -0.1]))
    assert torch.allclose(second[0], torch.tensor([0.2, 0.2]))


@pytest.mark.parametrize("seed", range(20))
def test_two_task_projections_never_conflict_within_a_block(seed):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(2, 12, generator=gen)
    blocks = torch.tensor([0] * 5 + [1] * 7)  # an "A" block of 5 and a "B" block of 7
    out = project_conflicts(g, blocks)
    for b in (0, 1):
        part = out[:, blocks == b]
        assert part[0] @ part[1] >= -1e-6


def test_orders_are_seeded_permutations_of_the_other_tasks():
    a, b = draw_orders(4, seed=3, step=7), draw_orders(4, seed=3, step=7)
    assert torch.equal(a, b)
    for i, row in enumerate(a.tolist()):
        assert sorted(row) == [j for j in range(4) if j != i]
    assert any(not torch.equal(draw_orders(4, seed=3, step=s), a) for s in range(8, 20))


def test_block_index_layouts():
    params = [torch.zeros(1, 2, 3), torch.zeros(1, 4, 2), torch.zeros(1, 2, 3), torch.zeros(1, 4, 2)]
    kinds = ["A", "B", "A", "B"]
    ab = block_index(params, kinds, "ab")
    assert ab.tolist() == [0] * 6 + [1] * 8 + [0] * 6 + [1] * 8
    assert block_index(params, kinds, "all").unique().tolist() == [0]
    assert block_index(params, kinds, "matrix").unique().tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "kwargs, message",
    [({"blocks": "rows"}, "model.method.init_args.blocks='rows'"),
     ({"order": "sorted"}, "model.method.init_args.order='sorted'"),
     ({"task_grads": "per_task"}, r"model.method.init_args.task_grads='per_task'; allowed: 'rows', 'backward'")],
)
def test_bad_options_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Ortho(**kwargs)


def test_ortho_refuses_one_task(tiny_backbone):
    with pytest.raises(ValueError, match=r"model.method=Ortho .* data.tasks has 1: \['rte'\]"):
        SpecLoRAModule(["rte"], backbone=tiny_backbone, method="ortho")


def testloss_scale_follows_the_amp_scaler():
    scaler = SimpleNamespace(get_scale=lambda: 1024.0)
    with_amp = SimpleNamespace(_trainer=SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler)))
    assert loss_scale(with_amp) == 1024.0
    assert loss_scale(SimpleNamespace(_trainer=None)) == 1.0
    assert loss_scale(SimpleNamespace(_trainer=SimpleNamespace(precision_plugin=SimpleNamespace()))) == 1.0


def test_single_process_sync_is_the_identity():
    g, present = torch.randn(3, 5), torch.tensor([True, False, True])
    out, seen = mean_over_ranks(g, present)
    assert out is g and seen is present


# ---------------------------------------------------------------- the module
def _ortho_module(tiny_backbone: str, task_grads: str = "rows") -> SpecLoRAModule:
    return conflicting_module(tiny_backbone, Ortho(order="fixed", task_grads=task_grads), TASKS)


@pytest.mark.parametrize("task_grads", ["rows", "backward"])
def test_a_step_writes_the_projected_sum_into_the_shared_lora(tiny_backbone, batch, task_grads, monkeypatch):
    module = _ortho_module(tiny_backbone, task_grads)
    layers = [m for _, m in lora_modules(module.encoder)]
    assert all(m.lora_A.shape[0] == 1 for m in layers)  # one shared adapter
    a_params = [m.lora_A for m in layers]
    b_params = [m.lora_B for m in layers]
    heads = list(module.heads.parameters())

    # reference, computed here: per-task gradients of λ_t L_t, projected within all-A and within all-B
    outputs = module(batch)
    weighted = {t: module.task_weights[t] * o.loss for t, o in outputs.items()}
    assert sorted(weighted) == [0, 1, 2]
    ref_a, ref_b, raw = [], [], []
    for t in sorted(weighted):
        ga = torch.autograd.grad(weighted[t], a_params, retain_graph=True)
        gb = torch.autograd.grad(weighted[t], b_params, retain_graph=True)
        ref_a.append(torch.cat([x.reshape(-1) for x in ga]))
        ref_b.append(torch.cat([x.reshape(-1) for x in gb]))
        raw.append(torch.cat([ref_a[-1], ref_b[-1]]))
    head_ref = torch.autograd.grad(sum(weighted.values()), heads)
    proj_a = project_conflicts(torch.stack(ref_a)).sum(0)  # (P_A,)
    proj_b = project_conflicts(torch.stack(ref_b)).sum(0)  # (P_B,)
    assert not torch.allclose(proj_a, torch.stack(ref_a).sum(0)), "no conflict in A: the test would be vacuous"

    # the module's step: training_step (per-task grads), the total backward, then after_backward
    extra = []  # ``rows`` takes no backward per task: its gradients come with the module's one backward
    real = task_grads_module.per_task_gradients
    monkeypatch.setattr(task_grads_module, "per_task_gradients", lambda *a, **k: extra.append(1) or real(*a, **k))
    module.zero_grad()
    loss = module.training_step(batch, 0)
    loss.backward()
    module.on_after_backward()

    got_a = torch.cat([p.grad.reshape(-1) for p in a_params])
    got_b = torch.cat([p.grad.reshape(-1) for p in b_params])
    assert torch.allclose(got_a, proj_a, atol=1e-6, rtol=1e-4)
    assert torch.allclose(got_b, proj_b, atol=1e-6, rtol=1e-4)
    for p, ref in zip(heads, head_ref):  # the heads keep their plain gradients
        assert torch.allclose(p.grad, ref, atol=1e-6, rtol=1e-4)
    assert module.adapted.work.conflict_rate == conflict_rate(torch.stack(raw))
    assert module.adapted.work.grads is None  # the step's per-task gradients are released
    assert len(extra) == (0 if task_grads == "rows" else 1)


@pytest.mark.parametrize("task_grads", ["rows", "backward"])
def test_accumulation_keeps_earlier_micro_batches(tiny_backbone, batch, task_grads):
    module = _ortho_module(tiny_backbone, task_grads)
    layer = lora_modules(module.encoder)[0][1]
    module.zero_grad()
    loss = module.training_step(batch, 0)
    loss.backward()
    module.on_after_backward()
    once = layer.lora_B.grad.clone()
    loss = module.training_step(batch, 1)  # the same micro-batch again, without zeroing
    loss.backward()
    module.on_after_backward()
    assert torch.allclose(layer.lora_B.grad, 2 * once, atol=1e-6, rtol=1e-4)


def test_export_writes_one_shared_adapter_per_task(tiny_backbone, tmp_path):
    module = SpecLoRAModule(TASKS, backbone=tiny_backbone, method="ortho")
    folders = module.export_adapters(tmp_path)
    assert [f.name for f in folders] == TASKS
    assert all((f / "adapter_config.json").is_file() and (f / "head.safetensors").is_file() for f in folders)


# ---------------------------------------------------------------- the CLI, 2 steps
@pytest.mark.parametrize(
    "suite, num_tasks",
    [("small.yaml", 3), pytest.param(None, 10, marks=pytest.mark.slow, id="default-suite")],
)
def test_ortho_runs_from_the_cli(suite, num_tasks, tiny_backbone, data_root, cache, tmp_path):
    from speclora.cli import main

    suites = [f"suites/{suite}"] if suite else []
    cli = main(["fit", *fit_args(tiny_backbone, data_root, cache, tmp_path / "runs", "methods/ortho.yaml", *suites,
                                 batch_size=16)])
    assert isinstance(cli.model.method, Ortho) and len(cli.model.specs) == num_tasks
    assert cli.model.method.blocks == "ab" and cli.model.method.order == "random"
    metrics = cli.trainer.callback_metrics
    for key in ("train/loss", "train/conflict_rate", "val/average", "val/rte/accuracy"):
        assert key in metrics, f"{key} not logged; logged: {sorted(metrics)}"
    assert 0.0 <= float(metrics["train/conflict_rate"]) <= 1.0
    assert cli.trainer.global_step == 2
    folders = cli.model.export_adapters(tmp_path / "export")
    assert len(folders) == num_tasks


def _sync_worker(rank: int, world: int, init_file: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # rank 0 holds tasks 0 and 1, rank 1 holds task 1 only; task 2 is absent everywhere
        grads = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 0.0]]) if rank == 0 else \
            torch.tensor([[0.0, 0.0], [3.0, -1.0], [0.0, 0.0]])
        present = torch.tensor([True, True, False]) if rank == 0 else torch.tensor([False, True, False])
        g, seen = mean_over_ranks(grads, present)
        results[rank] = (g.tolist(), seen.tolist())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: tens of seconds to import torch and speclora
def test_ranks_project_the_same_averaged_gradients(tmp_path):
    import torch.multiprocessing as mp

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_sync_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    expected = ([[1.0, 0.0], [2.0, 0.0], [0.0, 0.0]], [True, True, False])  # mean over ranks; present anywhere
    assert results[0] == expected and results[1] == expected
