"""SpecLoRA under DDP on two GPUs (NCCL): each rank trains on its own cuda:N, rank 0's eigenpairs reach rank 1
by an in-place broadcast, and the ranks stay together. The CPU (gloo) version is tests/test_distributed.py,
whose launcher and dumps this reuses."""

from __future__ import annotations

import torch

from tests.gpu.marks import GPU, TWO_GPUS
from tests.test_distributed import REPO, STEPS, WORLD, _args, _dumps, _env, _equal, _free_port, _run

pytestmark = [*GPU, TWO_GPUS]


def test_ddp_on_two_gpus_keeps_the_ranks_identical(tiny_backbone, data_root, tmp_path):
    spec = ["--config", str(REPO / "tests" / "distributed" / "speclora_tiny.yaml")]
    train = [*spec, "--trainer.accelerator", "gpu", "--trainer.strategy", "ddp", "--trainer.devices", str(WORLD),
             "--trainer.max_steps", str(STEPS), "--trainer.val_check_interval", "2"]
    _run(["fit", *_args(tiny_backbone, data_root, tmp_path / "cache", tmp_path / "runs", tmp_path / "dump", *train)],
         _env(data_root, _free_port()), tmp_path / "fit.log")
    ranks = _dumps(tmp_path / "dump")
    spectral = [d["spectral"] for d in ranks]
    assert spectral[0][STEPS - 1]["counters"]["refreshes"] == 3  # refreshed at steps 0, 2, 4
    for step in range(STEPS):
        # rank 0's eigenpairs, broadcast; Θ₀ from the parameters DDP synchronised at the start
        for key in ("values", "vectors", "theta0"):
            assert _equal(spectral[0][step][key], spectral[1][step][key]), f"step {step}: {key} differs"
    # the rest is computed on each rank from all-reduced gradients: equal up to GPU kernels' summation order
    for name, a in ranks[0]["params"].items():
        assert torch.allclose(a, ranks[1]["params"][name], rtol=1e-4, atol=1e-6), name
