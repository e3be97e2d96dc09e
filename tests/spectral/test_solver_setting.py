"""The callback's ``solver`` setting (auto | dense | lobpcg) and the per-refresh logs, down to the CLI."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from speclora.data.datamodule import MultiTaskDataModule
from speclora.model.lora import lora_modules
from speclora.model.module import SpecLoRAModule
from speclora.spectral.callback import SpectralGraphCallback
from speclora.spectral.eigen import DENSE_THRESHOLDS, METHODS
from tests.cli_args import fit_args

TASKS = ["rte", "stsb", "copa"]  # 3 tasks × 8 slots × 2 = 48 nodes on the tiny encoder, one shape class
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def datamodule(tiny_backbone, data_root, tmp_path_factory):
    return MultiTaskDataModule(tasks=TASKS, data_dir=str(data_root), tokenizer=tiny_backbone, max_length=32,
                               batch_size=6, cache_dir=str(tmp_path_factory.getbasetemp() / "token_cache"),
                               mixing="equal")


def _fit(tiny_backbone, datamodule, spectral, steps=3, **kwargs):
    torch.manual_seed(0)
    module = SpecLoRAModule(TASKS, backbone=tiny_backbone, head_dropout=0.0)
    for _, layer in lora_modules(module.encoder):
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[spectral],
                        use_distributed_sampler=False, **kwargs)
    trainer.fit(module, datamodule=datamodule)
    return module


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(solver="eigsh"), r"solver='eigsh'; allowed: auto, dense, lobpcg"),
        (dict(dense_threshold=-1), r"dense_threshold=-1; allowed: an integer >= 0"),
    ],
)
def test_bad_solver_settings_are_refused_at_config_time(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpectralGraphCallback(**kwargs)


def test_auto_crossover_is_per_device_type_and_overridable():
    auto = SpectralGraphCallback()
    assert auto.class_solver(DENSE_THRESHOLDS["cpu"], "cpu") == "dense"
    assert auto.class_solver(DENSE_THRESHOLDS["cpu"] + 1, "cpu") == "lobpcg"
    assert auto.class_solver(DENSE_THRESHOLDS["cpu"] + 1, torch.device("cuda", 3)) == "dense"
    assert auto.class_solver(DENSE_THRESHOLDS["cuda"] + 1, "cuda") == "lobpcg"
    assert SpectralGraphCallback(dense_threshold=100).class_solver(101, "cuda") == "lobpcg"
    assert SpectralGraphCallback(solver="lobpcg").class_solver(10, "cpu") == "lobpcg"
    assert SpectralGraphCallback(solver="dense", dense_threshold=0).class_solver(10**6, "cpu") == "dense"


def test_lobpcg_is_used_in_training_with_its_warm_start(tiny_backbone, datamodule):
    # fixed edge weights: the graph does not change, so a warm refresh ends at the Rayleigh–Ritz step on the
    # previous vectors (0 iterations), while the first, cold, refresh iterates
    spectral = SpectralGraphCallback(k=6, refresh_every=1, solver="lobpcg", edge_weighting="fixed",
                                     heatmap_every=0)
    refreshes = []
    real = spectral.refresh

    def record(trainer=None):
        ok = real(trainer)
        refreshes.append(list(spectral.last_refresh))
        return ok

    spectral.refresh = record
    _fit(tiny_backbone, datamodule, spectral)
    assert [r[0]["method"] for r in refreshes] == ["lobpcg"] * 3
    assert [r[0]["warm"] for r in refreshes] == [False, True, True]
    cold, *warm = [r[0]["iterations"] for r in refreshes]
    assert cold > 0 and warm == [0, 0]
    assert all(r[0]["residual"] <= 1e-3 for r in refreshes)


def test_auto_solves_the_small_graph_densely(tiny_backbone, datamodule):
    spectral = SpectralGraphCallback(k=6, refresh_every=1, heatmap_every=0)
    _fit(tiny_backbone, datamodule, spectral, steps=2)
    assert [r["method"] for r in spectral.last_refresh] == ["dense"]


def test_lobpcg_needs_every_class_at_least_3k_nodes(tiny_backbone, datamodule):
    spectral = SpectralGraphCallback(k=20, solver="lobpcg")  # 48 nodes < 3k = 60
    with pytest.raises(ValueError, match=r"k=20, solver='lobpcg'.*n=48.*n >= 3k = 60.*at most 16"):
        _fit(tiny_backbone, datamodule, spectral)


def test_lobpcg_config_changes_only_the_solver():
    base = yaml.safe_load((REPO / "configs/methods/speclora.yaml").read_text())["trainer"]["callbacks"][0]
    (cb,) = yaml.safe_load((REPO / "configs/methods/speclora_lobpcg.yaml").read_text())["trainer"]["callbacks"]
    assert cb["class_path"] == base["class_path"] and cb["init_args"] == {"solver": "lobpcg"}
    assert SpectralGraphCallback(**cb["init_args"]).solver == "lobpcg"


def test_training_through_the_cli_with_lobpcg_logs_every_refresh(tiny_backbone, data_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from speclora.cli import main

    steps, every = 7, 2
    args = fit_args(tiny_backbone, data_root, tmp_path.parent / "token_cache", tmp_path / "runs",
                    "suites/small.yaml", "methods/speclora.yaml", "methods/speclora_lobpcg.yaml",
                    steps=steps, caps=(16, 4))
    # k = 8 for the tiny encoder's 48-node graph (LOBPCG needs n >= 3k); a refresh every 2 steps
    args += ["--trainer.callbacks.k=8", f"--trainer.callbacks.refresh_every={every}",
             "--trainer.callbacks.heatmap_every=0"]
    cli = main(["fit", *args])
    (spectral,) = [c for c in cli.trainer.callbacks if isinstance(c, SpectralGraphCallback)]
    assert spectral.solver == "lobpcg" and spectral.k == 8
    events = EventAccumulator(cli.trainer.log_dir)
    events.Reload()

    def logged(tag):
        return {e.step: e.value for e in events.Scalars(tag)}

    refresh_steps = list(range(0, steps, every))  # 0, 2, 4, 6
    solver = logged("train/spectral/refresh/class0/solver")
    assert sorted(solver) == refresh_steps  # one record per refresh, none between refreshes
    assert set(solver.values()) == {float(METHODS.index("lobpcg"))}
    assert logged("train/spectral/refresh/class0/warm") == {s: float(s > 0) for s in refresh_steps}
    iterations = logged("train/spectral/refresh/class0/iterations")
    assert all(0 <= it < 200 for it in iterations.values())  # converged, below max_iter
    assert all(res <= 1e-3 for res in logged("train/spectral/refresh/class0/residual").values())
    assert all(sec > 0 for sec in logged("train/spectral/refresh/seconds").values())
    assert spectral.counters["refreshes"] == len(refresh_steps) and spectral.counters["fallbacks"] == 0
