"""Training batches drawn from the real data on the tiny encoder, for the step tests (CPU, GPU, compiled)."""

from __future__ import annotations

from pathlib import Path

from speclora.data.datamodule import MultiTaskDataModule


def train_batches(tiny_backbone: str, data_root: Path, cache: Path, tasks: list[str], count: int, *,
                  max_length: int = 32, batch_size: int = 12, mixing: str | None = "equal") -> list[dict]:
    """The first ``count`` training batches of ``tasks`` (at most 64 training and 8 evaluation rows per task)."""
    kwargs = {} if mixing is None else {"mixing": mixing}
    dm = MultiTaskDataModule(tasks=tasks, data_dir=str(data_root), tokenizer=tiny_backbone, max_length=max_length,
                             batch_size=batch_size, cache_dir=str(cache), max_train_per_task=64,
                             max_eval_per_task=8, **kwargs)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(count)]
