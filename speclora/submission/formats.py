"""The files the GLUE and SuperGLUE leaderboards take, and how predictions are written into them.

GLUE (gluebenchmark.com): one TSV per task, header ``index<TAB>prediction``, one row per test example::

    CoLA SST-2 MRPC QQP WNLI   0 / 1
    STS-B                      a score, clipped to [0, 5], three decimals
    MNLI-m MNLI-mm AX          entailment / neutral / contradiction   (AX: the MNLI head on the diagnostic)
    QNLI RTE                   entailment / not_entailment

SuperGLUE (super.gluebenchmark.com): one JSONL per task, ``{"idx": ..., "label": ...}`` per test example::

    BoolQ WiC                  "true" / "false"
    WSC                        "True" / "False"   (capitalised, as jiant's SuperGLUE writer spells them)
    CB                         "entailment" / "contradiction" / "neutral"
    RTE AX-b AX-g              "entailment" / "not_entailment"   (AX-b/AX-g: the RTE head on the diagnostics)
    COPA                       0 / 1 (the chosen alternative, an int)
    ReCoRD                     the chosen entity's text; one line per query, ``idx`` the query's
    MultiRC                    one line per paragraph, answers nested in their question:
        {"idx": p, "passage": {"questions": [{"idx": q, "answers": [{"idx": a, "label": 0|1}, ...]}, ...]}}

docs/submission.md says which of these choices could not be checked offline.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from speclora.tasks import TASKS

Benchmark = Literal["glue", "superglue"]

GLUE_HEADER = "index\tprediction"
STSB_RANGE = (0.0, 5.0)


@dataclass(frozen=True)
class LeaderboardFile:
    """One file a leaderboard takes.

    Attributes:
        name: the file name the leaderboard expects (``CoLA.tsv``, ``AX-b.jsonl``).
        benchmark: ``glue`` (TSV) or ``superglue`` (JSONL).
        entry: the predict entry behind it (``cola``, ``mnli_m``; diagnostics ``ax``, ``ax_b``, ``ax_g``).
        tasks: the tasks whose head can predict it, preferred first (diagnostics: the entailment tasks).
        labels: the value written for each class, in the head's class order; ``()`` for a score (STS-B) or
            an answer text (ReCoRD).
    """

    name: str
    benchmark: Benchmark
    entry: str
    tasks: tuple[str, ...]
    labels: tuple[Any, ...]

    @property
    def kind(self) -> Literal["score", "answer", "nested", "label"]:
        """How a row's value is written: STS-B score, ReCoRD answer text, MultiRC nesting, or class label."""
        return {"stsb": "score", "record": "answer", "multirc": "nested"}.get(self.entry, "label")


def _names(task: str) -> tuple[str, ...]:
    return TASKS[task].label_names


def _glue(name: str, entry: str, task: str | None = None) -> LeaderboardFile:
    task = task or entry
    return LeaderboardFile(name, "glue", entry, (task,), _names(task))


def _superglue(name: str, entry: str, labels: tuple[Any, ...] | None = None,
               tasks: tuple[str, ...] | None = None) -> LeaderboardFile:
    tasks = tasks or (entry,)
    return LeaderboardFile(name, "superglue", entry, tasks, _names(tasks[0]) if labels is None else labels)


LEADERBOARD_FILES: tuple[LeaderboardFile, ...] = (
    _glue("CoLA.tsv", "cola"),
    _glue("SST-2.tsv", "sst2"),
    _glue("MRPC.tsv", "mrpc"),
    _glue("STS-B.tsv", "stsb"),
    _glue("QQP.tsv", "qqp"),
    _glue("MNLI-m.tsv", "mnli_m", "mnli"),
    _glue("MNLI-mm.tsv", "mnli_mm", "mnli"),
    _glue("QNLI.tsv", "qnli"),
    _glue("RTE.tsv", "rte"),
    _glue("WNLI.tsv", "wnli"),
    _glue("AX.tsv", "ax", "mnli"),
    _superglue("BoolQ.jsonl", "boolq"),
    _superglue("CB.jsonl", "cb"),
    _superglue("COPA.jsonl", "copa", (0, 1)),
    _superglue("MultiRC.jsonl", "multirc", (0, 1)),
    _superglue("ReCoRD.jsonl", "record", ()),
    _superglue("RTE.jsonl", "sg_rte"),
    _superglue("WiC.jsonl", "wic"),
    _superglue("WSC.jsonl", "wsc", ("False", "True")),
    _superglue("AX-b.jsonl", "ax_b", tasks=("sg_rte", "rte")),
    _superglue("AX-g.jsonl", "ax_g", tasks=("sg_rte", "rte")),
)

BY_NAME: dict[str, LeaderboardFile] = {f.name: f for f in LEADERBOARD_FILES}
BY_ENTRY: dict[str, LeaderboardFile] = {f.entry: f for f in LEADERBOARD_FILES}


def benchmark_files(benchmark: Benchmark) -> list[LeaderboardFile]:
    return [f for f in LEADERBOARD_FILES if f.benchmark == benchmark]


def json_idx(value: Any) -> Any:
    """An official index as the JSONL files write it: AX-b's ``"12"`` becomes ``12``; ints stay ints."""
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return value


def render(lf: LeaderboardFile, idx: Sequence[Any], preds: Sequence[float],
           candidates: Sequence[Sequence[str]] | None = None) -> str:
    """The text of ``lf`` for the test examples of one split, in file order.

    Args:
        lf: the file.
        idx: official index of each example (``TokenizedSplit.idx``); MultiRC: a dict with paragraph,
            question and answer.
        preds: per example, the predicted class, score (STS-B) or chosen option (ReCoRD: candidate position).
        candidates: ReCoRD: each query's candidate texts (``TokenizedSplit.candidates``).
    """
    if len(idx) != len(preds):
        raise ValueError(f"{lf.name}: {len(preds)} predictions for {len(idx)} test examples")
    if lf.benchmark == "glue":
        rows = [f"{i}\t{_glue_value(lf, p)}" for i, p in zip(idx, preds)]
        return "\n".join([GLUE_HEADER, *rows]) + "\n"
    if lf.kind == "nested":
        records = _multirc_records(idx, preds)
    elif lf.kind == "answer":
        if candidates is None:
            raise ValueError(f"{lf.name}: the split carries no candidate texts")
        records = [{"idx": json_idx(i), "label": candidates[u][int(p)]}
                   for u, (i, p) in enumerate(zip(idx, preds))]
    else:
        records = [{"idx": json_idx(i), "label": lf.labels[int(p)]} for i, p in zip(idx, preds)]
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _glue_value(lf: LeaderboardFile, pred: float) -> str:
    if lf.kind == "score":
        low, high = STSB_RANGE
        return f"{min(max(float(pred), low), high):.3f}"
    return str(lf.labels[int(pred)])


def _multirc_records(idx: Sequence[dict], preds: Sequence[float]) -> list[dict]:
    """Answers nested into their question and paragraph, each in order of first appearance."""
    paragraphs: dict[Any, dict[Any, list[dict]]] = {}
    for i, p in zip(idx, preds):
        questions = paragraphs.setdefault(i["paragraph"], {})
        questions.setdefault(i["question"], []).append({"idx": i["answer"], "label": int(p)})
    return [
        {"idx": p, "passage": {"questions": [{"idx": q, "answers": a} for q, a in questions.items()]}}
        for p, questions in paragraphs.items()
    ]
