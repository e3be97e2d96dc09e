"""The LightningModule: a frozen encoder, multi-task LoRA layers, per-task heads, per-task metrics.

Loss of a mixed batch (DESIGN.md, data path):  L = Σ_t λ_t L_t,  L_t the mean loss of task t's rows,
with λ_t = 1 (``uniform``) or λ_t = T·n_t / Σ_s n_s (``size``, n_t the task's training examples).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from speclora.backbone import resolve_backbone
from speclora.checkpoint import (
    IDENTITY_KEY,
    backbone_fingerprint,
    frozen_keys,
    prune_frozen,
    restore_frozen,
    restore_rng_state,
    rng_state,
    with_entries,
)
from speclora.metrics import TaskMetrics, suite_average
from speclora.model.adapted import AdaptedEncoder, BuildInputs, upgrade_state_dict
from speclora.model.compile import CompileConfig, compile_config
from speclora.model.config import LoRAConfig, OptimConfig, config_from
from speclora.model.heads import REGRESSION_TARGETS, HeadOutput, TaskHeads, TaskOutput, TaskOutputs
from speclora.model.lora import resolve_targets
from speclora.model.method import Method, resolve_method
from speclora.model.optim import adamw_with_schedule, clip_unscaled_gradients, fused_setting
from speclora.model.step import (
    ENCODER_DTYPES,
    NonFiniteGuard,
    TrainLog,
    cast_frozen,
    set_tf32,
    supports_found_inf,
)
from speclora.tasks import resolve_tasks

log = logging.getLogger(__name__)


class SpecLoRAModule(L.LightningModule):
    """Multi-task LoRA on a frozen HF encoder.

    Args:
        tasks: the run's tasks, in the order of the task index carried by batches (the CLI links it
            to ``data.tasks``).
        backbone: ``default`` (the packaged all-MiniLM-L6-v2), an HF model name, or a local folder.
        method: the multi-task method the module is handed, by class (``Independent``, ``Single``,
            ``Shared``, ... see ``speclora.methods``); its constructor arguments are its options. The
            default, the :class:`~speclora.model.method.Method` base, is per-task adapters with no coupling
            (what ``Independent`` names). In Python a registry name (``"shared"``) of an imported method
            class works too (speclora.model.method.resolve_method).
        lora: adapter hyperparameters.
        optim: optimiser and schedule.
        pooling: ``cls`` (first token) or ``mean`` (mean of the unmasked tokens).
        head_dropout: dropout inside the task heads.
        regression_target: ``range``, ``standard`` or ``raw``: a regression head's target (heads.target_map).
        loss_weights: ``uniform`` or ``size`` (module docstring).
        encoder_dtype: ``float32`` or ``bfloat16``: the dtype the frozen encoder weights are held (and the
            encoder computes) in; adapters, heads and optimizer state stay float32. bfloat16 halves the
            weights' memory and runs the matmuls on bf16 tensor cores, with no per-step weight cast (unlike
            ``trainer.precision=bf16-mixed``, which casts the frozen weights at every step).
        tf32: let float32 matmuls use TF32 tensor cores on a CUDA GPU that has them (Ampere and later).
        compile: ``torch.compile`` of the adapted encoder's forward (speclora.model.compile); or a mode, a bool.

    The method builds the adapted encoder (speclora.model.adapted) in the constructor, and the module holds
    it as ``adapted``; ``encoder``, ``router``, ``slots`` and ``targets`` read its parts.

    ``method``, ``lora`` and ``optim`` also take the plain dicts a checkpoint's hyperparameters hold, so
    ``SpecLoRAModule.load_from_checkpoint(path)`` rebuilds any method with its options. Checkpoints leave the
    frozen backbone out and name it instead (speclora.checkpoint); :meth:`load_state_dict` takes them.
    """

    def __init__(
        self,
        tasks: list[str],
        backbone: str = "default",
        method: Method = Method(),  # noqa: B008 - the CLI's default: per-task adapters, no coupling
        lora: LoRAConfig = LoRAConfig(),  # noqa: B008 - frozen dataclass, the CLI's default
        optim: OptimConfig = OptimConfig(),  # noqa: B008
        pooling: Literal["cls", "mean"] = "cls",
        head_dropout: float = 0.1,
        regression_target: Literal["range", "standard", "raw"] = "standard",
        loss_weights: Literal["uniform", "size"] = "uniform",
        encoder_dtype: Literal["float32", "bfloat16"] = "float32",
        tf32: bool = True,
        compile: CompileConfig = CompileConfig(),  # noqa: B008 - frozen dataclass, the CLI's default
    ) -> None:
        super().__init__()
        self.specs = resolve_tasks(tasks)
        # a checkpoint's hyperparameters hold the method, lora and optim as plain dicts (load_from_checkpoint)
        method = resolve_method(method)
        lora = config_from(lora, LoRAConfig, "model.lora")
        optim = config_from(optim, OptimConfig, "model.optim")
        self.compile_cfg = compile_config(compile)
        method.check(self.specs)
        for key, value, allowed in (("pooling", pooling, ("cls", "mean")), ("loss_weights", loss_weights, ("uniform", "size")),
                                    ("encoder_dtype", encoder_dtype, tuple(ENCODER_DTYPES)),
                                    ("regression_target", regression_target, REGRESSION_TARGETS)):
            if value not in allowed:
                raise ValueError(f"model.{key}={value!r}; allowed: {', '.join(map(repr, allowed))}")
        self.save_hyperparameters({"tasks": [s.name for s in self.specs], "backbone": backbone, "method": method.hparams(),
                                   "lora": asdict(lora), "optim": asdict(optim), "pooling": pooling,
                                   "head_dropout": head_dropout, "regression_target": regression_target,
                                   "loss_weights": loss_weights, "encoder_dtype": encoder_dtype, "tf32": tf32,
                                   "compile": asdict(self.compile_cfg)})
        self.method_name = method.name
        self.lora_cfg, self.optim_cfg = lora, optim
        self.pooling, self.loss_weights, self.backbone_name = pooling, loss_weights, backbone

        from transformers import AutoModel

        encoder = AutoModel.from_pretrained(resolve_backbone(backbone))
        encoder.train()  # from_pretrained returns eval mode; training uses the encoder's own dropout
        # what lean checkpoints name instead of storing the frozen weights (speclora.checkpoint)
        self.backbone_identity = {"backbone": backbone, "sha256": backbone_fingerprint(encoder.state_dict())}
        backbone_params = list(encoder.parameters())
        for p in backbone_params:
            p.requires_grad_(False)
        targets = resolve_targets(encoder.config.model_type, lora.targets)
        # the method builds the adapted encoder and the module is handed it (speclora.model.adapted)
        adapted = method.build(BuildInputs(encoder, self.specs, lora, targets, backbone, loss_weights))
        if not isinstance(adapted, AdaptedEncoder) or adapted.encoder is not encoder:
            raise TypeError(f"{type(method).__name__}.build must return an AdaptedEncoder of the encoder it is "
                            f"given, got {type(adapted).__name__}")
        self.adapted = adapted
        self._frozen_keys = frozen_keys(self, backbone_params)  # what checkpoints leave out (full_ft: nothing)
        self.encoder_dtype = encoder_dtype
        self.tf32 = tf32
        if encoder_dtype != "float32":
            self._hold_encoder_in(ENCODER_DTYPES[encoder_dtype])
        self.adapted.use_compile(self.compile_cfg)  # eager unless model.compile.mode is set
        self.heads = TaskHeads(self.specs, self.encoder.config.hidden_size, head_dropout, regression_target)
        self.metrics = nn.ModuleDict({entry: TaskMetrics(spec, entry if entry in spec.eval_names else None)
                                      for spec in self.specs for entry in (spec.name, *spec.eval_names)})
        self._entry_task = {entry: spec.name for spec in self.specs for entry in (spec.name, *spec.eval_names)}
        self.register_buffer("task_weights", torch.ones(len(self.specs)), persistent=False)
        self._step_task_losses: dict[int, Tensor] = {}
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))  # non-finite steps dropped
        self._seen_entries: dict[str, list[str]] = {}
        self._entry_index = {entry: t for t, spec in enumerate(self.specs) for entry in (spec.name, *spec.eval_names)}
        self._train_log = TrainLog([s.name for s in self.specs])  # losses summed on the device
        self._guard = NonFiniteGuard()
        self.last_step_skipped: bool | None = None  # set where the module reads the step's flag on the host

    # ------------------------------------------------------------------ the adapted encoder's parts (read-only)
    method = property(lambda self: self.adapted.method, doc="the method that built the adapted encoder")
    encoder = property(lambda self: self.adapted.encoder, doc="the HF encoder with the method's adapter layers")
    router = property(lambda self: self.adapted.router, doc="the AdapterRouter of the LoRA layers (or None)")
    slots = property(lambda self: self.adapted.slots, doc="the LoRA slots, in model order")
    targets = property(lambda self: self.adapted.targets, doc="the LoRA target suffixes adapted")

    # ------------------------------------------------------------------ forward
    def encode(self, batch: dict[str, Tensor]) -> Tensor:
        """Run the adapted encoder on every sequence of the batch; returns (N, H) float32 pooled vectors."""
        hidden = self.adapted(batch)  # (N, L, H): routed, the encoder run once (speclora.model.adapted)
        hidden = hidden.float()  # (N, L, H): pooling and heads in float32 whatever the encoder's dtype
        if self.pooling == "cls":
            return hidden[:, 0]  # (N, H)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (N, L, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (N, H)

    def forward(self, batch: dict[str, Tensor]) -> dict[int, TaskOutput]:
        """The per-task outputs of a batch (building them reads the device; training uses :meth:`batch_loss`)."""
        return self.heads(self.encode(batch), batch)

    def batch_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, HeadOutput]:
        """The task loss L = Σ_t λ_t L_t of a batch and the head outputs, with no host read."""
        out = self.heads.batched(self.encode(batch), batch)
        # L = Σ_t λ_t L_t  (L_t = 0 for a task without labelled rows in the batch)
        return (self.task_weights * out.task_loss).sum(), out

    def _total_loss(self, outputs: Mapping[int, TaskOutput]) -> tuple[Tensor, dict[int, Tensor]]:
        """L = Σ_t λ_t L_t from the per-task outputs (:meth:`forward`)."""
        per_task = {t: o.loss for t, o in outputs.items() if o.loss is not None}
        if not per_task:
            raise ValueError("a training batch holds no labelled example")
        total = sum(self.task_weights[t] * loss for t, loss in per_task.items())
        return total, per_task

    def step_skipped(self) -> Tensor | None:
        """() bool device flag, True where this optimizer step is skipped (a gradient is not finite); None
        when no parameter has a gradient. The one non-finite check of the step (NonFiniteGuard.step_flag),
        run on the gradients the backward left (a method's per-micro-batch surgery included) by whoever asks
        first: the spectral callback before it transforms them, else :meth:`on_before_optimizer_step`."""
        grads = lambda: [p.grad for p in self.parameters() if p.grad is not None]  # noqa: E731
        return self._guard.step_flag(grads, self.skipped_steps, self.global_step)

    def on_before_optimizer_step(self, optimizer) -> None:
        # The end of the step's gradient pipeline (docs/architecture.md): the step's flag goes to the
        # optimizer, so a non-finite gradient never reaches the parameters. A fused AdamW reads it and leaves
        # parameters and moments as they were (no host read); otherwise the flag is read now and the step's
        # gradients are dropped (AdamW skips parameters whose .grad is None). Skips are counted and reported.
        skipped = self.step_skipped()
        self._guard.end_step()
        self.last_step_skipped = None  # the host's view, set where the flag is read on the host (AdaLoRA reads it)
        on_device = self._skips_on_device(optimizer)
        if on_device:
            optimizer.found_inf = None
        if skipped is None:
            return
        found = self._guard.found_inf  # () 1.0 where a gradient is not finite
        if on_device:
            optimizer.found_inf = found  # the fused kernel skips the update where it is set
        elif self._grad_scaler() is not None:
            pass  # fp16 AMP: the grad scaler finds the same inf, skips the step and lowers its scale
        else:
            self.last_step_skipped = bool(skipped)  # host read: this optimizer cannot skip on the device
            if self.last_step_skipped:
                optimizer.zero_grad(set_to_none=True)
                self._guard.report(int(self.skipped_steps), self.global_step)

    def _grad_scaler(self):
        trainer = self._trainer
        return getattr(trainer.precision_plugin, "scaler", None) if trainer is not None else None

    def _skips_on_device(self, optimizer) -> bool:
        """Whether this step's non-finite skip can stay on the device: a fused AdamW, no AMP grad scaler (it
        sets ``found_inf`` itself), and a method that does not read the gradients after the step."""
        reads_grads_after = type(self.method).after_optimizer_step is not Method.after_optimizer_step
        return supports_found_inf(optimizer) and self._grad_scaler() is None and not reads_grads_after

    def on_after_backward(self) -> None:
        # a method's gradient surgery (Ortho), per micro-batch: the step's non-finite check sees its result
        self.method.after_backward(self, self._step_task_losses)
        self._step_task_losses = {}

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        raw = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer wraps the torch optimizer
        if getattr(raw, "found_inf", None) is not None:
            raw.found_inf = None  # this step's flag must not skip a later step
        self.method.after_optimizer_step(self)  # the gradients are zeroed only in the next step's closure

    def configure_callbacks(self) -> list:
        return self.method.callbacks(self)

    # ------------------------------------------------------------------ distributed set-up
    def setup(self, stage: str) -> None:
        # Under DDP the heads (and per-task adapters) of tasks absent from a rank's batch get no gradient on
        # that rank; DDP must look for unused parameters, else the ranks' all-reduces fall out of step and the
        # run hangs. Called before the strategy wraps the model, so plain ``strategy=ddp`` works.
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, DDPStrategy) and not strategy._ddp_kwargs.get("find_unused_parameters", False):
            strategy._ddp_kwargs["find_unused_parameters"] = True
            rank_zero_info("DDP: find_unused_parameters=True (tasks absent from a rank's batch leave their "
                           "heads without gradient)")
        if self._trainer is not None:
            set_tf32(self._trainer.strategy.root_device, self.tf32)

    def _hold_encoder_in(self, dtype: torch.dtype) -> None:
        """Cast the frozen encoder weights to ``dtype`` once (the adapters stay float32)."""
        if all(p.requires_grad for p in self.encoder.parameters()):
            raise ValueError(f"model.encoder_dtype={self.encoder_dtype!r} holds the frozen encoder weights in "
                             f"{self.encoder_dtype}, but method {self.method_name} trains every encoder weight; "
                             "use model.encoder_dtype=float32 (and trainer.precision=bf16-mixed for bf16 matmuls)")
        cast_frozen(self.encoder, dtype)

    # ------------------------------------------------------------------ training
    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if self.loss_weights == "size":
            sizes = getattr(dm, "train_sizes", None)
            if sizes is None:
                raise ValueError("model.loss_weights='size' needs a datamodule that reports train_sizes")
            n = torch.tensor(sizes, dtype=torch.float32, device=self.device)
            self.task_weights = len(sizes) * n / n.sum()  # λ_t = T n_t / Σ n
        counts = self.trainable_parameters()
        rank_zero_info(f"trainable parameters: {counts['trainable']:,} (encoder side {counts['encoder_side']:,}, "
                       f"method modules {counts['method']:,}, heads {counts['heads']:,}), method {self.method_name}")
        for logger in self.loggers:
            logger.log_metrics({f"params/{k}": float(v) for k, v in counts.items()}, step=0)
        self.method.on_fit_start(self)

    def trainable_parameters(self) -> dict[str, int]:
        """Trainable parameter counts: all, in the encoder (adapters or the whole encoder), method modules, heads."""
        count = lambda m: 0 if m is None else sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
        return {"trainable": count(self), "encoder_side": count(self.encoder),
                "method": count(self.adapted.method_net), "heads": count(self.heads)}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, out = self.batch_loss(batch)
        extras = self.method.extra_losses(self, batch, TaskOutputs(self.heads, out, batch))
        for term in extras.values():
            loss = loss + term
        self._step_task_losses = {t: out.task_loss[t] for t in out.tasks}
        self._train_log.add(loss, out.task_loss, out.task_count, extras)  # summed on the device
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._log_due(batch_idx):
            self._log_train()

    def _log_due(self, batch_idx: int) -> bool:
        """Whether this step logs: Lightning's logging steps (every ``log_every_n_steps``), and the last
        step of a fit or an epoch (so that ``callback_metrics`` end with the latest values)."""
        trainer = self.trainer
        step = trainer.global_step  # counts this step already
        every = trainer.log_every_n_steps
        return bool(trainer.fast_dev_run or (every > 0 and step % every == 0) or trainer.should_stop
                    or (trainer.max_steps > 0 and step >= trainer.max_steps)
                    or batch_idx + 1 >= trainer.num_training_batches)

    def _log_train(self) -> None:
        """Log the losses summed since the last logging step and the skipped-step count: one host read."""
        values, (skipped, last) = self._train_log.read(also=(self.skipped_steps, self._guard.last_step))
        for name, value in values.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=False, batch_size=1)
        self.log("train/skipped_steps", skipped, on_step=True, on_epoch=False, batch_size=1)
        if self.compile_cfg.enabled:  # a host int: a fallback to eager is counted, never silent
            self.log("train/compile_fallbacks", float(self.adapted.compile_fallbacks), on_step=True, batch_size=1)
        self._guard.report(int(skipped), int(last))
        if "loss" in values:
            # shown as a number: a logged tensor on the bar would be read back from the device every step
            self.trainer.progress_bar_metrics["train/loss"] = values["loss"]

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        entry = batch["entry"]  # an evaluation batch holds one entry, so one task
        t = self._entry_index[entry]
        out = self.heads.batched(self.encode(batch), batch)
        preds, _, chosen_scores = self.heads.predict(t, out, batch, probs=False)  # (E,), None, (E, 2) | None
        labels = batch["labels"] if self.specs[t].kind == "regression" else batch["labels"].long()
        self.metrics[entry].update(preds, labels, groups=batch["groups"], chosen_scores=chosen_scores)
        self.log(f"{stage}/{entry}/loss", out.task_loss[t], batch_size=int(labels.shape[0]),
                 add_dataloader_idx=False)
        self._seen_entries.setdefault(stage, [])
        if entry not in self._seen_entries[stage]:
            self._seen_entries[stage].append(entry)

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "test")

    def _eval_epoch_end(self, stage: str) -> None:
        entries = self._seen_entries.pop(stage, [])
        if self.trainer.world_size > 1:  # every rank must compute (and sync) the same metrics
            gathered: list[list[str]] = [[] for _ in range(self.trainer.world_size)]
            torch.distributed.all_gather_object(gathered, entries)
            entries = sorted({e for g in gathered for e in g})
        scores: dict[str, float] = {}
        for entry in entries:
            values = self.metrics[entry].compute()
            self.metrics[entry].reset()
            for name, value in values.items():
                self.log(f"{stage}/{entry}/{name}", value, add_dataloader_idx=False, sync_dist=False)
            scores[entry] = float(values["score"])
        if scores:
            # suite average: the plain mean of task scores; MNLI's entries average into one task score
            seen = {self._entry_task[entry] for entry in scores}
            evaluated = [spec for spec in self.specs if spec.name in seen]
            average = suite_average(scores, evaluated)
            self.log(f"{stage}/average", average, prog_bar=True, add_dataloader_idx=False)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        outputs = self(batch)
        result: dict[str, Any] = {"entry": batch["entry"], "uid": [], "preds": [], "probs": []}
        for out in outputs.values():
            result["uid"].append(batch["uid"][out.examples].cpu())
            result["preds"].append(out.preds.cpu())
            result["probs"].append(out.probs.cpu() if out.probs is not None else None)
        return result

    # ------------------------------------------------------------------ lean checkpoints, exact resume
    def get_extra_state(self) -> dict[str, str]:
        """The backbone's name and fingerprint: a lean checkpoint's state dict carries them (``_extra_state``)."""
        return dict(self.backbone_identity)

    def set_extra_state(self, state: Any) -> None:
        """Nothing to restore: :meth:`load_state_dict` compares the saved identity when it needs it."""

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` that accepts lean checkpoints (speclora.checkpoint): the frozen backbone
        tensors they leave out are this module's own, once the saved backbone fingerprint matches; any other
        missing key still fails a strict load."""
        state_dict = upgrade_state_dict(state_dict)  # keys of checkpoints written before ``adapted`` (5d18424)
        state_dict = restore_frozen(self, state_dict, self._frozen_keys, self.backbone_identity)
        if IDENTITY_KEY not in state_dict:  # written before checkpoints named their backbone (and held all of it)
            state_dict = with_entries(state_dict, {IDENTITY_KEY: self.get_extra_state()})
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the frozen backbone stays out of the file; its identity is in the state dict's _extra_state
        prune_frozen(self, checkpoint["state_dict"], self._frozen_keys)
        # dropout draws from the global generators: keep them so that a resumed run continues exactly
        checkpoint["speclora_rng"] = rng_state(self._trainer)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_rng_state(checkpoint.get("speclora_rng"), self._trainer)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        # a method's own trainable modules (hypernetworks) learn at the adapters' rate; model.optim.fused as the
        # trainer's precision and clip allow it (speclora.model.optim)
        t = self.trainer
        fused = fused_setting(self.optim_cfg.fused, t.gradient_clip_val, self._grad_scaler() is not None, t.precision)
        return adamw_with_schedule(replace(self.optim_cfg, fused=fused), self.encoder, self.heads,
                                   self.adapted.method_net, max(1, int(t.estimated_stepping_batches)))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning's AMP plugin refuses to clip for an optimizer that unscales in its step (a fused AdamW), even
        # under bf16-mixed, where no loss scale exists: those gradients are clipped here (speclora.model.optim)
        plugin = self.trainer.precision_plugin
        if not clip_unscaled_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm, plugin):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ------------------------------------------------------------------ adapters in peft format
    def export_adapters(self, out_dir: str | Path) -> list[Path]:
        """Write each task's adapter (the method's format; peft for LoRA-shaped ones) under ``out_dir/<task>``."""
        return self.method.export(self, Path(out_dir))

    def export_peft_adapters(self, out_dir: str | Path) -> list[Path]:
        """Write each task's adapter as a peft folder (plus its head) under ``out_dir/<task>``."""
        from speclora.model.peft_io import export_task_adapters

        return export_task_adapters(self, Path(out_dir))

    def write_task_head(self, t: int, folder: Path, **meta: Any) -> None:
        """Task t's head and its description (pooling, method, then ``meta``) into ``folder`` (TaskHeads.save_head)."""
        self.heads.save_head(t, Path(folder), pooling=self.pooling, method=self.method_name, **meta)

    def import_adapters(self, in_dir: str | Path) -> None:
        """Load adapters (and heads) written by :meth:`export_adapters` (the method's format)."""
        self.method.load(self, Path(in_dir))

    def import_peft_adapters(self, in_dir: str | Path) -> None:
        """Load peft folders (and heads) written by :meth:`export_peft_adapters` back into their task slots."""
        from speclora.model.peft_io import import_task_adapters

        import_task_adapters(self, Path(in_dir))
