"""The quality figures: matplotlib figures written as PNG and PDF, the PNG's pixels returned for TensorBoard."""

from __future__ import annotations

import math

import numpy as np
import pytest

from speclora.bench import plots

pytest.importorskip("matplotlib")  # the bench extra; without it the runner writes tables only (test_quality_report)


def _check(path, image) -> None:
    assert path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.min() < 100 < 250 < image.max()  # something dark was drawn on white


def test_every_chart_writes_png_and_pdf(tmp_path):
    stats = {"independent": {"RTE": (55.0, 2.0), "Average": (37.0, math.nan)},
             "speclora": {"RTE": (60.0, 1.0), "Average": (math.nan, math.nan)}}  # a failed cell: no bar
    _check(tmp_path / "scores.png", plots.scores_chart(tmp_path / "scores.png", ["RTE", "Average"],
                                                       list(stats), stats, "scores"))
    panels = [("val/average", "val/average", {"a": ([5, 10], [40.0, 50.0], [1.0, 2.0])}),
              ("train/loss", "train/loss", {"a": ([5, 10], [2.0, 1.0], [0.1, 0.1]), "b": ([5], [1.5], [0.0])})]
    _check(tmp_path / "curves.png", plots.curves_chart(tmp_path / "curves.png", panels))
    rng = np.random.default_rng(0)
    eig = [np.sort(rng.uniform(0, 2, 8)), np.sort(rng.uniform(0, 2, 8))]
    _check(tmp_path / "spectrum.png", plots.spectrum_chart(tmp_path / "spectrum.png", eig, [0.1, 0.5, 1.0],
                                                           {"<= 0.1": (0.4, 0.1), "> 1": (0.6, 0.0)}, "spectrum"))
    R = np.corrcoef(rng.normal(size=(12, 4)))  # (12, 12)
    task, layer = np.repeat(np.arange(3), 4), np.tile(np.arange(4), 3)
    _check(tmp_path / "coord.png", plots.coordination_chart(tmp_path / "coord.png", R, task, layer,
                                                            ["rte", "cola", "copa"], "rho"))
    assert plots.outputs(tmp_path / "coord.png") == [tmp_path / "coord.png", tmp_path / "coord.pdf"]


def test_figures_are_matplotlib_figures_to_restyle():
    from matplotlib.figure import Figure

    fig = plots.scores_figure(["RTE"], ["a", "b"], {"a": {"RTE": (50.0, 1.0)}, "b": {"RTE": (40.0, 0.0)}}, "t")
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    assert heights == [40.0, 50.0] and ax.get_ylabel() == "test score (points)"
