"""Spectral overhead: training-step time with the SpectralGraphCallback over the same step without it.

    python -m speclora.bench.spectral_overhead [--backbone default] [--steps 12] [--rounds 3]
    python -m speclora.bench.spectral_overhead --hooks [--backbone default] [--repeat 20]

The default backbone and suite (10 tasks, batch 32, n = 2·T·S = 480 graph nodes), the full method
(coordination, band filter, per-eigencomponent rates, learned coefficients, high-pass regulariser,
refresh every K steps). Runs alternate round by round in ABBA order (plain, spectral, spectral, plain, ...)
through the real Lightning loop, so that the machine's load hits both alike; the first step of each run is
dropped as warm-up. Every run sees the same batches in the same order, so step i of a plain run and
step i of the spectral run of the same round are paired (same batch, minutes apart): the headline is
the median of these paired ratios (goal <= 1.01; the paper claims 1.016), which cancels the spread of
step times across batches; the ratio of the median step times and the callback's own share of the step
(timed inside its hooks) are printed beside it.

``--hooks`` times the callback's own work instead, without training: its hooks called directly on the
model's adapters with random gradients (B ≠ 0), each repeated ``--repeat`` times after one warm-up call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import lightning as L
import torch

from speclora.bench import measure
from speclora.data.datamodule import MultiTaskDataModule
from speclora.methods import Independent
from speclora.model.module import SpecLoRAModule
from speclora.spectral.callback import SpectralGraphCallback
from speclora.tasks import DEFAULT_SUITE

MODULE = "speclora.bench.spectral_overhead"


class StepTimer(L.Callback):
    """Wall time of each training step (batch start to batch end, the optimizer step included)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.batches: list[tuple] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)
        ids = batch["input_ids"]
        self.batches.append((tuple(ids.shape), int(ids.sum())))


def _run(module, datamodule, steps: int, spectral: SpectralGraphCallback | None,
         accelerator: str) -> tuple[list[float], list[tuple]]:
    timer = StepTimer()
    callbacks = [timer] if spectral is None else [spectral, timer]  # the timer closes after the callback
    trainer = L.Trainer(max_steps=steps, accelerator=accelerator, devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=callbacks, use_distributed_sampler=False)
    trainer.fit(module, datamodule=datamodule)
    return timer.times[1:], timer.batches[1:]


def hook_times(backbone: str, repeat: int) -> dict[str, float]:
    """Milliseconds per call of each piece of the callback's per-step work on ``backbone``'s default suite."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    module = SpecLoRAModule(DEFAULT_SUITE, backbone=backbone, method=Independent())
    module.log = lambda *args, **kwargs: None  # no trainer: logging is not timed
    callback = SpectralGraphCallback(log_every=10**9, heatmap_every=0)
    trainer = SimpleNamespace(global_step=1, world_size=1, logger=None)
    callback.setup(trainer, module, "fit")
    for layer in callback.layers:
        layer.lora_A.grad = torch.randn_like(layer.lora_A)
        layer.lora_B.grad = torch.randn_like(layer.lora_B)
        layer.lora_B.data.normal_(std=0.02)
    callback.refresh(None)

    def before_step() -> None:
        trainer.global_step = 1  # not a refresh step
        callback.on_before_optimizer_step(trainer, module, None)

    def after_step() -> None:
        # the optimizer's step post-hook: the update filter on the snapshot's Δ
        callback.filter_optimizer_update(trainer, module)

    grads = callback._signals(grad=True)
    pieces = {
        "stack gradients": lambda: callback._signals(grad=True, buffer="grad"),
        "EMA correlations": lambda: callback.corr.update(grads),
        "refresh (every refresh_every steps)": lambda: callback.refresh(None),
        "on_before_optimizer_step": before_step,
        "update filter (optimizer step post-hook)": after_step,
    }
    times = {}
    for name, fn in pieces.items():
        total = 0.0
        for i in range(repeat + 1):  # the first call is warm-up
            if name.startswith("update filter"):
                before_step()  # the snapshot it filters against, untimed
            start = time.perf_counter()
            fn()
            total += (time.perf_counter() - start) if i else 0.0
        times[name] = total / repeat * 1000
    return times


def run(args: argparse.Namespace, emit: Callable[[dict], None] | None = None) -> dict[str, float]:
    """The ABBA rounds (module docstring); prints the summary, emits one report record, returns its figures."""
    datamodule = MultiTaskDataModule(tasks=DEFAULT_SUITE, data_dir=args.data_dir, tokenizer=args.backbone,
                                     batch_size=args.batch_size, max_eval_per_task=8)
    datamodule.prepare_data()
    torch.manual_seed(0)
    plain_module = SpecLoRAModule(DEFAULT_SUITE, backbone=args.backbone, method=Independent())
    spectral_module = SpecLoRAModule(DEFAULT_SUITE, backbone=args.backbone, method=Independent())
    spectral_module.load_state_dict(plain_module.state_dict())
    plain, spec, shares, paired = [], [], [], []
    for r in range(args.rounds):
        callback = SpectralGraphCallback(refresh_every=args.refresh_every, log_every=10**9, heatmap_every=0)
        # ABBA order (plain first in even rounds, spectral first in odd ones): no variant always runs second
        if r % 2 == 0:
            p_times, p_batches = _run(plain_module, datamodule, args.steps, None, args.accelerator)
            s_times, s_batches = _run(spectral_module, datamodule, args.steps, callback, args.accelerator)
        else:
            s_times, s_batches = _run(spectral_module, datamodule, args.steps, callback, args.accelerator)
            p_times, p_batches = _run(plain_module, datamodule, args.steps, None, args.accelerator)
        if p_batches != s_batches:
            raise RuntimeError("the plain and spectral runs saw different batches: the pairing is invalid")
        plain += p_times
        spec += s_times
        paired += [s / p for s, p in zip(s_times, p_times)]
        shares.append(callback._time_spent / max(callback._time_total, 1e-9))
    n_nodes = callback.layout.num_nodes
    p_plain, p_spec = statistics.median(plain), statistics.median(spec)
    q = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
    figures = {"paired_ratio": statistics.median(paired), "paired_q1": q[0], "paired_q3": q[2], "pairs": len(paired),
               "ratio_of_medians": p_spec / p_plain, "own_share": statistics.mean(shares),
               "plain_ms": p_plain * 1000, "spectral_ms": p_spec * 1000}
    print(f"backbone={args.backbone} tasks={len(DEFAULT_SUITE)} batch={args.batch_size} nodes={n_nodes} "
          f"k={callback.k} refresh_every={args.refresh_every} steps/run={args.steps} rounds={args.rounds} "
          f"device={spectral_module.device}")
    print(f"median step without callback : {p_plain * 1000:9.1f} ms  ({len(plain)} steps)")
    print(f"median step with callback    : {p_spec * 1000:9.1f} ms  ({len(spec)} steps)")
    print(f"paired ratio, median (IQR)   : {figures['paired_ratio']:9.4f}  ({q[0]:.4f}-{q[2]:.4f}; "
          f"{len(paired)} same-batch pairs; goal <= 1.01)")
    print(f"ratio of medians             : {figures['ratio_of_medians']:9.4f}")
    print(f"callback's own share of step : {figures['own_share']:9.4f}  (timed inside the callback)", flush=True)
    if emit is not None:
        labels = {"batch": args.batch_size, "nodes": n_nodes, "k": callback.k, "refresh_every": args.refresh_every,
                  "device": str(spectral_module.device)}
        emit(measure.record("spectral overhead", labels, figures, measure.command(MODULE, args.argv)))
    return figures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="default")
    parser.add_argument("--data-dir", default=None, help="default: $SPECLORA_DATA")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12, help="steps per run (the first is warm-up)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--refresh-every", type=int, default=20)
    parser.add_argument("--accelerator", default="auto", help="auto, cpu or gpu (Lightning's accelerator)")
    parser.add_argument("--hooks", action="store_true", help="time the callback's hooks directly, no training")
    parser.add_argument("--repeat", type=int, default=20, help="calls per hook with --hooks")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.accelerator not in ("auto", "cpu", "gpu", "cuda"):
        parser.error(f"--accelerator={args.accelerator!r}; allowed: auto, cpu, gpu, cuda")
    if args.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        parser.error(f"--accelerator={args.accelerator!r}: this machine has {measure.machine_devices()}; "
                     "use --accelerator cpu")
    if args.steps < 2 or args.rounds < 1:
        parser.error(f"--steps must be >= 2 (the first is warm-up) and --rounds >= 1, got {args.steps}, {args.rounds}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.hooks:
        times = hook_times(args.backbone, args.repeat)
        print(f"backbone={args.backbone} tasks={len(DEFAULT_SUITE)} repeat={args.repeat} (ms per call)")
        for name, ms in times.items():
            print(f"{name:40s}: {ms:8.2f} ms")
        return
    run(args)


if __name__ == "__main__":
    main()
