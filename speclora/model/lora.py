"""Multi-task LoRA: one frozen ``nn.Linear`` and a stack of T low-rank adapters, picked per batch row.

For a row n of task adapter a(n) (Hu et al., 2021, eq. 3, one adapter per task):

    y_n = W x_n + b + (alpha / r) * B_{a(n)} A_{a(n)} dropout(x_n)

with W: (d_out, d_in) frozen, A_t: (r, d_in), B_t: (d_out, r). The T adapters are held stacked,
``lora_A: (T, r, d_in)`` and ``lora_B: (T, d_out, r)``, so that a batch mixing tasks runs in one gather
and two batched matmuls. Which row uses which adapter is told by an :class:`AdapterRouter` shared by every
LoRA layer of a model; the LightningModule sets it before each forward.

All tasks' A start equal (one draw per module, copied into every adapter) and B starts at zero, so that
the same coordinate means the same thing in every task (shared/DESIGN.md, "The parameter graph").

Two optional per-forward inputs, carried by the router for methods that generate part of the update
(speclora.methods.unolora, speclora.methods.hyperformer); layer ``slot`` k reads entry k of each:

- a rank-wise scale per row, ``router.scales: (S, N, r)``:
  ``y_n = W x_n + b + (alpha / r) * B_{a(n)} diag(s_{k,n}) A_{a(n)} dropout(x_n)``;
- externally generated adapters, ``router.weights[k] = (A: (T, r, d_in), B: (T, d_out, r))``, used instead
  of the layer's own ``lora_A`` / ``lora_B`` through the same per-row gather.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from speclora.checks import is_int_in
from speclora.model.router import AdapterRouter
from speclora.model.targets import (
    ATTENTION_PRESET,
    DEFAULT_TARGETS,
    layer_of,
    linear_patterns,
    matches_target,
    resolve_targets,
)

__all__ = [
    "ATTENTION_PRESET",
    "DEFAULT_TARGETS",
    "AdapterRouter",
    "LoRASlot",
    "MultiTaskLoRA",
    "MultiTaskLoRALinear",
    "inject_lora",
    "lora_modules",
    "matches_target",
    "resolve_targets",
    "stacked_lora_params",
]

class MultiTaskLoRA(nn.Module):
    """T stacked LoRA adapters without a base layer: the update Δ(x), one adapter picked per batch row.

    Δ(x_n) = (alpha/r) * B_{a(n)} diag(s_n) A_{a(n)} dropout(x_n),   a(n) = router.index[n]

    with s_n = router.scales[slot, n] when the router carries scales, else 1; and A, B the router's
    generated ``weights[slot]`` when it carries them, else this layer's ``lora_A`` / ``lora_B``.
    With ``routing`` (mtLoRA's fine-grained routing, speclora.methods.mtlora) row n of task t mixes all
    T adapters per output dimension, w: (T, T, d_out / g) learned, identity at start:

        Δ(x_n) = (alpha/r) * Σ_k w_{t,k} ⊙ (B_k A_k dropout(x_n)) = (alpha/r) * B̃_t Â dropout(x_n),
        Â = [A_1; ...; A_T]: (T r, d_in),   B̃_t = [diag(w_{t,1}) B_1, ..., diag(w_{t,T}) B_T]: (d_out, T r)

    Shapes: x: (N, L, d_in) or (N, d_in) -> (N, L, d_out) or (N, d_out);
    lora_A: (T, r, d_in), lora_B: (T, d_out, r), routing: (T, T, d_out / g).

    Args:
        d_in, d_out: the input and output widths.
        num_adapters: T, the number of adapters (one per task, or 1 for a shared LoRA).
        r: the LoRA rank.
        alpha: the LoRA scale numerator; the update is scaled by ``alpha / r``.
        dropout: dropout probability on the LoRA branch's input, in [0, 1).
        router: the shared per-row adapter index.
        init_A: (r, d_in), copied into every adapter; ``None`` draws one kaiming-uniform A from the global RNG.
        slot: this layer's position k among the router's layers (the entry it reads of ``router.scales``
            and ``router.weights``); ``None`` for a layer that takes neither.
        routing: learn the mixing weights w (``model.method.init_args.routing`` of MTLoRA).
        group_size: g, consecutive output dimensions sharing one routing weight.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        num_adapters: int,
        r: int,
        alpha: float,
        dropout: float,
        router: AdapterRouter,
        init_A: torch.Tensor | None = None,
        slot: int | None = None,
        routing: bool = False,
        group_size: int = 1,
    ) -> None:
        super().__init__()
        self._init_adapters(d_in, d_out, num_adapters, r, alpha, dropout, router, init_A, slot, None)
        if d_out % group_size:
            raise ValueError(
                f"model.method.init_args.routing_group_size={group_size} does not divide the output width "
                f"{d_out}"
            )
        self.group_size = group_size
        if routing:
            eye = torch.eye(num_adapters, dtype=self.lora_A.dtype, device=self.lora_A.device)  # (T, T)
            self.routing = nn.Parameter(eye.unsqueeze(-1).repeat(1, 1, d_out // group_size))  # (T, T, G)
        else:
            self.register_parameter("routing", None)

    def _init_adapters(
        self,
        d_in: int,
        d_out: int,
        num_adapters: int,
        r: int,
        alpha: float,
        dropout: float,
        router: AdapterRouter,
        init_A: torch.Tensor | None,
        slot: int | None,
        like: torch.Tensor | None,
    ) -> None:
        """Register A (T, r, d_in) and B (T, d_out, r), on ``like``'s device and dtype when given."""
        _check_hparams(num_adapters=num_adapters, r=r, alpha=alpha, dropout=dropout)
        self.d_in, self.d_out = d_in, d_out
        self.num_adapters = num_adapters
        self.r = r
        self.alpha = float(alpha)
        self.router = router
        self.slot = slot
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if init_A is None:
            init_A = torch.empty(r, d_in)  # (r, d_in)
            nn.init.kaiming_uniform_(init_A, a=math.sqrt(5))
        elif tuple(init_A.shape) != (r, d_in):
            raise ValueError(f"init_A: expected shape (r, d_in) = {(r, d_in)}, got {tuple(init_A.shape)}")
        if like is not None:
            init_A = init_A.to(device=like.device, dtype=like.dtype)
        # every task starts from the same A (DESIGN.md), B = 0 so that the layer starts with Δ = 0
        self.lora_A = nn.Parameter(init_A.unsqueeze(0).repeat(num_adapters, 1, 1))  # (T, r, d_in)
        self.lora_B = nn.Parameter(
            torch.zeros(num_adapters, d_out, r, device=init_A.device, dtype=init_A.dtype)
        )  # (T, d_out, r)

    @property
    def in_features(self) -> int:
        return self.d_in

    @property
    def out_features(self) -> int:
        return self.d_out

    @property
    def scaling(self) -> float:
        """alpha / r."""
        return self.alpha / self.r

    def _slot_entry(self, kind: str) -> int:
        if self.slot is None:
            raise RuntimeError(
                f"{type(self).__name__} without a slot: the router carries {kind}, but this layer does not "
                "know its entry; build the layers with inject_lora (or pass slot=)"
            )
        return self.slot

    def adapters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The A: (T, r, d_in) and B: (T, d_out, r) of the next forward: generated ones if the router carries
        them, else the parameters."""
        if self.router.weights is None:
            return self.lora_A, self.lora_B
        A, B = self.router.weights[self._slot_entry("generated weights")]
        want_A = (self.num_adapters, self.r, self.in_features)
        want_B = (self.num_adapters, self.out_features, self.r)
        if tuple(A.shape) != want_A or tuple(B.shape) != want_B:
            raise ValueError(
                f"router weights[{self.slot}]: expected A {want_A} and B {want_B} (T, r, d_in / d_out, r), "
                f"got A {tuple(A.shape)} and B {tuple(B.shape)}"
            )
        return A, B

    def row_scales(self, n: int) -> torch.Tensor | None:
        """(N, r) rank-wise scale of each row in this layer, or ``None`` when the router carries none."""
        if self.router.scales is None:
            return None
        s = self.router.scales[self._slot_entry("scales")]  # (N, r)
        if tuple(s.shape) != (n, self.r):
            raise ValueError(
                f"router scales[{self.slot}]: expected (N, r) = {(n, self.r)}, got {tuple(s.shape)}"
            )
        return s

    def mixed_B(self, lora_B: torch.Tensor) -> torch.Tensor:
        """(T, d_out, T r) = B̃_t for every task t (routing on); lora_B: (T, d_out, r)."""
        w = self.routing.repeat_interleave(self.group_size, dim=-1).to(lora_B.dtype)  # (T, T, d_out)
        mixed = w.unsqueeze(-1) * lora_B.unsqueeze(0)  # (T, T, d_out, r) = diag(w_{t,k}) B_k
        return mixed.permute(0, 2, 1, 3).reshape(w.shape[0], self.d_out, -1)  # (T, d_out, T r)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, [L,] d_in) -> Δ(x): (N, [L,] d_out), in x's dtype (the one gather + bmm kernel)."""
        lora_A, lora_B = self.adapters()  # (T, r, d_in), (T, d_out, r)
        if x.is_floating_point() and lora_A.dtype != x.dtype:
            # a low-precision frozen encoder (bf16) keeps fp32 adapters: the small A, B are cast to the
            # activations' dtype (their gradients come back in fp32), never the (N, L, d) activations
            lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
        h = self.dropout(x)  # (N, [L,] d_in)
        n = x.shape[0]
        out_shape = (*x.shape[:-1], self.d_out)
        scales = self.row_scales(n)  # (N, r) or None
        if self.num_adapters == 1 and self.routing is None:
            # one adapter for every row: plain matmuls, no gather
            z = h @ lora_A[0].transpose(0, 1)  # (N, [L,] r) = A x
            if scales is not None:
                s_n = scales.reshape(n, *([1] * (z.dim() - 2)), self.r)  # (N, [1,] r)
                z = z * s_n.to(z.dtype)  # (N, [L,] r) = diag(s_n) A x
            z = z @ lora_B[0].transpose(0, 1)  # (N, [L,] d_out) = B diag(s_n) A x
            return (self.scaling * z).to(x.dtype)

        index = self.router.index
        if index is None:
            raise RuntimeError(
                f"{type(self).__name__} with {self.num_adapters} adapters: the router's index is unset; "
                "call router.set(adapter_index) before the forward"
            )
        if index.shape[0] != n:
            raise ValueError(
                f"router index has {index.shape[0]} rows but the input has {n} (x: {tuple(x.shape)})"
            )
        index = index.to(x.device)
        h = h.reshape(n, -1, self.in_features)  # (N, L, d_in); L = 1 for a 2-D input
        if self.routing is None:
            z = torch.bmm(h, lora_A[index].transpose(1, 2))  # (N, L, r) = A_{a(n)} x
            if scales is not None:
                z = z * scales.unsqueeze(1).to(z.dtype)  # (N, L, r) = diag(s_n) A_{a(n)} x
            z = torch.bmm(z, lora_B[index].transpose(1, 2))  # (N, L, d_out) = B_{a(n)} diag(s_n) A_{a(n)} x
        else:
            if scales is not None:
                raise ValueError("router scales: a routed MultiTaskLoRA takes no rank-wise scales")
            z = h @ lora_A.reshape(-1, self.in_features).transpose(0, 1)  # (N, L, T r) = Â x
            z = torch.bmm(z, self.mixed_B(lora_B)[index].transpose(1, 2))  # (N, L, d_out) = B̃_t Â x
        return (self.scaling * z).reshape(out_shape).to(x.dtype)  # (N, [L,] d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, L, d_in) or (N, d_in) -> Δ(x): (N, L, d_out) or (N, d_out)."""
        return self.delta(x)

    def effective(self, adapter: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter ``adapter`` as one LoRA with alpha/r folded in: A: (R, d_in), B: (d_out, R), Δ(x) = B A x;
        R = r, or T r with routing."""
        if not 0 <= adapter < self.num_adapters:
            raise ValueError(f"adapter: expected an index in [0, {self.num_adapters - 1}], got {adapter}")
        if self.routing is None:
            return self.lora_A[adapter], self.scaling * self.lora_B[adapter]
        return self.lora_A.reshape(-1, self.d_in), self.scaling * self.mixed_B(self.lora_B)[adapter]

    def delta_weight(self, adapter: int) -> torch.Tensor:
        """(d_out, d_in) = (alpha/r) * B[adapter] @ A[adapter], the update merged into W for that adapter."""
        A, B = self.effective(adapter)  # (R, d_in), (d_out, R)
        if self.routing is None:
            return self.scaling * (self.lora_B[adapter] @ A)  # (d_out, r) @ (r, d_in) -> (d_out, d_in)
        return B @ A  # (d_out, T r) @ (T r, d_in) -> (d_out, d_in), alpha/r already in B

    def extra_repr(self) -> str:
        routing = "" if self.routing is None else f", routing_group_size={self.group_size}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_adapters={self.num_adapters}, r={self.r}, alpha={self.alpha}{routing}"
        )


class MultiTaskLoRALinear(MultiTaskLoRA):
    """A frozen ``nn.Linear`` plus T stacked LoRA adapters (:class:`MultiTaskLoRA`), one picked per row.

    y = W x + b + Δ(x),   W = base.weight: (d_out, d_in), frozen; Δ of :class:`MultiTaskLoRA` (no routing).

    Args:
        base: the linear layer to wrap; its parameters are frozen here. The adapters take its device and
            dtype. The other arguments are :class:`MultiTaskLoRA`'s.
    """

    def __init__(
        self,
        base: nn.Linear,
        num_adapters: int,
        r: int,
        alpha: float,
        dropout: float,
        router: AdapterRouter,
        init_A: torch.Tensor | None = None,
        slot: int | None = None,
    ) -> None:
        nn.Module.__init__(self)  # the adapters take the base's device and dtype (_init_adapters' `like`)
        if not isinstance(base, nn.Linear):
            raise ValueError(f"base: expected an nn.Linear, got {type(base).__name__}")
        self.base = base
        self.base.requires_grad_(False)
        d_out, d_in = base.weight.shape
        self._init_adapters(d_in, d_out, num_adapters, r, alpha, dropout, router, init_A, slot, base.weight)
        self.group_size = 1
        self.register_parameter("routing", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, L, d_in) or (N, d_in) -> (N, L, d_out) or (N, d_out)."""
        y = self.base(x)  # (N, [L,] d_out) = W x + b
        return y + self.delta(x).to(y.dtype)


@dataclass(frozen=True)
class LoRASlot:
    """One LoRA-wrapped linear of the backbone: a (layer l, module m) of the parameter graph.

    name: its module path in the backbone ("encoder.layer.3.attention.self.query");
    layer: the first integer path component (3); module: the target suffix it matched ("query").
    """

    name: str
    layer: int
    module: str
    d_in: int
    d_out: int


def _check_hparams(num_adapters: int, r: int, alpha: float, dropout: float) -> None:
    if not is_int_in(num_adapters, 1):
        raise ValueError(f"num_adapters: expected an integer >= 1, got {num_adapters!r}")
    if not is_int_in(r, 1):
        raise ValueError(f"r: expected an integer >= 1, got {r!r}")
    if not alpha > 0:
        raise ValueError(f"alpha: expected a number > 0, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")


def _linear_names(model: nn.Module) -> list[str]:
    """Names of the plain ``nn.Linear`` modules of ``model``, skipping those already wrapped by LoRA."""
    wrapped = {f"{n}.base" for n, _ in lora_modules(model)}
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in wrapped]


def inject_lora(
    model: nn.Module,
    targets: Sequence[str],
    num_adapters: int,
    r: int,
    alpha: float,
    dropout: float,
    seed: int = 0,
) -> tuple[AdapterRouter, list[LoRASlot]]:
    """Replace every ``nn.Linear`` whose name ends with one of ``targets`` by a :class:`MultiTaskLoRALinear`.

    A target matches at a dot boundary, as in peft: "query" matches "encoder.layer.0.attention.self.query",
    "attention.output.dense" matches that module only, not the FFN's "output.dense". A linear matched by
    several targets is recorded under the longest. Only the wrapped linears are frozen here; the caller
    freezes the rest of the backbone.

    A is drawn like peft (kaiming-uniform, a = sqrt(5)): one (r, d_in) draw per module, in model order, from
    a ``torch.Generator`` seeded with ``seed``, copied into all ``num_adapters`` adapters; B = 0.

    Returns:
        the router shared by all the new layers, and one :class:`LoRASlot` per wrapped linear, in model order;
        the layer of ``slots[k]`` has ``slot = k`` (its entry of ``router.scales`` / ``router.weights``).
    """
    _check_hparams(num_adapters=num_adapters, r=r, alpha=alpha, dropout=dropout)
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"targets: expected a non-empty list of module-name suffixes, got {targets!r}")
    existing = lora_modules(model)
    if existing:
        raise ValueError(
            f"model already holds {len(existing)} MultiTaskLoRALinear layers (first: {existing[0][0]}); "
            "inject_lora once per backbone"
        )

    linears = _linear_names(model)
    chosen: dict[str, str] = {}  # linear name -> the (longest) target it matches
    for target in targets:
        hits = [n for n in linears if matches_target(n, target)]
        if not hits:
            raise ValueError(
                f"targets: {target!r} matches no nn.Linear of {type(model).__name__}; "
                f"its linears are: {linear_patterns(linears)}"
            )
        for n in hits:
            if len(target) > len(chosen.get(n, "")):
                chosen[n] = target

    layers = {name: layer_of(name) for name in chosen}
    for name, target in chosen.items():  # check all before changing the model
        if layers[name] is None:
            raise ValueError(
                f"targets: {target!r} matches {name!r}, which sits in no numbered layer; the parameter "
                "graph needs a layer index, so give a more specific suffix (e.g. 'attention.output.dense')"
            )

    ordered = [n for n in linears if n in chosen]  # model order
    router = AdapterRouter(num_adapters, num_slots=len(ordered))
    generator = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    slots: list[LoRASlot] = []
    for k, name in enumerate(ordered):
        base = modules[name]
        init_A = torch.empty(r, base.in_features)  # (r, d_in)
        nn.init.kaiming_uniform_(init_A, a=math.sqrt(5), generator=generator)
        wrapped = MultiTaskLoRALinear(base, num_adapters, r, alpha, dropout, router, init_A=init_A, slot=k)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapped)
        slots.append(LoRASlot(name, layers[name], chosen[name], base.in_features, base.out_features))
    return router, slots


def lora_modules(model: nn.Module) -> list[tuple[str, MultiTaskLoRALinear]]:
    """(name, layer) for every :class:`MultiTaskLoRALinear` of ``model``, in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MultiTaskLoRALinear)]


def stacked_lora_params(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The stacked A (T, r, d_in) and B (T, d_out, r) parameters, in slot order."""
    layers = [m for _, m in lora_modules(model)]
    return [m.lora_A for m in layers], [m.lora_B for m in layers]
