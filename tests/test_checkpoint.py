"""BestAndLastCheckpoint: last.ckpt is the latest validated state even when the score stops improving."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from speclora.checkpoint import BestAndLastCheckpoint


class _Worsening(BoringModel):
    """Logs a val/average that only gets worse: only the first validation is a best."""

    def validation_step(self, batch, batch_idx):
        out = super().validation_step(batch, batch_idx)
        self.log("val/average", -float(self.global_step))
        return out


def _fit(tmp_path, callback, max_steps=6):
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=max_steps, val_check_interval=2, limit_val_batches=1,
                        callbacks=[callback], logger=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(_Worsening())
    return trainer


def test_last_checkpoint_is_the_latest_validation_not_the_best(tmp_path):
    callback = BestAndLastCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/average", mode="max", save_last=True)
    _fit(tmp_path, callback)
    assert torch.load(callback.best_model_path, weights_only=False)["global_step"] == 2
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 6  # Lightning's own ModelCheckpoint leaves it at 2 here


def test_last_checkpoint_is_written_at_the_end_without_a_final_validation(tmp_path):
    callback = BestAndLastCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/average", mode="max", save_last=True)
    _fit(tmp_path, callback, max_steps=5)  # validations at 2 and 4, training ends at 5
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 5
