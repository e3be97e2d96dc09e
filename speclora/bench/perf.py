"""``speclora-bench perf``: one performance report on any device, every figure with the command that reproduces it.

    speclora-bench perf [--device cuda|cpu] [--out DIR] [--deadline SECONDS]   # also python -m speclora.bench.perf
    speclora-bench perf --quick --out DIR       # tiny random encoder, few steps: checks the pipeline (the tests)

Sections, in this order, each with its own time limit (``--limit NAME=SECONDS``), in this process:

1. ``eigensolver`` (speclora.bench.eigensolver): a size sweep of parameter-shaped graphs for the dense /
   LOBPCG crossover on the device, then parameter-shaped and random graphs at sizes by device (cuda: 10⁴, 10⁵,
   10⁶; cpu: 10³, 10⁴, 10⁵), k = 32: cold solve time, iterations, residual, orthonormality; warm refresh
   (perturbed graph, warm start from the cold vectors); dense eigh where feasible.
2. ``throughput`` (speclora.bench.throughput): training step of the default suite and backbone, independent vs
   shared vs plain peft LoRA (one adapter) vs independent under ``model.compile`` (mode default; on cuda also
   reduce-overhead, CUDA graphs); batch 32 and 256 on cuda (8 and 32 on cpu), fp32 / TF32 / bf16
   autocast on cuda; ms/step, samples/s, and per steady-state step the host reads, aten ops and (cuda) kernel
   launches and synchronisations counted by torch.profiler.
3. ``overhead`` (speclora.bench.spectral_overhead): paired step-time ratio with / without the spectral callback
   on the same batches (ABBA rounds), and the callback's own share of the step.
4. ``methods`` (speclora.bench.methods): every method's step time, peak memory, trainable parameters (and
   per-step counts) relative to `independent`.

The report, ``OUT/perf.json`` and ``OUT/perf.md`` (OUT: ``--out``, else ``$OUT``, else runs/perf), holds the
device, the versions (torch, CUDA, lightning, transformers, peft, torch-geometric), the date and each figure
with its command; it is rewritten after every figure, so a run that is stopped leaves what it measured. A
section that fails or runs out of time is reported as such and the next one starts. ``--deadline`` bounds
the whole run (default with ``--device cuda``: 480 s, for the GPU machine's ~9 minutes); the sections'
limits shrink in proportion when it is short. ``--device cuda`` on a machine without CUDA fails at once.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import os
import platform
import shlex
import signal
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from speclora.bench import code_commit, name_and_positive

SCALES = ("full", "tiny")
CUDA_DEADLINE = 480.0  # seconds: the GPU machine's run leaves ~9 minutes, its set-up included
MIN_LIMIT = 5.0  # seconds: a section with less than this left is skipped


@dataclass(frozen=True)
class Section:
    """One part of the report: ``module``'s ``run(parse_args(argv), emit)`` for each argv, under one time limit."""

    name: str
    title: str
    module: str
    limit_s: float
    argvs: tuple[tuple[str, ...], ...]


def plan(device: str, scale: str, backbone: str, data_dir: str | None) -> list[Section]:
    """The sections and their settings for a device (``cuda...`` or ``cpu``) and scale (full, tiny)."""
    cuda = device.startswith("cuda")
    data = ("--backbone", backbone) + (("--data-dir", data_dir) if data_dir else ())
    eig = ("--device", device, "--eigsh-max", "0")
    if scale == "tiny":
        eigen = [(*eig, "--graph", "param", "--sizes", "64", "128", "256", "512", "--k", "4", "--dense-max", "512"),
                 (*eig, "--graph", "param", "random", "--sizes", "200", "400", "--k", "4", "--dense-max", "400")]
        throughput = (*data, "--device", device, "--variants", "independent", "shared", "peft", "independent-compiled",
                      "--compile-backend", "eager", "--batch-sizes", "4",  # eager backend: the pipeline, fast
                      "--precisions", "fp32", "--steps", "2", "--rounds", "1", "--count", "--count-steps", "1")
        overhead = (*data, "--accelerator", "gpu" if cuda else "cpu", "--steps", "3", "--rounds", "2",
                    "--batch-size", "8")
        methods = (*data, "--device", device, "--methods", "independent", "shared", "--steps", "2",
                   "--count-steps", "1", "--batch-size", "8", "--isolation", "inline")
        limits = (60, 120, 120, 120)
    elif cuda:
        eigen = [(*eig, "--graph", "param", "--sizes", "500", "1000", "2000", "4000", "8000", "--k", "32",
                  "--dense-max", "8000"),
                 (*eig, "--graph", "param", "random", "--sizes", "10000", "100000", "1000000", "--k", "32",
                  "--dense-max", "10000")]
        throughput = (*data, "--device", device, "--variants", "independent", "shared", "peft", "independent-compiled",
                      "independent-cudagraphs", "--batch-sizes", "32", "256", "--precisions", "fp32", "tf32", "bf16",
                      "--steps", "10", "--rounds", "3", "--count")
        overhead = (*data, "--accelerator", "gpu", "--steps", "16", "--rounds", "2")
        methods = (*data, "--device", device, "--steps", "5", "--count-steps", "2", "--isolation", "inline")
        limits = (150, 300, 90, 120)  # throughput: two compiled variants (each compiles at its first batch)
    else:
        eigen = [(*eig, "--graph", "param", "--sizes", "128", "256", "512", "1024", "2048", "--k", "32",
                  "--dense-max", "2048", "--threads", "1"),
                 (*eig, "--graph", "param", "random", "--sizes", "1000", "10000", "100000", "--k", "32",
                  "--dense-max", "2000", "--threads", "1")]
        throughput = (*data, "--device", device, "--variants", "independent", "shared", "peft", "independent-compiled",
                      "--batch-sizes", "8", "32", "--precisions", "fp32", "--steps", "3", "--rounds", "2", "--count",
                      "--count-steps", "1")
        overhead = (*data, "--accelerator", "cpu", "--steps", "6", "--rounds", "2")
        methods = (*data, "--device", device, "--steps", "4", "--count-steps", "1")
        limits = (420, 600, 420, 1200)
    return [
        Section("eigensolver", "Eigensolver scaling (k smallest Laplacian eigenpairs)", "speclora.bench.eigensolver",
                limits[0], tuple(tuple(a) for a in eigen)),
        Section("throughput", "Training-step throughput", "speclora.bench.throughput", limits[1], (throughput,)),
        Section("overhead", "Spectral overhead (paired, same batches)", "speclora.bench.spectral_overhead",
                limits[2], (overhead,)),
        Section("methods", "Cost per method", "speclora.bench.methods", limits[3], (methods,)),
    ]


# ---------------------------------------------------------------------- time limits
class SectionTimeout(BaseException):
    """A section ran past its limit (BaseException: no ``except Exception`` inside a section swallows it)."""


class Terminated(BaseException):
    """SIGTERM (e.g. from ``timeout``): the report is written with what was measured, then the run ends."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`SectionTimeout` in this (main) thread after ``seconds`` (SIGALRM; between Python bytecodes)."""

    def alarm(signum, frame):
        raise SectionTimeout(f"time limit of {seconds:.0f} s reached")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def section_limit(sections: Sequence[Section], overrides: dict[str, float], remaining: float | None,
                   index: int) -> float:
    """The limit of ``sections[index]``: its own (or ``--limit``), shrunk so that the later ones keep their share.

    limit_i = L_i · min(1, remaining / Σ_{j ≥ i} L_j), L the sections' limits, remaining the deadline's rest.
    """
    own = [overrides.get(s.name, s.limit_s) for s in sections]
    if remaining is None:
        return own[index]
    return own[index] * min(1.0, remaining / sum(own[index:]))


# ---------------------------------------------------------------------- the report
def versions() -> dict[str, str]:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda or "none (CPU build of torch)"}
    if torch.cuda.is_available():
        out["cudnn"] = str(torch.backends.cudnn.version())
    for name in ("lightning", "transformers", "peft", "torch_geometric"):
        try:
            out[name] = importlib.import_module(name).__version__
        except ImportError:
            out[name] = "not installed"
    out["speclora commit"] = code_commit()
    return out


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        d = torch.device(device)
        props = torch.cuda.get_device_properties(d)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), {os.cpu_count()} CPU cores"
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"CPU: {model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


class Report:
    """The report's state; :meth:`write` rewrites ``perf.json`` and ``perf.md`` from it.

    threads: the run's ``--threads``; every command then starts with ``OMP_NUM_THREADS=N`` (torch's threads at
    start-up), so that it measures under the same setting.
    """

    def __init__(self, out: Path, meta: dict[str, Any], threads: int | None = None) -> None:
        self.out = out
        self.meta = meta
        self.prefix = f"OMP_NUM_THREADS={threads} " if threads is not None else ""
        self.sections: list[dict[str, Any]] = []

    def begin(self, section: Section, limit: float) -> None:
        self.sections.append({"name": section.name, "title": section.title, "status": "running",
                              "limit_s": round(limit, 1), "elapsed_s": 0.0, "message": "", "records": []})
        self.write()

    def add(self, record: dict[str, Any]) -> None:
        self.sections[-1]["records"].append({**record, "command": self.prefix + record["command"]})
        self.write()

    def end(self, status: str, elapsed: float, message: str = "") -> None:
        self.sections[-1].update(status=status, elapsed_s=round(elapsed, 1), message=message)
        self.write()

    def skip(self, section: Section, why: str) -> None:
        self.sections.append({"name": section.name, "title": section.title, "status": "skipped", "limit_s": 0.0,
                              "elapsed_s": 0.0, "message": why, "records": []})
        self.write()

    def to_json(self) -> dict[str, Any]:
        return {**self.meta, "load average (end)": load_average(), "sections": self.sections}

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        data = self.to_json()
        (self.out / "perf.json").write_text(json.dumps(data, indent=1))
        (self.out / "perf.md").write_text(markdown(data))


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1000:
        return f"{int(value):,}"
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.2e}"


def markdown(data: dict[str, Any]) -> str:
    """The report as markdown: header, then per section its status and a table per kind of record."""
    lines = [f"# speclora performance report ({data['device']})", ""]
    if data.get("label"):
        lines += [f"**{data['label']}**", ""]
    lines += [f"- device: {data['device name']}", f"- date: {data['date']}", f"- command: `{data['command']}`",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()),
              f"- load average (1, 5, 15 min) at start: {data['load average (start)']}, at the end: "
              f"{data['load average (end)']}", ""]
    for sec in data["sections"]:
        lines += [f"## {sec['title']}", "", f"status: **{sec['status']}**"
                  + (f" ({sec['message']})" if sec["message"] else "")
                  + f"; time limit {sec['limit_s']:.0f} s, took {sec['elapsed_s']:.0f} s", ""]
        tables: dict[str, list[dict]] = {}
        for rec in sec["records"]:
            tables.setdefault(rec["table"], []).append(rec)
        for name, recs in tables.items():
            lines += _table(name, recs)
    return "\n".join(lines) + "\n"


def _table(name: str, records: list[dict[str, Any]]) -> list[str]:
    labels = list(dict.fromkeys(k for r in records for k in r["labels"]))
    figures = list(dict.fromkeys(k for r in records for k in r["figures"]))
    failed = any(r["failures"] for r in records)
    commands = list(dict.fromkeys(r["command"] for r in records))
    head = labels + figures + (["failures"] if failed else []) + ["command"]
    out = [f"### {name}", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(labels)
           + " ---: |" * len(figures) + (" --- |" if failed else "") + " --- |"]
    for r in records:
        cells = [_fmt(r["labels"].get(k, "")) for k in labels]
        cells += [_fmt(r["figures"][k]) if k in r["figures"] else "–" for k in figures]
        if failed:
            cells.append("; ".join(f"{k}: {v}" for k, v in r["failures"].items()).replace("|", "/")
                         .replace("\n", " ")[:300])
        cells.append(f"[{commands.index(r['command']) + 1}]")
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "Commands:", ""] + [f"{i}. `{c}`" for i, c in enumerate(commands, 1)] + [""]
    return out


# ---------------------------------------------------------------------- the run
def run_section(section: Section, report: Report, limit: float) -> None:
    """Run one section under its time limit; its records go to the report as they come, its end status too."""
    start = time.monotonic()
    report.begin(section, limit)
    print(f"[perf] {section.name}: limit {limit:.0f} s", flush=True)
    module = importlib.import_module(section.module)
    try:
        with time_limit(limit):
            for argv in section.argvs:
                module.run(module.parse_args(list(argv)), report.add)
        status, message = "ok", ""
    except SectionTimeout as err:
        status, message = "timed out", f"{err}; the figures above were measured before"
    except Exception as err:  # a failed section is reported, and the next one runs
        status, message = "failed", f"{type(err).__name__}: {err}"
        traceback.print_exc()
    except SystemExit as err:  # a module's parser rejected its arguments
        status, message = "failed", f"arguments rejected (exit {err.code})"
    except Terminated as err:
        report.end("interrupted", time.monotonic() - start, f"{err}; the figures above were measured before")
        raise
    report.end(status, time.monotonic() - start, message)
    print(f"[perf] {section.name}: {status} after {time.monotonic() - start:.0f} s {message}", flush=True)
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _parse_limits(items: Sequence[str], names: Sequence[str], parser: argparse.ArgumentParser) -> dict[str, float]:
    limits = {}
    for item in items:
        name, seconds = name_and_positive(item)
        if name not in names or seconds is None:
            parser.error(f"--limit {item!r}: expected NAME=SECONDS with NAME in {', '.join(names)} and SECONDS > 0")
        limits[name] = seconds
    return limits


def parser(prog: str = "speclora-bench perf") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: $OUT if set, else runs/perf)")
    p.add_argument("--scale", choices=SCALES, default="full", help="full, or tiny (= --quick)")
    p.add_argument("--quick", action="store_true", help="tiny random encoder, few steps (checks the pipeline)")
    p.add_argument("--deadline", type=float, default=None,
                   help=f"seconds for the whole run (default: {CUDA_DEADLINE:.0f} on cuda, none on cpu)")
    p.add_argument("--sections", nargs="+", default=None, help="run only these: eigensolver throughput overhead "
                                                               "methods")
    p.add_argument("--limit", action="append", default=[], metavar="NAME=SECONDS", help="a section's time limit")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (and OMP_NUM_THREADS of child processes); default: 1 for tiny, else torch's")
    p.add_argument("--backbone", default=None, help="default: 'default' (all-MiniLM-L6-v2); tiny: a random BERT "
                                                    "built under OUT/backbone")
    p.add_argument("--data-dir", default=None, help="folder holding glue/ and superglue/ (default: $SPECLORA_DATA)")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python -m speclora.bench.perf") -> int:
    import torch

    from speclora.bench import measure

    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser(prog)
    args = p.parse_args(argv)
    scale = "tiny" if args.quick else args.scale
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        measure.check_device(device)
    except ValueError as err:
        p.error(str(err))
    if args.deadline is not None and not args.deadline > 0:
        p.error(f"--deadline={args.deadline}: expected a number of seconds > 0")
    out = (args.out or Path(os.environ.get("OUT") or "runs/perf")).resolve()
    backbone = args.backbone
    if backbone is None:
        if scale == "tiny":
            from speclora.bench.quality_scales import build_tiny_backbone

            backbone = build_tiny_backbone(out / "backbone" / "tiny-bert")
        else:
            backbone = "default"
    sections = plan(device, scale, backbone, args.data_dir)
    names = [s.name for s in sections]
    if args.sections:
        unknown = sorted(set(args.sections) - set(names))
        if unknown:
            p.error(f"--sections {' '.join(unknown)}: unknown; allowed: {', '.join(names)}")
        sections = [s for s in sections if s.name in args.sections]
    limits = _parse_limits(args.limit, names, p)
    threads = args.threads if args.threads is not None else (1 if scale == "tiny" else None)
    if threads is not None and threads < 1:
        p.error(f"--threads={threads}: expected an integer >= 1")
    deadline = args.deadline if args.deadline is not None else (CUDA_DEADLINE if device.startswith("cuda") else None)
    saved = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    try:
        if threads is not None:
            torch.set_num_threads(threads)  # a tiny model on a loaded 2-core machine: 1 thread is ~10x faster
            os.environ["OMP_NUM_THREADS"] = str(threads)  # the child processes of the methods section
        meta = {"title": "speclora performance report", "device": device, "device name": device_name(device),
                "scale": scale, "label": ("tiny random encoder, few steps: checks the pipeline, NOT a performance "
                                          "result" if scale == "tiny" else ""),
                "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "command": f"{prog} {shlex.join(argv)}",
                "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores",
                "versions": versions(), "backbone": backbone, "deadline_s": deadline,
                "load average (start)": load_average()}
        return run_sections(sections, limits, deadline, Report(out, meta, threads))
    finally:
        torch.set_num_threads(saved[0])
        if saved[1] is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved[1]


def run_sections(sections: Sequence[Section], limits: dict[str, float], deadline: float | None,
                 report: Report) -> int:
    """Run the sections in turn within the deadline; 0, or 143 after a SIGTERM (the report is written either way)."""
    start = time.monotonic()

    def terminate(signum, frame):
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        for i, section in enumerate(sections):
            remaining = None if deadline is None else deadline - (time.monotonic() - start)
            limit = section_limit(sections, limits, remaining, i)
            if limit < min(MIN_LIMIT, section_limit(sections, limits, None, i)):  # shrunk by the deadline
                report.skip(section, f"no time left before the deadline of {deadline:.0f} s")
                continue
            run_section(section, report, limit)
    except Terminated as err:
        print(f"[perf] interrupted ({err}); report: {report.out / 'perf.md'}", flush=True)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"[perf] report: {report.out / 'perf.md'} and {report.out / 'perf.json'} "
          f"({time.monotonic() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
