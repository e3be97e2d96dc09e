"""SpectralGraphCallback: wires the spectral math of speclora.spectral into Lightning's training loop.

Per optimizer step (DESIGN.md, data path), with G the stacked aligned LoRA gradients of every shape
class (n_c, p_c) and U, λ the k smallest eigenpairs of the class's Laplacian:

    on_before_optimizer_step (gradients are synchronised across ranks by then)
        EMA correlations  ← G                                   (EdgeCorrelation.update)
        every K steps: w = exp(−α(1−|ρ|)) → L → (λ, U) (warm-started LOBPCG / dense eigh, checked)
        G' = U diag(h_g) Uᵀ G + h_g,rest (G − U Uᵀ G)          coordination (1 / ε) × band filter (Table 3)
        G' += ∇ γ R(Θ)                                          R: high-pass or Dirichlet energy of Θ − Θ₀
        Θ_before ← Θ
    on_train_batch_end (after the optimizer step)
        Δ = Θ − Θ_before;  Θ ← Θ_before + U diag(h_u) Uᵀ Δ + (Δ − U Uᵀ Δ)
        h_u = (1 + β exp(−λ/σ)) (per-eigencomponent learning rates) × h_learned (hypergradient)

The regulariser enters as its gradient, added to the adapters' gradients before the step: for a
gradient-based optimiser this is the same as adding γ R(Θ) to the loss (logged as train/spectral/reg).
Every part is switchable for the ablations of the paper's Table 7 (configs/methods/speclora*.yaml).

Devices (docs/method.md, "Devices and precision"): Lightning calls ``setup`` before the strategy moves the
module, so ``setup`` builds the graph on the CPU and reads no parameter; from ``on_train_start`` on, checked
at every step hook, the whole state sits on the LoRA parameters' device (cuda:N, or wherever a checkpoint
resumes). The spectral math runs in IEEE float32 whatever the training precision (``float32_math``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from speclora.model.lora import MultiTaskLoRALinear, lora_modules
from speclora.spectral.callback_logs import log_refresh, log_step
from speclora.spectral.correlation import (
    EdgeCorrelation,
    edge_weights,
    fixed_weights,
    magnitude_weights,
    stack_signals,
    unstack_signals,
)
from speclora.spectral.devices import broadcast_from_rank0, float32_math, move_to
from speclora.spectral.eigen import (
    SOLVERS,
    EigenResult,
    EigenSolverError,
    dense_threshold_for,
    smallest_eigenpairs,
)
from speclora.spectral.filters import (
    TABLE3_COEFFICIENTS,
    TABLE3_EDGES,
    band_energy,
    band_response,
    coordination_response,
    eigen_lr_response,
    hypergradient_step,
)
from speclora.spectral.graph import EDGE_KINDS, GraphLayout, build_edges, class_subgraph, graph_statistics
from speclora.spectral.laplacian import laplacian

log = logging.getLogger(__name__)


class SpectralGraphCallback(L.Callback):
    """Spectral coordination of per-task LoRA adapters (seed paper §3.1–3.3; DESIGN.md is the spec).

    Args:
        k: eigenpairs per shape class (the low band); at most n_c, and n_c ≥ 3k where LOBPCG is used.
        refresh_every: K, steps between eigenpair refreshes (10–50 in the paper, §3.2).
        ema_decay: μ of the gradient-correlation EMAs.
        alpha: α of w_ij = exp(−α(1−|ρ_ij|)) (§3.1).
        edge_weighting: ``correlation`` (the method), ``magnitude`` or ``fixed`` (ablations, Table 7).
        edge_kinds: which of ``intra``, ``inter_task``, ``inter_layer`` edges the graph holds
            (a "layer-wise graph" ablation keeps ``inter_layer`` out, or only it: see configs).
        normalization: ``sym`` (L_sym = I − D^{-1/2} W D^{-1/2}) or ``none`` (L = D − W).
        coordination: apply P_low g + ε P_high g to the gradients.
        epsilon: ε, the share of the high band kept by coordination.
        band_filter: apply the piecewise-constant band response (Table 3) to the gradients.
        band_coefficients / band_edges: the band response (defaults: Table 3).
        eigen_lr: per-eigencomponent learning rates η_i = η(1 + β exp(−λ_i/σ)) on the optimizer's update.
        beta, sigma: β ≥ 0 and σ > 0 of the per-eigencomponent learning rates.
        learned: learn per-eigencomponent coefficients of the update online by hypergradient descent.
        hyper_lr: step of the multiplicative hypergradient update; hyper_clip its range.
        regularizer: ``highpass`` (γ‖(I − UUᵀ)(Θ − Θ₀)‖²), ``dirichlet`` (γ tr(ΔΘᵀ L ΔΘ)) or ``none``.
        gamma: γ of the regulariser, in [0, 1] (the paper: 0.01–0.05).
        solver: ``auto`` (dense eigh for classes of at most ``dense_threshold`` nodes, warm-started LOBPCG
            above), ``dense`` (always eigh) or ``lobpcg`` (always LOBPCG, warm-started; every class needs
            n_c ≥ 3k, checked at set-up).
        dense_threshold: the crossover of ``auto``; None: the training device's (``DENSE_THRESHOLDS``:
            2000 nodes on a CPU, 4000 on a CUDA device).
        log_every: steps between spectrum / energy / coefficient logs (TensorBoard).
        heatmap_every: steps between coordination heatmaps (0: never).
        seed: seed of LOBPCG's random start (the same on every rank).
    """

    def __init__(
        self,
        k: int = 32,
        refresh_every: int = 20,
        ema_decay: float = 0.9,
        alpha: float = 5.0,
        edge_weighting: Literal["correlation", "magnitude", "fixed"] = "correlation",
        edge_kinds: Sequence[str] = EDGE_KINDS,
        normalization: Literal["sym", "none"] = "sym",
        coordination: bool = True,
        epsilon: float = 0.1,
        band_filter: bool = True,
        band_coefficients: Sequence[float] = TABLE3_COEFFICIENTS,
        band_edges: Sequence[float] | None = TABLE3_EDGES,
        eigen_lr: bool = True,
        beta: float = 1.0,
        sigma: float = 0.2,
        learned: bool = True,
        hyper_lr: float = 0.01,
        hyper_clip: tuple[float, float] = (0.1, 3.0),
        regularizer: Literal["highpass", "dirichlet", "none"] = "highpass",
        gamma: float = 0.02,
        solver: Literal["auto", "dense", "lobpcg"] = "auto",
        dense_threshold: int | None = None,
        log_every: int = 50,
        heatmap_every: int = 100,
        seed: int = 0,
    ) -> None:
        super().__init__()
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
        ]
        for key, value, ok, allowed in checks:
            if not ok:
                raise ValueError(f"SpectralGraphCallback {key}={value}; allowed: {allowed}")
        if dense_threshold is not None and not dense_threshold >= 0:
            raise ValueError(f"SpectralGraphCallback dense_threshold={dense_threshold}; allowed: an integer >= 0, "
                             "or null for the training device's crossover")
        for key, value, allowed in (("edge_weighting", edge_weighting, ("correlation", "magnitude", "fixed")),
                                    ("solver", solver, SOLVERS),
                                    ("normalization", normalization, ("sym", "none")),
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
        self.k, self.refresh_every, self.ema_decay, self.alpha = k, refresh_every, ema_decay, alpha
        self.edge_weighting, self.edge_kinds = edge_weighting, tuple(edge_kinds)
        self.normalization = None if normalization == "none" else normalization
        self.coordination, self.epsilon = coordination, epsilon
        self.band_filter, self.band_coefficients = band_filter, tuple(band_coefficients)
        self.band_edges = None if band_edges is None else tuple(band_edges)
        self.eigen_lr, self.beta, self.sigma = eigen_lr, beta, sigma
        self.learned, self.hyper_lr, self.hyper_clip = learned, hyper_lr, tuple(hyper_clip)
        self.regularizer, self.gamma = regularizer, gamma
        self.solver, self.dense_threshold = solver, dense_threshold
        self.log_every, self.heatmap_every, self.seed = log_every, heatmap_every, seed
        # built in setup (on the CPU), moved to the parameters' device from on_train_start on
        self.layers: list[MultiTaskLoRALinear] = []
        self.layout: GraphLayout | None = None
        self.edge_index: Tensor | None = None
        self.edge_type: Tensor | None = None
        self.corr: EdgeCorrelation | None = None
        self.class_k: list[int] = []
        self._class_edges_index: list[Tensor] = []  # per class: its edges relabelled to its rows (2, E_c)
        self._class_edges_ids: list[Tensor] = []  # per class: their positions in edge_index (E_c,)
        self._device = torch.device("cpu")  # where the state lives now
        self.last_refresh: list[dict[str, Any]] = []  # per class: method, iterations, residual, seconds
        # state (state_dict): eigenpairs, learned coefficients, anchors, counters
        self.values: list[Tensor | None] = []
        self.vectors: list[Tensor | None] = []
        self.h_learned: list[Tensor | None] = []
        self.theta0: list[Tensor] = []
        self.delta_prev: list[Tensor | None] = []
        # derived caches (not checkpointed: recomputed from the state): Uᵀ Δ_{t−1} and Uᵀ Θ_0 per class,
        # each with the eigenvector version it was computed with
        self._vectors_version: list[int] = []
        self._c_delta_prev: list[tuple[int, Tensor] | None] = []
        self._c_theta0: list[tuple[int, Tensor] | None] = []
        self._response_cache: dict[int, tuple[int, Tensor, float]] = {}
        self._work: dict[str, list[Tensor]] = {}
        self.counters = {"refreshes": 0, "fallbacks": 0, "kept_previous": 0, "solver_failed": 0,
                         "skipped_nonfinite": 0}
        self._pending_state: dict[str, Any] | None = None
        self._theta_before: list[Tensor] | None = None
        self._step_of_snapshot = -1
        self._time_spent = 0.0
        self._batch_start = 0.0
        self._time_total = 0.0

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.layout is not None:
            return
        named = lora_modules(pl_module)
        if not named:
            raise ValueError("SpectralGraphCallback needs per-task LoRA layers (methods Independent, Single, "
                             "SpecLoRA); this model has none")
        self.layers = [m for _, m in named]
        num_tasks = self.layers[0].num_adapters
        slots = [(s.layer, s.module, s.d_in, s.d_out, self.layers[i].r) for i, s in enumerate(pl_module.slots)]
        self.layout = GraphLayout(num_tasks, slots)
        # the graph is built on the CPU: the module is not on its training device yet (see the module's doc)
        edge_index, edge_type = build_edges(self.layout, self.edge_kinds)  # (2, E), (E,)
        if edge_index.numel() == 0:
            raise ValueError(f"the parameter graph has no edge of kinds {list(self.edge_kinds)} for {num_tasks} "
                             "task(s); add 'intra' or 'inter_layer' edges")
        self.edge_index, self.edge_type = edge_index, edge_type
        self._device = edge_index.device
        self.corr = EdgeCorrelation(edge_index, self.layout.num_nodes, self.ema_decay,
                                    node_class=self.layout.node_class)
        positions = torch.arange(edge_index.size(1))  # (E,)
        self._class_edges_index, self._class_edges_ids = [], []
        for c in range(len(self.layout.shape_classes)):
            ei, ids = class_subgraph(self.layout, edge_index, positions, c)  # (2, E_c), (E_c,)
            self._class_edges_index.append(ei)
            self._class_edges_ids.append(ids)
        self.class_k = [min(self.k, ids.numel()) for _, ids in self.layout.shape_classes]
        # the device the strategy will train on (cuda:N under DDP): its crossover decides dense vs LOBPCG
        self._check_solver(getattr(getattr(trainer, "strategy", None), "root_device", None) or pl_module.device)
        n_classes = len(self.layout.shape_classes)
        self.values, self.vectors = [None] * n_classes, [None] * n_classes
        self.h_learned = [None] * n_classes
        self.delta_prev = [None] * n_classes
        self.theta0 = []  # taken at on_train_start, on the training device (or restored from a checkpoint)
        self.last_refresh = []
        self._work = {}
        self._reset_caches()
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
            self._pending_state = None
        stats = graph_statistics(edge_index, edge_type, self.layout.num_nodes)
        self._graph_stats = stats
        log.info("parameter graph: %d nodes, %s", self.layout.num_nodes,
                 {kind: int(v["num_edges"]) for kind, v in stats.items()})

    def _check_solver(self, device: torch.device) -> None:
        """LOBPCG needs n_c >= 3k in every class it solves on ``device``: a clear error before training."""
        for c, ((d, r), ids) in enumerate(self.layout.shape_classes):
            n_c, k_c = ids.numel(), self.class_k[c]
            if self.class_solver(n_c, device) == "lobpcg" and n_c < 3 * k_c:
                fix = "solver: dense" if self.solver == "lobpcg" else "a dense_threshold of at least that n"
                raise ValueError(
                    f"SpectralGraphCallback k={self.k}, solver={self.solver!r}: shape class {c} ({d}x{r} signals) "
                    f"has n={n_c} nodes and is solved by LOBPCG on {device}, which needs n >= 3k = {3 * k_c}; "
                    f"lower k to at most {n_c // 3}, or use {fix}")

    def class_solver(self, n: int, device: torch.device | str) -> str:
        """The solver of an n-node class on ``device``: ``dense`` or ``lobpcg`` (``auto`` resolved)."""
        if self.solver != "auto":
            return self.solver
        threshold = self.dense_threshold if self.dense_threshold is not None else dense_threshold_for(device)
        return "dense" if n <= threshold else "lobpcg"

    def _reset_caches(self) -> None:
        n_classes = len(self.layout.shape_classes)
        self._vectors_version = [0] * n_classes
        self._c_delta_prev = [None] * n_classes
        self._c_theta0 = [None] * n_classes
        self._response_cache = {}

    # ------------------------------------------------------------------ devices
    def _param_device(self) -> torch.device:
        return self.layers[0].lora_A.device

    def _ensure_device(self) -> None:
        """Bring the whole state to the LoRA parameters' device if it is elsewhere (one comparison otherwise)."""
        device = self._param_device()
        if device != self._device:
            self._move_to(device)

    def _move_to(self, device: torch.device) -> None:
        """Move every tensor the callback holds to ``device``: exact copies, so a run continues bit for bit."""
        log.info("SpectralGraphCallback: state moved from %s to %s (the LoRA parameters' device)", self._device,
                 device)
        self._check_solver(device)  # with solver auto, the crossover is the new device type's
        self.edge_index, self.edge_type = move_to(self.edge_index, device), move_to(self.edge_type, device)
        self.corr.to(device)
        self._class_edges_index = move_to(self._class_edges_index, device)
        self._class_edges_ids = move_to(self._class_edges_ids, device)
        self.values, self.vectors = move_to(self.values, device), move_to(self.vectors, device)
        self.h_learned, self.theta0 = move_to(self.h_learned, device), move_to(self.theta0, device)
        self.delta_prev = move_to(self.delta_prev, device)
        self._c_delta_prev, self._c_theta0 = move_to(self._c_delta_prev, device), move_to(self._c_theta0, device)
        self._response_cache = move_to(self._response_cache, device)
        self._theta_before = None  # views of the work buffers, which are allocated anew on the device
        self._work = {}
        self._device = device

    def _take_theta0(self) -> None:
        """Θ₀, the adapters at the start of training, unless a checkpoint restored it."""
        if not self.theta0:
            self.theta0 = [s.detach().clone() for s in self._signals(param=True)]  # [(n_c, p_c)]

    def _projected(self, cache: list, c: int, signal: Tensor) -> Tensor:
        """Uᵀ signal (k, p) for class c, cached until the class's eigenvectors change."""
        version = self._vectors_version[c]
        if cache[c] is None or cache[c][0] != version:
            cache[c] = (version, self.vectors[c].T @ signal)  # (k, p)
        return cache[c][1]

    def _buffers(self, name: str) -> list[Tensor] | None:
        """Per-class (n_c, p_c) float32 work buffers, allocated once: the per-step signals are stacked into
        them instead of into fresh tensors (on a CPU every fresh multi-MB tensor costs page faults)."""
        if self.layers[0].lora_A.dtype != torch.float32:
            return None  # low-precision adapters: stack, then convert (allocates)
        bufs = self._work.get(name)
        if bufs is None:
            device = self.layers[0].lora_A.device
            bufs = [torch.empty(ids.numel(), d * r, device=device) for (d, r), ids in self.layout.shape_classes]
            self._work[name] = bufs
        return bufs

    def _signals(self, param: bool = False, grad: bool = False, buffer: str | None = None) -> list[Tensor]:
        """The stacked aligned signals (n_c, p_c) per shape class, of the parameters or their gradients,
        written into the work buffers ``buffer`` when given (valid until the next use of that buffer)."""
        out = self._buffers(buffer) if buffer is not None else None
        if grad:
            A = [m.lora_A.grad if m.lora_A.grad is not None else torch.zeros_like(m.lora_A) for m in self.layers]
            B = [m.lora_B.grad if m.lora_B.grad is not None else torch.zeros_like(m.lora_B) for m in self.layers]
        else:
            A = [m.lora_A.detach() for m in self.layers]
            B = [m.lora_B.detach() for m in self.layers]
        return [s.float() for s in stack_signals(self.layout, A, B, out=out)]

    def _write(self, signals: list[Tensor], grad: bool) -> None:
        A, B = unstack_signals(self.layout, signals)
        for m, a, b in zip(self.layers, A, B):
            if grad:
                if m.lora_A.grad is None:
                    m.lora_A.grad = torch.zeros_like(m.lora_A)
                if m.lora_B.grad is None:
                    m.lora_B.grad = torch.zeros_like(m.lora_B)
                m.lora_A.grad.copy_(a)
                m.lora_B.grad.copy_(b)
            else:
                m.lora_A.data.copy_(a)
                m.lora_B.data.copy_(b)

    # ------------------------------------------------------------------ the spectrum
    def _class_edges(self, c: int) -> tuple[Tensor, Tensor]:
        """Edge weights of class c, relabelled to its rows: w_ij by the configured weighting."""
        if self.edge_weighting == "correlation":
            w = edge_weights(self.corr.rho(), self.alpha)  # (E,)
        elif self.edge_weighting == "magnitude":
            w = magnitude_weights(self.corr.magnitude(), self.edge_index, self.alpha)  # (E,)
        else:
            w = fixed_weights(self.edge_type)  # (E,)
        return self._class_edges_index[c], w[self._class_edges_ids[c]]  # (2, E_c), (E_c,)

    def refresh(self, trainer: L.Trainer | None = None) -> bool:
        """Recompute every class's k smallest Laplacian eigenpairs, warm-started from the previous ones.

        Returns False when a class has no eigenpairs to use (every solver failed on a first refresh):
        the step then goes unfiltered, the failure is logged and counted, and the next step tries again.
        """
        start = time.perf_counter()
        results: list[tuple[EigenResult, float, bool]] = []  # per class: result, seconds, warm-started
        for c, (_, ids) in enumerate(self.layout.shape_classes):
            solve_start = time.perf_counter()
            ei, ew = self._class_edges(c)
            n_c = ids.numel()
            lap = laplacian(ei, ew, n_c, self.normalization)  # (n_c, n_c) sparse, float32, on the state's device
            solver = self.class_solver(n_c, lap.device)
            if solver == "dense":
                lap = lap.to_dense()  # (n_c, n_c)
            try:
                result = smallest_eigenpairs(
                    lap, self.class_k[c], X0=self.vectors[c], previous_values=self.values[c],
                    solver=solver, seed=self.seed,
                )
            except EigenSolverError as err:  # only when there were no previous pairs to keep
                self.counters["solver_failed"] += 1
                rank_zero_warn(f"spectral refresh of class {c} failed ({err}); this step is not filtered "
                               f"({self.counters['solver_failed']} failures so far)")
                return False
            results.append((result, time.perf_counter() - solve_start, self.vectors[c] is not None))
            if result.method in ("fallback_dense", "kept_previous"):
                key = "fallbacks" if result.method == "fallback_dense" else "kept_previous"
                self.counters[key] += 1
                rank_zero_warn(f"spectral refresh of class {c}: {result.method} (residual {result.residual:.2e}); "
                               f"{self.counters[key]} so far")
            values, vectors = result.values, result.vectors  # (k,), (n_c, k), on the Laplacian's device
            if trainer is not None and trainer.world_size > 1:
                # every rank must hold the same eigenpairs: rank 0's are the reference
                values = broadcast_from_rank0(trainer.strategy, values)  # (k,)
                vectors = broadcast_from_rank0(trainer.strategy, vectors)  # (n_c, k)
            self.values[c], self.vectors[c] = values, vectors
            self._vectors_version[c] += 1
            if self.learned and self.h_learned[c] is None:
                self.h_learned[c] = torch.ones_like(values)
        self.counters["refreshes"] += 1
        # host numbers only: the solver has synchronised already
        self.last_refresh = [{"method": r.method, "warm": warm, "iterations": r.iterations, "residual": r.residual,
                              "seconds": seconds} for r, seconds, warm in results]
        if trainer is not None:
            log_refresh(trainer, self.last_refresh, time.perf_counter() - start)
        return True

    def gradient_response(self, c: int) -> tuple[Tensor, float]:
        """h_g (k,), h_g,rest of the gradient filter: coordination × band filter (each optional).

        A function of the eigenvalues only: computed once per refresh (no per-step host-to-device copies)."""
        version = self._vectors_version[c]
        cached = self._response_cache.get(c)
        if cached is None or cached[0] != version:
            cached = (version, *self._gradient_response(self.values[c]))
            self._response_cache[c] = cached
        return cached[1], cached[2]

    def _gradient_response(self, values: Tensor) -> tuple[Tensor, float]:
        h, rest = torch.ones_like(values), 1.0
        if self.coordination:
            hc, rc = coordination_response(values.numel(), self.epsilon, device=values.device)
            h, rest = h * hc.to(h), rest * rc
        if self.band_filter:
            hb, rb = band_response(values, self.band_coefficients, self.band_edges)
            h, rest = h * hb.to(h), rest * rb
        return h, rest

    def update_response(self, c: int) -> Tensor | None:
        """h_u (k,) of the update filter (rest 1): per-eigencomponent learning rates × learned coefficients."""
        values = self.values[c]
        h = None
        if self.eigen_lr:
            h, _ = eigen_lr_response(values, self.beta, self.sigma)
        if self.learned and self.h_learned[c] is not None:
            h = self.h_learned[c] if h is None else h * self.h_learned[c]
        return h

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the strategy has moved the module to its device by now, and a checkpoint has been restored
        self._ensure_device()
        self._take_theta0()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_start = time.perf_counter()

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        start = time.perf_counter()
        self._ensure_device()
        self._take_theta0()
        with float32_math(self._device):
            self._filter_step(trainer, pl_module)
        self._time_spent += time.perf_counter() - start

    def _filter_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        G = self._signals(grad=True, buffer="grad")  # [(n_c, p_c)]
        if not self.corr.update(G):
            if self.corr.num_skipped_nonfinite > self.counters["skipped_nonfinite"]:
                self.counters["skipped_nonfinite"] = self.corr.num_skipped_nonfinite
                rank_zero_warn(f"SpectralGraphCallback: non-finite LoRA gradient at step {trainer.global_step}; "
                               "the spectral update is skipped (and the module drops the step)")
            self._theta_before = None
            return
        step = trainer.global_step
        if any(v is None for v in self.vectors) or step % self.refresh_every == 0:
            if not self.refresh(trainer) and any(v is None for v in self.vectors):
                self._theta_before = None
                return
        # Table 2's energy by band is of the raw gradients: taken before they are filtered in place below
        energies = ([band_energy(g, U, v) for g, U, v in zip(G, self.vectors, self.values)]
                    if step % self.log_every == 0 else None)
        snapshot = self.eigen_lr or self.learned
        theta = self._signals(param=True, buffer="theta") if (self.regularizer != "none" or snapshot) else None
        filtered, reg_values = [], []
        for c, g in enumerate(G):
            U = self.vectors[c]  # (n_c, k)
            cg = U.T @ g  # (k, p_c): Uᵀ G, shared by the hypergradient and the filter
            if self.learned and self.delta_prev[c] is not None:
                # ∂L(θ_t)/∂h_i = ⟨U_iᵀ G_t, U_iᵀ Δ_{t−1}⟩
                cd = self._projected(self._c_delta_prev, c, self.delta_prev[c])  # (k, p_c)
                self.h_learned[c] = hypergradient_step(self.h_learned[c], cg, cd, self.hyper_lr, self.hyper_clip)
            h, rest = self.gradient_response(c)  # (1, 1.0) when neither coordination nor band filter is on
            # G' = U diag(h) Uᵀ G + h_rest (G − U Uᵀ G) = h_rest G + U diag(h − h_rest) Uᵀ G
            low = (h - rest).unsqueeze(1) * cg  # (k, p_c)
            # g is this step's own stacked copy: updated in place from here on
            g2 = g if rest == 1.0 else g.mul_(rest)  # (n_c, p_c)
            if self.regularizer == "highpass" and self.gamma > 0:
                # R = γ‖(I − U Uᵀ) ΔΘ‖² = γ(‖ΔΘ‖² − ‖Uᵀ ΔΘ‖²),  ∇R = 2γ ΔΘ − 2γ U Uᵀ ΔΘ
                work = self._buffers("delta")
                delta = torch.sub(theta[c], self.theta0[c], out=work[c] if work else None)  # (n_c, p_c)
                c_delta = U.T @ theta[c] - self._projected(self._c_theta0, c, self.theta0[c])  # (k, p_c): Uᵀ ΔΘ
                g2 = g2.add_(delta, alpha=2 * self.gamma)
                low = low.sub_(c_delta, alpha=2 * self.gamma)
                energy = torch.linalg.vector_norm(delta).square() - c_delta.square().sum()
                reg_values.append(self.gamma * energy.clamp_min(0))
            elif self.regularizer == "dirichlet" and self.gamma > 0:
                g2, value = self._dirichlet(c, g2, theta[c] - self.theta0[c])
                reg_values.append(value)
            filtered.append(g2.addmm_(U, low))  # (n_c, p_c): + U diag(h − h_rest) Uᵀ G − 2γ U Uᵀ ΔΘ
        self._write(filtered, grad=True)
        if reg_values:
            pl_module.log("train/spectral/reg", torch.stack(reg_values).sum(), batch_size=1)
        if snapshot:
            self._theta_before = theta  # the parameters are unchanged since: only the gradients were written
            self._step_of_snapshot = step
        if energies is not None:
            log_step(self, trainer, pl_module, energies)

    def _dirichlet(self, c: int, g: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
        # R = γ tr(ΔΘᵀ L ΔΘ),  ∇R = 2γ L ΔΘ
        ei, ew = self._class_edges(c)
        lap = laplacian(ei, ew, delta.size(0), self.normalization)  # (n_c, n_c) sparse
        ld = torch.sparse.mm(lap, delta)  # (n_c, p_c)
        return g.add_(ld, alpha=2 * self.gamma), self.gamma * (delta * ld).sum()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        start = time.perf_counter()
        self._ensure_device()
        if self._theta_before is not None and trainer.global_step == self._step_of_snapshot + 1:
            with float32_math(self._device):
                self._filter_update()
        now = time.perf_counter()
        self._time_spent += now - start
        self._time_total += now - self._batch_start
        if trainer.global_step % self.log_every == 0 and self._time_total > 0:
            pl_module.log("train/spectral/time_share", self._time_spent / self._time_total, batch_size=1)

    def _filter_update(self) -> None:
        """Θ ← Θ_before + U diag(h_u) Uᵀ Δ + (Δ − U Uᵀ Δ) on the optimizer's update Δ."""
        before = self._theta_before
        after = self._signals(param=True, buffer="after")
        out = []
        for c, (b, a) in enumerate(zip(before, after)):
            # Δ (n_c, p_c): the optimizer's update, into last step's Δ tensor when there is one
            prev = self.delta_prev[c]
            delta = torch.sub(a, b, out=prev) if prev is not None and prev.shape == a.shape else a - b
            self.delta_prev[c] = delta
            U = self.vectors[c]
            c_delta = U.T @ delta  # (k, p_c)
            self._c_delta_prev[c] = (self._vectors_version[c], c_delta)
            h = self.update_response(c)
            # Θ ← Θ_before + U diag(h_u) Uᵀ Δ + (Δ − U Uᵀ Δ) = Θ_after + U diag(h_u − 1) Uᵀ Δ
            out.append(a.addmm_(U, (h - 1).unsqueeze(1) * c_delta) if h is not None else a)
        self._write(out, grad=False)
        self._theta_before = None

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        if self.layout is None:
            return {}
        return {
            "corr": self.corr.state_dict(),
            "values": self.values,
            "vectors": self.vectors,
            "h_learned": self.h_learned,
            "theta0": self.theta0,
            "delta_prev": [d.clone() if d is not None else None for d in self.delta_prev],  # reused in place
            "counters": dict(self.counters),
            "num_nodes": self.layout.num_nodes,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.layout is None:  # restored before setup: apply once the graph exists
            self._pending_state = state_dict
        else:
            self._apply_state(state_dict)

    def _apply_state(self, state: dict[str, Any]) -> None:
        if state["num_nodes"] != self.layout.num_nodes:
            raise ValueError(f"checkpoint's spectral state has {state['num_nodes']} nodes, this model's graph "
                             f"{self.layout.num_nodes}: the tasks, targets or rank differ")
        # a checkpoint's tensors come where torch.load put them (Lightning: the CPU); they go where the LoRA
        # parameters are now (and follow them from on_train_start on)
        self._ensure_device()
        device = self._device
        self.corr.load_state_dict(state["corr"])

        self.values, self.vectors = move_to(list(state["values"]), device), move_to(list(state["vectors"]), device)
        self.h_learned = move_to(list(state["h_learned"]), device)
        self.delta_prev = move_to(list(state["delta_prev"]), device)
        self.theta0 = move_to(list(state["theta0"]), device)
        self.counters.update(state["counters"])
        self._reset_caches()
