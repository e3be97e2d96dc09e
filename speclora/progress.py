"""The training progress bar of ``speclora fit``: the optimizer step out of ``trainer.max_steps``.

Lightning's bars count batches per epoch and title them ``Epoch {e}/{max_epochs - 1}``; a speclora run is
budgeted in steps (``max_epochs`` is -1), so they read ``Epoch 0/-2``, and they show the logger's version as
a metric (``v_num: 0.000``). These show ``step  120/300`` with the losses and ``val/average`` logged to the bar,
and no version. A run budgeted in epochs keeps Lightning's display. Rich is used when installed, as Lightning
does, else tqdm.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

DESCRIPTION = "step"


def _step_budget(trainer: L.Trainer) -> int | None:
    """``max_steps`` when the run is budgeted in optimizer steps, else None."""
    return trainer.max_steps if trainer.max_steps is not None and trainer.max_steps > 0 else None


class _StepCount:
    """What both bars change: the total is ``max_steps`` and no version number is shown."""

    @property
    def total_train_batches(self) -> int | float:
        budget = _step_budget(self.trainer)
        return budget if budget is not None else super().total_train_batches

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


class StepTQDMProgressBar(_StepCount, TQDMProgressBar):
    """tqdm: ``step: 40%|████      | 120/300 [..., train/loss=0.71, val/average=61.2]``."""

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        budget = _step_budget(trainer)
        if budget is None:
            return super().on_train_epoch_start(trainer, *args)
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.reset(total=budget)
        self.train_progress_bar.set_description(DESCRIPTION, refresh=False)
        self._show(trainer.global_step)  # a later epoch (or a resumed run) goes on from the step reached

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if _step_budget(trainer) is None:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        if self.train_progress_bar is not None and self._should_update(step, self.train_progress_bar.total):
            self._show(step)
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def _show(self, step: int) -> None:
        bar = self.train_progress_bar
        if not bar.disable:
            bar.n = step
            bar.refresh()


class StepRichProgressBar(_StepCount, RichProgressBar):
    """rich: ``step 120/300 ━━━━━━━━╸━━━━━━━━━━ 0:01:02 • 0:01:30 1.9it/s train/loss: 0.71 val/average: 61.2``."""

    def _get_train_description(self, current_epoch: int) -> str:
        if _step_budget(self.trainer) is None:
            return super()._get_train_description(current_epoch)
        return f"{DESCRIPTION:{len(self.validation_description)}}"  # padded as Lightning pads "Epoch N"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if _step_budget(trainer) is not None:
            self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if _step_budget(trainer) is None:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.is_disabled and self.train_progress_bar_id is None:  # resumed mid-epoch
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()


def step_progress_bar() -> ProgressBar:
    """The bar ``speclora fit`` uses: rich when installed (as Lightning chooses), else tqdm."""
    return StepRichProgressBar() if _RICH_AVAILABLE else StepTQDMProgressBar()
