"""Mixed precision with the default optimizer (a fused AdamW where torch has it) and the default gradient clip.

Lightning's AMP plugin refuses to clip the gradients of an optimizer that unscales inside its step (a fused
AdamW), even under bf16-mixed where no loss scale exists: every bf16-mixed run of the default config died at
its first step ("AdamW does not allow for gradient clipping"), on a CPU as on a GPU. The module clips those
gradients itself (bf16-mixed), and under fp16 AMP with a clip it builds an unfused AdamW (``fused: null``) or
refuses ``fused: true`` naming the settings.
"""

from __future__ import annotations

import pytest
import torch

from tests.cli_args import fit_args


def _fit(tiny_backbone, data_root, tmp_path, *extra: str):
    from speclora.cli import main

    args = fit_args(tiny_backbone, data_root, tmp_path.parent / "token_cache", tmp_path / "runs",
                    "suites/small.yaml", steps=3, caps=(24, 4))
    return main(["fit", *args, "--data.mixing", "equal", "--seed_everything", "0", "--trainer.limit_val_batches", "0",
                 "--trainer.enable_checkpointing", "false", "--trainer.logger", "false", *extra])


def _adapters(cli) -> list[torch.Tensor]:
    return [p.detach().clone() for p in cli.model.parameters() if p.requires_grad]


def test_bf16_mixed_trains_with_the_fused_adamw_and_clips_its_gradients(tiny_backbone, data_root, tmp_path):
    # a clip far below the gradients' norm, so that it decides every update
    clip = ["--trainer.precision", "bf16-mixed", "--trainer.gradient_clip_val", "1e-3"]
    fused = _fit(tiny_backbone, data_root, tmp_path / "fused", *clip)  # the old code raised here
    assert fused.trainer.optimizers[0].defaults["fused"]
    assert fused.trainer.global_step == 3
    unfused = _fit(tiny_backbone, data_root, tmp_path / "unfused", *clip, "--model.optim.fused", "false")
    assert not unfused.trainer.optimizers[0].defaults["fused"]  # Lightning's own clipping path
    unclipped = _fit(tiny_backbone, data_root, tmp_path / "unclipped", "--trainer.precision", "bf16-mixed",
                     "--trainer.gradient_clip_val", "0")
    a, b, c = _adapters(fused), _adapters(unfused), _adapters(unclipped)
    # the same clipped steps both ways (the fused and the for-each AdamW round differently)
    assert all(torch.allclose(x, y, rtol=1e-4, atol=1e-6) for x, y in zip(a, b))
    assert not all(torch.allclose(x, z, rtol=1e-4, atol=1e-6) for x, z in zip(a, c))  # and the clip mattered


def _fp16_fit(tiny_backbone, data_root, tmp_path, **optim):
    # Lightning turns "16-mixed" on a CPU into bf16-mixed; an explicit plugin with a CPU GradScaler gives the GPU's
    # fp16 path (autocast to float16, the loss scaled, Lightning unscaling before the clip)
    import lightning as L
    from lightning.pytorch.plugins.precision import MixedPrecision

    from speclora.data.datamodule import MultiTaskDataModule
    from speclora.model.module import SpecLoRAModule

    dm = MultiTaskDataModule(tasks=["rte", "stsb", "copa"], data_dir=str(data_root), tokenizer=tiny_backbone,
                             max_length=32, batch_size=6, cache_dir=str(tmp_path / "token_cache"), mixing="equal",
                             max_train_per_task=24)
    torch.manual_seed(0)
    module = SpecLoRAModule(["rte", "stsb", "copa"], backbone=tiny_backbone, optim=optim)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, gradient_clip_val=1.0, plugins=[plugin],
                        use_distributed_sampler=False)
    trainer.fit(module, datamodule=dm)
    return trainer, module


def test_fp16_amp_with_a_clip_runs_an_unfused_adamw(tiny_backbone, data_root, tmp_path):
    trainer, module = _fp16_fit(tiny_backbone, data_root, tmp_path)  # fused: null (auto)
    assert trainer.global_step == 3 and trainer.precision_plugin.scaler is not None
    assert not trainer.optimizers[0].defaults["fused"]  # the old code built a fused one and Lightning raised
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_fp16_amp_with_a_clip_refuses_an_explicit_fused_adamw(tiny_backbone, data_root, tmp_path):
    with pytest.raises(ValueError, match=r"model\.optim\.fused=true .*trainer\.precision='16-mixed'.*"
                                         r"gradient_clip_val=1\.0.*allowed"):
        _fp16_fit(tiny_backbone, data_root, tmp_path, fused=True)
