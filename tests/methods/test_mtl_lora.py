"""MTL-LoRA on hand-sized matrices and on the tiny random BERT: the composed update, routing, peft export, CLI."""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel
from transformers import AutoModel

from speclora.methods import MTLLoRA
from speclora.methods.mtl_lora import MTLLoRANet, mtl_lora_adapters
from speclora.model.lora import lora_modules
from speclora.model.module import LoRAConfig, SpecLoRAModule
from tests.cli_args import fit_args

TASKS = ["rte", "stsb", "copa"]
R, ALPHA = 4, 8.0


# ---------------------------------------------------------------- the composed update, exact values
def test_the_update_is_the_mixed_b_times_the_transform_times_the_shared_a():
    A = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # (r=2, d_in=3)
    lam = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])  # (T=2, 2, 2)
    B = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]])  # (n=2, d_out=2, r=2)
    mix = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])  # (T, n): w_0 = (1/4, 3/4), w_1 = (1/2, 1/2) at τ = 1
    a_t, b_t = mtl_lora_adapters(A, lam, B, mix, temperature=1.0)
    # task 0: B_0 = diag(1/4, 3/4), Λ_0 A = [[2,0,0],[0,1,0]] -> ΔW_0 = [[1/2, 0, 0], [0, 3/4, 0]]
    # task 1: B_1 = diag(1/2, 1/2), Λ_1 A = [[0,1,0],[1,0,0]] -> ΔW_1 = [[0, 1/2, 0], [1/2, 0, 0]]
    want = torch.tensor([[[0.5, 0.0, 0.0], [0.0, 0.75, 0.0]], [[0.0, 0.5, 0.0], [0.5, 0.0, 0.0]]])
    torch.testing.assert_close(torch.bmm(b_t, a_t), want, rtol=0, atol=1e-6)
    # the temperature sharpens the mixing: τ → 0 picks each task's largest logit's B
    _, sharp = mtl_lora_adapters(A, lam, B, mix, temperature=1e-3)
    torch.testing.assert_close(sharp[0], B[1])


def test_a_diagonal_transform_is_a_full_diagonal_one():
    g = torch.Generator().manual_seed(0)
    A, B, mix = torch.randn(3, 5, generator=g), torch.randn(2, 4, 3, generator=g), torch.randn(2, 2, generator=g)
    diag = torch.randn(2, 3, generator=g)  # (T, r)
    full = torch.diag_embed(diag)  # (T, r, r)
    for x, y in zip(mtl_lora_adapters(A, diag, B, mix, 0.1), mtl_lora_adapters(A, full, B, mix, 0.1)):
        torch.testing.assert_close(x, y)


# ---------------------------------------------------------------- the module
def _module(backbone: str, method: MTLLoRA | None = None) -> SpecLoRAModule:
    return SpecLoRAModule(TASKS, backbone=backbone, method=method or MTLLoRA(),
                          lora=LoRAConfig(r=R, alpha=ALPHA, dropout=0.0), head_dropout=0.0).eval()


def _randomise(module: SpecLoRAModule, seed: int = 1) -> None:
    """Non-zero B's and non-identity transforms (they start at 0 and I)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*module.adapted.method_net.B, *module.adapted.method_net.lam]:
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _batch(n: int = 6, length: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, 2000, (n, length), generator=g)  # (N, L)
    attention_mask = torch.ones(n, length, dtype=torch.long)  # (N, L)
    attention_mask[2, 3:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "seq_task": torch.arange(n) % 3}


def test_parameters_and_start(tiny_backbone):
    module = _module(tiny_backbone)
    net, slots = module.adapted.method_net, module.slots
    layers = [m for _, m in lora_modules(module.encoder)]
    assert not any(p.requires_grad for m in layers for p in (m.lora_A, m.lora_B))  # storage for the export
    for k, (slot, layer) in enumerate(zip(slots, layers)):
        assert net.A[k].shape == (R, slot.d_in) and torch.equal(net.A[k], layer.lora_A[0])  # LoRA's shared draw
        assert net.lam[k].shape == (3, R, R) and torch.equal(net.lam[k], torch.eye(R).expand(3, R, R))
        assert net.B[k].shape == (3, slot.d_out, R) and not net.B[k].any()
        assert net.mix[k].shape == (3, 3) and net.mix[k].abs().max() <= 1 / math.sqrt(3)
    per_slot = sum(R * s.d_in + 3 * R * R + 3 * s.d_out * R + 3 * 3 for s in slots)
    assert module.trainable_parameters()["method"] == per_slot
    # B = 0: the model starts as the backbone
    batch = _batch()
    plain = AutoModel.from_pretrained(tiny_backbone).eval()
    with torch.no_grad():
        want = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state[:, 0]
        torch.testing.assert_close(module.encode(batch), want, atol=1e-6, rtol=1e-6)


def test_only_a_tasks_own_transform_and_mixing_get_its_gradient(tiny_backbone):
    module = _module(tiny_backbone)
    _randomise(module)
    batch = _batch()
    batch["seq_task"] = torch.zeros(6, dtype=torch.long)  # every row is task 0
    module.encode(batch).pow(2).sum().backward()
    net = module.adapted.method_net
    for k in range(len(module.slots)):
        assert net.lam[k].grad[0].abs().sum() > 0 and not net.lam[k].grad[1:].any()
        assert net.mix[k].grad[0].abs().sum() > 0 and not net.mix[k].grad[1:].any()
        assert net.A[k].grad.abs().sum() > 0 and all(net.B[k].grad[j].abs().sum() > 0 for j in range(3))


def test_rows_run_through_their_tasks_update(tiny_backbone):
    module = _module(tiny_backbone)
    _randomise(module)
    layer = lora_modules(module.encoder)[0][1]
    x = torch.randn(3, 5, layer.in_features)  # (N, L, d_in), one row per task
    module.router.set(torch.tensor([0, 1, 2]))
    module.router.set_weights(module.method.generate(module.adapted))
    try:
        with torch.no_grad():
            y = layer(x)  # (N, L, d_out)
    finally:
        module.router.set(None)
    net = module.adapted.method_net
    w = torch.softmax(net.mix[0] / 0.1, dim=-1)  # (T, n)
    for t in range(3):
        delta = (ALPHA / R) * torch.einsum("n,nor->or", w[t], net.B[0]) @ net.lam[0][t] @ net.A[0]  # (d_out, d_in)
        torch.testing.assert_close(y[t], layer.base(x[t]) + x[t] @ delta.T, atol=1e-5, rtol=1e-5)


def test_export_is_peft_and_peft_reproduces_each_task(tiny_backbone, tmp_path):
    module = _module(tiny_backbone)
    _randomise(module)
    written = module.export_adapters(tmp_path)
    assert [p.name for p in written] == TASKS
    batch = _batch()
    for t, task in enumerate(TASKS):
        peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_backbone), str(tmp_path / task)).eval()
        ours_batch = dict(batch, seq_task=torch.full((6,), t))
        with torch.no_grad():
            theirs = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            ours = module.encode(ours_batch)
        torch.testing.assert_close(theirs[:, 0], ours, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"MTLLoRA cannot load adapters .* model.method=Independent"):
        module.import_adapters(tmp_path)


def test_state_moves_with_the_module():
    from speclora.model.lora import LoRASlot

    slots = [LoRASlot("l.0.q", 0, "q", 6, 5)]
    net = MTLLoRANet(2, slots, 3, 2, diagonal=False, init_A=[torch.randn(3, 6)], seed=0).to("meta")
    assert all(p.device.type == "meta" for p in net.parameters())
    (a_t, b_t), = net(0.1)  # composed on the parameters' device, nothing created elsewhere
    assert a_t.device.type == b_t.device.type == "meta" and a_t.shape == (2, 3, 6) and b_t.shape == (2, 5, 3)


@pytest.mark.parametrize(("options", "match"), [
    ({"num_up": 0}, r"model.method.init_args.num_up=0; allowed: an integer >= 1"),
    ({"temperature": 0.0}, r"model.method.init_args.temperature=0.0; allowed: a number > 0"),
])
def test_bad_options_name_the_key(options, match):
    with pytest.raises(ValueError, match=match):
        MTLLoRA(**options)


def test_refuses_one_task(tiny_backbone):
    with pytest.raises(ValueError, match=r"model.method=MTLLoRA .* data.tasks has 1"):
        SpecLoRAModule(["rte"], backbone=tiny_backbone, method="mtl_lora")


# ---------------------------------------------------------------- the CLI, 2 steps
def test_runs_from_the_cli(tiny_backbone, data_root, tmp_path, tmp_path_factory):
    from speclora.cli import main

    cache = tmp_path_factory.getbasetemp() / "token_cache"
    cli = main(["fit", *fit_args(tiny_backbone, data_root, cache, tmp_path / "runs", "methods/mtl_lora.yaml",
                                 "suites/small.yaml", batch_size=16)])
    assert isinstance(cli.model.method, MTLLoRA) and cli.trainer.global_step == 2
    assert any(b.abs().sum() > 0 for b in cli.model.adapted.method_net.B)  # the B's moved from 0
    assert "val/average" in cli.trainer.callback_metrics
    folders = cli.model.export_adapters(tmp_path / "export")
    assert len(folders) == 3 and all((f / "adapter_model.safetensors").is_file() for f in folders)
