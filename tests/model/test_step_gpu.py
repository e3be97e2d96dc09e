"""The training step on a CUDA device: no synchronisation between logging steps (CUDA's own sync debug mode
raises on any), the non-finite skip inside the fused AdamW kernel, the bf16 frozen encoder, TF32.

Run with ``python -m pytest -m gpu tests/model/test_step_gpu.py`` on a machine with a GPU."""

from __future__ import annotations

import pytest
import torch

import speclora.methods  # noqa: F401  the methods' registry names ("shared"): speclora.model does not import them
from speclora.model.lora import lora_modules
from speclora.model.module import SpecLoRAModule
from tests.model.batches import train_batches

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TASKS = ["rte", "stsb", "copa", "cb"]


@pytest.fixture(scope="module")
def batches(tiny_backbone, data_root, tmp_path_factory):
    cpu = train_batches(tiny_backbone, data_root, tmp_path_factory.getbasetemp() / "token_cache", TASKS, 4)
    return [{k: v.cuda() if torch.is_tensor(v) else v for k, v in b.items()} for b in cpu]


def _module(tiny_backbone, **kwargs) -> SpecLoRAModule:
    torch.manual_seed(0)
    module = SpecLoRAModule(TASKS, backbone=tiny_backbone, **kwargs).cuda()
    for _, layer in lora_modules(module.encoder):
        layer.lora_B.data.normal_(0, 0.1)
    return module


def _step(module, optimizer, batch) -> None:
    loss = module.training_step(batch, 0)
    loss.backward()
    module.on_before_optimizer_step(optimizer)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("method", ["independent", "shared"])
@pytest.mark.parametrize("encoder_dtype", ["float32", "bfloat16"])
def test_a_cuda_training_step_never_synchronises(tiny_backbone, batches, method, encoder_dtype):
    module = _module(tiny_backbone, method=method, encoder_dtype=encoder_dtype)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3, fused=True)
    for batch in batches[:2]:
        _step(module, optimizer, batch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        _step(module, optimizer, batches[2])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    values, _ = module._train_log.read()
    assert values["loss"] > 0


def test_lightning_steps_on_cuda_never_synchronise_between_logging_steps(tiny_backbone, batches, tmp_path):
    import lightning as L
    from lightning.pytorch import Callback

    class Strict(Callback):
        """Sync debug mode 'error' from each non-logging step's start to its end."""

        def __init__(self) -> None:
            self.checked = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx >= 2 and (trainer.global_step + 1) % trainer.log_every_n_steps != 0:
                torch.cuda.set_sync_debug_mode("error")
                self.checked += 1

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            torch.cuda.set_sync_debug_mode("default")

    cpu_batches = [{k: v.cpu() if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
    loader = torch.utils.data.DataLoader(cpu_batches * 2, batch_size=None, collate_fn=lambda b: b)
    strict = Strict()
    trainer = L.Trainer(accelerator="gpu", devices=1, max_steps=7, log_every_n_steps=3, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                        gradient_clip_val=1.0, callbacks=[strict], default_root_dir=tmp_path)
    try:
        trainer.fit(_module(tiny_backbone), train_dataloaders=loader)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert strict.checked >= 3


def test_a_non_finite_step_is_skipped_inside_the_fused_kernel(tiny_backbone, batches):
    module = _module(tiny_backbone)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3, fused=True)
    _step(module, optimizer, batches[0])
    params = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    module.training_step(batches[1], 1).backward()
    lora_modules(module.encoder)[0][1].lora_B.grad[0, 0, 0] = float("nan")
    module.on_before_optimizer_step(optimizer)
    optimizer.step()
    assert all(torch.equal(p, params[n]) for n, p in module.named_parameters() if p.requires_grad)
    assert all(torch.equal(v, state[id(p)][k]) for p, s in optimizer.state.items() for k, v in s.items())
    assert int(module.skipped_steps) == 1


def test_tf32_is_on_for_an_ampere_gpu():
    from speclora.model.step import set_tf32

    major, _ = torch.cuda.get_device_capability()
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        assert set_tf32(torch.device("cuda"), True) is (major >= 8)
        assert torch.backends.cuda.matmul.allow_tf32 is (major >= 8)
        assert set_tf32(torch.device("cuda"), False) is False
        assert torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
