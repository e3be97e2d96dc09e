"""Check leaderboard files against the official test files: row count, every index once, allowed labels.

The same checks run on every file :class:`~speclora.submission.writer.SubmissionWriter` writes (before it
zips them) and, through ``python -m speclora.submission validate PATH``, on any folder or zip of
submission files. Problems name the file and line (``<file>, line <n>: ...``).
"""

from __future__ import annotations

import json
import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from speclora.data.predict_inputs import PREDICT_DIAGNOSTICS, read_predict_diagnostic
from speclora.data.sources import read_split
from speclora.submission.formats import BY_NAME, GLUE_HEADER, STSB_RANGE, LeaderboardFile, json_idx
from speclora.tasks import TASKS

MAX_PROBLEMS = 20


@dataclass(frozen=True)
class Expected:
    """What one leaderboard file must hold, read off its official test file.

    Attributes:
        rows: lines the file must have (GLUE: rows after the header; MultiRC: one per paragraph).
        keys: the indices it must name, each once: the example's ``idx`` (digit strings read as ints);
            MultiRC: ``(paragraph, question, answer)`` per answer.
        answers: ReCoRD only: query index -> the entity texts its label may be.
    """

    rows: int
    keys: frozenset
    answers: dict[Any, frozenset[str]] | None = None


def _key(value: Any) -> Any:
    """An index as compared: ints and digit strings are the same index; other strings stay strings."""
    value = json_idx(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None
    return value


def expected_from(lf: LeaderboardFile, idx: Sequence[Any],
                  candidates: Sequence[Sequence[str]] | None = None) -> Expected:
    """The expectation of ``lf`` from a test split's indices (and ReCoRD's candidate texts)."""
    if lf.kind == "nested":
        keys = frozenset((_key(i["paragraph"]), _key(i["question"]), _key(i["answer"])) for i in idx)
        return Expected(len({k[0] for k in keys}), keys)
    answers = None
    if lf.kind == "answer":
        if candidates is None:
            raise ValueError(f"{lf.name}: expected_from needs the candidate texts of each query")
        answers = {_key(i): frozenset(c) for i, c in zip(idx, candidates)}
    return Expected(len(idx), frozenset(_key(i) for i in idx), answers)


def expected_from_data(lf: LeaderboardFile, data_root: Path) -> Expected:
    """The expectation of ``lf`` from the official test file (or diagnostic) under the data root."""
    if lf.entry in PREDICT_DIAGNOSTICS:
        examples = read_predict_diagnostic(lf.entry, data_root)
    else:
        spec = TASKS[lf.tasks[0]]
        split = next(es.test_split for name, es in zip(spec.eval_names, spec.eval_sets) if name == lf.entry)
        examples = read_split(spec, split, data_root)
    candidates = [e.candidates for e in examples] if lf.kind == "answer" else None
    return expected_from(lf, [e.idx for e in examples], candidates)


class _Checker:
    """Collects the problems of one file while its lines are read."""

    def __init__(self, lf: LeaderboardFile, expected: Expected, source: str) -> None:
        self.lf, self.expected, self.source = lf, expected, source
        self.problems: list[str] = []
        self.seen: dict[Any, int] = {}  # index -> line

    def add(self, line: int | None, message: str) -> None:
        at = f"{self.source}, line {line}" if line else self.source
        self.problems.append(f"{at}: {message}")

    def index(self, line: int, value: Any, what: str = "index") -> Any:
        key = value if isinstance(value, tuple) else _key(value)
        if key is None or (isinstance(key, tuple) and None in key):
            self.add(line, f"{what} {value!r} is not an integer")
        elif key not in self.expected.keys:
            self.add(line, f"{what} {value!r} is not in the test file")
        elif key in self.seen:
            self.add(line, f"{what} {value!r} repeats line {self.seen[key]}")
        else:
            self.seen[key] = line
        return key

    def label(self, line: int, value: Any, allowed: Sequence[Any]) -> None:
        # exact type as well as value: COPA's 0 is not "0", and True is not 1
        if not any(type(value) is type(a) and value == a for a in allowed):
            self.add(line, f"unknown label {value!r}; allowed: {list(allowed)}")

    def finish(self, rows: int) -> list[str]:
        missing = sorted(self.expected.keys - set(self.seen), key=repr)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            self.add(None, f"no line for index {missing[0]!r}{more}")
        if rows != self.expected.rows:
            self.add(None, f"{rows} rows, expected {self.expected.rows} (as the test file)")
        if len(self.problems) > MAX_PROBLEMS:
            extra = len(self.problems) - MAX_PROBLEMS
            self.problems = self.problems[:MAX_PROBLEMS] + [f"{self.source}: ... and {extra} more problems"]
        return self.problems


def check_text(lf: LeaderboardFile, text: str, expected: Expected, source: str) -> list[str]:
    """The problems of a leaderboard file's text (empty when it is valid); ``source`` names it in messages."""
    lines = text.split("\n")
    lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    while lines and lines[-1] == "":
        lines.pop()
    check = _Checker(lf, expected, source)
    if lf.benchmark == "glue":
        return _check_tsv(check, lines)
    return _check_jsonl(check, lines)


def _check_tsv(check: _Checker, lines: list[str]) -> list[str]:
    lf = check.lf
    if not lines or lines[0].lstrip("\ufeff") != GLUE_HEADER:
        check.add(1, f"header {lines[0] if lines else ''!r}, expected {GLUE_HEADER!r}")
    for n, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != 2:
            check.add(n, f"{len(fields)} fields, expected 2 (index, prediction)")
            continue
        index, value = fields
        check.index(n, int(index) if index.strip().lstrip("-").isdigit() else index)
        if lf.kind == "score":
            try:
                score = float(value)
            except ValueError:
                score = math.nan
            if not STSB_RANGE[0] <= score <= STSB_RANGE[1]:  # also refuses NaN
                low, high = STSB_RANGE
                check.add(n, f"unknown label {value!r}; allowed: a score in [{low}, {high}]")
        else:
            check.label(n, value, lf.labels)
    return check.finish(max(0, len(lines) - 1))


def _check_jsonl(check: _Checker, lines: list[str]) -> list[str]:
    lf = check.lf
    paragraphs: dict[Any, int] = {}
    for n, line in enumerate(lines, start=1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            check.add(n, f"invalid JSON ({err.msg}, column {err.colno})")
            continue
        if not isinstance(obj, dict) or "idx" not in obj:
            check.add(n, "expected a JSON object with an 'idx' field")
            continue
        if lf.kind == "nested":
            _check_multirc(check, n, obj, paragraphs)
            continue
        key = check.index(n, obj["idx"])
        if "label" not in obj:
            check.add(n, "no 'label' field")
        elif lf.kind == "answer":
            allowed = (check.expected.answers or {}).get(key, frozenset())
            if obj["label"] not in allowed:
                check.add(n, f"unknown label {obj['label']!r}: not an entity of query {obj['idx']!r}")
        else:
            check.label(n, obj["label"], lf.labels)
    return check.finish(len(lines))


def _check_multirc(check: _Checker, n: int, obj: dict, paragraphs: dict[Any, int]) -> None:
    p = _key(obj["idx"])
    if p in paragraphs:
        check.add(n, f"paragraph {obj['idx']!r} repeats line {paragraphs[p]}")
    paragraphs.setdefault(p, n)
    questions = obj.get("passage", {}).get("questions") if isinstance(obj.get("passage"), dict) else None
    if not isinstance(questions, list):
        check.add(n, "expected 'passage': {'questions': [...]}")
        return
    for q in questions:
        answers = q.get("answers") if isinstance(q, dict) else None
        if not isinstance(answers, list) or "idx" not in q:
            check.add(n, "a question without 'idx' or an 'answers' list")
            continue
        for a in answers:
            if not isinstance(a, dict) or "idx" not in a or "label" not in a:
                check.add(n, f"question {q['idx']!r}: an answer without 'idx' or 'label'")
                continue
            key = (p, _key(q["idx"]), _key(a["idx"]))
            check.index(n, key, "answer (paragraph, question, answer)")
            check.label(n, a["label"], check.lf.labels)


def validate_file(path: Path, lf: LeaderboardFile, expected: Expected) -> list[str]:
    """The problems of the file at ``path`` (empty when it is valid)."""
    return check_text(lf, Path(path).read_text(encoding="utf-8"), expected, str(path))


def validate_submission(path: Path, data_root: Path) -> dict[str, list[str]]:
    """Check every leaderboard file of a folder (searched recursively) or a zip against the data root.

    Returns:
        file -> its problems (an empty list: valid). A file whose test file is not under the data root has
        one problem saying so.

    Raises:
        FileNotFoundError: ``path`` does not exist. ValueError: it holds no leaderboard file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"submission not found: {path}")
    files: list[tuple[str, LeaderboardFile, str]] = []
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            for member in zf.namelist():
                name = Path(member).name
                if name in BY_NAME:
                    files.append((f"{path}:{member}", BY_NAME[name], zf.read(member).decode("utf-8")))
    elif path.is_file() and path.name in BY_NAME:
        files.append((str(path), BY_NAME[path.name], path.read_text(encoding="utf-8")))
    elif path.is_dir():
        for file in sorted(path.rglob("*")):
            # skips hidden folders, such as the writer's staging folder
            hidden = any(part.startswith(".") for part in file.relative_to(path).parts)
            if file.is_file() and file.name in BY_NAME and not hidden:
                files.append((str(file), BY_NAME[file.name], file.read_text(encoding="utf-8")))
    if not files:
        raise ValueError(f"{path}: no leaderboard file found; known names: {', '.join(BY_NAME)}")
    expectations: dict[str, Expected | str] = {}
    report: dict[str, list[str]] = {}
    for source, lf, text in files:
        if lf.name not in expectations:
            try:
                expectations[lf.name] = expected_from_data(lf, data_root)
            except FileNotFoundError as err:
                expectations[lf.name] = f"cannot check: {err}"
        expected = expectations[lf.name]
        report[source] = [f"{source}: {expected}"] if isinstance(expected, str) else \
            check_text(lf, text, expected, source)
    return report
