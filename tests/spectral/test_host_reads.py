"""The spectral callback reads nothing back from the device on a steady-state step (issue 12): no refresh, no
logging step. Counted on the CPU inside its hooks, two ways: the profiler's host-read ops (``aten::item``,
``aten::_local_scalar_dense``, ``aten::is_nonzero``, ``aten::nonzero``), and a torch-function mode that sees
the Python-level reads the profiler does not show on a CPU (``Tensor.tolist`` copies without an aten op;
on a GPU each of these waits for the device)."""

from __future__ import annotations

import collections
import functools

import lightning as L
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile

from speclora.data.datamodule import MultiTaskDataModule
from speclora.model.lora import lora_modules
from speclora.model.module import SpecLoRAModule
from speclora.spectral.callback import SpectralGraphCallback

TASKS = ["rte", "stsb", "copa"]
HOST_READ_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero")
HOST_READ_METHODS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")


class _Reads(TorchFunctionMode):
    """Counts the tensor methods that hand a device value to Python."""

    def __init__(self, counts: collections.Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READ_METHODS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def _counted(hook, steps: set[int], counts: collections.Counter):
    """``hook`` with its host reads counted on the global steps in ``steps``."""

    @functools.wraps(hook)
    def run(trainer, *args, **kwargs):
        if trainer.global_step not in steps:
            return hook(trainer, *args, **kwargs)
        with profile(activities=[ProfilerActivity.CPU]) as prof, _Reads(counts):
            out = hook(trainer, *args, **kwargs)
        for event in prof.key_averages():
            if event.key in HOST_READ_OPS:
                counts[event.key] += event.count
        counts["hooks"] += 1
        return out

    return run


@pytest.mark.parametrize("options", [
    {},  # the method's defaults: coordination, band filter, rates, learned coefficients, high-pass
    {"regularizer": "dirichlet", "sparsify_topk": 3, "edge_weighting": "magnitude"},
])
def test_no_host_read_in_a_steady_state_step(tiny_backbone, data_root, tmp_path, options):
    datamodule = MultiTaskDataModule(tasks=TASKS, data_dir=str(data_root), tokenizer=tiny_backbone, max_length=32,
                                     batch_size=6, cache_dir=str(tmp_path / "token_cache"), mixing="equal")
    torch.manual_seed(0)
    module = SpecLoRAModule(TASKS, backbone=tiny_backbone, head_dropout=0.0)
    for _, layer in lora_modules(module.encoder):  # B ≠ 0 so that A gets gradients too
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    # refresh and log at step 0 only: steps 1-4 are steady-state steps
    spectral = SpectralGraphCallback(k=6, refresh_every=50, log_every=50, heatmap_every=0, **options)
    counts: collections.Counter = collections.Counter()
    # global steps 2-4: on_before_optimizer_step and the update filter (the optimizer's step post-hook) of
    # steps 2-4, on_train_batch_end of steps 1-3 (it runs after the optimizer step has advanced the count)
    for name in ("on_before_optimizer_step", "filter_optimizer_update", "on_train_batch_end"):
        setattr(spectral, name, _counted(getattr(spectral, name), {2, 3, 4}, counts))
    trainer = L.Trainer(max_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[spectral],
                        use_distributed_sampler=False)
    trainer.fit(module, datamodule=datamodule)
    assert counts.pop("hooks") == 9 and spectral.counters["refreshes"] == 1  # the hooks ran, on steady steps
    assert spectral.delta_prev[0] is not None and spectral.h_learned[0] is not None
    assert sum(counts.values()) == 0, f"host reads in the callback's steady-state hooks: {dict(counts)}"
