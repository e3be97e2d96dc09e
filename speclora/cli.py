"""The ``speclora`` command: LightningCLI fit / validate / test / predict. No logic lives here."""

from __future__ import annotations

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from speclora.checkpoint import BestAndLastCheckpoint
from speclora.data.datamodule import MultiTaskDataModule
from speclora.model.module import SpecLoRAModule
from speclora.submission import SubmissionWriter


class SpecLoRACLI(LightningCLI):
    """Links the data and the model: the task list and its order, the tokenizer, the seed.

    ``speclora predict`` writes the leaderboard files through the ``submission`` group
    (:class:`~speclora.submission.SubmissionWriter`: ``--submission.out_dir``, ``--submission.adapters_dir``);
    the writer acts only in predict.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.tasks", "model.tasks")
        parser.link_arguments("model.backbone", "data.tokenizer")
        parser.link_arguments("seed_everything", "data.seed")
        parser.add_lightning_class_args(SubmissionWriter, "submission")

    def _instantiate_trainer(self, config: dict, callbacks: list):
        # the default callbacks give way where the trainer is told not to use what they need:
        # --trainer.enable_checkpointing false drops the default checkpoint, --trainer.logger false the
        # learning-rate monitor (Lightning refuses either combination)
        defaults = self.trainer_defaults.get("callbacks", [])
        kept = [cb for cb in defaults
                if not (isinstance(cb, ModelCheckpoint) and config.get("enable_checkpointing") is False)
                and not (isinstance(cb, LearningRateMonitor) and config.get("logger") is False)]
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
        ],
    }


def main(args: list[str] | None = None) -> SpecLoRACLI:
    return SpecLoRACLI(
        SpecLoRAModule,
        MultiTaskDataModule,
        seed_everything_default=0,
        trainer_defaults=trainer_defaults(),
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
