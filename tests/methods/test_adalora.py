"""AdaLoRA: peft's regulariser recomputed exactly, the rank budget shrinking through the module's hooks,
peft-format export, the CLI run."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from speclora.data.datamodule import MultiTaskDataModule
from speclora.methods.adalora import AdaLoRA, orthogonal_penalty, resolve_steps
from speclora.model.lora import lora_modules
from speclora.model.module import SpecLoRAModule
from tests.cli_args import fit_args

REPO = Path(__file__).resolve().parents[2]
TASKS = ["rte", "stsb", "copa"]
N_MATRICES = 2 * 4  # tiny encoder: 2 layers x (query, key, value, attention.output.dense)


def _randomise(module: SpecLoRAModule, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.encoder.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# ---------------------------------------------------------------- the regulariser, exact values
def test_orthogonal_penalty_hand_sized():
    A = torch.tensor([[2.0, 0.0]])  # (r=1, d_in=2): |A Aᵀ - 1| = 3
    B = torch.tensor([[1.0], [1.0]])  # (d_out=2, r=1): |Bᵀ B - 1| = 1
    assert torch.isclose(orthogonal_penalty([("A", A), ("B", B)]), torch.tensor(2.0))  # mean of 3 and 1
    Q, _ = torch.linalg.qr(torch.randn(5, 3))  # orthonormal columns
    assert orthogonal_penalty([("A", Q.T), ("B", Q)]) < 1e-5


def test_orthogonal_penalty_equals_peft_forward(tiny_backbone):
    module = SpecLoRAModule(TASKS, backbone=tiny_backbone, method=AdaLoRA(orth_reg_weight=0.3))
    _randomise(module)
    tuner = module.method.peft_model.base_model  # peft adds its term only when the model returns a .loss
    forward = tuner.model.forward
    tuner.model.forward = lambda *a, **k: SimpleNamespace(loss=torch.zeros(()))
    try:
        reference = tuner.forward().loss
    finally:
        tuner.model.forward = forward
    terms = module.method.extra_losses(module, {}, {})
    assert torch.allclose(terms["adalora_orth"], reference, rtol=1e-6)
    off = SpecLoRAModule(TASKS, backbone=tiny_backbone, method=AdaLoRA(orth_reg_weight=0.0))
    assert off.method.extra_losses(off, {}, {}) == {}


# ---------------------------------------------------------------- options
def test_phase_lengths_are_steps_or_shares():
    assert resolve_steps(7, 100, "tinit") == 7
    assert resolve_steps(0.25, 10, "tinit") == 2  # floor
    with pytest.raises(ValueError, match="model.method.init_args.tfinal=1.5"):
        resolve_steps(1.5, 10, "tfinal")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(init_r=4, target_r=6), "target_r=6 > init_r=4"),
        (dict(target_r=0), "target_r=0"),
        (dict(tinit=-1), "tinit=-1"),
        (dict(deltaT=0), "deltaT=0"),
        (dict(beta1=1.0), "beta1=1.0"),
        (dict(orth_reg_weight=-0.1), "orth_reg_weight=-0.1"),
    ],
)
def test_bad_options_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaLoRA(**kwargs)


def test_schedule_without_budgeting_phase_is_refused(tiny_backbone):
    module = SpecLoRAModule(TASKS, backbone=tiny_backbone, method=AdaLoRA(tinit=6, tfinal=4))
    with pytest.raises(ValueError, match="leave no budgeting phase in a run of 10"):
        module.method.set_total_step(10)
    with pytest.raises(RuntimeError, match="total_step is unset"):
        module.method.after_optimizer_step(module)


def test_a_skipped_step_is_read_from_the_module_flag(tiny_backbone, monkeypatch):
    # AdaLoRA reads the module's skipped-step flag, not the absence of gradients
    module = SpecLoRAModule(TASKS, backbone=tiny_backbone, method="adalora")
    module.method.set_total_step(10)
    calls = []
    monkeypatch.setattr(module.method.peft_model.base_model, "update_and_allocate", calls.append)
    module.last_step_skipped = True
    with pytest.warns(UserWarning, match="rank allocation skipped"):
        module.method.after_optimizer_step(module)
    assert calls == []
    module.last_step_skipped = False  # a step that went ahead, gradients or not, is allocated
    module.method.after_optimizer_step(module)
    assert calls == [1]


def test_one_shared_adapter_wraps_the_encoder(tiny_backbone):
    module = SpecLoRAModule(TASKS, backbone=tiny_backbone, method="adalora")
    assert module.router is None and module.slots == [] and lora_modules(module.encoder) == []
    init_r, target_r = module.method.ranks(module.lora_cfg.r)
    assert (init_r, target_r) == (12, 8)  # ceil(1.5 r), r = model.lora.r = 8
    trainable = {n: p.numel() for n, p in module.encoder.named_parameters() if p.requires_grad}
    # per matrix: A (12, 32) + E (12, 1) + B (32, 12); nothing else of the encoder trains
    assert len(trainable) == 3 * N_MATRICES and sum(trainable.values()) == N_MATRICES * 12 * (32 + 1 + 32)
    assert all(".default" in n for n in trainable)
    assert module.method.hparams()["init_args"]["init_r"] is None  # private state stays out of the config


# ---------------------------------------------------------------- the rank budget, through the hooks
def test_rank_budget_shrinks_to_target_through_the_module_hooks(tiny_backbone, data_root, tmp_path):
    dm = MultiTaskDataModule(
        tasks=TASKS,
        data_dir=str(data_root),
        tokenizer=tiny_backbone,
        max_length=16,
        batch_size=4,
        cache_dir=str(tmp_path.parent / "token_cache"),
        max_train_per_task=16,
        max_eval_per_task=4,
        mixing="equal",
    )
    module = SpecLoRAModule(
        TASKS, backbone=tiny_backbone, method=AdaLoRA(init_r=4, target_r=1, tinit=2, tfinal=2, deltaT=1)
    )
    trainer = L.Trainer(
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    config = module.method.config
    assert (config.total_step, config.tinit, config.tfinal) == (6, 2, 2)  # estimated_stepping_batches = 6
    kept = module.method.kept_ranks()
    assert len(kept) == N_MATRICES
    # final budget: target_r per matrix on average (ties at the threshold can only prune more)
    assert sum(kept.values()) <= 1 * N_MATRICES < 4 * N_MATRICES
    alive = sum(int((p != 0).sum()) for n, p in module.encoder.named_parameters() if "lora_E" in n)
    assert 0 < alive <= sum(kept.values())  # masked triplets stay masked (lora_E = 0)


def _backward(module: SpecLoRAModule) -> None:
    ids = torch.randint(0, 1000, (2, 8))
    module.encoder(input_ids=ids).last_hidden_state.pow(2).mean().backward()


def test_edge_schedules_do_not_break_the_allocation(tiny_backbone):
    # a one-step run (fast_dev_run): no importance score exists before the final allocation -> skipped, warned
    module = SpecLoRAModule(TASKS, backbone=tiny_backbone, method=AdaLoRA(init_r=4, target_r=1))
    _randomise(module)
    module.method.set_total_step(1)
    _backward(module)
    with pytest.warns(UserWarning, match="no importance scores before the final allocation"):
        module.method.after_optimizer_step(SimpleNamespace(global_step=0, encoder=module.encoder, last_step_skipped=False))
    assert module.method.config.rank_pattern is None

    # resumed in the final phase: the rank pattern is rebuilt from the masked (λ = 0) triplets and kept
    module = SpecLoRAModule(
        TASKS, backbone=tiny_backbone, method=AdaLoRA(init_r=4, target_r=1, tinit=0, tfinal=2)
    )
    _randomise(module)
    module.method.set_total_step(4)
    E = next(p for n, p in module.encoder.named_parameters() if n.endswith("lora_E.default"))  # (4, 1)
    with torch.no_grad():
        E[1:] = 0.0
    _backward(module)
    module.method.after_optimizer_step(
        SimpleNamespace(global_step=3, encoder=module.encoder, last_step_skipped=False)
    )  # step 4 > 4 - 2
    assert next(iter(module.method.kept_ranks().values())) == 1  # the first matrix keeps its 1 live triplet
    assert torch.count_nonzero(E) == 1


# ---------------------------------------------------------------- export
def test_export_is_peft_format_and_loads_back(tiny_backbone, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    module = SpecLoRAModule(
        TASKS, backbone=tiny_backbone, method=AdaLoRA(init_r=4, target_r=2, tinit=0, tfinal=0)
    )
    _randomise(module)
    method = module.method
    method.set_total_step(3)
    ids = torch.randint(0, 1000, (3, 12))
    module.encoder(input_ids=ids).last_hidden_state.pow(2).mean().backward()
    for step in (1, 2, 3):  # importance scores at steps 1-2, the final mask at step 3 = total - tfinal
        method.peft_model.base_model.update_and_allocate(step)
    assert sum(method.kept_ranks().values()) <= 2 * N_MATRICES
    module.eval()
    with torch.no_grad():
        want = module.encoder(input_ids=ids).last_hidden_state

    folders = module.export_adapters(tmp_path)
    assert [f.name for f in folders] == TASKS
    saved = json.loads((folders[0] / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["rank_pattern"] and saved["total_step"] == 3
    assert all((f / "head.safetensors").is_file() and (f / "speclora_task.json").is_file() for f in folders)

    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_backbone), str(folders[1])).eval()
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids=ids).last_hidden_state, want, atol=1e-5)

    fresh = SpecLoRAModule(TASKS, backbone=tiny_backbone, method=AdaLoRA(init_r=4, target_r=2)).eval()
    fresh.import_adapters(tmp_path)
    with torch.no_grad():
        assert torch.allclose(fresh.encoder(input_ids=ids).last_hidden_state, want, atol=1e-6)
    for a, b in zip(module.heads.parameters(), fresh.heads.parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- the CLI, default suite
def test_adalora_runs_from_the_cli_on_the_default_suite(tiny_backbone, data_root, tmp_path):
    from speclora.cli import main

    cli = main(["fit", *fit_args(tiny_backbone, data_root, tmp_path.parent / "token_cache", tmp_path / "runs",
                                 "methods/adalora.yaml", max_length=32, batch_size=16)])
    assert isinstance(cli.model.method, AdaLoRA) and len(cli.model.specs) == 10
    metrics = cli.trainer.callback_metrics
    for key in ("train/loss", "train/adalora_orth", "train/adalora_rank", "val/average", "val/rte/accuracy"):
        assert key in metrics, f"{key} not logged; logged: {sorted(metrics)}"
    assert cli.trainer.global_step == 2 and cli.model.method.config.total_step == 2
    assert cli.model.method.config.rank_pattern  # step 2 = total_step - tfinal: the final allocation ran
    folders = cli.model.export_adapters(tmp_path / "export")
    assert len(folders) == 10 and all((f / "adapter_model.safetensors").is_file() for f in folders)
