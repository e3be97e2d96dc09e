"""A module whose tasks' gradients conflict, for the tests of the methods that act on them (Ortho, CAGrad,
Nash-MTL): random LoRA weights instead of B = 0, unequal task weights, no dropout."""

from __future__ import annotations

import torch

from speclora.model.lora import lora_modules
from speclora.model.module import SpecLoRAModule


def conflicting_module(tiny_backbone: str, method, tasks: list[str]) -> SpecLoRAModule:
    torch.manual_seed(6)  # heads that make A and B both conflict; and independent of which tests ran before
    module = SpecLoRAModule(tasks, backbone=tiny_backbone, method=method).eval()  # no dropout
    g = torch.Generator().manual_seed(1)
    for _, layer in lora_modules(module.encoder):
        layer.lora_A.data = torch.randn(layer.lora_A.shape, generator=g) * 0.2
        layer.lora_B.data = torch.randn(layer.lora_B.shape, generator=g) * 0.2
    module.task_weights = torch.tensor([1.0, 2.0, 0.5])  # λ_t enter the per-task gradients
    return module
