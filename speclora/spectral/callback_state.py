"""Where SpectralGraphCallback's state lives: on the LoRA parameters' device (moved with them), in per-class
work buffers (the stacked signals of a step), and in checkpoints (docs/method.md, "Devices and precision",
"Checkpoints"). A mixin of the callback: it reads the callback's layers, layout and state.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from speclora.spectral.devices import move_to
from speclora.spectral.filters import remember_update
from speclora.spectral.response import ClassFilter
from speclora.spectral.signals import stack_signals, write_signals

if TYPE_CHECKING:
    from torch_geometric.data import Data

    from speclora.model.lora import MultiTaskLoRALinear
    from speclora.spectral.callback import SpectralGraphCallback
    from speclora.spectral.correlation import EdgeCorrelation
    from speclora.spectral.graph import GraphLayout

log = logging.getLogger(__name__)

STATE_FORMAT = 2  # the callback's checkpoint layout (1: before issue 14, no filters or graph weights)


class StateMixin:
    """Devices, work buffers and checkpoints of the callback's state; see the module's doc."""

    def _init_state(self: SpectralGraphCallback) -> None:
        """The callback's state before ``setup``: empty, on the CPU."""
        self.layers: list[MultiTaskLoRALinear] = []
        self.layout: GraphLayout | None = None
        self.edge_index: Tensor | None = None
        self.edge_type: Tensor | None = None
        self.corr: EdgeCorrelation | None = None
        self.class_k: list[int] = []
        self._class_edges_index: list[Tensor] = []  # per class: its edges relabelled to its rows (2, E_c)
        self._class_edges_ids: list[Tensor] = []  # per class: their positions in edge_index (E_c,)
        self._device = torch.device("cpu")  # where the state lives now
        self.last_refresh: list[dict[str, Any]] = []  # per class: method, iterations, residual, seconds, basis
        # state (state_dict): the training graph's weights, eigenpairs and responses, learned coefficients,
        # anchors, counters
        self.graph: Data | None = None  # the training graph of the last refresh (edge_index, edge_weight, ...)
        self.graph_weight: Tensor | None = None  # (E,) its weights on every candidate edge, 0 where dropped
        self.values: list[Tensor | None] = []  # per class: the low band λ_1..λ_k (k,)
        self.vectors: list[Tensor | None] = []  # per class: U_k (n_c, k)
        self.filters: list[ClassFilter | None] = []  # per class: the basis and its responses
        self.h_learned: list[Tensor | None] = []
        self.theta0: list[Tensor] = []
        self.delta_prev: list[Tensor | None] = []
        self._counts = {"refreshes": 0, "fallbacks": 0, "kept_previous": 0, "solver_failed": 0}
        # derived (not checkpointed: recomputed from the state): Uᵀ Δ_{t−1} and Uᵀ Θ_0 per class, each with the
        # eigenvector version it was computed with; per-refresh coefficients; the Laplacians of the graph
        self._vectors_version: list[int] = []
        self._c_delta_prev: list[tuple[int, Tensor] | None] = []
        self._c_theta0: list[tuple[int, Tensor] | None] = []
        self._grad_coef: list[Tensor | None] = []
        self._rate_coef: list[Tensor | None] = []
        self._laplacians: list[Tensor | None] = []
        self._work: dict[str, list[Tensor]] = {}
        self._pending_state: dict[str, Any] | None = None
        self._theta_before: list[Tensor] | None = None
        self._finite: Tensor | None = None  # () bool: this step goes ahead (the module's flag, negated)
        self._reg_sum: Tensor | None = None  # Σ of the regulariser's values since the last log (device)
        self._reg_steps = 0
        self._skipped_reported = 0
        self._time_spent = 0.0
        self._batch_start = 0.0
        self._time_total = 0.0

    def _reset_class_state(self: SpectralGraphCallback) -> None:
        """Per shape class: no eigenpairs, filters, learned coefficients or update memory yet (set-up)."""
        n_classes = len(self.layout.shape_classes)
        self.values, self.vectors, self.filters = [None] * n_classes, [None] * n_classes, [None] * n_classes
        self.h_learned = [None] * n_classes
        self.delta_prev = [None] * n_classes
        self.theta0 = []  # taken at on_train_start, on the training device (or restored from a checkpoint)
        self.graph, self.graph_weight = None, None
        self.last_refresh = []
        self._work = {}
        self._reset_caches()

    def _reset_caches(self: SpectralGraphCallback) -> None:
        """The derived per-class values (recomputed from the state when needed)."""
        n_classes = len(self.layout.shape_classes)
        self._vectors_version = [0] * n_classes
        self._c_delta_prev = [None] * n_classes
        self._c_theta0 = [None] * n_classes
        self._grad_coef, self._rate_coef = [None] * n_classes, [None] * n_classes
        self._laplacians = [None] * n_classes

    def _param_device(self: SpectralGraphCallback) -> torch.device:
        return self.layers[0].lora_A.device

    def _ensure_device(self: SpectralGraphCallback) -> None:
        """Bring the whole state to the LoRA parameters' device if it is elsewhere (one comparison otherwise)."""
        device = self._param_device()
        if device != self._device:
            self._move_to(device)

    def _move_to(self: SpectralGraphCallback, device: torch.device) -> None:
        """Move every tensor the callback holds to ``device``: exact copies, so a run continues bit for bit."""
        log.info("SpectralGraphCallback: state moved from %s to %s (the LoRA parameters' device)", self._device,
                 device)
        self._check_solver(device)  # with solver auto, the crossover is the new device type's
        self.edge_index, self.edge_type = move_to(self.edge_index, device), move_to(self.edge_type, device)
        self.corr.to(device)
        self._class_edges_index = move_to(self._class_edges_index, device)
        self._class_edges_ids = move_to(self._class_edges_ids, device)
        self.values, self.vectors = move_to(self.values, device), move_to(self.vectors, device)
        self.filters = [f.to(device) if f is not None else None for f in self.filters]
        if self.graph is not None:
            self.graph = self.graph.to(device)
        self.graph_weight = move_to(self.graph_weight, device)
        self.h_learned, self.theta0 = move_to(self.h_learned, device), move_to(self.theta0, device)
        self.delta_prev = move_to(self.delta_prev, device)
        self._c_delta_prev, self._c_theta0 = move_to(self._c_delta_prev, device), move_to(self._c_theta0, device)
        self._grad_coef, self._rate_coef = move_to(self._grad_coef, device), move_to(self._rate_coef, device)
        self._laplacians = move_to(self._laplacians, device)
        self._reg_sum = move_to(self._reg_sum, device)
        self._theta_before, self._finite = None, None  # views of the work buffers, allocated anew on the device
        self._work = {}
        self._device = device

    def _take_theta0(self: SpectralGraphCallback) -> None:
        """Θ₀, the adapters at the start of training, unless a checkpoint restored it."""
        if not self.theta0:
            self.theta0 = [s.detach().clone() for s in self._signals(param=True)]  # [(n_c, p_c)]

    def _projected(self: SpectralGraphCallback, cache: list, c: int, signal: Tensor) -> Tensor:
        """U_kᵀ signal (k, p) for class c, cached until the class's eigenvectors change."""
        version = self._vectors_version[c]
        if cache[c] is None or cache[c][0] != version:
            cache[c] = (version, self.vectors[c].T @ signal)  # (k, p)
        return cache[c][1]

    def _buffers(self: SpectralGraphCallback, name: str) -> list[Tensor] | None:
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

    def _signals(self: SpectralGraphCallback, param: bool = False, grad: bool = False,
                 buffer: str | None = None) -> list[Tensor]:
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

    def _write(self: SpectralGraphCallback, signals: list[Tensor], grad: bool) -> None:
        """Per-class signals back into the adapters (or their gradients): one multi-tensor copy."""
        if grad:
            for m in self.layers:
                if m.lora_A.grad is None:
                    m.lora_A.grad = torch.zeros_like(m.lora_A)
                if m.lora_B.grad is None:
                    m.lora_B.grad = torch.zeros_like(m.lora_B)
            write_signals(self.layout, signals, [m.lora_A.grad for m in self.layers],
                          [m.lora_B.grad for m in self.layers])
        else:
            write_signals(self.layout, signals, [m.lora_A for m in self.layers], [m.lora_B for m in self.layers])

    @property
    def counters(self: SpectralGraphCallback) -> dict[str, int]:
        """refreshes, fallbacks, kept_previous, solver_failed and skipped_nonfinite (a host read)."""
        skipped = self.corr.num_skipped_nonfinite if self.corr is not None else 0
        return {**self._counts, "skipped_nonfinite": skipped}

    # ------------------------------------------------------------------ the update memory (learned coefficients)
    def _skipped_update(self: SpectralGraphCallback) -> None:
        """A step whose optimizer call was skipped: Θ is Θ_before, and the update memory stays as on any skipped
        step (Δ = 0 where the flag is set; what ``_filter_update`` leaves there, with no write of Θ)."""
        if self.learned:
            for c, b in enumerate(self._theta_before):
                zero = torch.zeros_like(b)  # (n_c, p_c): Δ of a step the optimizer did not take
                self._remember(c, zero, zero.new_zeros(self.filters[c].k, zero.size(1)), self._finite)
        self._theta_before = None

    def _remember(self: SpectralGraphCallback, c: int, delta: Tensor, c_delta: Tensor, go: Tensor) -> None:
        """Δ_{t} and U_kᵀ Δ_{t} (the latter cached with the eigenvectors' version) where the step went ahead."""
        prev = self.delta_prev[c]
        c_prev = self._projected(self._c_delta_prev, c, prev) if prev is not None else None  # (k, p_c)
        self.delta_prev[c], c_new = remember_update(prev, c_prev, delta, c_delta, go)
        self._c_delta_prev[c] = (self._vectors_version[c], c_new)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self: SpectralGraphCallback) -> dict[str, Any]:
        if self.layout is None:
            return {}
        return {
            "format": STATE_FORMAT,
            "corr": self.corr.state_dict(),
            "graph_weight": self.graph_weight,
            "values": self.values,
            "vectors": self.vectors,
            "filters": [f.state() if f is not None else None for f in self.filters],
            "h_learned": self.h_learned,
            "theta0": self.theta0,
            "delta_prev": [d.clone() if d is not None else None for d in self.delta_prev],  # updated in place
            "counters": self.counters,
            "num_nodes": self.layout.num_nodes,
        }

    def load_state_dict(self: SpectralGraphCallback, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.layout is None:  # restored before setup: apply once the graph exists
            self._pending_state = state_dict
        else:
            self._apply_state(state_dict)

    def _apply_state(self: SpectralGraphCallback, state: dict[str, Any]) -> None:
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
        counters = dict(state["counters"])
        self._counts.update({key: int(counters[key]) for key in self._counts if key in counters})
        self._reset_caches()
        self.filters = [None] * len(self.layout.shape_classes)
        if state.get("format", 1) >= STATE_FORMAT:
            self._graph_from_weight(state["graph_weight"])
            for c, filt in enumerate(state["filters"]):
                if filt is not None:
                    self._set_filter(c, ClassFilter.from_state(filt, device))
        else:  # written before the filters were checkpointed: the next step refreshes them
            rank_zero_warn("SpectralGraphCallback: a spectral state of format 1 (before issue 14); the responses "
                           "are rebuilt by a refresh at the next step")
