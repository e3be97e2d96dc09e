"""One place saves and loads a task head (TaskHeads.save_head / load_head): every export format uses it."""

from __future__ import annotations

import json

import pytest
import torch

from speclora.model.heads import HEAD_WEIGHTS, TASK_META, TaskHeads
from speclora.tasks import resolve_tasks


def test_a_head_round_trips_with_its_description(tmp_path):
    torch.manual_seed(0)
    specs = resolve_tasks(["rte", "stsb"])
    saved, fresh = TaskHeads(specs, 8), TaskHeads(specs, 8)
    saved.save_head(1, tmp_path / "stsb", pooling="mean", method="independent")
    meta = json.loads((tmp_path / "stsb" / TASK_META).read_text())
    assert meta == {"task": "stsb", "kind": "regression", "num_labels": 1,
                    "label_names": list(specs[1].label_names), "target_shift": 2.7, "target_scale": 1.46,
                    "pooling": "mean", "method": "independent"}
    assert list(meta) == ["task", "kind", "num_labels", "label_names", "target_shift", "target_scale", "pooling",
                          "method"]
    assert not torch.equal(fresh.heads[1][1].weight, saved.heads[1][1].weight)
    fresh.load_head(1, tmp_path / "stsb")
    for a, b in zip(fresh.heads[1].state_dict().values(), saved.heads[1].state_dict().values()):
        assert torch.equal(a, b)


def test_a_missing_head_names_the_task_and_folder(tmp_path):
    heads = TaskHeads(resolve_tasks(["rte"]), 8)
    with pytest.raises(FileNotFoundError, match=f"no exported head for task 'rte' at {tmp_path}"):
        heads.load_head(0, tmp_path)
    assert not (tmp_path / HEAD_WEIGHTS).exists()
