"""The figures of the quality tables, drawn with matplotlib and written as PNG and PDF.

    scores_figure         per-task test scores by method: grouped bars, mean ± std over seeds
    curves_figure         training curves averaged over seeds, a ± std band around each mean
    spectrum_figure       the final Laplacian eigenvalues (coloured by the paper's Table 3 band) and the
                          gradient energy per Table 2 band
    coordination_figure   the coordination matrix ρ: by task and layer, and in hierarchical-clustering order
                          under its dendrogram (scipy.cluster.hierarchy, average linkage on 1 − |ρ|)

Each ``*_figure`` returns a matplotlib ``Figure`` to restyle or save elsewhere (rcParams and style sheets
apply: ``with matplotlib.style.context("seaborn-v0_8-paper"): fig = scores_figure(...)``). Each ``*_chart``
draws its figure and writes ``path`` (PNG) and ``path`` with suffix ``.pdf``, and returns the PNG as an
(H, W, 3) uint8 array for TensorBoard's ``add_image``. matplotlib is the ``bench`` extra; :func:`available`
says whether it is installed (without it the runner writes the tables and no figure). No pyplot state is used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CMAP_RHO = "RdBu_r"  # ρ = −1 blue, 0 white, +1 red
BAND_CMAP = "viridis"


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def save(fig: Figure, path: Path) -> np.ndarray:
    """Write ``fig`` to ``path`` (PNG) and ``path.with_suffix('.pdf')``; returns the PNG's (H, W, 3) pixels."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path.with_suffix(".png"))
    fig.savefig(path.with_suffix(".pdf"))
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()  # (H, W, 3) uint8


def outputs(path: Path) -> list[Path]:
    """The files a ``*_chart`` call with ``path`` writes."""
    return [Path(path).with_suffix(".png"), Path(path).with_suffix(".pdf")]


def _finite(x: float) -> bool:
    return x is not None and math.isfinite(x)


# ---------------------------------------------------------------------- scores
def scores_figure(columns: Sequence[str], arms: Sequence[str],
                  stats: Mapping[str, Mapping[str, tuple[float, float]]], title: str) -> Figure:
    """Grouped bars: one group per column (task, Average), one bar per arm; stats[arm][column] = (mean, std)."""
    fig = _figure(max(7.0, 1.2 + len(columns) * (0.14 * max(1, len(arms)) + 0.35)), 4.2)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(arms))
    x = np.arange(len(columns))  # (C,)
    for j, (arm, colour) in enumerate(zip(arms, _colours(len(arms)))):
        pairs = [stats.get(arm, {}).get(c, (math.nan, math.nan)) for c in columns]
        mean = np.array([m if _finite(m) else np.nan for m, _ in pairs])  # (C,)
        std = np.array([s if _finite(s) else 0.0 for _, s in pairs])  # (C,)
        ax.bar(x - 0.4 + (j + 0.5) * width, mean, width * 0.9, yerr=std, label=arm, color=colour,
               error_kw={"elinewidth": 0.8, "capsize": 1.5})
    ax.set_xticks(x, list(columns), rotation=30 if len(columns) > 8 else 0, ha="right" if len(columns) > 8 else "center")
    ax.set_ylabel("test score (points)")
    ax.set_title(title)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.grid(axis="y", alpha=0.3)
    if arms:
        fig.legend(loc="outside lower center", ncols=min(len(arms), 5), frameon=False)
    return fig


def scores_chart(path: Path, columns: Sequence[str], arms: Sequence[str],
                 stats: Mapping[str, Mapping[str, tuple[float, float]]], title: str) -> np.ndarray:
    return save(scores_figure(columns, arms, stats, title), path)


# ---------------------------------------------------------------------- curves
def curves_figure(panels: Sequence[tuple[str, str, Mapping[str, tuple[list, list, list]]]]) -> Figure:
    """One panel per (title, y label, {arm: (steps, mean, std)}): a mean line and a ± std band per arm."""
    arms: list[str] = []
    for _, _, series in panels:
        arms += [a for a in series if a not in arms]
    colour = dict(zip(arms, _colours(len(arms))))
    fig = _figure(0.6 + 4.6 * max(1, len(panels)), 4.2)
    axes = fig.subplots(1, max(1, len(panels)), squeeze=False)[0]
    for ax, (title, ylabel, series) in zip(axes, panels):
        for arm, (steps, mean, std) in series.items():
            s, m, sd = (np.asarray(v, dtype=float) for v in (steps, mean, std))  # (P,) each
            ax.fill_between(s, m - sd, m + sd, color=colour[arm], alpha=0.2, linewidth=0)
            ax.plot(s, m, marker="o", markersize=3, color=colour[arm], label=arm)
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
    if arms:
        handles, labels = [], []
        for ax in axes:
            for h, label in zip(*ax.get_legend_handles_labels()):
                if label not in labels:
                    handles.append(h)
                    labels.append(label)
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(arms), 5), frameon=False)
    return fig


def curves_chart(path: Path, panels: Sequence[tuple[str, str, Mapping[str, tuple[list, list, list]]]]) -> np.ndarray:
    return save(curves_figure(panels), path)


# ---------------------------------------------------------------------- spectrum
def spectrum_figure(eigenvalues: Sequence[np.ndarray], band_edges: Sequence[float],
                    energy: Mapping[str, tuple[float, float]], title: str) -> Figure:
    """Left: each class's final eigenvalues λ_1..λ_k by index, coloured by their Table 3 band.
    Right: the share of the gradient energy per Table 2 band (mean ± std over logged steps and seeds)."""
    from matplotlib import colormaps
    from matplotlib.patches import Patch

    fig = _figure(10.0, 4.4)
    left, right = fig.subplots(1, 2)
    edges = [0.0, *band_edges]
    n_bands = len(edges)
    cmap = colormaps[BAND_CMAP].resampled(n_bands)
    for v in eigenvalues:
        lam = np.asarray(v, dtype=float)  # (k,)
        band = np.searchsorted(np.asarray(band_edges, dtype=float), lam, side="left")  # (k,) band of each λ_i
        left.scatter(np.arange(1, lam.size + 1), lam, c=[cmap(b) for b in band], s=14)
    for e in band_edges:
        left.axhline(e, color="0.6", linewidth=0.7)
    left.set(title=title, xlabel="eigenvalue index $i$", ylabel=r"$\lambda_i$")
    labels = [f"{'[' if i == 0 else '('}{edges[i]:g}, {edges[i + 1]:g}]" if i + 1 < n_bands else f"> {edges[i]:g}"
              for i in range(n_bands)]
    left.legend([Patch(color=cmap(i)) for i in range(n_bands)], [f"Table 3 band {b}" for b in labels],
                fontsize="small", loc="upper left")
    names = list(energy)
    means = [energy[n][0] for n in names]
    stds = [energy[n][1] if _finite(energy[n][1]) else 0.0 for n in names]
    right.bar(np.arange(len(names)), means, 0.6, yerr=stds, color=_colours(len(names)), capsize=2)
    right.set_xticks(np.arange(len(names)), names, rotation=20, ha="right")
    right.set(title="gradient energy share per band (Table 2)", ylabel=r"share of $\|G\|^2$", ylim=(0.0, 1.0))
    right.grid(axis="y", alpha=0.3)
    return fig


def spectrum_chart(path: Path, eigenvalues: Sequence[np.ndarray], band_edges: Sequence[float],
                   energy: Mapping[str, tuple[float, float]], title: str) -> np.ndarray:
    return save(spectrum_figure(eigenvalues, band_edges, energy, title), path)


# ---------------------------------------------------------------------- coordination
def coordination_figure(R: np.ndarray, node_task: np.ndarray, node_layer: np.ndarray, tasks: Sequence[str],
                        title: str) -> Figure:
    """Left: ρ ordered by (task, layer), task blocks outlined. Right: ρ in the leaf order of average-linkage
    clustering on 1 − |ρ|, the dendrogram above it. A strip under each matrix gives each node's task."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch, Rectangle
    from scipy.cluster.hierarchy import dendrogram

    from speclora.spectral.visual import cluster_linkage

    n = R.shape[0]
    order = np.lexsort((node_layer, node_task))  # (n,) by task, then layer
    Z = cluster_linkage(R)  # on the distance 1 − |ρ|, as the TensorBoard heatmap
    leaves = np.asarray(dendrogram(Z, no_plot=True)["leaves"]) if Z is not None else np.arange(n)

    fig = _figure(11.0, 6.6)
    grid = fig.add_gridspec(3, 3, height_ratios=[1.2, 4.0, 0.25], width_ratios=[1, 1, 0.05])
    task_colours = ListedColormap(_colours(len(tasks)))
    image = None
    for col, (idx, label) in enumerate([(order, "by task and layer"), (leaves, "hierarchical clustering order")]):
        ax = fig.add_subplot(grid[1, col])
        image = ax.imshow(R[np.ix_(idx, idx)], cmap=CMAP_RHO, vmin=-1.0, vmax=1.0, interpolation="nearest",
                          aspect="auto")  # auto: the columns line up with the dendrogram's leaves
        ax.set(xticks=[], yticks=[])
        strip = fig.add_subplot(grid[2, col], sharex=ax)
        strip.imshow(node_task[idx][None, :], cmap=task_colours, vmin=-0.5, vmax=len(tasks) - 0.5, aspect="auto",
                     interpolation="nearest")
        strip.set(yticks=[], xlabel=label)
        strip.tick_params(labelbottom=False, bottom=False)
        if col == 0:  # task blocks
            for t in range(len(tasks)):
                ids = np.flatnonzero(node_task[order] == t)
                if ids.size:
                    size = ids[-1] - ids[0] + 1
                    ax.add_patch(Rectangle((ids[0] - 0.5, ids[0] - 0.5), size, size, fill=False, linewidth=0.8))
        elif Z is not None:
            top = fig.add_subplot(grid[0, col])
            dendrogram(Z, ax=top, no_labels=True, link_color_func=lambda _: "0.3")
            top.set_axis_off()
    fig.colorbar(image, cax=fig.add_subplot(grid[1, 2]), label=r"$\rho$")
    fig.suptitle(title)
    fig.legend([Patch(color=task_colours(i)) for i in range(len(tasks))], list(tasks), loc="outside lower center",
               ncols=min(len(tasks), 8), frameon=False, title="task of each LoRA matrix (strips)")
    return fig


def coordination_chart(path: Path, R: np.ndarray, node_task: np.ndarray, node_layer: np.ndarray,
                       tasks: Sequence[str], title: str) -> np.ndarray:
    return save(coordination_figure(R, node_task, node_layer, tasks, title), path)
