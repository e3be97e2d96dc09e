"""Training-step throughput of the multi-task LoRA layer (issue: foundation benchmark).

    python -m speclora.bench.throughput [--backbone default] [--batch-size 32] [--steps 10] [--device cpu]

Measured in one run, interleaved round by round so that the machine's load hits every variant alike:

1. training step (forward + backward + AdamW step), 10 tasks mixed, ``batch_size`` examples:
   per-task stacked LoRA (``independent``) vs one shared LoRA (``shared``); goal stacked >= 0.9x shared;
2. inference on the same mixed batches: our stacked layer vs peft's own mixed-batch path
   (``model(..., adapter_names=[...])``, which peft allows in eval mode only);
3. samples/s of the stacked training step with dynamic padding vs padding every sequence to 128.

Prints samples/s per variant and the ratios; the figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from speclora.data.datamodule import DEFAULT_SUITE, MultiTaskDataModule
from speclora.model.backbone import resolve_backbone
from speclora.model.lora import lora_modules
from speclora.model.module import SpecLoRAModule

SHORT_SUITE = ["cola", "sst2"]  # single sentences: where dynamic padding has room to help


def _batches(args, padding: str, tasks: list[str] = DEFAULT_SUITE) -> list[dict]:
    dm = MultiTaskDataModule(tasks=tasks, data_dir=args.data_dir, tokenizer=args.backbone,
                             batch_size=args.batch_size, max_length=128, padding=padding, seed=args.seed)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(args.steps)]


def _to(batch: dict, device: str) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _train_time(module: SpecLoRAModule, batches: list[dict], device: str) -> float:
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    module.train()
    _sync(device)
    start = time.perf_counter()
    for batch in batches:
        loss, _ = module._total_loss(module(batch))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def _stacked_infer_time(module: SpecLoRAModule, batches: list[dict], device: str) -> float:
    module.eval()
    _sync(device)
    start = time.perf_counter()
    for batch in batches:
        module.encode(batch)
    _sync(device)
    return time.perf_counter() - start


def _peft_model(args, num_tasks: int, device: str):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    base = AutoModel.from_pretrained(resolve_backbone(args.backbone))
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "key", "value", "attention.output.dense"],
                     lora_dropout=0.0)
    model = get_peft_model(base, cfg, adapter_name="t0")
    for t in range(1, num_tasks):
        model.add_adapter(f"t{t}", cfg)
    for name, p in model.named_parameters():  # non-zero B so every adapter does real work
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    return model.to(device).eval()


@torch.no_grad()
def _peft_infer_time(model, batches: list[dict], device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    for batch in batches:
        names = [f"t{t}" for t in batch["seq_task"].tolist()]
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              token_type_ids=batch.get("token_type_ids"), adapter_names=names)
    _sync(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="default")
    parser.add_argument("--data-dir", default=None, help="default: $SPECLORA_DATA")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="batches per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    device = args.device

    dynamic = [_to(b, device) for b in _batches(args, "dynamic")]
    padded = [_to(b, device) for b in _batches(args, "max_length")]
    short_dynamic = [_to(b, device) for b in _batches(args, "dynamic", SHORT_SUITE)]
    short_padded = [_to(b, device) for b in _batches(args, "max_length", SHORT_SUITE)]
    examples = sum(int(b["task"].numel()) for b in dynamic)
    stacked = SpecLoRAModule(DEFAULT_SUITE, backbone=args.backbone, method="independent").to(device)
    short = SpecLoRAModule(SHORT_SUITE, backbone=args.backbone, method="independent").to(device)
    shared = SpecLoRAModule(DEFAULT_SUITE, backbone=args.backbone, method="shared").to(device)
    for _, layer in lora_modules(stacked.encoder) + lora_modules(shared.encoder):
        torch.nn.init.normal_(layer.lora_B, std=0.01)
    peft_model = _peft_model(args, len(DEFAULT_SUITE), device)

    variants = {
        "train stacked (dynamic)": lambda: _train_time(stacked, dynamic, device),
        "train shared (dynamic)": lambda: _train_time(shared, dynamic, device),
        "train stacked (pad 128)": lambda: _train_time(stacked, padded, device),
        "train short (dynamic)": lambda: _train_time(short, short_dynamic, device),
        "train short (pad 128)": lambda: _train_time(short, short_padded, device),
        "infer stacked": lambda: _stacked_infer_time(stacked, dynamic, device),
        "infer peft mixed-batch": lambda: _peft_infer_time(peft_model, dynamic, device),
    }
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            times[name].append(fn())
    rate = {k: examples / statistics.median(v) for k, v in times.items()}

    seq_dyn = statistics.mean(b["input_ids"].shape[1] for b in dynamic)
    seq_short = statistics.mean(b["input_ids"].shape[1] for b in short_dynamic)
    print(f"device={device} backbone={args.backbone} batch={args.batch_size} steps={args.steps} "
          f"rounds={args.rounds} tasks={len(DEFAULT_SUITE)} mean dynamic length={seq_dyn:.1f} "
          f"(short suite {SHORT_SUITE}: {seq_short:.1f})")
    print(f"{'variant':28s} {'samples/s':>10s}")
    for name, r in rate.items():
        print(f"{name:28s} {r:10.1f}")
    print("ratios (same run):")
    print(f"  stacked / shared training        = {rate['train stacked (dynamic)'] / rate['train shared (dynamic)']:.3f}"
          "  (goal >= 0.9)")
    print(f"  stacked / peft mixed inference   = {rate['infer stacked'] / rate['infer peft mixed-batch']:.3f}")
    print(f"  dynamic / pad-128 training       = {rate['train stacked (dynamic)'] / rate['train stacked (pad 128)']:.3f}"
          "  (default suite)")
    print(f"  dynamic / pad-128 training       = {rate['train short (dynamic)'] / rate['train short (pad 128)']:.3f}"
          f"  ({'+'.join(SHORT_SUITE)})")


if __name__ == "__main__":
    main()
