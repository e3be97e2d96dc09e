"""What the performance benchmarks share: the device check, reproducible command lines, profiler counts.

- :func:`check_device`: a ``--device`` value that this machine has, or a ``ValueError`` naming the setting,
  the value and what the machine has (``--device cuda`` on a CPU-only machine fails at once).
- :func:`command`: the exact command line that reproduces one figure (the script's own argv, with the
  options that select that figure narrowed), written next to every figure of ``speclora-bench perf``.
- :func:`count_events`: per-step counts of a profiled region (``torch.profiler``): host reads (ops that
  make the host wait for the device: ``item``, ``nonzero``, ``unique``, ...), aten operator calls, leaf
  aten ops (≈ the kernels a CPU runs), and on a GPU the CUDA runtime's kernel launches and synchronisations.
  The optimizer's reads of its step counters (``torch.optim``'s ``_get_value``: one ``item()`` per parameter
  tensor per step) are not host reads: those counters live on the CPU on every device (AdamW without
  ``capturable``/``fused``), so on a GPU they wait for nothing. Telling them apart needs the Python stack,
  hence ``with_stack=True`` in :func:`profiler`.
"""

from __future__ import annotations

import contextlib
import os
import shlex
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

# aten ops whose result the host must read before going on: on a GPU each one is a synchronisation
# (a nested one, e.g. the nonzero inside a boolean-mask index, is counted once, at its outermost op)
HOST_READ_OPS = frozenset({
    "aten::_local_scalar_dense",  # .item(), float(t), bool(t), int(t)
    "aten::nonzero", "aten::masked_select",
    "aten::_unique", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
    "aten::unique_dim_consecutive",
    "aten::equal",
})
CUDA_LAUNCHES = frozenset({"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                           "cudaLaunchCooperativeKernel", "cudaGraphLaunch"})
CUDA_SYNCS = frozenset({"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"})
OPTIMIZER_COUNTER = "torch/optim/optimizer.py"  # the frame of ``_get_value``, the read of a CPU step counter


def machine_devices() -> str:
    """What this machine offers, in words, for error messages."""
    cpus = f"{os.cpu_count()} CPU cores"
    if not torch.cuda.is_available():
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return f"no CUDA device (torch {torch.__version__}, {built}); {cpus}"
    names = ", ".join(f"cuda:{i} = {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count()))
    return f"{torch.cuda.device_count()} CUDA device(s) ({names}); {cpus}"


def peak_rss_mib() -> float:
    """This process's peak resident set in MiB: VmHWM, which starts afresh at exec.

    Not ``getrusage().ru_maxrss``: Linux keeps that across execve, so a child started by a large parent (the
    perf run, holding models) would report the parent's resident set instead of its own.
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB


def check_device(value: str, option: str = "--device") -> torch.device:
    """``value`` as a torch.device this machine has; ValueError naming ``option``, the value and what is here."""
    try:
        device = torch.device(value)
    except RuntimeError as err:
        raise ValueError(f"{option}={value!r} is not a device name (allowed: cpu, cuda, cuda:N): {err}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"{option}={value!r}: allowed: cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"{option}={value!r}: this machine has {machine_devices()}; use {option} cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{option}={value!r}: this machine has {machine_devices()}")
    return device


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on a CPU), so that wall-clock times are the device's."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def with_options(argv: Sequence[str], **options: object) -> list[str]:
    """``argv`` with each ``--option`` (keyword with ``_`` for ``-``) set to the given value(s), appended if absent.

    A list value gives several arguments (``nargs="+"``); ``True`` a bare flag; ``None`` or ``False`` drops it.
    """
    out = list(argv)
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if flag in out:  # drop the flag and its values (up to the next option)
            i = out.index(flag)
            j = i + 1
            while j < len(out) and not (out[j].startswith("--") and len(out[j]) > 2):
                j += 1
            del out[i:j]
        if value is None or value is False:
            continue
        out.append(flag)
        if value is not True:
            out += [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]
    return out


def command(module: str, argv: Sequence[str], **options: object) -> str:
    """``python -m <module> <argv with options>``: the command line that reproduces a figure."""
    return shlex.join(["python", "-m", module, *with_options(argv, **options)])


def count_events(events: Iterable, steps: int) -> dict[str, float]:
    """Per-step counts of a profiled region of ``steps`` steps, from ``torch.profiler.profile().events()``.

    host_reads: outermost :data:`HOST_READ_OPS` calls (the optimizer's step counters aside); aten_ops: every aten call (nested ones included);
    leaf_ops: aten calls with no aten call inside (≈ kernels on a CPU); on a GPU also cuda_launches (runtime
    kernel launches) and cuda_syncs (runtime synchronisations, blocking copies included).
    """
    counts = {"host_reads": 0, "aten_ops": 0, "leaf_ops": 0, "cuda_launches": 0, "cuda_syncs": 0}
    cuda_seen = False
    for e in events:
        name = e.name
        if name.startswith("aten::"):
            counts["aten_ops"] += 1
            if not any(c.name.startswith("aten::") for c in e.cpu_children):
                counts["leaf_ops"] += 1
            if name in HOST_READ_OPS and not _inside(e, HOST_READ_OPS) and not _optimizer_counter(e):
                counts["host_reads"] += 1
        elif name in CUDA_LAUNCHES:
            counts["cuda_launches"] += 1
            cuda_seen = True
        elif name in CUDA_SYNCS:
            counts["cuda_syncs"] += 1
            cuda_seen = True
    if not cuda_seen:
        del counts["cuda_launches"], counts["cuda_syncs"]
    return {k: v / steps for k, v in counts.items()}


def _optimizer_counter(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if OPTIMIZER_COUNTER in parent.name and parent.name.endswith(": _get_value"):
            return True
        parent = parent.cpu_parent
    return False


def _inside(event, names: frozenset[str]) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in names:
            return True
        parent = parent.cpu_parent
    return False


def profiler(device: torch.device | str):
    """A torch.profiler for :func:`count_events`: CPU ops (and CUDA on a GPU), with Python stacks."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.device(device).type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    return profile(activities=activities, with_stack=True)


def profile_steps(step: Callable[[], object], steps: int, device: torch.device | str) -> dict[str, float]:
    """Run ``step`` ``steps`` times under :func:`profiler`; :func:`count_events` per step."""
    with profiler(device) as prof:
        for _ in range(steps):
            step()
    return count_events(prof.events(), steps)


def record(table: str, labels: dict[str, object], figures: dict[str, float | int | None], command: str,
           failures: dict[str, str] | None = None) -> dict[str, object]:
    """One row of the perf report: what was measured (labels), the numbers, the command that reproduces them.

    A figure that is None is left out (not measured); a figure that is not a finite number moves to
    ``failures`` with its value, so that every figure of a report is a finite number.
    """
    failures = dict(failures or {})
    kept: dict[str, float | int] = {}
    for name, value in figures.items():
        if value is None:
            continue
        value = float(value) if not isinstance(value, int | bool) else int(value)
        if value != value or value in (float("inf"), float("-inf")):
            failures.setdefault(name, f"not a finite number ({value})")
        else:
            kept[name] = value
    return {"table": table, "labels": labels, "figures": kept, "failures": failures, "command": command}
