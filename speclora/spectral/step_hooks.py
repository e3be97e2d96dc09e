"""Optimizer step hooks of the spectral callback: where the update filter enters the optimizer's step.

The update filter acts on the optimizer's update Δ = Θ_after − Θ_before (``filters.filter_update_``). It runs
as a step post-hook (``torch.optim.Optimizer.register_step_post_hook``) of the trainer's optimizer, so that
``optimizer.step()`` returns with the filtered Θ: the method's ``after_optimizer_step``, the LR scheduler and
every later hook see the step's final parameters, and no rewrite of Θ follows the step. Θ_before needs no
pre-hook: Lightning calls ``on_before_optimizer_step`` (where the callback takes it) before the update (inside
the optimizer's closure; under fp16 AMP before the GradScaler's step).

:class:`StepHooks` holds the handles: :meth:`attach` registers on a fit's optimizers (a resumed run's are new
objects, so each fit attaches anew) after removing any earlier handles, and :meth:`detach` removes them at
teardown, so a second fit never runs the filter twice per step. Under DDP every rank attaches to its own
optimizer and runs the same hook on the same (synchronised) gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.utils.hooks import RemovableHandle


class StepHooks:
    """Post-step hooks on a fit's optimizers; see the module's doc."""

    def __init__(self) -> None:
        self.handles: list[RemovableHandle] = []
        self.optimizers: list[torch.optim.Optimizer] = []

    def attach(self, optimizers: Iterable[torch.optim.Optimizer], hook: Callable[[], None],
               owner: str = "SpectralGraphCallback") -> None:
        """Register ``hook`` (called with no argument) as a step post-hook on each of ``optimizers`` (the
        trainer's: Lightning's automatic optimization has one), after removing earlier handles. Raises when
        there is none: the update filter would have no step to act in."""
        self.detach()
        optimizers = list(optimizers)
        if not optimizers:
            raise ValueError(f"{owner}: the trainer has no optimizer, so the update filter has no optimizer step "
                             "to act in; the module's configure_optimizers must return the adapters' optimizer")
        for optimizer in optimizers:
            self.handles.append(optimizer.register_step_post_hook(lambda _opt, _args, _kwargs: hook()))
        self.optimizers = optimizers

    def detach(self) -> None:
        """Remove every registered hook (idempotent)."""
        for handle in self.handles:
            handle.remove()
        self.handles, self.optimizers = [], []
