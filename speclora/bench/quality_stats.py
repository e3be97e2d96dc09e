"""The arithmetic of the quality tables, on the per-run results (pure functions, no I/O).

A *row* is one run's ``result.json`` as a dict (speclora.bench.quality_worker): ``group``, ``arm``, ``seed``,
``status`` (``ok`` / ``failed`` / ``missing``), ``scores`` (task -> test score in points), ``average``,
``curves`` ... Over seeds s = 1..n (DESIGN.md, "Measures"; seed paper §4.1: five seeds):

    mean ± std              over the seeds whose run is ok and whose value is finite (std with n − 1)
    ITR_s = mean_t s_multi,s(t) / s_single,s(t)              ITR and IC per seed, against the ``single``
    IC_s  = mean_t max(0, s_single,s(t) − s_multi,s(t)) / s_single,s(t)    run of the same task and seed
    paired difference       d_s = x_s − y_s over the seeds where both are ok;
                            d̄ ± t_{0.975, n−1} · sd(d) / √n  (95% t-interval), two-sided paired t-test p
    steps to 95%            the first validated step with val/average ≥ 0.95 · (its last val/average)
    matrix wall time        the length of the union of the runs' [started, finished] intervals: the time during
                            which at least one run was running, whatever the invocations (a resumed matrix adds up,
                            idle time between invocations does not count)
    tail change             max − min of a curve over its last fifth (steps ≥ 0.8 · the last step): "flat"
                            when ≤ 1 point, measured on the mean curve over seeds

Tasks with a non-positive (or NaN) single-task reference at a seed are left out of that seed's ITR / IC
(the ratio means nothing there) and named in ``excluded``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from speclora.metrics import interference_cost, intertask_transfer_ratio

Row = Mapping[str, Any]


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class Stat:
    """mean ± std over n values (std NaN for n < 2; mean NaN for n = 0)."""

    mean: float
    std: float
    n: int

    def fmt(self, digits: int = 1, scale: float = 1.0) -> str:
        if self.n == 0:
            return "–"
        if self.n == 1:
            return f"{self.mean * scale:.{digits}f}"
        return f"{self.mean * scale:.{digits}f} ± {self.std * scale:.{digits}f}"


def mean_std(values: Iterable[Any]) -> Stat:
    """Mean and sample standard deviation (n − 1) of the finite values."""
    xs = [float(v) for v in values if finite(v)]
    n = len(xs)
    if n == 0:
        return Stat(math.nan, math.nan, 0)
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else math.nan
    return Stat(mean, std, n)


@dataclass(frozen=True)
class Paired:
    """A paired comparison over seeds: d̄, its 95% t-interval [low, high], the t-test p and n pairs."""

    mean: float
    low: float
    high: float
    p: float
    n: int

    @property
    def verdict(self) -> str:
        if self.n < 2 or not finite(self.low):
            return "too few seeds"
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "no significant difference"


def t_interval(diffs: Sequence[float], confidence: float = 0.95) -> Paired:
    """d̄ ± t_{(1+c)/2, n−1} · sd / √n and the two-sided one-sample t-test p of the mean against 0.

    With sd = 0 (identical differences) the interval is the point d̄ and p is 0 (d̄ ≠ 0) or 1 (d̄ = 0).
    """
    from scipy import stats

    d = [float(x) for x in diffs if finite(x)]
    n = len(d)
    if n == 0:
        return Paired(math.nan, math.nan, math.nan, math.nan, 0)
    mean = sum(d) / n
    if n < 2:
        return Paired(mean, math.nan, math.nan, math.nan, n)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    if sd == 0:
        return Paired(mean, mean, mean, 1.0 if mean == 0 else 0.0, n)
    half = stats.t.ppf((1 + confidence) / 2, n - 1) * sd / math.sqrt(n)
    p = 2 * stats.t.sf(abs(mean / (sd / math.sqrt(n))), n - 1)
    return Paired(mean, mean - half, mean + half, float(p), n)


def paired(x: Mapping[int, float], y: Mapping[int, float], confidence: float = 0.95) -> Paired:
    """The t-interval of x_s − y_s over the seeds s where both are finite."""
    seeds = sorted(s for s in x if s in y and finite(x[s]) and finite(y[s]))
    return t_interval([x[s] - y[s] for s in seeds], confidence)


def holm(ps: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of p-values tested together (a family-wise error rate); NaN stays NaN and
    is not counted in the family. Adjusted p_(i) = max over j ≤ i of min(1, (m − j + 1) · p_(j)), p sorted up."""
    order = sorted((i for i, x in enumerate(ps) if finite(x)), key=lambda i: ps[i])
    out, running = [math.nan] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * ps[i]))
        out[i] = running
    return out


# ---------------------------------------------------------------------- grouping
def ok(rows: Iterable[Row]) -> list[Row]:
    return [r for r in rows if r.get("status") == "ok"]


def select(rows: Iterable[Row], group: str, arm: str | None = None) -> list[Row]:
    return [r for r in rows if r["group"] == group and (arm is None or r["arm"] == arm)]


def arms_of(rows: Iterable[Row], group: str) -> list[str]:
    """The arms of a group, in first-seen order."""
    out: list[str] = []
    for r in rows:
        if r["group"] == group and r["arm"] not in out:
            out.append(r["arm"])
    return out


def by_seed(rows: Iterable[Row], key: str = "average") -> dict[int, float]:
    """seed -> value of ``key`` for the ok runs (one per seed)."""
    return {int(r["seed"]): r.get(key, math.nan) for r in ok(rows)}


def task_by_seed(rows: Iterable[Row], task: str) -> dict[int, float]:
    return {int(r["seed"]): (r.get("scores") or {}).get(task, math.nan) for r in ok(rows)}


def single_table(rows: Iterable[Row], group: str = "single") -> dict[int, dict[str, float]]:
    """seed -> task -> score of the ``single`` runs of a group (one task each)."""
    out: dict[int, dict[str, float]] = {}
    for r in ok(select(rows, group)):
        for task, score in (r.get("scores") or {}).items():
            out.setdefault(int(r["seed"]), {})[task] = score
    return out


def single_averages(singles: Mapping[int, Mapping[str, float]], tasks: Sequence[str]) -> dict[int, float]:
    """seed -> mean over ``tasks`` of the single-task scores, for the seeds that have every task."""
    out = {}
    for seed, scores in singles.items():
        if all(t in scores for t in tasks):
            out[seed] = sum(scores[t] for t in tasks) / len(tasks)
    return out


# ---------------------------------------------------------------------- ITR and IC
@dataclass
class Transfer:
    """ITR and IC of one arm: per seed, and over seeds; tasks left out of a seed's ratio and why."""

    itr: dict[int, float] = field(default_factory=dict)
    ic: dict[int, float] = field(default_factory=dict)
    excluded: dict[int, list[str]] = field(default_factory=dict)

    @property
    def itr_stat(self) -> Stat:
        return mean_std(self.itr.values())

    @property
    def ic_stat(self) -> Stat:
        return mean_std(self.ic.values())


def transfer(multi_rows: Iterable[Row], singles: Mapping[int, Mapping[str, float]]) -> Transfer:
    """ITR and IC of each ok multi-task run against the ``single`` runs of the same seed.

    Per seed (speclora.metrics): ITR_s = mean_t s_multi(t)/s_single(t), IC_s = mean_t max(0, s_single(t) −
    s_multi(t))/s_single(t), over the run's tasks with a finite multi-task score and a finite, positive
    single-task score at that seed; the others are listed in ``excluded[seed]``.
    """
    out = Transfer()
    for r in ok(multi_rows):
        seed = int(r["seed"])
        ref = singles.get(seed, {})
        multi, single, dropped = {}, {}, []
        for task, score in (r.get("scores") or {}).items():
            s = ref.get(task, math.nan)
            if finite(score) and finite(s) and s > 0:
                multi[task], single[task] = score, s
            else:
                dropped.append(task)
        if dropped:
            out.excluded[seed] = dropped
        if multi:
            out.itr[seed] = intertask_transfer_ratio(multi, single)[1]
            out.ic[seed] = interference_cost(multi, single)[1]
    return out


# ---------------------------------------------------------------------- convergence
def steps_to_fraction(curve: Sequence[Sequence[float]] | None, fraction: float = 0.95) -> float:
    """The first validated step whose value reaches ``fraction`` of the last (final) value.

    ``curve``: [[step, value], ...] in step order (val/average). NaN when the curve is empty or the final
    value is not positive (a fraction of a score ≤ 0 is no target).
    """
    points = [(s, v) for s, v in (curve or []) if finite(v)]
    if not points:
        return math.nan
    final = points[-1][1]
    if final <= 0:
        return math.nan
    target = fraction * final
    return float(next(s for s, v in points if v >= target))


def convergence(rows: Iterable[Row], tag: str = "val/average", fraction: float = 0.95) -> dict[int, float]:
    """seed -> steps to ``fraction`` of the final value of ``tag``, per ok run."""
    return {int(r["seed"]): steps_to_fraction((r.get("curves") or {}).get(tag), fraction) for r in ok(rows)}


@dataclass(frozen=True)
class Tail:
    """A curve's last fraction: its max − min (``change``), the validations in it (``n``), and the rise
    ``last − first`` within it; ``flat`` is None (can't tell) with fewer than two validations there."""

    change: float
    rise: float
    n: int
    flat: bool | None


def tail(steps: Sequence[float], values: Sequence[float], fraction: float = 0.2, tol: float = 1.0) -> Tail:
    """The change of a curve over its last ``fraction`` of steps, and whether it stays within ``tol`` points.

    The window is steps ≥ (1 − fraction) · last step: [160, 200] of a 200-step run validated every 20 steps
    (three validations). Fewer than two finite validations in it: ``flat`` None.
    """
    points = [(s, v) for s, v in zip(steps, values) if finite(v)]
    if not points:
        return Tail(math.nan, math.nan, 0, None)
    start = (1 - fraction) * points[-1][0]
    window = [v for s, v in points if s >= start - 1e-9]
    if len(window) < 2:
        return Tail(math.nan, math.nan, len(window), None)
    change = max(window) - min(window)
    return Tail(change, window[-1] - window[0], len(window), change <= tol)


# ---------------------------------------------------------------------- curves over seeds
def mean_curve(curves: Sequence[Sequence[Sequence[float]]]) -> tuple[list[float], list[float], list[float]]:
    """(steps, mean, std) over runs at the steps every run has; std 0 for one run."""
    if not curves:
        return [], [], []
    common = set.intersection(*({int(s) for s, _ in c} for c in curves))
    steps = sorted(common)
    means, stds = [], []
    for s in steps:
        st = mean_std(v for c in curves for step, v in c if int(step) == s)
        means.append(st.mean)
        stds.append(st.std if st.n > 1 else 0.0)
    return [float(s) for s in steps], means, stds


def best_baseline(rows: Iterable[Row], group: str, baselines: Sequence[str]) -> str | None:
    """The baseline arm with the highest mean suite average in a group (None if none ran)."""
    rows = list(rows)
    scored = [(mean_std(by_seed(select(rows, group, arm)).values()).mean, arm) for arm in baselines]
    scored = [(m, a) for m, a in scored if finite(m)]
    return max(scored)[1] if scored else None


# ---------------------------------------------------------------------- wall time
def busy_seconds(rows: Iterable[Row]) -> tuple[float, int]:
    """Length of the union of the runs' [started, finished] intervals (ISO times), and how many runs had both."""
    spans = []
    for r in rows:
        try:
            spans.append((datetime.fromisoformat(r["started"]), datetime.fromisoformat(r["finished"])))
        except (KeyError, TypeError, ValueError):
            continue
    total, end = 0.0, None
    for a, b in sorted(spans):
        if end is None or a > end:  # a gap: a new busy stretch
            total += (b - a).total_seconds()
            end = b
        elif b > end:  # overlaps the current stretch: extend it
            total += (b - end).total_seconds()
            end = b
    return total, len(spans)


def commits(rows: Iterable[Row]) -> str:
    """The code the runs ran (``commit`` of result.json, speclora.bench.code_commit), each with its count of
    runs, in the order they first ran: "461450f (30 runs), 90e97ed+changes (2 runs)"; runs from before the
    field as "not recorded"."""
    done = sorted((r for r in rows if r.get("status") in ("ok", "failed")), key=lambda r: str(r.get("started")))
    counts: dict[str, int] = {}
    for r in done:
        key = r.get("commit") or "not recorded"
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{c} ({n} run{'s' * (n != 1)})" for c, n in counts.items()) or "no runs"
