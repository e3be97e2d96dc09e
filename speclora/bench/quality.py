"""``speclora-bench quality``: the seed paper's comparison (Tables 5, 6, 7), measured in one command.

    speclora-bench quality --scale smoke --out runs/bench-smoke            # CI: tiny random encoder, minutes
    speclora-bench quality --scale cpu --out runs/bench-cpu                # default backbone, ~9 h on 2 cores
    speclora-bench quality --scale gpu --out runs/bench-gpu                # full offline suite, one GPU
    speclora-bench quality --scale smoke --methods independent,speclora --seeds 2 --out DIR
    speclora-bench report --out DIR                                        # redraw tables and figures

Every method of the harness (and the Table 7 ablations) runs on the same backbone, data, budget and seeds,
each cell through :func:`speclora.cli.main` (``speclora fit`` then ``speclora test``) with the same config
layering (speclora.bench.quality_scales). First each method's learning rate is chosen on the validation
split from a small grid, seed 0 or --search-seeds N, widened past an end of the grid where the best rate lies there
(speclora.bench.quality_search); then every seed runs at the chosen rate.
A cell whose ``OUT/runs/<run>/result.json`` exists is skipped, so an interrupted matrix resumes where it
stopped and a second run of the same command runs nothing (``--retry-failed`` reruns the failed ones).
``--deadline SECONDS`` runs a slice that ends on time (speclora.bench.quality_deadline; exit code 3 while
cells are left): how the `gpu` matrix runs on a GPU lent a few minutes at a time (.ci/gpu-matrix). Outputs:

    OUT/results.csv   one line per run (role: matrix or lr search; method, seed, rate, task scores, average, costs)
    OUT/results.md    the tables (speclora.bench.report), with the command, machine and date
    OUT/plots/*.png   the figures (speclora.bench.quality_figures), also in OUT/tensorboard
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from speclora.bench import quality_scales as scales
from speclora.bench import quality_search as search
from speclora.bench.quality_deadline import INCOMPLETE, Deadline
from speclora.bench.quality_pool import CellPool
from speclora.bench.quality_run import (
    ISOLATIONS,
    POOL_LOGS,
    collect_rows,
    pending,
    run_plan,
    subset_of,
)
from speclora.bench.quality_scales import Plan
from speclora.tasks import get_task

PLAN = "plan.json"
META = "meta.json"


def warm_cache(plan: Plan, configs: Path, scale: scales.Scale, backbone: str, data_dir: str | None,
               cache_dir: str | None) -> None:
    """Tokenise every split the matrix reads once, before several runs at once would each do it."""
    import yaml

    from speclora.data.datamodule import MultiTaskDataModule

    seen = set()
    for cell in plan.cells:
        few = cell.group.startswith("fewshot")
        key = (few, subset_of(cell) if few else None)
        if key in seen:
            continue
        seen.add(key)
        overlay = yaml.safe_load(scale.overlay(configs, few).read_text())
        subset = json.loads(key[1]) if key[1] else None
        tasks = list(subset) if subset else list(plan.suite)
        dm = MultiTaskDataModule(tasks=tasks, data_dir=data_dir, tokenizer=backbone, subset=subset,
                                 max_length=overlay.get("data", {}).get("max_length", 128), cache_dir=cache_dir)
        dm.prepare_data()


# ---------------------------------------------------------------------- reporting
def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, Python "
            f"{platform.python_version()}, torch {torch.__version__}")


def report(out: Path, update_doc: Path | None = None) -> Path:
    """Write results.csv, results.md, the figures and TensorBoard from the results in ``out``."""
    from speclora.bench.quality_figures import write_figures
    from speclora.bench.report import markdown, write_csv
    from speclora.bench.report_measures import MEASURES

    if not (out / META).is_file():  # written when `quality` ends; a matrix still running has none
        raise FileNotFoundError(f"{out / META} not found: run `speclora-bench quality` with --out {out} to its end")
    plan = Plan.from_json(json.loads((out / PLAN).read_text()))
    meta = json.loads((out / META).read_text())
    rows = collect_rows(plan.cells, out)
    search = collect_rows(plan.search, out)
    in_matrix = {r["run_id"] for r in rows}
    extra = [{**r, "role": "lr search"} for r in search if r["run_id"] not in in_matrix]  # rates not chosen
    write_csv(rows + extra, out / "results.csv")
    tables = markdown(rows, plan.to_json(), meta, search)
    figures = write_figures(rows, plan.to_json(), out, tables, search)
    figure_lines = [f"- `{p.relative_to(out)}`" for p in figures]
    none = "none (matplotlib is not installed: pip install 'speclora[bench]')"
    doc = tables + "\n### Figures (under the output folder; also in its `tensorboard/`)\n\n" + (
        "\n".join(figure_lines) if figure_lines else none) + "\n"
    (out / "results.md").write_text(f"# Quality matrix: {meta['scale']}\n\n{doc}\n{MEASURES}")
    if update_doc is not None:
        splice(update_doc, meta["scale"], doc)
    return out / "results.md"


def splice(path: Path, scale: str, text: str, kind: str = "quality") -> None:
    """Replace the text between ``<!-- <kind>:<scale>:start -->`` and ``...:end -->`` in ``path`` (append if absent)."""
    start, end = f"<!-- {kind}:{scale}:start -->", f"<!-- {kind}:{scale}:end -->"
    block = f"{start}\n{text.strip()}\n{end}"
    doc = path.read_text() if path.is_file() else ""
    if start in doc and end in doc:
        doc = doc[:doc.index(start)] + block + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    path.write_text(doc)


# ---------------------------------------------------------------------- the command
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="speclora-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quality", help="run (or resume) the quality matrix and write its tables")
    q.add_argument("--scale", choices=sorted(scales.SCALES), required=True)
    q.add_argument("--out", type=Path, required=True, help="output folder (resumed when it holds results)")
    q.add_argument("--methods", default="all",
                   help="comma list of arms: all (default), methods, ablations, or names such as "
                        "independent,speclora,speclora/no_coordination, or a variant speclora/<x> "
                        "(configs/methods/speclora_<x>.yaml, e.g. speclora/legacy); single always runs (ITR/IC "
                        "reference) unless --no-single")
    q.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default: the scale's)")
    q.add_argument("--lr-grid", default=None,
                   help="learning rates each LoRA method is tried at, seed 0, chosen on validation (default: the "
                        "scale's, 3e-4,1e-3,3e-3; full_ft keeps its own 2e-5,5e-5,1e-4); 'none': every arm at its "
                        "configs' rate, no search")
    q.add_argument("--search-seeds", type=int, default=None, help="seeds per rate of the search (default: the scale's, 1)")
    q.add_argument("--lr-widen", type=int, default=None,
                   help="rates the search may add past an end of a method's grid while its best rate is at that end "
                        "(default: the scale's, 2; smoke: 0); 0: the grid is fixed")
    q.add_argument("--backbone", default=None, help="default: the scale's (smoke: a tiny random BERT built "
                                                    "under OUT/backbone; cpu, gpu: 'default', all-MiniLM-L6-v2)")
    q.add_argument("--data-dir", default=None, help="folder holding glue/ and superglue/ (default: $SPECLORA_DATA)")
    q.add_argument("--cache-dir", default=None, help="tokenised-split cache (default: $SPECLORA_CACHE or ~/.cache/speclora)")
    q.add_argument("--configs", type=Path, default=scales.REPO_CONFIGS, help="the configs/ folder")
    q.add_argument("--tasks", default=None, help="comma list replacing the scale's suite (a quicker check)")
    q.add_argument("--fewshot-tasks", default=None,
                   help="comma list replacing the few-shot candidates (default: qnli,boolq; mnli, qqp, record "
                        "need their official dev sets in the data folder)")
    q.add_argument("--no-fewshot", action="store_true", help="skip the few-shot setting")
    q.add_argument("--no-single", action="store_true",
                   help="skip the single-task reference cells (no ITR, IC): a comparison between arms only")
    q.add_argument("--one-task", default=None, help="tasks of the single-task case, comma list ('' for none)")
    q.add_argument("--isolation", choices=ISOLATIONS, default=None, help="inline: cells in this process; process: "
                   "a process per cell; pool: --jobs workers running many cells each (default: the scale's)")
    q.add_argument("--jobs", type=int, default=None, help="runs at once (process, pool; default: the scale's)")
    q.add_argument("--threads", type=int, default=None, help="torch CPU threads per run (default: the scale's)")
    q.add_argument("--run-timeout", type=float, default=None, help="seconds before a run (process, pool) is killed")
    q.add_argument("--deadline", type=float, default=None,
                   help="seconds this invocation may run: no cell starts that would not end in time, running ones "
                        "are stopped at the end and rerun next time; exit code 3 while cells are left (run the "
                        "same command again). For a device lent by the call (speclora.bench.quality_deadline)")
    q.add_argument("--retry-failed", action="store_true", help="rerun cells whose result says failed")
    q.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoints (default: delete)")
    q.add_argument("--dry-run", action="store_true", help="print the planned commands and stop")
    q.add_argument("--update-doc", type=Path, default=None,
                   help="also splice the tables into this markdown file (e.g. docs/results.md)")
    r = sub.add_parser("report", help="redraw the tables and figures of an output folder")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--update-doc", type=Path, default=None)
    return parser


def budget(overlay: Path) -> str:
    """The budget a scale overlay sets, in words (for the report's header)."""
    import yaml

    cfg = yaml.safe_load(overlay.read_text()) or {}
    trainer, data = cfg.get("trainer") or {}, cfg.get("data") or {}

    def cap(key: str) -> str:
        value = data.get(key, "default")
        return "all" if value is None else str(value)

    return (f"{trainer.get('max_steps', '?')} steps of batch {data.get('batch_size', '?')}, length "
            f"{data.get('max_length', '?')}, validation every {trainer.get('val_check_interval', '?')} steps, "
            f"train examples per task: {cap('max_train_per_task')}, eval examples per entry: "
            f"{cap('max_eval_per_task')} (`{overlay.parent.name}/{overlay.name}`)")


def _list(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def _grid(args: argparse.Namespace, scale: scales.Scale) -> tuple[float, ...] | None:
    if args.lr_grid is None:
        return scale.lr_grid
    return None if args.lr_grid.strip().lower() == "none" else search.parse_grid(args.lr_grid)


def quality(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Search each arm's learning rate (seed 0, validation), then run the matrix at the chosen rates; return the
    number of cells left without a result (a deadline's; 0 when the matrix is complete)."""
    scale = scales.SCALES[args.scale]
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    configs = args.configs.resolve()
    arms = scales.select_arms(args.methods, configs)
    grid = _grid(args, scale)
    seeds = args.seeds if args.seeds is not None else scale.seeds
    isolation = args.isolation or scale.isolation
    jobs = args.jobs or (scale.jobs if isolation != "inline" else 1)
    threads = args.threads if args.threads is not None else scale.threads
    backbone = scale.backbone(out, args.backbone)
    one_task = None if args.one_task is None else tuple(_list(args.one_task))
    suite = [get_task(t).name for t in _list(args.tasks)] if args.tasks else scales.suite_tasks(scale.overlay(configs))
    make = scales.CellFactory(configs, backbone, args.data_dir, args.cache_dir)
    search_seeds = args.search_seeds or scale.search_seeds
    widen = scale.lr_widen if args.lr_widen is None else args.lr_widen
    if widen < 0:
        raise SystemExit(f"--lr-widen={widen}; allowed: an integer >= 0 (0: the grid is fixed)")

    def rows_of(cells: Sequence[scales.Cell]) -> dict[str, dict[str, Any]]:
        """Run id -> result (or a ``missing`` row) of each cell, from the folder."""
        return {r["run_id"]: r for r in collect_rows(cells, out)}

    def widened(cells: Sequence[scales.Cell]) -> tuple[scales.Cell, ...]:
        """The search with the rates past an end of a grid that the finished runs call for."""
        return search.widened(cells, rows_of, grid, widen,
                              lambda arm, lr: search.rate_cells(scale, make, arm, lr, suite, search_seeds))

    searched = widened(search.search_cells(scale, arms, grid, make, suite, not args.no_single, search_seeds)
                       if grid else ())

    def plan_at(lrs: dict[str, float | None] | None) -> Plan:
        return scales.plan_matrix(scale, arms, seeds, configs, backbone, args.data_dir, args.cache_dir,
                                  fewshot=not args.no_fewshot, one_task=one_task, suite=suite,
                                  fewshot_tasks=_list(args.fewshot_tasks), lrs=lrs, reference=not args.no_single)

    def settled_cells(cells: Sequence[scales.Cell]) -> tuple[scales.Cell, ...]:
        """The matrix cells of the arms whose search is over (none of its runs, widened ones included, left to
        run), at their chosen rates; none while no arm's search is running."""
        waiting = {c.arm for c in pending(cells, out, args.retry_failed)}
        if not waiting:
            return ()
        return tuple(c for c in plan_at(search.rates(arms, search.choose(cells, rows_of(cells)))).cells
                     if search.tuned_arm(c.arm) not in waiting)

    def matrix() -> Plan:
        """The matrix at the rates the search chose (from the search results on disk)."""
        choices = search.choose(searched, rows_of(searched))
        return dataclasses.replace(plan_at(search.rates(arms, choices)), search=searched,
                                   lr_choice={a: c.to_json() for a, c in choices.items()})

    if args.dry_run:
        for cell in searched:
            print(f"[lr search] {cell.run_id}: speclora fit {shlex.join(cell.args)}")
        if pending(searched, out):
            print((f"then up to {widen} more rates past an end of a grid for each method whose best rate is there; "
                   if widen else "") + f"then {len(plan_at(None).cells)} matrix cells at the rates the search "
                  "chooses (its seed-0 cells are search runs)")
        else:
            plan = matrix()
            for cell in plan.cells:
                print(f"{cell.run_id}: speclora fit {shlex.join(cell.args)}")
            for key, why in plan.skipped.items():
                print(f"{key}: {why}")
        return 0
    start, load = time.perf_counter(), os.getloadavg()[0]
    todo = len(pending(searched, out, args.retry_failed))
    deadline = None
    if args.deadline is not None:  # a cell's steps: its own (a budget probe's), else its overlay's
        steps = {few: scales.scale_budget(scale.overlay(configs, few))[0] for few in (False, True)}
        deadline = Deadline(args.deadline, out, steps_of=lambda c: c.steps or steps[c.group.startswith("fewshot")],
                            jobs=jobs)
    several = isolation != "inline" and jobs > 1  # tokenise before several runs at once would each do it
    if several:
        warm_cache(Plan(searched, tuple(suite), (), {}) if searched else matrix(), configs, scale, backbone,
                   args.data_dir, args.cache_dir)
    with contextlib.ExitStack() as stack:
        # pool: the same workers run the search and the matrix (each starts when it gets its first cell)
        pool = stack.enter_context(CellPool(jobs, out / POOL_LOGS, threads)) if isolation == "pool" else None
        run_kw = dict(isolation=isolation, jobs=jobs, threads=threads, conflict_batches=scale.conflict_batches,
                      retry_failed=args.retry_failed, keep_checkpoints=args.keep_checkpoints,
                      timeout=args.run_timeout, progress=lambda s: print(s, flush=True), pool=pool,
                      deadline=deadline)
        while searched:
            # while some methods' searches run (a widening round), the matrix cells of the methods whose rate is
            # chosen run beside them, after them in the queue: no worker waits on a round of a few search runs
            early = settled_cells(searched)
            if several and early:
                warm_cache(Plan(early, tuple(suite), (), {}), configs, scale, backbone, args.data_dir, args.cache_dir)
            todo += len(pending(early, out, args.retry_failed))
            run_plan(Plan((*searched, *early), tuple(suite), (), {}), out, **run_kw, what="learning-rate search" + (
                f" and {len(early)} matrix cells of the methods whose rate is chosen" if early else ""))
            if deadline is not None and pending(searched, out):  # the matrix's rates are not chosen yet
                print(deadline.summary(), flush=True)
                return len(pending((*searched, *early), out))
            wider = widened(searched)
            if len(wider) == len(searched):
                break
            print("learning-rate search widened past an end of a grid: " + ", ".join(
                f"{c.run_id}" for c in wider[len(searched):]), flush=True)
            todo += len(wider) - len(searched)
            searched = wider
        plan = matrix()
        for arm, choice in plan.lr_choice.items():
            print(f"learning rate of {arm}: {search.fmt_lr(choice['lr'])} {choice['note']}".rstrip(), flush=True)
        (out / PLAN).write_text(json.dumps(plan.to_json(), indent=1))
        todo += len(pending(plan.cells, out, args.retry_failed))
        if several:
            warm_cache(plan, configs, scale, backbone, args.data_dir, args.cache_dir)
        run_plan(plan, out, **run_kw)
    left = pending(plan.cells, out)  # cells still without a result: a deadline left them
    label = ("smoke run on a tiny random encoder: checks the pipeline, NOT a quality result"
             if scale.name == "smoke" else "")
    meta = {"scale": scale.name, "label": label, "command": "speclora-bench " + shlex.join(argv),
            "machine": machine(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "backbone": backbone if scale.tiny_backbone is False or args.backbone else
            "tiny random BERT (2 layers, hidden 32, built under OUT/backbone/tiny-bert)",
            "seeds": seeds, "isolation": isolation, "jobs": jobs, "threads": threads or "torch default",
            "lr_grid": list(grid) if grid else None, "search_seeds": search_seeds, "lr_widen": widen if grid else 0,
            "budget": budget(scale.overlay(configs)), "fewshot_budget": budget(scale.overlay(configs, True)),
            **wall_time(time.perf_counter() - start, todo - len(left), (load, os.getloadavg()[0]))}
    (out / META).write_text(json.dumps(meta, indent=1))
    path = report(out, args.update_doc)
    print(f"tables: {path}", flush=True)
    if deadline is not None and deadline.deferred:
        print(deadline.summary(), flush=True)
    return len(left)


def wall_time(seconds: float, ran: int, load: tuple[float, float]) -> dict[str, Any]:
    """This invocation's wall time, the cells it ran, and the machine's 1-minute load average at its start and
    end (a shared machine). The matrix's own wall time is computed from the runs (report.py)."""
    return {"this_invocation_seconds": seconds, "this_invocation_ran": ran, "load_average": list(load),
            "this_invocation": f"{seconds / 60:.1f} min, {ran} cells run; 1-min load average {load[0]:.1f} at "
                               f"its start, {load[1]:.1f} at its end"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["perf"], ["isolation"], ["budget"]):  # speclora.bench.<command>, each with its own parser:
        import importlib  # the performance report, process vs pool isolation, the budget a scale needs

        return importlib.import_module(f"speclora.bench.{argv[0]}").main(argv[1:], prog=f"speclora-bench {argv[0]}")
    args = _parser().parse_args(argv)
    if args.command == "quality":
        if quality(args, argv) and args.deadline is not None:
            return INCOMPLETE  # cells left for the next invocation of the same command
    else:
        print(f"tables: {report(args.out.resolve(), args.update_doc)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
