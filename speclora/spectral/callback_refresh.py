"""The refresh of SpectralGraphCallback: edge weights → the training graph (a torch-geometric ``Data``,
optionally sparsified) → per shape class its Laplacian → eigenpairs → the filters' responses, with the
learned coefficients carried over to the new eigenvectors (docs/method.md, "One training step", 2).

A mixin of the callback (it reads the callback's settings and state); host reads are allowed here: a refresh
runs every ``refresh_every`` steps, not in the steady state.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch_geometric.data import Data

from speclora.spectral.callback_logs import log_refresh
from speclora.spectral.correlation import (
    edge_weights,
    fixed_weights,
    magnitude_weights,
    parameter_magnitude_weights,
)
from speclora.spectral.devices import broadcast_from_rank0, broadcast_optional_from_rank0
from speclora.spectral.eigen import EigenResult, EigenSolverError, dense_threshold_for, smallest_eigenpairs
from speclora.spectral.graph import training_graph
from speclora.spectral.laplacian import laplacian, laplacian_trace
from speclora.spectral.response import align_signs, carry_coefficients, class_filter

if TYPE_CHECKING:
    from speclora.spectral.callback import SpectralGraphCallback


class RefreshMixin:
    """``refresh`` and what it builds, and the choice of solver per class; see the module's doc."""

    def _check_solver(self: SpectralGraphCallback, device: torch.device) -> None:
        """LOBPCG needs n_c >= 3k in every class it solves on ``device``: a clear error before training."""
        for c, ((d, r), ids) in enumerate(self.layout.shape_classes):
            n_c, k_c = ids.numel(), self.class_k[c]
            if self.class_solver(n_c, device) == "lobpcg" and n_c < 3 * k_c:
                fix = "solver: dense" if self.solver == "lobpcg" else "a dense_threshold of at least that n"
                raise ValueError(
                    f"SpectralGraphCallback k={self.k}, solver={self.solver!r}: shape class {c} ({d}x{r} signals) "
                    f"has n={n_c} nodes and is solved by LOBPCG on {device}, which needs n >= 3k = {3 * k_c}; "
                    f"lower k to at most {n_c // 3}, or use {fix}")

    def class_solver(self: SpectralGraphCallback, n: int, device: torch.device | str) -> str:
        """The solver of an n-node class on ``device``: ``dense`` or ``lobpcg`` (``auto`` resolved)."""
        if self.solver != "auto":
            return self.solver
        threshold = self.dense_threshold if self.dense_threshold is not None else dense_threshold_for(device)
        return "dense" if n <= threshold else "lobpcg"

    def edge_weights(self: SpectralGraphCallback) -> Tensor:
        """w (E,) on every candidate edge, by the configured weighting."""
        if self.edge_weighting == "correlation":
            return edge_weights(self.corr.rho(), self.alpha)  # (E,)
        if self.edge_weighting == "magnitude":
            return parameter_magnitude_weights(self._node_norms(), self.edge_index, self.alpha)  # (E,)
        if self.edge_weighting == "gradient_magnitude":
            return magnitude_weights(self.corr.magnitude(), self.edge_index, self.alpha)  # (E,)
        return fixed_weights(self.edge_type)  # (E,)

    def _node_norms(self: SpectralGraphCallback) -> Tensor:
        """‖θ_v‖_F of every node's LoRA matrix, (n,) in node order."""
        norms = torch.empty(self.layout.num_nodes, device=self._device)  # (n,)
        for (_, ids), theta in zip(self.layout.shape_classes, self._signals(param=True)):
            norms[ids.to(self._device)] = torch.linalg.vector_norm(theta, dim=-1)  # (n_c,)
        return norms

    def _set_graph(self: SpectralGraphCallback, weight: Tensor) -> None:
        """The training graph from the candidate edges' weights (E,): sparsified if set; ``graph_weight`` keeps
        the weights of this refresh on every candidate edge (0 where dropped: the checkpoint's copy)."""
        _, keep = training_graph(self.edge_index, self.edge_type, weight, self.layout.num_nodes, self.sparsify_topk)
        self._graph_from_weight(torch.where(keep, weight, torch.zeros_like(weight)))

    def _graph_from_weight(self: SpectralGraphCallback, weight: Tensor) -> None:
        """``graph`` (a ``Data``: the candidate edges of positive weight) from ``graph_weight`` (E,)."""
        kept = (weight.detach().cpu() > 0).nonzero().view(-1).to(self._device)  # (E',): a host read, as a refresh may
        self.graph_weight = weight = weight.to(self._device)  # (E,)
        self.graph = Data(edge_index=self.edge_index[:, kept], edge_weight=weight[kept],
                          edge_type=self.edge_type[kept], num_nodes=self.layout.num_nodes)
        self._laplacians = [None] * len(self.layout.shape_classes)

    def class_graph(self: SpectralGraphCallback, c: int) -> Data:
        """Class c's part of the training graph, relabelled to its rows 0..n_c − 1."""
        ids = self._class_edges_ids[c]  # (E_c,) positions among the candidate edges
        w = self.graph_weight[ids]  # (E_c,)
        kept = w > 0
        n_c = self.layout.shape_classes[c][1].numel()
        return Data(edge_index=self._class_edges_index[c][:, kept], edge_weight=w[kept],
                    edge_type=self.edge_type[ids][kept], num_nodes=n_c)

    def class_laplacian(self: SpectralGraphCallback, c: int) -> Tensor:
        """L of class c's training graph (n_c, n_c), sparse; cached until the next refresh."""
        if self._laplacians[c] is None:
            if self.graph_weight is None:  # before the first refresh (the Dirichlet regulariser needs none then)
                self._set_graph(self.edge_weights())
            g = self.class_graph(c)
            self._laplacians[c] = laplacian(g.edge_index, g.edge_weight, g.num_nodes, self.normalization)
        return self._laplacians[c]

    def refresh(self: SpectralGraphCallback, trainer: L.Trainer | None = None) -> bool:
        """Recompute every class's eigenpairs and responses, warm-started from the previous pairs.

        Returns False when a class has no eigenpairs to use (every solver failed on a first refresh): the step
        then goes unfiltered, the failure is logged and counted, and the next step tries again.
        """
        start = time.perf_counter()
        self._set_graph(self.edge_weights())
        results: list[tuple[EigenResult, float, bool]] = []  # per class: result, seconds, warm-started
        for c, (_, ids) in enumerate(self.layout.shape_classes):
            solve_start = time.perf_counter()
            lap = self.class_laplacian(c)  # (n_c, n_c) sparse, float32, on the state's device
            n_c = ids.numel()
            solver = self.class_solver(n_c, lap.device)
            whole = solver == "dense" and self.rest_response == "spectrum"
            try:
                result = smallest_eigenpairs(
                    lap.to_dense() if solver == "dense" else lap, self.class_k[c], X0=self.vectors[c],
                    previous_values=self.values[c], solver=solver, seed=self.seed, whole=whole)
            except EigenSolverError as err:  # only when there were no previous pairs to keep
                self._counts["solver_failed"] += 1
                rank_zero_warn(f"spectral refresh of class {c} failed ({err}); this step is not filtered "
                               f"({self._counts['solver_failed']} failures so far)")
                return False
            results.append((result, time.perf_counter() - solve_start, self.vectors[c] is not None))
            if result.method in ("fallback_dense", "kept_previous"):
                key = "fallbacks" if result.method == "fallback_dense" else "kept_previous"
                self._counts[key] += 1
                rank_zero_warn(f"spectral refresh of class {c}: {result.method} (residual {result.residual:.2e}); "
                               f"{self._counts[key]} so far")
            self._install(c, result, laplacian_trace(lap), trainer)
        self._counts["refreshes"] += 1
        # host numbers only: the solver has synchronised already
        self.last_refresh = [{"method": r.method, "warm": warm, "iterations": r.iterations, "residual": r.residual,
                              "seconds": seconds, "basis": self.filters[c].basis.size(1),
                              "rest_mean": self.filters[c].rest_mean}
                             for c, (r, seconds, warm) in enumerate(results)]
        if trainer is not None:
            log_refresh(trainer, self.last_refresh, time.perf_counter() - start)
        return True

    def _install(self: SpectralGraphCallback, c: int, result: EigenResult, trace: float,
                 trainer: L.Trainer | None) -> None:
        """Class c's new eigenpairs → the same on every rank → coefficients carried → responses."""
        values, vectors = result.values, result.vectors  # (k,), (n_c, k), on the Laplacian's device
        rest_values, rest_vectors = result.rest_values, result.rest_vectors  # (n_c − k,), (n_c, n_c − k) or None
        if trainer is not None and trainer.world_size > 1:
            # every rank must hold the same eigenpairs: rank 0's are the reference
            strategy = trainer.strategy
            values, vectors = broadcast_from_rank0(strategy, values), broadcast_from_rank0(strategy, vectors)
            rest = vectors.size(0) - values.numel()
            rest_values = broadcast_optional_from_rank0(strategy, rest_values, (rest,), values)
            rest_vectors = broadcast_optional_from_rank0(strategy, rest_vectors, (vectors.size(0), rest), vectors)
            trace = float(broadcast_from_rank0(strategy, torch.tensor([trace], dtype=torch.float64,
                                                                      device=values.device))[0])
        old = self.vectors[c]
        if self.carry_coefficients == "overlap" and old is not None:
            vectors = align_signs(vectors, old)  # (n_c, k)
            if self.learned and self.h_learned[c] is not None:
                self.h_learned[c] = carry_coefficients(self.h_learned[c], old, vectors)  # (k,)
        if self.learned and self.h_learned[c] is None:
            self.h_learned[c] = torch.ones_like(values)
        self.values[c], self.vectors[c] = values, vectors
        self._set_filter(c, class_filter(values, vectors, self.responses, rest_values, rest_vectors, trace))

    def _set_filter(self: SpectralGraphCallback, c: int, filt: Any) -> None:
        """Install class c's responses, and what the steps derive from them once per refresh."""
        self.filters[c] = filt
        self._vectors_version[c] += 1
        # gradient filter: U diag(h_g − h_g,rest) on the columns that differ from the rest
        self._grad_coef[c] = (filt.grad[: filt.grad_cols] - filt.grad_rest).unsqueeze(1)  # (m_g, 1)
        # update filter: h_u − h_u,rest, the low band's part rewritten at each step (learned coefficients)
        cols = filt.basis.size(1) if self.eigen_lr else filt.k
        self._rate_coef[c] = (filt.rate[:cols] - filt.rate_rest).clone()  # (m_u,)
