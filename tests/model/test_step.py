"""The training step off the host: no device read in a steady-state step, the batched heads equal to the eager
per-task loop, the non-finite skip on the device, the bf16 frozen encoder."""

from __future__ import annotations

import pytest
import torch

from speclora.methods import FullFT, Shared
from speclora.model.lora import lora_modules
from speclora.model.module import SpecLoRAModule
from tests.model.batches import train_batches
from tests.model.eager_heads import eager_task_losses
from tests.model.step_counts import counting

TASKS = ["rte", "stsb", "copa", "cb"]  # classification (2 and 3 classes), regression, choice


@pytest.fixture(scope="module")
def batches(tiny_backbone, data_root, tmp_path_factory):
    return train_batches(tiny_backbone, data_root, tmp_path_factory.getbasetemp() / "token_cache", TASKS, 4)


def _module(tiny_backbone, **kwargs) -> SpecLoRAModule:
    torch.manual_seed(0)
    module = SpecLoRAModule(TASKS, backbone=tiny_backbone, **kwargs)
    g = torch.Generator().manual_seed(1)
    for _, layer in lora_modules(module.encoder):  # B = 0 at start: give the adapters a gradient to pass on
        layer.lora_B.data = torch.randn(layer.lora_B.shape, generator=g) * 0.1
    return module


def _optimizer(module: SpecLoRAModule) -> torch.optim.Optimizer:
    # what configure_optimizers builds on a CPU: a fused AdamW
    return torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3, fused=True)


def _step(module: SpecLoRAModule, optimizer, batch) -> torch.Tensor:
    loss = module.training_step(batch, 0)
    loss.backward()
    module.on_before_optimizer_step(optimizer)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


@pytest.fixture(scope="module")
def copa_batches(tiny_backbone, data_root, tmp_path_factory):
    return train_batches(tiny_backbone, data_root, tmp_path_factory.getbasetemp() / "token_cache", ["copa"], 3,
                         batch_size=8, mixing=None)


@pytest.mark.parametrize("method", ["independent", "shared", "single"])
def test_a_steady_state_training_step_reads_nothing_back_from_the_device(tiny_backbone, batches, copa_batches,
                                                                         method):
    if method == "single":  # one task alone (COPA: the choice head)
        torch.manual_seed(0)
        module, batches = SpecLoRAModule(["copa"], backbone=tiny_backbone, method=method), copa_batches
    else:
        module = _module(tiny_backbone, method=method)
    optimizer = _optimizer(module)
    for batch in batches[:2]:  # warm-up: optimizer state, lookup caches
        _step(module, optimizer, batch)
    with counting() as counts:
        _step(module, optimizer, batches[2])
    assert counts.num_syncs == 0, f"host reads in a training step: {dict(counts.syncs)}"
    assert counts.num_ops > 0  # the profiler saw the step


def test_batched_heads_equal_the_eager_per_task_loop(tiny_backbone, batches):
    # tolerance: float32 reassociation only (one matmul over all heads instead of one per task)
    module = _module(tiny_backbone, head_dropout=0.0).eval()  # no dropout, so both paths see the same rows
    batch = dict(batches[1])
    labels = batch["labels"].clone()
    labels[0] = float("nan")  # an unlabelled example is left out of its task's mean
    batch["labels"] = labels
    params = [p for p in module.parameters() if p.requires_grad]

    pooled = module.encode(batch)
    reference = eager_task_losses(module.heads, pooled, batch)
    total_ref = sum(reference.values())
    grads_ref = torch.autograd.grad(total_ref, params, allow_unused=True)

    total, out = module.batch_loss(batch)
    grads = torch.autograd.grad(total, params, allow_unused=True)

    assert set(reference) == {t for t in out.tasks if out.task_count[t] > 0}
    for t, loss in reference.items():
        torch.testing.assert_close(out.task_loss[t], loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total, total_ref, rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(grads, grads_ref):
        if g_ref is None:  # a head of a task absent from the batch: no gradient either way (AdamW skips it)
            assert g is None
        else:
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


def _value_dropout(calls: list[float]):
    """A dropout whose mask is a function of each element's value, so that an element is dropped (or kept)
    wherever it is computed, scaled as F.dropout: x_i [u(x_i) >= p] / (1 - p), u(x) = frac(8 |x|). Coarse
    enough (1/8) that float32 reassociation between the two head paths flips no mask."""

    def dropout(x, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return x
        calls.append(p)
        keep = (x.detach().abs() * 8).frac() >= p  # (...) bool
        return x * keep / (1 - p)

    return dropout


def test_batched_heads_drop_what_the_eager_per_task_loop_drops_in_train_mode(tiny_backbone, batches, monkeypatch):
    # the batched heads apply head dropout where the per-task Sequential does (on the pooled input and after
    # tanh), with the heads' p and 1/(1-p) scaling, only in train mode: with value-keyed masks (the same element
    # dropped in both paths) the losses and gradients are equal, and differ from the eval-mode ones
    module = _module(tiny_backbone, head_dropout=0.3).train()
    batch = batches[1]
    with torch.no_grad():
        pooled = module.encode(batch)  # (N, H), the encoder's own dropout as drawn
    params = list(module.heads.parameters())
    calls: list[float] = []
    monkeypatch.setattr(torch.nn.functional, "dropout", _value_dropout(calls))

    reference = eager_task_losses(module.heads, pooled, batch)
    eager_calls, calls[:] = list(calls), []
    total_ref = sum(reference.values())
    grads_ref = torch.autograd.grad(total_ref, params, allow_unused=True)
    out = module.heads.batched(pooled, batch)
    total = (module.task_weights * out.task_loss).sum()
    grads = torch.autograd.grad(total, params, allow_unused=True)

    assert calls == [0.3, 0.3]  # one dropout before each head layer, with the heads' p
    assert eager_calls == [0.3, 0.3] * len(torch.unique(batch["task"]))
    for t, loss in reference.items():
        torch.testing.assert_close(out.task_loss[t], loss, rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(grads, grads_ref):
        if g_ref is None:
            assert g is None
        else:
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)
    module.eval()
    with torch.no_grad():
        evaluated = module.heads.batched(pooled, batch).task_loss  # (T,)
    assert not torch.allclose(evaluated, out.task_loss.detach())  # the masks did drop something
    assert calls == [0.3, 0.3]  # no dropout in eval mode


def test_train_mode_turns_on_every_dropout_with_its_configured_p(tiny_backbone):
    # the frozen encoder's own dropout (hidden and attention), the adapters' input dropout and the heads'
    from speclora.model.config import LoRAConfig

    module = _module(tiny_backbone, lora=LoRAConfig(dropout=0.2), head_dropout=0.3).eval().train()
    lora = [layer for _, layer in lora_modules(module.encoder)]
    lora_drop = {id(layer.dropout) for layer in lora}
    assert lora and all(layer.dropout.p == 0.2 and layer.dropout.training for layer in lora)
    assert module.heads.dropout == 0.3 and module.heads.training
    config = module.encoder.config
    encoder_drop = [m for m in module.encoder.modules()
                    if isinstance(m, torch.nn.Dropout) and id(m) not in lora_drop]
    assert encoder_drop and all(m.training for m in encoder_drop)
    assert {m.p for m in encoder_drop} <= {config.hidden_dropout_prob, config.attention_probs_dropout_prob}
    module.eval()
    assert not any(m.training for m in module.modules() if isinstance(m, torch.nn.Dropout))
    assert not module.heads.training


def test_predictions_of_an_evaluation_batch_match_the_per_task_view(tiny_backbone, batches):
    module = _module(tiny_backbone).eval()
    batch = batches[0]
    with torch.no_grad():
        out = module.heads.batched(module.encode(batch), batch)
        view = {t: module.heads.split(out, batch, t) for t in out.tasks}
    for t, task_out in view.items():
        preds, _, chosen = module.heads.predict(t, out, batch, examples=task_out.examples, probs=False)
        assert torch.equal(preds, task_out.preds)
        if task_out.probs is not None:  # a prediction is the most probable class / option
            assert torch.equal(task_out.probs.argmax(-1), task_out.preds)
            assert torch.allclose(task_out.probs.sum(-1), torch.ones(len(task_out.examples)))


def test_a_skipped_step_changes_neither_parameters_nor_optimizer_state(tiny_backbone, batches):
    module = _module(tiny_backbone)
    optimizer = _optimizer(module)
    _step(module, optimizer, batches[0])  # a clean step: the optimizer has state
    params = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}

    loss = module.training_step(batches[1], 1)
    loss.backward()
    _, layer = lora_modules(module.encoder)[0]
    layer.lora_A.grad[0, 0, 0] = float("inf")
    module.on_before_optimizer_step(optimizer)
    optimizer.step()

    for n, p in module.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, params[n]), f"{n} moved on a skipped step"
    for p, s in optimizer.state.items():
        for k, v in s.items():
            assert torch.equal(v, state[id(p)][k]), f"optimizer state {k} changed on a skipped step"
    assert int(module.skipped_steps) == 1
    # read (with the losses) at the next logging step, which also reports it
    _, (skipped, last) = module._train_log.read(also=(module.skipped_steps, module._guard.last_step))
    assert (skipped, last) == (1.0, 0.0)


def test_without_a_fused_optimizer_the_skip_reads_the_flag_and_drops_the_gradients(tiny_backbone, batches):
    module = _module(tiny_backbone)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3, foreach=False)
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    loss = module.training_step(batches[0], 0)
    loss.backward()
    module.heads.heads[0][1].weight.grad[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="non-finite gradient: 1 update"):
        module.on_before_optimizer_step(optimizer)
    optimizer.step()
    assert all(p.grad is None for p in module.parameters())
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters() if p.requires_grad)
    assert int(module.skipped_steps) == 1


def test_bf16_frozen_encoder_keeps_adapters_heads_and_moments_in_fp32(tiny_backbone, batches):
    reference = _module(tiny_backbone, head_dropout=0.0).eval()
    module = _module(tiny_backbone, head_dropout=0.0, encoder_dtype="bfloat16").eval()
    frozen = [p for p in module.encoder.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trainable)

    loss, _ = module.batch_loss(batches[0])
    ref_loss, _ = reference.batch_loss(batches[0])
    # bf16 keeps 8 bits of mantissa: the loss agrees to about 1%
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
    loss.backward()
    grads = [p.grad for p in trainable if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    optimizer = _optimizer(module)
    optimizer.step()
    assert all(v.dtype == torch.float32 for s in optimizer.state.values() for k, v in s.items() if k != "step")


@pytest.mark.parametrize("method", ["ortho", "unolora_star", "hyperformer", "speclora", "adalora", "mtlora"])
def test_every_lora_method_trains_on_a_bf16_frozen_encoder(tiny_backbone, batches, method):
    module = SpecLoRAModule(TASKS, backbone=tiny_backbone, method=method, encoder_dtype="bfloat16")
    loss, _ = module.batch_loss(batches[0])
    loss.backward()
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trainable)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)


def test_encoder_dtype_is_checked(tiny_backbone):
    with pytest.raises(ValueError, match="model.encoder_dtype='float16'; allowed: 'float32', 'bfloat16'"):
        SpecLoRAModule(TASKS, backbone=tiny_backbone, encoder_dtype="float16")
    with pytest.raises(ValueError, match="method full_ft trains every encoder weight"):
        SpecLoRAModule(TASKS, backbone=tiny_backbone, method=FullFT(), encoder_dtype="bfloat16")


def test_the_prepared_attention_mask_gives_the_encoders_own_result(tiny_backbone, batches):
    from speclora.model.step import encoder_attention_mask, takes_prepared_mask

    module = _module(tiny_backbone, method=Shared()).eval()  # one adapter: the encoder runs without routing
    batch = batches[0]
    assert takes_prepared_mask(module.encoder)
    for impl in ("sdpa", "eager"):
        module.encoder.config._attn_implementation = impl
        kwargs = dict(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])
        with torch.no_grad():
            own = module.encoder(attention_mask=batch["attention_mask"], **kwargs).last_hidden_state
            prepared = encoder_attention_mask(module.encoder, batch["attention_mask"])
            ours = module.encoder(attention_mask=prepared, **kwargs).last_hidden_state
        assert prepared.dim() == 4
        keep = batch["attention_mask"].bool()  # padded positions' outputs are never read
        torch.testing.assert_close(ours[keep], own[keep], rtol=1e-5, atol=1e-5)


def test_tf32_is_set_on_cuda_only():
    from speclora.model.step import set_tf32

    before = torch.backends.cuda.matmul.allow_tf32
    assert set_tf32(torch.device("cpu"), True) is False
    assert torch.backends.cuda.matmul.allow_tf32 == before


def test_lightning_steps_between_logging_steps_read_nothing_back(tiny_backbone, batches, tmp_path):
    """Through the Trainer, progress bar and logger on: the loop's own hooks, the logging and the bar read
    nothing back between logging steps; the logged loss is the mean since the last logging step."""
    import csv

    import lightning as L
    from lightning.pytorch import Callback
    from lightning.pytorch.loggers import CSVLogger

    class Window(Callback):
        """Profiles [on_train_batch_start(k), on_train_batch_start(k + 1)): loop iteration k whole."""

        def __init__(self, indices: set[int]) -> None:
            self.indices, self.counts, self.losses, self._open = indices, {}, [], None

        def _close(self) -> None:
            if self._open is not None:
                k, ctx = self._open
                ctx.__exit__(None, None, None)
                self._open = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._close()
            if batch_idx in self.indices:
                ctx = counting()
                self.counts[batch_idx] = ctx.__enter__()
                self._open = (batch_idx, ctx)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(outputs["loss"].detach().clone())  # no host read

        def on_train_end(self, trainer, pl_module):
            self._close()

    # pre-collated batches: the window holds no data loading
    loader = torch.utils.data.DataLoader(batches * 2, batch_size=None, collate_fn=lambda b: b)
    window = Window({3, 4, 5})
    trainer = L.Trainer(max_steps=7, log_every_n_steps=3, logger=CSVLogger(tmp_path), enable_progress_bar=True,
                        enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                        gradient_clip_val=1.0, callbacks=[window], use_distributed_sampler=False)
    trainer.fit(_module(tiny_backbone), train_dataloaders=loader)

    # batches 3 and 4 are steps 4 and 5; batch 5 is step 6, a logging step (one read of the sums, and
    # Lightning turning the logged values into numbers)
    assert window.counts[3].num_syncs == 0, dict(window.counts[3].syncs)
    assert window.counts[4].num_syncs == 0, dict(window.counts[4].syncs)
    assert window.counts[5].num_syncs > 0
    losses = torch.stack(window.losses).tolist()
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as f:
        logged = {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}
    assert logged == pytest.approx({2: sum(losses[0:3]) / 3, 5: sum(losses[3:6]) / 3}, rel=1e-6)
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(losses[6], rel=1e-6)  # the last step
    assert trainer.progress_bar_metrics["train/loss"] == pytest.approx(losses[6], rel=1e-6)
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 0


def test_step_state_follows_the_module_to_another_device(tiny_backbone, batches):
    # the caches and device sums made on the first device must not be reused on the next: on `meta`, a stale
    # CPU tensor would raise "Expected all tensors to be on the same device"
    module = _module(tiny_backbone)
    optimizer = _optimizer(module)
    _step(module, optimizer, batches[0])  # CPU: lookup cache, loss sums, non-finite flag
    module.to("meta")
    batch = {k: v.to("meta") if torch.is_tensor(v) else v for k, v in batches[1].items()}
    loss = module.training_step(batch, 1)
    loss.backward()
    module.on_before_optimizer_step(optimizer)  # the device flag, handed to the (fused) optimizer
    assert loss.device.type == "meta" and optimizer.found_inf.device.type == "meta"
    assert module._guard.found_inf.device.type == "meta" and module._train_log._base.device.type == "meta"
    assert all(t.device.type == "meta" for t in module.heads._slot_cache[(batch["present_tasks"], loss.device)])


def test_train_log_means_since_the_last_read():
    from speclora.model.step import TrainLog

    log = TrainLog(["a", "b"])
    t = torch.tensor
    # step 1: both tasks, a term; step 2: task a only, no term; step 3: task b only, the term
    log.add(t(3.0), t([1.0, 2.0]), t([4.0, 1.0]), {"reg": t(0.5)})
    log.add(t(5.0), t([3.0, 0.0]), t([2.0, 0.0]), {})
    log.add(t(1.0), t([0.0, 6.0]), t([0.0, 3.0]), {"reg": t(1.5)})
    values, (skipped,) = log.read(also=(t(2),))
    assert values == {"loss": 3.0, "a/loss": 2.0, "b/loss": 4.0, "reg": 1.0}
    assert skipped == 2.0
    assert log.read() == ({}, [])  # a new window


def test_with_an_amp_grad_scaler_the_scaler_skips_the_step(tiny_backbone, batches):
    # fp16 AMP (CUDA): the scaler sees the same inf, skips the step and lowers its scale; dropping the
    # gradients here would hide the overflow from it (its scale would never come down)
    from types import SimpleNamespace

    module = _module(tiny_backbone)
    optimizer = _optimizer(module)
    module._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=object()), global_step=0)
    try:
        module.training_step(batches[0], 0).backward()
        module.heads.heads[0][1].weight.grad[0, 0] = float("inf")
        module.on_before_optimizer_step(optimizer)
    finally:
        module._trainer = None
    assert module.heads.heads[0][1].weight.grad is not None  # left for the scaler
    assert getattr(optimizer, "found_inf", None) is None  # the scaler hands the fused kernel its own flag
    assert int(module.skipped_steps) == 1
