"""Regression heads learn the score standardised by the task's label_stats (``regression_target: standard``,
the default; ``range``: mapped onto [−1, 1] by its label_range) and predict it back (speclora.model.heads):
STS-B's 0–5 score is learnt as (y − 2.70) / 1.46."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch

from speclora.model.heads import TASK_META, TaskHeads, target_map
from speclora.tasks import resolve_tasks


def _batch(tasks, labels):
    """One sequence per example: example e of task tasks[e] with label labels[e]."""
    task = torch.tensor(tasks)
    return {"seq_task": task, "seq_example": torch.arange(len(tasks)), "task": task,
            "labels": torch.tensor(labels, dtype=torch.float), "present_tasks": tuple(sorted(set(tasks)))}


def test_the_map_is_stsb_range_and_identity_elsewhere():
    specs = resolve_tasks(["rte", "stsb", "copa"])
    assert target_map(specs) == ([0.0, 2.70, 0.0], [1.0, 1.46, 1.0])
    assert target_map(specs, "range") == ([0.0, 2.5, 0.0], [1.0, 2.5, 1.0])
    bad = [dataclasses.replace(specs[1], label_range=(5.0, 5.0))]
    with pytest.raises(ValueError, match=r"task 'stsb': label_range=\(5.0, 5.0\); allowed: \(low, high\), low < high"):
        target_map(bad, "range")
    raw = [dataclasses.replace(specs[1], label_range=None)]
    assert target_map(raw, "range") == ([0.0], [1.0])


def test_the_loss_is_on_the_scaled_score_and_predictions_on_the_raw_one():
    torch.manual_seed(0)
    heads = TaskHeads(resolve_tasks(["rte", "stsb"]), 8, dropout=0.0).eval()
    batch = _batch([0, 1, 1, 0, 1], [1.0, 0.0, 5.0, 0.0, 3.2])
    pooled = torch.randn(5, 8)
    out = heads.batched(pooled, batch)
    z = torch.stack([heads.heads[1](pooled[i])[0] for i in (1, 2, 4)])  # the STS-B head's raw outputs
    target = (torch.tensor([0.0, 5.0, 3.2]) - 2.70) / 1.46  # -1.85, 1.58, 0.34
    torch.testing.assert_close(out.task_loss[1], (z - target).square().mean())
    raw = (z - torch.tensor([0.0, 5.0, 3.2])).square().mean()
    assert not torch.allclose(out.task_loss[1], raw)  # the unscaled loss would differ
    preds, probs, _ = heads.predict(1, out, batch, torch.tensor([1, 2, 4]))
    torch.testing.assert_close(preds, 2.70 + 1.46 * z.detach())
    assert probs is None
    # a perfect head output gives the label back, and zero loss
    assert torch.allclose(target * 1.46 + 2.70, torch.tensor([0.0, 5.0, 3.2]))
    # classification labels are class indices: the identity map leaves them exact
    assert out.task_loss[0] > 0 and torch.isfinite(out.task_loss[0])


def test_a_state_dict_without_the_map_loads_with_the_raw_score(caplog):
    """A checkpoint written before the buffers: strict load, raw score, a warning naming the change."""
    heads = TaskHeads(resolve_tasks(["rte", "stsb"]), 8)
    old = {k: v for k, v in heads.state_dict().items() if not k.startswith("target_")}
    assert set(heads.state_dict()) - set(old) == {"target_shift", "target_scale"}
    fresh = TaskHeads(resolve_tasks(["rte", "stsb"]), 8)
    with caplog.at_level(logging.WARNING, logger="speclora.model.heads"):
        fresh.load_state_dict(old, strict=True)
    assert "before scaled regression targets" in caplog.text
    assert fresh.target_shift.tolist() == [0.0, 0.0] and fresh.target_scale.tolist() == [1.0, 1.0]
    # today's state dict carries the map and round-trips it
    again = TaskHeads(resolve_tasks(["rte", "stsb"]), 8)
    again.target_shift.zero_()
    again.load_state_dict(heads.state_dict(), strict=True)
    assert again.target_shift.tolist() == pytest.approx([0.0, 2.70])
    assert again.target_scale.tolist() == pytest.approx([1.0, 1.46])


def test_an_exported_head_carries_its_map_and_an_old_export_keeps_the_raw_score(tmp_path, caplog):
    specs = resolve_tasks(["stsb"])
    saved = TaskHeads(specs, 8)
    saved.save_head(0, tmp_path / "stsb")
    loaded = TaskHeads(specs, 8)
    loaded.target_shift.fill_(7.0)
    loaded.load_head(0, tmp_path / "stsb")
    assert (loaded.target_shift.item(), loaded.target_scale.item()) == pytest.approx((2.70, 1.46))
    meta_path = tmp_path / "stsb" / TASK_META
    meta = json.loads(meta_path.read_text())
    assert (meta["target_shift"], meta["target_scale"]) == (2.7, 1.46)  # the shortest decimals, not 2.7000000476
    del meta["target_shift"], meta["target_scale"]
    meta_path.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="speclora.model.heads"):
        loaded.load_head(0, tmp_path / "stsb")
    assert "exported before scaled regression targets" in caplog.text
    assert (loaded.target_shift.item(), loaded.target_scale.item()) == (0.0, 1.0)


def test_the_map_follows_the_module_to_its_device():
    """The buffers move with the heads (a wrong device would fail the index by ``task`` in ``batched``)."""
    heads = TaskHeads(resolve_tasks(["stsb"]), 8).to(torch.float64)
    assert heads.target_shift.dtype == torch.float64  # buffers follow .to(), as they follow .to(device)
    meta = torch.device("meta")
    moved = TaskHeads(resolve_tasks(["stsb"]), 8).to(meta)
    assert moved.target_shift.device == meta and moved.target_scale.device == meta


def test_regression_target_chooses_the_map_and_refuses_what_it_cannot_build():
    specs = resolve_tasks(["rte", "stsb"])
    assert target_map(specs, "range") == ([0.0, 2.5], [1.0, 2.5])
    assert target_map(specs, "standard") == target_map(specs) == ([0.0, 2.70], [1.0, 1.46])  # STS-B train: mean 2.70, std 1.46
    assert target_map(specs, "raw") == ([0.0, 0.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="regression_target='spread'; allowed: 'range', 'standard', 'raw'"):
        target_map(specs, "spread")
    for stats in (None, (2.7, 0.0)):
        with pytest.raises(ValueError, match=r"task 'stsb': label_stats=.*needs \(mean, std\) with std > 0"):
            target_map([dataclasses.replace(specs[1], label_stats=stats)], "standard")
    heads = TaskHeads(specs, 8, regression_target="range")
    assert heads.target_shift.tolist() == [0.0, 2.5] and heads.target_scale.tolist() == [1.0, 2.5]


def test_the_module_refuses_an_unknown_regression_target():
    from speclora.model.module import SpecLoRAModule

    with pytest.raises(ValueError, match="model.regression_target='spread'; allowed: 'range', 'standard', 'raw'"):
        SpecLoRAModule(tasks=["stsb"], regression_target="spread")


def test_label_stats_are_the_training_split_s(data_root):
    """STS-B's label_stats are the mean and std of the scores of its training file (to the digits given)."""
    from speclora.data.sources import read_split

    (spec,) = resolve_tasks(["stsb"])
    scores = torch.tensor([e.label for e in read_split(spec, "train", data_root)], dtype=torch.float64)
    assert len(scores) == spec.train_records
    assert (scores.mean().item(), scores.std(correction=0).item()) == pytest.approx(spec.label_stats, abs=0.005)
