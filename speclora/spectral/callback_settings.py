"""The settings of SpectralGraphCallback checked before anything is built: each bad value raises a
``ValueError`` naming the key, the value given and what is allowed (the callback's docstring has the keys)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from speclora.spectral.eigen import SOLVERS
from speclora.spectral.filters import band_response
from speclora.spectral.graph import EDGE_KINDS
from speclora.spectral.response import REST_RULES

EDGE_WEIGHTINGS = ("correlation", "magnitude", "gradient_magnitude", "fixed")
CARRY_RULES = ("overlap", "index")


def check_settings(
    *,
    k: int,
    refresh_every: int,
    ema_decay: float,
    alpha: float,
    edge_weighting: str,
    edge_kinds: Sequence[str],
    sparsify_topk: int | None,
    normalization: str,
    epsilon: float,
    band_filter: bool,
    band_coefficients: Sequence[float],
    band_edges: Sequence[float] | None,
    rest_response: str,
    beta: float,
    sigma: float,
    carry_coefficients: str,
    hyper_lr: float,
    hyper_clip: tuple[float, float],
    regularizer: str,
    gamma: float,
    solver: str,
    dense_threshold: int | None,
    log_every: int,
    heatmap_every: int,
) -> None:
    """Raise a ``ValueError`` on the first setting outside what is allowed."""
    checks = [
        ("k", k, k >= 1, "an integer >= 1"),
        ("refresh_every", refresh_every, refresh_every >= 1, "an integer >= 1"),
        ("ema_decay", ema_decay, 0.0 <= ema_decay < 1.0, "0 <= ema_decay < 1"),
        ("alpha", alpha, math.isfinite(alpha) and alpha >= 0, "a finite number >= 0"),
        ("epsilon", epsilon, 0.0 <= epsilon <= 1.0, "0 <= epsilon <= 1"),
        ("beta", beta, math.isfinite(beta) and beta >= 0, "a finite number >= 0"),
        ("sigma", sigma, math.isfinite(sigma) and sigma > 0, "a finite number > 0"),
        ("gamma", gamma, 0.0 <= gamma <= 1.0, "0 <= gamma <= 1 (the paper uses 0.01-0.05)"),
        ("hyper_lr", hyper_lr, hyper_lr >= 0, "a number >= 0"),
        ("log_every", log_every, log_every >= 1, "an integer >= 1"),
        ("heatmap_every", heatmap_every, heatmap_every >= 0, "an integer >= 0"),
        ("sparsify_topk", sparsify_topk, sparsify_topk is None or sparsify_topk >= 1,
         "an integer >= 1, or null for no sparsification"),
    ]
    for key, value, ok, allowed in checks:
        if not ok:
            raise ValueError(f"SpectralGraphCallback {key}={value}; allowed: {allowed}")
    if dense_threshold is not None and not dense_threshold >= 0:
        raise ValueError(f"SpectralGraphCallback dense_threshold={dense_threshold}; allowed: an integer >= 0, "
                         "or null for the training device's crossover")
    for key, value, allowed in (("edge_weighting", edge_weighting, EDGE_WEIGHTINGS),
                                ("solver", solver, SOLVERS),
                                ("normalization", normalization, ("sym", "none")),
                                ("rest_response", rest_response, REST_RULES),
                                ("carry_coefficients", carry_coefficients, CARRY_RULES),
                                ("regularizer", regularizer, ("highpass", "dirichlet", "none"))):
        if value not in allowed:
            raise ValueError(f"SpectralGraphCallback {key}={value!r}; allowed: {', '.join(allowed)}")
    unknown = [e for e in edge_kinds if e not in EDGE_KINDS]
    if unknown or not edge_kinds:
        raise ValueError(f"SpectralGraphCallback edge_kinds={list(edge_kinds)}; allowed: a non-empty "
                         f"subset of {list(EDGE_KINDS)}")
    if not 0 < hyper_clip[0] <= hyper_clip[1]:
        raise ValueError(f"SpectralGraphCallback hyper_clip={hyper_clip}; allowed: (low, high), 0 < low <= high")
    if band_filter:
        band_response(torch.zeros(1), band_coefficients, band_edges)  # validates the table
