"""HyperFormer (HyperFormer++ in LoRA form) on the tiny random BERT: generated LoRAs, peft export, the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModel

from speclora.methods import HyperFormer, Independent, Shared
from speclora.model.lora import lora_modules
from speclora.model.module import LoRAConfig, SpecLoRAModule
from tests.methods.cli_run import _fit

REPO = Path(__file__).resolve().parents[2]
TASKS = ["rte", "stsb", "copa"]
R, ALPHA = 4, 8.0


def _module(
    backbone: str, lora: LoRAConfig | None = None, method: HyperFormer | None = None
) -> SpecLoRAModule:
    lora = lora or LoRAConfig(r=R, alpha=ALPHA, dropout=0.0)
    return SpecLoRAModule(
        TASKS, backbone=backbone, method=method or HyperFormer(), lora=lora, head_dropout=0.0
    ).eval()


def _randomise(module: SpecLoRAModule, seed: int = 1) -> None:
    """Non-zero B generators (they start at 0), so that every generated B differs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gen in module.adapted.method_net.gen_B:
            gen.weight.copy_(torch.randn(gen.weight.shape, generator=g) * 0.1)
            gen.bias.copy_(torch.randn(gen.bias.shape, generator=g) * 0.1)


def _batch(n: int = 6, length: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, 2000, (n, length), generator=g)  # (N, L)
    attention_mask = torch.ones(n, length, dtype=torch.long)  # (N, L)
    attention_mask[2, 3:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "seq_task": torch.arange(n) % 3}


def _hidden(module: SpecLoRAModule, batch: dict[str, torch.Tensor], task: torch.Tensor) -> torch.Tensor:
    """(N, L, H) last hidden state, row n through task ``task[n]``'s generated LoRA."""
    module.router.set(task)
    module.router.set_weights(module.method.generate(module.adapted))
    try:
        with torch.no_grad():
            return module.encoder(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state
    finally:
        module.router.set(None)


def test_generated_matrices_differ_per_task_layer_and_module(tiny_backbone):
    module = _module(tiny_backbone)
    _randomise(module)
    with torch.no_grad():
        weights = module.method.generate(module.adapted)  # per slot: (T, r, d_in), (T, d_out, r)
    assert len(weights) == len(module.slots) == 8
    for A, B in weights:
        assert A.shape == (3, R, 32) and B.shape == (3, 32, R)
    # slot order: layer 0 (query, key, value, attention.output.dense), then layer 1
    for A, B in weights:
        for t, u in ((0, 1), (0, 2), (1, 2)):  # per task
            assert (A[t] - A[u]).abs().max() > 1e-3 and (B[t] - B[u]).abs().max() > 1e-3
    for k in range(4):  # per layer, same module
        (A0, B0), (A1, B1) = weights[k], weights[k + 4]
        assert (A0 - A1).abs().max() > 1e-3 and (B0 - B1).abs().max() > 1e-3
    (Aq, _), (Av, _) = weights[0], weights[2]  # per module, same layer
    assert (Aq - Av).abs().max() > 1e-3


def test_b_starts_at_zero_so_the_model_starts_as_the_backbone(tiny_backbone):
    module = _module(tiny_backbone)
    batch = _batch()
    for _, B in module.method.generate(module.adapted):
        assert torch.count_nonzero(B) == 0
    backbone = AutoModel.from_pretrained(tiny_backbone).eval()
    with torch.no_grad():
        frozen = backbone(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        torch.testing.assert_close(module.encode(batch), frozen[:, 0])


def test_generated_a_starts_like_loras_a(tiny_backbone):
    # LoRA's A is kaiming-uniform (a = sqrt 5): U(-1/sqrt(d_in), 1/sqrt(d_in)), std 1/sqrt(3 d_in); d_in = 32
    module = _module(tiny_backbone)
    A = torch.stack([A for A, _ in module.method.generate(module.adapted)])  # (S, T, r, d_in)
    lora = SpecLoRAModule(TASKS, backbone=tiny_backbone, lora=LoRAConfig(r=R, alpha=ALPHA, dropout=0.0))
    lora_A = torch.stack([layer.lora_A for _, layer in lora_modules(lora.encoder)])  # (S, T, r, d_in)
    assert float(A.std()) == pytest.approx(1 / math.sqrt(3 * 32), rel=0.15)
    assert float(A.std()) == pytest.approx(float(lora_A.std()), rel=0.15)
    assert (A[:, 0] - A[:, 1]).abs().max() > 1e-3  # per task from the start


def _toy_step(module: SpecLoRAModule, opt: torch.optim.Optimizer, batch, target) -> float:
    """One AdamW step on a toy regression of the pooled vectors; returns the loss before the step."""
    loss = (module.encode(batch) - target).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss)


def _adapter_params(module: SpecLoRAModule) -> list[torch.nn.Parameter]:
    return [p for n, p in module.named_parameters() if p.requires_grad and not n.startswith("heads.")]


def _generated_or_own_B(module: SpecLoRAModule) -> list[torch.Tensor]:
    """Per slot: the B of every task, (T, d_out, r): generated (HyperFormer) or the layer's parameter."""
    with torch.no_grad():
        if module.method_name == "hyperformer":
            return [B.clone() for _, B in module.method.generate(module.adapted)]
        return [layer.lora_B.detach().clone() for _, layer in lora_modules(module.encoder)]


def test_one_adam_step_moves_a_generated_entry_no_more_than_a_loras(tiny_backbone):
    # Adam's first step moves every weight by lr·sign(g); a generated entry (W I + b)/d_I then moves by at
    # most lr (‖I‖₁ + 1)/d_I ≤ lr (1 + 1/d_I), as ‖I‖₁ ≤ √d_I ‖I‖₂ < d_I after the LayerNorm. Without the
    # 1/d_I multiplier it moved by up to lr (‖I‖₁ + 1), ~50 lr here: 50 times a LoRA's step.
    lr, d_I = 1e-3, 64
    batch, target = _batch(), torch.randn(6, 32, generator=torch.Generator().manual_seed(1))
    steps = {}
    for method in (HyperFormer(embed_dim=d_I), Independent()):
        torch.manual_seed(0)
        module = _module(tiny_backbone, method=method)
        before = _generated_or_own_B(module)
        _toy_step(module, torch.optim.AdamW(_adapter_params(module), lr=lr, weight_decay=0.0), batch, target)
        steps[method.name] = max(float((b - a).abs().max()) for a, b in zip(before, _generated_or_own_B(module)))
    assert steps["independent"] == pytest.approx(lr, rel=1e-3)  # a LoRA's B: lr·sign(g)
    assert lr / 10 < steps["hyperformer"] <= lr * (1 + 1 / d_I)


@pytest.mark.slow
def test_the_generated_update_grows_at_a_loras_pace_and_the_loss_drops_as_fast(tiny_backbone):
    # 15 AdamW steps (lr 1e-3) on a toy regression of the pooled vectors. Measured before the fix: the generated
    # update B A grew to 9.9 times the norm of the weight it adapts (independent LoRA: 0.32), 31 times as large.
    batch, target = _batch(), torch.randn(6, 32, generator=torch.Generator().manual_seed(1))
    size, drop = {}, {}
    for method in (HyperFormer(), Shared(), Independent()):
        torch.manual_seed(0)
        module = _module(tiny_backbone, method=method)
        opt = torch.optim.AdamW(_adapter_params(module), lr=1e-3, weight_decay=0.0)
        losses = [_toy_step(module, opt, batch, target) for _ in range(15)]
        layers = [layer for _, layer in lora_modules(module.encoder)]
        with torch.no_grad():
            weights = (module.method.generate(module.adapted) if method.name == "hyperformer"
                       else [(layer.lora_A, layer.lora_B) for layer in layers])
            # ‖ΔW_t‖ / ‖W‖ = ‖(alpha/r) B_t A_t‖ / ‖W‖, mean over tasks and layers
            rel = [(layer.scaling * B @ A).flatten(1).norm(dim=1) / layer.base.weight.norm()
                   for layer, (A, B) in zip(layers, weights)]  # (T,) each
        size[method.name] = float(torch.cat(rel).mean())
        drop[method.name] = losses[0] - losses[-1]
    assert 0.25 < size["hyperformer"] / size["independent"] < 4, size
    assert drop["hyperformer"] > 0.5 * drop["shared"] > 0, drop


def test_from_the_second_step_every_hypernetwork_tensor_gets_gradient(tiny_backbone):
    # step 1: B = 0, so only the B generators get gradient (as only a LoRA's B does); then all of it
    module = _module(tiny_backbone)
    batch, target = _batch(), torch.randn(6, 32, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(_adapter_params(module), lr=1e-3)
    _toy_step(module, opt, batch, target)
    first = {n for n, p in module.adapted.method_net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert first == {"gen_B.0.weight", "gen_B.0.bias"}
    _toy_step(module, opt, batch, target)
    for name, p in module.adapted.method_net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_one_generation_per_forward_and_a_per_row_gather(tiny_backbone):
    module = _module(tiny_backbone)
    _randomise(module)
    calls = []
    module.adapted.method_net.register_forward_hook(lambda *_: calls.append(1))
    value = module.encoder.encoder.layer[1].attention.self.value
    seen = {}
    value.register_forward_hook(lambda mod, inputs, out: seen.update(x=inputs[0], y=out))
    batch = _batch()
    with torch.no_grad():
        module.encode(batch)
        assert len(calls) == 1  # once per forward, not per row or layer
        A, B = module.method.generate(module.adapted)[6]  # layer 1 value: (T, r, d_in), (T, d_out, r)
    for n, t in enumerate(batch["seq_task"].tolist()):
        merged = value.base.weight + ALPHA / R * B[t] @ A[t]  # (d_out, d_in) = W + (alpha/r) B_t A_t
        torch.testing.assert_close(
            seen["y"][n], seen["x"][n] @ merged.T + value.base.bias, atol=1e-5, rtol=1e-5
        )
    assert module.router.weights is None  # cleared after the forward


def test_only_the_hypernetwork_and_heads_train(tiny_backbone):
    module = _module(tiny_backbone)
    _randomise(module)
    trainable = {n.removeprefix("adapted.").split(".")[0] for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {"method_net", "heads"}
    module.encode(_batch()).pow(2).sum().backward()
    net = module.adapted.method_net
    for name, p in [
        *net.projector.named_parameters(),
        *net.gen_A.named_parameters(),
        *net.gen_B.named_parameters(),
    ]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert net.task_embedding.weight.grad.abs().sum() > 0


def test_export_is_peft_and_peft_reproduces_each_task(tiny_backbone, tmp_path):
    module = _module(tiny_backbone)
    _randomise(module)
    written = module.export_adapters(tmp_path)
    assert [p.name for p in written] == TASKS
    batch = _batch()
    for t, task in enumerate(TASKS):
        peft_model = PeftModel.from_pretrained(
            AutoModel.from_pretrained(tiny_backbone), str(tmp_path / task)
        ).eval()
        with torch.no_grad():
            theirs = peft_model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state
        ours = _hidden(module, batch, torch.full((6,), t))
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)

    # the exports are ordinary per-task LoRAs: method Independent loads and runs them
    independent = SpecLoRAModule(
        TASKS, backbone=tiny_backbone, lora=LoRAConfig(r=R, alpha=ALPHA, dropout=0.0), head_dropout=0.0
    ).eval()
    independent.import_adapters(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(independent.encode(batch), module.encode(batch), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="HyperFormer cannot load adapters .* model.method=Independent"):
        module.import_adapters(tmp_path)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"task_dim": 0}, r"model.method.init_args.task_dim=0; allowed: an integer >= 1"),
        ({"embed_dim": True}, r"model.method.init_args.embed_dim=True"),
        ({"init_std": 0.0}, r"model.method.init_args.init_std=0.0; allowed: a number > 0"),
    ],
)
def test_bad_options_name_the_flag(options, match):
    with pytest.raises(ValueError, match=match):
        HyperFormer(**options)


def test_mixed_shapes_get_their_own_generators(tiny_backbone):
    # the FFN's intermediate.dense is 32 -> 64: a second shape class next to the 32 -> 32 query
    module = _module(
        tiny_backbone, LoRAConfig(r=R, alpha=ALPHA, dropout=0.0, targets=["query", "intermediate.dense"])
    )
    assert module.adapted.method_net.shapes == [(32, 32), (32, 64)]
    shapes = [(A.shape, B.shape) for A, B in module.method.generate(module.adapted)]
    assert shapes == [((3, R, 32), (3, 32, R)), ((3, R, 32), (3, 64, R))] * 2
    with torch.no_grad():
        module.encode(_batch())


# ---------------------------------------------------------------- the CLI


def _check_fit(cli, snapshot, out: Path) -> None:
    metrics = cli.trainer.callback_metrics
    for key in ("val/average", "train/loss"):
        assert key in metrics, f"{key} not logged; logged: {sorted(metrics)}"
    assert cli.trainer.global_step == 2 and cli.model.method_name == "hyperformer"
    groups = {g["name"]: g for g in cli.trainer.optimizers[0].param_groups}
    assert "adapters" not in groups  # the layers' own A/B are frozen storage
    assert {id(p) for p in groups["method"]["params"]} == {id(p) for p in cli.model.adapted.method_net.parameters()}
    after = cli.model.adapted.method_net.state_dict()
    assert not torch.equal(after["gen_B.0.weight"], snapshot.before["gen_B.0.weight"]), (
        "B generator did not learn"
    )
    written = cli.model.export_adapters(out)
    assert [p.name for p in written] == [s.name for s in cli.model.specs]
    assert all((p / "adapter_model.safetensors").is_file() for p in written)


def test_two_steps_through_the_cli(tiny_backbone, data_root, tmp_path):
    cli, snapshot = _fit(
        tiny_backbone,
        data_root,
        tmp_path / "runs",
        tmp_path.parent / "token_cache",
        "suites/small.yaml",
        "methods/hyperformer.yaml",
    )
    _check_fit(cli, snapshot, tmp_path / "export")


@pytest.mark.slow
def test_two_steps_on_the_default_suite(tiny_backbone, data_root, tmp_path, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "token_cache"  # shared with test_unolora
    cli, snapshot = _fit(
        tiny_backbone,
        data_root,
        tmp_path / "runs",
        cache,
        "methods/hyperformer.yaml",
        extra=("--data.max_train_per_task", "64", "--data.max_eval_per_task", "16"),
    )
    _check_fit(cli, snapshot, tmp_path / "export")
    assert len(cli.model.specs) == 10
