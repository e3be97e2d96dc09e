"""``speclora-bench budget``: the training budget at which a scale compares methods converged, not cut off.

    speclora-bench budget --scale cpu --out runs/budget-cpu --steps 200,400,800 --rates-from runs/bench-cpu
    speclora-bench budget --scale gpu --out runs/budget-gpu --steps 1500,3000,6000 --rates-from runs/bench-gpu
    speclora-bench budget --scale smoke --out /tmp/budget --steps 10,20,40 --methods independent,shared

Every arm runs, seed 0 (``--seeds N``: 0..N-1), on the scale's suite once per budget B of ``--steps``: the
scale's config with ``--trainer.max_steps B`` and at least as many validations as the scale has, the last at B, at
the learning rate a quality matrix chose for it (``--rates-from``: that matrix's folder, whose search has
finished; an ablation takes the spectral method's rate) or one given (``--rate shared=3e-3``, repeatable, before
the matrix's), else at its configs' rate. Each run's schedule
(warm-up fraction, linear decay to zero) spans its own budget, so a run at 2B is not a continuation of the
run at B: what a budget is worth is read across runs, not along one curve. Per arm (mean over seeds):

    val(B)      the best validation average of the run at B (what the matrix selects its tested checkpoint by)
    gain(B)     val(B') − val(B), B' the next budget of --steps
    tail(B)     max − min of the run's validation average over its last fifth (the report's flatness)
    converged   at the smallest B from which every later budget gains at most ``--tol`` points (1)

The recommended budget is the smallest B of ``--steps`` at which every arm is converged; the largest budget
cannot be judged (nothing to gain against), so a scale needs at least two budgets. A cell at the scale's own
budget is the quality matrix's seed cell (same arguments, same run id): with ``--rates-from`` it is reused
from that folder instead of run again. ``--set KEY=VALUE`` (repeatable) adds a ``speclora fit`` option to
every run, for an A/B of a setting (``--set model.regression_target=standard``): no matrix cell is reused
then, and an output folder keeps the options it was run with (OUT/set.json; another set is refused).
Outputs: OUT/budget.md, OUT/budget.json, OUT/runs/<run>/; with ``--update-doc`` the table is spliced into a
markdown file between ``<!-- budget:<scale>:start/end -->``. ``--deadline SECONDS`` runs a slice, as quality's
(speclora.bench.quality_deadline): exit code 3 while cells are left.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import shutil
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from speclora.bench import name_and_positive, quality
from speclora.bench import quality_scales as scales
from speclora.bench import quality_search as search
from speclora.bench.quality_deadline import INCOMPLETE, Deadline
from speclora.bench.quality_stats import mean_std, tail
from speclora.bench.quality_worker import RESULT
from speclora.tasks import get_task

TOL = 1.0  # points of validation average: "about 1 point" (issue 15)
SETS = "set.json"  # the --set options an output folder was run with
# options each cell sets itself, and the probe's option that sets them
OWN = {"trainer.max_steps": "--steps", "trainer.val_check_interval": "--steps", "model.optim.lr": "--rate",
       "seed_everything": "--seeds", "model.lora.init_seed": "--seeds", "data.tasks": "--tasks",
       "model.backbone": "--backbone", "trainer.default_root_dir": "--out"}


def val_interval(steps: int, validations: int) -> int:
    """Validation every d steps, d the largest divisor of ``steps`` with at least ``validations`` validations:
    the run's last step is validated, and it is validated at least as often as the scale's own runs."""
    return max(d for d in range(1, max(1, steps // validations) + 1) if steps % d == 0)


def parse_steps(text: str) -> tuple[int, ...]:
    """``--steps``: a comma list of at least two positive step counts, sorted."""
    try:
        values = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        values = []
    if len(values) < 2 or values[0] < 1:
        raise ValueError(f"--steps={text!r}; allowed: a comma list of at least two positive integers (training "
                         "steps per run, e.g. 200,400,800): the largest budget is only the reference of the others")
    return tuple(values)


def parse_rates(texts: Sequence[str]) -> dict[str, float]:
    """``--rate METHOD=LR`` entries -> {method: lr}."""
    rates = {}
    for text in texts:
        name, lr = name_and_positive(text)
        if not name or lr is None:
            raise ValueError(f"--rate {text!r}; allowed: METHOD=LR with LR a positive number (e.g. shared=3e-3)")
        rates[name] = lr
    return rates


def parse_sets(texts: Sequence[str]) -> tuple[str, ...]:
    """``--set KEY=VALUE`` entries -> the ``speclora fit`` arguments they add (``--KEY VALUE`` each)."""
    args: list[str] = []
    for text in texts:
        key, sep, value = text.partition("=")
        key = key.strip()
        if not sep or not key or key.startswith("-"):
            raise ValueError(f"--set {text!r}; allowed: KEY=VALUE, KEY a speclora fit option without its dashes "
                             "(e.g. model.regression_target=standard)")
        if key in OWN:
            raise ValueError(f"--set {key}: every run sets it itself; use {OWN[key]} instead")
        args += [f"--{key}", value.strip()]
    return tuple(args)


def check_sets(out: Path, sets: Sequence[str]) -> None:
    """Refuse to resume ``out`` with other ``--set`` options than it was run with (a finished run is reused by
    its id, which does not name them); record them for a new folder."""
    path, done = out / SETS, any((out / "runs").glob(f"*/{RESULT}"))
    was = json.loads(path.read_text()) if path.is_file() else ([] if done else None)
    if was is not None and list(was) != list(sets):
        raise ValueError(f"--out {out} holds runs made with --set {shlex.join(was) or '(none)'}, not "
                         f"{shlex.join(sets) or '(none)'}; allowed: the same options, or another --out")
    path.write_text(json.dumps(list(sets)))


def chosen_rates(folder: Path | None, arms: Sequence[str], given: Mapping[str, float] | None = None
                 ) -> dict[str, float | None]:
    """arm -> its rate: ``given`` (by method; an ablation takes the spectral method's), else the rate a quality
    matrix's search chose (``folder``/plan.json); an arm with neither is left out (it runs at its configs' rate)."""
    given = dict(given or {})
    method = {arm: search.tuned_arm(arm) for arm in arms}
    unknown = sorted(set(given) - set(method.values()))
    if unknown:
        raise ValueError(f"--rate for {', '.join(map(repr, unknown))}, not among the arms' methods; allowed: "
                         f"{', '.join(sorted(set(method.values())))}")
    choice = None
    if folder is not None:
        path = folder / quality.PLAN
        if not path.is_file():
            raise FileNotFoundError(f"--rates-from {folder}: no {quality.PLAN}; it is written once the matrix's "
                                    "learning-rate search has finished (speclora-bench quality --out that folder)")
        choice = json.loads(path.read_text()).get("lr_choice") or {}
    rates = {}
    for arm, tuned in method.items():
        if tuned in given:
            rates[arm] = given[tuned]
        elif choice is not None:
            if tuned not in choice:
                raise ValueError(f"--rates-from {folder}: its search chose no rate for {tuned!r} (chosen: "
                                 f"{', '.join(sorted(choice)) or 'none'}); run the arm there first, give it --rate "
                                 f"{tuned}=LR, or drop it from --methods")
            rates[arm] = choice[tuned]["lr"]
    return rates


def budget_cells(scale: scales.Scale, arms: Sequence[str], steps: Sequence[int], seeds: int,
                 make: scales.CellFactory, suite: Sequence[str], rates: Mapping[str, float | None],
                 sets: Sequence[str] = ()) -> list[scales.Cell]:
    """One cell per arm × budget × seed; at the scale's own budget the quality matrix's ``main`` cell itself
    (``sets``: ``speclora fit`` arguments added to every cell)."""
    overlay = scale.overlay(make.configs)
    own, validations = scales.scale_budget(overlay)
    cells = []
    for b in steps:  # the shortest budget first: a slice (--deadline) measures it before it starts the longer ones
        for arm in arms:
            for seed in range(seeds):
                cell = make.cell("main", arm, seed, list(suite), overlay, rates.get(arm))
                cell = dataclasses.replace(cell, args=cell.args + tuple(sets))
                if b != own:
                    extra = ("--trainer.max_steps", str(b), "--trainer.val_check_interval", str(val_interval(b, validations)))
                    cell = dataclasses.replace(cell, group="budget", args=cell.args + extra, steps=b)
                cells.append(cell)
    return cells


def reuse(cells: Sequence[scales.Cell], source: Path | None, out: Path) -> int:
    """Copy the results of cells a quality matrix in ``source`` has finished (its ``main`` cells) into ``out``."""
    copied = 0
    for cell in cells:
        src, dst = (source / "runs" / cell.run_id if source else None), out / "runs" / cell.run_id
        if src is not None and (src / RESULT).is_file() and not (dst / RESULT).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / RESULT, dst / RESULT)
            copied += 1
    return copied


def summarise(cells: Sequence[scales.Cell], rows: Mapping[str, Mapping[str, Any]], own: int,
              tol: float = TOL) -> dict[str, Any]:
    """Per arm and budget: val (mean best validation average), final, tail, runs ok; gains; convergence."""
    table: dict[str, dict[int, dict[str, Any]]] = {}
    for cell in cells:
        b = cell.steps if cell.steps is not None else own
        row = rows.get(cell.run_id) or {}
        entry = table.setdefault(cell.arm, {}).setdefault(b, {"best": [], "final": [], "tail": [], "ok": 0, "runs": 0})
        entry["runs"] += 1
        if row.get("status") != "ok":
            continue
        curve = (row.get("curves") or {}).get("val/average") or []
        entry["ok"] += 1
        entry["best"].append(row.get("val_best"))
        entry["final"].append(curve[-1][1] if curve else math.nan)
        entry["tail"].append(tail([s for s, _ in curve], [v for _, v in curve]).change if curve else math.nan)
    arms: dict[str, Any] = {}
    for arm, per in table.items():
        budgets = sorted(per)
        vals = {b: mean_std(per[b]["best"]).mean for b in budgets}
        gains = {b: vals[nxt] - vals[b] for b, nxt in zip(budgets, budgets[1:])}
        complete = all(per[b]["ok"] == per[b]["runs"] for b in budgets)
        # converged at the smallest budget from which every later budget gains at most tol
        converged = next((b for b in budgets[:-1] if all(vals[c] - vals[b] <= tol for c in budgets if c > b)), None)
        arms[arm] = {"val": vals, "gain": gains, "complete": complete, "converged_at": converged if complete else None,
                     "final": {b: mean_std(per[b]["final"]).mean for b in budgets},
                     "tail": {b: mean_std(per[b]["tail"]).mean for b in budgets},
                     "ok": {b: f"{per[b]['ok']}/{per[b]['runs']}" for b in budgets}}
    done = arms and all(a["complete"] for a in arms.values())
    at = [a["converged_at"] for a in arms.values()]
    recommended = max(at) if done and all(b is not None for b in at) else None
    return {"arms": arms, "recommended": recommended, "tol": tol, "complete": bool(done)}


def markdown(summary: Mapping[str, Any], steps: Sequence[int], meta: Mapping[str, Any]) -> str:
    """The budget table and its reading."""
    head = ["arm", *[f"val @ {b}" for b in steps], *[f"gain {a}→{b}" for a, b in zip(steps, steps[1:])],
            *[f"tail @ {b}" for b in steps], "converged at"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, a in summary["arms"].items():
        val = [f"{a['val'][b]:.1f}" for b in steps]
        gain = [f"{a['gain'][b]:+.1f}" for b in steps[:-1]]
        tails = [f"{a['tail'][b]:.1f}" if math.isfinite(a["tail"][b]) else "n/a" for b in steps]
        conv = (f"{a['converged_at']}" if a["converged_at"] is not None else
                "runs missing" if not a["complete"] else f"not by {steps[-2]}")
        if a["converged_at"] is not None:  # no later gain, but a later loss: unstable, not converged
            drop = min(a["val"][c] - a["val"][a["converged_at"]] for c in steps if c > a["converged_at"])
            conv += f" (loses {-drop:.1f} at a larger budget)" if drop < -summary["tol"] else ""
        lines.append("| " + " | ".join([arm, *val, *gain, *tails, conv]) + " |")
    rec = summary["recommended"]
    verdict = (f"**Recommended budget: {rec} steps**: from it, no arm gains more than {summary['tol']:g} point "
               "of best validation average from a longer budget." if rec is not None else
               "**No budget of these is recommended**: " + ("some runs are missing or failed (the `ok` counts in "
               "budget.json)." if not summary["complete"] else
               f"at least one arm gains more than {summary['tol']:g} point from a larger budget at every "
               "budget but the largest; add a larger budget to --steps."))
    return "\n".join([
        f"Budget probe, `{meta['scale']}` scale: `{meta['command']}`",
        "",
        f"Machine: {meta['machine']}; {meta['date']}; seeds {meta['seeds']}; rates: {meta['rates']}.",
        "",
        "`val @ B`: best validation average of the run with budget B (mean over seeds; each run validated "
        f"at least {meta['validations']} times, the last at B, its schedule spanning its own budget). `gain`: to the next budget. "
        "`tail @ B`: max − min of the validation average over the run's last fifth (n/a: fewer than two "
        "validations there). `converged at`: the smallest budget from which no larger budget gains more than "
        f"{summary['tol']:g} point. Figure: `budget.png`.",
        "",
        *lines,
        "",
        verdict,
    ])


def figure(summary: Mapping[str, Any], path: Path) -> None:
    """The best validation average of each arm against the budget (matplotlib; none without it)."""
    from speclora.bench import plots

    if not plots.available():
        return
    series = {}
    for arm, a in summary["arms"].items():
        budgets = sorted(a["val"])
        series[arm] = (budgets, [a["val"][b] for b in budgets], [0.0] * len(budgets))
    plots.curves_chart(path, [("best validation average by budget (each run its own schedule)",
                               "val/average, best of the run", series)])


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(scales.SCALES), required=True)
    p.add_argument("--out", type=Path, required=True, help="output folder (resumed when it holds results)")
    p.add_argument("--steps", required=True, help="comma list of budgets (training steps), at least two")
    p.add_argument("--methods", default="methods", help="as speclora-bench quality --methods (default: every method)")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 (default 1)")
    p.add_argument("--rates-from", type=Path, default=None,
                   help="a quality matrix's folder: its chosen rates, and its finished cells at the scale's budget")
    p.add_argument("--rate", action="append", default=[], metavar="METHOD=LR",
                   help="a method's rate (repeatable), before --rates-from's choice")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a speclora fit option for every run (repeatable), e.g. model.regression_target=standard")
    p.add_argument("--tol", type=float, default=TOL, help="points of validation average a longer budget may gain")
    p.add_argument("--tasks", default=None, help="comma list replacing the scale's suite")
    p.add_argument("--backbone", default=None, help="default: the scale's")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--isolation", choices=quality.ISOLATIONS, default=None, help="default: the scale's")
    p.add_argument("--jobs", type=int, default=None, help="runs at once (default: the scale's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per run (default: the scale's)")
    p.add_argument("--run-timeout", type=float, default=None)
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds this invocation may run, as speclora-bench quality --deadline (exit 3: cells left)")
    p.add_argument("--retry-failed", action="store_true", help="run the failed cells again (default: kept)")
    p.add_argument("--dry-run", action="store_true", help="print the planned commands and stop")
    p.add_argument("--update-doc", type=Path, default=None, help="also splice the table into this markdown file")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "speclora-bench budget") -> int:
    argv = list(argv or [])
    args = _parser(prog).parse_args(argv)
    scale = scales.SCALES[args.scale]
    steps = parse_steps(args.steps)
    if args.seeds < 1:
        raise ValueError(f"--seeds={args.seeds}; allowed: an integer >= 1")
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    configs = scales.REPO_CONFIGS
    arms = scales.select_arms(args.methods, configs)
    source = args.rates_from.resolve() if args.rates_from else None
    rates = chosen_rates(source, arms, parse_rates(args.rate))
    sets = parse_sets(args.set)
    backbone = scale.backbone(out, args.backbone)
    suite = [get_task(t).name for t in quality._list(args.tasks)] if args.tasks else \
        scales.suite_tasks(scale.overlay(configs))
    make = scales.CellFactory(configs, backbone, args.data_dir, args.cache_dir)
    cells = budget_cells(scale, arms, steps, args.seeds, make, suite, rates, sets)
    if args.dry_run:
        for cell in cells:
            print(f"{cell.run_id}: speclora fit {shlex.join(cell.args)}")
        return 0
    check_sets(out, sets)
    if source is not None and sets:
        print(f"--set given: no cell of {source} is reused (its runs were made without it)", flush=True)
    elif source is not None:
        print(f"reused from {source}: {reuse(cells, source, out)} results of its matrix", flush=True)
    isolation = args.isolation or scale.isolation
    jobs = args.jobs or (scale.jobs if isolation != "inline" else 1)
    threads = args.threads if args.threads is not None else scale.threads
    plan = scales.Plan(tuple(cells), tuple(suite), (), {})
    if isolation != "inline" and jobs > 1:
        quality.warm_cache(plan, configs, scale, backbone, args.data_dir, args.cache_dir)
    own, validations = scales.scale_budget(scale.overlay(configs))
    deadline = None if args.deadline is None else Deadline(args.deadline, out, steps_of=lambda c: c.steps or own,
                                                           jobs=jobs)
    rows = quality.run_plan(plan, out, isolation=isolation, jobs=jobs, threads=threads,
                            conflict_batches=scale.conflict_batches, timeout=args.run_timeout,
                            retry_failed=args.retry_failed, progress=lambda s: print(s, flush=True),
                            what="budget probe", deadline=deadline)
    summary = summarise(cells, {r["run_id"]: r for r in rows}, own, args.tol)
    meta = {"scale": scale.name, "command": f"{prog} {shlex.join(argv)}", "machine": quality.machine(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "seeds": args.seeds,
            "validations": validations, "steps": list(steps), "set": shlex.join(sets),
            "rates": ", ".join(f"{a} {scales.fmt_rate(r) if r else 'configs'}" for a, r in rates.items())
            if rates else "each arm's configs' rate"}
    text = markdown(summary, steps, meta)
    (out / "budget.md").write_text(text + "\n")
    figure(summary, out / "budget.png")
    (out / "budget.json").write_text(json.dumps({"meta": meta, **summary}, indent=1, default=str))
    if args.update_doc is not None:
        quality.splice(args.update_doc, scale.name, text, kind="budget")
    print(text, flush=True)
    if deadline is not None and quality.pending(cells, out):
        print(deadline.summary(), flush=True)
        return INCOMPLETE  # cells left for the next invocation of the same command
    return 0 if summary["complete"] else 1
