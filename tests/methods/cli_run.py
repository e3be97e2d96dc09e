"""Two training steps of a method through the CLI, keeping the method modules as they were at the start."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback

from speclora.model.module import SpecLoRAModule
from tests.cli_args import fit_args


class _Snapshot(Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.before = {k: v.detach().clone() for k, v in pl_module.adapted.method_net.state_dict().items()}


def _fit(tiny_backbone, data_root, root: Path, cache: Path, *configs: str, extra=()):
    from speclora.cli import SpecLoRACLI, trainer_defaults
    from speclora.data.datamodule import MultiTaskDataModule

    snapshot = _Snapshot()
    defaults = trainer_defaults()
    defaults["callbacks"].append(snapshot)
    # configs/default.yaml, then ``configs``; caps only through ``extra``
    args = [*fit_args(tiny_backbone, data_root, cache, root, *configs, caps=None), *extra]
    cli = SpecLoRACLI(SpecLoRAModule, MultiTaskDataModule, run=False, trainer_defaults=defaults, args=args)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli, snapshot
