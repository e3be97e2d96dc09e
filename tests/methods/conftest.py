"""Fixtures of the method tests: the tokenised-data cache and one mixed training batch of the test file's
``TASKS`` (each file names its tasks; the batch is built once per file)."""

from __future__ import annotations

from pathlib import Path

import pytest

from speclora.data.datamodule import MultiTaskDataModule


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One tokenised-data cache for the session (a file's CLI tests reuse what its batch tokenised)."""
    return tmp_path_factory.getbasetemp() / "token_cache"


@pytest.fixture(scope="module")
def batch(request, tiny_backbone, data_root, cache):
    """The first training batch of the file's ``TASKS``, mixed equally, 16 rows of at most 48 tokens."""
    dm = MultiTaskDataModule(tasks=request.module.TASKS, data_dir=str(data_root), tokenizer=tiny_backbone,
                             max_length=48, batch_size=16, cache_dir=str(cache), mixing="equal")
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))
