"""Cost of every method of the harness: trainable parameters, step time and peak memory vs `independent`.

    python -m speclora.bench.methods [--backbone default] [--steps 5] [--methods independent shared ...]

Each method trains on the same batches of the default suite (10 tasks, batch 32) in a process of its
own, so that peak memory (the process's maximum resident set on a CPU, ``torch.cuda.max_memory_allocated``
on a GPU) belongs to that method alone; the first step is warm-up. All methods run in one invocation
and the ratios are taken against `independent` from the same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

METHODS = ["independent", "shared", "speclora", "unolora_star", "adalora", "ortho", "mtlora", "hyperformer",
           "full_ft"]


def _child(args: argparse.Namespace) -> None:
    """One method: build, train ``steps`` steps on the shared batches, print a JSON line."""
    import torch

    from speclora.data.datamodule import DEFAULT_SUITE, MultiTaskDataModule
    from speclora.methods import get_method
    from speclora.model.module import SpecLoRAModule

    torch.manual_seed(0)
    dm = MultiTaskDataModule(tasks=DEFAULT_SUITE, data_dir=args.data_dir, tokenizer=args.backbone,
                             batch_size=args.batch_size, seed=0)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    device = args.device
    batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in next(it).items()}
               for _ in range(args.steps)]
    import lightning as L

    method = get_method(args.method)
    module = SpecLoRAModule(DEFAULT_SUITE, backbone=args.backbone, method=method)  # speclora adds its callback

    class Timer(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t)

    class Batches:
        def __iter__(self):
            return iter(batches)

        def __len__(self) -> int:
            return len(batches)

    class Fixed(L.LightningDataModule):
        def train_dataloader(self):
            return Batches()

    timer = Timer()
    trainer = L.Trainer(max_steps=args.steps, accelerator="gpu" if device.startswith("cuda") else "cpu",
                        devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[timer],
                        use_distributed_sampler=False)
    trainer.fit(module, datamodule=Fixed())
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    counts = module.trainable_parameters()
    print(json.dumps({"method": args.method, "trainable": counts["trainable"], "encoder_side": counts["encoder_side"],
                      "method_modules": counts["method"], "step_s": statistics.median(timer.times[1:]),
                      "peak_mib": peak}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="default")
    parser.add_argument("--data-dir", default=None, help="default: $SPECLORA_DATA")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="training steps per method (the first is warm-up)")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--device", default=None)
    parser.add_argument("--method", help=argparse.SUPPRESS)  # set in the child process
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.method:
        _child(args)
        return
    if "independent" not in args.methods:
        args.methods = ["independent", *args.methods]
    rows = {}
    for method in args.methods:
        cmd = [sys.executable, "-m", "speclora.bench.methods", "--method", method, "--backbone", args.backbone,
               "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--device", args.device]
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        if out.returncode != 0 or not lines:
            print(f"{method}: FAILED (exit {out.returncode})\n{out.stderr[-2000:]}", file=sys.stderr)
            rows[method] = None
            continue
        rows[method] = json.loads(lines[-1])
    base = rows.get("independent")
    print(f"backbone={args.backbone} device={args.device} batch={args.batch_size} steps={args.steps} "
          f"(median of steps 2..{args.steps}), default suite")
    print("| method | trainable params | step (s) | step / independent | peak memory (MiB) | memory / independent |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for method, row in rows.items():
        if row is None:
            print(f"| {method} | failed | | | | |")
            continue
        print(f"| {method} | {row['trainable']:,} | {row['step_s']:.2f} | {row['step_s'] / base['step_s']:.2f} | "
              f"{row['peak_mib']:.0f} | {row['peak_mib'] / base['peak_mib']:.2f} |")


if __name__ == "__main__":
    main()
