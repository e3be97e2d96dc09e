"""How large the LoRA update of a method grows, step by step, next to its loss and validation average.

    python -m speclora.bench.update_size --method hyperformer --out runs/update-size
    python -m speclora.bench.update_size --method shared --out runs/update-size --steps 100 -- --model.optim.lr 3e-3

Trains one method through the ``speclora fit`` code path (configs/default.yaml, the method's config, then the
probe's budget: SST-2, STS-B and RTE, 300 steps of batch 16, length 64, validation every 50 steps, 5,000
training and 200 evaluation examples per task; arguments after ``--`` are appended) and records after every
optimizer step, over the LoRA slots k and tasks t:

    size   = mean_{k,t} ‖ΔW_{t,k}‖_F / ‖W_k‖_F,     ΔW_{t,k} = (alpha / r) B_{t,k} A_{t,k}
    change = mean_k mean_t ‖ΔW_{t,k}(step) − ΔW_{t,k}(step − 1)‖_F / ‖W_k‖_F
    |A|    = mean_k mean_t ‖A_{t,k}‖_F

with A, B the generated matrices for HyperFormer and the layers' own for the other LoRA methods that use the
harness's multi-task LoRA layer (independent, shared, speclora, ortho, single). The HyperFormer diagnosis of
docs/methods.md was measured with it: the update of the released-code initialisation grew to 12 times the
frozen weight within 100 steps, the shared LoRA's to 0.04. Writes ``OUT/<method>.json`` (every step) and
prints every 10th step and each validation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback

REPO = Path(__file__).resolve().parents[2]
BUDGET = ["--data.tasks", '["sst2", "stsb", "rte"]', "--data.max_length", "64", "--data.batch_size", "16",
          "--data.max_train_per_task", "5000", "--data.max_eval_per_task", "200", "--trainer.max_steps", "300",
          "--trainer.val_check_interval", "50", "--trainer.num_sanity_val_steps", "0",
          "--trainer.enable_progress_bar", "false"]


def adapters(module) -> list[tuple[Any, torch.Tensor, torch.Tensor]]:
    """(layer, A: (T, r, d_in), B: (T, d_out, r)) per LoRA slot: generated (HyperFormer) or the layer's own."""
    from speclora.model.lora import lora_modules

    layers = [layer for _, layer in lora_modules(module.encoder)]
    if not layers:
        raise ValueError(f"--method {module.method_name}: no speclora multi-task LoRA layer in the encoder; the "
                         "probe reads those (or HyperFormer's generated matrices)")
    if module.method_name == "hyperformer":
        return [(layer, A, B) for layer, (A, B) in zip(layers, module.method.generate(module.adapted), strict=True)]
    return [(layer, layer.lora_A, layer.lora_B) for layer in layers]


class UpdateSize(Callback):
    """Records size, change and |A| (module docstring) after every optimizer step."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.rows: list[dict[str, float | int | None]] = []
        self._prev: list[torch.Tensor] | None = None

    @torch.no_grad()
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        sizes, changes, norms, deltas = [], [], [], []
        for layer, A, B in adapters(module):
            w = layer.base.weight.norm()
            dw = layer.scaling * B @ A  # (T, d_out, d_in) = (alpha/r) B_t A_t
            sizes.append((dw.flatten(1).norm(dim=1) / w).mean())
            norms.append(A.flatten(1).norm(dim=1).mean())
            if self._prev is not None:
                changes.append(((dw - self._prev[len(deltas)]).flatten(1).norm(dim=1) / w).mean())
            deltas.append(dw.clone())
        self._prev = deltas
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        row = {"step": trainer.global_step, "loss": float(loss), "size": float(torch.stack(sizes).mean()),
               "change": float(torch.stack(changes).mean()) if changes else None,
               "A_norm": float(torch.stack(norms).mean())}
        self.rows.append(row)
        if trainer.global_step % 10 == 0:
            print(json.dumps(row), flush=True)

    def on_validation_end(self, trainer, module) -> None:
        value = trainer.callback_metrics.get("val/average")
        if value is not None:
            self.rows.append({"step": trainer.global_step, "val_average": float(value)})
            print(f"step {trainer.global_step}: val/average {float(value):.2f}", flush=True)

    def on_fit_end(self, trainer, module) -> None:
        self.out.write_text(json.dumps(self.rows))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", required=True, help="a configs/methods/<name>.yaml")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    config = REPO / "configs" / "methods" / f"{args.method}.yaml"
    if not config.is_file():
        raise ValueError(f"--method={args.method!r}: no {config}")
    from speclora.cli import SpecLoRACLI, trainer_defaults
    from speclora.data.datamodule import MultiTaskDataModule
    from speclora.model.module import SpecLoRAModule

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    probe = UpdateSize(args.out / f"{args.method}.json")
    defaults = trainer_defaults()
    defaults["callbacks"].append(probe)
    cli_args = ["--config", str(REPO / "configs" / "default.yaml"), "--config", str(config), *BUDGET,
                "--trainer.max_steps", str(args.steps), "--trainer.default_root_dir", str(args.out / args.method),
                *extra]
    sys.argv = sys.argv[:1]  # LightningCLI(args=...) warns when this script's own arguments are on sys.argv
    cli = SpecLoRACLI(SpecLoRAModule, MultiTaskDataModule, run=False, trainer_defaults=defaults, args=cli_args,
                      save_config_kwargs={"overwrite": True})
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return 0


if __name__ == "__main__":
    sys.exit(main())
