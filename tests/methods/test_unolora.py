"""UnoLoRA* on the tiny random BERT: the hypernetwork's scales, their effect, export, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModel

from speclora.methods import UnoLoRAStar
from speclora.methods.unolora import EXPORT_CONFIG, EXPORT_WEIGHTS, mean_token_embedding
from speclora.model.lora import lora_modules
from speclora.model.module import LoRAConfig, SpecLoRAModule
from tests.methods.cli_run import _fit

REPO = Path(__file__).resolve().parents[2]
TASKS = ["rte", "stsb", "copa"]
R = 4


def _module(backbone: str, lora: LoRAConfig | None = None, **options) -> SpecLoRAModule:
    lora = lora or LoRAConfig(r=R, alpha=8.0, dropout=0.0)
    return SpecLoRAModule(
        TASKS, backbone=backbone, method=UnoLoRAStar(**options), lora=lora, head_dropout=0.0
    ).eval()


def _randomise(module: SpecLoRAModule, seed: int = 1) -> None:
    """A non-zero shared LoRA and a hypernetwork whose scales are far from 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_modules(module.encoder):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)  # (1, r, d_in)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)  # (1, d_out, r)
        for p in module.adapted.method_net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _batch(n: int = 6, length: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, 2000, (n, length), generator=g)  # (N, L)
    attention_mask = torch.ones(n, length, dtype=torch.long)  # (N, L)
    attention_mask[1, 4:] = 0
    attention_mask[3, 2:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "seq_task": torch.arange(n) % 3}


def _hidden(
    module: SpecLoRAModule, batch: dict[str, torch.Tensor], scales: torch.Tensor | None
) -> torch.Tensor:
    """(N, L, H) last hidden state with the given (S, N, r) scales on the router."""
    module.router.set(None)
    module.router.set_scales(scales)
    try:
        with torch.no_grad():
            return module.encoder(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state
    finally:
        module.router.set(None)


def test_mean_token_embedding_is_the_masked_mean():
    table = nn.Embedding(4, 2)
    with torch.no_grad():
        table.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, 4.0], [10.0, -10.0]]))
    ids = torch.tensor([[1, 2, 3], [3, 1, 1]])  # (N, L)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    want = torch.tensor([[2.0, 3.0], [10.0, -10.0]])  # (N, d_s)
    torch.testing.assert_close(mean_token_embedding(table, ids, mask), want)


def test_targets_are_query_and_value_unless_the_run_names_them(tiny_backbone):
    module = _module(tiny_backbone)
    assert module.targets == ("query", "value")
    assert [s.name.rsplit(".", 1)[1] for s in module.slots] == ["query", "value"] * 2
    (_, layer), *_ = lora_modules(module.encoder)
    assert layer.lora_A.shape == (1, R, 32)  # one shared LoRA
    explicit = _module(tiny_backbone, LoRAConfig(r=R, alpha=8.0, dropout=0.0, targets=["key"]))
    assert explicit.targets == ("key",) and len(explicit.slots) == 2
    preset = _module(tiny_backbone, LoRAConfig(r=R, alpha=8.0, dropout=0.0, targets=["attention"]))
    assert len(preset.slots) == 8


def test_scales_follow_eq_3_to_6_per_task_slot_and_row(tiny_backbone):
    module = _module(tiny_backbone)
    _randomise(module)
    net = module.adapted.method_net
    batch = _batch()
    scales = module.method.scales(module.adapted, batch)  # (S, N, r)
    assert scales.shape == (4, 6, R)  # 2 layers x (query, value), 6 rows, rank 4
    sample = mean_token_embedding(
        module.encoder.get_input_embeddings(), batch["input_ids"], batch["attention_mask"]
    )
    with torch.no_grad():
        for k in range(4):
            for n in range(6):
                b = net.bottleneck(sample[n])  # (d_b,)  eq. 3
                t = int(batch["seq_task"][n])
                e = net.combine(
                    torch.cat([net.task_embedding.weight[t], net.pos_embedding.weight[k], b])
                )  # eq. 5
                torch.testing.assert_close(scales[k, n], net.scale(e), atol=1e-5, rtol=1e-5)  # eq. 6: (r,)

    # the same text gives different scales for another task, in another slot, and another text in the same task
    same_text = {
        **batch,
        "input_ids": batch["input_ids"][:1].repeat(6, 1),
        "attention_mask": torch.ones(6, 7),
    }
    s = module.method.scales(module.adapted, same_text)  # (S, N, r)
    assert (s[0, 0] - s[0, 1]).abs().max() > 1e-3  # task 0 vs task 1
    torch.testing.assert_close(s[0, 0], s[0, 3])  # task 0 twice
    assert (s[0, 0] - s[1, 0]).abs().max() > 1e-3  # slot 0 vs slot 1
    assert (scales[0, 0] - scales[0, 3]).abs().max() > 1e-3  # task 0, two different texts


def test_scales_start_at_one_and_unolora_star_starts_as_the_backbone(tiny_backbone):
    module = _module(tiny_backbone, init_std=0.0)
    batch = _batch()
    assert torch.equal(module.method.scales(module.adapted, batch), torch.ones(4, 6, R))  # s = 1: UnoLoRA
    with torch.no_grad():
        pooled = module.encode(batch)  # (N, H), cls pooling
    backbone = AutoModel.from_pretrained(tiny_backbone).eval()
    with torch.no_grad():
        frozen = backbone(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
    torch.testing.assert_close(pooled, frozen[:, 0])  # B = 0: the adapted encoder starts as the backbone


def test_a_non_trivial_scale_changes_the_hidden_state(tiny_backbone):
    module = _module(tiny_backbone)
    _randomise(module)
    batch = _batch()
    with torch.no_grad():
        scales = module.method.scales(module.adapted, batch)  # (S, N, r)
    star = _hidden(module, batch, scales)
    plain = _hidden(module, batch, torch.ones_like(scales))  # s = 1: the shared LoRA alone (UnoLoRA)
    torch.testing.assert_close(plain, _hidden(module, batch, None))
    assert (star - plain).abs().max() > 1e-3
    # encode() sets the hypernetwork's scales itself: its pooled output is that of `star`
    with torch.no_grad():
        pooled = module.encode(batch)  # (N, H), cls pooling
    torch.testing.assert_close(pooled, star[:, 0])
    assert module.router.scales is None  # cleared after the forward


def test_gradients_reach_the_hypernetwork_and_the_shared_lora(tiny_backbone):
    module = _module(tiny_backbone)
    _randomise(module)
    module.encode(_batch()).pow(2).sum().backward()
    for name, p in module.adapted.method_net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name, layer in lora_modules(module.encoder):
        assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0, name
    trainable = {n.removeprefix("adapted.").split(".")[0] for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {"encoder", "method_net", "heads"}


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"task_dim": 0}, r"model.method.init_args.task_dim=0; allowed: an integer >= 1"),
        ({"bottleneck_dim": 2.5}, r"model.method.init_args.bottleneck_dim=2.5"),
        ({"init_std": -1.0}, r"model.method.init_args.init_std=-1.0; allowed: a number >= 0"),
    ],
)
def test_bad_options_name_the_flag(options, match):
    with pytest.raises(ValueError, match=match):
        UnoLoRAStar(**options)


def test_export_and_load_round_trip(tiny_backbone, tmp_path):
    module = _module(tiny_backbone)
    _randomise(module)
    for p in module.heads.parameters():
        p.data.normal_()
    written = module.export_adapters(tmp_path)
    assert [p.name for p in written] == TASKS
    config = json.loads((tmp_path / "stsb" / EXPORT_CONFIG).read_text())
    assert config["task_index"] == 1 and config["tasks"] == TASKS and config["r"] == R
    assert config["target_modules"] == ["query", "value"]
    assert {p.name for p in (tmp_path / "rte").iterdir()} == {
        EXPORT_CONFIG,
        EXPORT_WEIGHTS,
        "head.safetensors",
        "speclora_task.json",
    }

    fresh = _module(tiny_backbone)
    fresh.import_adapters(tmp_path)
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(fresh.encode(batch), module.encode(batch))
    for a, b in zip(module.heads.parameters(), fresh.heads.parameters(), strict=True):
        assert torch.equal(a, b)

    other = _module(tiny_backbone, LoRAConfig(r=2, alpha=8.0, dropout=0.0))
    with pytest.raises(ValueError, match=r"unolora_star.json: r = 4, but the module has 2"):
        other.import_adapters(tmp_path)


# ---------------------------------------------------------------- the CLI


def _check_fit(cli, snapshot) -> None:
    metrics = cli.trainer.callback_metrics
    for key in ("val/average", "train/loss"):
        assert key in metrics, f"{key} not logged; logged: {sorted(metrics)}"
    assert cli.trainer.global_step == 2 and cli.model.method_name == "unolora_star"
    groups = {g["name"]: g for g in cli.trainer.optimizers[0].param_groups}
    assert {id(p) for p in groups["method"]["params"]} == {id(p) for p in cli.model.adapted.method_net.parameters()}
    after = cli.model.adapted.method_net.state_dict()
    assert not torch.equal(after["scale.weight"], snapshot.before["scale.weight"]), "S did not learn"


def test_two_steps_through_the_cli(tiny_backbone, data_root, tmp_path):
    cli, snapshot = _fit(
        tiny_backbone,
        data_root,
        tmp_path / "runs",
        tmp_path.parent / "token_cache",
        "suites/small.yaml",
        "methods/unolora_star.yaml",
    )
    _check_fit(cli, snapshot)


@pytest.mark.slow
def test_two_steps_on_the_default_suite(tiny_backbone, data_root, tmp_path, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "token_cache"  # shared with test_hyperformer
    cli, snapshot = _fit(
        tiny_backbone,
        data_root,
        tmp_path / "runs",
        cache,
        "methods/unolora_star.yaml",
        extra=("--data.max_train_per_task", "64", "--data.max_eval_per_task", "16"),
    )
    _check_fit(cli, snapshot)
    assert len(cli.model.specs) == 10
