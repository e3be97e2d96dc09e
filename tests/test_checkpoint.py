"""Checkpoints: last.ckpt is the latest validated state, a dry run writes none, and they are lean (the frozen
backbone is named, not stored) yet load back every method with its options."""

from __future__ import annotations

import functools
import re
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from speclora.checkpoint import BestAndLastCheckpoint


class _Worsening(BoringModel):
    """Logs a val/average that only gets worse: only the first validation is a best."""

    def validation_step(self, batch, batch_idx):
        out = super().validation_step(batch, batch_idx)
        self.log("val/average", -float(self.global_step))
        return out


def _fit(tmp_path, callback, max_steps=6):
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=max_steps, val_check_interval=2, limit_val_batches=1,
                        callbacks=[callback], logger=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(_Worsening())
    return trainer


def test_last_checkpoint_is_the_latest_validation_not_the_best(tmp_path):
    callback = BestAndLastCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/average", mode="max", save_last=True)
    _fit(tmp_path, callback)
    assert torch.load(callback.best_model_path, weights_only=False)["global_step"] == 2
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 6  # Lightning's own ModelCheckpoint leaves it at 2 here


def test_last_checkpoint_is_written_at_the_end_without_a_final_validation(tmp_path):
    callback = BestAndLastCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/average", mode="max", save_last=True)
    _fit(tmp_path, callback, max_steps=5)  # validations at 2 and 4, training ends at 5
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 5


def test_a_dry_run_writes_no_checkpoint(tmp_path):
    # Lightning 2.6's ModelCheckpoint.on_train_end writes last.ckpt even under fast_dev_run
    callback = BestAndLastCheckpoint(monitor="val/average", mode="max", save_last=True)
    trainer = L.Trainer(default_root_dir=tmp_path, fast_dev_run=True, callbacks=[callback], enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(_Worsening())
    assert trainer.global_step == 1
    assert not list(tmp_path.rglob("*.ckpt"))


# ---------------------------------------------------------------------- lean checkpoints, load_from_checkpoint
METHODS = [  # every method, with options that differ from its defaults
    ("Independent", {}, ["rte", "stsb", "copa"]),
    ("Single", {}, ["rte"]),
    ("Shared", {}, ["rte", "stsb", "copa"]),
    ("Ortho", {"blocks": "matrix", "order": "fixed", "seed": 3}, ["rte", "stsb"]),
    ("FullFT", {}, ["rte", "stsb"]),
    ("UnoLoRAStar", {"task_dim": 8, "hidden_dim": 16, "bottleneck_dim": 8, "embed_dim": 8, "init_std": 0.05},
     ["rte", "stsb"]),
    ("HyperFormer", {"task_dim": 8, "hidden_dim": 16, "embed_dim": 8}, ["rte", "stsb"]),
    ("SpecLoRA", {}, ["rte", "stsb", "copa"]),
    ("AdaLoRA", {"init_r": 6, "target_r": 4, "deltaT": 5}, ["rte", "stsb"]),
    ("MTLoRA", {"block": "ffn", "routing_group_size": 2, "reg_weight": 0.5}, ["rte", "stsb"]),
    ("FAMO", {"adapters": "shared", "lr": 0.01, "gamma": 0.0}, ["rte", "stsb"]),
    ("CAGrad", {"c": 0.2, "rescale": False}, ["rte", "stsb"]),
    ("NashMTL", {"max_norm": 0.0, "tol": 1e-8, "max_iter": 20}, ["rte", "stsb"]),
    ("MTLLoRA", {"num_up": 2, "temperature": 0.5, "diagonal": True}, ["rte", "stsb", "copa"]),
]


def _module(name, options, tasks, backbone, **kwargs):
    from speclora.methods import METHODS as REGISTRY
    from speclora.model.module import SpecLoRAModule

    cls = next(c for c in REGISTRY.values() if c.__name__ == name)
    return SpecLoRAModule(tasks, backbone=backbone, method=cls(**options), **kwargs)


def _train(module) -> None:
    """Stand-in for training: every trainable tensor (and the step counter) gets a seeded random value."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    module.skipped_steps += 3


@functools.cache
def _backbone_tensors(path: str) -> int:
    from transformers import AutoModel

    return len(list(AutoModel.from_pretrained(path).parameters()))


def _save(module, path):
    """The checkpoint Lightning writes: state dict and hyperparameters, passed through on_save_checkpoint."""
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                  "pytorch-lightning_version": L.__version__}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return checkpoint


@pytest.mark.parametrize(("name", "options", "tasks"), METHODS, ids=[m[0] for m in METHODS])
def test_load_from_checkpoint_rebuilds_every_method_with_its_options(tiny_backbone, tmp_path, name, options, tasks):
    from speclora.model.module import SpecLoRAModule

    lora = {} if name == "FullFT" else {"lora": {"r": 4, "alpha": 8.0}}  # FullFT refuses LoRA options
    module = _module(name, options, tasks, tiny_backbone, pooling="mean", head_dropout=0.2, **lora)
    _train(module)
    checkpoint = _save(module, tmp_path / "last.ckpt")
    if name == "FullFT":  # the whole encoder is trained: all of it is kept
        assert module._frozen_keys == []
        assert all(k in checkpoint["state_dict"] for k in module.state_dict() if k.startswith("adapted.encoder."))
    else:  # every frozen backbone weight is left out, every trained tensor kept
        assert len(module._frozen_keys) == _backbone_tensors(tiny_backbone)
        assert not any(k in checkpoint["state_dict"] for k in module._frozen_keys)
    assert all(k in checkpoint["state_dict"] for k, p in module.named_parameters() if p.requires_grad)

    loaded = SpecLoRAModule.load_from_checkpoint(tmp_path / "last.ckpt")
    assert type(loaded.method) is type(module.method)
    assert loaded.method.hparams() == module.method.hparams() and loaded.hparams == module.hparams
    assert loaded.pooling == "mean" and loaded.lora_cfg == module.lora_cfg and loaded.hparams.head_dropout == 0.2
    theirs = loaded.state_dict()
    for key, value in module.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(theirs[key], value), f"{key} differs after load_from_checkpoint"


def test_a_missing_trained_key_still_fails_and_another_backbone_is_refused(tiny_backbone, tmp_path):
    from transformers import BertConfig, BertModel

    from speclora.model.module import SpecLoRAModule

    module = _module("Independent", {}, ["rte", "stsb"], tiny_backbone)
    _train(module)
    checkpoint = _save(module, tmp_path / "lean.ckpt")

    # a copy of the backbone in another folder is the same encoder (content, not path)
    copy = tmp_path / "moved_backbone"
    shutil.copytree(tiny_backbone, copy)
    SpecLoRAModule.load_from_checkpoint(tmp_path / "lean.ckpt", backbone=str(copy))

    other = tmp_path / "other_backbone"
    torch.manual_seed(1)
    BertModel(BertConfig.from_pretrained(tiny_backbone)).save_pretrained(other)
    shutil.copy(Path(tiny_backbone) / "tokenizer.json", other)
    with pytest.raises(ValueError, match=r"model.backbone='.*other_backbone' .* is not the encoder this checkpoint "
                                         r"was trained on: '.*tiny_bert.*'"):
        SpecLoRAModule.load_from_checkpoint(tmp_path / "lean.ckpt", backbone=str(other))

    lora_key = next(k for k in checkpoint["state_dict"] if k.endswith("lora_B"))
    del checkpoint["state_dict"][lora_key]
    torch.save(checkpoint, tmp_path / "broken.ckpt")
    with pytest.raises(RuntimeError, match=rf"Missing key\(s\) in state_dict: \"{re.escape(lora_key)}\""):
        SpecLoRAModule.load_from_checkpoint(tmp_path / "broken.ckpt")


def test_a_checkpoint_from_before_lean_checkpoints_still_loads(tiny_backbone, tmp_path):
    from speclora.model.module import SpecLoRAModule

    module = _module("Shared", {}, ["rte", "stsb"], tiny_backbone)
    _train(module)
    state = {k: v for k, v in module.state_dict().items() if k != "_extra_state"}  # every key, no identity
    torch.save({"state_dict": state, "hyper_parameters": dict(module.hparams), "pytorch-lightning_version": L.__version__},
               tmp_path / "old.ckpt")
    loaded = SpecLoRAModule.load_from_checkpoint(tmp_path / "old.ckpt")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


def test_the_fingerprint_reads_names_dtypes_shapes_and_bytes():
    from speclora.checkpoint import backbone_fingerprint

    state = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
    same = {"b": state["b"].clone(), "a": state["a"].clone()}
    assert backbone_fingerprint(state) == backbone_fingerprint(same)  # order of the dict does not matter
    for changed in ({**state, "a": state["a"].reshape(3, 2)}, {**state, "a": state["a"] + 1e-6},
                    {**state, "b": state["b"].float()}, {"c": state["a"], "b": state["b"]}):
        assert backbone_fingerprint(changed) != backbone_fingerprint(state)


@pytest.mark.slow
def test_the_default_jobs_checkpoint_is_at_most_40_mb(data_root, tmp_path):
    # the default job on the packaged all-MiniLM-L6-v2: 2.96 M trained parameters (+ AdamW's two moments);
    # with the 22.7 M frozen ones the file was 126 MB
    from speclora.cli import main

    repo = Path(__file__).resolve().parents[1]
    cli = main(["fit", "--config", str(repo / "configs" / "default.yaml"), "--data.data_dir", str(data_root),
                "--data.max_train_per_task", "256", "--data.max_eval_per_task", "16", "--trainer.max_steps", "3",
                "--trainer.val_check_interval", "3", "--trainer.default_root_dir", str(tmp_path),
                "--trainer.enable_progress_bar", "false"])
    last = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    assert last.stat().st_size <= 40e6, f"{last}: {last.stat().st_size / 1e6:.1f} MB"
    assert not any(k in torch.load(last, weights_only=False)["state_dict"] for k in cli.model._frozen_keys)
