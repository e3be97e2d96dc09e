"""What SpectralGraphCallback writes to the loggers (docs/method.md, "What the callback logs").

Two moments: every ``log_every`` steps (counters, the regulariser's mean since the last log, Table 2's band
energies, λ₂, histograms of the spectrum and of the responses, node features, the coordination heatmap,
Table 1's graph statistics at step 0), and every refresh (solver, warm start, iterations, residual, seconds,
the filter basis's size and the rest's mean eigenvalue), written straight to the loggers at the refresh's
step so that no refresh is lost between Lightning's logging steps. Steps between them log nothing: every
device value is read here, at a logging step (the counters, the regulariser's sum).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from speclora.spectral.eigen import METHODS
from speclora.spectral.graph import node_features
from speclora.spectral.response import update_response
from speclora.spectral.visual import coordination_image

if TYPE_CHECKING:
    from speclora.spectral.callback import SpectralGraphCallback


def log_refresh(trainer: L.Trainer, last_refresh: list[dict[str, Any]], seconds: float) -> None:
    """Per refresh, to every logger (TensorBoard): per class the solver (its index in ``METHODS``: 0 dense,
    1 lobpcg, 2 fallback_dense, 3 kept_previous), whether it was warm-started (1/0), LOBPCG iterations, residual
    ‖LU − UΛ‖_F / c, seconds, the filter basis's columns m (k plus the eigenvectors whose response differs from
    the rest's) and the rest's mean eigenvalue, and the seconds of the whole refresh. Host numbers only (the
    solver has synchronised already); steps without a refresh log nothing here."""
    metrics = {"train/spectral/refresh/seconds": seconds}
    for c, result in enumerate(last_refresh):
        prefix = f"train/spectral/refresh/class{c}"
        metrics[f"{prefix}/solver"] = float(METHODS.index(result["method"]))
        metrics[f"{prefix}/warm"] = float(result["warm"])
        metrics[f"{prefix}/iterations"] = float(result["iterations"])
        metrics[f"{prefix}/residual"] = float(result["residual"])
        metrics[f"{prefix}/seconds"] = float(result["seconds"])
        metrics[f"{prefix}/basis"] = float(result["basis"])
        if math.isfinite(result["rest_mean"]):
            metrics[f"{prefix}/rest_mean"] = float(result["rest_mean"])
    for logger in getattr(trainer, "loggers", ()):
        logger.log_metrics(metrics, step=trainer.global_step)


def log_step(cb: SpectralGraphCallback, trainer: L.Trainer, pl_module: L.LightningModule,
             energies: list[Tensor]) -> None:
    """energies: per class, ``band_energy`` of this step's raw gradients (B + 1,)."""
    step = trainer.global_step
    counters = cb.counters  # a host read: this is a logging step
    for key, value in counters.items():
        pl_module.log(f"train/spectral/{key}", float(value), batch_size=1)
    if counters["skipped_nonfinite"] > cb._skipped_reported:
        rank_zero_warn(f"SpectralGraphCallback: {counters['skipped_nonfinite'] - cb._skipped_reported} step(s) "
                       f"with a non-finite LoRA gradient since the last log (step {step}); the spectral state "
                       f"kept its values and the module skipped them ({counters['skipped_nonfinite']} so far)")
        cb._skipped_reported = counters["skipped_nonfinite"]
    if cb._reg_steps:
        pl_module.log("train/spectral/reg", cb._reg_sum / cb._reg_steps, batch_size=1)
        cb._reg_sum, cb._reg_steps = None, 0
    experiment = getattr(trainer.logger, "experiment", None)
    histograms = experiment is not None and hasattr(experiment, "add_histogram")
    for c, energy in enumerate(energies):
        values = cb.values[c]
        share = energy / energy.sum().clamp_min(1e-30)
        for b, e in enumerate(share.tolist()):
            name = f"band{b}" if b < share.numel() - 1 else "beyond_k"
            pl_module.log(f"train/spectral/class{c}/energy_{name}", e, batch_size=1)
        pl_module.log(f"train/spectral/class{c}/lambda_2", float(values[1]) if values.numel() > 1 else 0.0,
                      batch_size=1)
        if histograms:
            experiment.add_histogram(f"spectral/class{c}/eigenvalues", values.cpu(), step)
            # h_g on class c's basis (coordination × band filter); h_u (None: neither rates nor learned)
            experiment.add_histogram(f"spectral/class{c}/gradient_response", cb.filters[c].grad.cpu(), step)
            hu = update_response(cb.filters[c], cb.h_learned[c], cb.eigen_lr, cb.learned)
            if hu is not None:
                experiment.add_histogram(f"spectral/class{c}/update_response", hu.cpu(), step)
    if histograms:
        # node features (§3.1): Frobenius, spectral, nuclear norm, condition number of every LoRA matrix
        feats = node_features([m.lora_A.detach().float() for m in cb.layers],
                              [m.lora_B.detach().float() for m in cb.layers])  # (n, 4)
        for j, name in enumerate(("frobenius", "spectral", "nuclear", "condition")):
            experiment.add_histogram(f"spectral/node/{name}", feats[:, j].cpu(), step)
    if experiment is not None and hasattr(experiment, "add_image") and cb.heatmap_every and (
            step % cb.heatmap_every == 0):
        image = coordination_image(cb.corr.rho().cpu(), cb.edge_index.cpu(), cb.layout)
        experiment.add_image("spectral/coordination", image, step)
    if step == 0 and experiment is not None and hasattr(experiment, "add_scalar"):
        for kind, stats in cb._graph_stats.items():
            for key, value in stats.items():
                experiment.add_scalar(f"spectral/graph/{kind}/{key}", value, 0)
