"""SpecLoRA on a CUDA device: through the CLI in each precision and with LOBPCG, the filtered gradient of a
CUDA step against the same step on the CPU, checkpoints resumed on the other device, and a cuda:N other than 0.

The CPU proxies of these checks are in tests/spectral/test_devices.py (the ``meta`` device stands in for the
GPU there).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from speclora.data.datamodule import MultiTaskDataModule
from speclora.model.lora import lora_modules
from speclora.model.module import LoRAConfig, SpecLoRAModule
from speclora.spectral.callback import SpectralGraphCallback
from tests.cli_args import fit_args
from tests.gpu.marks import GPU, TWO_GPUS
from tests.spectral.state import off_device

pytestmark = GPU
TASKS = ["rte", "stsb", "copa"]


def _spectral(trainer: L.Trainer) -> SpectralGraphCallback:
    (spectral,) = [c for c in trainer.callbacks if isinstance(c, SpectralGraphCallback)]
    return spectral


def _cli_args(backbone, data_root, tmp_path, *configs, steps=5) -> list[str]:
    args = fit_args(backbone, data_root, tmp_path.parent / "token_cache", tmp_path / "runs", "suites/small.yaml",
                    *configs, steps=steps, caps=(32, 8))
    return [*args, "--trainer.accelerator", "gpu", "--trainer.devices", "1",
            "--trainer.callbacks.refresh_every=2", "--trainer.callbacks.heatmap_every=10"]


@pytest.mark.parametrize("precision", ["32-true", "tf32", "bf16-mixed"])
def test_speclora_fits_and_tests_through_the_cli_on_cuda(precision, tiny_backbone, data_root, tmp_path):
    from speclora.cli import main

    args = _cli_args(tiny_backbone, data_root, tmp_path, "methods/speclora.yaml")
    args += ["--trainer.precision", "32-true" if precision == "tf32" else precision]
    before = torch.get_float32_matmul_precision()
    try:
        if precision == "tf32":
            torch.set_float32_matmul_precision("high")  # TF32 matmuls, as Lightning's hint suggests
        cli = main(["fit", *args])
        spectral = _spectral(cli.trainer)
        assert cli.trainer.global_step == 5
        assert spectral.counters["refreshes"] == 3 and spectral.counters["fallbacks"] == 0  # steps 0, 2, 4
        assert not off_device(spectral, "cuda"), off_device(spectral, "cuda")
        assert spectral.layers[0].lora_A.is_cuda and spectral.layers[0].lora_A.dtype == torch.float32
        assert all(torch.isfinite(p).all() for p in cli.model.parameters())
        assert torch.isfinite(cli.trainer.callback_metrics["val/average"])
        ckpt = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
        tested = main(["test", *args, "--ckpt_path", str(ckpt)])
        assert torch.isfinite(tested.trainer.callback_metrics["test/average"])
    finally:
        torch.set_float32_matmul_precision(before)


def test_speclora_with_lobpcg_through_the_cli_on_cuda(tiny_backbone, data_root, tmp_path):
    from speclora.cli import main

    args = _cli_args(tiny_backbone, data_root, tmp_path, "methods/speclora.yaml", "methods/speclora_lobpcg.yaml")
    cli = main(["fit", *args, "--trainer.callbacks.k=8"])  # the tiny encoder's 48 nodes: LOBPCG needs n >= 3k
    spectral = _spectral(cli.trainer)
    assert spectral.counters["refreshes"] == 3 and spectral.counters["fallbacks"] == 0
    assert [r["method"] for r in spectral.last_refresh] == ["lobpcg"] and spectral.last_refresh[0]["warm"]
    assert not off_device(spectral, "cuda"), off_device(spectral, "cuda")


class _Grads(Callback):
    """The stacked LoRA gradients at on_before_optimizer_step (before or after the spectral callback's, by its
    place in the list), on the CPU, and the batch of each step."""

    def __init__(self) -> None:
        self.grads: list[torch.Tensor] = []
        self.batches: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch["uid"].tolist())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = [g.detach().cpu().clone() for g in _spectral(trainer)._signals(grad=True)]


def _two_steps(backbone, datamodule, accelerator):
    torch.manual_seed(0)
    module = SpecLoRAModule(TASKS, backbone=backbone, head_dropout=0.0, lora=LoRAConfig(dropout=0.0))
    for _, layer in lora_modules(module.encoder):  # B ≠ 0 so that A gets gradients too
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    spectral = SpectralGraphCallback(k=6, heatmap_every=0)  # every part on: filter, rates, learned, regulariser
    raw, filtered = _Grads(), _Grads()
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(accelerator=accelerator, devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[raw, spectral, filtered], use_distributed_sampler=False, gradient_clip_val=None)
    trainer.fit(module, datamodule=datamodule)
    return module, spectral, raw, filtered


def test_filtered_gradient_on_cuda_matches_the_cpu_step(still_backbone, data_root, tmp_path):
    dm = MultiTaskDataModule(tasks=TASKS, data_dir=str(data_root), tokenizer=still_backbone, max_length=32,
                             batch_size=6, cache_dir=str(tmp_path / "token_cache"), mixing="equal")
    cpu_module, cpu, cpu_raw, cpu_filtered = _two_steps(still_backbone, dm, "cpu")
    gpu_module, gpu, gpu_raw, gpu_filtered = _two_steps(still_backbone, dm, "gpu")
    assert gpu_raw.batches == cpu_raw.batches
    assert not off_device(gpu, "cuda") and not off_device(cpu, "cpu")
    # the second step: hypergradient, regulariser and the per-eigencomponent rates of the first update included
    for raw_c, raw_g, out_c, out_g in zip(cpu_raw.grads, gpu_raw.grads, cpu_filtered.grads, gpu_filtered.grads):
        scale = float(raw_c.abs().max())
        assert torch.allclose(raw_g, raw_c, rtol=1e-3, atol=1e-5 * scale)  # the same step reached the callback
        assert not torch.allclose(out_c, raw_c, rtol=1e-3, atol=1e-5 * scale)  # which changed it
        assert torch.allclose(out_g, out_c, rtol=1e-3, atol=1e-5 * scale)
    for v_c, v_g in zip(cpu.values, gpu.values):
        assert torch.allclose(v_g.cpu(), v_c, atol=1e-5)
    for (name, p_c), p_g in zip(cpu_module.named_parameters(), gpu_module.parameters()):
        if p_c.requires_grad:
            assert torch.allclose(p_g.cpu(), p_c, rtol=1e-3, atol=1e-5), name


def _fit_saving(backbone, datamodule, accelerator, steps, root: Path, ckpt: str | None = None, devices=1):
    # no dropout anywhere: the CPU and the GPU draw from different generators
    torch.manual_seed(0)
    module = SpecLoRAModule(TASKS, backbone=backbone, head_dropout=0.0, lora=LoRAConfig(dropout=0.0))
    spectral = SpectralGraphCallback(k=6, refresh_every=2, heatmap_every=0)
    save = ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer = L.Trainer(accelerator=accelerator, devices=devices, max_steps=steps, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[spectral, save], use_distributed_sampler=False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    return module, spectral


@pytest.fixture(scope="module")
def datamodule(still_backbone, data_root, tmp_path_factory):
    return MultiTaskDataModule(tasks=TASKS, data_dir=str(data_root), tokenizer=still_backbone, max_length=32,
                               batch_size=6, cache_dir=str(tmp_path_factory.getbasetemp() / "token_cache"),
                               mixing="equal")


@pytest.mark.parametrize("first, then", [("gpu", "cpu"), ("cpu", "gpu")])
def test_a_checkpoint_resumes_on_the_other_device(first, then, still_backbone, datamodule, tmp_path):
    full_module, full = _fit_saving(still_backbone, datamodule, first, 4, tmp_path / "first")
    module, spectral = _fit_saving(still_backbone, datamodule, then, 4, tmp_path / "then",
                                   ckpt=str(tmp_path / "first" / "step=2.ckpt"))
    device = "cuda" if then == "gpu" else "cpu"
    assert not off_device(spectral, device), off_device(spectral, device)
    assert spectral.counters["refreshes"] == full.counters["refreshes"] == 2  # steps 0 and 2
    # the same run up to the devices' rounding
    assert torch.allclose(spectral.corr.pair_ema.cpu(), full.corr.pair_ema.cpu(), rtol=1e-3, atol=1e-8)
    for (name, a), b in zip(full_module.named_parameters(), module.parameters()):
        if a.requires_grad:
            assert torch.allclose(a.cpu(), b.cpu(), rtol=1e-3, atol=1e-5), name


@TWO_GPUS
def test_the_state_lives_on_the_training_device_cuda_1(still_backbone, datamodule, tmp_path):
    module, spectral = _fit_saving(still_backbone, datamodule, "gpu", 3, tmp_path, devices=[1])
    assert spectral.layers[0].lora_A.device == torch.device("cuda", 1)
    assert not off_device(spectral, "cuda:1"), off_device(spectral, "cuda:1")


def test_steady_state_hooks_never_wait_for_the_gpu(still_backbone, data_root, tmp_path):
    """The CPU test (tests/spectral/test_host_reads.py) counts host reads; here CUDA's own sync debug mode raises
    on any synchronisation inside the callback's hooks of steady-state steps (no refresh, no logging)."""
    dm = MultiTaskDataModule(tasks=TASKS, data_dir=str(data_root), tokenizer=still_backbone, max_length=32,
                             batch_size=6, cache_dir=str(tmp_path / "token_cache"), mixing="equal")
    torch.manual_seed(0)
    module = SpecLoRAModule(TASKS, backbone=still_backbone, head_dropout=0.0)
    spectral = SpectralGraphCallback(k=6, refresh_every=50, log_every=50, heatmap_every=0)
    checked = []

    def strict(hook):
        def run(trainer, *args, **kwargs):
            if trainer.global_step not in (2, 3, 4):
                return hook(trainer, *args, **kwargs)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                return hook(trainer, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                checked.append(trainer.global_step)
        return run

    for name in ("on_before_optimizer_step", "filter_optimizer_update", "on_train_batch_end"):
        setattr(spectral, name, strict(getattr(spectral, name)))
    trainer = L.Trainer(accelerator="gpu", devices=1, max_steps=5, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[spectral], use_distributed_sampler=False)
    trainer.fit(module, datamodule=dm)
    assert len(checked) == 9 and spectral.layers[0].lora_A.is_cuda
