"""Predictions on new inputs: a JSONL of examples of one task in, a JSONL of labels and probabilities out.

Input: one JSON object a line, with the task's own field names (laid out as text by the same code that
reads the official files):

=========================  ========================================================================
GLUE tasks                 the columns of the official TSV (CoLA/SST-2 ``sentence``; MRPC ``#1 String``
                           and ``#2 String``; RTE ``sentence1``/``sentence2`` ...) or the HF hub's names
                           (MRPC ``sentence1``/``sentence2``, QQP ``question1``/``question2`` ...)
SuperGLUE tasks            the fields of the official JSONL (BoolQ ``question``/``passage``; CB, RTE
                           ``premise``/``hypothesis``; WiC ``word``/``sentence1``/``sentence2`` ...)
=========================  ========================================================================

``idx`` (and MultiRC's question/answer ``idx``, ReCoRD's query ``idx``) may be left out: it defaults to the
position. Output: one line per example (MultiRC: per answer, ReCoRD: per query), in input order::

    {"line": 3, "idx": 2, "label": "entailment", "probs": {"entailment": 0.81, "not_entailment": 0.19}}
    {"line": 1, "idx": 0, "score": 3.42}                                        (STS-B)

``label`` is spelled as in the registry's ``label_names`` (ReCoRD: the chosen entity's text, its
``probs`` keyed by entity).
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch

from speclora.data.glue_readers import TSV_LAYOUTS, where
from speclora.data.sources import HUB_PAIRS
from speclora.data.superglue_readers import JSONL_BUILDERS, Draft, read_jsonl_objects
from speclora.methods import Single
from speclora.model.module import LoRAConfig, OptimConfig, SpecLoRAModule
from speclora.submission.writer import (
    PredictionBuffer,
    Predictions,
    coverage_gap,
    gather_predictions,
    predict_sources,
)
from speclora.tasks import Example, TaskSpec, get_task

INPUTS_ENTRY = "inputs"  # the entry name MultiTaskDataModule.predict_examples gives its dataloader


# ------------------------------------------------------------------ reading new inputs
def _glue_draft(spec: TaskSpec, obj: dict, at: str, position: int) -> Draft:
    layout = TSV_LAYOUTS[spec.name]
    options = [(layout.text_a, layout.text_b)]
    if spec.name in HUB_PAIRS and HUB_PAIRS[spec.name] not in options:
        options.append(HUB_PAIRS[spec.name])
    for a, b in options:
        if a in obj and (b is None or b in obj):
            texts = [obj[a]] + ([obj[b]] if b else [])
            if not all(isinstance(t, str) for t in texts):
                raise ValueError(f"{at}: fields {a!r}, {b!r} must be strings")
            return Draft(obj.get("idx", position), ((obj[a], obj[b] if b else None),), None)
    wanted = " or ".join(str([f for f in pair if f]) for pair in options)
    raise ValueError(f"{at}: {spec.name} inputs need the fields {wanted}; found {sorted(obj)}")


def _default_idx(spec: TaskSpec, obj: dict, position: int) -> None:
    """Give ``idx`` fields the inputs left out their position (the official builders require them)."""
    obj.setdefault("idx", position)
    if spec.name == "multirc" and isinstance(obj.get("passage"), dict):
        for qi, q in enumerate(obj["passage"].get("questions") or []):
            if isinstance(q, dict):
                q.setdefault("idx", qi)
                for ai, a in enumerate(q.get("answers") or []):
                    if isinstance(a, dict):
                        a.setdefault("idx", ai)
    if spec.name == "record":
        for qi, qa in enumerate(obj.get("qas") or []):
            if isinstance(qa, dict):
                qa.setdefault("idx", qi)


def read_inputs(task: str | TaskSpec, path: Path | str) -> list[Example]:
    """Examples (unlabelled) of the JSONL of new inputs at ``path`` (module docstring).

    Raises:
        ValueError: naming the file and line of invalid JSON or a missing field; an empty file.
    """
    spec = get_task(task) if isinstance(task, str) else task
    path = Path(path)
    examples: list[Example] = []
    group = -1
    for lineno, obj in read_jsonl_objects(path):
        at = where(path, lineno)
        if spec.fmt == "tsv":
            drafts = [_glue_draft(spec, obj, at, lineno - 1)]
        else:
            _default_idx(spec, obj, lineno - 1)
            drafts = JSONL_BUILDERS[spec.name](spec, obj, at, False)
        for d in drafts:
            group += d.new_group
            examples.append(Example(uid=len(examples), idx=d.idx, segments=d.segments, label=None,
                                    group=group, record=lineno, candidates=d.candidates))
    if not examples:
        raise ValueError(f"{path}: no inputs (expected one JSON object a line)")
    return examples


# ------------------------------------------------------------------ writing the predictions
def output_records(spec: TaskSpec, split, preds: torch.Tensor,
                   probs: torch.Tensor | None) -> list[dict[str, Any]]:
    """One output record per example of ``split`` (a TokenizedSplit), ``preds``/``probs`` sorted by uid."""
    out = []
    for u in range(len(split)):
        rec: dict[str, Any] = {"line": int(split.records[u]), "idx": split.idx[u]}
        if spec.kind == "regression":
            rec["score"] = float(preds[u])
        else:
            names = split.candidates[u] if spec.name == "record" else spec.label_names
            rec["label"] = names[int(preds[u])]
            rec["probs"] = {n: float(p) for n, p in zip(names, probs[u].tolist())}
        out.append(rec)
    return out


class InputPredictionWriter(L.Callback):
    """Writes the predictions of :meth:`MultiTaskDataModule.predict_examples` inputs to a JSONL file.

    Args:
        output: the JSONL file to write (replaced whole, once every prediction is in).
    """

    def __init__(self, output: str | Path) -> None:
        self.output = Path(output)
        if self.output.is_dir():
            raise ValueError(f"output={str(output)!r} is a folder; give the JSONL file to write")
        self._buffer = PredictionBuffer({INPUTS_ENTRY}, keep_probs=True)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._buffer = PredictionBuffer({INPUTS_ENTRY}, keep_probs=True)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._buffer.add(outputs)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sources = predict_sources(trainer)
        if INPUTS_ENTRY not in sources:
            raise ValueError("InputPredictionWriter: the datamodule predicts no new inputs; call "
                             "MultiTaskDataModule.predict_examples(task, examples) first")
        merged = gather_predictions(trainer, self._buffer.local())
        if merged is not None:
            task, split = sources[INPUTS_ENTRY]
            pred = merged.get(INPUTS_ENTRY, Predictions(torch.zeros(0, dtype=torch.long), torch.zeros(0)))
            gap = coverage_gap(pred.uid, len(split))
            if gap is not None:
                raise ValueError(f"{self.output} not written: {gap}")
            records = output_records(get_task(task), split, pred.preds, pred.probs)
            self.output.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.output.with_name(self.output.name + f".tmp{os.getpid()}")
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, self.output)
        trainer.strategy.barrier("InputPredictionWriter")


# ------------------------------------------------------------------ the model: checkpoint or adapters
def _instantiate(value: Any) -> Any:
    """A saved ``{"class_path": ..., "init_args": {...}}`` (a method, as the module saves it) as an object."""
    if not (isinstance(value, dict) and "class_path" in value):
        return value
    module, _, name = value["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls(**{k: _instantiate(v) for k, v in (value.get("init_args") or {}).items()})


def module_from_checkpoint(ckpt: Path | str, backbone: str | None = None) -> tuple[SpecLoRAModule, dict]:
    """The module of a ``speclora fit`` checkpoint, and the datamodule's saved arguments (may be empty).

    ``backbone`` replaces the saved backbone (a folder that moved, say).
    """
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    if "hyper_parameters" not in state or "state_dict" not in state:
        raise ValueError(f"{ckpt}: not a speclora checkpoint (no hyper_parameters/state_dict)")
    hp = {k: _instantiate(v) for k, v in state["hyper_parameters"].items()}
    if isinstance(hp.get("lora"), dict):
        hp["lora"] = LoRAConfig(**hp["lora"])
    if isinstance(hp.get("optim"), dict):
        hp["optim"] = OptimConfig(**{**hp["optim"], "betas": tuple(hp["optim"].get("betas", (0.9, 0.999)))})
    if backbone is not None:
        hp["backbone"] = backbone
    model = SpecLoRAModule(**hp)
    model.load_state_dict(state["state_dict"])
    return model, dict(state.get("datamodule_hyper_parameters") or {})


def module_from_adapters(adapters: Path | str, task: str, backbone: str | None = None) -> SpecLoRAModule:
    """A one-task module from the folder ``SpecLoRAModule.export_adapters`` wrote (``<adapters>/<task>/``, or
    that task folder itself), on the backbone the adapter names (or ``backbone``)."""
    name = get_task(task).name
    folder = Path(adapters)
    folder = folder / name if (folder / name / "speclora_task.json").is_file() else folder
    meta_path, config_path = folder / "speclora_task.json", folder / "adapter_config.json"
    if not meta_path.is_file() or not config_path.is_file():
        raise ValueError(f"adapters={str(adapters)!r}: no exported adapter of task {name!r} (expected "
                         f"{Path(adapters) / name}/speclora_task.json and adapter_config.json)")
    meta, config = json.loads(meta_path.read_text()), json.loads(config_path.read_text())
    if meta["task"] != name or folder.name != name:
        raise ValueError(f"{meta_path}: holds the adapter of task {meta['task']!r} in folder "
                         f"{folder.name!r}, not of {name!r}")
    lora = LoRAConfig(r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout") or 0.0,
                      targets=sorted(config["target_modules"]))
    model = SpecLoRAModule(tasks=[name], backbone=backbone or config["base_model_name_or_path"],
                           method=Single(), lora=lora, pooling=meta["pooling"])
    model.import_adapters(folder.parent)
    return model


def predict_jsonl(model: SpecLoRAModule, task: str, input_path: Path | str, output_path: Path | str, *,
                  tokenizer: str | None = None, max_length: int = 128, batch_size: int = 64,
                  accelerator: str = "auto", devices: int = 1, progress_bar: bool = True) -> Path:
    """Predict the new inputs at ``input_path`` with ``model``'s head of ``task``; write ``output_path``.

    Runs ``Trainer.predict`` (batches of ``batch_size``, a progress bar); ``tokenizer`` defaults to the
    model's backbone.
    """
    from speclora.data.datamodule import MultiTaskDataModule

    tasks = [s.name for s in model.specs]
    dm = MultiTaskDataModule(tasks=tasks, tokenizer=tokenizer or model.backbone_name, max_length=max_length,
                             eval_batch_size=batch_size, cache_dir="none")
    dm.predict_examples(task, read_inputs(task, input_path))
    trainer = L.Trainer(accelerator=accelerator, devices=devices, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=progress_bar,
                        use_distributed_sampler=False, callbacks=[InputPredictionWriter(output_path)])
    trainer.predict(model, datamodule=dm, return_predictions=False)
    return Path(output_path)
