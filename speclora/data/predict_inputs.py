"""What ``speclora predict`` reads: the official test files of the run's entries, the diagnostics an
entailment task of the run predicts (GLUE AX, SuperGLUE AX-b/AX-g), or new inputs of one task.

:class:`PredictInputs` is the DataModule's predict side (a mixin of
:class:`~speclora.data.datamodule.MultiTaskDataModule`: it reads the module's tasks, tokenizer, cache and
data folder, and fills ``self._parts["predict"]``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from speclora.data.glue_readers import read_tsv
from speclora.data.loaders import TaskPart
from speclora.data.sources import DIAGNOSTICS, KNOWN_MISSING, resolve_data_root
from speclora.data.superglue_readers import read_jsonl
from speclora.data.tokenized import (
    TokenizedSplit,
    cache_key,
    file_fingerprint,
    load_or_tokenize,
    tokenize_examples,
    tokenizer_fingerprint,
)
from speclora.tasks import Example, get_task

log = logging.getLogger(__name__)

# Diagnostics predicted with the test files: entry -> (file under the data root, the entailment tasks whose
# head predicts it, preferred first). GLUE's AX is download_glue_data.py's diagnostic/diagnostic.tsv (not in
# shared/data), read with MNLI's columns; SuperGLUE's AX-b/AX-g are read as RTE (AX-b names its fields
# sentence1/sentence2). GLUE RTE and SuperGLUE RTE are the same data, so either head predicts AX-b/AX-g.
PREDICT_DIAGNOSTICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ax": ("glue/diagnostic/diagnostic.tsv", ("mnli",)),
    "ax_b": (DIAGNOSTICS["AX-b"], ("sg_rte", "rte")),
    "ax_g": (DIAGNOSTICS["AX-g"], ("sg_rte", "rte")),
}


def read_predict_diagnostic(entry: str, data_root: Path) -> list[Example]:
    """The unlabelled inputs of a diagnostic entry of :data:`PREDICT_DIAGNOSTICS` (labels are not read).

    Raises:
        ValueError: an unknown entry. FileNotFoundError: naming the path expected under the data root.
    """
    if entry not in PREDICT_DIAGNOSTICS:
        raise ValueError(f"unknown diagnostic entry {entry!r}; allowed: {', '.join(PREDICT_DIAGNOSTICS)}")
    rel, _ = PREDICT_DIAGNOSTICS[entry]
    path = Path(data_root) / rel
    if not path.is_file():
        hint = (" (download_glue_data.py writes it as glue_data/diagnostic/diagnostic.tsv; shared/data does"
                " not hold it)" if entry == "ax" else "")
        raise FileNotFoundError(f"diagnostic {entry}: file not found: {path} (expected {rel} under the data "
                                f"root){hint}")
    if path.suffix == ".tsv":
        return read_tsv(get_task("mnli"), path, labelled=False, headerless=False)
    return read_jsonl(get_task("sg_rte"), path, labelled=False)


class PredictInputs:
    """The predict split of :class:`~speclora.data.datamodule.MultiTaskDataModule`."""

    def _build_predict(self) -> None:
        """One part per official test file of the run's entries, then one per diagnostic (PREDICT_DIAGNOSTICS)
        that an entailment task of the run predicts; or, after :meth:`predict_examples`, the new inputs alone.

        A missing test file (SOURCES.md lists MNLI, QQP and ReCoRD as absent offline), a missing diagnostic
        file or a diagnostic without its entailment task is skipped and named in ``predict_skipped``.
        """
        if self._predict_inputs is not None:
            task, examples = self._predict_inputs
            tok = tokenize_examples(examples, self.tokenizer, self.max_length)
            self._parts["predict"] = [("inputs", TaskPart(tok, torch.arange(len(tok)), self.tasks.index(task)))]
            self.predict_skipped = {}
            return
        parts: list[tuple[str, TaskPart]] = []
        skipped: dict[str, str] = {}
        for ti, spec in enumerate(self.specs):
            for name, es in zip(spec.eval_names, spec.eval_sets):
                if self.source == "local":
                    path = resolve_data_root(self.data_dir) / spec.files[es.test_split]
                    if not path.is_file():
                        known = KNOWN_MISSING.get(spec.name, frozenset())
                        listed = known is None or es.test_split in known
                        skipped[name] = f"test file not found: {path}" + (
                            " (shared/data/SOURCES.md lists it as missing)" if listed else "")
                        continue
                tok = self._tokenized(spec, es.test_split)
                parts.append((name, TaskPart(tok, torch.arange(len(tok)), ti)))
        for name, (rel, by) in PREDICT_DIAGNOSTICS.items():
            task = next((t for t in by if t in self.tasks), None)
            if task is None:
                skipped[name] = (f"diagnostic {name} is predicted by an entailment task ({' or '.join(by)})"
                                 f" and the run has none (tasks: {', '.join(self.tasks)})")
                continue
            try:
                tok = self._tokenized_diagnostic(name, rel)
            except FileNotFoundError as err:
                skipped[name] = str(err)
                continue
            parts.append((name, TaskPart(tok, torch.arange(len(tok)), self.tasks.index(task))))
        if not parts:
            raise FileNotFoundError("predict: no test file of the run could be read: "
                                    + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
        for name, why in skipped.items():
            log.warning("predict: no predictions for %s: %s", name, why)
        self._parts["predict"] = parts
        self.predict_skipped = skipped

    def _tokenized_diagnostic(self, entry: str, rel: str) -> TokenizedSplit:
        root = resolve_data_root(self.data_dir)
        path = root / rel
        source_fp = file_fingerprint(path) if path.is_file() else f"missing:{rel}"
        fp = tokenizer_fingerprint(self.tokenizer)
        key = cache_key(fp, "diagnostic", entry, self.max_length, source_fp)
        return load_or_tokenize(self._cache_path(), key, lambda: read_predict_diagnostic(entry, root),
                                self.tokenizer, self.max_length)

    def predict_examples(self, task: str, examples: list[Example]) -> None:
        """Predict these examples (new inputs of one task of the run) instead of the test files.

        Raises:
            ValueError: a task that is not in the run, or no examples.
        """
        name = get_task(task).name
        if name not in self.tasks:
            raise ValueError(f"task {task!r} is not in the run; its tasks: {', '.join(self.tasks)}")
        if not examples:
            raise ValueError(f"predict_examples: no examples given for {name}")
        self._predict_inputs = (name, list(examples))
        self._parts.pop("predict", None)

    def predict_sources(self) -> list[tuple[str, str, TokenizedSplit]]:
        """``(entry, task, tokenised split)`` of each predict dataloader, in dataloader order.

        A batch's ``uid`` indexes the split: ``split.idx[uid]`` is the official index of its example.
        """
        return [(name, self.tasks[part.task_index], part.split) for name, part in self._parts["predict"]]
