"""What a trainable adapted encoder is: the frozen encoder with a method's adapter layers, its router and
slots, the method's own sub-networks and state, and the forward of a batch through them.

A method builds one (``Method.build(BuildInputs) -> AdaptedEncoder``, speclora.model.method); the
LightningModule is handed it and holds it as ``module.adapted``: the module owns the loop, the heads, the
loss and the optimizer, the adapted encoder owns everything the method added. Nothing of a method is written
onto the LightningModule. The parts::

    encoder        the HF encoder, frozen, its target linears (or blocks) replaced by adapter layers
    router         the AdapterRouter every multi-task LoRA layer reads (None: layers without routing)
    slots          the LoRA slots in model order (LoRASlot: name, layer, module, d_in, d_out)
    targets        the LoRA target suffixes the layers were put on
    method_net     the method's own trainable modules (hypernetworks; None for most methods)
    method_state   the method's buffers, moved with the module and saved in checkpoints (FAMO's ξ, moments)
    work           the method's working state between a step's hooks, not saved (Ortho's per-task gradients)

The path of a forward (:meth:`AdaptedEncoder.forward`): the method routes (``route`` -> (N,) adapter per
row, set on the router), prepares what the layers read besides (``before_encode``: generated weights or
per-row scales on the router, a gradient capture), the encoder runs once (:meth:`AdaptedEncoder.run_encoder`,
compiled under ``model.compile``: speclora.model.compile), and the router is cleared.

State-dict keys: the module holds this as ``adapted``, so its keys are ``adapted.encoder.*``,
``adapted.method_net.*`` and ``adapted.method_state.*``. Checkpoints written before (``encoder.*``,
``method_net.*``, ``famo_state.*`` at the module's root) are renamed on load by :func:`upgrade_state_dict`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from speclora.model.compile import CompileConfig, CompiledFunction
from speclora.model.config import LoRAConfig
from speclora.model.lora import AdapterRouter, LoRASlot
from speclora.model.step import encoder_attention_mask
from speclora.tasks import TaskSpec

if TYPE_CHECKING:
    from speclora.model.method import Method

__all__ = ["AdaptedEncoder", "BuildInputs", "LEGACY_PREFIXES", "upgrade_state_dict"]


@dataclass(frozen=True)
class BuildInputs:
    """What a method builds an adapted encoder from: the frozen encoder and the run's settings.

    encoder: the HF encoder, every parameter frozen (the method adapts it in place); specs: the run's tasks,
    in task-index order; lora: ``model.lora``; targets: its target suffixes, resolved for the encoder's
    model type; backbone: ``model.backbone`` as given; loss_weights: ``model.loss_weights``.
    """

    encoder: nn.Module
    specs: list[TaskSpec]
    lora: LoRAConfig
    targets: tuple[str, ...]
    backbone: str
    loss_weights: str

    @property
    def num_tasks(self) -> int:
        return len(self.specs)


class AdaptedEncoder(nn.Module):
    """The frozen encoder with a method's adapter layers and parts (module docstring); built by a method.

    Args:
        method: the method that built it; its ``route`` and ``before_encode`` run in :meth:`forward`.
        inputs: what it was built from (its encoder is adapted in place and held here).
        router, slots: the shared per-row router and the LoRA slots (None, [] without LoRA layers).
        targets: the target suffixes actually adapted (default: ``inputs.targets``).
        method_net: the method's trainable sub-networks (a registered sub-module, optimised with the adapters).
        method_state: the method's checkpointed buffers (a registered sub-module).
        work: the method's unsaved working state (any object).
    """

    def __init__(
        self,
        method: Method,
        inputs: BuildInputs,
        router: AdapterRouter | None = None,
        slots: list[LoRASlot] | None = None,
        targets: tuple[str, ...] | None = None,
        method_net: nn.Module | None = None,
        method_state: nn.Module | None = None,
        work: Any = None,
    ) -> None:
        super().__init__()
        self.method = method
        self.encoder = inputs.encoder
        self.num_tasks = inputs.num_tasks
        self.router = router
        self.slots: list[LoRASlot] = list(slots or [])
        self.targets = tuple(targets if targets is not None else inputs.targets)
        self.method_net = method_net
        self.method_state = method_state
        self.work = work
        self.encoder_call: CompiledFunction | None = None  # model.compile's compiled run_encoder (None: eager)

    def use_compile(self, config: CompileConfig) -> CompiledFunction | None:
        """Run :meth:`run_encoder` compiled by torch.compile from the next forward (``config.mode`` off: eagerly).
        A method that cannot be compiled (``Method.compile_unsupported``) runs eagerly, warned and counted."""
        self.encoder_call = None
        if config.enabled:
            name = type(self.method).__name__
            refuse = self.method.compile_unsupported
            self.encoder_call = CompiledFunction(self.run_encoder, config, f"the adapted encoder of method {name}",
                                                 refuse=f"method {name}: {refuse}" if refuse else None)
        return self.encoder_call

    @property
    def compile_fallbacks(self) -> int:
        """How many times model.compile fell back to eager (0 when compiled, or when compile is off)."""
        return self.encoder_call.fallbacks if self.encoder_call is not None else 0

    def forward(self, batch: Mapping[str, Any]) -> Tensor:
        """(N, L, H) last hidden states of the batch's sequences, each row through its adapter."""
        router = self.router
        if router is not None:
            index = self.method.route(self, batch)  # (N,) adapter of each row, or None
            # the collator's present_tasks are the distinct values of seq_task: range-checked on the host
            known = batch.get("present_tasks") if index is not None and index is batch.get("seq_task") else None
            router.set(index, known_ids=known)
        self.method.before_encode(self, batch)
        run = self.encoder_call if self.encoder_call is not None else self.run_encoder
        try:
            return run(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))  # (N, L, H)
        finally:
            if router is not None:
                router.set(None)  # no per-batch state outlives its batch

    def run_encoder(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None) -> Tensor:
        """(N, L, H) last hidden states of the encoder on a routed batch: input_ids, attention_mask (N, L),
        token_type_ids (N, L) or None. The static part of a step, the one ``model.compile`` compiles: it reads
        the router's per-row state and runs the method's adapter layers (and their hooks), nothing else."""
        return self.encoder(
            input_ids=input_ids,
            attention_mask=encoder_attention_mask(self.encoder, attention_mask),
            token_type_ids=token_type_ids,
        ).last_hidden_state  # (N, L, H)

    def extra_repr(self) -> str:
        return f"method={type(self.method).__name__}, slots={len(self.slots)}, targets={list(self.targets)}"


# the module's state-dict keys before it held an AdaptedEncoder (main 5d18424 and earlier) -> now
LEGACY_PREFIXES: dict[str, str] = {
    "encoder.": "adapted.encoder.",
    "method_net.": "adapted.method_net.",
    "famo_state.": "adapted.method_state.",
}


def upgrade_state_dict(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """A module state dict with the keys of checkpoints written before the adapted encoder renamed
    (:data:`LEGACY_PREFIXES`), in the same order and with torch's ``_metadata`` renamed alike; a state dict
    with current keys comes back as it is."""
    if not any(k.startswith(old) for k in state_dict for old in LEGACY_PREFIXES):
        return state_dict
    out: OrderedDict[str, Any] = OrderedDict((_rename(k), v) for k, v in state_dict.items())
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:  # per-module versions, keyed by module path ("" is the root)
        out._metadata = OrderedDict((_rename(k + ".").removesuffix(".") if k else k, v)  # type: ignore[attr-defined]
                                    for k, v in metadata.items())
    return out


def _rename(key: str) -> str:
    for old, new in LEGACY_PREFIXES.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key
