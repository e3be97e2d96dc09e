"""--deadline (speclora.bench.quality_deadline): a matrix run in slices that end on time and lose no finished cell.

The estimates are tested on a clock of the test's own; the stopping with quick stand-in cells in a pool
(tests/bench/pool_cells.py); the whole command with two smoke cells, inline."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from speclora.bench import COMMIT_ENV, code_commit, quality
from speclora.bench.quality_deadline import INCOMPLETE, INTERRUPTED, SLACK, START_UP, Deadline, cost
from speclora.bench.quality_pool import CellPool
from speclora.bench.quality_scales import Cell, Plan
from speclora.bench.quality_worker import write_cell_spec, write_result

REPO = Path(__file__).resolve().parents[2]
RUNNER = "tests.bench.pool_cells:run"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _cell(arm: str, seed: int = 0, group: str = "main", tasks: tuple[str, ...] = ("rte", "stsb"),
          steps: int | None = None) -> Cell:
    return Cell(group, arm, seed, tasks, (), None, steps)


def _finished(out: Path, cell: Cell, fit: float, status: str = "ok") -> None:
    run = out / "runs" / cell.run_id
    run.mkdir(parents=True)
    write_cell_spec(run, cell, None, 4, False)
    write_result(run, {"run_id": cell.run_id, "status": status, "fit_seconds": fit, "test_seconds": 5.0})


def test_a_cell_starts_only_when_its_estimate_fits_in_the_time_left(tmp_path):
    _finished(tmp_path, _cell("shared"), fit=100.0)
    _finished(tmp_path, _cell("nash_mtl", steps=400), fit=300.0)
    _finished(tmp_path, _cell("famo"), fit=900.0, status="failed")  # a failed run says nothing of the cost
    clock = Clock()
    deadline = Deadline(500, tmp_path, clock=clock)
    expected = (100.0 + 5.0 + START_UP) * SLACK
    # the same arm, group and budget; else the same group and budget (the longest of them); else unknown
    assert deadline.estimate(_cell("shared", seed=2)) == pytest.approx(expected)
    assert deadline.estimate(_cell("cagrad")) == pytest.approx(expected)
    assert deadline.estimate(_cell("famo")) == pytest.approx(expected)
    assert deadline.estimate(_cell("shared", steps=400)) == pytest.approx((300.0 + 5.0 + START_UP) * SLACK)
    # the runner's own wall time, where the result has it, is the cost
    assert cost({"status": "ok", "fit_seconds": 100.0, "test_seconds": 5.0, "wall_seconds": 140.0}) == 140.0
    assert deadline.estimate(_cell("single", group="single", tasks=("rte",))) is None
    assert deadline.may_start(_cell("shared", seed=1))
    clock.now += 500 - expected + 1  # a second less than the cell needs
    assert not deadline.may_start(_cell("shared", seed=1))
    assert "needs about 144 s" in deadline.deferred["main__shared__suite__seed1"]
    # never measured: it starts while at least half the deadline is left, not after
    assert not deadline.may_start(_cell("single", group="single", tasks=("rte",)))
    assert "not measured yet" in deadline.deferred["single__single__rte__seed0"]
    assert Deadline(500, tmp_path, clock=Clock()).may_start(_cell("single", group="single", tasks=("rte",)))


def test_a_budget_not_measured_yet_is_estimated_from_the_cost_per_step_at_another(tmp_path):
    _finished(tmp_path, _cell("shared", group="budget", steps=1500), fit=150.0 - 5.0 - START_UP)  # 150 s
    _finished(tmp_path, _cell("cagrad"), fit=600.0 - 5.0 - START_UP)  # the scale's own budget, 3,000 steps
    deadline = Deadline(500, tmp_path, clock=Clock(), steps_of=lambda c: c.steps or 3000)
    # the same arm at another budget (0.1 s a step) before another arm at this budget (cagrad, 0.2 s a step)
    assert deadline.estimate(_cell("shared", group="budget", steps=6000)) == pytest.approx(600.0 * SLACK)
    assert deadline.estimate(_cell("shared")) == pytest.approx(300.0 * SLACK)  # main, 3,000 steps
    # an arm never measured: its group at this budget, else the group's highest cost per step
    assert deadline.estimate(_cell("famo")) == pytest.approx(600.0 * SLACK)
    assert deadline.estimate(_cell("famo", group="budget", steps=6000)) == pytest.approx(1200.0 * SLACK)
    assert not deadline.may_start(_cell("famo", group="budget", steps=6000))  # more than the whole 500 s
    # measured at two budgets: the longer one's rate (a short run's start-up and test weigh more per step)
    _finished(tmp_path, _cell("ortho", group="budget", steps=200), fit=60.0 - 5.0 - START_UP)  # 0.3 s a step
    _finished(tmp_path, _cell("ortho", group="budget", steps=800), fit=120.0 - 5.0 - START_UP)  # 0.15 s a step
    again = Deadline(500, tmp_path, clock=Clock(), steps_of=lambda c: c.steps or 3000)
    assert again.estimate(_cell("ortho", group="budget", steps=1600)) == pytest.approx(240.0 * SLACK)
    # without steps (the default reads cell.steps only) a main cell of shared is its group's cost at that budget
    assert Deadline(500, tmp_path).estimate(_cell("shared")) == pytest.approx(600.0 * SLACK)


def test_a_cost_measured_with_more_cells_at_once_is_scaled_down_to_the_jobs_of_now(tmp_path):
    run = tmp_path / "runs" / _cell("shared").run_id
    run.mkdir(parents=True)
    write_cell_spec(run, _cell("shared"), None, 4, False)
    write_result(run, {"status": "ok", "wall_seconds": 600.0, "jobs": 6})
    assert Deadline(500, tmp_path, jobs=6).estimate(_cell("shared", 1)) == pytest.approx(600.0 * SLACK)
    assert Deadline(500, tmp_path, jobs=2).estimate(_cell("shared", 1)) == pytest.approx(200.0 * SLACK)
    assert Deadline(500, tmp_path, jobs=12).estimate(_cell("shared", 1)) == pytest.approx(600.0 * SLACK)  # never up
    # the remedy the refusal names works: with 6 at once the cell cannot fit, with 2 it starts
    assert not Deadline(500, tmp_path, jobs=6).may_start(_cell("shared", 1))
    assert Deadline(500, tmp_path, jobs=2).may_start(_cell("shared", 1))


def test_a_cell_longer_than_the_whole_deadline_is_not_started_again_and_says_why(tmp_path):
    _finished(tmp_path, _cell("full_ft"), fit=600.0)
    deadline = Deadline(500, tmp_path, clock=Clock())
    assert not deadline.may_start(_cell("full_ft", seed=1))
    why = deadline.deferred["main__full_ft__suite__seed1"]
    assert "more than the whole --deadline 500 s" in why and "fewer --jobs" in why
    assert "main__full_ft__suite__seed1" in deadline.summary()


def test_a_cell_stopped_by_the_deadline_keeps_no_result_and_its_time_is_a_lower_bound(tmp_path):
    clock = Clock()
    deadline = Deadline(100, tmp_path, clock=clock)
    cell, other = _cell("shared"), _cell("unolora_star")
    for c in (cell, other):
        (tmp_path / "runs" / c.run_id).mkdir(parents=True)
        write_cell_spec(tmp_path / "runs" / c.run_id, c, None, 4, False)
    # a failure before the deadline is the cell's own: its result stays
    failed = {"run_id": other.run_id, "status": "failed", "error": "RuntimeError: boom"}
    write_result(tmp_path / "runs" / other.run_id, failed)
    assert deadline.finished(other, tmp_path / "runs" / other.run_id, failed, 10.0) == failed
    assert (tmp_path / "runs" / other.run_id / "result.json").is_file()
    # killed at the deadline: no result.json (the next invocation runs it), interrupted.json says how long
    clock.now += 100
    killed = {"run_id": cell.run_id, "status": "failed", "error": "the pool worker exited with code -9"}
    write_result(tmp_path / "runs" / cell.run_id, killed)
    row = deadline.finished(cell, tmp_path / "runs" / cell.run_id, killed, 80.0)
    assert row["status"] == "interrupted" and "stopped at the --deadline of 100 s after 80 s" in row["error"]
    assert not (tmp_path / "runs" / cell.run_id / "result.json").exists()
    assert json.loads((tmp_path / "runs" / cell.run_id / INTERRUPTED).read_text())["seconds"] == 80.0
    assert quality.pending([cell, other], tmp_path) == [cell]
    # the next invocation knows the cell takes at least 80 s
    assert Deadline(100, tmp_path).estimate(_cell("shared", seed=1)) == pytest.approx(80.0 * SLACK)


def test_a_non_positive_deadline_is_refused():
    with pytest.raises(ValueError, match="--deadline=0.0: expected a number of seconds > 0"):
        Deadline(0.0, Path("."))


def test_under_a_deadline_the_cells_of_a_kind_never_measured_run_first(tmp_path, monkeypatch):
    from speclora.bench import quality_run

    _finished(tmp_path, _cell("shared"), fit=10.0)
    few = (_cell("shared", group="fewshot"), _cell("shared", seed=1, group="fewshot"))
    cells = (_cell("shared", seed=1), few[0], _cell("shared", seed=2), few[1])
    ran: list[str] = []

    def fake_run(cell, run_dir, *args):
        ran.append(cell.run_id)
        result = {"run_id": cell.run_id, "status": "ok", "fit_seconds": 1.0, "test_seconds": 1.0}
        write_result(run_dir, result)
        return result

    monkeypatch.setattr(quality_run, "run_cell", fake_run)
    quality.run_plan(Plan(cells, ("rte", "stsb"), (), {}), tmp_path, progress=lambda s: None,
                     deadline=Deadline(3600, tmp_path))
    # few-shot is not measured: its cells go first, while half the deadline is left; the rest in plan order
    assert ran == [few[0].run_id, few[1].run_id, cells[0].run_id, cells[2].run_id]
    for cell in cells:  # without a deadline, the plan's order
        (tmp_path / "runs" / cell.run_id / "result.json").unlink()
    ran.clear()
    quality.run_plan(Plan(cells, ("rte", "stsb"), (), {}), tmp_path, progress=lambda s: None)
    assert ran == [c.run_id for c in cells]


def test_a_pool_matrix_ends_at_its_deadline_with_its_finished_cells_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    cells = (_cell("sleep"), _cell("ok"), _cell("ok", seed=1))
    plan = Plan(cells, ("rte", "stsb"), (), {})
    lines: list[str] = []
    start = time.monotonic()
    with CellPool(2, tmp_path / "pool", runner=RUNNER, warm=()) as pool:
        rows = quality.run_plan(plan, tmp_path, isolation="pool", jobs=2, pool=pool, progress=lines.append,
                                deadline=Deadline(6.0, tmp_path, jobs=2))
    took = time.monotonic() - start
    assert took < 60, took  # the sleeping cell (120 s) was stopped, not waited for
    by_id = {r["run_id"]: r for r in rows}
    # the sleeper started (nothing measured, the whole deadline left) and was stopped: no result, and a lower
    # bound of its cost for the next invocation
    sleeper = tmp_path / "runs" / "main__sleep__suite__seed0"
    assert by_id["main__sleep__suite__seed0"]["status"] == "missing" and (sleeper / INTERRUPTED).is_file()
    assert json.loads((sleeper / INTERRUPTED).read_text())["seconds"] >= 5.0
    assert json.loads((sleeper / INTERRUPTED).read_text())["jobs"] == 2
    assert any("main__sleep__suite__seed0: interrupted" in line for line in lines)
    # the quick cells ran beside it (the second once the first had measured their cost), their wall time kept
    assert by_id["main__ok__suite__seed0"]["status"] == by_id["main__ok__suite__seed1"]["status"] == "ok"
    assert 0 < by_id["main__ok__suite__seed1"]["wall_seconds"] < 6.0 and by_id["main__ok__suite__seed1"]["jobs"] == 2
    assert by_id["main__ok__suite__seed1"]["commit"] == code_commit()  # the code it ran
    assert quality.pending(cells, tmp_path) == [cells[0]]
    assert Deadline(60.0, tmp_path, jobs=2).estimate(_cell("sleep", seed=3)) >= 5.0 * SLACK
    assert Deadline(60.0, tmp_path, jobs=2).estimate(_cell("ok", seed=3)) == pytest.approx(
        by_id["main__ok__suite__seed0"]["wall_seconds"] * SLACK)


def test_the_command_runs_a_matrix_in_slices_exit_3_until_it_is_complete(tmp_path, data_root, tiny_backbone,
                                                                         capsys):
    out = tmp_path / "slices"
    argv = ["quality", "--scale", "smoke", "--out", str(out), "--methods", "independent", "--seeds", "2",
            "--tasks", "rte", "--no-single", "--no-fewshot", "--one-task", "", "--lr-grid", "none",
            "--isolation", "inline", "--backbone", tiny_backbone, "--data-dir", str(data_root),
            "--cache-dir", str(tmp_path / "cache")]
    # one second: the first cell starts (nothing measured, the whole deadline left) and cannot be stopped
    # inline; the second's measured cost does not fit in what is left
    assert quality.main([*argv, "--deadline", "1"]) == INCOMPLETE
    assert "--isolation inline: a cell running at the deadline is not stopped" in capsys.readouterr().out
    done = [p.parent.name for p in out.glob("runs/*/result.json")]
    assert done == ["main__independent__suite__seed0"]
    assert "1 ok, 0 failed, 1 not run" in (out / "results.md").read_text()  # a partial report, marked so
    assert json.loads((out / "meta.json").read_text())["this_invocation_ran"] == 1  # not the 2 it was to run
    assert quality.main(argv) == 0  # the same command again: only the cell left runs
    assert json.loads((out / "meta.json").read_text())["this_invocation_ran"] == 1
    assert sorted(p.parent.name for p in out.glob("runs/*/result.json")) == [
        "main__independent__suite__seed0", "main__independent__suite__seed1"]
    assert "2 ok, 0 failed, 0 not run" in (out / "results.md").read_text()


def test_the_device_scripts_run_slices_from_the_ledger_and_collect_them(tmp_path, data_root, tiny_backbone):
    """.ci/gpu-matrix (a slice, on the device) and .ci/gpu-collect (back here), on the smoke scale."""
    import subprocess
    import tarfile

    project = tmp_path / "project"  # .ci/gpu-collect writes results/<scale>/<what> of its own checkout
    (project / ".ci").mkdir(parents=True)
    (project / ".ci" / "gpu-collect").write_bytes((REPO / ".ci" / "gpu-collect").read_bytes())
    ledger = project / "results" / "smoke" / "quality"
    env = {**os.environ, "SCALE": "smoke", "DEADLINE": "120", "LEDGER": str(ledger), "SPECLORA_DATA": str(data_root),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    args = ["--methods", "independent", "--seeds", "2", "--tasks", "rte", "--no-single", "--no-fewshot",
            "--one-task", "", "--lr-grid", "none", "--isolation", "inline", "--backbone", tiny_backbone,
            "--cache-dir", str(tmp_path / "cache")]

    def run(script: Path, *more: str, **extra: str) -> subprocess.CompletedProcess:
        done = subprocess.run(["bash", str(script), *more], env={**env, **extra}, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    # a first slice with one seed, collected; then the full matrix, which runs only the other seed
    run(REPO / ".ci/gpu-matrix", *args[:3], "1", *args[4:], OUT=str(tmp_path / "a"))
    assert not list((tmp_path / "a" / "quality").rglob("lightning_logs"))  # results come back, not logs
    first = run(project / ".ci" / "gpu-collect", str(tmp_path / "a"), "smoke")
    assert "1 runs of the slice copied; finished runs 0 -> 1" in first.stdout
    run(REPO / ".ci/gpu-matrix", *args, OUT=str(tmp_path / "b"))
    assert "1 already done, 1 to run" in (tmp_path / "b" / "slice.log").read_text()
    # only what this slice ran comes back, not the ledger's runs again
    assert [p.name for p in (tmp_path / "b" / "quality" / "runs").iterdir()] == ["main__independent__suite__seed1"]
    second = run(project / ".ci" / "gpu-collect", str(tmp_path / "b"), "smoke")
    assert "finished runs 1 -> 2" in second.stdout
    with tarfile.open(ledger / "runs.tar.xz") as tar:  # results only: no run.log, logs or checkpoints
        names = sorted(tar.getnames())
    assert names == [f"runs/main__independent__suite__seed{s}/{f}" for s in (0, 1) for f in ("cell.json", "result.json")]
    assert "2 ok, 0 failed, 0 not run" in (ledger / "results.md").read_text()  # redrawn from the whole ledger
    assert (ledger / "plan.json").is_file() and (ledger / "meta.json").is_file()
    # a third slice finds nothing to run
    run(REPO / ".ci/gpu-matrix", *args, OUT=str(tmp_path / "c"))
    assert "2 already done, 0 to run" in (tmp_path / "c" / "slice.log").read_text()


def test_a_collected_run_replaces_the_ledgers_and_the_archive_is_reproducible(tmp_path):
    from speclora.bench import ledger as led

    slice_dir, book = tmp_path / "slice", tmp_path / "ledger"
    cell = _cell("shared")
    (slice_dir / "runs" / cell.run_id).mkdir(parents=True)
    write_cell_spec(slice_dir / "runs" / cell.run_id, cell, None, 4, False)
    (slice_dir / "runs" / cell.run_id / INTERRUPTED).write_text(json.dumps({"seconds": 80.0}))
    (slice_dir / "runs" / cell.run_id / "run.log").write_text("not kept")
    assert led.collect(slice_dir, book) == {"copied": 1, "finished_before": 0, "finished": 0}
    # the next slice finished it: its result replaces the interrupted note
    (slice_dir / "runs" / cell.run_id / INTERRUPTED).unlink()
    write_result(slice_dir / "runs" / cell.run_id, {"run_id": cell.run_id, "status": "ok"})
    assert led.collect(slice_dir, book)["finished"] == 1
    back = tmp_path / "back"
    assert led.unpack(book, back) == 1
    assert sorted(p.name for p in (back / "runs" / cell.run_id).iterdir()) == ["cell.json", "result.json"]
    archive = (book / "runs.tar.xz").read_bytes()
    led.pack(back, book / "runs.tar.xz")
    assert (book / "runs.tar.xz").read_bytes() == archive  # the same runs, the same bytes
    with pytest.raises(FileNotFoundError, match="expected the folder a slice ran in"):
        led.collect(tmp_path / "nothing", book)


def test_the_budget_probe_runs_in_slices_too(tmp_path, data_root):
    out = tmp_path / "budget"
    argv = ["budget", "--scale", "smoke", "--out", str(out), "--steps", "10,20", "--methods", "independent",
            "--tasks", "rte", "--data-dir", str(data_root), "--cache-dir", str(tmp_path / "cache")]
    assert quality.main([*argv, "--deadline", "1"]) == INCOMPLETE  # one cell (inline) and then the time is up
    assert len(list(out.glob("runs/*/result.json"))) == 1
    assert quality.main(argv) == 0 and json.loads((out / "budget.json").read_text())["complete"]


def test_the_code_a_run_ran_is_its_commit_or_the_one_stamped_where_there_is_no_git(tmp_path, monkeypatch):
    monkeypatch.delenv(COMMIT_ENV, raising=False)
    assert code_commit(tmp_path) == "unknown"  # no git checkout, nothing stamped
    (tmp_path / ".gpu").mkdir()
    (tmp_path / ".gpu" / "commit").write_text("abc1234\n")  # what .ci/gpu-pack writes into the copy that travels
    assert code_commit(tmp_path) == "abc1234"
    monkeypatch.setenv(COMMIT_ENV, "def5678")
    assert code_commit(tmp_path) == "def5678"
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "f.py").write_text("a = 1\n")
    subprocess.run([*git, "add", "f.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], check=True, text=True, capture_output=True).stdout
    assert code_commit(repo) == head.strip()  # a checkout's own commit comes before any stamp
    (repo / "g.py").write_text("untracked\n")
    assert code_commit(repo) == head.strip()  # untracked files are no change of the code that ran
    (repo / "f.py").write_text("a = 2\n")
    assert code_commit(repo) == head.strip() + "+changes"
