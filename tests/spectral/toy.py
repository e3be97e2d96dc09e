"""A hand-sized model for driving SpectralGraphCallback hook by hook, without Lightning's loop.

``Toy``: T tasks × S square slots of width d and rank r (one shape class of n = 2·T·S nodes, p = d·r).
``Driver`` plays the training loop's part: it sets the LoRA gradients, calls the hooks in Lightning's order,
and takes an optimizer step in between (``SignDescent``: a plain update ``Θ ← Θ − lr·sign(G')``, unlike the
gradient, so that a test can tell the update from the gradient; the callback's update filter runs as its
step post-hook), recording what each step saw.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor, nn

from speclora.model.lora import AdapterRouter, LoRASlot, MultiTaskLoRALinear, lora_modules
from speclora.model.module import SpecLoRAModule
from speclora.spectral.callback import SpectralGraphCallback
from speclora.spectral.signals import stack_signals


class Toy(nn.Module):
    """T tasks, ``layers`` layers × modules ("q", "v") of a d → d linear, LoRA rank r."""

    def __init__(self, T: int = 2, layers: int = 2, d: int = 2, r: int = 1, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        router = AdapterRouter(T, 2 * layers)
        self.lins = nn.ModuleList()
        self.slots: list[LoRASlot] = []
        for layer in range(layers):
            for module in ("q", "v"):
                lin = MultiTaskLoRALinear(nn.Linear(d, d), T, r, 2.0, 0.0, router)
                with torch.no_grad():
                    lin.lora_A.copy_(torch.randn(lin.lora_A.shape, generator=g))
                    lin.lora_B.copy_(torch.randn(lin.lora_B.shape, generator=g))
                self.lins.append(lin)
                self.slots.append(LoRASlot(f"layer.{layer}.{module}", layer, module, d, d))
        self.logged: dict[str, Tensor] = {}

    @property
    def device(self) -> torch.device:
        return self.lins[0].lora_A.device

    def log(self, name: str, value, **kwargs) -> None:  # LightningModule.log's part
        self.logged[name] = value


class SignDescent(torch.optim.Optimizer):
    """Θ ← Θ − lr·sign(G); ``skip`` leaves Θ unchanged (a step the module skips: the hooks still run)."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})
        self.skip = False

    @torch.no_grad()
    def step(self, closure=None) -> None:
        if self.skip:
            return
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(group["lr"] * torch.sign(p.grad))


class Driver:
    """Runs steps of ``callback`` on ``model``: gradients in, the hooks, an optimizer step, records out."""

    def __init__(self, model: Toy, callback: SpectralGraphCallback, lr: float = 0.05, seed: int = 1) -> None:
        self.model, self.cb, self.lr = model, callback, lr
        self.gen = torch.Generator().manual_seed(seed)
        self.optimizer = SignDescent(model.parameters(), lr)
        self.trainer = SimpleNamespace(global_step=0, world_size=1, logger=None, loggers=[],
                                       strategy=SimpleNamespace(root_device=torch.device("cpu")),
                                       optimizers=[self.optimizer])
        self._record: dict[str, Tensor] = {}
        # registered before the callback's hook (hooks run in registration order): the raw optimizer update
        self.optimizer.register_step_post_hook(lambda *_: self._record.__setitem__("theta_optimizer", self.theta()))
        callback.setup(self.trainer, model, "fit")
        callback.on_train_start(self.trainer, model)
        self.records: list[dict[str, Tensor]] = []

    def theta(self) -> Tensor:
        """The stacked aligned parameters Θ (n, p) of the one class."""
        return self._stack(param=True)

    def _stack(self, param: bool = False) -> Tensor:
        lins = self.model.lins
        if param:
            A, B = [m.lora_A.detach() for m in lins], [m.lora_B.detach() for m in lins]
        else:
            A, B = [m.lora_A.grad for m in lins], [m.lora_B.grad for m in lins]
        (out,) = stack_signals(self.cb.layout, A, B)
        return out.clone()

    def step(self, grads: dict[str, Tensor] | None = None, skip: bool = False, poison: bool = False,
             no_call: bool = False) -> dict:
        """One training step. ``grads``: per layer index, (A grad, B grad); random when None. ``skip``: the
        optimizer leaves Θ unchanged (the module skipped the step). ``poison``: a NaN in one gradient.
        ``no_call``: ``optimizer.step`` is not called at all (an fp16 GradScaler that found an inf)."""
        cb, model, trainer = self.cb, self.model, self.trainer
        for i, m in enumerate(model.lins):
            if grads is not None:
                m.lora_A.grad, m.lora_B.grad = (t.clone() for t in grads[i])
            else:
                m.lora_A.grad = torch.randn(m.lora_A.shape, generator=self.gen)
                m.lora_B.grad = torch.randn(m.lora_B.shape, generator=self.gen)
        if poison:
            model.lins[0].lora_A.grad[0, 0, 0] = float("nan")
        record = {"step": trainer.global_step, "G": self._stack(), "theta_before": self.theta()}
        cb.on_train_batch_start(trainer, model, None, 0)
        cb.on_before_optimizer_step(trainer, model, None)
        record["G_filtered"] = self._stack()
        # the optimizer: Θ ← Θ − lr·sign(G'); its post-hooks record the raw update, then filter it
        self.optimizer.skip, self._record = skip, record
        record["theta_optimizer"] = self.theta()  # stays so where the step is not called
        if not no_call:
            self.optimizer.step()
        trainer.global_step += 1
        cb.on_train_batch_end(trainer, model, None, None, 0)
        record["theta_after"] = self.theta()
        self.records.append(record)
        return record


def lora_module(tasks: list[str], backbone) -> SpecLoRAModule:
    """A seeded SpecLoRAModule on ``backbone`` without head dropout, its LoRA B drawn ≠ 0 so that A gets
    gradients too (the Lightning-level spectral tests' model)."""
    torch.manual_seed(0)
    module = SpecLoRAModule(tasks, backbone=backbone, head_dropout=0.0)
    for _, layer in lora_modules(module.encoder):
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    return module
