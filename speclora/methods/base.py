"""What a multi-task adaptation method is to the harness: a few hooks around one LightningModule.

A method decides how adapters are built and routed, what it adds to the loss, and what it does to the
gradients; the LightningModule (speclora.model.module) owns the encoder, heads, metrics and the loop.
Methods are configured by class in YAML (``model.method: Shared``, or
``{class_path: speclora.methods.Ortho, init_args: {...}}``); their constructor arguments are the config.

Hooks, in the order a training step calls them::

    build(module)                       once, in the module's constructor
    route(module, batch) -> (N,) index  adapter of each sequence (None: the layer has one adapter)
    before_encode(module, batch)        e.g. set per-row scales on the router
    extra_losses(module, batch, outputs) -> {name: weighted term}, added to Σ_t λ_t L_t
    after_backward(module, per_task_losses)  e.g. replace the gradients of shared parameters
    after_optimizer_step(module)        after the step, gradients still held (e.g. AdaLoRA's rank allocation)

with ``on_fit_start(module)`` once before the first step (the trainer's step budget is known), and,
outside training, ``export(module, out_dir)`` / ``load(module, in_dir)`` for the adapters' files.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

from speclora.model.lora import inject_lora
from speclora.tasks import TaskSpec

if TYPE_CHECKING:
    from speclora.model.module import SpecLoRAModule


class Method:
    """Per-task LoRA adapters on mixed batches, no coupling: the default behaviour of every hook."""

    name: ClassVar[str] = "independent"

    # ------------------------------------------------------------------ construction
    def num_adapters(self, num_tasks: int) -> int:
        """How many adapters each LoRA layer stacks."""
        return num_tasks

    def check(self, specs: list[TaskSpec]) -> None:
        """Refuse task lists the method cannot train (raise ValueError naming the problem)."""

    def build(self, module: SpecLoRAModule) -> None:
        """Adapt the frozen ``module.encoder``; sets ``module.router`` and ``module.slots``."""
        cfg = module.lora_cfg
        module.router, module.slots = inject_lora(
            module.encoder, module.targets, self.num_adapters(len(module.specs)), cfg.r, cfg.alpha, cfg.dropout,
            seed=cfg.init_seed,
        )

    # ------------------------------------------------------------------ a training step
    def route(self, module: SpecLoRAModule, batch: dict[str, Tensor]) -> Tensor | None:
        """(N,) adapter index of each sequence; None when the layers hold a single adapter."""
        return batch["seq_task"] if self.num_adapters(len(module.specs)) > 1 else None

    def before_encode(self, module: SpecLoRAModule, batch: dict[str, Tensor]) -> None:
        """Prepare anything the adapted forward needs besides the routing."""

    def extra_losses(self, module: SpecLoRAModule, batch: dict[str, Tensor], outputs: dict) -> dict[str, Tensor]:
        """Weighted terms added to the task losses (logged as ``train/<name>``)."""
        return {}

    def after_backward(self, module: SpecLoRAModule, per_task_losses: dict[int, Tensor]) -> None:
        """Called after the backward of the total loss, before the optimizer step."""

    def callbacks(self, module: SpecLoRAModule) -> list:
        """Lightning callbacks the method needs (``configure_callbacks``); ``module.trainer`` is attached."""
        return []

    def on_fit_start(self, module: SpecLoRAModule) -> None:
        """Called once when fitting starts, after the optimizer is built (``module.trainer`` is attached)."""

    def after_optimizer_step(self, module: SpecLoRAModule) -> None:
        """Called after each optimizer step, before the gradients are zeroed; ``module.global_step`` does not
        count this step yet (it is the step's 0-based index)."""

    # ------------------------------------------------------------------ export
    def adapter_of_task(self, task_index: int) -> int:
        """Which stacked adapter holds a task's LoRA (for export)."""
        return task_index

    def export(self, module: SpecLoRAModule, out_dir: Path) -> list[Path]:
        """Write each task's adapter; the default is the peft format (speclora.model.peft_io)."""
        return module.export_peft_adapters(out_dir)

    def load(self, module: SpecLoRAModule, in_dir: Path) -> None:
        """Load what :meth:`export` wrote back into the module; the default reads the peft format."""
        module.import_peft_adapters(in_dir)

    def hparams(self) -> dict[str, Any]:
        """The method as a LightningCLI config value (class path and constructor arguments); a checkpoint's
        hyperparameters hold it and ``speclora.methods.get_method`` rebuilds the method from it. A method keeps
        its constructor arguments as public attributes of the same names, and its working state in private
        (``_``) ones."""
        cls = type(self)
        args = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": args}
