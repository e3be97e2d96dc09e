"""MultiTaskLoRALinear and inject_lora on the tiny random BERT (2 layers, 32 wide)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import AutoModel

from speclora.model.lora import (
    DEFAULT_TARGETS,
    AdapterRouter,
    MultiTaskLoRA,
    MultiTaskLoRALinear,
    inject_lora,
    lora_modules,
    resolve_targets,
    stacked_lora_params,
)

TARGETS = DEFAULT_TARGETS["bert"]
R, ALPHA = 4, 8.0


def _encoder(path: str) -> nn.Module:
    return AutoModel.from_pretrained(path).eval()


def _randomize(model: nn.Module, seed: int = 1) -> None:
    """Give every adapter its own non-zero A and B."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_modules(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)  # (T, r, d_in)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)  # (T, d_out, r)


def _batch(n: int = 5, length: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, 2000, (n, length), generator=g)  # (N, L)
    attention_mask = torch.ones(n, length, dtype=torch.long)  # (N, L)
    attention_mask[1, 4:] = 0
    attention_mask[3, 2:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def test_inject_wraps_attention_projections_in_model_order(tiny_backbone):
    model = _encoder(tiny_backbone)
    router, slots = inject_lora(model, TARGETS, num_adapters=3, r=R, alpha=ALPHA, dropout=0.0)
    assert [(s.layer, s.module) for s in slots] == [(layer, m) for layer in (0, 1) for m in TARGETS]
    assert slots[3].name == "encoder.layer.0.attention.output.dense"
    assert all((s.d_in, s.d_out) == (32, 32) for s in slots)
    assert [n for n, _ in lora_modules(model)] == [s.name for s in slots]
    assert router.num_adapters == 3
    for _, layer in lora_modules(model):
        assert layer.router is router
        assert layer.scaling == ALPHA / R
        assert layer.lora_A.shape == (3, R, 32) and layer.lora_B.shape == (3, 32, R)
        assert layer.lora_A.requires_grad and not layer.base.weight.requires_grad
    # the FFN's output.dense and intermediate.dense stay plain linears
    assert type(model.encoder.layer[0].output.dense) is nn.Linear
    assert type(model.encoder.layer[0].intermediate.dense) is nn.Linear
    A, B = stacked_lora_params(model)
    assert len(A) == len(B) == 8 and A[0] is model.encoder.layer[0].attention.self.query.lora_A


def test_init_equal_A_zero_B_leaves_the_frozen_output_unchanged(tiny_backbone):
    frozen = _encoder(tiny_backbone)
    model = _encoder(tiny_backbone)
    router, slots = inject_lora(model, TARGETS, num_adapters=3, r=R, alpha=ALPHA, dropout=0.0, seed=7)
    batch = _batch()
    router.set(torch.tensor([0, 1, 2, 1, 0]))
    with torch.no_grad():
        assert torch.equal(model(**batch).last_hidden_state, frozen(**batch).last_hidden_state)

    # A: peft's init (kaiming-uniform, a = sqrt(5)), one draw per module from Generator(seed), in slot order
    g = torch.Generator().manual_seed(7)
    for _, layer in lora_modules(model):
        want = nn.init.kaiming_uniform_(torch.empty(R, 32), a=math.sqrt(5), generator=g)  # (r, d_in)
        for t in range(3):
            assert torch.equal(layer.lora_A[t], want)
        assert torch.count_nonzero(layer.lora_B) == 0
    first, second = lora_modules(model)[0][1], lora_modules(model)[1][1]
    assert not torch.equal(first.lora_A[0], second.lora_A[0])


def test_mixed_batch_equals_each_row_through_its_own_adapter(tiny_backbone):
    model = _encoder(tiny_backbone)
    router, _ = inject_lora(model, TARGETS, num_adapters=3, r=R, alpha=ALPHA, dropout=0.1)
    model.eval()
    _randomize(model)
    batch = _batch()
    index = torch.tensor([2, 0, 1, 2, 0])
    value = model.encoder.layer[1].attention.self.value
    seen = {}
    value.register_forward_hook(lambda mod, inputs, out: seen.update(x=inputs[0], y=out))
    with torch.no_grad():
        router.set(index)
        mixed = model(**batch).last_hidden_state  # (N, L, d)
        for n, a in enumerate(index.tolist()):
            # one layer inside the encoder against W' = W + (alpha/r) B_a A_a
            merged = value.base.weight + value.delta_weight(a)  # (d_out, d_in)
            want = seen["x"][n] @ merged.T + value.base.bias  # (L, d_out)
            torch.testing.assert_close(seen["y"][n], want, atol=1e-5, rtol=1e-5)
        for n in range(5):
            router.set(index[n : n + 1])
            row = model(**{k: v[n : n + 1] for k, v in batch.items()}).last_hidden_state  # (1, L, d)
            torch.testing.assert_close(mixed[n : n + 1], row, atol=1e-5, rtol=1e-5)
        # the adapters do differ: routing row 0 through another adapter changes its output
        router.set(torch.tensor([0]))
        other = model(**{k: v[:1] for k, v in batch.items()}).last_hidden_state
        assert (other - mixed[:1]).abs().max() > 1e-3


@pytest.mark.parametrize("shape", [(5, 7, 32), (5, 32)])
def test_layer_matches_merged_weight_reference(shape):
    torch.manual_seed(0)
    router = AdapterRouter(3)
    layer = MultiTaskLoRALinear(
        nn.Linear(32, 24), num_adapters=3, r=R, alpha=ALPHA, dropout=0.0, router=router
    )
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(shape)  # (N, [L,] d_in)
    index = torch.tensor([1, 0, 2, 2, 1])
    router.set(index)
    y = layer(x)  # (N, [L,] d_out)
    assert y.shape == (*shape[:-1], 24)
    for n, a in enumerate(index.tolist()):
        # W' = W + (alpha/r) B_a A_a
        merged = layer.base.weight + ALPHA / R * layer.lora_B[a] @ layer.lora_A[a]  # (d_out, d_in)
        torch.testing.assert_close(layer.delta_weight(a), merged - layer.base.weight)
        torch.testing.assert_close(y[n], x[n] @ merged.T + layer.base.bias, atol=1e-5, rtol=1e-5)


def test_single_adapter_uses_no_router():
    torch.manual_seed(0)
    layer = MultiTaskLoRALinear(nn.Linear(16, 8), 1, r=2, alpha=4.0, dropout=0.0, router=AdapterRouter(1))
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, 16)  # (N, L, d_in)
    merged = layer.base.weight + layer.delta_weight(0)  # (d_out, d_in)
    torch.testing.assert_close(layer(x), x @ merged.T + layer.base.bias, atol=1e-5, rtol=1e-5)


def test_gradients_reach_only_the_adapters_of_the_rows_tasks(tiny_backbone):
    model = _encoder(tiny_backbone)
    model.requires_grad_(False)
    router, _ = inject_lora(model, TARGETS, num_adapters=4, r=R, alpha=ALPHA, dropout=0.0)
    _randomize(model)
    router.set(torch.tensor([0, 2, 2, 0, 2]))
    model(**_batch()).last_hidden_state.pow(2).sum().backward()
    for name, layer in lora_modules(model):
        assert layer.base.weight.grad is None, name
        for grad in (layer.lora_A.grad, layer.lora_B.grad):
            assert grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0, name
            assert torch.count_nonzero(grad[1]) == 0 and torch.count_nonzero(grad[3]) == 0, name


def test_target_matches_at_a_dot_boundary(tiny_backbone):
    model = _encoder(tiny_backbone)
    _, slots = inject_lora(model, ["attention.output.dense"], num_adapters=2, r=R, alpha=ALPHA, dropout=0.0)
    assert [s.name for s in slots] == [f"encoder.layer.{i}.attention.output.dense" for i in (0, 1)]
    # "output.dense" also matches the attention output, and the FFN's
    _, slots = inject_lora(_encoder(tiny_backbone), ["output.dense"], 2, R, ALPHA, 0.0)
    assert [s.name for s in slots] == [
        f"encoder.layer.{i}.{m}.dense" for i in (0, 1) for m in ("attention.output", "output")
    ]
    # a linear matched twice is recorded under the longest target; "ery" is not a dot-boundary suffix
    _, slots = inject_lora(
        _encoder(tiny_backbone), ["output.dense", "attention.output.dense"], 2, R, ALPHA, 0.0
    )
    assert [s.module for s in slots][:2] == ["attention.output.dense", "output.dense"]
    with pytest.raises(ValueError, match="'ery' matches no nn.Linear"):
        inject_lora(_encoder(tiny_backbone), ["ery"], 2, R, ALPHA, 0.0)


def test_unknown_target_lists_the_linears(tiny_backbone):
    model = _encoder(tiny_backbone)
    with pytest.raises(ValueError, match="targets: 'q_proj' matches no nn.Linear") as err:
        inject_lora(model, ["query", "q_proj"], 2, R, ALPHA, 0.0)
    assert "encoder.layer.{i}.attention.self.query" in str(err.value)
    assert "encoder.layer.{i}.output.dense" in str(err.value)
    assert not lora_modules(model)  # nothing was changed
    with pytest.raises(ValueError, match="no numbered layer"):
        inject_lora(model, ["dense"], 2, R, ALPHA, 0.0)  # also matches pooler.dense
    assert not lora_modules(model)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 0}, "r: expected an integer >= 1, got 0"),
        ({"alpha": 0.0}, "alpha: expected a number > 0, got 0.0"),
        ({"dropout": 1.0}, r"dropout: expected a probability in \[0, 1\), got 1.0"),
        ({"dropout": -0.1}, "dropout"),
        ({"num_adapters": 0}, "num_adapters: expected an integer >= 1, got 0"),
    ],
)
def test_bad_hyperparameters_raise(tiny_backbone, kwargs, match):
    args = {"num_adapters": 2, "r": R, "alpha": ALPHA, "dropout": 0.0} | kwargs
    with pytest.raises(ValueError, match=match):
        inject_lora(_encoder(tiny_backbone), TARGETS, **args)


def test_inject_twice_raises(tiny_backbone):
    model = _encoder(tiny_backbone)
    inject_lora(model, TARGETS, 2, R, ALPHA, 0.0)
    with pytest.raises(ValueError, match="already holds 8 MultiTaskLoRALinear"):
        inject_lora(model, TARGETS, 2, R, ALPHA, 0.0)


def test_router_checks_its_index():
    router = AdapterRouter(3)
    with pytest.raises(ValueError, match="1-D tensor"):
        router.set(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        router.set(torch.zeros(2))
    with pytest.raises(ValueError, match=r"\[0, 2\], got range \[0, 3\]"):
        router.set(torch.tensor([0, 3]))
    router.set(torch.tensor([0, 2], dtype=torch.int32))
    assert router.index.dtype == torch.long
    router.set(None)
    assert router.index is None


def test_forward_needs_a_matching_index():
    router = AdapterRouter(2)
    layer = MultiTaskLoRALinear(nn.Linear(8, 8), 2, r=2, alpha=2.0, dropout=0.0, router=router)
    with pytest.raises(RuntimeError, match="router's index is unset"):
        layer(torch.randn(3, 8))
    router.set(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="router index has 2 rows but the input has 3"):
        layer(torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"init_A: expected shape \(r, d_in\) = \(2, 8\)"):
        MultiTaskLoRALinear(
            nn.Linear(8, 8), 2, r=2, alpha=2.0, dropout=0.0, router=router, init_A=torch.zeros(8, 2)
        )


def test_resolve_targets():
    assert resolve_targets("bert", None) == ("query", "key", "value", "attention.output.dense")
    assert resolve_targets("distilbert", "attention") == ("q_lin", "k_lin", "v_lin", "out_lin")
    assert resolve_targets("deberta-v2", ["attention"])[0] == "query_proj"
    assert resolve_targets("anything", ["query", "value"]) == ("query", "value")
    assert resolve_targets("anything", "query") == ("query",)
    with pytest.raises(
        ValueError, match="model_type 'gpt2' .*known: bert, deberta-v2.*pass the target module"
    ):
        resolve_targets("gpt2", None)
    with pytest.raises(ValueError, match="non-empty"):
        resolve_targets("bert", [])


# ---------------------------------------------------------------- per-row rank scales and generated adapters


def test_inject_numbers_the_slots(tiny_backbone):
    model = _encoder(tiny_backbone)
    router, slots = inject_lora(model, TARGETS, num_adapters=2, r=R, alpha=ALPHA, dropout=0.0)
    assert router.num_slots == len(slots) == 8
    assert [layer.slot for _, layer in lora_modules(model)] == list(range(8))


@pytest.mark.parametrize("num_adapters", [1, 3])
@pytest.mark.parametrize("shape", [(5, 7, 32), (5, 32)])
def test_rank_scale_matches_merged_weight_reference(num_adapters, shape):
    torch.manual_seed(0)
    router = AdapterRouter(num_adapters, num_slots=2)
    layer = MultiTaskLoRALinear(
        nn.Linear(32, 24), num_adapters, r=R, alpha=ALPHA, dropout=0.0, router=router, slot=1
    )
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(shape)  # (N, [L,] d_in)
    index = torch.tensor([1, 0, 2, 2, 1]) % num_adapters
    scales = torch.randn(2, 5, R)  # (S, N, r); this layer reads entry 1
    router.set(index)
    router.set_scales(scales)
    y = layer(x)  # (N, [L,] d_out)
    for n, a in enumerate(index.tolist()):
        # W'_n = W + (alpha/r) B_a diag(s_n) A_a
        delta = ALPHA / R * layer.lora_B[a] @ torch.diag(scales[1, n]) @ layer.lora_A[a]  # (d_out, d_in)
        merged = layer.base.weight + delta
        torch.testing.assert_close(y[n], x[n] @ merged.T + layer.base.bias, atol=1e-5, rtol=1e-5)
    # s = 1 is the plain LoRA
    router.set_scales(torch.ones(2, 5, R))
    ones = layer(x)
    router.set_scales(None)
    torch.testing.assert_close(ones, layer(x))


@pytest.mark.parametrize("num_adapters", [1, 3])
def test_generated_weights_replace_the_parameters(num_adapters):
    torch.manual_seed(0)
    router = AdapterRouter(num_adapters, num_slots=1)
    layer = MultiTaskLoRALinear(
        nn.Linear(16, 8), num_adapters, r=2, alpha=4.0, dropout=0.0, router=router, slot=0
    )
    A = torch.randn(num_adapters, 2, 16, requires_grad=True)  # (T, r, d_in)
    B = torch.randn(num_adapters, 8, 2, requires_grad=True)  # (T, d_out, r)
    x = torch.randn(4, 3, 16)  # (N, L, d_in)
    index = torch.tensor([0, 2, 1, 2]) % num_adapters
    router.set(index)
    router.set_weights([(A, B)])
    y = layer(x)
    for n, a in enumerate(index.tolist()):
        merged = layer.base.weight + 4.0 / 2 * B[a] @ A[a]  # (d_out, d_in)
        torch.testing.assert_close(y[n], x[n] @ merged.T + layer.base.bias, atol=1e-5, rtol=1e-5)
    y.sum().backward()
    assert A.grad is not None and B.grad is not None and B.grad.abs().sum() > 0
    assert layer.lora_A.grad is None and layer.lora_B.grad is None
    # None (the end of a forward) clears the index, the scales and the generated weights
    router.set_scales(torch.ones(1, 4, 2))
    router.set(None)
    assert router.index is None and router.scales is None and router.weights is None


def test_router_checks_scales_and_weights():
    router = AdapterRouter(3, num_slots=2)
    with pytest.raises(ValueError, match=r"floating tensor \(S, N, r\)"):
        router.set_scales(torch.ones(2, 4))
    with pytest.raises(ValueError, match="floating tensor"):
        router.set_scales(torch.ones(2, 4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="one entry per LoRA slot, S = 2, got 3"):
        router.set_scales(torch.ones(3, 4, 2))
    router.set(torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="4 rows but the routing index has 3"):
        router.set_scales(torch.ones(2, 4, 2))
    with pytest.raises(ValueError, match=r"one \(A, B\) pair per LoRA slot, S = 2, got 1"):
        router.set_weights([(torch.ones(3, 2, 8), torch.ones(3, 8, 2))])

    layer = MultiTaskLoRALinear(nn.Linear(8, 8), 3, r=2, alpha=2.0, dropout=0.0, router=router, slot=0)
    router.set_scales(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match=r"router scales\[0\]: expected \(N, r\) = \(3, 2\), got \(3, 4\)"):
        layer(torch.randn(3, 8))
    router.set_scales(None)
    router.set_weights([(torch.ones(2, 2, 8), torch.ones(2, 8, 2))] * 2)
    with pytest.raises(ValueError, match=r"router weights\[0\]: expected A \(3, 2, 8\) and B \(3, 8, 2\)"):
        layer(torch.randn(3, 8))
    unslotted = MultiTaskLoRALinear(nn.Linear(8, 8), 3, r=2, alpha=2.0, dropout=0.0, router=router)
    with pytest.raises(RuntimeError, match="without a slot"):
        unslotted(torch.randn(3, 8))


def test_the_linear_layer_keeps_its_parameter_order_and_keys():
    """Optimizer states in checkpoints are stored by parameter position: A, B, then the frozen base (the order
    of the layer before it became a subclass of MultiTaskLoRA); no routing parameter on a linear."""
    layer = MultiTaskLoRALinear(nn.Linear(8, 4), 2, r=2, alpha=2.0, dropout=0.0, router=AdapterRouter(2))
    assert [n for n, _ in layer.named_parameters()] == ["lora_A", "lora_B", "base.weight", "base.bias"]
    assert list(layer.state_dict()) == ["lora_A", "lora_B", "base.weight", "base.bias"]


def test_the_delta_layer_is_the_linear_layer_without_its_base():
    g = torch.Generator().manual_seed(0)
    router = AdapterRouter(3)
    base = nn.Linear(8, 6)
    init_A = torch.randn(2, 8, generator=g)
    linear = MultiTaskLoRALinear(base, 3, r=2, alpha=3.0, dropout=0.0, router=router, init_A=init_A)
    delta = MultiTaskLoRA(8, 6, 3, 2, 3.0, 0.0, router, init_A)
    with torch.no_grad():
        linear.lora_B.copy_(torch.randn(3, 6, 2, generator=g))
        delta.lora_B.copy_(linear.lora_B)
    x = torch.randn(4, 5, 8, generator=g)
    router.set(torch.tensor([0, 2, 1, 2]))
    assert torch.equal(linear(x), base(x) + delta(x))
    for t in range(3):
        assert torch.equal(delta.delta_weight(t), linear.delta_weight(t))
    with pytest.raises(ValueError, match=r"adapter: expected an index in \[0, 2\], got 3"):
        delta.effective(3)
