"""Spectral overhead: training-step time with the SpectralGraphCallback over the same step without it.

    python -m speclora.bench.spectral_overhead [--backbone default] [--steps 12] [--rounds 3]

The default backbone and suite (10 tasks, batch 32, n = 2·T·S = 480 graph nodes), the full method
(coordination, band filter, per-eigencomponent rates, learned coefficients, high-pass regulariser,
refresh every K steps). Runs alternate round by round in ABBA order (plain, spectral, spectral, plain, ...)
through the real Lightning loop, so that the machine's load hits both alike; the first step of each run is
dropped as warm-up. Every run sees the same batches in the same order, so step i of a plain run and
step i of the spectral run of the same round are paired (same batch, minutes apart): the headline is
the median of these paired ratios (goal <= 1.01; the paper claims 1.016), which cancels the spread of
step times across batches; the ratio of the median step times and the callback's own share of the step
(timed inside its hooks) are printed beside it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch

from speclora.data.datamodule import DEFAULT_SUITE, MultiTaskDataModule
from speclora.model.module import SpecLoRAModule
from speclora.spectral.callback import SpectralGraphCallback


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="default")
    parser.add_argument("--data-dir", default=None, help="default: $SPECLORA_DATA")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12, help="steps per run (the first is warm-up)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--refresh-every", type=int, default=20)
    parser.add_argument("--accelerator", default="auto")
    args = parser.parse_args(argv)

    datamodule = MultiTaskDataModule(tasks=DEFAULT_SUITE, data_dir=args.data_dir, tokenizer=args.backbone,
                                     batch_size=args.batch_size, max_eval_per_task=8)
    datamodule.prepare_data()
    torch.manual_seed(0)
    plain_module = SpecLoRAModule(DEFAULT_SUITE, backbone=args.backbone, method="independent")
    spectral_module = SpecLoRAModule(DEFAULT_SUITE, backbone=args.backbone, method="independent")
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
    print(f"backbone={args.backbone} tasks={len(DEFAULT_SUITE)} batch={args.batch_size} nodes={n_nodes} "
          f"k={callback.k} refresh_every={args.refresh_every} steps/run={args.steps} rounds={args.rounds} "
          f"device={spectral_module.device}")
    print(f"median step without callback : {p_plain * 1000:9.1f} ms  ({len(plain)} steps)")
    print(f"median step with callback    : {p_spec * 1000:9.1f} ms  ({len(spec)} steps)")
    q = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
    print(f"paired ratio, median (IQR)   : {statistics.median(paired):9.4f}  ({q[0]:.4f}-{q[2]:.4f}; "
          f"{len(paired)} same-batch pairs; goal <= 1.01)")
    print(f"ratio of medians             : {p_spec / p_plain:9.4f}")
    print(f"callback's own share of step : {statistics.mean(shares):9.4f}  (timed inside the callback)")


if __name__ == "__main__":
    main()
