"""``SubmissionWriter``: the leaderboard files of a predict run, validated, and one zip per benchmark.

``speclora predict --config RUN/config.yaml --ckpt_path RUN/checkpoints/last.ckpt`` runs it (the CLI
registers it as the ``submission`` group). Each predict batch carries its entry (``cola``, ``mnli_m``,
``ax_b``) and the ``uid`` of its examples; ``uid`` indexes the entry's tokenised test split, whose ``idx``
is the official index the leaderboard wants back (ReCoRD: ``candidates[uid][chosen]`` is the answer).

Under DDP every rank predicts a shard; the shards are gathered and rank 0 writes. Files are written to a
staging folder, each is validated against its test split, and only when all pass are they moved into
place and zipped: a file is written whole or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from speclora.submission.formats import BY_ENTRY, LEADERBOARD_FILES, Benchmark, benchmark_files, render
from speclora.submission.validate import expected_from, validate_file
from speclora.tasks import TASKS

MANIFEST = "manifest.json"


@dataclass
class Predictions:
    """One entry's predictions: ``uid`` (E,) long, ``preds`` (E,) class / score / option, ``probs`` (E, C)."""

    uid: Tensor
    preds: Tensor
    probs: Tensor | None = None


class PredictionBuffer:
    """Collects ``predict_step`` outputs per entry (a batch holds one entry; its per-task lists are joined).

    Args:
        entries: the entries to keep (others are dropped); ``None`` keeps every entry.
        keep_probs: keep the class/option probabilities too (not needed for leaderboard files).
    """

    def __init__(self, entries: set[str] | None = None, keep_probs: bool = False) -> None:
        self.entries, self.keep_probs = entries, keep_probs
        self.parts: dict[str, list[Predictions]] = {}

    def add(self, out: dict[str, Any]) -> None:
        entry = out["entry"]
        if self.entries is not None and entry not in self.entries:
            return
        probs = None
        if self.keep_probs and all(p is not None for p in out["probs"]):
            probs = torch.cat(out["probs"])  # (E, C)
        uid, preds = torch.cat(out["uid"]), torch.cat(out["preds"])  # (E,), (E,)
        self.parts.setdefault(entry, []).append(Predictions(uid, preds, probs))

    def local(self) -> dict[str, Predictions]:
        return {e: _cat(parts) for e, parts in self.parts.items()}


def _cat(parts: list[Predictions]) -> Predictions:
    probs = None
    if all(p.probs is not None for p in parts):
        width = max(p.probs.shape[1] for p in parts)  # choice tasks pad options per batch
        probs = torch.cat([torch.nn.functional.pad(p.probs, (0, width - p.probs.shape[1])) for p in parts])
    return Predictions(torch.cat([p.uid for p in parts]), torch.cat([p.preds for p in parts]), probs)


def merge_ranks(per_rank: list[dict[str, Predictions]]) -> dict[str, Predictions]:
    """Each entry's predictions from every rank's shard, joined and sorted by ``uid``."""
    entries = dict.fromkeys(e for shard in per_rank for e in shard)
    merged = {}
    for entry in entries:
        joined = _cat([shard[entry] for shard in per_rank if entry in shard])
        order = torch.argsort(joined.uid, stable=True)  # (E,)
        merged[entry] = Predictions(joined.uid[order], joined.preds[order],
                                    joined.probs[order] if joined.probs is not None else None)
    return merged


def gather_predictions(trainer: L.Trainer, local: dict[str, Predictions]) -> dict[str, Predictions] | None:
    """Every rank's predictions, merged on rank 0 (``None`` on the other ranks)."""
    per_rank = [local]
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        per_rank = [None] * trainer.world_size
        torch.distributed.all_gather_object(per_rank, local)
    return merge_ranks(per_rank) if trainer.is_global_zero else None


def coverage_gap(uid: Tensor, n: int) -> str | None:
    """Why sorted ``uid`` does not name each of the split's ``n`` examples once; ``None`` when it does."""
    if len(uid) == n and torch.equal(uid, torch.arange(n, dtype=uid.dtype)):
        return None
    unique = len(torch.unique(uid))
    repeated = f", {len(uid) - unique} repeated" if len(uid) > unique else ""
    return (f"predictions cover {unique} of the {n} test examples{repeated} (was predicting cut short, "
            f"e.g. by trainer.limit_predict_batches?)")


def predict_sources(trainer: L.Trainer) -> dict[str, tuple[str, Any]]:
    """entry -> (task, tokenised split) from the trainer's datamodule."""
    dm = trainer.datamodule
    if dm is None or not hasattr(dm, "predict_sources"):
        raise ValueError("the submission writers need trainer.predict(..., datamodule=MultiTaskDataModule"
                         "(...)): the datamodule maps each prediction back to its official index")
    return {entry: (task, split) for entry, task, split in dm.predict_sources()}


@dataclass
class SubmissionReport:
    """What :func:`write_submission` wrote (benchmark -> file -> rows) and left out (-> why), and the zips."""

    out_dir: Path
    written: dict[str, dict[str, int]] = field(default_factory=dict)
    missing: dict[str, dict[str, str]] = field(default_factory=dict)
    zips: dict[str, Path] = field(default_factory=dict)

    def summary(self) -> str:
        lines = []
        for bench in self.missing.keys() | self.written.keys():
            written, missing = self.written.get(bench, {}), self.missing.get(bench, {})
            total = len(written) + len(missing)
            where = f"{self.out_dir / bench}" + (f" and {self.zips[bench]}" if bench in self.zips else "")
            files = ", ".join(f"{n} ({r} rows)" for n, r in written.items())
            lines.append(f"{bench.upper()}: wrote {len(written)} of {total} leaderboard files to {where}"
                         + (f": {files}" if files else ""))
        return "\n".join(sorted(lines))

    def missing_message(self) -> str:
        """Names every leaderboard file of the run's benchmarks that was not written, and why."""
        lines = [f"  {bench}/{name}: {why}"
                 for bench, files in self.missing.items() for name, why in files.items()]
        if not lines:
            return ""
        return "not written (a leaderboard scores a submission only with every file):\n" + "\n".join(lines)


def _absent_reason(entry: str, tasks: list[str], skipped: dict[str, str]) -> str:
    if entry in skipped:
        return skipped[entry]
    by = BY_ENTRY[entry].tasks
    if not any(t in tasks for t in by):
        return f"task {' or '.join(by)} is not in the run"
    return "the predict run made no predictions for it"


def write_submission(out_dir: Path | str, predictions: dict[str, Predictions],
                     sources: dict[str, tuple[str, Any]], tasks: list[str],
                     skipped: dict[str, str] | None = None, make_zip: bool = True) -> SubmissionReport:
    """Write, validate and zip the leaderboard files of every benchmark the run's tasks belong to.

    Args:
        out_dir: the submission folder (``<out_dir>/<benchmark>/<file>``, ``<out_dir>/<benchmark>.zip``).
        predictions: entry -> predictions sorted by uid (:func:`merge_ranks`).
        sources: entry -> (task, tokenised test split) (``MultiTaskDataModule.predict_sources``).
        tasks: the run's tasks: which benchmarks to write, and what is missing.
        skipped: entry -> why the datamodule has no predictions for it (``predict_skipped``).
        make_zip: write ``<benchmark>.zip`` of the benchmark's files.

    Raises:
        ValueError: a rendered file fails validation (nothing is written then).
    """
    out_dir, skipped = Path(out_dir), skipped or {}
    report = SubmissionReport(out_dir)
    run_benchmarks = {TASKS[t].benchmark for t in tasks}
    benchmarks: list[Benchmark] = [b for b in ("glue", "superglue") if b in run_benchmarks]
    staging = out_dir / f".staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for bench in benchmarks:
            report.written[bench], report.missing[bench] = {}, {}
            for lf in benchmark_files(bench):
                if lf.entry not in predictions or lf.entry not in sources:
                    report.missing[bench][lf.name] = _absent_reason(lf.entry, tasks, skipped)
                    continue
                _, split = sources[lf.entry]
                pred = predictions[lf.entry]
                gap = coverage_gap(pred.uid, len(split.idx))
                if gap is not None:
                    report.missing[bench][lf.name] = gap
                    continue
                path = staging / bench / lf.name
                path.parent.mkdir(parents=True, exist_ok=True)
                text = render(lf, split.idx, pred.preds.tolist(), split.candidates)
                path.write_text(text, encoding="utf-8")
                expected = expected_from(lf, split.idx, split.candidates)
                problems = validate_file(path, lf, expected)
                if problems:
                    raise ValueError(f"{lf.name} failed validation, so no file was written: "
                                     + "; ".join(problems[:5]))
                report.written[bench][lf.name] = expected.rows
        for bench in benchmarks:
            _publish(staging / bench, out_dir / bench, report.written[bench])
            if make_zip and report.written[bench]:
                report.zips[bench] = _zip(out_dir / bench, out_dir / f"{bench}.zip", report.written[bench])
            elif (out_dir / f"{bench}.zip").is_file():  # an earlier run's zip would not match the folder
                (out_dir / f"{bench}.zip").unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    manifest = {b: {"written": report.written[b], "missing": report.missing[b],
                    "zip": report.zips[b].name if b in report.zips else None} for b in benchmarks}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return report


def _publish(staged: Path, dest: Path, written: dict[str, int]) -> None:
    """Move the validated files into place; leaderboard files of an earlier run that this one did not write
    are removed, so that the folder and its zip hold the same files."""
    dest.mkdir(parents=True, exist_ok=True)
    for lf in LEADERBOARD_FILES:
        if lf.name not in written and (dest / lf.name).is_file():
            (dest / lf.name).unlink()
    for name in written:
        os.replace(staged / name, dest / name)


def _zip(folder: Path, target: Path, written: dict[str, int]) -> Path:
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in written:  # at the zip's root, as the leaderboards expect
            # a fixed date: the same files make the same zip
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, (folder / name).read_bytes())
    os.replace(tmp, target)
    return target


class SubmissionWriter(BasePredictionWriter):
    """Writes the GLUE/SuperGLUE leaderboard files of a predict run, validated, and a zip per benchmark.

    Args:
        out_dir: the submission folder: ``<out_dir>/glue/*.tsv``, ``<out_dir>/superglue/*.jsonl``,
            ``<out_dir>/{glue,superglue}.zip`` and ``manifest.json`` (what was written, what is missing
            and why). Default: ``submission/`` in the run folder of ``--ckpt_path`` (the folder holding
            ``checkpoints/``), else under ``trainer.default_root_dir``.
        zip: also write ``<benchmark>.zip`` holding the benchmark's files, ready to upload.
        adapters_dir: before predicting, load the per-task adapters and heads that
            ``SpecLoRAModule.export_adapters`` wrote to this folder (instead of ``--ckpt_path``).
    """

    def __init__(self, out_dir: str | None = None, zip: bool = True, adapters_dir: str | None = None) -> None:
        super().__init__(write_interval="batch")
        if adapters_dir is not None and not Path(adapters_dir).is_dir():
            raise ValueError(f"submission.adapters_dir={adapters_dir!r} is not a folder; give the folder "
                             f"that SpecLoRAModule.export_adapters wrote (one sub-folder per task)")
        self.out_dir = out_dir
        self.make_zip = zip
        self.adapters_dir = adapters_dir
        self.report: SubmissionReport | None = None
        self._buffer = PredictionBuffer(set(BY_ENTRY))

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._buffer = PredictionBuffer(set(BY_ENTRY))
        if self.adapters_dir is None:
            if trainer.ckpt_path is None:
                rank_zero_warn("SubmissionWriter: neither --ckpt_path nor submission.adapters_dir is given; "
                               "the files hold the predictions of an untrained model")
            return
        if trainer.ckpt_path is not None:
            raise ValueError(f"give --ckpt_path ({trainer.ckpt_path}) or submission.adapters_dir "
                             f"({self.adapters_dir}), not both")
        pl_module.import_adapters(self.adapters_dir)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        self._buffer.add(prediction)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sources = predict_sources(trainer)
        merged = gather_predictions(trainer, self._buffer.local())
        self._buffer = PredictionBuffer(set(BY_ENTRY))
        if merged is not None:
            dm = trainer.datamodule
            self.report = write_submission(self.resolve_out_dir(trainer), merged, sources, list(dm.tasks),
                                           getattr(dm, "predict_skipped", {}), self.make_zip)
            rank_zero_info(self.report.summary())
            if self.report.missing_message():
                rank_zero_warn(self.report.missing_message())
        trainer.strategy.barrier("SubmissionWriter")

    def resolve_out_dir(self, trainer: L.Trainer) -> Path:
        if self.out_dir is not None:
            return Path(self.out_dir)
        if trainer.ckpt_path:
            ckpt = Path(trainer.ckpt_path)
            run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
            return run / "submission"
        return Path(trainer.default_root_dir) / "submission"
