"""The default checkpointing of ``speclora fit``: the best by ``val/average``, and always the latest state.

Lightning 2.6's ``ModelCheckpoint(save_last=True)`` rewrites ``last.ckpt`` only when a top-k file is saved in
the same step: a run whose validation score stops improving keeps an old ``last.ckpt``, and a killed run
resumed from it loses every step since its best. ``BestAndLastCheckpoint`` keeps the top-k files as usual and
rewrites ``last.ckpt`` after every validation and at the end of training, so ``--ckpt_path last`` (or the
file) resumes from the latest validated step.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class BestAndLastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is the latest state, not the latest improvement."""

    def _save_last_if_stale(self, trainer: L.Trainer) -> None:
        # skipped when a file was already written at this step (then last.ckpt was rewritten with it)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_stale(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._save_last_if_stale(trainer)
