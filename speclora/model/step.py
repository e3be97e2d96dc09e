"""What keeps a training step off the host: device-side loss accumulation, a non-finite check without a
host read, the attention mask built without one, and the encoder's precision settings.

A GPU runs ahead of Python only while nothing asks it for a value. A step of this harness used to ask ~40
times (per-task ``nonzero``/``item``/``unique``, the non-finite check, the progress bar); each ask drains
the queue. Here:

- the losses are summed on the device every step and read once per logging step (:class:`TrainLog`);
- the non-finite check is one multi-tensor kernel writing a device flag that the fused AdamW kernel reads
  (``found_inf``, the GradScaler mechanism): a bad step leaves parameters and moments untouched and is
  counted on the device (:class:`NonFiniteGuard`); the count is read and reported at the next logging step;
- the attention mask goes to the encoder already expanded (:func:`encoder_attention_mask`), so that the
  encoder's "is there any padding?" shortcut, which reads the mask back, is not taken.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

log = logging.getLogger(__name__)

ENCODER_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# encoder families whose HF modeling builds its mask with ``create_bidirectional_mask`` (transformers >= 5),
# which passes a prepared 4-D mask through as it is
_PREPARED_MASK_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "distilbert")


# ---------------------------------------------------------------------- precision
def cast_frozen(encoder: nn.Module, dtype: torch.dtype) -> int:
    """Hold the encoder's frozen floating parameters and buffers in ``dtype``; trainable ones (the adapters)
    keep theirs. Returns how many tensors were cast. Done once, so no step casts a frozen weight."""
    cast = 0
    for module in encoder.modules():
        for p in module.parameters(recurse=False):
            if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
                cast += 1
        for name, b in module.named_buffers(recurse=False):
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                setattr(module, name, b.to(dtype))
                cast += 1
    return cast


def set_tf32(device: torch.device, enabled: bool) -> bool:
    """Let float32 matmuls and convolutions use TF32 tensor cores on a CUDA device (Ampere and later);
    nothing changes elsewhere (the CPU keeps full float32). Returns whether TF32 is now on."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(device)
    on = enabled and major >= 8
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
    return on


# ---------------------------------------------------------------------- attention mask
def encoder_attention_mask(encoder: nn.Module, attention_mask: Tensor) -> Tensor:
    """The mask to hand the encoder: prepared (N, 1, 1, L) for the families that take one, else the (N, L)
    0/1 mask as given.

    Given (N, L), transformers first checks whether any token is padded (``mask.all()``, a host read of the
    device in every forward) to drop the mask; a prepared mask is used as it is. Prepared as transformers
    would for the encoder's attention implementation: SDPA takes a bool mask (True = attend), eager an
    additive one in the embeddings' dtype,

        bias[n, 0, 0, j] = 0 where mask[n, j] = 1, min(dtype) where it is 0.
    """
    if not takes_prepared_mask(encoder):
        return attention_mask
    keep = attention_mask[:, None, None, :].bool()  # (N, 1, 1, L)
    if encoder.config._attn_implementation == "sdpa":
        return keep
    dtype = encoder.get_input_embeddings().weight.dtype
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, torch.finfo(dtype).min)


def takes_prepared_mask(encoder: nn.Module) -> bool:
    """Whether the encoder's modeling passes a prepared 4-D mask through (see :data:`_PREPARED_MASK_TYPES`)."""
    import sys

    config = getattr(encoder, "config", None)
    if getattr(config, "model_type", None) not in _PREPARED_MASK_TYPES:
        return False
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    modeling = sys.modules.get(type(encoder).__module__)
    return modeling is not None and hasattr(modeling, "create_bidirectional_mask")


# ---------------------------------------------------------------------- losses on the device
class TrainLog:
    """Training losses summed on the device every step, read on the host once per logging step.

    ``add`` takes the step's total loss, the (T,) per-task means with their (T,) labelled counts, and the
    method's extra terms; ``read`` returns the means since the last read (a task, or a term: over the steps
    that held it) in one device-to-host copy, and starts a new window.
    """

    def __init__(self, task_names: Sequence[str]) -> None:
        self.task_names = list(task_names)
        self._base: Tensor | None = None  # (2 + 2T,): [steps, Σ L, Σ L_t·[t held], Σ [t held]]
        self._extras: dict[str, Tensor] = {}  # name -> (2,): [Σ term, steps]

    def add(self, total: Tensor, task_loss: Tensor, task_count: Tensor, extras: dict[str, Tensor]) -> None:
        device = total.device
        if self._base is None or self._base.device != device:
            self._base = torch.zeros(2 + 2 * len(self.task_names), device=device)
        held = (task_count > 0).float()  # (T,)
        one = self._base[:1].new_ones(1)
        # one vector per step: [1, L, L_t · [t held], [t held]]
        self._base.add_(torch.cat([one, total.detach().float().reshape(1), task_loss.detach().float() * held,
                                   held]))  # (2 + 2T,)
        for name, term in extras.items():
            acc = self._extras.get(name)
            if acc is None or acc.device != device:
                acc = self._extras[name] = torch.zeros(2, device=device)
            acc.add_(torch.cat([term.detach().float().reshape(1), one]))  # (2,)

    def read(self, also: Sequence[Tensor | None] = ()) -> tuple[dict[str, float], list[float]]:
        """The means since the last read, {'loss', '<task>/loss' (over the steps that held the task),
        '<term>' (over the steps that returned it)} ({} when no step was added), and the values of the
        device scalars ``also`` (None reads as -1); all in one host read. Starts a new window."""
        sums = ([self._base] if self._base is not None else []) + list(self._extras.values())
        device = sums[0].device if sums else None
        scalars = [torch.full((1,), -1.0, device=device) if a is None else a.detach().float().reshape(1)
                   for a in also]
        flat = [*sums, *(x.to(device) if device is not None else x for x in scalars)]
        values = torch.cat(flat).tolist() if flat else []  # the one host read of the window
        n = sum(x.numel() for x in sums)
        for x in sums:
            x.zero_()
        return self._means(values[:n]), values[n:]

    def _means(self, values: list[float]) -> dict[str, float]:
        if not values or values[0] == 0:  # values[0]: steps in the window
            return {}
        steps, t = values[0], len(self.task_names)
        out = {"loss": values[1] / steps}
        sums, held = values[2: 2 + t], values[2 + t: 2 + 2 * t]
        for name, total, count in zip(self.task_names, sums, held):
            if count > 0:
                out[f"{name}/loss"] = total / count
        terms = values[2 + 2 * t:]
        for i, name in enumerate(self._extras):
            if terms[2 * i + 1] > 0:
                out[name] = terms[2 * i] / terms[2 * i + 1]
        return out


# ---------------------------------------------------------------------- non-finite steps
class NonFiniteGuard:
    """One non-finite check over all gradients per step, without a host read where the optimizer allows it.

    ``device`` mode (a fused AdamW): one multi-tensor kernel (the AMP unscale kernel with scale 1) sets
    ``found_inf`` on the device; the optimizer is handed it (``optimizer.found_inf``) and its fused kernel
    then leaves the parameters, the moments and the step count unchanged; the skip is counted on the device.
    ``host`` mode (any other optimizer, or a method that reads the gradients after the step): the flag is
    read at once and a bad step's gradients are dropped (AdamW skips parameters without a gradient).
    """

    def __init__(self) -> None:
        self.found_inf: Tensor | None = None  # () float, 1.0 when this step's gradients are not finite
        self.last_step: Tensor | None = None  # () long, the last skipped step (-1: none yet)
        self._one: Tensor | None = None
        self._flag: Tensor | None = None  # () bool, this step's "skipped" flag once checked
        self._checked = False  # whether this step's gradients were checked (reset by end_step)
        self._reported = 0  # skipped steps already reported (host side)

    def step_flag(self, grads: Callable[[], list[Tensor]], skipped: Tensor, step: int) -> Tensor | None:
        """This optimizer step's () bool flag, True where the step is skipped (a gradient is not finite): the
        one check (and count) of the step, run on the first request after :meth:`end_step`, so that every
        reader of the step (the spectral callback, the module's own hook, the optimizer) sees the same flag.
        None when no parameter has a gradient."""
        if not self._checked:
            g = grads()
            self._flag = None
            if g:
                self.check(g)
                self.count(skipped, step)
                self._flag = self.found_inf > 0  # ()
            self._checked = True
        return self._flag

    def end_step(self) -> None:
        """The step's flag has been handed to the optimizer: the next request checks new gradients."""
        self._checked = False

    def report(self, skipped: int, last: int) -> None:
        """Warn once about the skips not reported yet (host values, read at a logging step or a host skip)."""
        if skipped > self._reported:
            new, self._reported = skipped - self._reported, skipped
            rank_zero_warn(f"non-finite gradient: {new} update(s) skipped, the last at step {last} "
                           f"({skipped} skipped so far)")

    def check(self, grads: list[Tensor]) -> Tensor:
        """() float flag: 1.0 if any gradient holds NaN or ±inf. One kernel per device and dtype group."""
        device = grads[0].device
        if self.found_inf is None or self.found_inf.device != device:
            self.found_inf = torch.zeros((), device=device)
            self._one = torch.ones((), device=device)
            self.last_step = torch.full((), -1, dtype=torch.long, device=device)
        self.found_inf.zero_()
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for group in by_dtype.values():
            # found_inf ← 1 if any element is not finite; every gradient multiplied by 1 (unchanged)
            torch._amp_foreach_non_finite_check_and_unscale_(group, self.found_inf, self._one)
        return self.found_inf

    def count(self, skipped: Tensor, step: int) -> None:
        """skipped += found_inf; last_step ← step where found_inf (device ops, no host read)."""
        flag = self.found_inf.reshape(()) > 0  # ()
        skipped.add_(flag.to(skipped.dtype))
        self.last_step.masked_fill_(flag, step)


def supports_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` honours ``optimizer.found_inf`` (the fused Adam/AdamW kernels do)."""
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and bool(optimizer.defaults.get("fused"))


def fused_supported(params: Sequence[Tensor]) -> bool:
    """Whether torch's fused AdamW runs on these parameters (floating, all on one CPU or CUDA device)."""
    devices = {p.device.type for p in params}
    return bool(params) and devices <= {"cpu", "cuda"} and len({p.device for p in params}) == 1 and all(
        p.is_floating_point() for p in params)
