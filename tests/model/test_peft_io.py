"""Export/import of one adapter in peft's LoRA format, checked against peft itself."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel

from speclora.model.lora import DEFAULT_TARGETS, inject_lora, lora_modules
from speclora.model.peft_io import CONFIG_NAME, WEIGHTS_NAME, export_adapter, import_adapter

TARGETS = DEFAULT_TARGETS["bert"]
T, R, ALPHA, DROPOUT = 3, 4, 8.0, 0.1


def _lora_encoder(path: str, seed: int | None = 1):
    """The tiny encoder with T adapters, each given its own random A and B when ``seed`` is set."""
    model = AutoModel.from_pretrained(path).eval()
    router, _ = inject_lora(model, TARGETS, num_adapters=T, r=R, alpha=ALPHA, dropout=DROPOUT)
    model.eval()
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, layer in lora_modules(model):
                layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)  # (T, r, d_in)
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)  # (T, d_out, r)
    return model, router


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, 2000, (4, 6), generator=g)  # (N, L)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 3:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _run(model: nn.Module, router=None, adapter: int = 0) -> torch.Tensor:
    batch = _batch()
    if router is not None:
        router.set(torch.full((batch["input_ids"].shape[0],), adapter))
    with torch.no_grad():
        return model(**batch).last_hidden_state  # (N, L, d)


def _export(model: nn.Module, adapter: int, out, base: str, **overrides):
    args = {"targets": TARGETS, "r": R, "alpha": ALPHA, "dropout": DROPOUT} | overrides
    return export_adapter(model, adapter, out, base_model_name_or_path=base, **args)


def test_keys_and_config_are_peft_s_own(tiny_backbone, tmp_path):
    model, _ = _lora_encoder(tiny_backbone)
    out = _export(model, 1, tmp_path / "a1", tiny_backbone)
    ours = load_file(str(out / WEIGHTS_NAME))
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(TARGETS), lora_dropout=DROPOUT)
    peft_model = get_peft_model(AutoModel.from_pretrained(tiny_backbone), config)
    theirs = get_peft_model_state_dict(peft_model)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight" in ours
    layer = model.encoder.layer[1].attention.output.dense
    assert torch.equal(
        ours["base_model.model.encoder.layer.1.attention.output.dense.lora_B.weight"], layer.lora_B[1]
    )

    saved = json.loads((out / CONFIG_NAME).read_text())
    assert saved["peft_type"] == "LORA" and saved["bias"] == "none"
    assert (saved["r"], saved["lora_alpha"], saved["lora_dropout"]) == (R, ALPHA, DROPOUT)
    assert sorted(saved["target_modules"]) == sorted(TARGETS)
    assert saved["base_model_name_or_path"] == tiny_backbone


def test_peft_runs_the_exported_adapter_like_our_router(tiny_backbone, tmp_path):
    model, router = _lora_encoder(tiny_backbone)
    out = _export(model, 1, tmp_path / "a1", tiny_backbone)
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_backbone), str(out)).eval()
    ours = _run(model, router, adapter=1)
    torch.testing.assert_close(_run(peft_model), ours, atol=1e-5, rtol=1e-5)
    assert (_run(model, router, adapter=0) - ours).abs().max() > 1e-3  # the adapters do differ

    # back into slot 2 of a fresh model: slot 2 reproduces adapter 1, the other slots keep their init
    fresh, fresh_router = _lora_encoder(tiny_backbone, seed=None)
    import_adapter(fresh, out, adapter=2)
    torch.testing.assert_close(_run(fresh, fresh_router, adapter=2), ours, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        _run(fresh, fresh_router, adapter=0), _run(AutoModel.from_pretrained(tiny_backbone))
    )
    for _, layer in lora_modules(fresh):
        assert torch.equal(layer.lora_A[0], layer.lora_A[1]) and torch.count_nonzero(layer.lora_B[:2]) == 0


def _corrupt(src, dst, edit) -> None:
    """Copy an exported folder to ``dst``, passing its tensors through ``edit``."""
    dst.mkdir()
    (dst / CONFIG_NAME).write_text((src / CONFIG_NAME).read_text())
    tensors = load_file(str(src / WEIGHTS_NAME))
    edit(tensors)
    save_file(tensors, str(dst / WEIGHTS_NAME))


KEY = "base_model.model.encoder.layer.1.attention.self.value.lora_B.weight"


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t.pop(KEY), f"adapter_model.safetensors: missing key '{KEY}'"),
        (
            lambda t: t.update({KEY: torch.zeros(32, R + 1)}),
            rf"key '{KEY}' has shape \(32, 5\), expected \(32, 4\)",
        ),
        (
            lambda t: t.update({"base_model.model.pooler.dense.lora_A.weight": torch.zeros(R, 32)}),
            "unexpected key",
        ),
    ],
    ids=["missing", "shape", "extra"],
)
def test_corrupted_weights_raise_naming_the_key(tiny_backbone, tmp_path, edit, match):
    model, _ = _lora_encoder(tiny_backbone)
    out = _export(model, 0, tmp_path / "a0", tiny_backbone)
    _corrupt(out, tmp_path / "bad", edit)
    fresh, _ = _lora_encoder(tiny_backbone, seed=None)
    before = [p.clone() for p in fresh.parameters()]
    with pytest.raises(ValueError, match=match):
        import_adapter(fresh, tmp_path / "bad", adapter=0)
    assert all(torch.equal(a, b) for a, b in zip(before, fresh.parameters()))  # nothing half-loaded


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("r", 8, "r = 8 differs from the model's LoRA rank 4"),
        ("lora_alpha", 16.0, "lora_alpha = 16.0 differs from the model's alpha 8.0"),
        ("target_modules", ["query", "value"], "target_modules .* differ from the model's LoRA targets"),
        ("use_dora", True, "use_dora = True is not supported"),
    ],
)
def test_config_that_differs_from_the_model_raises(tiny_backbone, tmp_path, field, value, match):
    model, _ = _lora_encoder(tiny_backbone)
    out = _export(model, 0, tmp_path / "a0", tiny_backbone)
    config = json.loads((out / CONFIG_NAME).read_text())
    (out / CONFIG_NAME).write_text(json.dumps(config | {field: value}))
    with pytest.raises(ValueError, match=match):
        import_adapter(model, out, adapter=0)


def test_export_checks_its_arguments(tiny_backbone, tmp_path):
    model, _ = _lora_encoder(tiny_backbone)
    with pytest.raises(ValueError, match="r: 8 differs"):
        _export(model, 0, tmp_path, tiny_backbone, r=8)
    with pytest.raises(ValueError, match="alpha: 2.0 differs"):
        _export(model, 0, tmp_path, tiny_backbone, alpha=2.0)
    with pytest.raises(ValueError, match="targets: .* pass the targets given to inject_lora"):
        _export(model, 0, tmp_path, tiny_backbone, targets=["query"])
    with pytest.raises(ValueError, match=r"adapter: expected an index in \[0, 2\], got 3"):
        _export(model, 3, tmp_path, tiny_backbone)
    with pytest.raises(ValueError, match="holds no MultiTaskLoRALinear"):
        _export(AutoModel.from_pretrained(tiny_backbone), 0, tmp_path, tiny_backbone)
    with pytest.raises(ValueError, match="adapter_config.json not found"):
        import_adapter(model, tmp_path / "nowhere", adapter=0)
