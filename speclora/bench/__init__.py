"""Benchmarks: the quality matrix, the budget probe, the perf report and the timing tools (README, docs/)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMMIT_ENV = "SPECLORA_COMMIT"  # the commit a copy of the tree without .git was taken at
COMMIT_FILE = Path(".gpu") / "commit"  # the same, written by .ci/gpu-pack into what travels to a device


def code_commit(repo: Path = REPO) -> str:
    """The code a benchmark runs: the short commit of ``repo``, with ``+changes`` when tracked files differ
    from it; where there is no git checkout (a device's copy of the tree), $SPECLORA_COMMIT, else
    ``repo/.gpu/commit``, else "unknown"."""
    try:
        run = {"cwd": repo, "text": True, "capture_output": True, "timeout": 10}
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **run)
        if head.returncode == 0 and head.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run).stdout.strip()
            return head.stdout.strip() + ("+changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    stamped = repo / COMMIT_FILE
    return (os.environ.get(COMMIT_ENV, "").strip() or (stamped.read_text().strip() if stamped.is_file() else "")
            or "unknown")


def name_and_positive(item: str) -> tuple[str, float | None]:
    """``NAME=NUMBER`` (a command-line entry such as ``--rate shared=3e-3``) -> (NAME stripped, NUMBER), the number
    None unless it parses as a number > 0; the caller says what was allowed."""
    name, _, value = item.partition("=")
    try:
        number = float(value)
    except ValueError:
        return name.strip(), None
    return name.strip(), (number if number > 0 else None)
