"""The quality matrix in slices on a CUDA device, as .ci/gpu-matrix runs it: pool workers on the GPU, a deadline,
the spectral method's cells among them. The CPU tests of the slicing are tests/bench/test_quality_deadline.py."""

from __future__ import annotations

import json

from speclora.bench import quality
from tests.gpu.marks import GPU

pytestmark = GPU


def test_a_smoke_slice_runs_in_cuda_pool_workers_and_the_next_one_resumes(tmp_path, data_root, tiny_backbone):
    out = tmp_path / "slice"
    argv = ["quality", "--scale", "smoke", "--out", str(out), "--methods", "independent,speclora", "--seeds", "2",
            "--tasks", "rte,stsb", "--no-single", "--no-fewshot", "--one-task", "", "--lr-grid", "none",
            "--isolation", "pool", "--jobs", "2", "--threads", "1", "--backbone", tiny_backbone,
            "--data-dir", str(data_root), "--cache-dir", str(tmp_path / "cache"), "--deadline", "240"]
    assert quality.main(argv) == 0
    results = [json.loads(p.read_text()) for p in sorted(out.glob("runs/*/result.json"))]
    assert len(results) == 4 and {r["status"] for r in results} == {"ok"}, [r.get("error") for r in results]
    assert {r["device"] for r in results} == {"cuda:0"}  # each worker trained on the GPU
    assert all(r["jobs"] == 2 and r["wall_seconds"] > 0 for r in results)
    spectral = [r for r in results if r["arm"] == "speclora"]
    assert spectral and all(r["spectral"] and r["spectral"]["num_nodes"] > 0 for r in spectral)
    assert quality.main(argv) == 0  # the next slice finds every cell done
    assert "4 ok, 0 failed, 0 not run" in (out / "results.md").read_text()
