"""Spectral overhead: training-step time with the SpectralGraphCallback over the same step without it.

    python -m speclora.bench.spectral_overhead [--backbone default] [--steps 12] [--rounds 3]

The default backbone and suite (10 tasks, batch 32, n = 2·T·S = 480 graph nodes), the full method
(coordination, band filter, per-eigencomponent rates, learned coefficients, high-pass regulariser,
refresh every K steps). Runs alternate round by round (plain, spectral, plain, spectral, ...) through
the real Lightning loop, so that the machine's load hits both alike; the first step of each run is
dropped as warm-up. Prints the median step times, their ratio (goal <= 1.01; the paper claims 1.016)
and the callback's own share of the step as it measures it.
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
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)


def _run(module, datamodule, steps: int, spectral: SpectralGraphCallback | None, accelerator: str) -> list[float]:
    timer = StepTimer()
    callbacks = [timer] if spectral is None else [spectral, timer]  # the timer closes after the callback
    trainer = L.Trainer(max_steps=steps, accelerator=accelerator, devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=callbacks, use_distributed_sampler=False)
    trainer.fit(module, datamodule=datamodule)
    return timer.times[1:]


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
    plain, spec, shares = [], [], []
    for _ in range(args.rounds):
        plain += _run(plain_module, datamodule, args.steps, None, args.accelerator)
        callback = SpectralGraphCallback(refresh_every=args.refresh_every, log_every=10**9, heatmap_every=0)
        spec += _run(spectral_module, datamodule, args.steps, callback, args.accelerator)
        shares.append(callback._time_spent / max(callback._time_total, 1e-9))
    n_nodes = callback.layout.num_nodes
    p_plain, p_spec = statistics.median(plain), statistics.median(spec)
    print(f"backbone={args.backbone} tasks={len(DEFAULT_SUITE)} batch={args.batch_size} nodes={n_nodes} "
          f"k={callback.k} refresh_every={args.refresh_every} steps/run={args.steps} rounds={args.rounds} "
          f"device={spectral_module.device}")
    print(f"median step without callback : {p_plain * 1000:9.1f} ms  ({len(plain)} steps)")
    print(f"median step with callback    : {p_spec * 1000:9.1f} ms  ({len(spec)} steps)")
    print(f"ratio with / without         : {p_spec / p_plain:9.4f}  (goal <= 1.01)")
    print(f"callback's own share of step : {statistics.mean(shares):9.4f}  (timed inside the callback)")


if __name__ == "__main__":
    main()
