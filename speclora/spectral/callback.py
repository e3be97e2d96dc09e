"""SpectralGraphCallback: wires the spectral math of speclora.spectral into Lightning's training loop.

Per optimizer step (DESIGN.md, data path; docs/architecture.md, "The path of a training batch"), with G the
stacked aligned LoRA gradients of every shape class (n_c, p_c), U_f = [U_k | U_x] a class's filter basis (the k
smallest eigenpairs, then the eigenvectors whose response differs from the rest's; ``response.py``) and h,
h_rest the responses on it and on its complement:

    on_before_optimizer_step (gradients synchronised across ranks; the module's skipped flag asked first)
        EMA correlations  ← G where the step goes ahead (EdgeCorrelation.update)
        every K steps: w → the training graph (top-k sparsified if set) → L → eigenpairs → responses
        h_learned ← hypergradient step from ⟨U_kᵀ G_t, U_kᵀ Δ_{t−1}⟩ (kept on a skipped step)
        G' = h_g,rest G + U_f diag(h_g − h_g,rest) U_fᵀ G + ∇ γ R(Θ)    (filters.filter_gradient_)
        Θ_before ← Θ
    optimizer.step, then its post-hook (``step_hooks``: the update filter inside the step)
        Δ = Θ − Θ_before;  Θ ← Θ_before + h_u,rest Δ + U_f diag(h_u − h_u,rest) U_fᵀ Δ   (filter_update_)
        h_u = (1 + β exp(−λ/σ)) (per-eigencomponent learning rates) × h_learned (on U_k)
        Δ_{t} ← Δ (kept on a skipped step)                                    (filters.remember_update)

A step the module skips (a non-finite gradient) leaves everything unchanged: the EMAs, h_learned and Δ_{t−1}
move through ``torch.where`` on the device flag, and the optimizer leaves Θ as it was (Δ = 0, mapped to 0).
An fp16 GradScaler that finds an inf does not call ``optimizer.step`` at all: ``on_train_batch_end`` then
closes the step as a skipped one. Steady-state steps (no refresh, no logging) read nothing back from the
device; the skipped-step count is read at logging steps.

The regulariser enters as its gradient, added to the adapters' gradients before the step: for a
gradient-based optimiser this is the same as adding γ R(Θ) to the loss (logged as train/spectral/reg, the
mean over the steps since the last log). Every part is switchable for the ablations of the paper's Table 7
(configs/methods/speclora*.yaml).

Devices (docs/method.md, "Devices and precision"): Lightning calls ``setup`` before the strategy moves the
module, so ``setup`` builds the graph on the CPU and reads no parameter; from ``on_train_start`` on, checked
at every step hook, the whole state sits on the LoRA parameters' device (cuda:N, or wherever a checkpoint
resumes). The spectral math runs in IEEE float32 whatever the training precision (``float32_math``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Literal

import lightning as L
import torch

from speclora.model.lora import lora_modules
from speclora.spectral.callback_logs import log_step
from speclora.spectral.callback_refresh import RefreshMixin
from speclora.spectral.callback_settings import check_settings
from speclora.spectral.callback_state import StateMixin
from speclora.spectral.correlation import EdgeCorrelation
from speclora.spectral.devices import float32_math
from speclora.spectral.filters import (
    TABLE3_COEFFICIENTS,
    TABLE3_EDGES,
    band_energy,
    filter_gradient_,
    filter_update_,
    hypergradient_step,
)
from speclora.spectral.graph import EDGE_KINDS, GraphLayout, build_edges, class_edges, graph_statistics
from speclora.spectral.regularizer import regularizer_terms
from speclora.spectral.response import ResponseSettings
from speclora.spectral.step_hooks import StepHooks

log = logging.getLogger(__name__)



class SpectralGraphCallback(RefreshMixin, StateMixin, L.Callback):
    """Spectral coordination of per-task LoRA adapters (seed paper §3.1–3.3; DESIGN.md is the spec).

    Args:
        k: eigenpairs per shape class in the low band; at most n_c, and n_c ≥ 3k where LOBPCG is used.
        refresh_every: K, steps between eigenpair refreshes (10–50 in the paper, §3.2).
        ema_decay: μ of the gradient-correlation EMAs.
        alpha: α of w_ij = exp(−α(1−|ρ_ij|)) (§3.1).
        edge_weighting: ``correlation`` (the method), ``magnitude`` (parameter magnitude differences, Table 7's
            ablation as §4.3 describes it), ``gradient_magnitude`` (gradient-norm similarity) or ``fixed``.
        edge_kinds: which of ``intra``, ``inter_task``, ``inter_layer`` edges the graph holds
            (a "layer-wise graph" ablation keeps ``inter_layer`` out, or only it: see configs).
        sparsify_topk: keep each node's ``sparsify_topk`` heaviest edges (an edge stays if either end keeps it)
            at every refresh; None keeps every candidate edge.
        normalization: ``sym`` (L_sym = I − D^{-1/2} W D^{-1/2}) or ``none`` (L = D − W).
        coordination: apply P_low g + ε P_high g to the gradients.
        epsilon: ε, the share of the high band kept by coordination.
        band_filter: apply the piecewise-constant band response (Table 3) to the gradients.
        band_coefficients / band_edges: the band response (defaults: Table 3).
        rest_response: the responses beyond the k computed pairs: ``spectrum`` (the whole spectrum when the solve
            is dense; ``mean`` when only k pairs are known), ``mean`` (the responses at the mean uncomputed
            eigenvalue (tr L − Σλ_i)/(n − k)) or ``last`` (Table 3's last coefficient, rate 1: before issue 14).
        eigen_lr: per-eigencomponent learning rates η_i = η(1 + β exp(−λ_i/σ)) on the optimizer's update.
        beta, sigma: β ≥ 0 and σ > 0 of the per-eigencomponent learning rates.
        learned: learn per-eigencomponent coefficients of the update online by hypergradient descent.
        carry_coefficients: at a refresh, the learned coefficients follow their eigenvectors (``overlap``:
            matched by |U_newᵀ U_old|, signs aligned, degenerate clusters as subspaces) or stay with their
            eigenvalue index (``index``: before issue 14).
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
        edge_weighting: Literal["correlation", "magnitude", "gradient_magnitude", "fixed"] = "correlation",
        edge_kinds: Sequence[str] = EDGE_KINDS,
        sparsify_topk: int | None = None,
        normalization: Literal["sym", "none"] = "sym",
        coordination: bool = True,
        epsilon: float = 0.1,
        band_filter: bool = True,
        band_coefficients: Sequence[float] = TABLE3_COEFFICIENTS,
        band_edges: Sequence[float] | None = TABLE3_EDGES,
        rest_response: Literal["spectrum", "mean", "last"] = "spectrum",
        eigen_lr: bool = True,
        beta: float = 1.0,
        sigma: float = 0.2,
        learned: bool = True,
        carry_coefficients: Literal["overlap", "index"] = "overlap",
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
        check_settings(
            k=k, refresh_every=refresh_every, ema_decay=ema_decay, alpha=alpha, edge_weighting=edge_weighting,
            edge_kinds=edge_kinds, sparsify_topk=sparsify_topk, normalization=normalization, epsilon=epsilon,
            band_filter=band_filter, band_coefficients=band_coefficients, band_edges=band_edges,
            rest_response=rest_response, beta=beta, sigma=sigma, carry_coefficients=carry_coefficients,
            hyper_lr=hyper_lr, hyper_clip=hyper_clip, regularizer=regularizer, gamma=gamma, solver=solver,
            dense_threshold=dense_threshold, log_every=log_every, heatmap_every=heatmap_every,
        )
        self.k, self.refresh_every, self.ema_decay, self.alpha = k, refresh_every, ema_decay, alpha
        self.edge_weighting, self.edge_kinds, self.sparsify_topk = edge_weighting, tuple(edge_kinds), sparsify_topk
        self.normalization = None if normalization == "none" else normalization
        self.coordination, self.epsilon = coordination, epsilon
        self.band_filter, self.band_coefficients = band_filter, tuple(band_coefficients)
        self.band_edges = None if band_edges is None else tuple(band_edges)
        self.rest_response = rest_response
        self.eigen_lr, self.beta, self.sigma = eigen_lr, beta, sigma
        self.learned, self.carry_coefficients = learned, carry_coefficients
        self.hyper_lr, self.hyper_clip = hyper_lr, tuple(hyper_clip)
        self.regularizer, self.gamma = regularizer, gamma
        self.solver, self.dense_threshold = solver, dense_threshold
        self.log_every, self.heatmap_every, self.seed = log_every, heatmap_every, seed
        self.responses = ResponseSettings(coordination, epsilon, band_filter, self.band_coefficients,
                                          self.band_edges, eigen_lr, beta, sigma, rest_response)
        self.step_hooks = StepHooks()  # the update filter's place in optimizer.step (on_train_start)
        self._init_state()  # built in setup (on the CPU), moved to the parameters' device from on_train_start

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
        self._class_edges_index, self._class_edges_ids = class_edges(self.layout, edge_index)  # [(2, E_c)], [(E_c,)]
        self.class_k = [min(self.k, ids.numel()) for _, ids in self.layout.shape_classes]
        # the device the strategy will train on (cuda:N under DDP): its crossover decides dense vs LOBPCG
        self._check_solver(getattr(getattr(trainer, "strategy", None), "root_device", None) or pl_module.device)
        self._reset_class_state()
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
            self._pending_state = None
        stats = graph_statistics(edge_index, edge_type, self.layout.num_nodes)
        self._graph_stats = stats
        log.info("parameter graph: %d nodes, %s", self.layout.num_nodes,
                 {kind: int(v["num_edges"]) for kind, v in stats.items()})

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the strategy has moved the module to its device by now, a checkpoint has been restored, and the
        # optimizers of this fit (a resumed run's are new objects) exist: the update filter joins their step
        self._ensure_device()
        self._take_theta0()
        self._theta_before = None
        self.step_hooks.attach(trainer.optimizers, lambda: self.filter_optimizer_update(trainer, pl_module))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.step_hooks.detach()  # a later fit attaches to its own optimizers, once

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_start = time.perf_counter()

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        start = time.perf_counter()
        self._ensure_device()
        self._take_theta0()
        self._theta_before = None
        with float32_math(self._device):
            self._filter_step(trainer, pl_module)
        self._time_spent += time.perf_counter() - start

    def _filter_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        G = self._signals(grad=True, buffer="grad")  # [(n_c, p_c)]
        # the step's skipped flag (the module's one non-finite check of all gradients, taken before this
        # transform); a bare model without one (tests' Toy) leaves it to the EMA's own finiteness test
        step_skipped = getattr(pl_module, "step_skipped", None)
        skipped = step_skipped() if callable(step_skipped) else None
        usable = self.corr.update(G, skipped)  # () bool on the device: the EMAs moved (G finite, step not skipped)
        go = usable if skipped is None else ~skipped  # () bool: the optimizer takes this step
        step = trainer.global_step
        if any(f is None for f in self.filters) or step % self.refresh_every == 0:
            if not self.refresh(trainer) and any(f is None for f in self.filters):
                return
        # Table 2's energy by band is of the raw gradients: taken before they are filtered in place below
        energies = ([band_energy(g, U, v) for g, U, v in zip(G, self.vectors, self.values)]
                    if step % self.log_every == 0 else None)
        snapshot = self.eigen_lr or self.learned
        theta = self._signals(param=True, buffer="theta") if (self.regularizer != "none" or snapshot) else None
        filtered, reg_values = [], []
        for c, g in enumerate(G):
            filt, U_k = self.filters[c], self.vectors[c]  # (n_c, k)
            U = filt.basis[:, : filt.grad_cols]  # (n_c, m_g): the columns whose gradient response differs
            cg = U.T @ g  # (m_g, p_c): U_fᵀ G, its first k rows shared by the hypergradient and the filter
            if self.learned and self.delta_prev[c] is not None:
                # ∂L(θ_t)/∂h_i = ⟨U_iᵀ G_t, U_iᵀ Δ_{t−1}⟩, a step only where G is usable
                cd = self._projected(self._c_delta_prev, c, self.delta_prev[c])  # (k, p_c)
                h = hypergradient_step(self.h_learned[c], cg[: filt.k], cd, self.hyper_lr, self.hyper_clip)
                self.h_learned[c] = torch.where(usable, h, self.h_learned[c])  # (k,)
            # G' = h_rest G + U diag(h − h_rest) Uᵀ G + ∇γR, in place on this step's own stacked copy g
            reg = reg_low = None
            if self.regularizer != "none" and self.gamma > 0:
                highpass = self.regularizer == "highpass"
                work = self._buffers("delta") if highpass else None
                reg, reg_low, value = regularizer_terms(
                    self.regularizer, self.gamma, theta[c], self.theta0[c], U_k,
                    c_theta0=self._projected(self._c_theta0, c, self.theta0[c]) if highpass else None,
                    laplacian=None if highpass else self.class_laplacian(c), out=work[c] if work else None)
                reg_values.append(value)
            coef = self._grad_coef[c]  # (m_g, 1) h_g − h_g,rest
            filtered.append(filter_gradient_(g, U, cg, coef, filt.grad_rest, self.gamma, reg, reg_low))
        self._write(filtered, grad=True)
        if reg_values:
            total = torch.stack(reg_values).sum()  # ()
            self._reg_sum = total if self._reg_sum is None else self._reg_sum.add_(total)
            self._reg_steps += 1
        if snapshot:  # Θ_before of the update filter: only the gradients were written since
            self._theta_before, self._finite = theta, go
        if energies is not None:
            log_step(self, trainer, pl_module, energies)

    def filter_optimizer_update(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The optimizer's step post-hook (``step_hooks``): the update filter on this step's Δ, once per step
        that took a snapshot (a step with neither per-eigencomponent rates nor learned coefficients takes none)."""
        start = time.perf_counter()
        self._ensure_device()  # (a move drops the snapshot: its views are of the old device's buffers)
        if self._theta_before is None:
            return
        with torch.no_grad(), float32_math(self._device):
            self._filter_update()
        self._time_spent += time.perf_counter() - start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        start = time.perf_counter()
        self._ensure_device()
        if self._theta_before is not None:
            # a snapshot no optimizer step consumed: an fp16 GradScaler found an inf and skipped the call (the
            # module's flag says skipped, Θ = Θ_before); the update memory closes the step as a skipped one
            self._skipped_update()
        now = time.perf_counter()
        self._time_spent += now - start
        self._time_total += now - self._batch_start
        if trainer.global_step % self.log_every == 0 and self._time_total > 0:
            pl_module.log("train/spectral/time_share", self._time_spent / self._time_total, batch_size=1)

    def _filter_update(self) -> None:
        """Θ ← Θ_before + h_u,rest Δ + U diag(h_u − h_u,rest) Uᵀ Δ on the optimizer's update Δ (Δ = 0 on a
        skipped step: Θ stays exactly Θ_before), and the update memory Δ_{t} (``filters.remember_update``)."""
        before, go = self._theta_before, self._finite
        after = self._signals(param=True, buffer="after")
        work = self._buffers("update")
        out = []
        for c, (b, a) in enumerate(zip(before, after)):
            filt, coef = self.filters[c], self._rate_coef[c]  # (m_u,) h_u − h_u,rest
            delta = torch.sub(a, b, out=work[c] if work else None)  # (n_c, p_c): the optimizer's update
            if self.learned:
                # h_u − h_u,rest on the low band: e(λ) × learned coefficients − h_u,rest
                torch.mul(filt.rate[: filt.k], self.h_learned[c], out=coef[: filt.k]).sub_(filt.rate_rest)
            a, c_delta = filter_update_(a, delta, filt.basis[:, : coef.numel()], coef, filt.rate_rest)
            out.append(a)  # (n_c, p_c); c_delta = Uᵀ Δ (m_u, p_c)
            if self.learned:
                self._remember(c, delta, c_delta[: filt.k], go)
        self._write(out, grad=False)
        self._theta_before = None
