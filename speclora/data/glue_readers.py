"""Reader of the official GLUE TSV files, and the line/label helpers the SuperGLUE reader shares.

Layout (as written by the official ``download_glue_data.py``)
-------------------------------------------------------------
``glue/<TASK>/{train,dev,test}.tsv`` (MNLI: ``dev_matched``, ``test_mismatched`` ...), UTF-8, one row a
line, fields separated by ``\\t`` only. There is no CSV quoting: the texts contain unbalanced ``"``,
so a csv reader would merge rows. The first line is a header naming the columns, read by name,
except in CoLA train/dev, which have none (4 columns: source, label, original label or empty,
sentence). Test files have an ``index`` column and no label. The MRPC header starts with a UTF-8
BOM; some files lack a final newline. Empty lines at the end of a file are ignored; every other
line is a row, and a row that does not parse is an error, never skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from speclora.tasks import Example, TaskSpec


@dataclass(frozen=True)
class TsvLayout:
    """Which columns of a GLUE task's TSV hold the texts and the label.

    Attributes:
        text_a: column of the first text.
        text_b: column of the second text, ``None`` for single-sentence tasks.
        label: column of the label (class spelling of ``TaskSpec.label_names``, or STS-B's score).
        headerless: column names of the train/dev files that have no header line (CoLA only).
    """

    text_a: str
    text_b: str | None
    label: str
    headerless: tuple[str, ...] | None = None


TSV_LAYOUTS: dict[str, TsvLayout] = {
    "cola": TsvLayout("sentence", None, "label",
                      headerless=("source", "label", "original_label", "sentence")),
    "sst2": TsvLayout("sentence", None, "label"),
    "mrpc": TsvLayout("#1 String", "#2 String", "Quality"),
    "stsb": TsvLayout("sentence1", "sentence2", "score"),
    "qqp": TsvLayout("question1", "question2", "is_duplicate"),
    "mnli": TsvLayout("sentence1", "sentence2", "gold_label"),
    "qnli": TsvLayout("question", "sentence", "label"),
    "rte": TsvLayout("sentence1", "sentence2", "label"),
    "wnli": TsvLayout("sentence1", "sentence2", "label"),
}

# The official index of a row: the first of these columns the header has, else the 0-based row number.
INDEX_COLUMNS = ("index", "id")

# STS-B similarity scores run from 0 (unrelated) to 5 (equivalent).
STSB_RANGE = (0.0, 5.0)


def read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file, split on ``\\n`` only, without a BOM or trailing empty lines.

    ``str.splitlines`` is not used: it also splits on ``\\x0b``, ``\\x1c``, ``\\u2028`` ..., which may
    occur inside a text. A ``\\r`` before the ``\\n`` (CRLF files) is dropped.
    """
    with open(path, encoding="utf-8-sig", newline="") as f:
        lines = f.read().split("\n")
    lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    while lines and lines[-1] == "":
        lines.pop()
    return lines


def where(path: Path, line: int) -> str:
    """How messages point at a line: ``<path>, line <n>`` (1-based, as an editor counts)."""
    return f"{path}, line {line}"


def class_index(spec: TaskSpec, value: str, at: str) -> float:
    """The class index of a label spelling (``spec.label_names``), or a ``ValueError`` naming it.

    ``at`` says where the label was read (see :func:`where`).
    """
    if value == "":
        raise ValueError(f"{at}: missing label for {spec.name} (a labelled split); "
                         f"allowed labels: {list(spec.label_names)}")
    try:
        return float(spec.label_names.index(value))
    except ValueError:
        raise ValueError(f"{at}: unknown label {value!r} for {spec.name}; "
                         f"allowed labels: {list(spec.label_names)}") from None


def regression_label(spec: TaskSpec, value: str, at: str) -> float:
    """An STS-B score as a float in ``STSB_RANGE``, or a ``ValueError`` naming it."""
    if value == "":
        raise ValueError(f"{at}: missing label for {spec.name} (a labelled split); "
                         f"expected a score in [{STSB_RANGE[0]}, {STSB_RANGE[1]}]")
    try:
        score = float(value)
    except ValueError:
        score = math.nan
    if not STSB_RANGE[0] <= score <= STSB_RANGE[1]:  # also refuses NaN
        raise ValueError(f"{at}: unknown label {value!r} for {spec.name}; "
                         f"expected a score in [{STSB_RANGE[0]}, {STSB_RANGE[1]}]")
    return score


def read_tsv(spec: TaskSpec, path: Path, *, labelled: bool, headerless: bool) -> list[Example]:
    """Read one GLUE TSV file into examples (one per row, in file order).

    Args:
        spec: the task; ``TSV_LAYOUTS[spec.name]`` says which columns to read.
        path: the file.
        labelled: whether every row must carry a label (train/dev/subsets) or none is read (test).
        headerless: the file has no header line; its columns are ``layout.headerless`` (CoLA train/dev).

    Raises:
        ValueError: naming the file and line of a missing header column, a row with the wrong number
            of columns, a missing or unknown label, or an ``index`` that is not an integer.
    """
    layout = TSV_LAYOUTS.get(spec.name)
    if layout is None:
        raise ValueError(f"{spec.name} has no GLUE TSV layout; tasks with one: {', '.join(TSV_LAYOUTS)}")
    lines = read_lines(path)
    if headerless:
        if layout.headerless is None:
            raise ValueError(f"{spec.name} files always have a header line ({path})")
        columns, first = list(layout.headerless), 0
    else:
        if not lines:
            raise ValueError(f"{where(path, 1)}: empty file, expected a header line")
        columns, first = lines[0].split("\t"), 1

    needed = [layout.text_a] + ([layout.text_b] if layout.text_b else []) + ([layout.label] if labelled else [])
    lacking = [c for c in needed if c not in columns]
    if lacking:
        raise ValueError(f"{where(path, 1)}: the header lacks column(s) {lacking} that {spec.name} needs; "
                         f"found columns {columns}")
    pos = {name: columns.index(name) for name in columns}  # first occurrence of a repeated name
    index_col = next((pos[c] for c in INDEX_COLUMNS if c in pos), None)
    a, b = pos[layout.text_a], (pos[layout.text_b] if layout.text_b else None)
    lab = pos[layout.label] if labelled else None

    examples: list[Example] = []
    for row, line in enumerate(lines[first:]):
        lineno = row + first + 1
        fields = line.split("\t")
        if len(fields) != len(columns):
            raise ValueError(f"{where(path, lineno)}: found {len(fields)} columns, expected {len(columns)} "
                             f"({', '.join(columns)})")
        if index_col is None:
            idx = row
        else:
            try:
                idx = int(fields[index_col])
            except ValueError:
                raise ValueError(f"{where(path, lineno)}: column {columns[index_col]!r} is "
                                 f"{fields[index_col]!r}, expected an integer") from None
        label = None
        if lab is not None:
            label = (regression_label(spec, fields[lab], where(path, lineno)) if spec.kind == "regression"
                     else class_index(spec, fields[lab], where(path, lineno)))
        segments = ((fields[a], fields[b] if b is not None else None),)
        examples.append(Example(uid=row, idx=idx, segments=segments, label=label, group=row, record=lineno))
    return examples
