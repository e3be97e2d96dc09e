"""The quality matrix's outputs: ``results.csv`` (one line per run) and ``results.md`` (the tables).

Tables, each mean ± std over seeds (speclora.bench.quality_stats has the arithmetic):

    Table 5      test score per task and the suite average, per method (``single``: the reference)
    Table 6      trainable parameters, fit wall time, time per step, peak memory; ITR, IC, conflict rates
    Learning rates  each method's validation average at each rate of its grid (seed 0, or the mean over --search-seeds) and the chosen rate
    Convergence  steps to 95% of the final validation average, the ratio to ``independent``, and whether the
                 mean validation curve is flat over the last fifth of training; the curves themselves
    Table 7      the spectral method's ablations (configs/methods/speclora_ablations/)
    Few-shot     LM-BFF / FewGLUE subsets, tested on the official dev sets
    One task     ``speclora`` on one task alone against ``single``
    Significance ``speclora`` against the best parameter-efficient baseline, paired over seeds, then its
                 average against each baseline

A run that failed is a cell that says so (and is listed with its error); it is never dropped silently.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from speclora.bench import quality_search
from speclora.bench import quality_stats as qs
from speclora.bench.quality_scales import BASELINES, METHOD_ARMS, REFERENCE, SPECTRAL
from speclora.tasks import get_task

Row = Mapping[str, Any]


def task_label(task: str) -> str:
    try:
        return get_task(task).display
    except ValueError:
        return task


# ---------------------------------------------------------------------- CSV
def write_csv(rows: Sequence[Row], path: Path) -> None:
    """One line per run: what it is, its status, its scores and its costs."""
    tasks: list[str] = []
    for r in rows:
        tasks += [t for t in r.get("tasks", []) if t not in tasks]
    fields = ["run_id", "role", "group", "method", "seed", "lr", "tasks", "status", "error", *[f"score_{t}" for t in tasks],
              "average", "val_best", "tested_checkpoint", "trainable_params", "encoder_side_params", "steps",
              "fit_seconds", "seconds_per_step", "test_seconds", "peak_rss_mib", "peak_cuda_mib", "device",
              "conflict_rate", "conflict_mean_cos", "conflict_trainable_rate", "steps_to_95", "commit"]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            scores = r.get("scores") or {}
            params = r.get("params") or {}
            conflict = r.get("conflict") or {}
            steps = r.get("steps")
            fit = r.get("fit_seconds")
            line = {
                "run_id": r.get("run_id"), "role": r.get("role", "matrix"), "group": r["group"], "method": r["arm"],
                "seed": r["seed"], "lr": r.get("lr"),
                "tasks": " ".join(r.get("tasks", [])), "status": r.get("status"), "error": r.get("error") or "",
                "average": r.get("average"), "val_best": r.get("val_best"),
                "tested_checkpoint": r.get("tested_checkpoint"), "trainable_params": params.get("trainable"),
                "encoder_side_params": params.get("encoder_side"), "steps": steps, "fit_seconds": fit,
                "seconds_per_step": fit / steps if fit and steps else None, "test_seconds": r.get("test_seconds"),
                "peak_rss_mib": r.get("peak_rss_mib"), "peak_cuda_mib": r.get("peak_cuda_mib"),
                "device": r.get("device"), "commit": r.get("commit"), "conflict_rate": conflict.get("rate"),
                "conflict_mean_cos": conflict.get("mean_cos"), "conflict_trainable_rate": conflict.get("trainable_rate"),
                "steps_to_95": qs.steps_to_fraction((r.get("curves") or {}).get("val/average")) if r.get("status") == "ok" else None,
            }
            line.update({f"score_{t}": scores.get(t) for t in tasks})
            w.writerow(line)


# ---------------------------------------------------------------------- markdown helpers
def _table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
    return "\n".join(out)


def _runs(rows: Sequence[Row]) -> str:
    """'2/2', or '1/2, 1 failed' / '0/2, 1 failed, 1 missing'."""
    n = len(rows)
    good = sum(r.get("status") == "ok" for r in rows)
    failed = sum(r.get("status") == "failed" for r in rows)
    missing = sum(r.get("status") == "missing" for r in rows)
    text = f"{good}/{n}"
    if failed:
        text += f", {failed} failed"
    if missing:
        text += f", {missing} not run"
    return text


def _cell(stat: qs.Stat, rows: Sequence[Row], digits: int = 1) -> str:
    """mean ± std, or 'failed' when no run of the cell succeeded because they failed."""
    if stat.n == 0:
        if any(r.get("status") == "failed" for r in rows):
            return "failed"
        if any(r.get("status") == "missing" for r in rows):
            return "not run"
        return "n/a"
    return stat.fmt(digits)


def _invocation(meta: Mapping[str, Any]) -> str:
    if "this_invocation" in meta:
        return meta["this_invocation"]
    if "this_invocation_seconds" in meta:  # written before the text was
        load = meta.get("load_average") or [math.nan, math.nan]
        return (f"{meta['this_invocation_seconds'] / 60:.1f} min, {meta.get('this_invocation_ran', '?')} cells run; "
                f"1-min load average {load[0]:.1f} at its start, {load[1]:.1f} at its end")
    return meta.get("wall", "?")


def _wall(rows: Sequence[Row]) -> str:
    seconds, n = qs.busy_seconds(rows)
    return f"{seconds / 3600:.2f} h" if n else "?"


def _pct(x: float) -> str:
    return f"{x:+.1f}%" if qs.finite(x) else "–"


def _paired(p: qs.Paired, digits: int = 2) -> tuple[str, str, str]:
    if p.n == 0:
        return "–", "–", "–"
    ci = f"[{p.low:+.{digits}f}, {p.high:+.{digits}f}]" if qs.finite(p.low) else "–"
    pv = f"{p.p:.3f}" if qs.finite(p.p) else "–"
    return f"{p.mean:+.{digits}f}", ci, pv


# ---------------------------------------------------------------------- tables
def score_table(rows: Sequence[Row], group: str, arms: Sequence[str], tasks: Sequence[str],
                reference_group: str | None) -> tuple[str, dict[str, dict[str, tuple[float, float]]]]:
    """Per-task and average test scores, mean ± std over seeds; also returns the numbers for the chart."""
    header = ["method", "runs", *[task_label(t) for t in tasks], "Average"]
    lines, numbers = [], {}
    ref = qs.select(rows, reference_group) if reference_group is not None else []
    if ref:
        singles = qs.single_table(rows, reference_group)
        cells, nums = [], {}
        for t in tasks:
            st = qs.mean_std(singles[s][t] for s in singles if t in singles[s])
            cells.append(_cell(st, [r for r in ref if r["tasks"] == [t]]))
            nums[t] = (st.mean, st.std)
        avg = qs.mean_std(qs.single_averages(singles, tasks).values())
        nums["Average"] = (avg.mean, avg.std)
        lines.append([f"{REFERENCE} (reference, one run per task)", _runs(ref), *cells, _cell(avg, ref)])
        numbers[REFERENCE] = nums
    for arm in arms:
        rs = qs.select(rows, group, arm)
        if not rs:
            continue
        nums, cells = {}, []
        for t in tasks:
            st = qs.mean_std(qs.task_by_seed(rs, t).values())
            cells.append(_cell(st, rs))
            nums[t] = (st.mean, st.std)
        avg = qs.mean_std(qs.by_seed(rs).values())
        nums["Average"] = (avg.mean, avg.std)
        numbers[arm] = nums
        lines.append([arm, _runs(rs), *cells, _cell(avg, rs)])
    return _table(header, lines), numbers


def cost_table(rows: Sequence[Row], arms: Sequence[str]) -> str:
    """Table 6: parameters, time, memory; ITR, IC and the conflict rates (main group)."""
    singles = qs.single_table(rows, "single")
    header = ["method", "trainable params", "adapter-side params", "fit time (s)", "s / step", "peak memory (MiB)",
              "ITR", "IC", "conflict rate (W)", "mean cos (W)", "conflict rate (shared trainable)"]
    lines = []
    for arm in [REFERENCE, *arms]:
        group = "single" if arm == REFERENCE else "main"
        rs = qs.select(rows, group, arm)
        if not rs:
            continue
        good = qs.ok(rs)
        params = qs.mean_std((r.get("params") or {}).get("trainable") for r in good)
        side = qs.mean_std((r.get("params") or {}).get("encoder_side") for r in good)
        fit = qs.mean_std(r.get("fit_seconds") for r in good)
        per_step = qs.mean_std(r["fit_seconds"] / r["steps"] for r in good if r.get("steps"))
        cuda = [r.get("peak_cuda_mib") for r in good if r.get("peak_cuda_mib") is not None]
        mem = qs.mean_std(cuda) if cuda else qs.mean_std(r.get("peak_rss_mib") for r in good)
        mem_text = _cell(mem, rs, 0) + (" (GPU)" if cuda else " (RSS)" if mem.n else "")
        if arm == REFERENCE:
            itr = ic = conflict = cos = trainable = "–"
        else:
            tr = qs.transfer(rs, singles)
            itr, ic = _cell(tr.itr_stat, rs, 3), _cell(tr.ic_stat, rs, 3)
            conflict = _cell(qs.mean_std((r.get("conflict") or {}).get("rate") for r in good), rs, 2)
            cos = _cell(qs.mean_std((r.get("conflict") or {}).get("mean_cos") for r in good), rs, 3)
            shared = [(r.get("conflict") or {}).get("trainable_rate") for r in good]
            trainable = (_cell(qs.mean_std(shared), rs, 2) if any(v is not None for v in shared)
                         else "n/a (no shared coordinate)" if good else _cell(qs.Stat(0, 0, 0), rs))
        label = f"{REFERENCE} (per task)" if arm == REFERENCE else arm
        lines.append([label, _cell(params, rs, 0), _cell(side, rs, 0), _cell(fit, rs, 1), _cell(per_step, rs, 3),
                      mem_text, itr, ic, conflict, cos, trainable])
    return _table(header, lines)


def convergence_table(rows: Sequence[Row], arms: Sequence[str]) -> str:
    """Steps to 95% of the final validation average, and the mean curve's change over the last fifth."""
    ref = qs.convergence(qs.select(rows, "main", "independent"))
    ref_mean = qs.mean_std(ref.values()).mean
    header = ["method", "steps to 95% of final val average", "ratio to independent", "final val average",
              "change over the last fifth (max − min, validations)", "flat (≤ 1 point)"]
    lines = []
    for arm in arms:
        rs = qs.select(rows, "main", arm)
        if not rs:
            continue
        steps = qs.mean_std(qs.convergence(rs).values())
        final = qs.mean_std(((r.get("curves") or {}).get("val/average") or [[0, math.nan]])[-1][1] for r in qs.ok(rs))
        ratio = steps.mean / ref_mean if qs.finite(steps.mean) and qs.finite(ref_mean) and ref_mean > 0 else math.nan
        curves = [c for c in ((r.get("curves") or {}).get("val/average") for r in qs.ok(rs)) if c]
        t = qs.tail(*qs.mean_curve(curves)[:2]) if curves else qs.Tail(math.nan, math.nan, 0, None)
        change = f"{t.change:.1f} ({t.n})" if qs.finite(t.change) else f"– ({t.n})"
        flat = "yes" if t.flat else "no" if t.flat is False else "can't tell"
        if t.flat is False:
            flat += f" (rises {t.rise:+.1f})" if t.rise > 0 else f" ({t.rise:+.1f})"
        lines.append([arm, _cell(steps, rs, 1), f"{ratio:.2f}" if qs.finite(ratio) else "–", _cell(final, rs, 1),
                      change, flat])
    return _table(header, lines)


def curves_table(rows: Sequence[Row], arms: Sequence[str], tag: str = "val/average") -> str:
    """The mean (over seeds) validation curve of each method, one column per validation step."""
    series = {}
    for arm in arms:
        curves = [c for c in ((r.get("curves") or {}).get(tag) for r in qs.ok(qs.select(rows, "main", arm))) if c]
        if curves:
            series[arm] = qs.mean_curve(curves)
    steps = sorted({int(s) for st, _, _ in series.values() for s in st})
    if not steps:
        return "No validation curve was logged."
    lines = []
    for arm, (st, mean, _) in series.items():
        at = {int(s): m for s, m in zip(st, mean)}
        lines.append([arm, *[f"{at[s]:.1f}" if s in at and qs.finite(at[s]) else "–" for s in steps]])
    return _table(["method \\ step", *[str(s) for s in steps]], lines)


def ablation_table(rows: Sequence[Row], ablations: Sequence[str], tasks: Sequence[str]) -> str:
    """Table 7: the full method and each ablation; Δ = ablation − full (points and % of the full average)."""
    header = ["configuration", "runs", *[task_label(t) for t in tasks], "Average", "Δ (points)", "Δ %",
              "paired Δ, 95% CI"]
    full = qs.select(rows, "main", SPECTRAL)
    full_avg = qs.mean_std(qs.by_seed(full).values())
    lines = []
    for arm in [SPECTRAL, *ablations]:
        rs = qs.select(rows, "main", arm)
        if not rs:
            continue
        cells = [_cell(qs.mean_std(qs.task_by_seed(rs, t).values()), rs) for t in tasks]
        avg = qs.mean_std(qs.by_seed(rs).values())
        if arm == SPECTRAL:
            lines.append(["full method (speclora)", _runs(rs), *cells, _cell(avg, rs), "–", "–", "–"])
            continue
        delta = avg.mean - full_avg.mean
        pct = 100 * delta / abs(full_avg.mean) if qs.finite(delta) and full_avg.mean else math.nan
        p = qs.paired(qs.by_seed(rs), qs.by_seed(full))
        mean, ci, _ = _paired(p)
        lines.append([arm.split("/", 1)[1], _runs(rs), *cells, _cell(avg, rs),
                      f"{delta:+.2f}" if qs.finite(delta) else "–", _pct(pct), f"{mean} {ci}" if p.n else "–"])
    return _table(header, lines)


def fewshot_table(rows: Sequence[Row], arms: Sequence[str], tasks: Sequence[str]) -> str:
    table, _ = score_table(rows, "fewshot", arms, tasks, "fewshot_single")
    singles = qs.single_table(rows, "fewshot_single")
    header = ["method", "ITR", "IC", "conflict rate (W)"]
    lines = []
    for arm in arms:
        rs = qs.select(rows, "fewshot", arm)
        if not rs:
            continue
        tr = qs.transfer(rs, singles)
        conflict = qs.mean_std((r.get("conflict") or {}).get("rate") for r in qs.ok(rs))
        lines.append([arm, _cell(tr.itr_stat, rs, 3), _cell(tr.ic_stat, rs, 3), _cell(conflict, rs, 2)])
    return table + "\n\n" + _table(header, lines)


def one_task_table(rows: Sequence[Row], tasks: Sequence[str]) -> str:
    header = ["task", "single", "speclora, one task", "Δ (paired mean)", "95% CI", "p", "seeds", "verdict"]
    lines = []
    for t in tasks:
        spec_rows = [r for r in qs.select(rows, "one_task", SPECTRAL) if r["tasks"] == [t]]
        ref_rows = [r for r in qs.select(rows, "single", REFERENCE) if r["tasks"] == [t]]
        if not spec_rows:
            continue
        a, b = qs.task_by_seed(spec_rows, t), qs.task_by_seed(ref_rows, t)
        p = qs.paired(a, b)
        mean, ci, pv = _paired(p)
        lines.append([task_label(t), _cell(qs.mean_std(b.values()), ref_rows), _cell(qs.mean_std(a.values()), spec_rows),
                      mean, ci, pv, str(p.n), p.verdict])
    return _table(header, lines)


def significance(rows: Sequence[Row], group: str, tasks: Sequence[str]) -> tuple[str, list[str]]:
    """speclora against the best baseline of the group, paired over seeds; the table and plain sentences."""
    best = qs.best_baseline(rows, group, BASELINES)
    spec = qs.select(rows, group, SPECTRAL)
    if best is None or not qs.ok(spec):
        return "No comparison: the spectral method or every baseline has no successful run.", []
    base = qs.select(rows, group, best)
    header = ["task", f"{SPECTRAL} − {best} (mean)", "95% CI", "p", "seeds", "verdict"]
    lines, verdicts = [], {}
    for t in [*tasks, "Average"]:
        if t == "Average":
            p = qs.paired(qs.by_seed(spec), qs.by_seed(base))
        else:
            p = qs.paired(qs.task_by_seed(spec, t), qs.task_by_seed(base, t))
        mean, ci, pv = _paired(p)
        label = task_label(t) if t != "Average" else "Average"
        lines.append([label, mean, ci, pv, str(p.n), p.verdict])
        verdicts[label] = p.verdict
    groups: dict[str, list[str]] = {}
    for label, v in verdicts.items():
        groups.setdefault(v, []).append(label)
    sentences = [f"Best baseline by mean average: **{best}**."]
    for v, what in (("better", "helps (CI above 0)"), ("worse", "hurts (CI below 0)"),
                    ("no significant difference", "makes no significant difference (CI contains 0)"),
                    ("too few seeds", "cannot be judged (fewer than two paired seeds)")):
        if v in groups:
            sentences.append(f"{SPECTRAL} {what} on: {', '.join(groups[v])}.")
    return _table(header, lines), sentences


def against_each(rows: Sequence[Row], group: str) -> str:
    """speclora's average against every baseline of the group, paired over seeds; Δ % is of the baseline's mean;
    the p-values also Holm-adjusted over the baselines compared (one family of tests)."""
    spec = qs.by_seed(qs.select(rows, group, SPECTRAL))
    header = ["baseline", "baseline average", f"{SPECTRAL} − baseline", "Δ %", "95% CI", "p", "p (Holm)", "seeds",
              "verdict (by the CI)"]
    bases = {a: base for a in BASELINES if (base := qs.select(rows, group, a))}
    seeds = {a: qs.by_seed(base) for a, base in bases.items()}
    tests = [qs.paired(spec, by_seed) for by_seed in seeds.values()]
    lines = []
    for (arm, base), p, adjusted in zip(bases.items(), tests, qs.holm([t.p for t in tests])):
        stat = qs.mean_std(seeds[arm].values())
        mean, ci, pv = _paired(p)
        pct = _pct(100 * p.mean / stat.mean) if p.n and qs.finite(stat.mean) and stat.mean else "–"
        label = f"{arm} (vanilla LoRA)" if arm == "independent" else arm
        holm = f"{adjusted:.3f}" if qs.finite(adjusted) else "–"
        lines.append([label, _cell(stat, base), mean, pct, ci, pv, holm, str(p.n), p.verdict])
    return _table(header, lines)


def failures(rows: Sequence[Row]) -> str:
    bad = [r for r in rows if r.get("status") != "ok"]
    if not bad:
        return "None: every planned run finished."
    lines = [[r.get("run_id", "?"), r.get("status", "?"), (r.get("error") or "").replace("|", "\\|").replace("\n", " ")[:300]]
             for r in bad]
    return _table(["run", "status", "error"], lines)


# ---------------------------------------------------------------------- the document
def markdown(rows: Sequence[Row], plan: Mapping[str, Any], meta: Mapping[str, Any],
             search_rows: Sequence[Row] = ()) -> str:
    """results.md: a header saying what was run where and when, then every table.

    ``rows``: the matrix's cells; ``search_rows``: the learning-rate search's (its chosen seed-0 runs are
    also matrix cells).
    """
    suite, few = list(plan["suite"]), list(plan["fewshot_tasks"])
    main_arms = qs.arms_of(rows, "main")
    methods = [a for a in METHOD_ARMS if a in main_arms]
    ablations = [a for a in main_arms if "/" in a]
    in_matrix = {r.get("run_id") for r in rows}
    extra = [r for r in search_rows if r.get("run_id") not in in_matrix]  # search runs at rates not chosen
    everything = [*rows, *extra]
    counts = {s: sum(r.get("status") == s for r in everything) for s in ("ok", "failed", "missing")}
    run_time = sum((r.get("fit_seconds") or 0) + (r.get("test_seconds") or 0) for r in everything) / 60
    out = [f"## Scale `{meta['scale']}`: {meta.get('label', '')}".rstrip(": "), ""]
    out += [f"- command: `{meta['command']}`", f"- machine: {meta['machine']}", f"- date: {meta['date']}",
            f"- backbone: {meta['backbone']}; suite: {', '.join(task_label(t) for t in suite)}; "
            f"seeds: {meta['seeds']}; isolation: {meta['isolation']}, {meta['jobs']} run(s) at a time, "
            f"torch threads {meta['threads']}",
            f"- budget of every run: {meta.get('budget', '?')}",
            f"- learning rate: {quality_search.rate_line(meta)}",
            f"- runs: {len(everything)} ({len(rows)} in the matrix, {len(extra)} more in the learning-rate search), "
            f"{counts['ok']} ok, {counts['failed']} failed, {counts['missing']} not run; run time summed over runs "
            f"(fit + test) {run_time:.1f} min",
            f"- matrix wall time: {_wall(everything)} (the time during which at least one of its runs was running, "
            f"over every invocation); the last invocation: {_invocation(meta)}", f"- code: {qs.commits(everything)}"]
    for key, why in plan.get("skipped", {}).items():
        out.append(f"- {key}: {why}")
    if plan.get("lr_choice"):
        out += ["", "### Learning rates (chosen on validation before the seeds ran)", "",
                quality_search.search_table(plan["lr_choice"], [*METHOD_ARMS, REFERENCE], meta.get("search_seeds", 1))]
    out += ["", "### Table 5: test score per task (mean ± std over seeds)", "",
            score_table(rows, "main", methods, suite, "single")[0], "",
            "### Table 6: cost, transfer and gradient conflict", "", cost_table(rows, methods), "",
            "### Convergence", "", convergence_table(rows, methods), "",
            "Mean validation average (over seeds) at each validation step:", "", curves_table(rows, methods), ""]
    if ablations:
        out += ["### Table 7: ablations of the spectral method", "", ablation_table(rows, ablations, suite), ""]
    if few:
        subsets = {int(r["seed"]): json.loads(r["subset"]) for r in qs.select(rows, "fewshot") if r.get("subset")}
        out += ["### Few-shot (published subsets; tested on the official dev sets)", "",
                f"Budget: {meta.get('fewshot_budget', '?')}; the eval cap applies to the test split, the official "
                "dev set (validation is the subset's own dev file).", ""]
        if subsets:
            out += ["Training subsets: " + "; ".join(
                f"seed {s}: " + ", ".join(f"{task_label(t)} {v}" for t, v in subsets[s].items())
                for s in sorted(subsets)) + ".", ""]
        out += [fewshot_table(rows, [a for a in METHOD_ARMS if a in qs.arms_of(rows, 'fewshot')], few), ""]
    if qs.select(rows, "one_task"):
        out += ["### Single-task case: speclora on one task (graph: intra-task and inter-layer edges) vs single", "",
                one_task_table(rows, suite), ""]
    out += ["### Significance: speclora against the best baseline (paired over seeds, 95% t-interval)", ""]
    for group, tasks, title in (("main", suite, "suite"), ("fewshot", few, "few-shot")):
        if not qs.select(rows, group):
            continue
        table, sentences = significance(rows, group, tasks)
        out += [f"**{title}**", "", table, ""] + [f"- {s}" for s in sentences] + [""]
        out += [f"{SPECTRAL}'s average against each baseline ({title}):", "", against_each(rows, group), ""]
    out += ["### Runs that did not finish", "", failures(everything), ""]
    return "\n".join(out)
