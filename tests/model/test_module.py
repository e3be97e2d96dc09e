"""The LightningModule on a tiny random encoder: heads, methods, losses, adapter export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from speclora.data.datamodule import MultiTaskDataModule
from speclora.methods import Independent, Shared, Single
from speclora.model.lora import lora_modules
from speclora.model.module import LoRAConfig, OptimConfig, SpecLoRAModule

TASKS = ["rte", "stsb", "copa"]


@pytest.fixture(scope="module")
def batch(tiny_backbone, data_root, tmp_path_factory):
    dm = MultiTaskDataModule(tasks=TASKS, data_dir=str(data_root), tokenizer=tiny_backbone, max_length=48,
                             batch_size=16, cache_dir=str(tmp_path_factory.getbasetemp() / "token_cache"), mixing="equal")
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def _randomise_adapters(module: SpecLoRAModule) -> None:
    g = torch.Generator().manual_seed(1)
    for _, layer in lora_modules(module.encoder):
        layer.lora_A.data = torch.randn(layer.lora_A.shape, generator=g) * 0.2
        layer.lora_B.data = torch.randn(layer.lora_B.shape, generator=g) * 0.2


def test_methods_hold_the_right_adapters(tiny_backbone):
    independent = SpecLoRAModule(TASKS, backbone=tiny_backbone, method=Independent())
    shared = SpecLoRAModule(TASKS, backbone=tiny_backbone, method=Shared())
    (_, layer), *_ = lora_modules(independent.encoder)
    assert layer.lora_A.shape[0] == 3
    (_, layer), *_ = lora_modules(shared.encoder)
    assert layer.lora_A.shape[0] == 1
    # 2 layers x 4 attention projections (32x32), rank 8: A and B of 8*32 each
    per_adapter = 2 * 4 * 2 * 8 * 32
    count = sum(p.numel() for _, m in lora_modules(independent.encoder) for p in (m.lora_A, m.lora_B))
    assert count == 3 * per_adapter
    frozen = [n for n, p in independent.encoder.named_parameters() if p.requires_grad and "lora_" not in n]
    assert frozen == []


def test_single_refuses_several_tasks(tiny_backbone):
    with pytest.raises(ValueError, match="model.method=Single trains one task alone"):
        SpecLoRAModule(TASKS, backbone=tiny_backbone, method=Single())


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: LoRAConfig(r=0), "model.lora.r=0"),
        (lambda: LoRAConfig(dropout=1.0), "model.lora.dropout=1.0"),
        (lambda: OptimConfig(lr=0.0), "model.optim.lr=0.0"),
        (lambda: OptimConfig(warmup_ratio=1.5), "model.optim.warmup_ratio=1.5"),
    ],
)
def test_bad_hyperparameters_name_the_flag(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_losses_per_task_kind(tiny_backbone, batch):
    module = SpecLoRAModule(TASKS, backbone=tiny_backbone, head_dropout=0.0).eval()
    _randomise_adapters(module)
    with torch.no_grad():
        pooled = module.encode(batch)
        outputs = module.heads(pooled, batch)
    assert set(outputs) == {0, 1, 2}
    # COPA (choice): cross-entropy over each example's two option scores
    copa = outputs[2]
    rows = (batch["seq_task"] == 2).nonzero().squeeze(1)
    scores = module.heads.heads[2](pooled[rows]).squeeze(-1).view(-1, 2)  # two options per example
    gold = batch["labels"][copa.examples].long()
    assert torch.allclose(copa.loss, F.cross_entropy(scores, gold), atol=1e-6)
    assert torch.equal(copa.preds, scores.argmax(-1))
    # STS-B (regression): mean squared error on the standardised score, predicted back on 0-5
    stsb = outputs[1]
    rows = (batch["seq_task"] == 1).nonzero().squeeze(1)
    pred = module.heads.heads[1](pooled[rows]).squeeze(-1)
    target = (batch["labels"][stsb.examples] - 2.70) / 1.46
    assert torch.allclose(stsb.loss, F.mse_loss(pred, target), atol=1e-6)
    assert torch.allclose(stsb.preds, 2.70 + 1.46 * pred, atol=1e-6)
    # the total is the plain sum with uniform weights
    total, per_task = module._total_loss(outputs)
    assert torch.allclose(total, sum(per_task.values()))


def test_adapters_of_absent_tasks_get_no_gradient(tiny_backbone, batch):
    module = SpecLoRAModule(["rte", "stsb", "copa", "cb"], backbone=tiny_backbone)
    _randomise_adapters(module)
    total, _ = module._total_loss(module(batch))  # the batch holds no CB (task 3) row
    total.backward()
    (_, layer), *_ = lora_modules(module.encoder)
    assert layer.lora_A.grad[3].abs().sum() == 0
    assert layer.lora_A.grad[:3].abs().sum() > 0


def test_export_import_round_trip(tiny_backbone, batch, tmp_path):
    module = SpecLoRAModule(TASKS, backbone=tiny_backbone).eval()
    _randomise_adapters(module)
    for p in module.heads.parameters():
        p.data.normal_()
    module.export_adapters(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(TASKS)
    assert (tmp_path / "rte" / "adapter_config.json").is_file()
    fresh = SpecLoRAModule(TASKS, backbone=tiny_backbone).eval()
    fresh.import_adapters(tmp_path)
    with torch.no_grad():
        a, b = module(batch), fresh(batch)
    for t in a:
        assert torch.allclose(a[t].loss, b[t].loss, atol=1e-6)
        assert torch.equal(a[t].preds, b[t].preds)


def test_non_finite_gradients_never_reach_the_parameters(tiny_backbone, data_root, tmp_path):
    import lightning as L
    from lightning.pytorch import Callback

    class Poison(Callback):
        def on_after_backward(self, trainer, pl_module):
            if trainer.global_step == 0:  # NaN in one adapter's gradient on the first step only
                _, layer = lora_modules(pl_module.encoder)[0]
                layer.lora_B.grad[0, 0, 0] = float("nan")

    dm = MultiTaskDataModule(tasks=TASKS, data_dir=str(data_root), tokenizer=tiny_backbone, max_length=32,
                             batch_size=4, cache_dir=str(tmp_path))
    module = SpecLoRAModule(TASKS, backbone=tiny_backbone)
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, callbacks=[Poison()], use_distributed_sampler=False)
    trainer.fit(module, datamodule=dm)
    assert int(module.skipped_steps) == 1
    for name, p in module.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, before[name]), f"{name} moved on a skipped step"
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, use_distributed_sampler=False)
    trainer.fit(module, datamodule=dm)  # a clean step moves the adapters again
    assert any(not torch.equal(p, before[n]) for n, p in module.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", ["roberta", "deberta-v2", "distilbert"])
def test_other_encoder_families_get_their_attention_targets(arch, tmp_path):
    from transformers import AutoConfig, AutoModel

    kwargs = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=64)
    if arch == "distilbert":
        kwargs = dict(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64)
    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.for_model(arch, **kwargs)).save_pretrained(tmp_path)
    module = SpecLoRAModule(["rte", "stsb"], backbone=str(tmp_path)).eval()
    assert len(module.slots) == 2 * 4  # q, k, v and the attention output of both layers
    ids = torch.randint(5, 100, (3, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "seq_task": torch.tensor([0, 1, 1])}
    if arch != "distilbert":
        batch["token_type_ids"] = torch.zeros_like(ids)
    with torch.no_grad():
        pooled = module.encode(batch)
    assert pooled.shape == (3, 32) and torch.isfinite(pooled).all()


def test_the_module_is_handed_its_method_and_rebuilds_it_from_hparams(tiny_backbone):
    from speclora.methods import Ortho
    from speclora.model.method import Method, resolve_method

    # the default is the Method base: per-task adapters, no coupling; its hparams rebuild it
    default = SpecLoRAModule(TASKS, backbone=tiny_backbone)
    assert type(default.method) is Method and default.method_name == "independent"
    assert type(resolve_method(default.hparams["method"])) is Method
    # checkpoints written before the interface moved name the method classes by their own module
    old = {"class_path": "speclora.methods.lora_variants.Independent", "init_args": {}}
    assert type(resolve_method(old)) is Independent
    ortho = resolve_method({"class_path": "speclora.methods.ortho.Ortho", "init_args": {"blocks": "all"}})
    assert isinstance(ortho, Ortho) and ortho.blocks == "all"
    handed = Shared()
    assert SpecLoRAModule(TASKS, backbone=tiny_backbone, method=handed).method is handed
    assert type(resolve_method("independent")) is Independent  # the named class, not the base
    with pytest.raises(ValueError, match="model.method='nope'; allowed: a Method instance") as error:
        resolve_method("nope")
    # the error lists the methods, not the shared bases some of them build on
    assert "CAGrad" in str(error.value) and "NashMTL" in str(error.value)
    assert "GradientCombination" not in str(error.value) and "TaskGradientMethod" not in str(error.value)
    with pytest.raises(ValueError, match="allowed"):
        resolve_method("gradient_combination")  # a base is no method of its own
    with pytest.raises(ValueError, match="model.method.class_path='os.path' is not a Method class"):
        resolve_method({"class_path": "os.path"})
