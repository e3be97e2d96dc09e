"""``cagrad`` and ``nash_mtl``: one shared LoRA; the per-task gradients on it combined as d = Σ_t β_t g_t.

A step on a batch holding the tasks S (notation of speclora/methods/weighting.py):

    g_t = ∇_θ (λ_t L_t)              t ∈ S; θ the shared LoRA (every lora_A and lora_B); task_grads.py:
                                     summed per task from per-row activations during the one backward
                                     (``task_grads: rows``), or one backward per task (``backward``)
    K   = G Gᵀ                       (S, S) Gram matrix, float64, read to the host (S² numbers)
    β   = coefficients(K)            CAGrad: cagrad_coefficients;  Nash-MTL: nash_coefficients
    ∇_θ ← Σ_t β_t g_t                replaces Σ_t g_t in θ.grad; the heads keep their plain gradients

Under DDP the per-task gradients are averaged over ranks before K is formed, so every rank solves the same
problem and writes the same gradient. Cost: with ``rows``, two small batched matmuls per LoRA layer in the
backward (no extra backward; ``backward``: one per task of the batch), one pass over θ for K and one
for d, and a solve of size |S| on the host.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from speclora.methods.task_grads import (
    TaskGradientMethod,
    TaskGradients,
    check_task_grads,
    loss_scale,
    replace_batch_gradient,
)
from speclora.methods.weighting import cagrad_coefficients, conflict_share, nash_coefficients
from speclora.model.adapted import AdaptedEncoder, BuildInputs
from speclora.model.lora import lora_modules

if TYPE_CHECKING:
    from speclora.model.module import SpecLoRAModule

__all__ = ["CAGrad", "GradientCombination", "NashMTL"]

class GradientCombination(TaskGradientMethod):
    """One shared LoRA; the per-task gradients on it replaced by a combination Σ_t β_t g_t (subclasses give β)."""

    name: ClassVar[str] = "gradient_combination"
    base: ClassVar[bool] = True  # a shared base, no method of its own (model.method lists only CAGrad, NashMTL)
    needs_tasks: ClassVar[str | None] = "combines the gradients of several tasks"
    one_adapter = True

    def coefficients(self, gram: np.ndarray, scale: float) -> np.ndarray | None:
        """(S,) β from the (S, S) Gram matrix of the (loss-scaled by ``scale``) task gradients; None: keep the
        plain sum this step."""
        raise NotImplementedError

    def limit(self, combined: Tensor, scale: float) -> Tensor:
        """A last change of the (P,) combined gradient (Nash-MTL's norm clip); the identity here."""
        return combined

    # ------------------------------------------------------------------ construction
    def build(self, inputs: BuildInputs) -> AdaptedEncoder:
        adapted = super().build(inputs)
        params, layers = [], [layer for _, layer in lora_modules(adapted.encoder)]
        for layer in layers:
            params += [layer.lora_A, layer.lora_B]  # (1, r, d_in), (1, d_out, r)
        # the step's per-task gradients, between its hooks (``rows``: captured in the one backward)
        adapted.work = TaskGradients(params, rows=self.row_capture(layers))
        return adapted

    # ------------------------------------------------------------------ a training step
    def after_backward(self, module: SpecLoRAModule, per_task_losses: dict[int, Tensor]) -> None:
        """θ.grad ← θ.grad − Σ_t g_t + Σ_t β_t g_t, from the rank-averaged per-task gradients."""
        state: TaskGradients = module.adapted.work
        taken = self.take_task_gradients(module)  # (T, P), (T,)
        if taken is None:
            return
        grads, present = taken
        rows = present.nonzero().squeeze(1)  # (S,) tasks of the (global) batch
        if len(rows) < 2:  # one task: its gradient is the combination
            state.last = None
            return
        g = grads[rows]  # (S, P)
        gram = (g.double() @ g.double().T).cpu().numpy()  # (S, S) K = G Gᵀ, the one host read of the step
        if not np.isfinite(gram).all():  # left to the module's non-finite check, which skips the step
            state.last = {"skipped": "non-finite gradient"}
            return
        scale = loss_scale(module)
        beta = self.coefficients(gram, scale)
        if beta is None:
            return
        b = torch.as_tensor(beta, dtype=g.dtype, device=g.device)  # (S,)
        combined = self.limit(b @ g, scale)  # (P,) d = βᵀ G
        replace_batch_gradient(state.params, g.sum(0), combined)
        state.last = {"beta": beta.tolist(), "tasks": rows.tolist(), "conflict_rate": conflict_share(gram)}
        if getattr(module, "_trainer", None) is not None:
            module.log("train/conflict_rate", state.last["conflict_rate"], batch_size=1)


class CAGrad(GradientCombination):
    """One shared LoRA; conflict-averse combination of the per-task gradients (CAGrad, Liu et al. 2021).

    d maximises the worst task's improvement min_t ⟨g_t, d⟩ within ‖d − g₀‖ ≤ c‖g₀‖ around the average
    gradient g₀ (speclora.methods.weighting.cagrad_coefficients). Written to θ.grad as S·d, so that c = 0 is
    the plain step Σ_t g_t.

    Args:
        c: the radius of the ball, in units of ‖g₀‖ (0: the average gradient; the paper's MTL runs: 0.4).
        rescale: divide d by 1 + c² (the reference code's default), keeping the step's size near g₀'s.
        task_grads: ``rows`` (per-task gradients from per-row activations in the one backward) or
            ``backward`` (one backward per task); the same gradients up to float rounding.
    """

    name: ClassVar[str] = "cagrad"

    def __init__(self, c: float = 0.4, rescale: bool = True, task_grads: Literal["rows", "backward"] = "rows") -> None:
        if not (isinstance(c, int | float) and not isinstance(c, bool) and 0 <= c < float("inf")):
            raise ValueError(f"model.method.init_args.c={c!r}; allowed: a number >= 0")
        self.c = float(c)
        self.rescale = bool(rescale)
        self.task_grads = check_task_grads(task_grads)

    def coefficients(self, gram: np.ndarray, scale: float) -> np.ndarray:
        # β of d (the average-based direction), times S so that c = 0 gives Σ_t g_t
        return gram.shape[0] * cagrad_coefficients(gram, self.c, self.rescale)


class NashMTL(GradientCombination):
    """One shared LoRA; the per-task gradients combined by the Nash bargaining solution (Navon et al. 2022).

    d = Σ_t α_t g_t with Gᵀ G α = 1/α (speclora.methods.weighting.nash_coefficients, on the Gram matrix
    normalised by its Frobenius norm as in the reference code), then ‖d‖ clipped to ``max_norm``. Scale
    invariant: multiplying a task's loss by λ_t leaves α_t g_t unchanged.

    Args:
        max_norm: clip of the combined gradient's norm (the reference code's 1.0); 0 disables it.
        tol: the solve's tolerance on ‖Kα − 1/α‖_∞.
        max_iter: Newton iterations at most (a solve that stops early is counted and warned about).
        task_grads: as for CAGrad.
    """

    name: ClassVar[str] = "nash_mtl"

    def __init__(self, max_norm: float = 1.0, tol: float = 1e-10, max_iter: int = 100,
                 task_grads: Literal["rows", "backward"] = "rows") -> None:
        if not (isinstance(max_norm, int | float) and max_norm >= 0):
            raise ValueError(f"model.method.init_args.max_norm={max_norm!r}; allowed: a number >= 0 (0: no clip)")
        if not (isinstance(tol, int | float) and tol > 0):
            raise ValueError(f"model.method.init_args.tol={tol!r}; allowed: a number > 0")
        if not (isinstance(max_iter, int) and not isinstance(max_iter, bool) and max_iter >= 1):
            raise ValueError(f"model.method.init_args.max_iter={max_iter!r}; allowed: an integer >= 1")
        self.max_norm = float(max_norm)
        self.tol = float(tol)
        self.max_iter = max_iter
        self.task_grads = check_task_grads(task_grads)
        self._unconverged = 0

    def coefficients(self, gram: np.ndarray, scale: float) -> np.ndarray:
        alpha, converged = nash_coefficients(gram, normalize=True, tol=self.tol, max_iter=self.max_iter)
        if not converged:
            self._unconverged += 1
            rank_zero_warn(f"nash_mtl: the bargaining solve stopped before ‖Kα − 1/α‖ <= {self.tol:g} "
                           f"({self._unconverged} step(s) so far); the last iterate is used")
        return alpha

    def limit(self, combined: Tensor, scale: float) -> Tensor:
        if self.max_norm <= 0:
            return combined
        # ‖d / s‖ ≤ max_norm, s the AMP loss scale the gradients carry; a device-side factor, no host read
        norm = combined.norm() / scale  # ()
        return combined * (self.max_norm / norm.clamp_min(self.max_norm))
