"""What ``speclora fit`` checkpoints hold and when it writes them.

Lean checkpoints. A checkpoint keeps what training changes: adapters, heads, method modules, buffers,
optimizer and scheduler, callback state (the spectral graph), RNG and sampler. The frozen backbone weights
(91 MB of the default job's 126 MB) are left out; the state dict carries instead the backbone's identity,
``{"backbone": name, "sha256": fingerprint}`` (its ``_extra_state`` entry), and loading rebuilds the encoder
from the name, checks the fingerprint, and takes the frozen tensors from it. A different backbone is refused;
a missing trained key still fails a strict load. ``full_ft`` trains the whole encoder and keeps all of it.

    fingerprint = sha256 over the backbone's state dict as loaded, name by name in sorted order:
                  name | dtype | shape, then the tensor's bytes

Which checkpoints. :class:`BestAndLastCheckpoint`: the best by ``val/average``, and always the latest state.
Lightning 2.6's ``ModelCheckpoint(save_last=True)`` rewrites ``last.ckpt`` only when a top-k file is saved in
the same step: a run whose validation score stops improving keeps an old ``last.ckpt``, and a killed run
resumed from it loses every step since its best. ``BestAndLastCheckpoint`` keeps the top-k files as usual and
rewrites ``last.ckpt`` after every validation and at the end of training, so ``--ckpt_path last`` (or the
file) resumes from the latest validated step. A dry run (``--trainer.fast_dev_run``) writes nothing.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

log = logging.getLogger(__name__)

IDENTITY_KEY = "_extra_state"  # where nn.Module.get_extra_state puts the root module's extra state


def backbone_fingerprint(state: Mapping[str, Tensor]) -> str:
    """sha256 of a state dict: names, dtypes, shapes and bytes, in sorted name order (module docstring)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous().reshape(-1)  # (numel,)
        digest.update(f"{name}|{tensor.dtype}|{tuple(state[name].shape)}\n".encode())
        digest.update(memoryview(tensor.view(torch.uint8).numpy()))  # bytes of any dtype (bf16 has no numpy type)
    return digest.hexdigest()


def frozen_keys(module: nn.Module, backbone: Iterable[nn.Parameter]) -> list[str]:
    """The state-dict keys of ``module`` that hold a frozen parameter of ``backbone`` (every name of it)."""
    ids = {id(p) for p in backbone}
    return [name for name, p in module.named_parameters(remove_duplicate=False)
            if id(p) in ids and not p.requires_grad]


def prune_frozen(module: nn.Module, state_dict: dict[str, Any], keys: Iterable[str]) -> list[str]:
    """Drop ``keys`` from ``state_dict`` in place (those still frozen in ``module``); returns the dropped keys."""
    params = dict(module.named_parameters(remove_duplicate=False))
    dropped = [k for k in keys if k in state_dict and not params[k].requires_grad]
    for k in dropped:
        del state_dict[k]
    return dropped


def restore_frozen(module: nn.Module, state_dict: Mapping[str, Any], keys: Iterable[str],
                   identity: Mapping[str, str]) -> Mapping[str, Any]:
    """``state_dict`` completed with the frozen backbone tensors ``module`` holds, when it left them out.

    Raises ``ValueError`` when it left them out and names another backbone than ``identity`` (the module's
    ``{"backbone", "sha256"}``). A state dict that holds every frozen key, or carries no backbone identity,
    comes back as it is (a strict load then names what is missing).
    """
    missing = [k for k in keys if k not in state_dict]
    saved = state_dict.get(IDENTITY_KEY)
    if not missing or not isinstance(saved, Mapping) or "sha256" not in saved:
        return state_dict
    if saved["sha256"] != identity["sha256"]:
        raise ValueError(
            f"model.backbone={identity['backbone']!r} (sha256 {identity['sha256'][:16]}…) is not the encoder this "
            f"checkpoint was trained on: {saved.get('backbone')!r} (sha256 {saved['sha256'][:16]}…). The checkpoint "
            f"leaves out the {len(missing)} frozen backbone tensors and takes them from model.backbone, so it must "
            "be the same weights; give model.backbone the checkpoint's encoder (a copy in another folder is fine)"
        )
    own = module.state_dict(keep_vars=True)
    return with_entries(state_dict, {k: own[k].detach() for k in missing})


def with_entries(state_dict: Mapping[str, Any], entries: Mapping[str, Any]) -> OrderedDict:
    """A copy of ``state_dict`` with ``entries`` added, keeping torch's ``_metadata`` (module versions)."""
    out = OrderedDict(state_dict)
    out.update(entries)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        out._metadata = metadata
    return out


def load_checkpoint_weights(module: nn.Module, path: str | Path, weights_only: bool = False) -> dict[str, Any]:
    """Load the trained state of a ``speclora fit`` checkpoint into ``module`` (strict); returns the checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={str(path)!r}: no such checkpoint file")
    checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only)
    if "state_dict" not in checkpoint:
        raise ValueError(f"ckpt_path={str(path)!r} holds no state_dict; not a Lightning checkpoint")
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    return checkpoint


class BestAndLastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is the latest state, not the latest improvement."""

    def _save_last_if_stale(self, trainer: L.Trainer) -> None:
        # skipped when a file was already written at this step (then last.ckpt was rewritten with it), and
        # in a dry run, sanity check or outside fit
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_stale(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # not ModelCheckpoint.on_train_end: in Lightning 2.6 it writes last.ckpt even under fast_dev_run
        self._save_last_if_stale(trainer)


# ---------------------------------------------------------------------- the RNG, for an exact resume
def rng_state(trainer: L.Trainer | None) -> dict[str, Any]:
    """The global generators dropout draws from (torch, and CUDA once initialised), for the checkpoint's
    ``speclora_rng``. Under DDP every rank draws its own dropout masks (its batches differ): each rank's
    generators are gathered (dump_checkpoint runs on every rank; rank 0 writes the file) under ``ranks``."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    world = trainer.world_size if trainer is not None else 1
    if world > 1:
        ranks: list[dict[str, Any]] = [{} for _ in range(world)]
        torch.distributed.all_gather_object(ranks, state)
        state = {**ranks[0], "ranks": ranks}
    return state


def restore_rng_state(state: dict[str, Any] | None, trainer: L.Trainer | None) -> None:
    """Set the generators :func:`rng_state` saved (this rank's, where the world size is the same); a
    checkpoint without them is loaded with a warning (dropout after resume differs from the original run)."""
    if state is None:
        log.warning("checkpoint holds no RNG state: dropout after resume will differ from the original run")
        return
    ranks = state.get("ranks")
    if ranks is not None and trainer is not None:
        if len(ranks) == trainer.world_size:
            state = ranks[trainer.global_rank]
        elif trainer.state.fn == "fit":
            rank_zero_warn(f"checkpoint saved by {len(ranks)} ranks, resumed by {trainer.world_size}: every "
                           "rank continues rank 0's random stream, so dropout differs from the original run")
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
