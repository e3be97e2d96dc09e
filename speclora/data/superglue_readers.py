"""Reader of the official SuperGLUE JSONL files, and the text layouts it shares with the hub mapping.

Layout (the SuperGLUE v2 release)
---------------------------------
``superglue/<TASK>/{train,val,test}.jsonl``: one JSON object a line, UTF-8; test files have no label.
How each task's record becomes text segments (``(text_a, text_b)`` pairs):

========  ====================================================================================
BoolQ     (question, passage); label ``true``/``false`` (JSON booleans)
CB, RTE   (premise, hypothesis); string labels (the diagnostics AX-b/AX-g: RTE's, AX-b spells
          the fields sentence1/sentence2)
WiC       (f"{word}: {sentence1}", sentence2); booleans
WSC       (text, f'Does "{span2_text}" refer to "{span1_text}"?'); booleans
COPA      choice: (premise + connector, choice1), (premise + connector, choice2); label 0/1 = gold
MultiRC   a record is a passage; each answer of each of its questions is one example
          (passage, question + " " + answer); label 0/1; examples of a question share a group
ReCoRD    a record is a passage; each query is one choice example over the passage's distinct
          entities: (passage with "@highlight\\n" -> "- ", query with @placeholder -> entity)
========  ====================================================================================
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from speclora.data.glue_readers import class_index, read_lines, where
from speclora.tasks import Example, TaskSpec

Segments = tuple[tuple[str, str | None], ...]

COPA_CONNECTORS = {"cause": " What was the cause?", "effect": " What happened as a result?"}
RECORD_PLACEHOLDER = "@placeholder"


# ------------------------------------------------------------------ text layouts (shared with the hub)
def wic_text_a(word: str, sentence1: str) -> str:
    return f"{word}: {sentence1}"


def wsc_question(span1_text: str, span2_text: str) -> str:
    return f'Does "{span2_text}" refer to "{span1_text}"?'


def copa_segments(premise: str, question: str, choice1: str, choice2: str, at: str) -> Segments:
    """COPA's two options; ``question`` (``cause``/``effect``) picks the connector appended to the premise."""
    if question not in COPA_CONNECTORS:
        raise ValueError(f"{at}: COPA question {question!r}, expected one of {list(COPA_CONNECTORS)}")
    stem = premise + COPA_CONNECTORS[question]
    return ((stem, choice1), (stem, choice2))


def multirc_segments(passage: str, question: str, answer: str) -> Segments:
    return ((passage, f"{question} {answer}"),)


def record_passage(text: str) -> str:
    """The passage as the model reads it: each ``@highlight`` line becomes a ``- `` bullet."""
    return text.replace("@highlight\n", "- ")


def record_candidates(spans: Iterable[tuple[int, str]]) -> tuple[str, ...]:
    """The distinct entity strings, in order of first appearance in the passage.

    ``spans``: ``(start, text)`` per entity mention, in any order (sorted stably by ``start``).
    """
    return tuple(dict.fromkeys(text for _, text in sorted(spans, key=lambda s: s[0])))


def record_segments(passage: str, query: str, candidates: tuple[str, ...], at: str) -> Segments:
    if RECORD_PLACEHOLDER not in query:
        raise ValueError(f"{at}: ReCoRD query has no {RECORD_PLACEHOLDER!r}: {query!r}")
    if not candidates:
        raise ValueError(f"{at}: ReCoRD passage has no entities to choose from")
    return tuple((passage, query.replace(RECORD_PLACEHOLDER, c)) for c in candidates)


# ------------------------------------------------------------------ ReCoRD soft gold (official metric)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 / ReCoRD normalisation: lower case, drop punctuation, drop a/an/the, squash spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
    """Bag-of-tokens F1 of the normalised strings: 2·P·R/(P+R), P = common/|pred|, R = common/|gold|."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def candidate_scores(candidates: tuple[str, ...], golds: list[str]) -> tuple[tuple[float, float], ...]:
    """Per candidate, the (F1, EM) it would score if chosen: the max over the gold answers of each."""
    return tuple(
        (max(token_f1(c, g) for g in golds), max(exact_match(c, g) for g in golds)) for c in candidates
    )


def record_gold(candidates: tuple[str, ...], golds: list[str], at: str) -> tuple[float, tuple]:
    """The gold option (the first candidate equal to a gold answer text) and the candidates' scores."""
    if not golds:
        raise ValueError(f"{at}: missing label for record (a labelled split): the query has no answers")
    gold_set = set(golds)
    hit = next((i for i, c in enumerate(candidates) if c in gold_set), None)
    if hit is None:
        raise ValueError(f"{at}: no candidate entity equals a gold answer; answers {golds}, "
                         f"candidates {list(candidates)}")
    return float(hit), candidate_scores(candidates, golds)


# ------------------------------------------------------------------ record access with located errors
def get(obj: dict, key: str, at: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise ValueError(f"{at}: missing field {key!r}")
    return obj[key]


def text(obj: dict, key: str, at: str) -> str:
    value = get(obj, key, at)
    if not isinstance(value, str):
        raise ValueError(f"{at}: field {key!r} is {value!r}, expected a string")
    return value


def items(obj: dict, key: str, at: str) -> list:
    value = get(obj, key, at)
    if not isinstance(value, list):
        raise ValueError(f"{at}: field {key!r} is a {type(value).__name__}, expected a list")
    return value


def label_of(spec: TaskSpec, obj: dict, at: str, labelled: bool) -> float | None:
    """The class index of ``obj["label"]``: booleans as ``true``/``false``, ints as ``0``/``1``, strings as is."""
    if not labelled:
        return None
    value = obj.get("label") if isinstance(obj, dict) else None
    if value is None:
        return class_index(spec, "", at)  # raises: missing label
    if isinstance(value, bool):
        spelled = "true" if value else "false"
    elif isinstance(value, (int, str)):
        spelled = str(value)
    else:
        spelled = repr(value)
    return class_index(spec, spelled, at)


# ------------------------------------------------------------------ one record -> example drafts
@dataclass(frozen=True)
class Draft:
    """An example before its uid and group are assigned; ``new_group``: it starts a new group."""

    idx: Any
    segments: Segments
    label: float | None
    new_group: bool = True
    candidate_scores: tuple[tuple[float, float], ...] | None = None
    candidates: tuple[str, ...] | None = None


Builder = Callable[[TaskSpec, dict, str, bool], list[Draft]]


def _boolq(spec: TaskSpec, obj: dict, at: str, labelled: bool) -> list[Draft]:
    segs = ((text(obj, "question", at), text(obj, "passage", at)),)
    return [Draft(get(obj, "idx", at), segs, label_of(spec, obj, at, labelled))]


def _nli(spec: TaskSpec, obj: dict, at: str, labelled: bool) -> list[Draft]:
    a, b = ("sentence1", "sentence2") if "premise" not in obj and "sentence1" in obj else ("premise", "hypothesis")
    segs = ((text(obj, a, at), text(obj, b, at)),)
    return [Draft(get(obj, "idx", at), segs, label_of(spec, obj, at, labelled))]


def _wic(spec: TaskSpec, obj: dict, at: str, labelled: bool) -> list[Draft]:
    segs = ((wic_text_a(text(obj, "word", at), text(obj, "sentence1", at)), text(obj, "sentence2", at)),)
    return [Draft(get(obj, "idx", at), segs, label_of(spec, obj, at, labelled))]


def _wsc(spec: TaskSpec, obj: dict, at: str, labelled: bool) -> list[Draft]:
    target = get(obj, "target", at)
    question = wsc_question(text(target, "span1_text", at), text(target, "span2_text", at))
    return [Draft(get(obj, "idx", at), ((text(obj, "text", at), question),), label_of(spec, obj, at, labelled))]


def _copa(spec: TaskSpec, obj: dict, at: str, labelled: bool) -> list[Draft]:
    segs = copa_segments(text(obj, "premise", at), text(obj, "question", at),
                         text(obj, "choice1", at), text(obj, "choice2", at), at)
    return [Draft(get(obj, "idx", at), segs, label_of(spec, obj, at, labelled))]


def _multirc(spec: TaskSpec, obj: dict, at: str, labelled: bool) -> list[Draft]:
    passage = get(obj, "passage", at)
    body, p_idx = text(passage, "text", at), get(obj, "idx", at)
    drafts = []
    for q in items(passage, "questions", at):
        question, q_idx = text(q, "question", at), get(q, "idx", at)
        answers = items(q, "answers", f"{at} (question {q_idx})")
        if not answers:
            raise ValueError(f"{at} (question {q_idx}): a MultiRC question without answers")
        for n, ans in enumerate(answers):
            a_at = f"{at} (question {q_idx}, answer {n})"
            drafts.append(Draft(
                idx={"paragraph": p_idx, "question": q_idx, "answer": get(ans, "idx", a_at)},
                segments=multirc_segments(body, question, text(ans, "text", a_at)),
                label=label_of(spec, ans, a_at, labelled),
                new_group=n == 0,
            ))
    return drafts


def _record(spec: TaskSpec, obj: dict, at: str, labelled: bool) -> list[Draft]:
    passage = get(obj, "passage", at)
    body = text(passage, "text", at)
    spans = []
    for ent in items(passage, "entities", at):
        start, end = get(ent, "start", at), get(ent, "end", at)
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end < len(body)):
            raise ValueError(f"{at}: entity span ({start!r}, {end!r}) outside the passage of {len(body)} chars")
        spans.append((start, body[start:end + 1]))  # end is inclusive
    candidates = record_candidates(spans)
    shown = record_passage(body)
    drafts = []
    for qa in items(obj, "qas", at):
        q_idx = get(qa, "idx", at)
        q_at = f"{at} (query {q_idx})"
        segs = record_segments(shown, text(qa, "query", q_at), candidates, q_at)
        label, scores = None, None
        if labelled:
            if "answers" not in qa:
                raise ValueError(f"{q_at}: missing label for record (a labelled split): no field 'answers'")
            golds = [text(ans, "text", q_at) for ans in items(qa, "answers", q_at)]
            label, scores = record_gold(candidates, golds, q_at)
        drafts.append(Draft(q_idx, segs, label, candidate_scores=scores, candidates=candidates))
    return drafts


JSONL_BUILDERS: dict[str, Builder] = {
    "boolq": _boolq,
    "cb": _nli,
    "sg_rte": _nli,
    "wic": _wic,
    "wsc": _wsc,
    "copa": _copa,
    "multirc": _multirc,
    "record": _record,
}


def read_jsonl_objects(path: Path) -> list[tuple[int, dict]]:
    """``(line number, object)`` per line of a JSONL file; a line that is not a JSON object is an error."""
    out = []
    for lineno, line in enumerate(read_lines(path), start=1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where(path, lineno)}: invalid JSON ({err.msg}, column {err.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where(path, lineno)}: expected a JSON object, found {type(obj).__name__}")
        out.append((lineno, obj))
    return out


def read_jsonl(spec: TaskSpec, path: Path, *, labelled: bool) -> list[Example]:
    """Read one SuperGLUE JSONL file into examples, in file order (see the module docstring).

    ``group`` is a running counter over the file: per MultiRC question, per example elsewhere (= uid).

    Raises:
        ValueError: naming the file and line of invalid JSON, a missing field, or a missing or unknown
            label in a labelled split.
    """
    builder = JSONL_BUILDERS.get(spec.name)
    if builder is None:
        raise ValueError(f"{spec.name} has no SuperGLUE JSONL layout; tasks with one: {', '.join(JSONL_BUILDERS)}")
    examples: list[Example] = []
    group = -1
    for lineno, obj in read_jsonl_objects(path):
        for d in builder(spec, obj, where(path, lineno), labelled):
            group += d.new_group
            examples.append(Example(
                uid=len(examples), idx=d.idx, segments=d.segments, label=d.label, group=group, record=lineno,
                candidate_scores=d.candidate_scores, candidates=d.candidates,
            ))
    return examples
