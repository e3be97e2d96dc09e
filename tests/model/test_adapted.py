"""The adapted encoder a method builds and the module is handed (speclora.model.adapted)."""

from __future__ import annotations

import pytest
import torch

from speclora.methods import METHODS
from speclora.model.adapted import AdaptedEncoder, BuildInputs
from speclora.model.method import Method
from speclora.model.module import SpecLoRAModule

TASKS = ["rte", "stsb", "copa"]
MODULE_CHILDREN = {"adapted", "heads", "metrics"}  # the LightningModule's own sub-modules, whatever the method


@pytest.mark.parametrize("name", [n for n in METHODS if n != "single"])
def test_every_method_builds_an_adapted_encoder_and_writes_nothing_onto_the_module(tiny_backbone, name):
    module = SpecLoRAModule(TASKS, backbone=tiny_backbone, method=name)
    assert isinstance(module.adapted, AdaptedEncoder) and module.adapted.method is module.method
    assert set(module._modules) == MODULE_CHILDREN, f"{name}: the module holds {sorted(module._modules)}"
    for attr in ("router", "slots", "targets", "method_net", "famo_state", "ortho_state", "task_grads"):
        assert attr not in vars(module), f"{name} wrote {attr!r} onto the module"
    assert module.encoder is module.adapted.encoder and module.slots is module.adapted.slots
    trainable = {id(p) for p in module.adapted.parameters() if p.requires_grad}
    assert trainable, f"{name}: the adapted encoder trains nothing"
    # the optimizer's adapter and method groups are exactly the adapted encoder's trainable parameters
    groups = {id(p) for p in module.encoder.parameters() if p.requires_grad}
    groups |= {id(p) for p in (module.adapted.method_net or torch.nn.Module()).parameters() if p.requires_grad}
    assert groups == trainable


def test_the_adapted_forward_routes_each_row_and_clears_the_router(tiny_backbone):
    module = SpecLoRAModule(TASKS, backbone=tiny_backbone, method="independent").eval()
    seen = []
    module.adapted.encoder.register_forward_pre_hook(lambda *_: seen.append(module.router.index.clone()))
    ids = torch.randint(0, 100, (3, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "seq_task": torch.tensor([2, 0, 1]),
             "present_tasks": (0, 1, 2)}
    with torch.no_grad():
        hidden = module.adapted(batch)  # (N, L, H)
    assert hidden.shape == (3, 6, module.encoder.config.hidden_size)
    assert seen[0].tolist() == [2, 0, 1] and module.router.index is None


def test_a_build_that_returns_no_adapted_encoder_is_refused(tiny_backbone):
    class Broken(Method):
        def build(self, inputs: BuildInputs):
            super().build(inputs)
            return inputs.encoder

    with pytest.raises(TypeError, match="Broken.build must return an AdaptedEncoder"):
        SpecLoRAModule(TASKS, backbone=tiny_backbone, method=Broken())
