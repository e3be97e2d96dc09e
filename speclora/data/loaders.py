"""The datasets, samplers and loaders the DataModule hands out (speclora.data.datamodule builds them).

:class:`TaskPart` is some examples of one task's tokenised split; training draws ``(task, row)`` pairs
from :class:`MixedTrain` in the order of :class:`~speclora.data.mixture.MixtureBatchSampler`, through a
:class:`ResumableLoader` that Lightning checkpoints; evaluation runs one loader per entry, each shard
(:class:`ShardSampler`) scoring every example once and each batch naming its entry (:class:`EntryCollator`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from speclora.data.tokenized import MultiTaskCollator, TokenizedSplit


class TaskPart(Dataset):
    """A view of some examples of a tokenised split, tagged with its task index."""

    def __init__(self, split: TokenizedSplit, rows: torch.Tensor, task_index: int) -> None:
        self.split = split
        self.rows = rows  # (n,) long indices into the split
        self.task_index = task_index

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def __getitem__(self, i: int) -> tuple[int, dict]:
        return self.task_index, self.split.item(int(self.rows[i]))

    def lengths(self) -> torch.Tensor:
        """(n,) tokens of each example's longest sequence: the length it pads its batch to."""
        split = self.split
        seq_len = split.seq_offsets[1:] - split.seq_offsets[:-1]  # (S,)
        owner = torch.repeat_interleave(torch.arange(len(split.ex_seq_count)), split.ex_seq_count)  # (S,)
        longest = torch.zeros(len(split.ex_seq_count), dtype=torch.long).scatter_reduce(
            0, owner, seq_len, reduce="amax")  # (E,)
        return longest[self.rows]  # (n,)


class MixedTrain(Dataset):
    """Indexed by the sampler's ``(task_index, row)`` pairs."""

    def __init__(self, parts: list[TaskPart]) -> None:
        self.parts = parts

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, dict]:
        task, row = key
        return self.parts[task][row]


class ShardSampler(torch.utils.data.Sampler[int]):
    """Evaluation order ``rank, rank + W, ...``: no padding, so every example is scored exactly once."""

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, n, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


class EntryCollator:
    """Collates an evaluation batch and names the entry (``cola``, ``mnli_m``) it belongs to."""

    def __init__(self, collate: MultiTaskCollator, entry: str) -> None:
        self.collate = collate
        self.entry = entry

    def __call__(self, items):
        batch = self.collate(items)
        batch["entry"] = self.entry
        return batch


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning checkpoints: it stores how far into the epoch training got.

    ``consumed_fn`` returns the number of batches the training loop has processed in the current epoch
    (read from the trainer at save time, so prefetching does not skew it); ``epoch_fn`` the epoch.
    """

    consumed_fn: Callable[[], int] | None = None
    epoch_fn: Callable[[], int] | None = None

    def __iter__(self):
        if self.epoch_fn is not None:
            self.batch_sampler.set_epoch(self.epoch_fn())
        return super().__iter__()

    def state_dict(self) -> dict[str, Any]:
        consumed = self.consumed_fn() if self.consumed_fn is not None else 0
        return self.batch_sampler.state_dict(consumed)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch_sampler.load_state_dict(state)
