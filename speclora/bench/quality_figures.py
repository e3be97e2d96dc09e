"""The figures of the quality matrix, as PNG and PDF files under OUT/plots (matplotlib, speclora.bench.plots) and
in TensorBoard under OUT/tensorboard.

    scores_main.png, scores_fewshot.png, scores_ablations.png   per-task test scores by method (mean ± std)
    curves.png           val/average and train/loss over steps, mean over seeds with a ± std band
    lr_search.png        the learning-rate search: val/average over steps of each method at each rate (seed 0)
    spectrum.png         the spectral method's final eigenvalues (Table 3 bands) and gradient energy per band
    coordination.png     its coordination matrix ρ with the dendrogram of its hierarchical clustering

TensorBoard gets the same images, the averaged curves as margin charts (mean with its ± std band) and the
markdown tables as text.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from speclora.bench import plots
from speclora.bench import quality_stats as qs
from speclora.bench.quality_scales import METHOD_ARMS, SPECTRAL, fmt_rate
from speclora.bench.quality_worker import SPECTRAL_FILE
from speclora.bench.report import score_table, task_label
from speclora.spectral.filters import TABLE2_EDGES, TABLE3_EDGES

log = logging.getLogger(__name__)
Row = Mapping[str, Any]


def averaged_curves(rows: Sequence[Row], group: str, arms: Sequence[str], tag: str) -> dict[str, tuple[list, list, list]]:
    """arm -> (steps, mean, std) of a logged scalar over the arm's ok runs."""
    out = {}
    for arm in arms:
        curves = [(r.get("curves") or {}).get(tag) for r in qs.ok(qs.select(rows, group, arm))]
        curves = [c for c in curves if c]
        if curves:
            out[arm] = qs.mean_curve(curves)
    return out


def band_energy(rows: Sequence[Row]) -> dict[str, tuple[float, float]]:
    """Mean ± std share of the gradient energy per Table 2 band, over classes, logged steps and seeds."""
    edges = [0.0, *TABLE2_EDGES]
    names = [f"<= {edges[1]:g}"] + [f"({edges[i]:g}, {edges[i + 1]:g}]" for i in range(1, len(edges) - 1)]
    names += [f"> {edges[-1]:g}", "beyond lambda_k"]
    values: dict[str, list[float]] = {n: [] for n in names}
    pattern = re.compile(r"train/spectral/class\d+/energy_(band(\d+)|beyond_k)$")
    for r in qs.ok(qs.select(rows, "main", SPECTRAL)):
        for tag, curve in (r.get("curves") or {}).items():
            m = pattern.match(tag)
            if m:
                name = names[int(m.group(2))] if m.group(2) is not None else names[-1]
                values[name] += [v for _, v in curve]
    return {n: (s.mean, s.std if s.n > 1 else 0.0) for n in names if (s := qs.mean_std(values[n])).n}


def _spectral_run(rows: Sequence[Row], out: Path) -> tuple[Row, Path] | None:
    """The first ok main-group speclora run (lowest seed) that saved its spectrum."""
    for r in sorted(qs.ok(qs.select(rows, "main", SPECTRAL)), key=lambda r: r["seed"]):
        path = out / "runs" / r["run_id"] / SPECTRAL_FILE
        if path.is_file():
            return r, path
    return None


def search_curves(search_rows: Sequence[Row]) -> list[tuple[str, str, dict[str, tuple[list, list, list]]]]:
    """One panel per searched method: its val/average curve at each rate of its grid (seed 0)."""
    panels: dict[str, dict[str, tuple[list, list, list]]] = {}
    for r in sorted(qs.ok(qs.select(search_rows, "main")), key=lambda r: r.get("lr") or 0.0):
        curve = (r.get("curves") or {}).get("val/average")
        if curve and r.get("lr") is not None:
            panels.setdefault(r["arm"], {})[f"lr {fmt_rate(r['lr'])}"] = qs.mean_curve([curve])
    order = [a for a in METHOD_ARMS if a in panels] + [a for a in panels if a not in METHOD_ARMS]
    return [(f"{arm}: val/average by rate", "val/average", panels[arm]) for arm in order]


def write_figures(rows: Sequence[Row], plan: Mapping[str, Any], out: Path, tables_md: str,
                  search_rows: Sequence[Row] = ()) -> list[Path]:
    """Draw every figure the results allow; returns the PNG and PDF paths (none without matplotlib)."""
    images: dict[str, np.ndarray] = {}
    written: list[Path] = []
    folder = out / "plots"
    suite, few = list(plan["suite"]), list(plan["fewshot_tasks"])
    main_arms = qs.arms_of(rows, "main")
    methods = [a for a in METHOD_ARMS if a in main_arms]
    ablations = [a for a in main_arms if "/" in a]
    curves = {
        "val/average": averaged_curves(rows, "main", methods, "val/average"),
        "train/loss": averaged_curves(rows, "main", methods, "train/loss"),
    }
    if plots.available():
        cols = [task_label(t) for t in suite] + ["Average"]

        def relabel(numbers):
            return {a: {task_label(t) if t != "Average" else t: v for t, v in d.items()} for a, d in numbers.items()}

        _, numbers = score_table(rows, "main", methods, suite, "single")
        images["scores_main"] = plots.scores_chart(folder / "scores_main.png", cols, list(numbers),
                                                   relabel(numbers), "test score per task (main suite)")
        if ablations:
            _, numbers = score_table(rows, "main", [SPECTRAL, *ablations], suite, None)
            images["scores_ablations"] = plots.scores_chart(folder / "scores_ablations.png", cols, list(numbers),
                                                            relabel(numbers), "ablations of the spectral method")
        if few and qs.select(rows, "fewshot"):
            few_arms = [a for a in METHOD_ARMS if a in qs.arms_of(rows, "fewshot")]
            _, numbers = score_table(rows, "fewshot", few_arms, few, "fewshot_single")
            images["scores_fewshot"] = plots.scores_chart(
                folder / "scores_fewshot.png", [task_label(t) for t in few] + ["Average"], list(numbers),
                relabel(numbers), "few-shot test score per task")
        panels = [(tag, tag, series) for tag, series in curves.items() if series]
        if panels:
            images["curves"] = plots.curves_chart(folder / "curves.png", panels)
        searched = search_curves(search_rows)
        if searched:
            images["lr_search"] = plots.curves_chart(folder / "lr_search.png", searched)
        found = _spectral_run(rows, out)
        if found is not None:
            run, path = found
            data = np.load(path)
            eig = [data[k] for k in sorted(data.files) if k.startswith("eigenvalues_class")]
            images["spectrum"] = plots.spectrum_chart(folder / "spectrum.png", eig, TABLE3_EDGES, band_energy(rows),
                                                      f"final Laplacian eigenvalues ({run['run_id']})")
            images["coordination"] = plots.coordination_chart(
                folder / "coordination.png", data["rho"], data["node_task"], data["node_layer"],
                [task_label(t) for t in run["tasks"]], f"coordination rho between LoRA matrices ({run['run_id']})")
        written = [path for name in images for path in plots.outputs(folder / f"{name}.png")]
    else:
        log.warning("matplotlib is not installed (pip install 'speclora[bench]'): no figures")
    _tensorboard(out / "tensorboard", images, curves, tables_md)
    return written


def _tensorboard(folder: Path, images: Mapping[str, np.ndarray], curves: Mapping[str, Mapping[str, tuple]],
                 tables_md: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    try:
        for name, image in images.items():
            writer.add_image(f"quality/{name}", image, 0, dataformats="HWC")
        layout: dict[str, dict[str, list]] = {}
        for tag, series in curves.items():
            for arm, (steps, mean, std) in series.items():
                base = f"curves/{tag}/{arm}"
                for s, m, sd in zip(steps, mean, std):
                    writer.add_scalar(f"{base}/mean", m, int(s))
                    writer.add_scalar(f"{base}/lower", m - sd, int(s))
                    writer.add_scalar(f"{base}/upper", m + sd, int(s))
                layout.setdefault(f"quality {tag}", {})[arm] = ["Margin", [f"{base}/mean", f"{base}/lower", f"{base}/upper"]]
        if layout:
            writer.add_custom_scalars(layout)
        writer.add_text("quality/tables", tables_md, 0)
    finally:
        writer.close()
