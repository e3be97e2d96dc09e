"""What a multi-task adaptation method is to the LightningModule: a few hooks around it.

This is the interface the module is handed (``SpecLoRAModule(method=...)``); the methods themselves live in
``speclora.methods`` (one file each, subclasses of :class:`Method`) and model/ imports none of them. The
base class's hooks are the plain per-task LoRA arrangement (``Independent``), so a module built without a
method trains per-task adapters with no coupling. ``speclora.methods.base.Method`` is this same class.

A method builds the adapted encoder (speclora.model.adapted: the frozen encoder with its adapter layers,
router, slots, sub-networks and working state) and decides how rows are routed, what it adds to the loss and
what it does to the gradients; the LightningModule (speclora.model.module) is handed the adapted encoder and
owns the heads, metrics and the loop. A method writes nothing onto the LightningModule.
Methods are configured by class in YAML (``model.method: Shared``, or
``{class_path: speclora.methods.Ortho, init_args: {...}}``); their constructor arguments are the config.

Hooks, in the order a training step calls them::

    build(inputs) -> AdaptedEncoder     once, in the module's constructor (BuildInputs: encoder, tasks, lora)
    route(adapted, batch) -> (N,) index  adapter of each sequence (None: the layer has one adapter)
    before_encode(adapted, batch)       e.g. set per-row scales on the router
    extra_losses(module, batch, outputs) -> {name: weighted term}, added to Σ_t λ_t L_t
    after_backward(module, per_task_losses)  e.g. replace the gradients of shared parameters
    after_optimizer_step(module)        after the step, gradients still held (e.g. AdaLoRA's rank allocation)

with ``on_fit_start(module)`` once before the first step (the trainer's step budget is known), and,
outside training, ``export(module, out_dir)`` / ``load(module, in_dir)`` for the adapters' files. The hooks
that take the module read the loop's state from it (task weights, global step, trainer, logging) and the
method's own parts from ``module.adapted`` (its ``method_net``, ``method_state``, ``work``).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

from speclora.model.adapted import AdaptedEncoder, BuildInputs
from speclora.model.lora import inject_lora
from speclora.tasks import TaskSpec

if TYPE_CHECKING:
    from speclora.model.module import SpecLoRAModule


class Method:
    """Per-task LoRA adapters on mixed batches, no coupling: the default behaviour of every hook."""

    name: ClassVar[str] = "independent"
    # why the adapted encoder cannot run under model.compile (speclora.model.compile); None: it can
    compile_unsupported: ClassVar[str | None] = None
    # what the method does between tasks ("weighs tasks against each other"), naming why :meth:`check` refuses
    # fewer than two; None: one task is fine
    needs_tasks: ClassVar[str | None] = None
    # one adapter per layer that every task trains: ``num_adapters`` 1 and every task's adapter is slot 0
    one_adapter: bool = False

    # ------------------------------------------------------------------ construction
    def num_adapters(self, num_tasks: int) -> int:
        """How many adapters each LoRA layer stacks."""
        return 1 if self.one_adapter else num_tasks

    def check(self, specs: list[TaskSpec]) -> None:
        """Refuse task lists the method cannot train (raise ValueError naming the problem)."""
        if self.needs_tasks is not None and len(specs) < 2:
            raise ValueError(
                f"model.method={type(self).__name__} {self.needs_tasks} but data.tasks has {len(specs)}: "
                f"{[s.name for s in specs]}; give two or more tasks, or use method Single"
            )

    def build(self, inputs: BuildInputs) -> AdaptedEncoder:
        """The frozen ``inputs.encoder`` adapted in place: ``num_adapters`` stacked LoRAs on every target."""
        cfg = inputs.lora
        router, slots = inject_lora(
            inputs.encoder, inputs.targets, self.num_adapters(inputs.num_tasks), cfg.r, cfg.alpha, cfg.dropout,
            seed=cfg.init_seed,
        )
        return AdaptedEncoder(self, inputs, router, slots)

    # ------------------------------------------------------------------ a training step
    def route(self, adapted: AdaptedEncoder, batch: dict[str, Tensor]) -> Tensor | None:
        """(N,) adapter index of each sequence; None when the layers hold a single adapter."""
        return batch["seq_task"] if self.num_adapters(adapted.num_tasks) > 1 else None

    def before_encode(self, adapted: AdaptedEncoder, batch: dict[str, Tensor]) -> None:
        """Prepare anything the adapted forward needs besides the routing (on ``adapted.router``, ...)."""

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
        return 0 if self.one_adapter else task_index

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


def method_classes() -> list[type[Method]]:
    """Every Method subclass imported so far (``speclora.methods`` imports the harness's), base class first;
    shared bases that are no method of their own (``base = True`` in their class body) left out."""
    found, todo = [Method], [Method]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in found:
                found.append(sub)
                todo.append(sub)
    return [cls for cls in found if cls is Method or not vars(cls).get("base", False)]


def resolve_method(value: Method | str | Mapping[str, Any] | None) -> Method:
    """The module's method from what its ``method`` argument holds.

    - a :class:`Method` instance: itself (the CLI and Python callers hand one over);
    - None: the base class, per-task adapters with no coupling;
    - the config value :meth:`Method.hparams` writes, ``{"class_path": ..., "init_args": {...}}`` (a
      checkpoint's hyperparameters): the class by its import path (or, for a short name, among the imported
      Method classes), built with its arguments;
    - a registry name (``"shared"``) or class name (``"Shared"``) of an imported Method class.
    """
    if value is None:
        return Method()
    if isinstance(value, Method):
        return value
    if isinstance(value, Mapping):
        return _from_config(value)
    if isinstance(value, str):
        for cls in method_classes()[1:]:  # a subclass that names itself ("independent" is Independent)
            if value == cls.__name__ or ("name" in vars(cls) and value == cls.name):
                return cls()
        if value in ("independent", "Method"):
            return Method()
    names = ", ".join(cls.__name__ for cls in method_classes()[1:])
    raise ValueError(f"model.method={value!r}; allowed: a Method instance, or one of {names or 'the classes of speclora.methods'} "
                     "(registry names are those of imported classes: import speclora.methods)")


def _from_config(value: Mapping[str, Any]) -> Method:
    path = value.get("class_path")
    classes = method_classes()
    names = ", ".join(cls.__name__ for cls in classes[1:])
    if not isinstance(path, str) or set(value) - {"class_path", "init_args"}:
        raise ValueError(f"model.method={dict(value)!r}; allowed: {{class_path: <a Method class>, init_args: "
                         f"{{...}}}}, the class one of {names}")
    cls = next((c for c in classes if path in (c.__name__, f"{c.__module__}.{c.__qualname__}")), None)
    if cls is None:  # not imported yet: the class path names its module (data, as in LightningCLI configs)
        module, _, attr = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr, None) if module else None
        except ImportError:
            cls = None
        if not (isinstance(cls, type) and issubclass(cls, Method)) or vars(cls).get("base", False):
            raise ValueError(f"model.method.class_path={path!r} is not a Method class; allowed: "
                             f"{names}, or the import path of a speclora.methods.Method subclass")
    return cls(**dict(value.get("init_args") or {}))
