"""The ``speclora`` command: LightningCLI fit / validate / test / predict, and export. No logic lives here.

``speclora export --config ... --ckpt_path CKPT --out DIR`` writes each task's trained adapter (a peft folder
plus its head, or the method's own format) from a checkpoint; see ``SpecLoRAModule.export_adapters``.
The console script exits 0 on success and non-zero on failure (:func:`console`).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from speclora.checkpoint import BestAndLastCheckpoint, load_checkpoint_weights
from speclora.data.datamodule import MultiTaskDataModule
from speclora.devices import check_devices
from speclora.methods import method_names
from speclora.model.module import SpecLoRAModule
from speclora.progress import step_progress_bar
from speclora.submission import SubmissionWriter


class SpecLoRATrainer(Trainer):
    """Lightning's Trainer with the ``export`` subcommand's method (LightningCLI maps subcommands to methods)."""

    def export(self, model: LightningModule, ckpt_path: str | None = None, out: str = "adapters",
               weights_only: bool | None = None, datamodule: LightningDataModule | None = None) -> list[Path]:
        """Write each task's trained adapter and head under OUT/<task>, from a checkpoint of this config.

        Args:
            ckpt_path: the checkpoint (``.../checkpoints/last.ckpt`` or a best one); required.
            out: the folder to write (one sub-folder per task, as ``SpecLoRAModule.export_adapters``).
            weights_only: passed to ``torch.load`` (default: False, a speclora checkpoint holds its config).
        """
        if ckpt_path is None:
            raise ValueError("ckpt_path=None: speclora export needs --ckpt_path, the checkpoint to export")
        load_checkpoint_weights(model, ckpt_path, weights_only=bool(weights_only))
        written = model.export_adapters(out)
        print(f"exported {len(written)} task(s) from {ckpt_path} to {out}: {', '.join(p.name for p in written)}")
        return written


class SpecLoRAArgumentParser(LightningArgumentParser):
    """Parse errors on ``model.method`` list the methods that exist (jsonargparse says only that the value is
    no import path)."""

    def error(self, message: str, ex: Exception | None = None):
        # only when the class itself is unknown: a wrong option of a known class is reported well already
        if 'key "model.method"' in message and "Problem with given class_path" not in message:
            found = re.search(r"import path string: (\S+)", message)
            given = f"={found.group(1)!r} is not a method" if found else ""
            message += (f"\n  model.method{given}; allowed: {', '.join(method_names())} (options: "
                        "--model.method.<option>), or the class_path of a speclora.methods.Method subclass")
        return super().error(message, ex)


class SpecLoRACLI(LightningCLI):
    """Links the data and the model: the task list and its order, the tokenizer, the seed.

    ``speclora predict`` writes the leaderboard files through the ``submission`` group
    (:class:`~speclora.submission.SubmissionWriter`: ``--submission.out_dir``, ``--submission.adapters_dir``);
    the writer acts only in predict.
    """

    def __init__(self, *args: Any, parser_class: type[LightningArgumentParser] = SpecLoRAArgumentParser,
                 trainer_class: type[Trainer] = SpecLoRATrainer, **kwargs: Any) -> None:
        super().__init__(*args, parser_class=parser_class, trainer_class=trainer_class, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.tasks", "model.tasks")
        parser.link_arguments("model.backbone", "data.tokenizer")
        parser.link_arguments("seed_everything", "data.seed")
        parser.add_lightning_class_args(SubmissionWriter, "submission")

    def _instantiate_trainer(self, config: dict, callbacks: list):
        # a GPU or device the machine lacks fails here, before anything is built or trained
        config = dict(config)
        if self.subcommand == "export":  # reads a checkpoint and writes files: no device, logger or callback
            config.update(accelerator="cpu", devices=1, num_nodes=1, strategy="auto", logger=False)
        config["accelerator"], config["devices"] = check_devices(config.get("accelerator", "auto"),
                                                                 config.get("devices", "auto"))
        # the default callbacks give way where the trainer is told not to use what they need:
        # --trainer.enable_checkpointing false drops the default checkpoint, --trainer.logger false the
        # learning-rate monitor, --trainer.enable_progress_bar false the progress bar (Lightning refuses
        # each combination)
        defaults = self.trainer_defaults.get("callbacks", [])
        kept = [cb for cb in defaults
                if not (isinstance(cb, ModelCheckpoint) and config.get("enable_checkpointing") is False)
                and not (isinstance(cb, LearningRateMonitor) and config.get("logger") is False)
                and not (isinstance(cb, ProgressBar) and config.get("enable_progress_bar") is False)]
        self.trainer_defaults = {**self.trainer_defaults, "callbacks": kept}
        return super()._instantiate_trainer(config, callbacks)


def trainer_defaults() -> dict:
    return {
        # speclora's task-mixing sampler shards across ranks itself and must not be re-wrapped
        "use_distributed_sampler": False,
        "callbacks": [
            LearningRateMonitor(logging_interval="step"),
            # the best by val/average, and last.ckpt rewritten at every validation (resume loses nothing)
            BestAndLastCheckpoint(
                monitor="val/average", mode="max", save_last=True,
                filename="step{step}-avg{val/average:.2f}", auto_insert_metric_name=False,
            ),
            step_progress_bar(),  # step N of max_steps, the losses and val/average
        ],
    }


def main(args: list[str] | None = None) -> SpecLoRACLI:
    """Run the command line ``args`` (default ``sys.argv[1:]``) and return the CLI (its trainer and model)."""
    return SpecLoRACLI(
        SpecLoRAModule,
        MultiTaskDataModule,
        seed_everything_default=0,
        trainer_defaults=trainer_defaults(),
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def console(args: list[str] | None = None) -> int:
    """The ``speclora`` console script: the exit status of :func:`main` (0 on success; a failure raises, a
    parse error exits 2, an interrupted run returns 1)."""
    cli = main(args)
    return 1 if cli.trainer is not None and cli.trainer.interrupted else 0


if __name__ == "__main__":
    sys.exit(console())
