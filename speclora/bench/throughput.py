"""Training-step throughput of the multi-task LoRA layer, against one shared adapter and plain peft LoRA.

    python -m speclora.bench.throughput [--backbone default] [--batch-sizes 32 256] [--steps 10] [--device cuda]
                                        [--precisions fp32 tf32 bf16] [--variants independent shared peft] [--count]
                                        [--compile-backend inductor] [--compile-dynamic true]

Measured in one run, interleaved round by round so that the machine's load hits every variant alike, on the
same batches of the 10-task default suite (max_length 128), for each batch size and precision:

- training step (forward + backward + AdamW step, a plain loop as in the issue's baseline):
  ``independent`` per-task stacked LoRA, ``shared`` one LoRA for all tasks, ``peft`` a plain peft LoRA model
  (one adapter, the same rank, alpha and targets, a linear head on [CLS]: the reference cost of LoRA);
  ``independent-pad128`` every sequence padded to 128; ``short`` / ``short-pad128`` the stacked layer on
  single-sentence tasks only (CoLA + SST-2), where dynamic padding has room to help;
  ``independent-compiled`` / ``independent-cudagraphs`` the ``independent`` step with ``model.compile`` mode
  ``default`` / ``reduce-overhead`` (CUDA graphs; the same as ``default`` on a CPU), the adapted encoder's
  forward compiled by torch.compile (speclora.model.compile; ``--compile-backend``, ``--compile-dynamic``);
  the warm-up pass, which compiles, is reported as ``warmup_s``, and a fallback to eager as
  ``compile_fallbacks`` (then the row measures eager);
- inference on the same mixed batches: ``infer`` our stacked layer vs ``infer-peft`` peft's own mixed-batch
  path (``model(..., adapter_names=[...])``, which peft allows in eval mode only).

Precisions: ``fp32`` (float32 matmuls at full precision), ``tf32`` (TF32 matmuls, CUDA only), ``bf16``
(``torch.autocast`` to bfloat16 around forward and loss). ``--count`` profiles ``--count-steps`` steady-state
steps of each variant after the timing (torch.profiler) and prints per step: host reads (ops whose value the
host waits for: item, nonzero, unique, ...), aten ops, leaf aten ops, and on a GPU the CUDA runtime's kernel
launches and synchronisations (speclora.bench.measure). Prints ms/step and samples/s per variant and the
ratios against ``independent``; ``speclora-bench perf`` writes the same figures into its report.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from speclora.backbone import resolve_backbone
from speclora.bench import measure
from speclora.data.datamodule import MultiTaskDataModule
from speclora.methods import get_method
from speclora.model.compile import CompileConfig
from speclora.model.lora import lora_modules, resolve_targets
from speclora.model.module import LoRAConfig, SpecLoRAModule
from speclora.tasks import DEFAULT_SUITE

MODULE = "speclora.bench.throughput"
SHORT_SUITE = ["cola", "sst2"]  # single sentences: where dynamic padding has room to help
VARIANTS = {  # name -> (suite, padding, what it is)
    "independent": (DEFAULT_SUITE, "dynamic", "train, per-task stacked LoRA (method independent)"),
    "shared": (DEFAULT_SUITE, "dynamic", "train, one shared LoRA (method shared)"),
    "peft": (DEFAULT_SUITE, "dynamic", "train, plain peft LoRA model, one adapter (reference)"),
    "independent-pad128": (DEFAULT_SUITE, "max_length", "train, stacked LoRA, every sequence padded to 128"),
    "short": (SHORT_SUITE, "dynamic", "train, stacked LoRA, CoLA + SST-2 only"),
    "short-pad128": (SHORT_SUITE, "max_length", "train, stacked LoRA, CoLA + SST-2, padded to 128"),
    "independent-compiled": (DEFAULT_SUITE, "dynamic", "train, stacked LoRA, model.compile mode default"),
    "independent-cudagraphs": (DEFAULT_SUITE, "dynamic", "train, stacked LoRA, model.compile mode "
                               "reduce-overhead (CUDA graphs)"),
    "infer": (DEFAULT_SUITE, "dynamic", "inference, stacked LoRA"),
    "infer-peft": (DEFAULT_SUITE, "dynamic", "inference, peft mixed-batch (adapter_names)"),
}
PRECISIONS = ("fp32", "tf32", "bf16")
RATIOS = [  # (numerator, denominator, what)
    ("independent", "shared", "stacked / shared training (goal >= 0.9)"),
    ("independent", "peft", "stacked / plain peft LoRA training"),
    ("infer", "infer-peft", "stacked / peft mixed-batch inference"),
    ("independent", "independent-pad128", "dynamic / pad-128 training, default suite"),
    ("short", "short-pad128", "dynamic / pad-128 training, " + "+".join(SHORT_SUITE)),
    ("independent-compiled", "independent", "compiled / eager training (model.compile default)"),
    ("independent-cudagraphs", "independent", "compiled / eager training (reduce-overhead)"),
]
COMPILE_MODES = {"independent-compiled": "default", "independent-cudagraphs": "reduce-overhead"}


# ---------------------------------------------------------------------- data and precision
def _batches(args, batch_size: int, padding: str, tasks: list[str]) -> list[dict]:
    dm = MultiTaskDataModule(tasks=tasks, data_dir=args.data_dir, tokenizer=args.backbone,
                             batch_size=batch_size, max_length=128, padding=padding, seed=args.seed)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    return [_to(next(it), args.device) for _ in range(args.steps)]


def _to(batch: dict, device: str) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@contextlib.contextmanager
def matmul_precision(precision: str):
    """float32 matmuls in full precision (fp32, bf16) or TF32 (tf32) for the duration."""
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def autocast(precision: str, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


# ---------------------------------------------------------------------- the models and their steps
class PeftClassifier(nn.Module):
    """The plain LoRA reference: the backbone under one peft LoRA adapter, a linear head on [CLS].

    The labels are the rows' task index mod 2 (any fixed labels do: only the step's cost is measured).
    """

    def __init__(self, backbone: str, lora: LoRAConfig = LoRAConfig()) -> None:  # noqa: B008 - frozen dataclass
        super().__init__()
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModel

        base = AutoModel.from_pretrained(resolve_backbone(backbone))
        targets = list(resolve_targets(base.config.model_type, lora.targets))
        cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=targets, lora_dropout=lora.dropout)
        self.encoder = get_peft_model(base, cfg)
        self.head = nn.Linear(base.config.hidden_size, 2)

    def forward(self, batch: dict) -> torch.Tensor:
        hidden = self.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              token_type_ids=batch.get("token_type_ids")).last_hidden_state  # (N, L, H)
        logits = self.head(hidden[:, 0])  # (N, 2)
        return F.cross_entropy(logits.float(), batch["seq_task"] % 2)


def _peft_mixed(args, num_tasks: int, device: torch.device):
    """peft with one adapter per task, for its eval-only mixed-batch path (``adapter_names=``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    base = AutoModel.from_pretrained(resolve_backbone(args.backbone))
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=list(resolve_targets(base.config.model_type, None)),
                     lora_dropout=0.0)
    model = get_peft_model(base, cfg, adapter_name="t0")
    for t in range(1, num_tasks):
        model.add_adapter(f"t{t}", cfg)
    for name, p in model.named_parameters():  # non-zero B so every adapter does real work
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    return model.to(device).eval()


def build(variant: str, args) -> Callable[[dict, str], None]:
    """The model of ``variant`` on the device; returns ``step(batch, precision)``, one training or inference step
    (a compiled variant's step has ``compile_fallbacks()``, how often model.compile fell back to eager)."""
    device = torch.device(args.device)
    suite = VARIANTS[variant][0]
    if variant == "infer-peft":
        model = _peft_mixed(args, len(DEFAULT_SUITE), device)

        @torch.no_grad()
        def infer_peft(batch: dict, precision: str) -> None:
            names = [f"t{t}" for t in batch["seq_task"].tolist()]
            with autocast(precision, device):
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      token_type_ids=batch.get("token_type_ids"), adapter_names=names)

        return infer_peft
    if variant == "peft":
        model = PeftClassifier(args.backbone).to(device)
        loss_of = model
    else:
        method = get_method("shared" if variant == "shared" else "independent")  # imports the method classes
        compiled = CompileConfig(mode=COMPILE_MODES[variant], backend=args.compile_backend,
                                 dynamic=args.compile_dynamic) if variant in COMPILE_MODES else CompileConfig()
        model = SpecLoRAModule(suite, backbone=args.backbone, method=method, compile=compiled).to(device)
        for _, layer in lora_modules(model.encoder):  # non-zero B so every adapter does real work
            torch.nn.init.normal_(layer.lora_B, std=0.01)

        def loss_of(batch: dict) -> torch.Tensor:
            return model.batch_loss(batch)[0]  # the training step's own loss: batched heads, no host read

    if variant == "infer":
        model.eval()

        @torch.no_grad()
        def infer(batch: dict, precision: str) -> None:
            with autocast(precision, device):
                model.encode(batch)

        return infer
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def train(batch: dict, precision: str) -> None:
        with autocast(precision, device):
            loss = loss_of(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if isinstance(model, SpecLoRAModule) and model.compile_cfg.enabled:
        train.compile_fallbacks = lambda: model.adapted.compile_fallbacks  # type: ignore[attr-defined]
    return train


def _time(step: Callable[[dict, str], None], batches: list[dict], precision: str, device: torch.device) -> float:
    measure.synchronize(device)
    start = time.perf_counter()
    for batch in batches:
        step(batch, precision)
    measure.synchronize(device)
    return time.perf_counter() - start


# ---------------------------------------------------------------------- the run
def run(args: argparse.Namespace, emit: Callable[[dict], None] | None = None) -> list[dict]:
    """Every (batch size, precision): each variant's ms/step and samples/s (+ counts); prints and emits them."""
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    steps = {v: build(v, args) for v in args.variants}
    rows = []
    for batch_size in args.batch_sizes:
        data = {}
        for v in args.variants:
            suite, padding, _ = VARIANTS[v]
            key = (tuple(suite), padding)
            if key not in data:
                data[key] = _batches(args, batch_size, padding, list(suite))
        for precision in args.precisions:
            with matmul_precision(precision):
                rows += _measure(args, steps, data, batch_size, precision, device, emit)
    return rows


def _measure(args, steps, data, batch_size: int, precision: str, device: torch.device, emit) -> list[dict]:
    batches = {v: data[(tuple(VARIANTS[v][0]), VARIANTS[v][1])] for v in args.variants}
    warmup = {v: _time(steps[v], batches[v], precision, device) for v in args.variants}  # compiles, if it does
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    for _ in range(args.rounds):
        for v in args.variants:
            times[v].append(_time(steps[v], batches[v], precision, device))
    rows = []
    for v in args.variants:
        median = statistics.median(times[v])
        examples = sum(int(b["task"].numel()) for b in batches[v])
        row = {"variant": v, "batch": batch_size, "precision": precision, "ms_per_step": median / args.steps * 1000,
               "samples_per_s": examples / median,
               "mean_length": statistics.mean(b["input_ids"].shape[1] for b in batches[v]), "warmup_s": warmup[v]}
        if hasattr(steps[v], "compile_fallbacks"):
            row["compile_fallbacks"] = steps[v].compile_fallbacks()
        if args.count:
            row.update(measure.profile_steps(lambda s=steps[v], b=batches[v][0]: s(b, precision),
                                             args.count_steps, device))
        rows.append(row)
    by_variant = {r["variant"]: r for r in rows}
    if "independent" in by_variant:
        for r in rows:
            r["vs_independent"] = r["samples_per_s"] / by_variant["independent"]["samples_per_s"]
    _print(args, rows, by_variant, batch_size, precision)
    if emit is not None:
        command = measure.command(MODULE, args.argv, batch_sizes=[batch_size], precisions=[precision])
        for r in rows:
            figures = {k: r.get(k) for k in ("ms_per_step", "samples_per_s", "vs_independent", "mean_length",
                                             "warmup_s", "compile_fallbacks", "host_reads", "aten_ops", "leaf_ops",
                                             "cuda_launches", "cuda_syncs")}
            emit(measure.record("training step", {"variant": r["variant"], "batch": batch_size,
                                                  "precision": precision}, figures, command))
    return rows


def _print(args, rows: list[dict], by_variant: dict[str, dict], batch_size: int, precision: str) -> None:
    print(f"device={args.device} backbone={args.backbone} batch={batch_size} precision={precision} "
          f"steps={args.steps} rounds={args.rounds} tasks={len(DEFAULT_SUITE)}")
    counted = [k for k in ("host_reads", "aten_ops", "leaf_ops", "cuda_launches", "cuda_syncs") if k in rows[0]]
    print(f"{'variant':22s} {'ms/step':>9s} {'samples/s':>10s} {'length':>7s} {'warm-up s':>9s}" +
          "".join(f" {k:>13s}" for k in counted))
    for r in rows:
        fallback = f"  (model.compile fell back to eager {r['compile_fallbacks']}x)" if r.get("compile_fallbacks") else ""
        print(f"{r['variant']:22s} {r['ms_per_step']:9.1f} {r['samples_per_s']:10.1f} {r['mean_length']:7.1f} "
              f"{r['warmup_s']:9.1f}" + "".join(f" {r[k]:13.1f}" for k in counted) + fallback)
    for num, den, what in RATIOS:
        if num in by_variant and den in by_variant:
            ratio = by_variant[num]["samples_per_s"] / by_variant[den]["samples_per_s"]
            print(f"  {what:45s} = {ratio:.3f}")
    sys.stdout.flush()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="default")
    parser.add_argument("--data-dir", default=None, help="default: $SPECLORA_DATA")
    parser.add_argument("--batch-sizes", "--batch-size", dest="batch_sizes", type=int, nargs="+", default=[32])
    parser.add_argument("--steps", type=int, default=10, help="batches per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=["fp32"])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--count", action="store_true", help="count host reads, ops and launches per step")
    parser.add_argument("--count-steps", type=int, default=2, help="profiled steps per variant with --count")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the compiled variants (model.compile.backend)")
    parser.add_argument("--compile-dynamic", choices=("auto", "true", "false"), default="true",
                        help="model.compile.dynamic of the compiled variants (auto: torch's automatic); default "
                             "true: one symbolic-shape graph, compiled once")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    args.compile_dynamic = {"auto": None, "true": True, "false": False}[args.compile_dynamic]
    if set(args.variants) & set(COMPILE_MODES):
        try:
            CompileConfig(mode="default", backend=args.compile_backend)
        except ValueError as err:
            parser.error(f"--compile-backend: {err}")
    try:
        device = measure.check_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    if "tf32" in args.precisions and device.type != "cuda":
        parser.error(f"--precisions tf32: TF32 matmuls need a CUDA device, --device is {args.device!r}")
    if args.steps < 1 or args.rounds < 1 or args.count_steps < 1 or min(args.batch_sizes) < 1:
        parser.error("--steps, --rounds, --count-steps and --batch-sizes must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
