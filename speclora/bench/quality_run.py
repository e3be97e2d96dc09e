"""Running the cells of a plan: in this process, a process per cell, or a pool of workers; resumed, and
bounded by a deadline (speclora.bench.quality_deadline) when one is given.

A cell whose ``OUT/runs/<run>/result.json`` exists is skipped (``retry_failed``: unless it failed), so an
interrupted matrix resumes where it stopped and a second run of the same command runs nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from speclora.bench import code_commit
from speclora.bench.quality_deadline import Deadline
from speclora.bench.quality_pool import CellPool
from speclora.bench.quality_scales import Cell, Plan
from speclora.bench.quality_worker import (
    RESULT,
    failed_result,
    log_tail,
    output_to,
    run_cell,
    write_cell_spec,
    write_result,
)

POOL_LOGS = "pool"  # OUT/pool/worker-<n>.log: the pool workers' own output
ISOLATIONS = ("inline", "process", "pool")


def subset_of(cell: Cell) -> str | None:
    args = list(cell.args)
    return args[args.index("--data.subset") + 1] if "--data.subset" in args else None


def _run_inline(cell: Cell, run_dir: Path, threads: int | None, conflict_batches: int,
                keep_checkpoints: bool) -> dict[str, Any]:
    argv = sys.argv
    sys.argv = argv[:1]  # LightningCLI(args=...) warns when the bench's own arguments are on sys.argv
    write_cell_spec(run_dir, cell, threads, conflict_batches, keep_checkpoints)  # what ran, as the others say
    try:
        with output_to(run_dir / "run.log"):
            return run_cell(cell, run_dir, threads, conflict_batches, keep_checkpoints)
    finally:
        sys.argv = argv


def _run_process(cell: Cell, run_dir: Path, threads: int | None, conflict_batches: int, keep_checkpoints: bool,
                 timeout: float | None) -> dict[str, Any]:
    write_cell_spec(run_dir, cell, threads, conflict_batches, keep_checkpoints)
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    cmd = [sys.executable, "-m", "speclora.bench.quality_worker", str(run_dir)]
    with (run_dir / "run.log").open("ab") as log:
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout)
            why = f"the worker process exited with code {proc.returncode} and wrote no result"
        except subprocess.TimeoutExpired:
            why = f"timeout: the run took longer than --run-timeout {timeout:g} s"
    path = run_dir / RESULT
    if path.is_file() and not why.startswith("timeout"):
        return json.loads(path.read_text())
    result = failed_result(cell, run_dir, why, log_tail(run_dir / "run.log"))
    write_result(run_dir, result)
    return result


def run_plan(
    plan: Plan,
    out: Path,
    isolation: str = "inline",
    jobs: int = 1,
    threads: int | None = None,
    conflict_batches: int = 4,
    retry_failed: bool = False,
    keep_checkpoints: bool = False,
    timeout: float | None = None,
    progress: Callable[[str], None] = print,
    what: str = "quality matrix",
    pool: CellPool | None = None,
    timings: dict[str, float] | None = None,
    deadline: Deadline | None = None,
) -> list[dict[str, Any]]:
    """Run every cell of the plan that has no result yet; return the rows of all cells (planned order).

    A cell with a result file is skipped (``retry_failed``: unless it failed); a cell without one starts
    afresh (a half-written run folder is removed first). Returns one row per cell: its result, or a
    ``status: missing`` row for a cell that did not run. ``isolation``: ``inline`` (this process),
    ``process`` (a fresh process per cell) or ``pool`` (``jobs`` long-lived worker processes,
    speclora.bench.quality_pool; ``pool``: one already started, kept open for the caller's next plan).
    ``timings``: filled with run id -> the wall time of each cell run, as the runner saw it. ``deadline``:
    cells start only while their estimate fits in the time left, and those still running when it is up are
    stopped and left without a result (speclora.bench.quality_deadline); the cells of a kind never measured,
    which start only while half the deadline is left, go first (a matrix's few-shot cells come last in its
    plan, so that slices would otherwise reach them only once too little time was left, slice after slice).
    """
    if isolation not in ISOLATIONS:
        raise ValueError(f"--isolation={isolation!r}; allowed: {', '.join(ISOLATIONS)}")
    if jobs < 1:
        raise ValueError(f"--jobs={jobs}; allowed: an integer >= 1")
    if isolation == "inline" and jobs > 1:
        raise ValueError(f"--jobs={jobs} needs --isolation process or pool (inline runs one cell at a time)")
    runs = out / "runs"
    todo = pending(plan.cells, out, retry_failed)
    if deadline is not None:  # a kind never measured starts only in a deadline's first half: it goes first, the
        todo.sort(key=lambda c: deadline.estimate(c) is not None)  # rest in plan order (a stable sort)
    progress(f"{what}: {len(plan.cells)} cells, {len(plan.cells) - len(todo)} already done, "
             f"{len(todo)} to run ({isolation}, {jobs} at a time)")
    if deadline is not None and isolation == "inline" and todo:
        progress("--deadline with --isolation inline: a cell running at the deadline is not stopped (it runs in "
                 "this process), only later cells are kept from starting; --isolation process or pool stops it")

    commit = code_commit()  # the code these cells run, kept with each result (a matrix may span commits)

    def one(i_cell: tuple[int, Cell]) -> None:
        i, cell = i_cell
        if deadline is not None and not deadline.may_start(cell):
            progress(f"[{i}/{len(todo)}] {cell.run_id}: not started, {deadline.deferred[cell.run_id]}")
            return
        run_dir = runs / cell.run_id
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        start = time.perf_counter()
        if isolation == "inline":
            result = _run_inline(cell, run_dir, threads, conflict_batches, keep_checkpoints)
        elif isolation == "pool":
            result = workers.run(cell, run_dir, threads, conflict_batches, keep_checkpoints, timeout)
        else:
            limit = timeout if deadline is None else min(timeout or float("inf"), max(deadline.left(), 1.0))
            result = _run_process(cell, run_dir, threads, conflict_batches, keep_checkpoints, limit)
        seconds = time.perf_counter() - start
        if (run_dir / RESULT).is_file() and "wall_seconds" not in result:  # the cell's cost, start-up included,
            result = {**result, "wall_seconds": seconds, "jobs": jobs, "commit": commit}  # this many cells at once
            write_result(run_dir, result)
        if deadline is not None:
            result = deadline.finished(cell, run_dir, result, seconds)
        if timings is not None:
            timings[cell.run_id] = seconds
        avg = result.get("average")
        what = f"average {avg:.2f}" if isinstance(avg, float) else (result.get("error") or "")[:160]
        progress(f"[{i}/{len(todo)}] {cell.run_id}: {result['status']} in {seconds:.1f} s, {what}")

    with contextlib.ExitStack() as stack:
        workers = pool
        if isolation == "pool" and workers is None and todo:
            workers = stack.enter_context(CellPool(jobs, out / POOL_LOGS, threads))
        if deadline is not None:  # process cells stop at their own timeout; inline ones cannot be stopped
            stack.callback(deadline.watch(workers.terminate if workers is not None else lambda: None).cancel)
        if jobs == 1:
            for item in enumerate(todo, 1):
                one(item)
        else:
            with ThreadPoolExecutor(jobs) as threads_pool:
                try:
                    list(threads_pool.map(one, enumerate(todo, 1)))
                except BaseException:  # e.g. Ctrl-C: do not wait for the pool's running cells to finish
                    if workers is not None:
                        workers.terminate()
                    raise
    return collect_rows(plan.cells, out)


def pending(cells: Sequence[Cell], out: Path, retry_failed: bool = False) -> list[Cell]:
    """The cells without a result file (``retry_failed``: also those whose result says failed)."""
    todo = []
    for cell in cells:
        path = out / "runs" / cell.run_id / RESULT
        if path.is_file():
            status = json.loads(path.read_text()).get("status")
            if not (retry_failed and status != "ok"):
                continue
        todo.append(cell)
    return todo


def collect_rows(cells: Sequence[Cell], out: Path) -> list[dict[str, Any]]:
    """One row per planned cell: its result file, else a ``missing`` row."""
    rows = []
    for cell in cells:
        path = out / "runs" / cell.run_id / RESULT
        if path.is_file():
            row = json.loads(path.read_text())
        else:
            row = {"run_id": cell.run_id, "group": cell.group, "arm": cell.arm, "seed": cell.seed,
                   "tasks": list(cell.tasks), "status": "missing", "error": "not run (yet)"}
        row["subset"] = subset_of(cell)
        row["lr"] = cell.lr
        rows.append(row)
    return rows
