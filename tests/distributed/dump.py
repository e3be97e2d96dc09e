"""A test-only callback that writes what each rank saw and holds, one file per rank.

Passed to a ``speclora`` subprocess with ``--trainer.callbacks+=tests.distributed.dump.DumpState
--trainer.callbacks.out_dir=DIR``; every rank writes ``DIR/<stage>_rank<r>.pt`` (rewritten atomically after
each step, so a killed run leaves what it had done):

- ``batches``: global step -> this rank's batch as ``task * 100_000 + uid`` per example;
- ``spectral``: global step -> the SpectralGraphCallback state after that step (EMA correlations,
  eigenpairs, learned coefficients, counters), when the run has one;
- ``metrics``: global step -> the val/test metrics every rank holds after an evaluation;
- ``params``: the trainable parameters at the end of the stage (or of the last step done).

``hold_at_step=k`` makes every rank wait before training step ``k`` (after the checkpoints and validation of
step ``k``), having written ``DIR/holding``: the test then kills the run at a known point.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback

TASK_STRIDE = 100_000


def _detach(x: Any) -> Any:
    if torch.is_tensor(x):
        return x.detach().cpu().clone()
    if isinstance(x, dict):
        return {k: _detach(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_detach(v) for v in x]
    return x


class DumpState(Callback):
    """Writes each rank's batches, spectral state, metrics and parameters under ``out_dir``.

    Args:
        out_dir: folder of the per-rank files (created).
        hold_at_step: wait (up to ``hold_seconds``) before this global step, to be killed there.
        hold_seconds: how long a hold lasts at most.
    """

    def __init__(self, out_dir: str, hold_at_step: int | None = None, hold_seconds: float = 300.0) -> None:
        super().__init__()
        self.out_dir = Path(out_dir)
        self.hold_at_step = hold_at_step
        self.hold_seconds = hold_seconds
        self.record: dict[str, Any] = {"batches": {}, "spectral": {}, "metrics": {}, "params": {}}
        self._stage = "fit"

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._stage = getattr(stage, "value", stage)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def _write(self, trainer, pl_module) -> None:
        self.record["params"] = {n: _detach(p) for n, p in pl_module.named_parameters() if p.requires_grad}
        self.record["world_size"] = trainer.world_size
        path = self.out_dir / f"{self._stage}_rank{trainer.global_rank}.pt"
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(self.record, tmp)
        os.replace(tmp, path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.hold_at_step is not None and trainer.global_step == self.hold_at_step:
            (self.out_dir / f"holding_rank{trainer.global_rank}").touch()
            time.sleep(self.hold_seconds)
        ids = batch["task"] * TASK_STRIDE + batch["uid"]  # (B,)
        self.record["batches"][trainer.global_step] = ids.tolist()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from speclora.spectral.callback import SpectralGraphCallback

        spectral = next((c for c in trainer.callbacks if isinstance(c, SpectralGraphCallback)), None)
        if spectral is not None and spectral.layout is not None:
            # global_step has counted this step already: key by the step's 0-based index
            self.record["spectral"][trainer.global_step - 1] = _detach(spectral.state_dict())
        self._write(trainer, pl_module)

    def _metrics(self, trainer, pl_module, prefix: str) -> None:
        if trainer.sanity_checking:
            return
        values = {k: float(v) for k, v in trainer.callback_metrics.items()
                  if k.startswith(prefix) and not k.endswith("/loss")}
        self.record["metrics"][trainer.global_step] = values
        self._write(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._metrics(trainer, pl_module, "val/")

    def on_test_end(self, trainer, pl_module) -> None:
        self._metrics(trainer, pl_module, "test/")

    def on_train_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module)
