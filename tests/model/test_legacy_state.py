"""State dicts written before the module held an AdaptedEncoder (main 5d18424: keys ``encoder.*``,
``method_net.*``, ``famo_state.*``) load into today's module and give the same outputs.

tests/fixtures/legacy_5d18424.pt was written by tests/fixtures/make_legacy_state.py run on 5d18424's code.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from speclora.model.adapted import LEGACY_PREFIXES, upgrade_state_dict
from speclora.model.module import SpecLoRAModule

FIXTURE = Path(__file__).parents[1] / "fixtures" / "legacy_5d18424.pt"


@pytest.fixture(scope="module")
def legacy():
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)


def test_upgrade_renames_only_the_moved_prefixes():
    old = {"encoder.embeddings.word_embeddings.weight": 1, "method_net.gen_A.0.weight": 2,
           "famo_state.logits": 3, "heads.heads.0.1.weight": 4, "skipped_steps": 5, "_extra_state": 6}
    new = upgrade_state_dict(old)
    assert list(new) == ["adapted.encoder.embeddings.word_embeddings.weight", "adapted.method_net.gen_A.0.weight",
                         "adapted.method_state.logits", "heads.heads.0.1.weight", "skipped_steps", "_extra_state"]
    assert list(new.values()) == [1, 2, 3, 4, 5, 6]
    assert upgrade_state_dict(new) is new  # today's keys pass through untouched
    assert set(LEGACY_PREFIXES) == {"encoder.", "method_net.", "famo_state."}


@pytest.mark.parametrize("name", ["speclora", "ortho", "famo", "mtlora", "hyperformer", "unolora_star", "adalora",
                                  "mtl_lora"])
def test_a_5d18424_state_dict_loads_strictly_and_predicts_the_same(tiny_backbone, legacy, name):
    saved = legacy["methods"][name]
    assert any(k.startswith("encoder.") for k in saved["state_dict"])  # the old layout
    hparams = {**saved["hparams"], "backbone": tiny_backbone}  # the fixture's backbone: the same draw, elsewhere
    torch.manual_seed(0)
    module = SpecLoRAModule(**hparams).eval()
    module.load_state_dict(saved["state_dict"], strict=True)
    own = module.state_dict()
    for key, value in saved["state_dict"].items():  # every saved tensor, bit for bit, under its new key
        if isinstance(value, torch.Tensor):
            assert torch.equal(own[upgrade_state_dict({key: 0}).popitem()[0]], value), key
    batch = legacy["batch"]
    with torch.no_grad():
        pooled = module.encode(batch)
        outputs = module.heads(pooled, batch)
    want = saved["outputs"]
    assert torch.allclose(pooled, want["pooled"], rtol=0, atol=1e-6)
    assert set(outputs) == set(want["tasks"])
    for t, (preds, probs) in want["tasks"].items():
        assert torch.allclose(outputs[t].preds.float(), preds.float(), rtol=0, atol=1e-6), (name, t)
        if probs is not None:
            assert torch.allclose(outputs[t].probs, probs, rtol=0, atol=1e-6), (name, t)
