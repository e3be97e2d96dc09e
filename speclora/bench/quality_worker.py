"""One cell of the quality matrix: ``speclora fit`` then ``speclora test`` on the best checkpoint, measured.

The run goes through :func:`speclora.cli.main`, the very entry point of the ``speclora`` command, with the
cell's arguments; nothing of the training is re-implemented here. Around it this file measures what the
tables need and writes ``RUN_DIR/result.json`` (written last, atomically: its presence means "done"):

- test scores per task (the mean of its entries, :func:`speclora.metrics.task_scores`) and the suite average,
  of the checkpoint with the best ``val/average`` (early stopping on validation, seed paper §4.1);
- trainable parameters (``SpecLoRAModule.trainable_parameters``), fit wall time, steps, peak memory
  (CUDA: ``max_memory_allocated``; CPU: the process's peak resident set, reset before the fit);
- the validation and loss curves, and the spectral scalars, read back from the run's TensorBoard events;
- the gradient-conflict rate (:func:`measure_conflict`) and, for the spectral method, its final spectrum and
  coordination matrix (``RUN_DIR/spectral.npz``).

A failing run writes a result with ``status: failed`` and the error, so that the tables report it.

    python -m speclora.bench.quality_worker RUN_DIR      # runs RUN_DIR/cell.json (process isolation)

(``pool`` isolation runs :func:`run_cell` in long-lived workers instead: speclora.bench.quality_pool.)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import sys
import time
import traceback
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from speclora.bench.quality_scales import Cell

RESULT = "result.json"
CELL = "cell.json"
SPECTRAL_FILE = "spectral.npz"
_CURVE_PREFIXES = ("val/", "train/loss", "train/spectral/")


# ---------------------------------------------------------------------- memory
def reset_peak_memory() -> None:
    """Start a fresh peak: CUDA's allocator statistics and Linux's VmHWM (``/proc/self/clear_refs`` = 5)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mib() -> float:
    """Peak resident set of this process since the last reset (VmHWM), else since its start (ru_maxrss)."""
    try:
        match = re.search(r"VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
        if match:
            return int(match.group(1)) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------- gradient conflict
def shared_weights(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The encoder's attention projection weights W (query, key, value, output): the weights every method
    adapts, and every task's forward uses (task t runs W + ΔW_t), whatever wraps them (speclora's LoRA layer
    ``.base``, peft's ``.base_layer``, mtLoRA's block ``.base``)."""
    from speclora.model.lora import DEFAULT_TARGETS, matches_target

    encoder = module.encoder
    targets = DEFAULT_TARGETS.get(encoder.config.model_type, ())
    out = []
    for name, sub in encoder.named_modules():
        if not isinstance(sub, nn.Linear):
            continue
        plain = ".".join(p for p in name.split(".") if p not in ("base", "base_layer"))
        if any(matches_target(plain, t) for t in targets):
            out.append((name + ".weight", sub.weight))
    if not out:
        raise ValueError(f"no attention projection of {targets} found in the encoder "
                         f"({encoder.config.model_type}); cannot measure gradient conflicts")
    return out


def measure_conflict(module, batches: list[dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """Per-task gradients on a few training batches, and how often task pairs point against each other.

    g_t = Σ_batches n_t,b ∇ L_t,b  (task t's mean loss on its rows of batch b, raw: no method's gradient
    surgery, no extra loss), in evaluation mode (no dropout), at the tested weights. Two measures:

    - ``rate`` on the shared weights W of the attention projections (:func:`shared_weights`): the one space
      every method shares (for per-task adapters ∇_W L_t is the gradient on task t's effective weight), so
      this is comparable across methods;
    - ``trainable_rate`` on the trainable coordinates (heads excluded) that at least two tasks' gradients
      touch; None when there is none (per-task adapters share no trainable coordinate).

    rate = #{i < j : cos(g_i, g_j) < 0} / (T(T−1)/2) (:func:`speclora.metrics.conflict_rate`), over the tasks
    seen in the batches; ``mean_cos`` the mean pairwise cosine.
    """
    from speclora.metrics import conflict_rate

    weights = shared_weights(module)
    heads = {id(p) for p in module.heads.parameters()}
    shared_ids = {id(p) for _, p in weights}
    trainable = [p for p in module.parameters() if p.requires_grad and id(p) not in heads and id(p) not in shared_ids]
    frozen = [p for _, p in weights if not p.requires_grad]
    was_training = module.training
    module.to(device).eval()
    for p in frozen:
        p.requires_grad_(True)
    params = [p for _, p in weights] + trainable
    n_w = sum(p.numel() for _, p in weights)
    T = len(module.specs)
    grads = torch.zeros(T, sum(p.numel() for p in params), device=device)  # (T, P)
    seen = torch.zeros(T, dtype=torch.bool)
    try:
        for batch in batches:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            outputs = module(batch)
            items = [(t, o) for t, o in outputs.items() if o.loss is not None]
            for i, (t, out) in enumerate(items):
                g = torch.autograd.grad(out.loss * len(out.examples), params, retain_graph=i < len(items) - 1,
                                        allow_unused=True)
                grads[t] += torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1)
                                       for x, p in zip(g, params)])  # (P,)
                seen[t] = True
    finally:
        for p in frozen:
            p.requires_grad_(False)
        module.train(was_training)
    idx = seen.nonzero().flatten().tolist()
    result: dict[str, Any] = {"tasks_seen": len(idx), "batches": len(batches), "shared_weights": n_w,
                              "rate": None, "mean_cos": None, "trainable_rate": None, "trainable_coords": 0}
    if len(idx) < 2:
        return result
    G = grads[idx]  # (T', P)
    W = G[:, :n_w]  # (T', P_W)
    result["rate"] = conflict_rate(W)
    result["mean_cos"] = _mean_cos(W)
    rest = G[:, n_w:]  # (T', P_trainable)
    touched = (rest != 0).sum(0) >= 2  # (P_trainable,) coordinates two or more tasks move
    result["trainable_coords"] = int(touched.sum())
    if result["trainable_coords"] > 0:
        result["trainable_rate"] = conflict_rate(rest[:, touched])
    return result


def _mean_cos(G: Tensor) -> float:
    """Mean of cos(g_i, g_j) over task pairs i < j; G: (T, P)."""
    unit = G / G.norm(dim=1, keepdim=True).clamp_min(1e-30)  # (T, P)
    cos = unit @ unit.T  # (T, T)
    i, j = torch.triu_indices(G.shape[0], G.shape[0], offset=1)
    return float(cos[i, j].mean())


# ---------------------------------------------------------------------- logs
def read_scalars(log_dir: str | Path, prefixes: tuple[str, ...] = _CURVE_PREFIXES) -> dict[str, list[list[float]]]:
    """Every scalar whose tag starts with one of ``prefixes`` from a run's TensorBoard events: tag -> [[step, v]].

    Lightning logs a training batch, and a validation run after it, at the batch's 0-based index; the step
    returned is the number of optimizer steps done by then (logged step + 1): validation every 5 steps
    reads 5, 10, 15, ...
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags().get("scalars", []):
        if tag.startswith(prefixes):
            out[tag] = [[int(e.step) + 1, float(e.value)] for e in acc.Scalars(tag)]
    return out


def spectral_snapshot(trainer, run_dir: Path) -> dict[str, Any] | None:
    """The spectral callback's final eigenvalues and coordination matrix ρ, saved to ``spectral.npz``."""
    import numpy as np

    from speclora.spectral.callback import SpectralGraphCallback
    from speclora.spectral.visual import correlation_matrix

    cb = next((c for c in trainer.callbacks if isinstance(c, SpectralGraphCallback)), None)
    if cb is None or cb.layout is None or cb.corr is None:
        return None
    layout = cb.layout
    R = correlation_matrix(cb.corr.rho().detach().cpu(), cb.edge_index.cpu(), layout.num_nodes)  # (n, n)
    arrays = {"rho": R.numpy(), "node_task": layout.node_task.numpy(), "node_layer": layout.node_layer.numpy(),
              "node_module": layout.node_module.numpy(), "node_kind": layout.node_kind.numpy()}
    for c, values in enumerate(cb.values):
        if values is not None:
            arrays[f"eigenvalues_class{c}"] = values.detach().cpu().double().numpy()
    np.savez_compressed(run_dir / SPECTRAL_FILE, **arrays)
    return {"file": SPECTRAL_FILE, "num_nodes": layout.num_nodes, "classes": len(cb.values),
            "modules": list(layout.modules), "counters": dict(cb.counters),
            "edge_kinds": list(cb.edge_kinds),
            "edges": {kind: int(stats["num_edges"]) for kind, stats in getattr(cb, "_graph_stats", {}).items()}}


# ---------------------------------------------------------------------- one cell
@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2) to ``path`` for a while."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with path.open("ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def write_cell_spec(run_dir: Path, cell: Cell, threads: int | None, conflict_batches: int,
                    keep_checkpoints: bool) -> None:
    """``run_dir/cell.json``: what a worker process runs (``process`` and ``pool`` isolation)."""
    (run_dir / CELL).write_text(json.dumps({"cell": cell.to_json(), "threads": threads,
                                            "conflict_batches": conflict_batches,
                                            "keep_checkpoints": keep_checkpoints}, indent=1))


def _cell_fields(cell: Cell) -> dict[str, Any]:
    return {"run_id": cell.run_id, "group": cell.group, "arm": cell.arm, "seed": cell.seed, "tasks": list(cell.tasks)}


def _base_result(cell: Cell) -> dict[str, Any]:
    return {**_cell_fields(cell), "status": "failed", "error": None,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def failed_result(cell: Cell | None, run_dir: Path, error: str, trace: str) -> dict[str, Any]:
    """The result of a cell that did not finish (its worker died, timed out, or it raised past run_cell)."""
    fields = _cell_fields(cell) if cell is not None else {"run_id": run_dir.name}  # None: cell.json unreadable
    return {**fields, "status": "failed", "error": error, "traceback": trace}


def log_tail(path: Path, chars: int = 2000) -> str:
    """The last ``chars`` characters of a log ("" where it cannot be read)."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def write_result(run_dir: Path, result: dict[str, Any]) -> None:
    """Write ``result.json`` atomically (a half-written file never looks like a finished run)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (RESULT + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, allow_nan=True))
    os.replace(tmp, run_dir / RESULT)


def run_cell(cell: Cell, run_dir: Path, threads: int | None = None, conflict_batches: int = 4,
             keep_checkpoints: bool = False) -> dict[str, Any]:
    """Fit, test and measure one cell; write and return its result (status ``ok`` or ``failed``)."""
    from speclora.cli import main
    from speclora.metrics import task_scores

    result = _base_result(cell)
    run_dir.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    common = [*cell.args, "--trainer.default_root_dir", str(run_dir), "--trainer.enable_progress_bar", "false",
              "--trainer.enable_model_summary", "false"]
    result["command"] = "speclora fit " + " ".join(_quote(a) for a in common)
    try:
        reset_peak_memory()
        start = time.perf_counter()
        fit = main(["fit", *common])
        result["fit_seconds"] = time.perf_counter() - start
        trainer = fit.trainer
        result["peak_rss_mib"] = peak_rss_mib()
        result["peak_cuda_mib"] = (torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None)
        result["device"] = str(trainer.strategy.root_device)
        result["steps"] = int(trainer.global_step)
        result["params"] = fit.model.trainable_parameters()
        ckpt_cb = trainer.checkpoint_callback
        best = ckpt_cb.best_model_path if ckpt_cb is not None else ""
        last = Path(ckpt_cb.dirpath) / "last.ckpt" if ckpt_cb is not None else None
        score = ckpt_cb.best_model_score if ckpt_cb is not None else None
        result["val_best"] = float(score) if score is not None else None
        if best:
            ckpt, result["tested_checkpoint"] = best, "best"
        elif last is not None and last.is_file():  # val/average was never finite: no best checkpoint
            ckpt, result["tested_checkpoint"] = str(last), "last"
        else:
            raise RuntimeError("the fit wrote no checkpoint to test")
        log_dir = trainer.log_dir
        result["spectral"] = spectral_snapshot(trainer, run_dir)
        device = trainer.strategy.root_device
        del fit, trainer  # free the fit's model and data before the test builds its own

        start = time.perf_counter()
        tested = main(["test", *common, "--ckpt_path", ckpt])
        result["test_seconds"] = time.perf_counter() - start
        metrics = {k: float(v) for k, v in tested.trainer.callback_metrics.items() if k.startswith("test/")}
        entries = {k.split("/")[1]: v for k, v in metrics.items() if k.endswith("/score")}
        result["entries"] = entries
        result["scores"] = task_scores(entries, tested.model.specs)
        result["average"] = metrics.get("test/average", float("nan"))
        dm = tested.datamodule
        # the first training batches of the seed's mixing order: the same for every method at a seed
        batches = [b for _, b in zip(range(conflict_batches), dm.train_dataloader())]
        result["conflict"] = measure_conflict(tested.model, batches, device)
        del tested, dm, batches
        result["curves"] = read_scalars(log_dir)
        result["status"] = "ok"
    except (Exception, SystemExit) as err:  # the cell fails (a CLI parse error exits), the matrix goes on
        result["status"] = "failed"
        result["error"] = f"{type(err).__name__}: {err}"
        result["traceback"] = traceback.format_exc()[-4000:]
    finally:
        if not keep_checkpoints:
            for f in run_dir.rglob("*.ckpt"):
                f.unlink(missing_ok=True)
    result["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_result(run_dir, result)
    return result


def _quote(arg: str) -> str:
    return arg if re.fullmatch(r"[\w./=:@+-]+", arg) else "'" + arg.replace("'", "'\\''") + "'"


def main(argv: list[str] | None = None) -> int:
    """``python -m speclora.bench.quality_worker RUN_DIR``: run the cell described by RUN_DIR/cell.json."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m speclora.bench.quality_worker RUN_DIR", file=sys.stderr)
        return 2
    run_dir = Path(argv[0])
    spec = json.loads((run_dir / CELL).read_text())
    result = run_cell(Cell.from_json(spec["cell"]), run_dir, spec.get("threads"), spec.get("conflict_batches", 4),
                      spec.get("keep_checkpoints", False))
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
