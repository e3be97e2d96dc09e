"""``python -m speclora.submission``: validate submission files; predict a JSONL of new inputs.

    python -m speclora.submission validate DIR_OR_ZIP [--data-dir DATA]
    python -m speclora.submission predict-jsonl (--ckpt CKPT | --adapters DIR) --task rte \\
        --input in.jsonl --output out.jsonl

The leaderboard files themselves are written by ``speclora predict`` (docs/submission.md).
"""

from __future__ import annotations

import argparse
import sys

from speclora.data.sources import resolve_data_root


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m speclora.submission", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="check leaderboard files against the official test files")
    v.add_argument("path", help="a folder of submission files (searched recursively) or a zip")
    v.add_argument("--data-dir", default=None, help="the data root (default: $SPECLORA_DATA)")

    p = sub.add_parser("predict-jsonl", help="predict a JSONL of new inputs of one task")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--ckpt", help="a checkpoint of `speclora fit`")
    model.add_argument("--adapters", help="a folder written by SpecLoRAModule.export_adapters")
    p.add_argument("--task", required=True, help="the task whose head predicts (rte, SST-2, sg_rte ...)")
    p.add_argument("--input", required=True, help="JSONL of inputs, with the task's own field names")
    p.add_argument("--output", required=True, help="JSONL to write: label and probabilities (or score)")
    p.add_argument("--backbone", default=None, help="replace the backbone the checkpoint/adapter names")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per sequence (default: the checkpoint's data.max_length, else 128)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--no-progress-bar", action="store_true")
    return parser


def _validate(args) -> int:
    from speclora.submission.validate import validate_submission

    report = validate_submission(args.path, resolve_data_root(args.data_dir))
    bad = 0
    for source, problems in report.items():
        if problems:
            bad += 1
            print(f"INVALID {source}", *(f"  {p}" for p in problems), sep="\n")
        else:
            print(f"ok      {source}")
    print(f"{len(report) - bad} of {len(report)} files valid")
    return 1 if bad else 0


def _predict_jsonl(args) -> int:
    from speclora.submission.inputs import module_from_adapters, module_from_checkpoint, predict_jsonl

    data_hp: dict = {}
    if args.ckpt:
        model, data_hp = module_from_checkpoint(args.ckpt, args.backbone)
    else:
        model = module_from_adapters(args.adapters, args.task, args.backbone)
    max_length = args.max_length or data_hp.get("max_length") or 128
    tokenizer = args.backbone or data_hp.get("tokenizer")
    out = predict_jsonl(model, args.task, args.input, args.output, tokenizer=tokenizer, max_length=max_length,
                        batch_size=args.batch_size, accelerator=args.accelerator, devices=args.devices,
                        progress_bar=not args.no_progress_bar)
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _validate(args) if args.command == "validate" else _predict_jsonl(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
