"""The command-line arguments of a small ``speclora fit`` on the tiny encoder, shared by the CLI tests."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def fit_args(
    tiny_backbone: str,
    data_root: Path,
    cache: Path,
    root: Path,
    *configs: str,
    steps: int | None = 2,
    max_length: int = 48,
    batch_size: int = 8,
    caps: tuple[int, int] | None = (32, 8),
) -> list[str]:
    """configs/default.yaml, then ``configs`` (paths under configs/, e.g. "methods/ortho.yaml"), on the tiny
    encoder and the data under ``data_root``; ``steps`` training steps with one validation at the end,
    ``caps`` = (max_train_per_task, max_eval_per_task); None leaves either to the configs."""
    args = ["--config", str(REPO / "configs" / "default.yaml")]
    for config in configs:
        args += ["--config", str(REPO / "configs" / config)]
    args += [
        "--model.backbone", tiny_backbone,
        "--data.data_dir", str(data_root),
        "--data.cache_dir", str(cache),
        "--data.max_length", str(max_length),
        "--data.batch_size", str(batch_size),
        "--trainer.default_root_dir", str(root),
        "--trainer.enable_progress_bar", "false",
    ]
    if caps is not None:
        args += ["--data.max_train_per_task", str(caps[0]), "--data.max_eval_per_task", str(caps[1])]
    if steps is not None:
        args += ["--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps)]
    return args
