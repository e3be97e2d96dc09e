"""MTLoRA: the spectral regulariser on hand-sized cases, identity routing, the block-level path, each ablation
switch, the exports, the CLI run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from speclora.methods.mtlora import (
    BlockWithLoRA,
    LinearWithLoRA,
    MTLoRA,
    apply_block_adapter,
    low_rank_svd,
    spectral_orthogonality,
    spectral_weights,
)
from speclora.methods.mtlora_layers import task_lora_sites as _sites
from speclora.model.lora import AdapterRouter, MultiTaskLoRA
from speclora.model.module import LoRAConfig, SpecLoRAModule
from tests.cli_args import fit_args

REPO = Path(__file__).resolve().parents[2]
TASKS = ["rte", "stsb", "copa"]


def _randomise(module: SpecLoRAModule, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, delta in _sites(module.encoder):
            delta.lora_B.copy_(torch.randn(delta.lora_B.shape, generator=g) * 0.3)


def _encode_rows(module: SpecLoRAModule, ids: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
    module.router.set(tasks)
    try:
        return module.encoder(
            input_ids=ids, attention_mask=torch.ones_like(ids)
        ).last_hidden_state  # (N, L, H)
    finally:
        module.router.set(None)


# ---------------------------------------------------------------- the math, exact values
def test_low_rank_svd_matches_the_dense_svd():
    g = torch.Generator().manual_seed(0)
    A, B = (
        torch.randn(3, 4, 10, generator=g),
        torch.randn(3, 7, 4, generator=g),
    )  # (K, r, d_in), (K, d_out, r)
    U, sigma, V = low_rank_svd(A, B)
    dense = B @ A  # (K, d_out, d_in)
    assert torch.allclose(sigma, torch.linalg.svdvals(dense)[:, :4], atol=1e-5)  # rank 4: the rest are 0
    assert torch.allclose(U @ torch.diag_embed(sigma) @ V.transpose(1, 2), dense, atol=1e-5)
    assert torch.allclose(V.transpose(1, 2) @ V, torch.eye(4).expand(3, 4, 4), atol=1e-5)


def test_spectral_weights_hand_sized():
    sigma = torch.tensor([[3.0, 1.0, 0.5, 0.5]])  # σ̄ = 1.25
    soft = torch.exp(-sigma / 1.25)
    assert torch.allclose(spectral_weights(sigma, 0.0), soft)  # the authors' weight on every component
    # f = 0.2 of r = 4: the top ceil(0.8) = 1 component is shared and left free
    assert torch.allclose(spectral_weights(sigma, 0.2), soft * torch.tensor([0.0, 1.0, 1.0, 1.0]))
    shuffled = torch.tensor([[0.5, 3.0, 1.0, 0.5]])  # the order of the input does not matter
    assert spectral_weights(shuffled, 0.2)[0, 1] == 0 and spectral_weights(shuffled, 0.2)[0, 0] > 0


def _two_tasks(overlap_low: float) -> tuple[torch.Tensor, torch.Tensor]:
    """C: (T=2, d=6, r=3): both tasks share their top component e1 (σ = 3); task 0's low ones are e2, e3,
    task 1's are e4 and (overlap_low · e2 + e5) / norm."""
    e = torch.eye(6)
    low = overlap_low * e[1] + e[4]
    low = low / low.norm()
    C = torch.stack(
        [
            torch.stack([3 * e[0], 1.0 * e[1], 0.5 * e[2]], dim=1),
            torch.stack([3 * e[0], 1.0 * e[3], 0.5 * low], dim=1),
        ]
    )  # (2, 6, 3)
    sigma = C.norm(dim=1)  # (2, 3) = [3, 1, 0.5]
    return C, sigma


def test_regulariser_is_zero_for_orthogonal_low_components_despite_shared_high_ones():
    C, sigma = _two_tasks(overlap_low=0.0)
    omega = spectral_weights(sigma, shared_fraction=0.2)  # r = 3: the top component of each task is free
    C.requires_grad_(True)
    loss = spectral_orthogonality(C, omega)
    assert loss == 0
    # a uniform regulariser (ω = 1) would push the shared top components apart: 3·3 overlap, squared
    assert torch.isclose(spectral_orthogonality(C, torch.ones(2, 3)), torch.tensor(81.0))


def test_regulariser_acts_on_low_components_and_never_on_high_ones():
    C, sigma = _two_tasks(overlap_low=1.0)  # task 1's smallest component now overlaps task 0's second
    omega = spectral_weights(sigma, shared_fraction=0.2)
    C.requires_grad_(True)
    loss = spectral_orthogonality(C, omega)
    # one overlapping pair: ⟨c_{0,1}, c_{1,2}⟩ = 1 · 0.5 / √2, weights ω_{0,1} ω_{1,2}; mean over the 1 pair
    dot = 1.0 * 0.5 / math.sqrt(2)
    expect = (omega[0, 1] * omega[1, 2] * dot) ** 2
    assert torch.isclose(loss, expect, rtol=1e-5) and loss > 0
    loss.backward()
    assert torch.count_nonzero(C.grad[:, :, 0]) == 0  # the shared (top) components are untouched
    assert C.grad[0, :, 1].abs().sum() > 0 and C.grad[1, :, 2].abs().sum() > 0


def test_regulariser_is_a_mean_over_task_pairs():
    g = torch.Generator().manual_seed(0)
    C, omega = torch.randn(3, 5, 2, generator=g), torch.rand(3, 2, generator=g)
    pairs = [spectral_orthogonality(C[[t, s]], omega[[t, s]]) for t, s in ((0, 1), (0, 2), (1, 2))]
    assert torch.isclose(spectral_orthogonality(C, omega), torch.stack(pairs).mean(), rtol=1e-5)
    assert spectral_orthogonality(C[:1], omega[:1]) == 0


# ---------------------------------------------------------------- routing
def test_identity_routing_equals_independent_per_task_lora():
    g = torch.Generator().manual_seed(0)
    router = AdapterRouter(3)
    init_A = torch.randn(4, 8, generator=g)
    routed = MultiTaskLoRA(8, 6, 3, 4, 8.0, 0.0, router, init_A, routing=True)  # alpha/r = 2
    plain = MultiTaskLoRA(8, 6, 3, 4, 8.0, 0.0, router, init_A, routing=False)
    with torch.no_grad():
        routed.lora_A.copy_(torch.randn(3, 4, 8, generator=g))
        routed.lora_B.copy_(torch.randn(3, 6, 4, generator=g))
        plain.load_state_dict(routed.state_dict(), strict=False)
    assert torch.equal(routed.routing[:, :, 0], torch.eye(3))
    x = torch.randn(5, 7, 8, generator=g)  # (N, L, d_in)
    tasks = torch.tensor([2, 0, 1, 1, 0])
    router.set(tasks)
    out = routed(x)
    assert torch.allclose(out, plain(x), atol=1e-6)
    by_hand = torch.stack(
        [2.0 * x[n] @ routed.lora_A[t].T @ routed.lora_B[t].T for n, t in enumerate(tasks.tolist())]
    )
    assert torch.allclose(out, by_hand, atol=1e-5)
    # learned routing mixes: a weight on expert 1 for task 0's dimension 3 changes only that output dimension
    with torch.no_grad():
        routed.routing[0, 1, 3] = 0.5
    mixed = routed(x)
    row = 1  # a task-0 row
    delta = mixed[row] - out[row]
    assert torch.allclose(
        delta[:, 3], 0.5 * 2.0 * (x[row] @ routed.lora_A[1].T @ routed.lora_B[1].T)[:, 3], atol=1e-5
    )
    assert torch.count_nonzero(delta[:, [0, 1, 2, 4, 5]]) == 0


def test_routing_groups_share_a_weight():
    router = AdapterRouter(2)
    layer = MultiTaskLoRA(4, 6, 2, 2, 2.0, 0.0, router, torch.randn(2, 4), routing=True, group_size=3)
    assert layer.routing.shape == (2, 2, 2)
    with pytest.raises(ValueError, match="routing_group_size=4 does not divide the output width 6"):
        MultiTaskLoRA(4, 6, 2, 2, 2.0, 0.0, router, torch.randn(2, 4), routing=True, group_size=4)


def test_module_with_identity_routing_matches_the_module_without(tiny_backbone):
    ids = torch.randint(0, 1000, (4, 9))
    tasks = torch.tensor([0, 1, 2, 1])
    outputs = []
    for routing in (True, False):
        module = SpecLoRAModule(TASKS, backbone=tiny_backbone, method=MTLoRA(routing=routing)).eval()
        _randomise(module)
        with torch.no_grad():
            outputs.append(_encode_rows(module, ids, tasks))
    assert torch.allclose(outputs[0], outputs[1], atol=1e-6)


# ---------------------------------------------------------------- the block-level path
def test_block_lora_is_a_parallel_path_inside_the_layer_norm(tiny_backbone):
    from transformers import AutoModel

    module = SpecLoRAModule(TASKS, backbone=tiny_backbone, method="mtlora").eval()
    plain = AutoModel.from_pretrained(tiny_backbone).eval()
    ids = torch.randint(0, 1000, (3, 9))
    tasks = torch.tensor([0, 1, 2])
    with torch.no_grad():  # B = 0 at start: the adapted encoder is the frozen one
        assert torch.allclose(
            _encode_rows(module, ids, tasks),
            plain(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state,
            atol=1e-6,
        )
    _randomise(module)
    block = module.encoder.encoder.layer[0].attention.output
    assert isinstance(block, BlockWithLoRA)
    h, x = torch.randn(3, 9, 32), torch.randn(3, 9, 32)  # attention context, the layer's input
    module.router.set(tasks)
    with torch.no_grad():
        got = block(h, x)
        base = block.base  # BertSelfOutput: LN(dropout(dense(h)) + x)
        want = base.LayerNorm(base.dense(h) + x + block.delta(x))
    module.router.set(None)
    assert torch.allclose(got, want, atol=1e-6)


# ---------------------------------------------------------------- the ablation switches
def test_each_switch_changes_what_it_should(tiny_backbone):
    def build(**kwargs):
        return SpecLoRAModule(TASKS, backbone=tiny_backbone, method=MTLoRA(**kwargs))

    full = build()
    sites = _sites(full.encoder)
    # block level: one LoRA per layer's attention block (2 layers), 3 experts of rank 8 on 32 -> 32, routing 3x3x32
    assert [n for n, _ in sites] == ["encoder.layer.0.attention.output", "encoder.layer.1.attention.output"]
    assert all(d.routing is not None and d.routing.shape == (3, 3, 32) for _, d in sites)
    lora_per_site = 3 * 2 * 8 * 32
    trainable = sum(p.numel() for p in full.encoder.parameters() if p.requires_grad)
    assert trainable == 2 * (lora_per_site + 3 * 3 * 32)

    no_block = build(block_level=False)  # LoRA on the four attention projections instead
    wrapped = [n for n, m in no_block.encoder.named_modules() if isinstance(m, LinearWithLoRA)]
    assert len(wrapped) == 2 * 4 and wrapped[0].endswith("attention.self.query")
    assert not any(isinstance(m, BlockWithLoRA) for m in no_block.encoder.modules())

    no_routing = build(routing=False)
    assert all(d.routing is None for _, d in _sites(no_routing.encoder))
    assert sum(p.numel() for p in no_routing.encoder.parameters() if p.requires_grad) == 2 * lora_per_site

    both = build(block="both")
    assert len(_sites(both.encoder)) == 4 and "encoder.layer.0.output" in [n for n, _ in _sites(both.encoder)]

    _randomise(full)
    assert set(full.method.extra_losses(full, {}, {})) == {"mtlora_spectral"}
    no_spectral = build(spectral_reg=False)
    _randomise(no_spectral)
    assert no_spectral.method.extra_losses(no_spectral, {}, {}) == {}


def test_spectral_basis_refreshes_every_svd_every_steps(tiny_backbone):
    module = SpecLoRAModule(TASKS, backbone=tiny_backbone, method=MTLoRA(svd_every=3))
    _randomise(module)
    (_, delta), *_ = _sites(module.encoder)
    for step, refreshed_at in ((0, 0), (1, 0), (2, 0), (3, 3), (5, 3), (6, 6)):
        stub = SimpleNamespace(global_step=step, encoder=module.encoder)
        module.method.extra_losses(stub, {}, {})
        assert int(delta.svd_step) == refreshed_at, f"step {step}"
    # with a fresh basis, the components are σ_i u_i of each expert's current update
    _, sigma, _ = low_rank_svd(delta.lora_A.detach(), delta.lora_B.detach())
    assert torch.allclose(delta.components().detach().norm(dim=1), delta.scaling * sigma, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(reg_weight=-1.0), "reg_weight=-1.0"),
        (dict(shared_fraction=1.0), "shared_fraction=1.0"),
        (dict(svd_every=0), "svd_every=0"),
        (dict(block="mlp"), "block='mlp'"),
        (dict(routing=False, routing_group_size=2), "routing_group_size=2 only applies with routing=true"),
        (dict(spectral_reg=False, reg_weight=0.5), "reg_weight=0.5 only applies with spectral_reg=true"),
        (dict(block_level=False, block="ffn"), "block='ffn' only applies with block_level=true"),
    ],
)
def test_bad_options_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MTLoRA(**kwargs)


def test_incompatible_setups_are_refused(tiny_backbone, tmp_path):
    with pytest.raises(ValueError, match="MTLoRA couples several tasks but data.tasks has 1"):
        SpecLoRAModule(["rte"], backbone=tiny_backbone, method="mtlora")
    with pytest.raises(ValueError, match="leave model.lora.targets null or set block_level=false"):
        SpecLoRAModule(TASKS, backbone=tiny_backbone, method="mtlora", lora=LoRAConfig(targets=["query"]))
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

    distil = tmp_path / "distil"
    DistilBertModel(
        DistilBertConfig(vocab_size=30522, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    ).save_pretrained(distil)
    AutoTokenizer.from_pretrained(tiny_backbone).save_pretrained(distil)
    with pytest.raises(ValueError, match="model_type 'distilbert'.*set block_level=false"):
        SpecLoRAModule(TASKS, backbone=str(distil), method="mtlora")
    SpecLoRAModule(TASKS, backbone=str(distil), method=MTLoRA(block_level=False))  # component level works


# ---------------------------------------------------------------- export
def test_block_export_runs_each_task_alone_and_loads_back(tiny_backbone, tmp_path):
    from transformers import AutoModel

    module = SpecLoRAModule(TASKS, backbone=tiny_backbone, method="mtlora").eval()
    _randomise(module)
    with torch.no_grad():
        for _, delta in _sites(module.encoder):
            delta.routing.add_(0.1 * torch.rand(delta.routing.shape))  # off-identity routing
    ids = torch.randint(0, 1000, (3, 9))
    tasks = torch.tensor([0, 1, 2])
    with torch.no_grad():
        want = _encode_rows(module, ids, tasks)
    folders = module.export_adapters(tmp_path)
    assert [f.name for f in folders] == TASKS
    config = json.loads((folders[1] / "mtlora.json").read_text())
    assert config["rank"] == 3 * 8 and config["task_index"] == 1
    for t, folder in enumerate(folders):
        alone = apply_block_adapter(AutoModel.from_pretrained(tiny_backbone), folder).eval()
        with torch.no_grad():
            got = alone(
                input_ids=ids[t : t + 1], attention_mask=torch.ones_like(ids[t : t + 1])
            ).last_hidden_state
        assert torch.allclose(got, want[t : t + 1], atol=1e-5), f"task {t}"

    fresh = SpecLoRAModule(TASKS, backbone=tiny_backbone, method="mtlora").eval()
    fresh.import_adapters(tmp_path)
    with torch.no_grad():
        assert torch.allclose(_encode_rows(fresh, ids, tasks), want, atol=1e-6)
    other = SpecLoRAModule(TASKS, backbone=tiny_backbone, method=MTLoRA(routing=False))
    with pytest.raises(ValueError, match="mtlora.json: method"):
        other.import_adapters(tmp_path)


def test_component_level_export_is_peft_format(tiny_backbone, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    module = SpecLoRAModule(TASKS, backbone=tiny_backbone, method=MTLoRA(block_level=False)).eval()
    _randomise(module)
    with torch.no_grad():
        for _, delta in _sites(module.encoder):
            delta.routing.add_(0.1 * torch.rand(delta.routing.shape))
    ids = torch.randint(0, 1000, (3, 9))
    with torch.no_grad():
        want = _encode_rows(module, ids, torch.tensor([0, 1, 2]))
    folders = module.export_adapters(tmp_path)
    saved = json.loads((folders[2] / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == saved["lora_alpha"] == 3 * 8
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_backbone), str(folders[2])).eval()
    with torch.no_grad():
        got = peft_model(input_ids=ids[2:], attention_mask=torch.ones_like(ids[2:])).last_hidden_state
    assert torch.allclose(got, want[2:], atol=1e-5)


# ---------------------------------------------------------------- the CLI, default suite
def test_mtlora_runs_from_the_cli_on_the_default_suite(tiny_backbone, data_root, tmp_path):
    from speclora.cli import main

    cli = main(["fit", *fit_args(tiny_backbone, data_root, tmp_path.parent / "token_cache", tmp_path / "runs",
                                 "methods/mtlora.yaml", max_length=32, batch_size=16)])
    assert isinstance(cli.model.method, MTLoRA) and len(cli.model.specs) == 10
    metrics = cli.trainer.callback_metrics
    for key in ("train/loss", "train/mtlora_spectral", "val/average", "val/rte/accuracy"):
        assert key in metrics, f"{key} not logged; logged: {sorted(metrics)}"
    assert cli.trainer.global_step == 2
    routing = _sites(cli.model.encoder)[0][1].routing
    assert routing.shape == (10, 10, 32) and not torch.equal(routing[:, :, 0], torch.eye(10))  # it learns
    folders = cli.model.export_adapters(tmp_path / "export")
    assert len(folders) == 10 and all((f / "mtlora_block.safetensors").is_file() for f in folders)


def test_a_checkpoint_of_the_earlier_tasklora_layout_loads_with_the_same_update(tiny_backbone):
    """mtLoRA's sites were ``TaskLoRA`` (a second LoRA kernel) and are now the kernel of model/lora.py; a state
    dict written in the earlier layout (these key names, these shapes) loads strictly and gives s·B_t A_t x."""
    module = SpecLoRAModule(TASKS, backbone=tiny_backbone, method=MTLoRA()).eval()
    sites = _sites(module.encoder)
    T, r, H = len(TASKS), module.lora_cfg.r, module.encoder.config.hidden_size
    old_layout = {  # TaskLoRA's parameters and buffers, in its registration order
        "lora_A": (T, r, H),
        "lora_B": (T, H, r),
        "routing": (T, T, H),
        "svd_V": (T, H, r),
        "svd_omega": (T, r),
        "svd_step": (),
    }
    for _, delta in sites:
        assert [(k, tuple(v.shape)) for k, v in delta.state_dict().items()] == list(old_layout.items())
    g = torch.Generator().manual_seed(3)
    state = module.state_dict()
    for name, _ in sites:
        for key, shape in old_layout.items():
            if key == "svd_step":
                state[f"adapted.encoder.{name}.delta.{key}"] = torch.tensor(4)
            elif key != "routing":
                state[f"adapted.encoder.{name}.delta.{key}"] = torch.randn(shape, generator=g)
    module.load_state_dict(state, strict=True)
    name, delta = sites[0]
    x = torch.randn(2, 5, H, generator=g)
    delta.router.set(torch.tensor([2, 0]))
    by_hand = torch.stack([delta.scaling * x[n] @ state[f"adapted.encoder.{name}.delta.lora_A"][t].T
                           @ state[f"adapted.encoder.{name}.delta.lora_B"][t].T for n, t in enumerate((2, 0))])
    assert torch.allclose(delta(x), by_hand, atol=1e-5)
    assert int(delta.svd_step) == 4
    delta.router.set(None)
