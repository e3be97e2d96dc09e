"""Where examples come from: the official GLUE/SuperGLUE files under a data root, or the HF hub.

Data root layout (see shared/data/SOURCES.md)::

    <root>/glue/<TASK>/{train,dev,test}.tsv            GLUE TSV      (speclora.data.glue_readers)
    <root>/glue/<TASK>/subsets/LM-BFF_k-shot/16-<seed>/{train,dev}.tsv
    <root>/superglue/<TASK>/{train,val,test}.jsonl     SuperGLUE     (speclora.data.superglue_readers)
    <root>/superglue/<TASK>/subsets/FewGLUE{,_32dev}/{train,dev32}.jsonl
    <root>/diagnostics/AX-{b,g}.jsonl                  RTE-format diagnostics

``TaskSpec.files`` / ``TaskSpec.subsets`` give each file's path relative to the root. Splits whose
name starts with ``test`` are unlabelled (label ``None``); every other split, subsets included, must
carry a label on every row.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from speclora.checks import is_int_in
from speclora.data.glue_readers import TSV_LAYOUTS, read_tsv
from speclora.data.superglue_readers import (
    Segments,
    copa_segments,
    multirc_segments,
    read_jsonl,
    record_candidates,
    record_gold,
    record_passage,
    record_segments,
    wic_text_a,
    wsc_question,
)
from speclora.tasks import Example, TaskSpec, get_task

DATA_ENV = "SPECLORA_DATA"
LAYOUT_HINT = "expected a folder holding glue/<TASK>/*.tsv and superglue/<TASK>/*.jsonl (shared/data/SOURCES.md)"

# Files SOURCES.md lists as missing (>= 4 MiB, could not be obtained): task -> splits (None: all splits).
KNOWN_MISSING: dict[str, frozenset[str] | None] = {
    "mnli": None,
    "qqp": None,
    "qnli": frozenset({"train"}),
    "boolq": frozenset({"train"}),
    "record": None,
}

DIAGNOSTICS = {"AX-b": "diagnostics/AX-b.jsonl", "AX-g": "diagnostics/AX-g.jsonl"}


def resolve_data_root(data_dir: str | None) -> Path:
    """The data root: ``data_dir`` if given, else ``$SPECLORA_DATA``; it must be an existing folder."""
    env = os.environ.get(DATA_ENV)
    given = data_dir if data_dir else env
    if given:
        root = Path(given).expanduser()
        if root.is_dir():
            return root
    raise FileNotFoundError(
        f"no data folder: data_dir={data_dir!r}, ${DATA_ENV}={env!r}"
        + (f" ({given} is not a folder)" if given else "")
        + f"; {LAYOUT_HINT}"
    )


def is_labelled(split: str) -> bool:
    """Official test files carry no labels; every other split (train, dev*, subsets) does."""
    return not split.startswith("test")


def split_path(spec: TaskSpec, split: str, subset: str | None = None) -> str:
    """The path, relative to the data root, of a split (or of a split of a published subset).

    Raises:
        ValueError: naming the task, the unknown split or subset and the allowed keys.
    """
    if subset is None:
        files = spec.files
    else:
        if subset not in spec.subsets:
            allowed = ", ".join(spec.subsets) if spec.subsets else "none (the task has no published subsets)"
            raise ValueError(f"{spec.name}: unknown subset {subset!r}; allowed subsets: {allowed}")
        files = spec.subsets[subset]
    if split not in files:
        what = f"{spec.name} subset {subset!r}" if subset else spec.name
        raise ValueError(f"{what}: unknown split {split!r}; allowed splits: {', '.join(files)}")
    return files[split]


def _missing_file(spec: TaskSpec, split: str, subset: str | None, rel: str, path: Path) -> FileNotFoundError:
    msg = f"{spec.display} ({spec.name}) split {split!r}"
    msg += f" of subset {subset!r}" if subset else ""
    msg += f": file not found: {path}"
    known = KNOWN_MISSING.get(spec.name, frozenset())
    if subset is None and (known is None or split in known):
        msg += ("; shared/data/SOURCES.md lists this file as missing (files of 4 MiB or more could not be"
                " obtained)")
        if spec.subsets:
            msg += (f"; published subsets that exist: {', '.join(spec.subsets)}"
                    f" (read_split(spec, 'train' or 'dev', data_root, subset=...))")
        msg += "; or read it from the HF hub with read_hub_split (needs `pip install datasets`)"
    else:
        msg += f" (expected {rel} under the data root; {LAYOUT_HINT})"
    return FileNotFoundError(msg)


def read_split(spec: TaskSpec, split: str, data_root: Path, subset: str | None = None) -> list[Example]:
    """Read one split of a task from the official files (or a published subset), in file order.

    Args:
        spec: the task.
        split: a key of ``spec.files`` (``train``, ``dev``, ``test``, MNLI's ``dev_matched`` ...) or,
            with ``subset``, a key of ``spec.subsets[subset]`` (``train``/``dev``).
        data_root: the folder of :func:`resolve_data_root`.
        subset: a key of ``spec.subsets`` (``k-shot-13``, ``fewglue`` ...), or ``None`` for the official files.

    Raises:
        ValueError: unknown split/subset; a malformed row (naming file and line).
        FileNotFoundError: naming the path, and for the files SOURCES.md lists as missing, the subsets.
    """
    rel = split_path(spec, split, subset)
    path = Path(data_root) / rel
    if not path.is_file():
        raise _missing_file(spec, split, subset, rel, path)
    labelled = subset is not None or is_labelled(split)
    if spec.fmt == "tsv":
        # CoLA's official train/dev files have no header; its test file has one.
        layout = TSV_LAYOUTS.get(spec.name)
        headerless = layout is not None and layout.headerless is not None and subset is None and labelled
        return read_tsv(spec, path, labelled=labelled, headerless=headerless)
    return read_jsonl(spec, path, labelled=labelled)


def read_diagnostic(name: str, data_root: Path) -> list[Example]:
    """A SuperGLUE diagnostic (``AX-b`` broad coverage, ``AX-g`` Winogender), read as labelled RTE.

    Labels ``entailment``/``not_entailment`` (class 0/1, as RTE); ``idx`` as in the file (AX-b writes
    it as a string).
    """
    key = next((k for k in DIAGNOSTICS if k.replace("-", "").lower() == name.replace("-", "").lower()), None)
    if key is None:
        raise ValueError(f"unknown diagnostic {name!r}; allowed: {', '.join(DIAGNOSTICS)}")
    path = Path(data_root) / DIAGNOSTICS[key]
    if not path.is_file():
        raise FileNotFoundError(f"diagnostic {key}: file not found: {path} (expected {DIAGNOSTICS[key]} "
                                f"under the data root)")
    return read_jsonl(get_task("sg_rte"), path, labelled=True)


# ---------------------------------------------------------------------------------------- HF hub
# Task -> (hub dataset, config). WSC: "wsc.fixed" has the corrected span indices; the texts are the same.
HUB_CONFIGS: dict[str, tuple[str, str]] = {
    "cola": ("glue", "cola"), "sst2": ("glue", "sst2"), "mrpc": ("glue", "mrpc"), "stsb": ("glue", "stsb"),
    "qqp": ("glue", "qqp"), "mnli": ("glue", "mnli"), "qnli": ("glue", "qnli"), "rte": ("glue", "rte"),
    "wnli": ("glue", "wnli"),
    "boolq": ("super_glue", "boolq"), "cb": ("super_glue", "cb"), "copa": ("super_glue", "copa"),
    "multirc": ("super_glue", "multirc"), "record": ("super_glue", "record"), "sg_rte": ("super_glue", "rte"),
    "wic": ("super_glue", "wic"), "wsc": ("super_glue", "wsc.fixed"),
}

# The hub's text columns of the single/pair tasks, in (text_a, text_b) order.
HUB_PAIRS: dict[str, tuple[str, str | None]] = {
    "cola": ("sentence", None), "sst2": ("sentence", None), "mrpc": ("sentence1", "sentence2"),
    "stsb": ("sentence1", "sentence2"), "qqp": ("question1", "question2"), "mnli": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"), "rte": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2"),
    "boolq": ("question", "passage"), "cb": ("premise", "hypothesis"), "sg_rte": ("premise", "hypothesis"),
}


def hub_split(spec: TaskSpec, split: str) -> str:
    """Our split key -> the hub's split name (``dev`` -> ``validation``, ``dev_matched`` ->
    ``validation_matched``); the hub's own names are accepted as they are."""
    ours = {k: ("validation" + k[3:] if k.startswith("dev") else k) for k in spec.files}
    if split in ours:
        return ours[split]
    if split in ours.values():
        return split
    raise ValueError(f"{spec.name}: unknown hub split {split!r}; allowed: "
                     f"{', '.join(ours)} (or the hub's {', '.join(ours.values())})")


def _hub_label(spec: TaskSpec, value: Any, at: str) -> float | None:
    """The hub's label: class index (int) or STS-B score; -1 means unlabelled."""
    if value is None or value == -1:
        return None
    if spec.kind == "regression":
        return float(value)
    n = len(spec.label_names)
    if not is_int_in(value, 0, n - 1):
        raise ValueError(f"{at}: hub label {value!r} for {spec.name}, expected -1 or an int in [0, {n})")
    return float(value)


def _record_hub_candidates(row: dict) -> tuple[str, ...]:
    """ReCoRD candidates from a hub row: from ``entity_spans`` (sorted by start) where present, as the
    file reader does; else ``entities`` ordered by their first occurrence in the passage."""
    spans = row.get("entity_spans")
    if spans:
        if isinstance(spans, dict):  # a datasets Sequence of dicts arrives as a dict of lists
            pairs = list(zip(spans["start"], spans["text"]))
        else:
            pairs = [(s["start"], s["text"]) for s in spans]
        return record_candidates(pairs)
    passage = row["passage"]
    found = [(passage.find(e) if e in passage else len(passage), e) for e in row["entities"]]
    return record_candidates(sorted(found))


def example_from_hub_row(spec: TaskSpec, row: dict, uid: int, *, group: int | None = None) -> list[Example]:
    """Map one row of the hub's ``glue``/``super_glue`` datasets to examples laid out as the file reader's.

    Hub rows are one example each (MultiRC rows are answers; ReCoRD rows are queries), so the list has one
    element. ``record`` is ``uid + 1``; ``group`` defaults to ``uid`` (MultiRC: pass the question counter,
    as :func:`read_hub_split` does). Labels: the hub's int labels, ``-1`` -> ``None``; ReCoRD rows with
    no ``answers`` are unlabelled.
    """
    at = f"hub {spec.name} row {uid}"
    try:
        idx = row["idx"]
        label = None if spec.name == "record" else _hub_label(spec, row.get("label"), at)
        cands, scores = None, None
        segments: Segments
        if spec.name in HUB_PAIRS:
            a, b = HUB_PAIRS[spec.name]
            segments = ((row[a], row[b] if b else None),)
        elif spec.name == "wic":
            segments = ((wic_text_a(row["word"], row["sentence1"]), row["sentence2"]),)
        elif spec.name == "wsc":
            segments = ((row["text"], wsc_question(row["span1_text"], row["span2_text"])),)
        elif spec.name == "copa":
            segments = copa_segments(row["premise"], row["question"], row["choice1"], row["choice2"], at)
        elif spec.name == "multirc":
            segments = multirc_segments(row["paragraph"], row["question"], row["answer"])
        elif spec.name == "record":
            cands = _record_hub_candidates(row)
            segments = record_segments(record_passage(row["passage"]), row["query"], cands, at)
            idx = idx["query"] if isinstance(idx, dict) else idx
            if row.get("answers"):
                label, scores = record_gold(cands, list(row["answers"]), at)
        else:
            raise ValueError(f"{spec.name} has no hub mapping; tasks with one: {', '.join(HUB_CONFIGS)}")
    except KeyError as err:
        raise ValueError(f"{at}: missing column {err.args[0]!r}; found {sorted(row)}") from None
    return [Example(uid=uid, idx=idx, segments=segments, label=label, group=uid if group is None else group,
                    record=uid + 1, candidate_scores=scores, candidates=cands)]


def read_hub_split(spec: TaskSpec, split: str) -> list[Example]:
    """Load a split from the HF hub (``load_dataset("glue"|"super_glue", config, split=...)``) and map it.

    ``split``: our key (``train``, ``dev``, ``test``, ``dev_matched`` ...) or the hub's name
    (``validation``, ``validation_matched`` ...). Needs the optional ``datasets`` package.
    """
    if spec.name not in HUB_CONFIGS:
        raise ValueError(f"{spec.name} has no hub dataset; tasks with one: {', '.join(HUB_CONFIGS)}")
    name = hub_split(spec, split)
    try:
        import datasets
    except ImportError as err:
        raise ImportError("read_hub_split needs the Hugging Face `datasets` package, which speclora does "
                          "not depend on: pip install datasets") from err
    path, config = HUB_CONFIGS[spec.name]
    rows = datasets.load_dataset(path, config, split=name)
    out: list[Example] = []
    group, last_q = -1, None
    for uid, row in enumerate(rows):
        if spec.name == "multirc":  # one group per (paragraph, question), as the file reader
            q = (row["idx"]["paragraph"], row["idx"]["question"])
            group += q != last_q
            last_q = q
        else:
            group = uid
        out.extend(example_from_hub_row(spec, row, uid, group=group))
    return out
