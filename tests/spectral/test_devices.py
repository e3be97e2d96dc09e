"""The callback's state follows the LoRA parameters' device, on a CPU-only machine.

Lightning calls ``callback.setup`` before the strategy moves the module to its device (trainer.py ``_run``:
setup hooks, then ``strategy.setup``). On a GPU that is "set up on the CPU, train on cuda:N"; here the same
order runs with the module on the ``meta`` device at set-up (shapes, no data: any tensor taken from it, mixed
with a CPU tensor, raises "Expected all tensors to be on the same device"), materialised on the CPU by the
strategy. And the reverse: a trained callback whose module moves to ``meta`` must move its whole state there.
"""

from __future__ import annotations

import itertools

import lightning as L
import pytest
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import SingleDeviceStrategy

from speclora.data.datamodule import MultiTaskDataModule
from speclora.model.lora import lora_modules
from speclora.model.module import SpecLoRAModule
from speclora.spectral.callback import SpectralGraphCallback
from tests.spectral.state import off_device, state_tensors

TASKS = ["rte", "stsb", "copa"]


@pytest.fixture(scope="module")
def datamodule(tiny_backbone, data_root, tmp_path_factory):
    return MultiTaskDataModule(tasks=TASKS, data_dir=str(data_root), tokenizer=tiny_backbone, max_length=32,
                               batch_size=6, cache_dir=str(tmp_path_factory.getbasetemp() / "token_cache"),
                               mixing="equal")


def _module(tiny_backbone) -> SpecLoRAModule:
    torch.manual_seed(0)
    module = SpecLoRAModule(TASKS, backbone=tiny_backbone, head_dropout=0.0)
    for _, layer in lora_modules(module.encoder):  # B ≠ 0 so that A gets gradients too
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    return module


def _callback(**kwargs) -> SpectralGraphCallback:
    # every part on: EMAs, eigenpairs, learned coefficients, Θ₀, Δ, work buffers and caches all get filled
    return SpectralGraphCallback(**{"k": 6, "refresh_every": 2, "log_every": 1, "heatmap_every": 0, **kwargs})


class _MaterialiseOnCPU(SingleDeviceStrategy):
    """Lightning's GPU order on a CPU: the module sits on ``meta`` through the setup hooks, and the strategy
    moves it to its device (here the CPU: empty storage, then the saved parameters and buffers)."""

    def __init__(self, saved: dict[str, torch.Tensor]) -> None:
        super().__init__(device=torch.device("cpu"), accelerator=CPUAccelerator())
        self.saved = saved

    def model_to_device(self) -> None:
        self.model.to_empty(device=self.root_device)
        with torch.no_grad():
            for name, t in itertools.chain(self.model.named_parameters(), self.model.named_buffers()):
                t.copy_(self.saved[name])


def _fit(module, datamodule, callbacks, steps=3, **kwargs) -> L.Trainer:
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=callbacks,
                        use_distributed_sampler=False, **kwargs)
    trainer.fit(module, datamodule=datamodule)
    return trainer


def test_set_up_before_the_module_reaches_its_device(tiny_backbone, datamodule):
    # the crash of issue 11 on a CPU-only machine: set-up state taken on the module's set-up device
    plain_module, plain = _module(tiny_backbone), _callback()
    _fit(plain_module, datamodule, [plain])

    module, spectral = _module(tiny_backbone), _callback()
    saved = {n: t.detach().clone() for n, t in itertools.chain(module.named_parameters(), module.named_buffers())}
    module.to("meta")
    _fit(module, datamodule, [spectral], strategy=_MaterialiseOnCPU(saved))

    assert spectral.counters["refreshes"] == 2 and spectral.delta_prev[0] is not None
    assert len(state_tensors(spectral)) > 20 and not off_device(spectral, "cpu"), off_device(spectral, "cpu")
    # and the steps are those of a run that never left the CPU
    for (name, a), b in zip(plain_module.named_parameters(), module.parameters()):
        if a.requires_grad:
            assert torch.equal(a, b), name
    for a, b in zip(plain.theta0, spectral.theta0):
        assert torch.equal(a, b)


def test_state_follows_the_parameters_to_another_device(tiny_backbone, datamodule):
    module, spectral = _module(tiny_backbone), _callback()
    trainer = _fit(module, datamodule, [spectral])
    checkpoint = spectral.state_dict()  # on the CPU, as a checkpoint written there
    cpu_state = state_tensors(spectral)
    assert spectral._work and spectral._c_delta_prev[0] is not None  # buffers and caches are part of it
    module.to("meta")  # the parameters move (to "another GPU")
    spectral.on_train_start(trainer, module)
    moved = state_tensors(spectral)
    # all but the step's transient views (the work buffers, the snapshot and its finite flag)
    assert moved.keys() >= {k for k in cpu_state if not k.startswith(("_work", "_theta_before", "_finite"))}
    assert not off_device(spectral, "meta"), off_device(spectral, "meta")
    # a checkpoint written on one device resumes on the parameters' device
    spectral.load_state_dict(checkpoint)
    assert not off_device(spectral, "meta"), off_device(spectral, "meta")


def test_spectral_math_is_float32_whatever_the_training_precision(tiny_backbone, datamodule):
    # bf16-mixed: autocast in the forward, float32 adapters and gradients; TF32 asked for by the process
    seen = []
    spectral = _callback()

    def recorded(real):
        def run(*args):
            seen.append((torch.backends.cuda.matmul.fp32_precision, torch.is_autocast_enabled("cpu")))
            return real(*args)
        return run

    # the two pieces of step math, each inside its hook's float32_math
    spectral._filter_step = recorded(spectral._filter_step)
    spectral._filter_update = recorded(spectral._filter_update)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        module = _module(tiny_backbone)
        _fit(module, datamodule, [spectral], precision="bf16-mixed")
        assert torch.get_float32_matmul_precision() == "high"  # the process's own setting is left as it was
    finally:
        torch.set_float32_matmul_precision(before)
    assert len(seen) >= 5 and set(seen) == {("ieee", False)}
    assert spectral.layers[0].lora_A.dtype == torch.float32 and spectral._work  # the float32 buffer path
    floats = [t for t in state_tensors(spectral).values() if t.is_floating_point() and t.layout == torch.strided]
    assert {t.dtype for t in floats} == {torch.float32}
    assert all(torch.isfinite(t).all() for t in floats)


def test_device_helpers():
    from speclora.spectral.devices import broadcast_from_rank0, float32_math, move_to

    t = torch.ones(3)
    moved = move_to({"a": [t, (t, 1)], "b": None}, torch.device("meta"))
    assert moved["a"][0].is_meta and moved["a"][1][0].is_meta and moved["a"][1][1] == 1 and moved["b"] is None
    assert isinstance(moved["a"][1], tuple)

    class Pickling:  # an object broadcast hands back the sender's tensor on the sender's device
        def broadcast(self, obj, src=0):
            return torch.zeros(obj.shape)  # on the CPU

    assert broadcast_from_rank0(Pickling(), torch.empty(2, device="meta")).is_meta  # back on the receiver's

    from speclora.spectral.devices import broadcast_optional_from_rank0

    class Rank0(Pickling):  # what rank 0 holds: whether it has a tensor, and its values
        def __init__(self, has: bool):
            self.has = has

        def broadcast(self, obj, src=0):
            return torch.full(obj.shape, float(self.has)) if obj.dtype == torch.long else torch.full(obj.shape, 7.0)

    # rank 0 has none: every rank gets None, whatever it had; rank 0 has one: a rank without gets its values
    assert broadcast_optional_from_rank0(Rank0(False), torch.ones(3), (3,), torch.ones(1)) is None
    got = broadcast_optional_from_rank0(Rank0(True), None, (2, 3), torch.ones(1))
    assert got is not None and torch.equal(got, torch.full((2, 3), 7.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with float32_math(torch.device("cpu")):
            assert not torch.is_autocast_enabled("cpu")
            assert torch.backends.cuda.matmul.fp32_precision == "ieee"
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")
