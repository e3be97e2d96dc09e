"""--isolation pool (speclora.bench.quality_pool): long-lived workers, each cell from the same start state,
a failing cell, a killed worker and a timeout each fail one cell only. The cells here are quick stand-ins
(tests/bench/pool_cells.py); tests/bench/test_quality_runner.py runs real smoke cells in a pool."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from speclora.bench import quality
from speclora.bench.quality_pool import CellPool
from speclora.bench.quality_scales import Cell, Plan

REPO = Path(__file__).resolve().parents[2]
RUNNER = "tests.bench.pool_cells:run"


@pytest.fixture(autouse=True)
def importable(monkeypatch):
    """The workers import the stand-in runner from this checkout."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))


def _cell(arm: str, seed: int = 0) -> Cell:
    return Cell("main", arm, seed, ("rte",), ())


def _run(pool: CellPool, out: Path, cell: Cell, timeout: float | None = None) -> dict:
    run_dir = out / "runs" / cell.run_id
    run_dir.mkdir(parents=True)
    return pool.run(cell, run_dir, None, 4, False, timeout)


def test_a_worker_runs_many_cells_each_from_the_same_start_state(tmp_path):
    with CellPool(1, tmp_path / "pool", runner=RUNNER, warm=()) as pool:
        results = [_run(pool, tmp_path, _cell("probe", seed)) for seed in range(3)]
    assert [r["status"] for r in results] == ["ok"] * 3
    assert len(pool.started) == 1 and {r["pid"] for r in results} == {pool.started[0]}  # one worker, three cells
    # each cell changed threads, matmul precision, flags, dtype, grad mode, env, cwd, argv and the generators:
    # the next one still finds the worker as it started (the same draws from the global generators too)
    first = results[0]["seen"]
    assert first["leak"] is None and first["precision"] == "highest" and first["grad"] and first["cwd"] == os.getcwd()
    assert [r["seen"] for r in results[1:]] == [first, first]
    for r in results:  # each cell's output in its own run.log, the result where process isolation puts it
        run_dir = tmp_path / "runs" / r["run_id"]
        assert (run_dir / "run.log").read_text().count("started") == 1
        assert json.loads((run_dir / "cell.json").read_text())["cell"]["arm"] == "probe"
        assert json.loads((run_dir / "result.json").read_text())["status"] == "ok"


def test_a_cell_that_raises_fails_alone_and_the_worker_goes_on(tmp_path):
    with CellPool(1, tmp_path / "pool", runner=RUNNER, warm=()) as pool:
        before, failed, after = (_run(pool, tmp_path, c) for c in (_cell("probe"), _cell("raise"), _cell("probe", 1)))
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: this cell fails on purpose"
    assert "fails on purpose" in failed["traceback"] and failed["run_id"] == "main__raise__suite__seed0"
    assert "fails on purpose" in (tmp_path / "runs" / failed["run_id"] / "run.log").read_text()
    assert before["status"] == after["status"] == "ok" and before["pid"] == after["pid"] and len(pool.started) == 1


def test_a_worker_killed_mid_cell_fails_that_cell_and_is_replaced(tmp_path):
    with CellPool(1, tmp_path / "pool", runner=RUNNER, warm=()) as pool:
        got: dict = {}
        thread = threading.Thread(target=lambda: got.update(_run(pool, tmp_path, _cell("sleep"))))
        thread.start()
        log = tmp_path / "runs" / "main__sleep__suite__seed0" / "run.log"
        deadline = time.monotonic() + 120
        while not (log.is_file() and "started" in log.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        killed = pool.started[0]
        os.kill(killed, signal.SIGKILL)  # as the kernel's out-of-memory killer would
        thread.join(60)
        assert got["status"] == "failed" and "killed by SIGKILL" in got["error"] and str(killed) in got["error"]
        assert "started" in got["traceback"]  # the tail of the cell's log
        assert json.loads((log.parent / "result.json").read_text())["status"] == "failed"
        after = _run(pool, tmp_path, _cell("probe"))
        assert after["status"] == "ok" and len(pool.started) == 2 and after["pid"] == pool.started[1] != killed
        # an interrupted matrix (Ctrl-C) kills the busy workers at once; their cells fail as with process isolation
        got.clear()
        thread = threading.Thread(target=lambda: got.update(_run(pool, tmp_path, _cell("sleep", 1))))
        thread.start()
        log = tmp_path / "runs" / "main__sleep__suite__seed1" / "run.log"
        while not (log.is_file() and "started" in log.read_text()) and time.monotonic() < deadline + 120:
            time.sleep(0.1)
        pool.terminate()
        thread.join(60)
    assert got["status"] == "failed" and "killed by SIGKILL" in got["error"]


def test_the_run_timeout_holds_per_cell_and_a_second_run_reuses_finished_cells(tmp_path):
    plan = Plan((_cell("sleep"), _cell("ok"), _cell("ok", 1)), ("rte",), (), {})
    with CellPool(2, tmp_path / "pool", runner=RUNNER, warm=()) as pool:
        start = time.monotonic()
        rows = quality.run_plan(plan, tmp_path, isolation="pool", jobs=2, timeout=3, pool=pool, progress=lambda s: None)
        assert time.monotonic() - start < 100  # the sleeper (120 s) was cut off
        assert [r["status"] for r in rows] == ["failed", "ok", "ok"]
        assert rows[0]["error"].startswith("timeout: the run took longer than --run-timeout 3 s")
        timed_out = next(pid for pid in pool.started if pid not in {rows[1]["pid"], rows[2]["pid"]})
        with pytest.raises(ProcessLookupError):  # killed (and reaped), not left running
            os.kill(timed_out, 0)
        started = len(pool.started)
        again = quality.run_plan(plan, tmp_path, isolation="pool", jobs=2, pool=pool, progress=lambda s: None)
        assert again == rows and len(pool.started) == started  # nothing ran, no worker started


def test_pool_options_are_checked(tmp_path):
    plan = Plan((_cell("probe"),), ("rte",), (), {})
    with pytest.raises(ValueError, match="--isolation='pools'; allowed: inline, process, pool"):
        quality.run_plan(plan, tmp_path, isolation="pools")
    with pytest.raises(ValueError, match="--jobs=0"):
        CellPool(0, tmp_path)
    args = quality._parser().parse_args(["quality", "--scale", "smoke", "--out", str(tmp_path), "--isolation", "pool"])
    assert args.isolation == "pool"
