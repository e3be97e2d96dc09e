"""SpectralGraphCallback on a tiny random encoder: the step changes exactly as specified."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch import Callback

from speclora.data.datamodule import MultiTaskDataModule
from speclora.model.lora import lora_modules
from speclora.spectral.callback import SpectralGraphCallback
from speclora.spectral.correlation import stack_signals
from speclora.spectral.filters import spectral_filter
from tests.spectral.toy import lora_module

TASKS = ["rte", "stsb", "copa"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def datamodule(tiny_backbone, data_root, tmp_path_factory):
    return MultiTaskDataModule(tasks=TASKS, data_dir=str(data_root), tokenizer=tiny_backbone, max_length=32,
                               batch_size=6, cache_dir=str(tmp_path_factory.getbasetemp() / "token_cache"), mixing="equal")


class Snapshot(Callback):
    """Records the stacked LoRA gradients before the optimizer step and the signals after it."""

    def __init__(self) -> None:
        self.grads, self.params_after_step = None, None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        spectral = next(c for c in trainer.callbacks if isinstance(c, SpectralGraphCallback))
        self.grads = [g.clone() for g in spectral._signals(grad=True)]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        spectral = next(c for c in trainer.callbacks if isinstance(c, SpectralGraphCallback))
        self.params_after_step = [p.clone() for p in spectral._signals(param=True)]


def _fit(module, datamodule, callbacks, steps=1, **kwargs):
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, callbacks=callbacks, use_distributed_sampler=False,
                        gradient_clip_val=None, **kwargs)
    trainer.fit(module, datamodule=datamodule)
    return trainer


@pytest.mark.parametrize("epsilon", [0.0, 0.3])
def test_gradient_coordination_is_exactly_the_projection(tiny_backbone, datamodule, epsilon):
    module = lora_module(TASKS, tiny_backbone)
    spectral = SpectralGraphCallback(k=6, coordination=True, epsilon=epsilon, band_filter=False, eigen_lr=False,
                                     learned=False, regularizer="none")
    before, after = Snapshot(), Snapshot()
    _fit(module, datamodule, [before, spectral, after])
    (G,), (G2,), U = before.grads, after.grads, spectral.vectors[0]
    expected = spectral_filter(G, U, torch.ones(U.size(1)), epsilon)  # P_low G + ε P_high G
    assert torch.allclose(G2, expected, atol=1e-6)
    assert not torch.allclose(G2, G, atol=1e-4)  # it did change the step
    if epsilon == 0.0:  # the filtered gradient lies in span(U_k)
        assert torch.allclose(U @ (U.T @ G2), G2, atol=1e-5)


def test_logged_band_energy_is_of_the_raw_gradient(tiny_backbone, datamodule):
    from speclora.spectral.filters import band_energy

    module = lora_module(TASKS, tiny_backbone)
    spectral = SpectralGraphCallback(k=6, epsilon=0.0, log_every=1, heatmap_every=0)  # filters strongly
    before = Snapshot()
    trainer = _fit(module, datamodule, [before, spectral])
    (G,), U, values = before.grads, spectral.vectors[0], spectral.values[0]
    energy = band_energy(G, U, values)
    want = energy / energy.sum()
    names = [f"band{b}" for b in range(want.numel() - 1)] + ["beyond_k"]
    got = torch.tensor([float(trainer.callback_metrics[f"train/spectral/class0/energy_{n}"]) for n in names])
    assert torch.allclose(got, want, atol=1e-5)
    assert float(want[-1]) > 1e-3  # the raw gradient has energy beyond span(U), which ε = 0 filtering removes


@pytest.mark.parametrize("coefficient", [1.0, 0.5])
@pytest.mark.parametrize("rest", ["spectrum", "last"])
def test_a_single_band_scales_every_component(tiny_backbone, datamodule, coefficient, rest):
    # one band: every eigencomponent, computed or not, gets the same coefficient, so G' = c·G (1: the identity;
    # 0.5 fails if the band filter is not applied, or not beyond the k computed pairs)
    module = lora_module(TASKS, tiny_backbone)
    spectral = SpectralGraphCallback(k=6, coordination=False, band_filter=True, band_coefficients=[coefficient],
                                     band_edges=[], eigen_lr=False, learned=False, regularizer="none",
                                     rest_response=rest)
    before, after = Snapshot(), Snapshot()
    _fit(module, datamodule, [before, spectral, after])
    assert torch.allclose(after.grads[0], coefficient * before.grads[0], atol=1e-6)


def test_per_eigencomponent_rates_filter_the_optimizer_update(tiny_backbone, datamodule):
    # the rate 1 beyond the k computed pairs (rest_response: last); the other rules: test_callback_math.py
    module = lora_module(TASKS, tiny_backbone)
    spectral = SpectralGraphCallback(k=6, coordination=False, band_filter=False, eigen_lr=True, beta=2.0,
                                     sigma=0.5, learned=False, regularizer="none", rest_response="last")
    start = Snapshot()

    class RawUpdate(Callback):  # a step post-hook registered before the spectral callback's: the raw update
        def on_train_start(self, trainer, pl_module):
            def record(*_):
                self.params_after_step = [p.clone() for p in spectral._signals(param=True)]
            trainer.optimizers[0].register_step_post_hook(record)

    raw = RawUpdate()

    class Theta0(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.theta = [
                s.clone() for s in stack_signals(
                    spectral.layout, [m.lora_A.detach() for m in spectral.layers],
                    [m.lora_B.detach() for m in spectral.layers])]

    theta0 = Theta0()
    _fit(module, datamodule, [theta0, start, raw, spectral])
    (t0,), (t_raw,) = theta0.theta, raw.params_after_step
    (t_final,) = spectral._signals(param=True)
    U, values = spectral.vectors[0], spectral.values[0]
    h = 1 + 2.0 * torch.exp(-values / 0.5)  # η_i / η_base
    delta = t_raw - t0
    assert torch.allclose(t_final - t0, spectral_filter(delta, U, h, 1.0), atol=1e-6)


def test_high_pass_regulariser_adds_its_gradient(tiny_backbone, datamodule):
    module = lora_module(TASKS, tiny_backbone)
    spectral = SpectralGraphCallback(k=6, coordination=False, band_filter=False, eigen_lr=False, learned=False,
                                     regularizer="highpass", gamma=0.05, refresh_every=1)
    before, after = Snapshot(), Snapshot()

    class Theta(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.theta = [t.clone() for t in spectral._signals(param=True)]

    theta = Theta()
    _fit(module, datamodule, [before, theta, spectral, after], steps=2)  # the records are of the 2nd step
    (G,), (G2,), (T,) = before.grads, after.grads, theta.theta
    U, (T0,) = spectral.vectors[0], spectral.theta0
    # ∇ γ‖(I − UUᵀ)(Θ − Θ₀)‖² = 2γ (I − UUᵀ)(Θ − Θ₀)
    delta = T - T0
    expected = G + 2 * 0.05 * (delta - U @ (U.T @ delta))
    assert not torch.allclose(delta, torch.zeros_like(delta))
    assert torch.allclose(G2, expected, atol=1e-6)


def test_nan_gradients_never_reach_the_parameters(tiny_backbone, datamodule):
    module = lora_module(TASKS, tiny_backbone)

    class Poison(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            _, layer = lora_modules(pl_module.encoder)[0]
            layer.lora_A.grad[0, 0, 0] = float("nan")

    spectral = SpectralGraphCallback(k=6)
    before = [p.detach().clone() for p in module.parameters() if p.requires_grad]
    _fit(module, datamodule, [Poison(), spectral])
    after = [p.detach() for p in module.parameters() if p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    assert spectral.counters["skipped_nonfinite"] == 1
    assert int(module.skipped_steps) == 1
    assert spectral.corr.num_updates == 0  # the EMA was not poisoned


def test_one_skipped_step_flag_for_the_module_and_the_callback(tiny_backbone, datamodule):
    # a NaN outside the adapters (a head's gradient): the step's one check (the module's) skips it, and the
    # callback reads that flag: its EMAs do not move on a step the optimizer skips, and the check runs once
    module = lora_module(TASKS, tiny_backbone)
    checks = []

    class Poison(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            pl_module.heads.heads[0][1].weight.grad[0, 0] = float("nan")
            check = pl_module._guard.check
            pl_module._guard.check = lambda grads: checks.append(1) or check(grads)

    spectral = SpectralGraphCallback(k=6)
    before = [p.detach().clone() for p in module.parameters() if p.requires_grad]
    _fit(module, datamodule, [Poison(), spectral])
    assert checks == [1]  # asked by the callback first, reused by the module's hook
    assert all(torch.equal(p.detach(), b) for p, b in zip([p for p in module.parameters() if p.requires_grad],
                                                           before))
    assert int(module.skipped_steps) == 1
    assert spectral.counters["skipped_nonfinite"] == 1
    assert spectral.corr.num_updates == 0


def test_lobpcg_needs_n_at_least_3k(tiny_backbone, datamodule):
    module = lora_module(TASKS, tiny_backbone)  # 3 tasks x 8 slots x 2 = 48 nodes
    spectral = SpectralGraphCallback(k=20, dense_threshold=10)
    with pytest.raises(ValueError, match="k=20"):
        _fit(module, datamodule, [spectral])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(alpha=-1.0), "alpha=-1.0"),
        (dict(sigma=0.0), "sigma=0.0"),
        (dict(epsilon=2.0), "epsilon=2.0"),
        (dict(gamma=-0.1), "gamma=-0.1"),
        (dict(edge_kinds=["nope"]), "edge_kinds"),
        (dict(regularizer="l2"), "regularizer='l2'"),
        (dict(rest_response="all"), "rest_response='all'"),
        (dict(carry_coefficients="nearest"), "carry_coefficients='nearest'"),
        (dict(edge_weighting="gradient"), "edge_weighting='gradient'"),
        (dict(sparsify_topk=0), "sparsify_topk=0"),
    ],
)
def test_bad_options_are_refused_at_config_time(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpectralGraphCallback(**kwargs)


def test_resume_restores_the_spectral_state_exactly(tiny_backbone, datamodule, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(steps, ckpt=None, save=False):
        module = lora_module(TASKS, tiny_backbone)
        spectral = SpectralGraphCallback(k=6, refresh_every=2, learned=True, hyper_lr=0.5)
        callbacks = [spectral]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1,
                                             filename="{step}"))
        trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=save, enable_progress_bar=False,
                            limit_val_batches=0, callbacks=callbacks, use_distributed_sampler=False)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
        return module, spectral

    full_module, full = run(5, save=True)
    saved = torch.load(tmp_path / "step=2.ckpt", weights_only=False)["callbacks"]
    (state,) = [v for key, v in saved.items() if "SpectralGraphCallback" in key]
    assert (state["h_learned"][0] - 1).abs().max() > 0.05  # coefficients that moved away from 1 at the save
    resumed_module, resumed = run(5, ckpt=str(tmp_path / "step=2.ckpt"))
    assert torch.equal(full.corr.pair_ema, resumed.corr.pair_ema)
    assert torch.allclose(full.vectors[0].abs(), resumed.vectors[0].abs(), atol=1e-6)
    assert torch.equal(full.h_learned[0], resumed.h_learned[0])
    for a, b in zip(full_module.parameters(), resumed_module.parameters()):
        assert torch.equal(a, b)


def test_ablation_configs_change_only_what_they_name():
    base = yaml.safe_load((REPO / "configs/methods/speclora.yaml").read_text())
    (base_cb,) = base["trainer"]["callbacks"]
    defaults = SpectralGraphCallback()
    for key, value in base_cb["init_args"].items():  # speclora.yaml spells out the defaults
        got = getattr(defaults, key)
        got = list(got) if isinstance(got, tuple) else got
        assert got == (None if key == "normalization" and value == "none" else value) or (
            key == "normalization" and got == "sym"), key
    files = sorted((REPO / "configs/methods/speclora_ablations").glob("*.yaml"))
    assert {f.stem for f in files} == {"no_filtering", "fixed_coefficients", "magnitude_edges",
                                       "layerwise_graph", "no_coordination", "single_frequency"}
    for f in files:
        (cb,) = yaml.safe_load(f.read_text())["trainer"]["callbacks"]
        SpectralGraphCallback(**cb["init_args"])  # valid options
        changed = {k for k, v in cb["init_args"].items() if base_cb["init_args"].get(k) != v}
        assert changed == set(cb["init_args"]), f"{f.name} repeats a default"


def test_a_failed_first_solve_is_a_counted_recovery(tiny_backbone, datamodule, monkeypatch):
    import speclora.spectral.callback_refresh as cb
    from speclora.spectral.eigen import EigenSolverError

    real = cb.smallest_eigenpairs
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise EigenSolverError("LOBPCG did not converge and there is nothing to keep")
        return real(*args, **kwargs)

    monkeypatch.setattr(cb, "smallest_eigenpairs", flaky)
    module = lora_module(TASKS, tiny_backbone)
    spectral = SpectralGraphCallback(k=6, refresh_every=50)
    _fit(module, datamodule, [spectral], steps=2)
    assert spectral.counters["solver_failed"] == 1
    assert spectral.vectors[0] is not None  # the second step solved again and went on
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_low_precision_adapters_take_the_allocating_path(tiny_backbone, datamodule):
    # bf16 adapters cannot be stacked into the float32 work buffers: the callback stacks, converts, writes back
    module = lora_module(TASKS, tiny_backbone)
    spectral = SpectralGraphCallback(k=6, log_every=1, heatmap_every=0)
    _fit(module, datamodule, [spectral], steps=2, precision="bf16-true")
    assert spectral.layers[0].lora_A.dtype == torch.bfloat16 and not spectral._work
    assert spectral.counters["refreshes"] >= 1 and spectral.delta_prev[0] is not None
    assert all(torch.isfinite(p.float()).all() for p in module.parameters())
