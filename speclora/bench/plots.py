"""PNG charts of the quality tables, drawn with Pillow alone (no plotting library needed).

    scores_chart         per-task test scores by method: grouped bars, mean ± std over seeds
    curves_chart         training curves averaged over seeds, a ± std band around each mean
    spectrum_chart       the final Laplacian eigenvalues (coloured by the paper's Table 3 band) and the
                         gradient energy per Table 2 band
    coordination_chart   the coordination matrix ρ: by task and layer, and in hierarchical-clustering order
                         under its dendrogram (scipy.cluster.hierarchy, average linkage on 1 − |ρ|)

Each returns the image as an (H, W, 3) uint8 array too, for TensorBoard's ``add_image``. Pillow is the
``bench`` extra; :func:`available` says whether it is installed (without it the runner skips the PNGs).
Labels are ASCII: Pillow's built-in font has no Greek.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (57, 59, 121), (173, 73, 74),
           (99, 121, 57), (206, 109, 189), (82, 84, 163), (231, 186, 82)]
BAND_COLOURS = [(31, 119, 180), (44, 160, 44), (188, 189, 34), (255, 127, 14), (214, 39, 40)]


def available() -> bool:
    try:
        import PIL  # noqa: F401
    except ImportError:
        return False
    return True


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


class Canvas:
    """A white RGB image with text helpers."""

    def __init__(self, width: int, height: int) -> None:
        from PIL import Image, ImageDraw

        self.image = Image.new("RGB", (width, height), "white")
        self.draw = ImageDraw.Draw(self.image, "RGBA")
        self.font, self.small, self.big = _font(12), _font(10), _font(15)

    def text(self, xy, s: str, anchor: str = "la", fill=(0, 0, 0), font=None) -> None:
        self.draw.text(xy, s, fill=fill, font=font or self.font, anchor=anchor)

    def legend(self, items: Sequence[tuple[str, tuple[int, int, int]]], x: int, y: int, columns: int = 1,
               width: int = 170) -> None:
        for i, (label, colour) in enumerate(items):
            cx, cy = x + (i % columns) * width, y + (i // columns) * 16
            self.draw.rectangle([cx, cy + 2, cx + 10, cy + 12], fill=colour)
            self.text((cx + 15, cy), label, font=self.small)

    def save(self, path: Path) -> np.ndarray:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.image.save(path)
        return np.asarray(self.image)


class Axes:
    """A plotting box on a canvas: data → pixel maps, a frame with ticks, lines, bands and bars."""

    def __init__(self, canvas: Canvas, box: tuple[int, int, int, int], xlim: tuple[float, float],
                 ylim: tuple[float, float], title: str = "", xlabel: str = "", ylabel: str = "") -> None:
        self.c, self.box = canvas, box
        self.xlim = xlim if xlim[1] > xlim[0] else (xlim[0] - 1, xlim[0] + 1)
        self.ylim = ylim if ylim[1] > ylim[0] else (ylim[0] - 1, ylim[0] + 1)
        self.title, self.xlabel, self.ylabel = title, xlabel, ylabel

    def x(self, v: float) -> float:
        left, _, right, _ = self.box
        return left + (v - self.xlim[0]) / (self.xlim[1] - self.xlim[0]) * (right - left)

    def y(self, v: float) -> float:
        _, top, _, bottom = self.box
        return bottom - (v - self.ylim[0]) / (self.ylim[1] - self.ylim[0]) * (bottom - top)

    def frame(self, xticks: Sequence[float] | None = None, xticklabels: Sequence[str] | None = None) -> None:
        left, top, right, bottom = self.box
        d = self.c.draw
        for t in nice_ticks(*self.ylim):
            py = self.y(t)
            d.line([left, py, right, py], fill=(225, 225, 225))
            self.c.text((left - 4, py), f"{t:g}", anchor="rm", font=self.c.small)
        ticks = nice_ticks(*self.xlim) if xticks is None else xticks
        for i, t in enumerate(ticks):
            px = self.x(t)
            d.line([px, bottom, px, bottom + 3], fill=(0, 0, 0))
            label = f"{t:g}" if xticklabels is None else xticklabels[i]
            self.c.text((px, bottom + 5), label, anchor="ma", font=self.c.small)
        d.rectangle([left, top, right, bottom], outline=(0, 0, 0))
        if self.title:
            self.c.text(((left + right) / 2, top - 8), self.title, anchor="md", font=self.c.big)
        if self.xlabel:
            self.c.text(((left + right) / 2, bottom + 20), self.xlabel, anchor="ma")
        if self.ylabel:
            self.c.text((left - 50, top - 26), self.ylabel, anchor="la", font=self.c.small)

    def line(self, xs: Sequence[float], ys: Sequence[float], colour, width: int = 2) -> None:
        pts = [(self.x(a), self.y(b)) for a, b in zip(xs, ys) if math.isfinite(b)]
        if len(pts) > 1:
            self.c.draw.line(pts, fill=colour, width=width)
        for p in pts:
            self.c.draw.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=colour)

    def band(self, xs: Sequence[float], lo: Sequence[float], hi: Sequence[float], colour) -> None:
        pts = [(a, b, c) for a, b, c in zip(xs, lo, hi) if math.isfinite(b) and math.isfinite(c)]
        if len(pts) < 2:
            return
        poly = [(self.x(a), self.y(c)) for a, _, c in pts] + [(self.x(a), self.y(b)) for a, b, _ in reversed(pts)]
        self.c.draw.polygon(poly, fill=(*colour, 60))

    def bar(self, x0: float, x1: float, value: float, colour, err: float | None = None) -> None:
        if not math.isfinite(value):
            return
        base = min(max(0.0, self.ylim[0]), self.ylim[1])
        top, bottom = sorted((self.y(value), self.y(base)))
        self.c.draw.rectangle([self.x(x0), top, self.x(x1), bottom], fill=colour)
        if err is not None and math.isfinite(err) and err > 0:
            xc = self.x((x0 + x1) / 2)
            self.c.draw.line([xc, self.y(value - err), xc, self.y(value + err)], fill=(0, 0, 0), width=1)


def _limits(values: Sequence[float], pad: float = 0.05, zero: bool = False) -> tuple[float, float]:
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return (0.0, 1.0)
    lo, hi = min(vals), max(vals)
    if zero:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    span = hi - lo or 1.0
    return lo - pad * span, hi + pad * span


def scores_chart(path: Path, columns: Sequence[str], arms: Sequence[str],
                 stats: Mapping[str, Mapping[str, tuple[float, float]]], title: str) -> np.ndarray:
    """Grouped bars: one group per column (task, Average), one bar per arm; stats[arm][column] = (mean, std)."""
    n_arms = max(1, len(arms))
    width = max(700, 90 + len(columns) * (n_arms * 12 + 30))
    canvas = Canvas(width, 470)
    values = [m + (s if math.isfinite(s) else 0) for a in arms for m, s in stats.get(a, {}).values()]
    values += [m - (s if math.isfinite(s) else 0) for a in arms for m, s in stats.get(a, {}).values()]
    ax = Axes(canvas, (60, 50, width - 20, 330), (0, len(columns)), _limits(values, zero=True), title,
              "", "test score (points)")
    ax.frame([i + 0.5 for i in range(len(columns))], list(columns))
    w = 0.8 / n_arms
    for i, _col in enumerate(columns):
        for j, arm in enumerate(arms):
            mean, std = stats.get(arm, {}).get(_col, (math.nan, math.nan))
            x0 = i + 0.1 + j * w
            ax.bar(x0, x0 + w * 0.9, mean, PALETTE[j % len(PALETTE)], std)
    canvas.legend([(a, PALETTE[j % len(PALETTE)]) for j, a in enumerate(arms)], 60, 365, columns=max(1, (width - 80) // 170))
    return canvas.save(path)


def curves_chart(path: Path, panels: Sequence[tuple[str, str, Mapping[str, tuple[list, list, list]]]]) -> np.ndarray:
    """One panel per (title, y label, {arm: (steps, mean, std)}), a mean line and a ± std band per arm."""
    arms: list[str] = []
    for _, _, series in panels:
        arms += [a for a in series if a not in arms]
    colour = {a: PALETTE[i % len(PALETTE)] for i, a in enumerate(arms)}
    pw = 460
    canvas = Canvas(40 + pw * len(panels) + 20 * len(panels), 470)
    for k, (title, ylabel, series) in enumerate(panels):
        xs = [s for steps, _, _ in series.values() for s in steps]
        ys = [m + sd for _, mean, std in series.values() for m, sd in zip(mean, std)]
        ys += [m - sd for _, mean, std in series.values() for m, sd in zip(mean, std)]
        left = 60 + k * (pw + 20)
        ax = Axes(canvas, (left, 50, left + pw - 40, 330), _limits(xs, 0.02), _limits(ys), title, "step", ylabel)
        ax.frame()
        for arm, (steps, mean, std) in series.items():
            ax.band(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], colour[arm])
            ax.line(steps, mean, colour[arm])
    canvas.legend([(a, colour[a]) for a in arms], 60, 365, columns=max(1, (canvas.image.width - 80) // 170))
    return canvas.save(path)


def spectrum_chart(path: Path, eigenvalues: Sequence[np.ndarray], band_edges: Sequence[float],
                   energy: Mapping[str, tuple[float, float]], title: str) -> np.ndarray:
    """Left: each class's final eigenvalues λ_1..λ_k by index, coloured by their Table 3 band.
    Right: the share of the gradient energy per Table 2 band (mean ± std over logged steps and seeds)."""
    canvas = Canvas(980, 440)
    k = max((len(v) for v in eigenvalues), default=1)
    allv = [float(x) for v in eigenvalues for x in v]
    ax = Axes(canvas, (60, 50, 470, 340), (0, k + 1), _limits(allv + [0.0]), title, "eigenvalue index i",
              "lambda_i")
    ax.frame()
    for v in eigenvalues:
        for i, lam in enumerate(v):
            band = sum(lam > e for e in band_edges)
            px, py = ax.x(i + 1), ax.y(float(lam))
            canvas.draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=BAND_COLOURS[min(band, len(BAND_COLOURS) - 1)])
    for e in band_edges:
        if ax.ylim[0] < e < ax.ylim[1]:
            canvas.draw.line([ax.box[0], ax.y(e), ax.box[2], ax.y(e)], fill=(150, 150, 150), width=1)
    edges = [0.0, *band_edges]
    labels = [f"{'[' if i == 0 else '('}{edges[i]:g}, {edges[i + 1]:g}]" if i + 1 < len(edges) else f"> {edges[i]:g}"
              for i in range(len(edges))]
    canvas.legend([(f"Table 3 band {lab}", BAND_COLOURS[i % len(BAND_COLOURS)]) for i, lab in enumerate(labels)],
                  70, 390, columns=3, width=150)
    names = list(energy)
    bx = Axes(canvas, (560, 50, 960, 340), (0, max(1, len(names))), (0.0, 1.0),
              "gradient energy share per band (Table 2)", "", "share of ||G||^2")
    bx.frame([i + 0.5 for i in range(len(names))], names)
    for i, name in enumerate(names):
        mean, std = energy[name]
        bx.bar(i + 0.2, i + 0.8, mean, PALETTE[i % len(PALETTE)], std)
    return canvas.save(path)


def _diverging(R: np.ndarray) -> np.ndarray:
    """ρ in [−1, 1] → RGB uint8: −1 blue, 0 white, +1 red (speclora.spectral.visual's scale)."""
    pos, neg = np.clip(R, 0, 1), np.clip(-R, 0, 1)
    rgb = np.stack([1 - neg, np.clip(1 - pos - neg, 0, 1), 1 - pos], axis=-1)
    return (rgb * 255).astype(np.uint8)


def coordination_chart(path: Path, R: np.ndarray, node_task: np.ndarray, node_layer: np.ndarray,
                       tasks: Sequence[str], title: str) -> np.ndarray:
    """Left: ρ ordered by (task, layer), task blocks outlined. Right: ρ in the leaf order of average-linkage
    clustering on 1 − |ρ|, the dendrogram above it, a task colour strip below."""
    from PIL import Image
    from scipy.cluster.hierarchy import dendrogram, linkage
    from scipy.spatial.distance import squareform

    n = R.shape[0]
    size = 360
    canvas = Canvas(2 * size + 140, size + 230)
    order = np.lexsort((node_layer, node_task))
    D = np.clip(1 - np.abs(R), 0, None).astype(np.float64)
    np.fill_diagonal(D, 0.0)
    D = (D + D.T) / 2
    Z = linkage(squareform(D, checks=False), method="average") if n > 1 else None
    leaves = np.asarray(dendrogram(Z, no_plot=True)["leaves"]) if Z is not None else np.arange(n)
    panels = [(40, order, "by task and layer"), (size + 100, leaves, "hierarchical clustering order")]
    top = 150
    for left, idx, label in panels:
        img = Image.fromarray(_diverging(R[np.ix_(idx, idx)])).resize((size, size), Image.NEAREST)
        canvas.image.paste(img, (left, top))
        canvas.draw.rectangle([left, top, left + size, top + size], outline=(0, 0, 0))
        canvas.text((left + size / 2, top + size + 22), label, anchor="ma")
        cell = size / n
        for i, node in enumerate(idx):  # task colour strip
            colour = PALETTE[int(node_task[node]) % len(PALETTE)]
            canvas.draw.rectangle([left + i * cell, top + size + 4, left + (i + 1) * cell, top + size + 14], fill=colour)
    cell = size / n
    for t in range(len(tasks)):  # task blocks of the left panel
        ids = np.flatnonzero(node_task[order] == t)
        if ids.size:
            a, b = 40 + ids[0] * cell, 40 + (ids[-1] + 1) * cell
            canvas.draw.rectangle([a, top + ids[0] * cell, b, top + (ids[-1] + 1) * cell], outline=(0, 0, 0))
    if Z is not None:
        tree = dendrogram(Z, no_plot=True)
        hmax = max(max(d) for d in tree["dcoord"]) or 1.0
        left = size + 100
        for xs, ys in zip(tree["icoord"], tree["dcoord"]):
            pts = [(left + (x - 5) / 10 * cell + cell / 2, top - 6 - y / hmax * 90) for x, y in zip(xs, ys)]
            canvas.draw.line(pts, fill=(60, 60, 60), width=1)
    canvas.text((canvas.image.width / 2, 12), title, anchor="ma", font=canvas.big)
    canvas.legend([(t, PALETTE[i % len(PALETTE)]) for i, t in enumerate(tasks)], 40, top + size + 45, columns=6,
                  width=110)
    canvas.text((40, top + size + 68), "colour: rho from -1 (blue) through 0 (white) to +1 (red); strip: task of "
                "each LoRA matrix", font=canvas.small)
    return canvas.save(path)
