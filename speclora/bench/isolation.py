"""``speclora-bench isolation``: the same cells of the quality matrix with ``--isolation process`` and with
``--isolation pool``, in one invocation (same jobs, threads, backbone and tokenised cache): the wall time of
each, their ratio, the start-up a pool saves per cell, and whether every measure of every result.json agrees.

    speclora-bench isolation --scale smoke --out /tmp/iso --jobs 2 --seeds 1        # every arm and group
    speclora-bench isolation --scale smoke --out /tmp/iso --methods independent,speclora --tasks rte,stsb \\
        --no-fewshot --no-single

The cells run at their configs' learning rates (no search). The runs go to OUT/process and OUT/pool (a
rerun skips finished cells like any matrix, so time with a fresh OUT), the figures to OUT/isolation.json.
Compared: every key of result.json and every array of spectral.npz, except what is a time or a place
(:data:`NOT_COMPARED`: start and end, fit and test seconds, peak memory, curves of seconds, the command's
output folder).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from speclora.bench import quality
from speclora.bench import quality_scales as scales
from speclora.bench.quality_pool import CellPool
from speclora.bench.quality_worker import RESULT, SPECTRAL_FILE

NOT_COMPARED = ("started", "finished", "fit_seconds", "test_seconds", "wall_seconds", "jobs", "peak_rss_mib", "peak_cuda_mib", "traceback")


def comparable(result: dict[str, Any], out: Path) -> dict[str, Any]:
    """A result without its times and places: what must not depend on how the cell was isolated."""
    keep = {k: v for k, v in result.items() if k not in NOT_COMPARED}
    if isinstance(keep.get("command"), str):
        keep["command"] = keep["command"].replace(str(out), "OUT")
    if isinstance(keep.get("curves"), dict):
        keep["curves"] = {tag: v for tag, v in keep["curves"].items() if not tag.endswith("seconds")}
    return keep


def differences(run_id: str, a: Path, b: Path) -> list[str]:
    """What differs between the results of ``run_id`` under the output folders ``a`` and ``b`` (empty: equal)."""
    import numpy as np

    ra = comparable(json.loads((a / "runs" / run_id / RESULT).read_text()), a)
    rb = comparable(json.loads((b / "runs" / run_id / RESULT).read_text()), b)
    out = [f"{run_id}: {k}" for k in sorted(set(ra) | set(rb)) if json.dumps(ra.get(k)) != json.dumps(rb.get(k))]
    sa, sb = a / "runs" / run_id / SPECTRAL_FILE, b / "runs" / run_id / SPECTRAL_FILE
    if sa.is_file() != sb.is_file():
        out.append(f"{run_id}: {SPECTRAL_FILE} written by one only")
    elif sa.is_file():
        with np.load(sa) as x, np.load(sb) as y:
            out += [f"{run_id}: {SPECTRAL_FILE}[{k}]" for k in sorted(set(x.files) | set(y.files))
                    if k not in x.files or k not in y.files or not np.array_equal(x[k], y[k], equal_nan=True)]
    return out


def _parser(prog: str = "speclora-bench isolation") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(scales.SCALES), default="smoke")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--methods", default="all", help="as speclora-bench quality --methods")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--tasks", default=None, help="comma list replacing the scale's suite")
    p.add_argument("--no-fewshot", action="store_true")
    p.add_argument("--no-single", action="store_true")
    p.add_argument("--one-task", default=None, help="tasks of the single-task case, comma list ('' for none)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, the same for both")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: the scale's)")
    p.add_argument("--backbone", default=None, help="default: the scale's")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--order", default="process,pool", help="which isolation runs first (the machine may change)")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "speclora-bench isolation") -> int:
    args = _parser(prog).parse_args(argv)
    scale = scales.SCALES[args.scale]
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    order = [s.strip() for s in args.order.split(",")]
    if sorted(order) != ["pool", "process"]:
        raise ValueError(f"--order={args.order!r}; allowed: process,pool or pool,process")
    configs = scales.REPO_CONFIGS
    backbone = scale.backbone(out, args.backbone)
    threads = args.threads if args.threads is not None else scale.threads
    tasks = quality._list(args.tasks)
    one_task = None if args.one_task is None else tuple(quality._list(args.one_task))
    plan = scales.plan_matrix(scale, scales.select_arms(args.methods, configs), args.seeds, configs, backbone,
                              args.data_dir, args.cache_dir, fewshot=not args.no_fewshot, one_task=one_task,
                              suite=tasks, reference=not args.no_single)
    quality.warm_cache(plan, configs, scale, backbone, args.data_dir, args.cache_dir)  # neither pays for it
    figures: dict[str, Any] = {"command": "speclora-bench isolation " + " ".join(argv or []),
                               "machine": quality.machine(), "cells": len(plan.cells), "jobs": args.jobs,
                               "threads": threads}
    for isolation in order:
        where = out / isolation
        timings: dict[str, float] = {}
        load = os.getloadavg()[0]
        start = time.perf_counter()
        with contextlib.ExitStack() as stack:
            pool = stack.enter_context(CellPool(args.jobs, where / quality.POOL_LOGS, threads)) \
                if isolation == "pool" else None
            rows = quality.run_plan(plan, where, isolation=isolation, jobs=args.jobs, threads=threads,
                                    conflict_batches=scale.conflict_batches, timings=timings, pool=pool,
                                    progress=lambda s: print(s, flush=True))
        figures[isolation] = {
            "wall_seconds": time.perf_counter() - start, "cells_run": len(timings),
            "mean_cell_seconds": sum(timings.values()) / max(1, len(timings)),
            "ok": sum(r["status"] == "ok" for r in rows), "load_average": [load, os.getloadavg()[0]],
            "worker_startup_seconds": pool.startup_seconds if pool is not None else None}
    diffs = [d for cell in plan.cells for d in differences(cell.run_id, out / "process", out / "pool")]
    proc, pool_ = figures["process"], figures["pool"]
    figures.update(ratio=proc["wall_seconds"] / pool_["wall_seconds"],
                   saved_per_cell_seconds=proc["mean_cell_seconds"] - pool_["mean_cell_seconds"],
                   equal_cells=len(plan.cells) - len({d.split(":")[0] for d in diffs}), differences=diffs)
    (out / "isolation.json").write_text(json.dumps(figures, indent=1))
    starts = pool_["worker_startup_seconds"] or []
    print(f"{len(plan.cells)} cells of the {scale.name} scale, {args.jobs} at a time, torch threads {threads}; "
          f"{figures['machine']}")
    for name in order:
        f = figures[name]
        print(f"{name:8s} wall {f['wall_seconds']:7.1f} s, a cell {f['mean_cell_seconds']:5.1f} s on average, "
              f"{f['ok']} ok; 1-min load {f['load_average'][0]:.1f} -> {f['load_average'][1]:.1f}")
    print(f"process / pool wall time: {figures['ratio']:.2f}; start-up saved per cell "
          f"{figures['saved_per_cell_seconds']:.1f} s; a pool worker's start-up "
          f"{(sum(starts) / len(starts)) if starts else float('nan'):.1f} s, paid {len(starts)} times")
    print(f"results equal in every compared measure: {figures['equal_cells']} of {len(plan.cells)} cells"
          + ("" if not diffs else "; differing: " + ", ".join(diffs[:20])))
    return 0 if not diffs else 1
