"""The ``speclora`` command: LightningCLI fit / validate / test / predict. No logic lives here."""

from __future__ import annotations

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

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


def trainer_defaults() -> dict:
    return {
        # speclora's task-mixing sampler shards across ranks itself and must not be re-wrapped
        "use_distributed_sampler": False,
        "callbacks": [
            LearningRateMonitor(logging_interval="step"),
            ModelCheckpoint(
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
