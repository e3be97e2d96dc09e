"""Checks of user input shared by every layer: the integer range check, written once.

An integer option is an ``int`` (not a ``bool``, which Python counts as one) within an inclusive range.
:func:`is_int_in` answers the question for code that words its own error; :func:`check_int` raises the
house error, naming the key, the value given and what is allowed (STYLE.md).
"""

from __future__ import annotations

from typing import Any


def is_int_in(value: Any, low: int | None = None, high: int | None = None) -> bool:
    """Whether ``value`` is an int, not a bool, with ``low <= value <= high`` (None: that side unbounded)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return False
    return (low is None or value >= low) and (high is None or value <= high)


def allowed_ints(low: int | None = None, high: int | None = None) -> str:
    """What :func:`is_int_in` accepts, in words: ``an integer >= 1``, ``an integer in [0, 3]``."""
    if low is not None and high is not None:
        return f"an integer in [{low}, {high}]"
    if low is not None:
        return f"an integer >= {low}"
    return "an integer" if high is None else f"an integer <= {high}"


def check_int(key: str, value: Any, low: int | None = 1, high: int | None = None) -> int:
    """``value`` if :func:`is_int_in` holds, else ``ValueError("<key>=<value>; allowed: an integer >= 1")``."""
    if not is_int_in(value, low, high):
        raise ValueError(f"{key}={value!r}; allowed: {allowed_ints(low, high)}")
    return value
