"""``--deadline SECONDS``: a matrix run in slices, each invocation ending on time with its finished cells kept.

A device call is limited (the lent GPU: 10 minutes a command, about 15 a session), so the `gpu` matrix is run
by the same command again and again, each time with the finished cells of the last ones (a cell with a
``result.json`` is skipped). Under a deadline the runner

- starts no cell that its estimate says would not end in time: the longest finished run of the same arm,
  group and budget in this folder (its wall time as the runner saw it, ``wall_seconds``; for a run from
  before that field, ``fit + test`` seconds and a start-up allowance), else the same arm's cost per training
  step at the longest other budget measured times the cell's steps, else the same two for its group; never
  measured, it starts while at least half the deadline is left;
- stops the cells still running when the time is up (process and pool isolation; an inline cell cannot be
  stopped and only delays the end). Such a cell writes no result: its folder gets ``interrupted.json`` (how
  long it ran, a lower bound of its cost the next estimate uses) and the next invocation runs it again;
- leaves a cell whose estimate exceeds the whole deadline unstarted, and says so (a longer deadline or
  fewer ``--jobs`` is needed), rather than start it again and again in vain. A cost measured with more cells
  at once than now is scaled by the ratio (fewer runs share the GPU or the cores), never scaled up.

What is lost to a deadline is the partial work of at most ``--jobs`` cells.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from speclora.bench.quality_scales import Cell
from speclora.bench.quality_worker import CELL, RESULT

INTERRUPTED = "interrupted.json"
START_UP = 20.0  # seconds a cell spends outside fit + test (its worker, the CLI, the data module): a guess
SLACK = 1.15  # a cell's next run may be slower than its last (other cells on the same GPU)
INCOMPLETE = 3  # exit code of an invocation that ended at its deadline with cells left (run it again)


def cost(result: dict[str, Any]) -> float:
    """Seconds an ``ok`` run took: as the runner saw it (``wall_seconds``), else fit + test and an allowance."""
    if result.get("wall_seconds"):
        return float(result["wall_seconds"])
    return (result.get("fit_seconds") or 0.0) + (result.get("test_seconds") or 0.0) + START_UP


def _kinds(cell: Cell) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """(the cell's arm, group, budget, task count), then the same without the arm: what its cost is read from."""
    coarse = (cell.group, cell.steps, len(cell.tasks))
    return (cell.arm, *coarse), coarse


def _per_step_kinds(cell: Cell) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """The kinds whose cost per training step carries over to another budget (a budget probe's cells are the
    matrix's ``main`` cells at other steps)."""
    group = "main" if cell.group == "budget" else cell.group
    return ("per step", cell.arm, group, len(cell.tasks)), ("per step", group, len(cell.tasks))


class Deadline:
    """The time an invocation has, and the cost of the cells measured so far (in ``out``).

    Args:
        seconds: how long the invocation may run, from now.
        out: the matrix folder, whose runs (``runs/<run id>/``: ``cell.json`` with ``result.json`` or
            ``interrupted.json``) estimate the cost of the cells still to run.
        clock: seconds, monotonic (a test passes its own).
        steps_of: a cell's training steps (default: ``cell.steps``, set for a budget probe's other budgets):
            a kind not measured yet at this budget is estimated from its cost per step at another.
        jobs: cells run at once now (a cost measured with more at once is scaled down by the ratio).
    """

    def __init__(self, seconds: float, out: Path, clock: Callable[[], float] = time.monotonic,
                 steps_of: Callable[[Cell], int | None] | None = None, jobs: int = 1) -> None:
        if not seconds > 0:
            raise ValueError(f"--deadline={seconds}: expected a number of seconds > 0")
        self.seconds = float(seconds)
        self.clock = clock
        self.steps_of = steps_of or (lambda cell: cell.steps)
        self.jobs = jobs
        self.end = clock() + self.seconds
        self.expired = threading.Event()
        self.costs: dict[tuple[Any, ...], float] = {}  # kind -> the longest run's seconds
        self.rates: dict[tuple[Any, ...], tuple[int, float]] = {}  # kind -> (budget, seconds per step) at its longest
        self.deferred: dict[str, str] = {}  # run id -> why it did not start or end
        self._lock = threading.Lock()
        for run in sorted(Path(out).glob("runs/*/")):
            self._read(run)

    def left(self) -> float:
        return self.end - self.clock()

    def _note(self, cell: Cell, seconds: float, jobs: int | None = None) -> None:
        if jobs and jobs > self.jobs:  # measured while more cells shared the machine
            seconds *= self.jobs / jobs
        steps = self.steps_of(cell)
        with self._lock:
            for kind in _kinds(cell):
                self.costs[kind] = max(self.costs.get(kind, 0.0), seconds)
            if steps:  # the rate of the longest budget measured: a short run's start-up and test weigh more per step
                for kind in _per_step_kinds(cell):
                    self.rates[kind] = max(self.rates.get(kind, (0, 0.0)), (steps, seconds / steps))

    def _read(self, run: Path) -> None:
        """The cost of a run of an earlier invocation: ``cell.json`` says what it was, ``result.json`` (ok) or
        ``interrupted.json`` how long it took."""
        if not (run / CELL).is_file():
            return
        cell = Cell.from_json(json.loads((run / CELL).read_text())["cell"])
        if (run / RESULT).is_file():
            data = json.loads((run / RESULT).read_text())
            if data.get("status") == "ok":
                self._note(cell, cost(data), data.get("jobs"))
        elif (run / INTERRUPTED).is_file():
            note = json.loads((run / INTERRUPTED).read_text())
            self._note(cell, float(note.get("seconds") or 0.0), note.get("jobs"))

    def estimate(self, cell: Cell) -> float | None:
        """Seconds the cell is expected to take (None: nothing like it has run yet)."""
        steps = self.steps_of(cell)
        (fine, coarse), (fine_rate, coarse_rate) = _kinds(cell), _per_step_kinds(cell)
        with self._lock:  # the arm's own cost first (methods differ several-fold), then its group's
            for kind, rate in ((fine, fine_rate), (coarse, coarse_rate)):
                if kind in self.costs:
                    return self.costs[kind] * SLACK
                if steps and rate in self.rates:
                    return self.rates[rate][1] * steps * SLACK
        return None

    def may_start(self, cell: Cell) -> bool:
        """Whether the cell should start now; if not, why is kept in :attr:`deferred`."""
        left, need = self.left(), self.estimate(cell)
        if need is not None and need > self.seconds:
            why = (f"needs about {need:.0f} s, more than the whole --deadline {self.seconds:.0f} s: give a longer "
                   "deadline or fewer --jobs")
        elif need is None and left < self.seconds / 2:
            why = f"its cost is not measured yet and only {max(left, 0):.0f} s of the deadline are left"
        elif need is not None and need > left:
            why = f"needs about {need:.0f} s, {max(left, 0):.0f} s of the deadline are left"
        else:
            return True
        with self._lock:
            self.deferred[cell.run_id] = why
        return False

    def finished(self, cell: Cell, run_dir: Path, result: dict[str, Any], seconds: float) -> dict[str, Any]:
        """After a cell: a cell stopped by the deadline keeps no result (it runs again next time), only
        ``interrupted.json``; an ``ok`` one adds its cost to the estimates. Returns the row to report."""
        if result.get("status") == "ok":
            self._note(cell, cost(result))
            return result
        if not (self.expired.is_set() or self.left() <= 0):
            return result  # it failed on its own: that result stays
        (run_dir / RESULT).unlink(missing_ok=True)
        note = {"seconds": seconds, "jobs": self.jobs, "error": result.get("error"),
                "why": f"stopped at the --deadline of {self.seconds:g} s after {seconds:.0f} s"}
        (run_dir / INTERRUPTED).write_text(json.dumps(note, indent=1))
        self._note(cell, seconds)
        with self._lock:
            self.deferred[cell.run_id] = note["why"]
        return {**result, "status": "interrupted", "error": note["why"]}

    def watch(self, stop: Callable[[], None]) -> threading.Timer:
        """Call ``stop`` (kill the running cells) when the time is up; cancel the returned timer when done."""
        def fire() -> None:
            self.expired.set()
            stop()

        timer = threading.Timer(max(self.left(), 0.0), fire)
        timer.daemon = True
        timer.start()
        return timer

    def summary(self) -> str:
        if not self.deferred:
            return ""
        lines = [f"deadline: {len(self.deferred)} cell(s) left for the next invocation of the same command:"]
        lines += [f"  {run_id}: {why}" for run_id, why in sorted(self.deferred.items())]
        return "\n".join(lines)
