"""Cells for the pool tests (speclora.bench.quality_pool), run by a worker in place of run_cell.

The cell's arm says what it does: ``probe`` writes what the process looks like (then changes all of it),
``ok`` just succeeds, ``raise`` raises, ``sleep`` waits (to be killed or timed out). Each result records the
worker's pid.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speclora.bench.quality_scales import Cell
from speclora.bench.quality_worker import write_result

LEAK = "SPECLORA_TEST_LEAK"


def seen() -> dict[str, Any]:
    """What a cell finds in its process at its start."""
    return {"threads": torch.get_num_threads(), "precision": torch.get_float32_matmul_precision(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark, "deterministic": torch.are_deterministic_algorithms_enabled(),
            "dtype": str(torch.get_default_dtype()), "grad": torch.is_grad_enabled(), "leak": os.environ.get(LEAK),
            "cwd": os.getcwd(), "argv": list(sys.argv), "torch_draw": torch.rand(1).item(), "random_draw": random.random(),
            "numpy_draw": float(np.random.rand())}


def change_everything() -> None:
    """What a careless cell might leave behind."""
    torch.set_num_threads(1 if torch.get_num_threads() > 1 else 2)
    torch.set_float32_matmul_precision("medium")
    torch.backends.cudnn.benchmark = not torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_default_dtype(torch.float64)
    torch.set_grad_enabled(False)
    os.environ[LEAK] = "left by an earlier cell"
    os.chdir("/")
    sys.argv.append("--left-behind")
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)


def run(cell: Cell, run_dir: Path, threads: int | None = None, conflict_batches: int = 4,
        keep_checkpoints: bool = False) -> dict[str, Any]:
    result = {"run_id": cell.run_id, "group": cell.group, "arm": cell.arm, "seed": cell.seed,
              "tasks": list(cell.tasks), "pid": os.getpid()}
    print(f"cell {cell.run_id} started", flush=True)
    if cell.arm == "raise":
        raise RuntimeError("this cell fails on purpose")
    if cell.arm == "sleep":
        time.sleep(120)
    if cell.arm == "probe":
        result["seen"] = seen()
        change_everything()
    result["status"] = "ok"
    write_result(run_dir, result)
    return result
