"""Cost of every method of the harness: trainable parameters, step time and peak memory vs `independent`.

    python -m speclora.bench.methods [--backbone default] [--steps 5] [--methods independent shared ...]
                                     [--count-steps 2] [--isolation process|inline] [--device cuda]

Each method trains on the same batches of the default suite (10 tasks, batch 32) through the real Lightning
loop (the method's callbacks included). With ``--isolation process`` (the default) each method runs in a
process of its own, so that peak memory (the process's peak resident set, VmHWM, on a CPU,
``torch.cuda.max_memory_allocated`` on a GPU) belongs to that method alone; ``inline`` runs them one after
another in this process (no start-up per method; peak memory is then measured on a GPU only, where the
allocator's peak is reset per method). The first step is warm-up; the step time is the median of steps
2..``--steps``; the peak memory is read after them. Then ``--count-steps`` more steps run under torch.profiler,
from the end of one step to the end of the last (the batch's transfer and Lightning's own work included, no
timing synchronisations), and their per-step counts are printed: host reads (ops whose value the host waits for), aten ops and, on a GPU, CUDA
kernel launches and synchronisations (speclora.bench.measure). All methods run in one invocation and the
ratios are taken against `independent` from the same invocation.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from speclora.bench import measure

MODULE = "speclora.bench.methods"
METHODS = ["independent", "shared", "speclora", "unolora_star", "adalora", "ortho", "mtlora", "hyperformer",
           "full_ft", "famo", "cagrad", "nash_mtl", "mtl_lora"]
COUNTS = ("host_reads", "aten_ops", "leaf_ops", "cuda_launches", "cuda_syncs")


def method_of(spec: str):
    """The method of a ``--methods`` entry: a registry name (``ortho``), or a name with constructor options
    ``name:key=value,key=value`` (``ortho:task_grads=backward``; values read as YAML)."""
    import yaml

    from speclora.methods import get_method

    name, _, options = spec.partition(":")
    method = get_method(name)
    if not options:
        return method
    pairs = [item.partition("=") for item in options.split(",")]
    if any(not key or sep != "=" for key, sep, _ in pairs):
        raise ValueError(f"--methods {spec!r}: options are key=value pairs joined by ',', e.g. ortho:task_grads=backward")
    init = {**method.hparams()["init_args"], **{key: yaml.safe_load(value) for key, _, value in pairs}}
    return type(method)(**init)


def measure_method(args: argparse.Namespace, name: str) -> dict[str, object]:
    """Build ``name``, train ``steps + count_steps`` steps on the shared batches; its costs as a dict."""
    import lightning as L
    import torch

    from speclora.data.datamodule import MultiTaskDataModule
    from speclora.model.module import SpecLoRAModule
    from speclora.tasks import DEFAULT_SUITE

    torch.manual_seed(0)
    device = torch.device(args.device)
    steps, counted = args.steps, args.count_steps
    dm = MultiTaskDataModule(tasks=DEFAULT_SUITE, data_dir=args.data_dir, tokenizer=args.backbone,
                             batch_size=args.batch_size, seed=0)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    batches = [next(it) for _ in range(steps + counted)]  # on the CPU: Lightning moves each one, as in training
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    module = SpecLoRAModule(DEFAULT_SUITE, backbone=args.backbone, method=method_of(name))  # speclora adds its callback

    def peak_mib() -> float | None:
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated(device) / 2**20
        if args.isolation == "process":
            return measure.peak_rss_mib()
        return None  # a process's resident peak is not one method's when several run in it

    class Clock(L.Callback):
        """Times steps 0..steps-1 (device synchronised) and reads the peak memory after them (the profiler's
        own records would count otherwise: GBs for ortho), then profiles ``counted`` steps without synchronising."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.counts: dict[str, float] = {}
            self.peak: float | None = None
            self.prof = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx < steps:
                measure.synchronize(device)
                self.t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx < steps:
                measure.synchronize(device)
                self.times.append(time.perf_counter() - self.t)
            if batch_idx == steps - 1:
                self.peak = peak_mib()
            if batch_idx == steps - 1 and counted:
                self.prof = measure.profiler(device)
                self.prof.start()
            elif batch_idx == steps + counted - 1 and self.prof is not None:
                self.prof.stop()
                self.counts = measure.count_events(self.prof.events(), counted)

    class Batches:  # one iterable of batches (a plain list would be read as a list of dataloaders)
        def __iter__(self):
            return iter(batches)

        def __len__(self) -> int:
            return len(batches)

    class Fixed(L.LightningDataModule):
        def train_dataloader(self):
            return Batches()

    clock = Clock()
    trainer = L.Trainer(max_steps=steps + counted, accelerator="gpu" if device.type == "cuda" else "cpu",
                        devices=[device.index or 0] if device.type == "cuda" else 1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[clock], use_distributed_sampler=False)
    trainer.fit(module, datamodule=Fixed())
    counts = module.trainable_parameters()
    row = {"method": name, "trainable": counts["trainable"], "encoder_side": counts["encoder_side"],
           "method_modules": counts["method"], "step_s": statistics.median(clock.times[1:] or clock.times),
           "peak_mib": clock.peak, **clock.counts}
    del trainer, module
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _in_process(args: argparse.Namespace, name: str) -> tuple[dict | None, str]:
    """One method in a process of its own: (its row, "") or (None, why it failed)."""
    cmd = [sys.executable, "-m", MODULE, *measure.with_options(args.argv, method=name, methods=None)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        return None, f"exit {out.returncode}: {out.stderr[-2000:]}"
    return json.loads(lines[-1]), ""


def run(args: argparse.Namespace, emit: Callable[[dict], None] | None = None) -> dict[str, dict | None]:
    """Every method's row (None where it failed), `independent` first; prints the table, emits a record each."""
    rows: dict[str, dict | None] = {}
    failures: dict[str, str] = {}
    for name in args.methods:
        if args.isolation == "process":
            rows[name], why = _in_process(args, name)
        else:
            try:
                rows[name], why = measure_method(args, name), ""
            except Exception as err:  # one method's failure is a line of the table, not the end of the run
                rows[name], why = None, f"{type(err).__name__}: {err}"
        if why:
            failures[name] = why
            print(f"{name}: FAILED ({why})", file=sys.stderr, flush=True)
        base = rows.get("independent")
        if rows[name] is not None and base is not None:
            rows[name]["step_vs_independent"] = rows[name]["step_s"] / base["step_s"]
            if rows[name]["peak_mib"] is not None and base["peak_mib"]:
                rows[name]["memory_vs_independent"] = rows[name]["peak_mib"] / base["peak_mib"]
        if emit is not None:
            figures = {k: (rows[name] or {}).get(k) for k in ("trainable", "step_s", "step_vs_independent",
                                                              "peak_mib", "memory_vs_independent", *COUNTS)}
            emit(measure.record("methods", {"method": name}, figures,
                                measure.command(MODULE, args.argv, methods=[name]),
                                {"run": failures[name]} if name in failures else None))
    _print(args, rows)
    return rows


def _print(args: argparse.Namespace, rows: dict[str, dict | None]) -> None:
    counted = [k for k in COUNTS if any(r and k in r for r in rows.values())]
    print(f"backbone={args.backbone} device={args.device} batch={args.batch_size} steps={args.steps} "
          f"(median of steps 2..{args.steps}), default suite, isolation={args.isolation}"
          + (f"; counts per step over {args.count_steps} profiled steps" if counted else ""))
    print("| method | trainable params | step (s) | step / independent | peak memory (MiB) | memory / independent |"
          + "".join(f" {k} |" for k in counted))
    print("| --- | ---: | ---: | ---: | ---: | ---: |" + " ---: |" * len(counted))

    def cell(value, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    for name, row in rows.items():
        if row is None:
            print(f"| {name} | failed | | | | |" + " |" * len(counted))
            continue
        print(f"| {name} | {row['trainable']:,} | {row['step_s']:.3f} | {cell(row.get('step_vs_independent'), '.2f')} | "
              f"{cell(row['peak_mib'], '.0f')} | {cell(row.get('memory_vs_independent'), '.2f')} |"
              + "".join(f" {cell(row.get(k), '.1f')} |" for k in counted))
    sys.stdout.flush()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="default")
    parser.add_argument("--data-dir", default=None, help="default: $SPECLORA_DATA")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per method (the first is warm-up)")
    parser.add_argument("--count-steps", type=int, default=2, help="profiled steps after them (0: none)")
    parser.add_argument("--methods", nargs="+", default=METHODS,
                        help="registry names, or name:key=value,... with constructor options (ortho:task_grads=backward)")
    parser.add_argument("--isolation", choices=("process", "inline"), default="process")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--method", help=argparse.SUPPRESS)  # set in the child process
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        measure.check_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    if args.steps < 1 or args.count_steps < 0:
        parser.error(f"--steps must be >= 1 and --count-steps >= 0, got {args.steps} and {args.count_steps}")
    if "independent" not in args.methods:
        args.methods = ["independent", *args.methods]
    elif args.methods[0] != "independent":  # the reference first, so every row's ratio is known when it is emitted
        args.methods = ["independent", *(m for m in args.methods if m != "independent")]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.method:
        print(json.dumps(measure_method(args, args.method)))
        return
    run(args)


if __name__ == "__main__":
    main()
