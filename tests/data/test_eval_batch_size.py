"""The evaluation batch size changes how rows are padded together, not the scores (the gpu scale evaluates
in batches of 512)."""

from __future__ import annotations

import json

import pytest

from speclora.bench.quality_scales import REPO_CONFIGS
from speclora.cli import main


def test_test_scores_do_not_depend_on_the_evaluation_batch_size(tiny_backbone, data_root, tmp_path):
    scores = []
    for size in (3, 64):
        cli = main(["test", "--config", str(REPO_CONFIGS / "default.yaml"), "--config",
                    str(REPO_CONFIGS / "bench" / "smoke.yaml"), "--config",
                    str(REPO_CONFIGS / "methods" / "independent.yaml"), "--model.backbone", tiny_backbone,
                    "--data.data_dir", str(data_root), "--data.tasks", json.dumps(["rte", "stsb", "copa"]),
                    "--data.cache_dir", str(tmp_path / "cache"), "--data.eval_batch_size", str(size),
                    "--seed_everything", "0", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                    "--trainer.default_root_dir", str(tmp_path / f"run{size}")])
        scores.append({k: float(v) for k, v in cli.trainer.callback_metrics.items()
                       if k.startswith("test/") and not k.endswith("/loss")})
    small, large = scores
    assert len(small) >= 7 and small.keys() == large.keys()  # every entry's metrics, scores and the average
    assert small == pytest.approx(large, rel=1e-5, abs=1e-5)  # padding changes float rounding only
