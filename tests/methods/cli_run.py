"""Two training steps of a method through the CLI, keeping the method modules as they were at the start."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback

from speclora.model.module import SpecLoRAModule

REPO = Path(__file__).resolve().parents[2]


class _Snapshot(Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.before = {k: v.detach().clone() for k, v in pl_module.method_net.state_dict().items()}


def _fit(tiny_backbone, data_root, root: Path, cache: Path, *configs: str, extra=()):
    from speclora.cli import SpecLoRACLI, trainer_defaults
    from speclora.data.datamodule import MultiTaskDataModule

    snapshot = _Snapshot()
    defaults = trainer_defaults()
    defaults["callbacks"].append(snapshot)
    args = [arg for c in configs for arg in ("--config", str(REPO / "configs" / c))] + [
        "--model.backbone",
        tiny_backbone,
        "--data.data_dir",
        str(data_root),
        "--data.cache_dir",
        str(cache),
        "--data.max_length",
        "48",
        "--data.batch_size",
        "8",
        "--trainer.max_steps",
        "2",
        "--trainer.val_check_interval",
        "2",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]
    cli = SpecLoRACLI(SpecLoRAModule, MultiTaskDataModule, run=False, trainer_defaults=defaults, args=args)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli, snapshot
