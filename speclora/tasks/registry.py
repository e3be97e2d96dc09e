"""The task registry: the ground floor that data, model and metrics all read.

Every GLUE and SuperGLUE task is described once here: where its files live under the data root, the
format of those files, its label space, the kind of head it needs and the official metrics that make
up its leaderboard score. Nothing here reads a file or builds a tensor.

Head kinds
----------
``classification``  one sequence per example, ``num_labels`` classes (MultiRC: one binary example per
                    answer, grouped by question for the exact-match metric).
``regression``      one sequence per example, one real-valued output (STS-B, 0..5).
``choice``          several sequences per example, one score each, softmax over the example's
                    sequences (COPA: two choices; ReCoRD: one candidate per entity of the passage).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

HeadKind = Literal["classification", "regression", "choice"]
Benchmark = Literal["glue", "superglue"]
FileFormat = Literal["tsv", "jsonl"]

# Metric names understood by speclora.metrics; a task's score is the mean of its metrics.
METRIC_NAMES = (
    "accuracy",
    "f1",
    "macro_f1",
    "matthews",
    "pearson",
    "spearman",
    "f1a",
    "em",
    "record_f1",
    "record_em",
)

# UnoLoRA §4 (after Zhang et al. 2020): tasks with fewer than this many training records split their
# official dev set in half into validation and test; larger ones hold out rows of train as validation.
SMALL_TASK_THRESHOLD = 10_000
LARGE_TASK_HOLDOUT = 1_000

# The default suite (DESIGN.md): every GLUE and SuperGLUE task whose full training data is offline.
# ``data.tasks`` defaults to it; configs/default.yaml and configs/suites/default.yaml spell it out
# (tests/test_cli.py pins them to this list).
DEFAULT_SUITE: list[str] = ["cola", "sst2", "mrpc", "stsb", "rte", "cb", "copa", "wic", "wsc", "multirc"]


@dataclass(frozen=True)
class EvalSet:
    """One evaluated entry of a task: a name suffix and the official file it comes from.

    MNLI has two (matched and mismatched), reported as two entries; every other task has one.
    """

    suffix: str  # "" for the task itself, "m"/"mm" for MNLI
    dev_split: str  # key into TaskSpec.files of the labelled official dev file
    test_split: str  # key into TaskSpec.files of the unlabelled official test file


@dataclass(frozen=True)
class TaskSpec:
    """Everything the harness needs to know about one task.

    Attributes:
        name: canonical key used in configs and log names (``cola``, ``sg_rte``, ...).
        display: the benchmark's own spelling (``CoLA``, ``RTE``), used for submission files.
        benchmark: ``glue`` or ``superglue``.
        fmt: file format of the official files.
        files: split name -> path relative to the data root.
        kind: head kind (see the module docstring).
        num_labels: classes for ``classification``; 1 for ``regression`` and ``choice``.
        label_names: label spellings as written in the files (and on the leaderboard), in class order.
        metrics: official metrics, averaged into the task score.
        eval_sets: the evaluated entries of the task.
        train_records: official number of training records (lines/rows), for the split rule.
        subsets: published few-shot subsets: name -> {split: path}.
        label_range: ``regression`` only: the (low, high) the task's scores are defined on (STS-B: 0 to 5);
            with ``model.regression_target: range`` the head learns the score mapped onto [−1, 1]
            (speclora.model.heads). None: the raw score there.
        label_stats: ``regression`` only: the (mean, std) of the training split's scores (STS-B: 2.70, 1.46);
            with ``model.regression_target: standard`` (the default) the head learns the score standardised
            by them. None: that choice is refused for the task.
    """

    name: str
    display: str
    benchmark: Benchmark
    fmt: FileFormat
    files: dict[str, str]
    kind: HeadKind
    num_labels: int
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]
    train_records: int
    eval_sets: tuple[EvalSet, ...] = (EvalSet("", "dev", "test"),)
    subsets: dict[str, dict[str, str]] = field(default_factory=dict)
    label_range: tuple[float, float] | None = None
    label_stats: tuple[float, float] | None = None

    @property
    def eval_names(self) -> tuple[str, ...]:
        """Log names of the evaluated entries: ``mnli_m``, ``mnli_mm``; otherwise the task name."""
        return tuple(f"{self.name}_{e.suffix}" if e.suffix else self.name for e in self.eval_sets)

    @property
    def is_small(self) -> bool:
        return self.train_records < SMALL_TASK_THRESHOLD


def _lmbff(task: str, dev_name: str) -> dict[str, dict[str, str]]:
    """LM-BFF 16-shot subsets (SOURCES.md): both files are drawn from the official *train* split."""
    return {
        f"k-shot-{seed}": {
            "train": f"glue/{task}/subsets/LM-BFF_k-shot/16-{seed}/train.tsv",
            "dev": f"glue/{task}/subsets/LM-BFF_k-shot/16-{seed}/{dev_name}.tsv",
        }
        for seed in (13, 21, 42, 87, 100)
    }


def _fewglue(task: str) -> dict[str, dict[str, str]]:
    """FewGLUE 32-example train and P-tuning's 32-example dev32 (SOURCES.md), both from official train."""
    return {
        "fewglue": {
            "train": f"superglue/{task}/subsets/FewGLUE/train.jsonl",
            "dev": f"superglue/{task}/subsets/FewGLUE_32dev/dev32.jsonl",
        }
    }


def _glue(task: str, dev: str = "dev.tsv", test: str = "test.tsv") -> dict[str, str]:
    return {"train": f"glue/{task}/train.tsv", "dev": f"glue/{task}/{dev}", "test": f"glue/{task}/{test}"}


def _superglue(task: str) -> dict[str, str]:
    return {
        "train": f"superglue/{task}/train.jsonl",
        "dev": f"superglue/{task}/val.jsonl",
        "test": f"superglue/{task}/test.jsonl",
    }


_NLI2 = ("entailment", "not_entailment")

_TASKS: tuple[TaskSpec, ...] = (
    # ---------------------------------------------------------------- GLUE
    TaskSpec("cola", "CoLA", "glue", "tsv", _glue("CoLA"), "classification", 2, ("0", "1"),
             ("matthews",), 8551),
    TaskSpec("sst2", "SST-2", "glue", "tsv", _glue("SST-2"), "classification", 2, ("0", "1"),
             ("accuracy",), 67349),
    TaskSpec("mrpc", "MRPC", "glue", "tsv", _glue("MRPC"), "classification", 2, ("0", "1"),
             ("f1", "accuracy"), 3668),
    TaskSpec("stsb", "STS-B", "glue", "tsv", _glue("STS-B"), "regression", 1, (),
             ("pearson", "spearman"), 5749, label_range=(0.0, 5.0), label_stats=(2.70, 1.46)),
    TaskSpec("qqp", "QQP", "glue", "tsv", _glue("QQP"), "classification", 2, ("0", "1"),
             ("f1", "accuracy"), 363846, subsets=_lmbff("QQP", "dev")),
    TaskSpec(
        "mnli", "MNLI", "glue", "tsv",
        {
            "train": "glue/MNLI/train.tsv",
            "dev_matched": "glue/MNLI/dev_matched.tsv",
            "dev_mismatched": "glue/MNLI/dev_mismatched.tsv",
            "test_matched": "glue/MNLI/test_matched.tsv",
            "test_mismatched": "glue/MNLI/test_mismatched.tsv",
        },
        "classification", 3, ("entailment", "neutral", "contradiction"), ("accuracy",), 392702,
        eval_sets=(
            EvalSet("m", "dev_matched", "test_matched"),
            EvalSet("mm", "dev_mismatched", "test_mismatched"),
        ),
        subsets=_lmbff("MNLI", "dev_matched"),
    ),
    TaskSpec("qnli", "QNLI", "glue", "tsv", _glue("QNLI"), "classification", 2, _NLI2,
             ("accuracy",), 104743, subsets=_lmbff("QNLI", "dev")),
    TaskSpec("rte", "RTE", "glue", "tsv", _glue("RTE"), "classification", 2, _NLI2, ("accuracy",), 2490),
    TaskSpec("wnli", "WNLI", "glue", "tsv", _glue("WNLI"), "classification", 2, ("0", "1"),
             ("accuracy",), 635),
    # ----------------------------------------------------------- SuperGLUE
    TaskSpec("boolq", "BoolQ", "superglue", "jsonl", _superglue("BoolQ"), "classification", 2,
             ("false", "true"), ("accuracy",), 9427, subsets=_fewglue("BoolQ")),
    TaskSpec("cb", "CB", "superglue", "jsonl", _superglue("CB"), "classification", 3,
             ("entailment", "contradiction", "neutral"), ("macro_f1", "accuracy"), 250),
    TaskSpec("copa", "COPA", "superglue", "jsonl", _superglue("COPA"), "choice", 1, ("0", "1"),
             ("accuracy",), 400),
    # MultiRC's records are passages (456 in train); each answer becomes one binary example.
    TaskSpec("multirc", "MultiRC", "superglue", "jsonl", _superglue("MultiRC"), "classification", 2,
             ("0", "1"), ("f1a", "em"), 456),
    TaskSpec("record", "ReCoRD", "superglue", "jsonl", _superglue("ReCoRD"), "choice", 1, (),
             ("record_f1", "record_em"), 65709, subsets=_fewglue("ReCoRD")),
    TaskSpec("sg_rte", "RTE", "superglue", "jsonl", _superglue("RTE"), "classification", 2, _NLI2,
             ("accuracy",), 2490),
    TaskSpec("wic", "WiC", "superglue", "jsonl", _superglue("WiC"), "classification", 2,
             ("false", "true"), ("accuracy",), 5428),
    TaskSpec("wsc", "WSC", "superglue", "jsonl", _superglue("WSC"), "classification", 2,
             ("false", "true"), ("accuracy",), 554),
)

TASKS: dict[str, TaskSpec] = {t.name: t for t in _TASKS}

# Other spellings people type: the benchmarks' own names, with or without punctuation.
_ALIASES = {
    "superglue_rte": "sg_rte",
    "rte_sg": "sg_rte",
    "sgrte": "sg_rte",
    "sts": "stsb",
}


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_LOOKUP: dict[str, str] = {}
for _t in _TASKS:
    _LOOKUP[_normalise(_t.name)] = _t.name
    if _t.benchmark == "glue":  # "RTE" means the GLUE task; SuperGLUE's is sg_rte
        _LOOKUP.setdefault(_normalise(_t.display), _t.name)
for _k, _v in _ALIASES.items():
    _LOOKUP[_normalise(_k)] = _v
for _t in _TASKS:
    _LOOKUP.setdefault(_normalise(_t.display), _t.name)


def get_task(name: str) -> TaskSpec:
    """Look a task up by canonical name or the benchmark's spelling (``SST-2``, ``sst2``, ``STS-B``).

    Raises:
        ValueError: naming the unknown task and the tasks that exist.
    """
    key = _LOOKUP.get(_normalise(str(name)))
    if key is None:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[key]


def resolve_tasks(names: list[str] | tuple[str, ...]) -> list[TaskSpec]:
    """Resolve a config's task list to specs, in the given order, refusing duplicates and empties."""
    if not names:
        raise ValueError("tasks: the task list is empty; give at least one of: " + ", ".join(TASKS))
    specs = [get_task(n) for n in names]
    seen: dict[str, str] = {}
    for given, spec in zip(names, specs):
        if spec.name in seen:
            raise ValueError(f"tasks: {given!r} and {seen[spec.name]!r} name the same task {spec.name!r}")
        seen[spec.name] = given
    return specs


def eval_names(tasks: list[TaskSpec]) -> list[tuple[str, TaskSpec, EvalSet]]:
    """The evaluated entries of a run, in a fixed order: one dataloader each, in this order."""
    out = []
    for spec in tasks:
        for name, es in zip(spec.eval_names, spec.eval_sets):
            out.append((name, spec, es))
    return out
