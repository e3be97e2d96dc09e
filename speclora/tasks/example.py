"""The unit that readers produce and the tokeniser consumes: one example as text segments."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Example:
    """One example of a task, already laid out as the sequences its head scores.

    Attributes:
        uid: position of the example in its split as read (0..n-1), stable across runs.
        idx: the official index, as the leaderboard wants it back (an int; for MultiRC a dict
            ``{"paragraph": p, "question": q, "answer": a}``; for ReCoRD the query's ``idx``).
        segments: one ``(text_a, text_b)`` pair per sequence; ``text_b`` may be ``None``.
            ``classification``/``regression``: exactly one pair. ``choice``: one pair per option.
        label: class index, regression score or index of the gold option; ``None`` when unlabelled.
        group: examples with the same group are scored together (MultiRC question id for exact
            match, global over the split); equal to ``uid`` otherwise.
        record: the line (TSV) or record (JSONL) number the example came from, 1-based, for messages.
        candidate_scores: ``choice`` tasks with soft gold (ReCoRD): per option, the (F1, EM) it would
            score if chosen, computed against every gold answer. ``None`` elsewhere.
        candidates: ReCoRD only: the option texts, for writing predictions.
    """

    uid: int
    idx: Any
    segments: tuple[tuple[str, str | None], ...]
    label: float | None
    group: int
    record: int
    candidate_scores: tuple[tuple[float, float], ...] | None = None
    candidates: tuple[str, ...] | None = None
