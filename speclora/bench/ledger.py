"""The ledger of a matrix run in slices (``--deadline``): ``results/<scale>/<what>/``, tracked in the repository.

A slice runs on a device lent for one call (.ci/gpu-matrix): it starts from the ledger (every finished cell is
skipped), and what it finishes comes back and is added to the ledger here (.ci/gpu-collect), so that the next
slice, in any later session, goes on from there. The ledger keeps results only, and its runs compressed, as
the tree that travels to the device is limited (64 MiB with the data and backbone); what a reader wants is
beside the archive, as plain files:

    results/<scale>/<what>/runs.tar.xz     runs/<run id>/{cell.json, result.json, interrupted.json, spectral.npz}
    results/<scale>/<what>/results.md      the tables (quality: redrawn here from every run of the ledger)
    results/<scale>/<what>/...             plan.json, meta.json, results.csv, plots/*.png; budget: budget.{md,json,png}

    python -m speclora.bench.ledger unpack LEDGER DEST      # the ledger's runs into DEST/runs (a matrix folder)
    python -m speclora.bench.ledger collect SLICE LEDGER     # a slice's runs into the ledger; tables redrawn
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

ARCHIVE = "runs.tar.xz"
RUN_FILES = ("cell.json", "result.json", "interrupted.json", "spectral.npz")  # what a run keeps
TOP_FILES = ("plan.json", "meta.json", "set.json", "budget.md", "budget.json", "budget.png")
REPORT_FILES = ("results.md", "results.csv")  # quality: redrawn from the whole ledger, with plots/*.png


def unpack(ledger: Path, dest: Path) -> int:
    """Write the ledger's runs under ``dest/runs`` and its top files into ``dest``; return the finished runs."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = ledger / ARCHIVE
    if archive.is_file():
        with tarfile.open(archive, "r:xz") as tar:
            tar.extractall(dest, filter="data")
    for name in TOP_FILES:
        if (ledger / name).is_file():
            shutil.copy2(ledger / name, dest / name)
    return len(list(dest.glob("runs/*/result.json")))


def pack(folder: Path, archive: Path) -> None:
    """``folder/runs/*/<RUN_FILES>`` into ``archive``, in name order with neutral owners and times (the same runs
    give the same archive)."""
    tmp = archive.with_suffix(".tmp")
    with tarfile.open(tmp, "w:xz") as tar:
        for path in sorted((folder / "runs").glob("*/*")):
            if path.name not in RUN_FILES or not path.is_file():
                continue
            info = tarfile.TarInfo(str(path.relative_to(folder)))
            data = path.read_bytes()
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    tmp.replace(archive)


def collect(slice_dir: Path, ledger: Path) -> dict[str, int]:
    """Add the runs of ``slice_dir`` (a matrix folder a slice ran in) to ``ledger``: a run the slice has replaces
    the ledger's (its result, or its interrupted.json, whichever it has now). Then the archive is rewritten and,
    for a quality matrix, the tables are redrawn from every run. Returns counts of runs."""
    if not (slice_dir / "runs").is_dir():
        raise FileNotFoundError(f"{slice_dir / 'runs'} not found: expected the folder a slice ran in "
                                "(.ci/gpu-matrix writes it as $OUT/quality or $OUT/budget)")
    ledger.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        before = unpack(ledger, work)
        copied = 0
        for run in sorted((slice_dir / "runs").glob("*/")):
            target = work / "runs" / run.name
            if target.exists():
                shutil.rmtree(target)
            target.mkdir(parents=True)
            for name in RUN_FILES:
                if (run / name).is_file():
                    shutil.copy2(run / name, target / name)
            copied += 1
        for name in TOP_FILES:
            if (slice_dir / name).is_file():
                shutil.copy2(slice_dir / name, work / name)
                shutil.copy2(slice_dir / name, ledger / name)
        pack(work, ledger / ARCHIVE)
        after = len(list(work.glob("runs/*/result.json")))
        if (work / "meta.json").is_file() and (work / "plan.json").is_file():  # a quality matrix: its tables
            from speclora.bench.quality import report

            report(work)
            for name in REPORT_FILES:
                shutil.copy2(work / name, ledger / name)
            if (work / "plots").is_dir():
                (ledger / "plots").mkdir(exist_ok=True)
                for png in (work / "plots").glob("*.png"):
                    shutil.copy2(png, ledger / "plots" / png.name)
    return {"copied": copied, "finished_before": before, "finished": after}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m speclora.bench.ledger", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    u = sub.add_parser("unpack", help="the ledger's runs into a matrix folder")
    u.add_argument("ledger", type=Path)
    u.add_argument("dest", type=Path)
    c = sub.add_parser("collect", help="a slice's runs into the ledger")
    c.add_argument("slice", type=Path)
    c.add_argument("ledger", type=Path)
    args = parser.parse_args(argv)
    if args.command == "unpack":
        print(f"{args.ledger}: {unpack(args.ledger, args.dest)} finished runs into {args.dest}")
    else:
        n = collect(args.slice, args.ledger)
        print(f"{args.ledger}: {n['copied']} runs of the slice copied; finished runs {n['finished_before']} -> "
              f"{n['finished']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
