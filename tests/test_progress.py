"""The progress bar of `speclora fit`: the step out of max_steps and the validation average, no version number."""

from __future__ import annotations

import io

import lightning as L
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import TensorBoardLogger

from speclora.cli import trainer_defaults
from speclora.progress import StepRichProgressBar, StepTQDMProgressBar


class _Validated(BoringModel):
    def validation_step(self, batch, batch_idx):
        out = super().validation_step(batch, batch_idx)
        self.log("val/average", 61.25, prog_bar=True)
        return out


def _fit(tmp_path, bar, **kwargs) -> None:
    # two epochs of 4 batches, stopped by max_steps=6: Lightning's own bars read "Epoch 1/-2 ... 2/2 ... v_num"
    trainer = L.Trainer(default_root_dir=tmp_path, limit_train_batches=4, val_check_interval=3, limit_val_batches=1,
                        callbacks=[bar], logger=TensorBoardLogger(tmp_path), enable_checkpointing=False,
                        enable_model_summary=False, num_sanity_val_steps=0, **kwargs)
    trainer.fit(_Validated())


def test_tqdm_bar_counts_steps_of_max_steps(tmp_path, capsys):
    _fit(tmp_path, StepTQDMProgressBar(), max_steps=6)
    captured = capsys.readouterr()
    final = (captured.out + captured.err).replace("\r", "\n").strip().splitlines()[-1]
    assert final.startswith("step: 100%") and "6/6" in final, final
    assert "val/average=61.2" in final and "v_num" not in final and "Epoch" not in final


def test_rich_bar_counts_steps_of_max_steps(tmp_path):
    pytest.importorskip("rich")
    out = io.StringIO()
    _fit(tmp_path, StepRichProgressBar(console_kwargs={"file": out, "width": 160, "force_terminal": False}),
         max_steps=6)
    text = out.getvalue()
    assert "step" in text and "6/6" in text and "val/average: 61.250" in text
    assert "v_num" not in text and "Epoch" not in text and "-2" not in text


def test_a_run_budgeted_in_epochs_keeps_the_epoch_display(tmp_path, capsys):
    _fit(tmp_path, StepTQDMProgressBar(), max_epochs=2)
    captured = capsys.readouterr()
    text = captured.out + captured.err  # Lightning's tqdm bars write to stdout
    assert "Epoch 1" in text and "4/4" in text and "v_num" not in text


def test_speclora_fit_uses_the_step_bar():
    bars = [cb for cb in trainer_defaults()["callbacks"] if isinstance(cb, (StepRichProgressBar, StepTQDMProgressBar))]
    assert len(bars) == 1
