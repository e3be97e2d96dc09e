"""Data-parallel scaling of `speclora fit`: training throughput of 1 vs W processes (DDP: gloo on CPU, NCCL on GPU).

    python -m speclora.bench.scaling [--backbone default] [--batch-size 16] [--steps 12] [--warmup 3]
                                     [--world-sizes 1 2] [--threads 1] [--rounds 1] [--accelerator cpu|gpu]

Each configuration is a real ``speclora fit`` subprocess (``--trainer.strategy ddp --trainer.devices W`` for
W > 1, Lightning's own launcher) on the default suite and ``configs/default.yaml``, validation, checkpoints and
logging off, with :class:`StepTimer` added as a callback. Per-process batch ``--batch-size`` is fixed (weak
scaling: W processes train a global batch of ``W * batch_size``). The timer skips ``--warmup`` steps and reads
the wall time of the remaining ones on rank 0 (DDP's all-reduce keeps the ranks in step):

    samples/s(W)  = W * batch_size * timed_steps / elapsed
    speedup       = samples/s / samples/s(1 process x --threads)
    efficiency    = speedup / (processes * threads / --threads)      1.0 = linear in the cores used

``--threads`` is each process's OMP_NUM_THREADS; ``--one-process-threads T`` adds a 1-process run with T threads
(on a 2-core machine: 1 process x 2 threads is the fair alternative to 2 processes x 1 thread). All
configurations are measured in one invocation, round-robin over ``--rounds``, and the median is printed.
The figures of docs/distributed.md come from this script.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lightning.pytorch import Callback

REPO = Path(__file__).resolve().parents[2]


class StepTimer(Callback):
    """Wall time of each training step on rank 0, written as JSON to ``out`` when training ends.

    Args:
        out: JSON file to write (``{"world_size", "batch_size", "step_end": [seconds, ...]}``).
    """

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = Path(out)
        self.step_end: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.step_end.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0:
            return
        batch_size = trainer.datamodule.batch_size if trainer.datamodule is not None else None
        self.out.write_text(json.dumps({"world_size": trainer.world_size, "batch_size": batch_size,
                                        "threads": os.environ.get("OMP_NUM_THREADS"),
                                        "step_end": self.step_end}))


def _throughput(result: dict, warmup: int) -> tuple[float, float]:
    """(samples/s, seconds per step) over the steps after ``warmup``."""
    ends = result["step_end"]
    if len(ends) <= warmup + 1:
        raise ValueError(f"--steps must exceed --warmup + 1; got {len(ends)} steps for warmup {warmup}")
    timed = len(ends) - 1 - warmup  # intervals between the end of step `warmup` and the last step's end
    elapsed = ends[-1] - ends[warmup]
    return result["world_size"] * result["batch_size"] * timed / elapsed, elapsed / timed


def _run(args, world: int, threads: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "speclora", "fit", "--config", str(REPO / "configs" / "default.yaml"),
           "--model.backbone", args.backbone, "--data.batch_size", str(args.batch_size),
           "--trainer.max_steps", str(args.steps), "--trainer.limit_val_batches", "0",
           "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
           "--trainer.enable_model_summary", "false", "--trainer.accelerator", args.accelerator,
           "--trainer.devices", str(world), "--trainer.default_root_dir", str(out.parent),
           "--trainer.callbacks+=speclora.bench.scaling.StepTimer", f"--trainer.callbacks.out={out}"]
    if args.data_dir:
        cmd += ["--data.data_dir", args.data_dir]
    if world > 1:
        cmd += ["--trainer.strategy", "ddp"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), MASTER_ADDR="127.0.0.1",
               PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="default", help="default (all-MiniLM-L6-v2), a name or a folder")
    parser.add_argument("--data-dir", default=None, help="default: $SPECLORA_DATA")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per process per step")
    parser.add_argument("--steps", type=int, default=12, help="training steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each process")
    parser.add_argument("--one-process-threads", type=int, default=None,
                        help="also time one process with this many threads")
    parser.add_argument("--rounds", type=int, default=1, help="round-robin repetitions (median reported)")
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"],
                        help="cpu: gloo, W processes on the CPU; gpu: NCCL, one GPU per process")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per run")
    args = parser.parse_args(argv)
    for key in ("batch_size", "steps", "threads", "rounds"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')}={getattr(args, key)}; allowed: an integer >= 1")
    if not 0 <= args.warmup < args.steps - 1:
        raise ValueError(f"--warmup={args.warmup}; allowed: 0 <= warmup < steps - 1 = {args.steps - 1}")
    if 1 not in args.world_sizes:
        raise ValueError(f"--world-sizes={args.world_sizes} must include 1 (the efficiency's reference)")

    configs = [(w, args.threads) for w in args.world_sizes]
    if args.one_process_threads is not None:
        configs.append((1, args.one_process_threads))
    rates: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
    steps: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="speclora_scaling_") as tmp:
        for r in range(args.rounds):
            for world, threads in configs:
                out = Path(tmp) / f"r{r}_w{world}_t{threads}" / "timer.json"
                out.parent.mkdir(parents=True)
                rate, step = _throughput(_run(args, world, threads, out), args.warmup)
                rates[(world, threads)].append(rate)
                steps[(world, threads)].append(step)
                print(f"round {r}: {world} process(es) x {threads} thread(s): {rate:.1f} samples/s", flush=True)

    base = statistics.median(rates[(1, args.threads)])
    print(f"\nbackbone={args.backbone} batch/process={args.batch_size} steps={args.steps} (warm-up {args.warmup}) "
          f"rounds={args.rounds} cpus={os.cpu_count()} load average={os.getloadavg()[0]:.2f}")
    print(f"{'processes x threads':>20s} {'global batch':>12s} {'s/step':>8s} {'samples/s':>10s} {'speedup':>8s} "
          f"{'efficiency':>10s}")
    for world, threads in configs:
        rate = statistics.median(rates[(world, threads)])
        step = statistics.median(steps[(world, threads)])
        speedup = rate / base
        efficiency = speedup / (world * threads / args.threads)
        print(f"{f'{world} x {threads}':>20s} {world * args.batch_size:12d} {step:8.2f} {rate:10.1f} {speedup:8.2f} "
              f"{efficiency:10.2f}")


if __name__ == "__main__":
    main()
