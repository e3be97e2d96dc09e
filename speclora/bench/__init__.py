"""Benchmarks: the quality matrix, the budget probe, the perf report and the timing tools (README, docs/)."""

from __future__ import annotations


def name_and_positive(item: str) -> tuple[str, float | None]:
    """``NAME=NUMBER`` (a command-line entry such as ``--rate shared=3e-3``) -> (NAME stripped, NUMBER), the number
    None unless it parses as a number > 0; the caller says what was allowed."""
    name, _, value = item.partition("=")
    try:
        number = float(value)
    except ValueError:
        return name.strip(), None
    return name.strip(), (number if number > 0 else None)
