"""The update filter inside ``optimizer.step`` (a step post-hook, ``speclora.spectral.step_hooks``) gives the
same run as the path it replaced (a rewrite of Θ in ``on_train_batch_end`` after the step, kept below as
``RewriteAfterStep``, the code of 5d18424), through a refresh, a skipped non-finite step and a resume; the
hooks are attached once per fit and removed at teardown; a step the optimizer never takes (fp16 GradScaler)
and the module's skipped flag (``EdgeCorrelation.update``) keep the update memory right."""

from __future__ import annotations

import collections

import lightning as L
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from speclora.data.datamodule import MultiTaskDataModule
from speclora.model.lora import lora_modules
from speclora.spectral.callback import SpectralGraphCallback
from speclora.spectral.correlation import EdgeCorrelation
from speclora.spectral.devices import float32_math
from speclora.spectral.filters import remember_update
from speclora.spectral.regularizer import dirichlet_energy, high_pass_energy, regularizer_terms
from speclora.spectral.step_hooks import StepHooks
from tests.spectral.toy import Driver, SignDescent, Toy, lora_module

TASKS = ["rte", "stsb", "copa"]


class RewriteAfterStep(SpectralGraphCallback):
    """The reference: the update filter as it ran at 5d18424, a rewrite of Θ in ``on_train_batch_end`` after
    the optimizer step (on the step after the snapshot), with no step hook."""

    def on_train_start(self, trainer, pl_module):
        self._ensure_device()
        self._take_theta0()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self._step_of_snapshot = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._ensure_device()
        if self._theta_before is not None and trainer.global_step == self._step_of_snapshot + 1:
            with float32_math(self._device):
                self._filter_update()


class Poison(Callback):
    """A NaN in one LoRA gradient at global step ``at`` (listed before the spectral callback)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.at:
            lora_modules(pl_module.encoder)[0][1].lora_A.grad[0, 0, 0] = float("nan")


@pytest.fixture(scope="module")
def datamodule(tiny_backbone, data_root, tmp_path_factory):
    return MultiTaskDataModule(tasks=TASKS, data_dir=str(data_root), tokenizer=tiny_backbone, max_length=32,
                               batch_size=6, cache_dir=str(tmp_path_factory.getbasetemp() / "token_cache"),
                               mixing="equal")


def _initial_lora(tiny_backbone):
    return [p.detach() for _, m in lora_modules(lora_module(TASKS, tiny_backbone).encoder) for p in (m.lora_A, m.lora_B)]


def _run(kind, tiny_backbone, datamodule, tmp_path, steps, ckpt=None):
    module = lora_module(TASKS, tiny_backbone)
    # refreshes at steps 0, 3 and 6; learned coefficients that move; the high-pass regulariser
    spectral = kind(k=6, refresh_every=3, learned=True, hyper_lr=0.5, log_every=10**6, heatmap_every=0)
    calls = collections.Counter()
    if kind is SpectralGraphCallback:
        real = spectral.filter_optimizer_update
        spectral.filter_optimizer_update = lambda trainer, m: calls.update([trainer.global_step]) or real(trainer, m)
    callbacks = [Poison(at=2), spectral]
    if ckpt is None:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / kind.__name__, every_n_train_steps=4, save_top_k=-1,
                                         filename="{step}"))
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=ckpt is None, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=callbacks,
                        use_distributed_sampler=False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    lora = [p.detach().clone() for _, m in lora_modules(module.encoder) for p in (m.lora_A, m.lora_B)]
    return trainer, module, spectral, lora, calls


def test_the_step_hook_path_gives_the_rewrite_path_bit_for_bit(tiny_backbone, datamodule, tmp_path):
    # 7 steps: refreshes at 0, 3, 6, a NaN at step 2 (skipped), a checkpoint at step 4 that a second fit resumes
    runs = {}
    for kind in (SpectralGraphCallback, RewriteAfterStep):
        full = _run(kind, tiny_backbone, datamodule, tmp_path, 7)
        resumed = _run(kind, tiny_backbone, datamodule, tmp_path, 7,
                       ckpt=str(tmp_path / kind.__name__ / "step=4.ckpt"))
        runs[kind] = (full, resumed)
        assert int(full[1].skipped_steps) == 1 and full[2].counters["refreshes"] == 3
    (new_full, new_resumed), (old_full, old_resumed) = runs[SpectralGraphCallback], runs[RewriteAfterStep]
    # the same float32 operations in the same order, only called from elsewhere: equal bit for bit
    for new, old in ((new_full, old_full), (new_resumed, old_resumed), (new_resumed, new_full)):
        assert all(torch.equal(a, b) for a, b in zip(new[3], old[3]))
        assert torch.equal(new[2].h_learned[0], old[2].h_learned[0])
        assert torch.equal(new[2].delta_prev[0], old[2].delta_prev[0])
    assert (new_full[2].h_learned[0] - 1).abs().max() > 0.05  # the learned coefficients took part
    assert not all(torch.equal(a, b) for a, b in zip(new_full[3], _initial_lora(tiny_backbone)))  # they moved
    # the filter ran inside the optimizer's step once per step (attached anew on the resumed fit's optimizer)
    assert new_full[4] == {s: 1 for s in range(7)} and new_resumed[4] == {s: 1 for s in range(4, 7)}
    # removed at teardown: a later step of that optimizer runs no filter
    trainer, _, spectral, _, calls = new_resumed
    assert spectral.step_hooks.handles == []
    trainer.optimizers[0].step()
    assert sum(calls.values()) == 3


def test_step_hooks_attach_once_and_detach():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.1)
    calls = []
    hooks = StepHooks()
    hooks.attach([opt], lambda: calls.append(1))
    hooks.attach([opt], lambda: calls.append(2))  # a second fit with the same callback: replaces, no double
    p.grad = torch.ones(2)
    opt.step()
    assert calls == [2] and hooks.optimizers == [opt]
    hooks.detach()
    opt.step()
    assert calls == [2] and hooks.handles == []
    with pytest.raises(ValueError, match="no optimizer"):
        hooks.attach([], lambda: None)


def _steps(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [{i: (torch.randn(2, 1, 2, generator=g), torch.randn(2, 2, 1, generator=g)) for i in range(4)}
            for _ in range(4)]


@pytest.mark.parametrize("first", [True, False])
def test_a_step_the_optimizer_never_takes_is_a_skipped_step(first):
    # an fp16 GradScaler that finds an inf does not call optimizer.step: on_train_batch_end closes the step;
    # the state (update memory and its cache included) and the run that follows are those of a step the
    # optimizer takes and leaves unchanged (the module's skip), also where the very first step is skipped
    def run(no_call: bool):
        cb = SpectralGraphCallback(k=3, log_every=10**6, heatmap_every=0, refresh_every=2, hyper_lr=0.5)
        drive, steps = Driver(Toy(), cb), _steps()
        if not first:
            drive.step(steps[0])
        rec = drive.step(steps[1], skip=True, poison=True, no_call=no_call)
        assert torch.equal(rec["theta_after"], rec["theta_before"]) and cb._theta_before is None
        memory = (cb.delta_prev[0].clone(), cb._c_delta_prev[0][1].clone(), cb.h_learned[0].clone())
        for s in steps[2:]:
            drive.step(s)
        return memory, drive.theta(), cb.h_learned[0], cb.delta_prev[0]

    never, skipped = run(True), run(False)
    assert all(torch.equal(a, b) for a, b in zip(never[0], skipped[0]))
    assert all(torch.equal(a, b) for a, b in zip(never[1:], skipped[1:]))


def test_the_module_flag_decides_the_step_and_the_sum_test_guards_overflow():
    # with a module, whether the step goes ahead is its flag; the EMA's sum test only guards float32 overflow:
    # finite gradients whose Σ‖g‖² overflows leave the EMAs and the learned coefficients as they were, but the
    # optimizer's update of that step is remembered (before: the step's update was dropped from the memory)
    model = Toy()
    model.step_skipped = lambda: torch.tensor(False)  # the module's flag: this step goes ahead
    cb = SpectralGraphCallback(k=3, log_every=10**6, heatmap_every=0, refresh_every=10**6, hyper_lr=0.5)
    drive, steps = Driver(model, cb), _steps()
    drive.step(steps[0])
    drive.step(steps[1])
    ema, h, updates = cb.corr.ema.clone(), cb.h_learned[0].clone(), cb.corr.num_updates
    huge = {i: (a * 1e20, b * 1e20) for i, (a, b) in steps[2].items()}  # finite; ‖g‖² overflows float32
    rec = drive.step(huge)
    assert torch.equal(cb.corr.ema, ema) and torch.equal(cb.h_learned[0], h) and cb.corr.num_updates == updates
    assert torch.isfinite(rec["theta_after"]).all()
    assert torch.equal(cb.delta_prev[0], rec["theta_optimizer"] - rec["theta_before"])  # this step's update
    # the flag set: the step is skipped however finite the gradients are; nothing moves
    model.step_skipped = lambda: torch.tensor(True)
    memory = cb.delta_prev[0].clone()
    rec = drive.step(steps[3], skip=True)
    assert torch.equal(cb.corr.ema, ema) and torch.equal(cb.h_learned[0], h)
    assert torch.equal(cb.delta_prev[0], memory) and torch.equal(rec["theta_after"], rec["theta_before"])


def test_edge_correlation_reads_the_flag_and_guards_overflow():
    ei = torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]])
    corr = EdgeCorrelation(ei, 3, 0.5)
    G = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    assert bool(corr.update(G, skipped=torch.tensor(False)))
    ema = corr.ema.clone()
    assert not bool(corr.update(G, skipped=torch.tensor(True)))  # finite, but the module skips the step
    assert not bool(corr.update(G * 1e20, skipped=torch.tensor(False)))  # finite, Σ‖g‖² overflows
    assert torch.equal(corr.ema, ema) and corr.num_updates == 1 and corr.num_skipped_nonfinite == 2
    G[0, 0] = float("nan")
    assert not bool(corr.update(G))  # no module: G's own test
    assert torch.equal(corr.ema, ema) and corr.num_skipped_nonfinite == 3


def test_remember_update_keeps_the_memory_on_a_skipped_step():
    delta, c_delta = torch.randn(4, 3), torch.randn(2, 3)
    go, stop = torch.tensor(True), torch.tensor(False)
    new, c_new = remember_update(None, None, delta, c_delta, stop)  # skipped before any step: zeros
    assert torch.equal(new, torch.zeros(4, 3)) and torch.equal(c_new, torch.zeros(2, 3))
    prev, c_prev = torch.randn(4, 3), torch.randn(2, 3)
    kept = prev.clone()
    new, c_new = remember_update(prev, c_prev, delta, c_delta, stop)
    assert new is prev and torch.equal(new, kept) and torch.equal(c_new, c_prev)
    new, c_new = remember_update(prev, c_prev, delta, c_delta, go)
    assert torch.equal(new, delta) and torch.equal(c_new, c_delta)


def test_regularizer_terms_are_the_gradients_of_the_regularisers():
    g = torch.Generator().manual_seed(0)
    theta, theta0 = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g,
                                                                                     dtype=torch.float64)
    U, _ = torch.linalg.qr(torch.randn(6, 2, generator=g, dtype=torch.float64))  # (6, 2) orthonormal
    W = torch.rand(6, 6, generator=g, dtype=torch.float64)
    W = (W + W.T).fill_diagonal_(0)
    L = (torch.diag(W.sum(1)) - W).to_sparse()
    gamma = 0.05
    for kind, energy, kwargs in (
            ("highpass", lambda t: high_pass_energy(t, theta0, U, gamma), dict(U_k=U, c_theta0=U.T @ theta0)),
            ("dirichlet", lambda t: dirichlet_energy(t, theta0, L, gamma), dict(laplacian=L))):
        t = theta.clone().requires_grad_()
        value = energy(t)
        value.backward()
        reg, reg_low, got = regularizer_terms(kind, gamma, theta, theta0, **kwargs)
        grad = 2 * gamma * reg - (2 * gamma * U @ reg_low if reg_low is not None else 0)  # filter_gradient_'s
        assert torch.allclose(got, value.detach()) and torch.allclose(grad, t.grad)
    with pytest.raises(ValueError, match="regularizer='l2'"):
        regularizer_terms("l2", gamma, theta, theta0)


def test_sign_descent_is_the_drivers_optimizer():
    p = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = SignDescent([p], lr=0.5)
    p.grad = torch.tensor([2.0, -3.0])
    opt.step()
    assert torch.equal(p.detach(), torch.tensor([0.5, -0.5]))
    opt.skip = True
    opt.step()
    assert torch.equal(p.detach(), torch.tensor([0.5, -0.5]))
