"""`speclora` through LightningCLI: every YAML parses, fit runs end to end, resume is exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from speclora.cli import main
from tests.cli_args import fit_args

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def _tiny_args(tiny_backbone, data_root, root, cache, *extra):
    # the small suite, uncapped; steps and validation as ``extra`` says
    return [*fit_args(tiny_backbone, data_root, cache, root, "suites/small.yaml", steps=None, caps=None), *extra]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_config_parses(config, tiny_backbone, data_root):
    # partial configs (a method, a suite) are layered on the default job, as the README shows
    stack = [] if config.name == "default.yaml" and config.parent.name == "configs" else \
        ["--config", str(REPO / "configs" / "default.yaml")]
    from speclora.cli import SpecLoRACLI, trainer_defaults
    from speclora.data.datamodule import MultiTaskDataModule
    from speclora.model.module import SpecLoRAModule

    cli = SpecLoRACLI(
        SpecLoRAModule, MultiTaskDataModule, run=False, trainer_defaults=trainer_defaults(),
        args=[*stack, "--config", str(config), "--model.backbone", tiny_backbone, "--data.data_dir", str(data_root)],
    )
    assert cli.model.specs and [s.name for s in cli.model.specs] == cli.datamodule.tasks
    assert cli.trainer is not None


def test_fit_then_test_through_the_cli(tiny_backbone, data_root, tmp_path):
    args = _tiny_args(tiny_backbone, data_root, tmp_path / "runs", tmp_path.parent / "token_cache",
                      "--trainer.max_steps", "4", "--trainer.val_check_interval", "2")
    cli = main(["fit", *args])
    metrics = cli.trainer.callback_metrics
    for key in ("val/average", "val/rte/accuracy", "val/stsb/pearson", "val/copa/score", "train/loss"):
        assert key in metrics, f"{key} not logged; logged: {sorted(metrics)}"
    assert torch.isfinite(metrics["val/average"])
    assert cli.trainer.global_step == 4
    log_dir = Path(cli.trainer.log_dir)
    assert list(log_dir.glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert (log_dir / "checkpoints" / "last.ckpt").is_file()
    assert (log_dir / "config.yaml").is_file()

    tested = main(["test", *args, "--ckpt_path", str(log_dir / "checkpoints" / "last.ckpt")])
    assert "test/average" in tested.trainer.callback_metrics


class _Record(Callback):
    """Keeps what each training step saw, and the adapters at the end."""

    def __init__(self) -> None:
        self.batches: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches[trainer.global_step] = (batch["task"] * 100_000 + batch["uid"]).tolist()


def test_resume_mid_epoch_continues_exactly(tiny_backbone, data_root, tmp_path):
    from speclora.cli import SpecLoRACLI, trainer_defaults
    from speclora.data.datamodule import MultiTaskDataModule
    from speclora.model.module import SpecLoRAModule

    def run(root, steps, ckpt=None, every=None):
        record = _Record()
        defaults = trainer_defaults()
        defaults["callbacks"] = [record]
        extra = ["--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
                 "--trainer.enable_checkpointing", "false"]
        args = _tiny_args(tiny_backbone, data_root, root, tmp_path.parent / "token_cache", *extra)
        cli = SpecLoRACLI(SpecLoRAModule, MultiTaskDataModule, run=False, trainer_defaults=defaults, args=args)
        if every:
            from lightning.pytorch.callbacks import ModelCheckpoint

            cli.trainer.callbacks.append(ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=every,
                                                         save_top_k=-1, filename="{step}"))
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
        return cli, record

    full, full_record = run(tmp_path / "a", 6, every=3)
    ckpt = tmp_path / "a" / "ckpt" / "step=3.ckpt"
    assert ckpt.is_file()
    resumed, resumed_record = run(tmp_path / "b", 6, ckpt=str(ckpt))
    assert sorted(resumed_record.batches) == [3, 4, 5]
    for step in (3, 4, 5):
        assert resumed_record.batches[step] == full_record.batches[step], f"step {step} saw another batch"
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        if a.requires_grad:
            assert torch.equal(a, b), f"{name} differs after resume"


def test_checkpointing_and_logger_can_be_switched_off(tiny_backbone, data_root, tmp_path):
    # the default checkpoint and learning-rate monitor give way instead of clashing with the trainer flags
    args = _tiny_args(tiny_backbone, data_root, tmp_path / "runs", tmp_path.parent / "token_cache",
                      "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                      "--trainer.enable_checkpointing", "false", "--trainer.logger", "false")
    cli = main(["fit", *args])
    assert cli.trainer.global_step == 2
    assert cli.trainer.checkpoint_callback is None
    assert not list((tmp_path / "runs").rglob("*.ckpt"))
