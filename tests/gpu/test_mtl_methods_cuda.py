"""FAMO, CAGrad, Nash-MTL and MTL-LoRA on a CUDA device through the CLI, in each precision: every state tensor on
the device, finite parameters, and under 16-bit AMP the per-task gradients unscaled correctly.

The CPU proxies are in tests/methods/test_famo.py and test_mtl_lora.py (the ``meta`` device stands in for the GPU).
"""

from __future__ import annotations

import pytest
import torch

from tests.cli_args import fit_args
from tests.gpu.marks import GPU

pytestmark = GPU


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("method", ["famo", "cagrad", "nash_mtl", "mtl_lora"])
def test_method_fits_on_cuda(method, precision, tiny_backbone, data_root, tmp_path):
    from speclora.cli import main

    args = fit_args(tiny_backbone, data_root, tmp_path.parent / "token_cache", tmp_path / "runs", "suites/small.yaml",
                    f"methods/{method}.yaml", steps=4, caps=(32, 8))
    cli = main(["fit", *args, "--trainer.accelerator", "gpu", "--trainer.devices", "1",
                "--trainer.precision", precision])
    model = cli.model
    assert cli.trainer.global_step == 4
    assert all(p.is_cuda and torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)
    assert all(b.is_cuda for b in model.buffers())
    if method == "famo":
        assert int(model.adapted.method_state.step) >= 1 and torch.isfinite(model.adapted.method_state.logits).all()
    if method in ("cagrad", "nash_mtl"):
        last = model.adapted.work.last  # the last step's combination (None: that batch held one task)
        assert last is None or "skipped" in last or bool(torch.isfinite(torch.tensor(last["beta"])).all())
    assert torch.isfinite(cli.trainer.callback_metrics["val/average"])
    folders = model.export_adapters(tmp_path / "export")
    assert len(folders) == 3
