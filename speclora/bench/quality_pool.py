"""``--isolation pool``: a few long-lived worker processes that run the cells of the quality matrix in turn.

``--isolation process`` starts a fresh interpreter for every cell and pays its start-up each time: Python,
torch, Lightning, transformers and torch-geometric imports, the first backbone load (transformers imports
the model's classes then), the CLI's parsers (docs/benchmarks.md has the measured share). A pool of
``--jobs`` workers pays it once per worker and keeps the isolation that matters:

- a cell that raises fails alone (run_cell writes its failed result; anything else it lets through is
  caught here and written the same way), and the worker goes on with the next cell;
- a worker that dies (a crash, an out-of-memory kill) fails only the cell it was running, and is replaced;
- ``--run-timeout`` holds per cell (from the moment the cell is handed over; a fresh worker's start-up is
  not counted): the worker running a cell past it is killed with its process group and replaced;
- what one cell leaves in the process is reset before the next (:class:`ProcessState`): environment
  variables, working folder, argv, torch threads, float32 matmul precision and TF32/cuDNN flags,
  deterministic algorithms, default dtype, grad mode, the global generators (each cell then seeds them as it
  always does), warning filters and their once-only registries; memory is released after each cell
  (``gc.collect``, ``torch.cuda.empty_cache`` where CUDA is present). Each cell builds its own Trainer, model,
  data module and callbacks (the spectral callback among them), as in any other isolation.

A cell's files are those of ``process``: ``cell.json`` (what to run), ``run.log`` (the cell's stdout and
stderr) and ``result.json``; a worker's own output outside its cells goes to ``OUT/pool/worker-<n>.log``.

Protocol: the runner writes one JSON line per cell to a worker's stdin, ``{"run_dir": ...}``; the worker
answers on its original stdout (its file descriptors 1 and 2 point at its log otherwise): ``{"ready": s}``
once started, then ``{"run_dir": ..., "status": ...}`` after each cell. End of stdin ends the worker.

    python -m speclora.bench.quality_pool [--runner MODULE:FUNCTION] [--warm MODULE ...]   # started by the runner
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import queue
import random
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from speclora.bench.quality_scales import Cell
from speclora.bench.quality_worker import (
    CELL,
    RESULT,
    failed_result,
    log_tail,
    output_to,
    write_cell_spec,
    write_result,
)

RUN_CELL = "speclora.bench.quality_worker:run_cell"
WARM = ("speclora.cli",)  # imported at a worker's start, before it says it is ready
# torch.backends flags a cell may set (speclora.model.step.set_tf32 sets the TF32 ones); restored between cells
_FLAGS = (("cuda.matmul", "allow_fp16_reduced_precision_reduction"),
          ("cuda.matmul", "allow_bf16_reduced_precision_reduction"),
          ("cudnn", "allow_tf32"), ("cudnn", "benchmark"), ("cudnn", "deterministic"), ("cudnn", "enabled"))


# ---------------------------------------------------------------------- the worker's side
@dataclass
class ProcessState:
    """What a cell may change in its process and the next cell must not inherit, as it was at the worker's start."""

    environ: dict[str, str]
    cwd: str
    argv: list[str]
    threads: int
    matmul_precision: str
    flags: dict[tuple[str, str], bool]
    deterministic: tuple[bool, bool]
    default_dtype: torch.dtype
    grad_enabled: bool
    rng: tuple[Any, ...]

    @classmethod
    def capture(cls) -> ProcessState:
        import numpy as np

        return cls(dict(os.environ), os.getcwd(), list(sys.argv), torch.get_num_threads(),
                   torch.get_float32_matmul_precision(), {f: getattr(_backend(f[0]), f[1]) for f in _FLAGS},
                   (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()),
                   torch.get_default_dtype(), torch.is_grad_enabled(),
                   (torch.random.get_rng_state(), random.getstate(), np.random.get_state()))

    def restore(self) -> None:
        import numpy as np

        os.environ.clear()
        os.environ.update(self.environ)  # e.g. PL_GLOBAL_SEED, which seed_everything leaves behind
        os.chdir(self.cwd)
        sys.argv = list(self.argv)
        torch.set_num_threads(self.threads)
        torch.set_float32_matmul_precision(self.matmul_precision)  # also resets cuda.matmul.allow_tf32
        for (where, name), value in self.flags.items():
            if getattr(_backend(where), name) != value:
                setattr(_backend(where), name, value)
        if (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled()) != self.deterministic:  # (the call imports dynamo)
            torch.use_deterministic_algorithms(self.deterministic[0], warn_only=self.deterministic[1])
        torch.set_default_dtype(self.default_dtype)
        torch.set_grad_enabled(self.grad_enabled)
        torch.random.set_rng_state(self.rng[0])
        random.setstate(self.rng[1])
        np.random.set_state(self.rng[2])
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.manual_seed_all(torch.initial_seed())
        if "torch._dynamo" in sys.modules:  # compiled graphs of the last cell's model
            sys.modules["torch._dynamo"].reset()


def _backend(where: str) -> Any:
    obj: Any = torch.backends
    for part in where.split("."):
        obj = getattr(obj, part)
    return obj


def release_memory() -> None:
    """Free what the last cell left: Python garbage (its model, data, trainer), then CUDA's cached blocks."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _load(spec: str) -> Callable[..., dict[str, Any]]:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def run_one(run: Callable[..., dict[str, Any]], run_dir: Path, state: ProcessState) -> str:
    """Run the cell of ``run_dir/cell.json`` with ``run`` (run_cell's signature), its output in run_dir/run.log,
    from the worker's start state; whatever it raises fails this cell alone. Returns the result's status."""
    state.restore()
    with output_to(run_dir / "run.log"), warnings.catch_warnings():
        cell = None
        try:
            spec = json.loads((run_dir / CELL).read_text())
            cell = Cell.from_json(spec["cell"])
            result = run(cell, run_dir, spec.get("threads"), spec.get("conflict_batches", 4),
                         spec.get("keep_checkpoints", False))
        except BaseException as err:  # noqa: BLE001  (the cell fails, the worker goes on)
            traceback.print_exc()
            result = failed_result(cell, run_dir, f"{type(err).__name__}: {err}", traceback.format_exc()[-4000:])
            write_result(run_dir, result)
    release_memory()
    return str(result.get("status", "failed"))


def serve(runner: str = RUN_CELL, warm: Sequence[str] = WARM) -> int:
    """A worker: run the cells named on stdin one after the other, answer on the original stdout."""
    start = time.perf_counter()
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # the worker's own prints go to its log (stderr), never into the answers
    for module in warm:
        importlib.import_module(module)
    run = _load(runner)
    state = ProcessState.capture()
    reply.write(json.dumps({"ready": time.perf_counter() - start, "pid": os.getpid()}) + "\n")
    for line in sys.stdin:
        if line.strip():
            run_dir = json.loads(line)["run_dir"]
            status = run_one(run, Path(run_dir), state)
            reply.write(json.dumps({"run_dir": run_dir, "status": status}) + "\n")
    return 0


# ---------------------------------------------------------------------- the runner's side
class WorkerGone(Exception):
    """The worker exited (or closed its answers) before it answered."""


class _Worker:
    """One worker process, its stdin (requests) and stdout (answers)."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as f:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=f, env=env,
                                         start_new_session=True)  # its own process group: a kill takes its children
        self._buffer = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, message: dict[str, Any]) -> None:
        try:
            self.proc.stdin.write((json.dumps(message) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as err:
            raise WorkerGone(str(err)) from err

    def answer(self, timeout: float | None) -> dict[str, Any]:
        """The worker's next answer line. Raises TimeoutError after ``timeout`` s, WorkerGone if it exits first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                fd = self.proc.stdout.fileno()
                ready, _, _ = select.select([fd], [], [], left)
                chunk = os.read(fd, 65536) if ready else None
            except (OSError, ValueError) as err:  # its pipe was closed: killed by CellPool.terminate
                raise WorkerGone(self.exit_text()) from err
            if chunk is None:
                raise TimeoutError
            if not chunk:
                raise WorkerGone(self.exit_text())
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def exit_text(self) -> str:
        code = self.proc.wait()
        if code < 0:
            return f"exited with code {code} (killed by {signal.Signals(-code).name})"
        return f"exited with code {code}"

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self._close_pipes()

    def stop(self, grace: float = 30.0) -> None:
        """End of requests: the worker leaves its loop and exits (killed if it does not within ``grace`` s)."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.kill()
        self._close_pipes()

    def _close_pipes(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass


class CellPool:
    """``jobs`` worker processes, started when first needed and replaced when one dies or is killed.

    :meth:`run` is called from up to ``jobs`` threads at once (speclora.bench.quality.run_plan); each call
    takes an idle worker. Use as a context manager (or call :meth:`close`): the workers exit at the end.

    Args:
        jobs: workers (cells at once).
        log_dir: where each worker's own log goes (``worker-<n>.log``).
        threads: torch CPU threads per worker (``OMP_NUM_THREADS``, as process isolation sets it).
        runner: ``module:function`` run for each cell, with run_cell's signature.
        warm: modules a worker imports before it says it is ready (the start-up it pays once).
    """

    def __init__(self, jobs: int, log_dir: Path, threads: int | None = None, runner: str = RUN_CELL,
                 warm: Sequence[str] = WARM) -> None:
        if jobs < 1:
            raise ValueError(f"--jobs={jobs}; allowed: an integer >= 1")
        self.log_dir = Path(log_dir)
        self.threads = threads
        self.cmd = [sys.executable, "-m", "speclora.bench.quality_pool", "--runner", runner, "--warm", *warm]
        self._idle: queue.SimpleQueue[_Worker | None] = queue.SimpleQueue()
        for _ in range(jobs):
            self._idle.put(None)
        self.jobs = jobs
        self._lock = threading.Lock()
        self._live: set[_Worker] = set()
        self.started: list[int] = []  # pids of every worker started, in order
        self.startup_seconds: list[float] = []  # each worker's start-up, as it reported it
        self.stopped = False  # terminate() was called: no cell starts any more

    def _start(self) -> _Worker:
        env = dict(os.environ)
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        with self._lock:
            if self.stopped:
                raise WorkerGone("the pool was stopped before the cell started")
            worker = _Worker(self.cmd, env, self.log_dir / f"worker-{len(self.started)}.log")
            self.started.append(worker.pid)
            self._live.add(worker)
        try:
            ready = worker.answer(None)
        except WorkerGone as err:
            self._kill(worker)  # reap it and close its pipes
            raise WorkerGone(f"the pool worker (pid {worker.pid}) {err} before it was ready; its log "
                             f"{worker.log}:\n{log_tail(worker.log)}") from err
        self.startup_seconds.append(float(ready["ready"]))
        return worker

    def run(self, cell: Cell, run_dir: Path, threads: int | None, conflict_batches: int, keep_checkpoints: bool,
            timeout: float | None) -> dict[str, Any]:
        """Run one cell in an idle worker (started if needed); return its result, written to run_dir/result.json."""
        worker = self._idle.get()
        try:
            worker, result = self._run_on(worker, cell, run_dir, threads, conflict_batches, keep_checkpoints, timeout)
        finally:
            self._idle.put(worker)
        return result

    def _run_on(self, worker: _Worker | None, cell: Cell, run_dir: Path, threads: int | None, conflict_batches: int,
                keep_checkpoints: bool, timeout: float | None) -> tuple[_Worker | None, dict[str, Any]]:
        write_cell_spec(run_dir, cell, threads, conflict_batches, keep_checkpoints)
        why = None
        try:
            if self.stopped:  # terminate() was called (a deadline): no cell starts any more
                raise WorkerGone("the pool was stopped before the cell started")
            if worker is None or worker.proc.poll() is not None:
                worker = self._start()  # refuses, too, if terminate() comes first
            worker.send({"run_dir": str(run_dir)})
            worker.answer(timeout)
        except TimeoutError:
            self._kill(worker)
            worker, why = None, f"timeout: the run took longer than --run-timeout {timeout:g} s (its worker was killed)"
        except WorkerGone as err:
            text = str(err) if worker is None or str(err).startswith("the pool worker") else (
                f"the pool worker (pid {worker.pid}) {err} during the run and wrote no result")
            if worker is not None:
                self._kill(worker)
            worker, why = None, text
        path = run_dir / RESULT
        if path.is_file() and (why is None or not why.startswith("timeout")):
            return worker, json.loads(path.read_text())
        if why is None:
            why = "the pool worker answered but wrote no result"
        log = run_dir / "run.log"
        tail = log_tail(log) if log.is_file() and log.stat().st_size else why
        result = failed_result(cell, run_dir, why, tail)
        write_result(run_dir, result)
        return worker, result

    def _kill(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            self._live.discard(worker)

    def close(self) -> None:
        """Let every worker exit (all are idle once no :meth:`run` is in progress)."""
        for _ in range(self.jobs):
            worker = self._idle.get()
            if worker is not None:
                worker.stop()
                with self._lock:
                    self._live.discard(worker)
        for _ in range(self.jobs):
            self._idle.put(None)

    def terminate(self) -> None:
        """Kill every worker now, busy or not (an interrupted matrix, a deadline): their cells fail, as with
        ``process``, and no cell starts after this."""
        with self._lock:
            self.stopped = True
            live = list(self._live)
        for worker in live:
            self._kill(worker)

    def __enter__(self) -> CellPool:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if kind is not None:
            self.terminate()
        self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m speclora.bench.quality_pool", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runner", default=RUN_CELL, help="module:function run for each cell (run_cell's signature)")
    parser.add_argument("--warm", nargs="*", default=list(WARM), help="modules imported before the worker is ready")
    args = parser.parse_args(argv)
    return serve(args.runner, args.warm)


if __name__ == "__main__":
    sys.exit(main())
