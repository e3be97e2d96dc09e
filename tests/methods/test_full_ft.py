"""FullFT: no LoRA, the whole encoder trained; LoRA methods leave the backbone alone; export round trip; CLI."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from speclora.data.datamodule import MultiTaskDataModule
from speclora.methods import FullFT, Independent
from speclora.model.lora import lora_modules
from speclora.model.module import LoRAConfig, SpecLoRAModule
from tests.cli_args import fit_args

REPO = Path(__file__).resolve().parents[2]
TASKS = ["rte", "stsb", "copa"]


def test_build_leaves_no_lora_and_trains_every_encoder_weight(tiny_backbone):
    module = SpecLoRAModule(TASKS, backbone=tiny_backbone, method="full_ft")
    assert module.router is None and module.slots == []
    assert lora_modules(module.encoder) == []
    assert all(p.requires_grad for p in module.encoder.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in module.parameters())  # encoder + heads, all of it


def test_single_task_is_allowed(tiny_backbone):
    module = SpecLoRAModule(["rte"], backbone=tiny_backbone, method=FullFT())
    assert [s.name for s in module.specs] == ["rte"]


def test_lora_options_are_refused(tiny_backbone):
    with pytest.raises(ValueError, match=r"model.lora.r=4: model.method=FullFT has no LoRA layers"):
        SpecLoRAModule(TASKS, backbone=tiny_backbone, method="full_ft", lora=LoRAConfig(r=4))
    with pytest.raises(ValueError, match="holds no LoRA adapters"):
        FullFT().adapter_of_task(0)


# ---------------------------------------------------------------- one optimiser step through a Trainer
@pytest.fixture(scope="module")
def datamodule(tiny_backbone, data_root, cache):
    return MultiTaskDataModule(tasks=TASKS, data_dir=str(data_root), tokenizer=tiny_backbone, max_length=48,
                               batch_size=16, cache_dir=str(cache), mixing="equal",
                               max_train_per_task=32, max_eval_per_task=8)


def _one_step(module: SpecLoRAModule, datamodule: MultiTaskDataModule) -> dict[str, torch.Tensor]:
    """The encoder's parameters before a single training step (the module is updated in place)."""
    before = {n: p.detach().clone() for n, p in module.encoder.named_parameters()}
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        accelerator="cpu", devices=1)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 1
    return before


def test_full_ft_updates_the_backbone(tiny_backbone, datamodule):
    module = SpecLoRAModule(TASKS, backbone=tiny_backbone, method="full_ft")
    before = _one_step(module, datamodule)
    after = dict(module.encoder.named_parameters())
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert "encoder.layer.0.attention.self.query.weight" in changed
    assert "encoder.layer.1.output.dense.weight" in changed  # the FFN too, not only attention
    assert len(changed) > len(before) // 2, f"only {len(changed)} of {len(before)} tensors moved"


def test_lora_methods_leave_the_backbone_unchanged(tiny_backbone, datamodule):
    module = SpecLoRAModule(TASKS, backbone=tiny_backbone, method=Independent())
    before = _one_step(module, datamodule)
    after = dict(module.encoder.named_parameters())
    base = [n for n in before if "lora_" not in n]
    assert base and all(torch.equal(before[n], after[n]) for n in base)
    lora_b = [n for n in before if n.endswith("lora_B")]
    assert lora_b and all(not torch.equal(before[n], after[n]) for n in lora_b)


# ---------------------------------------------------------------- export
def test_export_and_load_round_trip(tiny_backbone, datamodule, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    module = SpecLoRAModule(TASKS, backbone=tiny_backbone, method="full_ft").eval()
    torch.manual_seed(3)
    for p in module.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    folders = module.export_adapters(tmp_path)
    assert [f.name for f in folders] == TASKS
    assert all((f / "head.safetensors").is_file() and (f / "speclora_task.json").is_file() for f in folders)
    # the encoder folder stands alone: AutoModel and its tokenizer load from it
    encoder = AutoModel.from_pretrained(tmp_path / "encoder")
    assert torch.equal(encoder.embeddings.word_embeddings.weight, module.encoder.embeddings.word_embeddings.weight)
    AutoTokenizer.from_pretrained(tmp_path / "encoder")

    fresh = SpecLoRAModule(TASKS, backbone=tiny_backbone, method="full_ft").eval()
    fresh.import_adapters(tmp_path)
    with torch.no_grad():
        a, b = module(batch), fresh(batch)
    for t in a:
        assert torch.allclose(a[t].loss, b[t].loss, atol=1e-6)
        assert torch.equal(a[t].preds, b[t].preds)


# ---------------------------------------------------------------- the CLI, 2 steps
@pytest.mark.parametrize(
    "config, suite, num_tasks",
    [
        ("full_ft.yaml", "small.yaml", 3),
        pytest.param("full_ft.yaml", None, 10, marks=pytest.mark.slow, id="full_ft.yaml-default-suite"),
        ("full_ft_single.yaml", None, 1),
    ],
)
def test_full_ft_runs_from_the_cli(config, suite, num_tasks, tiny_backbone, data_root, cache, tmp_path):
    from speclora.cli import main

    suites = [f"suites/{suite}"] if suite else []
    cli = main(["fit", *fit_args(tiny_backbone, data_root, cache, tmp_path / "runs", f"methods/{config}", *suites)])
    assert isinstance(cli.model.method, FullFT) and len(cli.model.specs) == num_tasks
    assert cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    for key in ("train/loss", "val/average", "val/rte/accuracy"):
        assert key in metrics, f"{key} not logged; logged: {sorted(metrics)}"
    assert cli.model.optim_cfg.lr == 5e-5
    folders = cli.model.export_adapters(tmp_path / "export")
    assert len(folders) == num_tasks and (tmp_path / "export" / "encoder" / "config.json").is_file()
