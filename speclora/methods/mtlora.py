"""``mtlora``: mtLoRA (Tian, Ledent, Sun, "Scalable Multi-Task Low-Rank Model Adaptation", ICLR 2026,
arXiv:2603.01526), its three designs each switchable for the ablations of the paper's Table 2.

Notation (docs/methods.md, "mtlora"): T tasks, expert k = task k's LoRA (A_k: (r, d_in), B_k: (d_out, r)),
s = alpha / r, t(n) the task of row n, ΔW_k = s B_k A_k = U_k diag(σ_k) V_kᵀ.

1. Fine-grained routing (``routing``): the adapted output of row n is
       Δ(x_n) = Σ_k w_{t(n),k} ⊙ (s B_k A_k dropout(x_n)),     w: (T, T, d_out), learned,
   w initialised to identity routing (w_{t,k} = 1 if k = t else 0), so that mtLoRA starts as independent
   per-task LoRA. Off: Δ(x_n) = s B_{t(n)} A_{t(n)} dropout(x_n). ``routing_group_size`` g shares one weight
   over g consecutive output dimensions (the authors' ``routing_group_size``).
2. Block-level adaptation (``block_level``): one LoRA per transformer sublayer instead of one per projection.
   For a post-LN encoder layer the attention block is h = LN(x + F(x)), F = attention and its output
   projection; the block LoRA is the parallel path h = LN(x + F(x) + Δ(x)) from the block's input x to its
   output, bypassing the softmax (the authors' ``x' = x + F(LN(x)) + Δ(LN(x))`` for their pre-LN LLaMA,
   ``peft/utils/transformers_patch.py`` of github.com/doem97/ICLR26_mtLoRA). ``block`` picks the attention
   block (the authors' code default), the FFN block, or both. Off: LoRA on ``model.lora.targets``.
3. Spectral-aware regularisation (``spectral_reg``): :func:`spectral_orthogonality` orthogonalises, across
   tasks, the low-singular-value components of the experts' updates and leaves the top ones (shared
   knowledge) free; weights exp(−σ/σ̄) as in the authors' code (``utils/hydralora_trainer.py``).

The pure math is in :func:`low_rank_svd`, :func:`spectral_weights` and :func:`spectral_orthogonality`.

Export (docs/methods.md, "mtlora"): per task, its effective adapter (routing and s folded in, rank R = T·r
with routing, r without): in peft's LoRA format for component-level LoRA, else in this module's block format
(``mtlora_block.safetensors`` + ``mtlora.json``, applied by :func:`apply_block_adapter`); and, in every task
folder, the raw mtLoRA parameters (``mtlora_state.safetensors``) that :meth:`MTLoRA.load` restores exactly.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from speclora.backbone import resolve_backbone
from speclora.checks import check_int
from speclora.methods.base import Method
from speclora.model.lora import AdapterRouter, LoRASlot, matches_target
from speclora.tasks import TaskSpec

if TYPE_CHECKING:
    from speclora.model.module import SpecLoRAModule

__all__ = [
    "MTLoRA",
    "TaskLoRA",
    "apply_block_adapter",
    "low_rank_svd",
    "spectral_orthogonality",
    "spectral_weights",
]

EXPORT_FORMAT = "speclora.mtlora/1"
CONFIG_NAME = "mtlora.json"
BLOCK_WEIGHTS = "mtlora_block.safetensors"
STATE_WEIGHTS = "mtlora_state.safetensors"
# sublayer output modules that take (hidden_states, input_tensor) and return LN(dense(h) + input_tensor)
BLOCK_PATTERNS = {
    "attention": re.compile(r"(?:^|\.)(\d+)\.attention\.output$"),
    "ffn": re.compile(r"(?:^|\.)(\d+)\.output$"),
}


# ---------------------------------------------------------------------------------------------- the math
def low_rank_svd(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of the low-rank products B_k A_k without forming them: B_k A_k = U_k diag(σ_k) V_kᵀ.

    A: (K, r, d_in), B: (K, d_out, r), r <= d_in, d_out
    -> U: (K, d_out, r), σ: (K, r) descending, V: (K, d_in, r).
    """
    # B = Q_B R_B, Aᵀ = Q_A R_A  =>  B A = Q_B (R_B R_Aᵀ) Q_Aᵀ; the SVD of the r×r core gives the rest
    Q_B, R_B = torch.linalg.qr(B)  # (K, d_out, r), (K, r, r)
    Q_A, R_A = torch.linalg.qr(A.transpose(1, 2))  # (K, d_in, r), (K, r, r)
    U_c, sigma, Vh_c = torch.linalg.svd(R_B @ R_A.transpose(1, 2))  # (K, r, r), (K, r), (K, r, r)
    return Q_B @ U_c, sigma, Q_A @ Vh_c.transpose(1, 2)


def spectral_weights(sigma: Tensor, shared_fraction: float) -> Tensor:
    """ω_{k,i} = exp(−σ_{k,i} / σ̄_k) for the low-SV components, 0 for the top ⌈f·r⌉ (shared, left free).

    sigma: (K, r) singular values (any order) -> ω: (K, r); σ̄_k = mean_i σ_{k,i}; f = ``shared_fraction``.
    exp(−σ/σ̄) is the authors' weight (``compute_spectral_regularization`` in utils/hydralora_trainer.py);
    the hard split follows the paper's finding that the top-20% components carry the cross-task alignment
    (89% on Flan-v2→BBH: abstract, Table 1B). f = 0 keeps the soft weight on every component.
    """
    r = sigma.shape[-1]
    mean = sigma.mean(dim=-1, keepdim=True)  # (K, 1) = σ̄_k
    omega = torch.exp(-sigma / (mean + 1e-12))  # (K, r)
    k_free = math.ceil(shared_fraction * r)
    if k_free:
        top = sigma.argsort(dim=-1, descending=True)[..., :k_free]  # (K, k_free)
        omega = omega.scatter(-1, top, 0.0)  # (K, r): the shared components carry no weight
    return omega


def spectral_orthogonality(C: Tensor, omega: Tensor) -> Tensor:
    """Spectral-aware orthogonality of T task updates' components.

        L = 2 / (T (T−1)) · Σ_{t<s} Σ_{i,j} ( ω_{t,i} ω_{s,j} ⟨c_{t,i}, c_{s,j}⟩ )²

    C: (T, d, r), column c_{t,i} = ΔW_t v_{t,i} the i-th component of task t's update (= σ_{t,i} u_{t,i} when
    v is its current right singular vector); omega: (T, r), detached weights (:func:`spectral_weights`).
    L = 0 iff every weighted component of a task is orthogonal to every weighted component of every other
    task; a component with ω = 0 gets no gradient. Returns a 0-d tensor (0 for T < 2).
    """
    T = C.shape[0]
    if T < 2:
        return C.sum() * 0.0
    M = C * omega.unsqueeze(1)  # (T, d, r): ω_{t,i} c_{t,i}
    G = torch.einsum("tdi,sdj->tsij", M, M)  # (T, T, r, r): ω ω ⟨c_{t,i}, c_{s,j}⟩
    energy = G.pow(2).sum(dim=(2, 3))  # (T, T)
    off = 1.0 - torch.eye(T, device=C.device, dtype=C.dtype)  # (T, T): t ≠ s
    return (energy * off).sum() / (T * (T - 1))  # each unordered pair counted twice


# ---------------------------------------------------------------------------------------------- the layers
class TaskLoRA(nn.Module):
    """The multi-task low-rank path Δ of one site (a projection, or a block's residual input).

    Row n of task t = router.index[n]:
        routing off: Δ(x_n) = s B_t A_t dropout(x_n)
        routing on:  Δ(x_n) = Σ_k w_{t,k} ⊙ (s B_k A_k dropout(x_n)) = s B̃_t Â dropout(x_n),
                     Â = [A_1; ...; A_K]: (K r, d_in),
                     B̃_t = [diag(w_{t,1}) B_1, ..., diag(w_{t,K}) B_K]: (d_out, K r)

    Shapes: x: (N, L, d_in) or (N, d_in) -> (N, L, d_out) or (N, d_out); lora_A: (K, r, d_in),
    lora_B: (K, d_out, r), routing: (T, K, d_out / g). One expert and no routing needs no router index.
    The buffers ``svd_V`` (K, d_in, r) and ``svd_omega`` (K, r) hold the spectral basis of the last refresh.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        num_experts: int,
        r: int,
        scaling: float,
        dropout: float,
        router: AdapterRouter | None,
        init_A: Tensor,
        routing: bool = False,
        group_size: int = 1,
    ) -> None:
        super().__init__()
        if d_out % group_size:
            raise ValueError(
                f"model.method.init_args.routing_group_size={group_size} does not divide the output width "
                f"{d_out}"
            )
        self.d_in, self.d_out, self.r, self.scaling, self.group_size = (
            d_in,
            d_out,
            r,
            float(scaling),
            group_size,
        )
        self.router = router
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(
            init_A.reshape(1, r, d_in).repeat(num_experts, 1, 1).clone()
        )  # (K, r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(num_experts, d_out, r, dtype=init_A.dtype))  # (K, d_out, r)
        if routing:
            eye = torch.eye(num_experts, dtype=init_A.dtype)  # (T, K): identity routing
            self.routing = nn.Parameter(eye.unsqueeze(-1).repeat(1, 1, d_out // group_size))  # (T, K, G)
        else:
            self.register_parameter("routing", None)
        self.register_buffer("svd_V", torch.zeros(num_experts, d_in, r, dtype=init_A.dtype))
        self.register_buffer("svd_omega", torch.zeros(num_experts, r, dtype=init_A.dtype))
        self.register_buffer("svd_step", torch.tensor(-1, dtype=torch.long))

    @property
    def num_experts(self) -> int:
        return self.lora_A.shape[0]

    def mixed_B(self) -> Tensor:
        """(T, d_out, K r) = B̃_t for every task t (routing on)."""
        w = self.routing.repeat_interleave(self.group_size, dim=-1)  # (T, K, d_out)
        mixed = w.unsqueeze(-1) * self.lora_B.unsqueeze(0)  # (T, K, d_out, r) = diag(w_{t,k}) B_k
        return mixed.permute(0, 2, 1, 3).reshape(w.shape[0], self.d_out, -1)  # (T, d_out, K r)

    def forward(self, x: Tensor) -> Tensor:
        h = self.dropout(x).to(self.lora_A.dtype)  # (N, [L,] d_in)
        if self.num_experts == 1 and self.routing is None:
            z = h @ self.lora_A[0].transpose(0, 1) @ self.lora_B[0].transpose(0, 1)  # (N, [L,] d_out) = B A x
            return (self.scaling * z).to(x.dtype)
        index = None if self.router is None else self.router.index
        if index is None:
            raise RuntimeError(
                "TaskLoRA: the router's index is unset; call router.set(task_of_each_row) first"
            )
        n = x.shape[0]
        if index.shape[0] != n:
            raise ValueError(
                f"router index has {index.shape[0]} rows but the input has {n} (x: {tuple(x.shape)})"
            )
        index = index.to(x.device)
        h = h.reshape(n, -1, self.d_in)  # (N, L, d_in)
        if self.routing is None:
            z = torch.bmm(h, self.lora_A[index].transpose(1, 2))  # (N, L, r) = A_t x
            z = torch.bmm(z, self.lora_B[index].transpose(1, 2))  # (N, L, d_out) = B_t A_t x
        else:
            z = h @ self.lora_A.reshape(-1, self.d_in).transpose(0, 1)  # (N, L, K r) = Â x
            z = torch.bmm(z, self.mixed_B()[index].transpose(1, 2))  # (N, L, d_out) = B̃_t Â x
        out_shape = (*x.shape[:-1], self.d_out)
        return (self.scaling * z).reshape(out_shape).to(x.dtype)  # (N, [L,] d_out)

    def effective(self, t: int) -> tuple[Tensor, Tensor]:
        """Task t's adapter as one LoRA with s folded in: A: (R, d_in), B: (d_out, R), Δ(x) = B A x."""
        if self.routing is None:
            return self.lora_A[t], self.scaling * self.lora_B[t]  # R = r
        return self.lora_A.reshape(-1, self.d_in), self.scaling * self.mixed_B()[t]  # R = K r

    # -------------------------------------------------------------- spectral regulariser
    @torch.no_grad()
    def refresh_spectrum(self, shared_fraction: float, step: int) -> None:
        """Store each expert's right singular vectors and weights ω (the basis the regulariser uses)."""
        _, sigma, V = low_rank_svd(self.lora_A.float(), self.lora_B.float())  # (K, r), (K, d_in, r)
        self.svd_V.copy_(V)
        self.svd_omega.copy_(spectral_weights(self.scaling * sigma, shared_fraction))
        self.svd_step.fill_(step)

    def components(self) -> Tensor:
        """(K, d_out, r): c_{k,i} = ΔW_k v_{k,i} for the stored basis, differentiable in A and B."""
        return self.scaling * torch.bmm(self.lora_B, torch.bmm(self.lora_A, self.svd_V))


class LinearWithLoRA(nn.Module):
    """A frozen linear plus its multi-task LoRA: y = W x + b + Δ(x) (component-level adaptation)."""

    def __init__(self, base: nn.Linear, delta: TaskLoRA) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.delta = delta

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.delta(x)  # (N, [L,] d_out)


class BlockWithLoRA(nn.Module):
    """A sublayer's output module LN(dense(h) + x) with the block-level path: LN(dense(h) + x + Δ(x)).

    ``base(hidden_states, input_tensor)`` is e.g. BertSelfOutput (attention block, x = the layer input) or
    BertOutput (FFN block, x = the attention block's output); feeding it x + Δ(x) adds Δ(x) inside the LN.
    """

    def __init__(self, base: nn.Module, delta: TaskLoRA) -> None:
        super().__init__()
        self.base = base
        self.delta = delta

    def forward(self, hidden_states: Tensor, input_tensor: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self.base(hidden_states, input_tensor + self.delta(input_tensor), *args, **kwargs)  # (N, L, H)


def _block_sites(encoder: nn.Module, blocks: tuple[str, ...]) -> list[tuple[str, int, str]]:
    """(name, layer, block kind) of every sublayer output module that takes (hidden_states, input_tensor)."""
    sites = []
    for name, mod in encoder.named_modules():
        for kind in blocks:
            match = BLOCK_PATTERNS[kind].search(name)
            if match and "input_tensor" in inspect.signature(mod.forward).parameters:
                sites.append((name, int(match.group(1)), kind))
    return sites


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _sites(model: nn.Module) -> list[tuple[str, TaskLoRA]]:
    """(site name, its TaskLoRA) in model order; the site is the wrapped module's path."""
    return [(n.removesuffix(".delta"), m) for n, m in model.named_modules() if isinstance(m, TaskLoRA)]


# ---------------------------------------------------------------------------------------------- the method
class MTLoRA(Method):
    """mtLoRA with each of its three designs switchable (module docstring).

    Args:
        spectral_reg: add the spectral-aware regulariser (design 1).
        block_level: one LoRA per transformer block instead of one per ``model.lora.targets`` (design 2).
        routing: learned fine-grained routing over the task LoRAs, identity at start (design 3).
        reg_weight: λ of the regulariser; the authors' code default is 0.25, their best BBH run 1.0.
        shared_fraction: share of each expert's top singular components left free (paper: top 20%).
        svd_every: optimizer steps between refreshes of the spectral basis (1: every step). The authors
            refresh once per epoch and add the term only on those steps; here the term acts at every step.
        block: which block carries the block-level LoRA: ``attention`` (the authors' code default), ``ffn``
            (their Table 2 runs) or ``both``.
        routing_group_size: g, output dimensions sharing one routing weight (1: fully dimension-specific).
    """

    name: ClassVar[str] = "mtlora"

    def __init__(
        self,
        spectral_reg: bool = True,
        block_level: bool = True,
        routing: bool = True,
        reg_weight: float = 1.0,
        shared_fraction: float = 0.2,
        svd_every: int = 1,
        block: Literal["attention", "ffn", "both"] = "attention",
        routing_group_size: int = 1,
    ) -> None:
        if not reg_weight >= 0:
            raise ValueError(f"model.method.init_args.reg_weight={reg_weight}; allowed: a number >= 0")
        if not 0.0 <= shared_fraction < 1.0:
            raise ValueError(f"model.method.init_args.shared_fraction={shared_fraction}; allowed: 0 <= f < 1")
        check_int("model.method.init_args.svd_every", svd_every)
        if block not in ("attention", "ffn", "both"):
            raise ValueError(f"model.method.init_args.block={block!r}; allowed: 'attention', 'ffn', 'both'")
        check_int("model.method.init_args.routing_group_size", routing_group_size)
        unused = [
            (f"{k}={v!r}", switch)
            for k, v, default, switch in (
                ("reg_weight", reg_weight, 1.0, "spectral_reg"),
                ("shared_fraction", shared_fraction, 0.2, "spectral_reg"),
                ("svd_every", svd_every, 1, "spectral_reg"),
                ("block", block, "attention", "block_level"),
                ("routing_group_size", routing_group_size, 1, "routing"),
            )
            if v != default
            and not {"spectral_reg": spectral_reg, "block_level": block_level, "routing": routing}[switch]
        ]
        if unused:
            given, switch = unused[0]
            raise ValueError(
                f"model.method.init_args.{given} only applies with {switch}=true, but {switch}=false"
            )
        self.spectral_reg = spectral_reg
        self.block_level = block_level
        self.routing = routing
        self.reg_weight = reg_weight
        self.shared_fraction = shared_fraction
        self.svd_every = svd_every
        self.block = block
        self.routing_group_size = routing_group_size

    # ------------------------------------------------------------------ construction
    def check(self, specs: list[TaskSpec]) -> None:
        if len(specs) < 2:
            raise ValueError(
                f"model.method=MTLoRA couples several tasks but data.tasks has {len(specs)}: "
                f"{[s.name for s in specs]}; give two or more, or use method Single"
            )

    def build(self, module: SpecLoRAModule) -> None:
        """Wrap the block output modules (or target linears) of ``module.encoder`` with :class:`TaskLoRA`."""
        cfg, T = module.lora_cfg, len(module.specs)
        encoder = module.encoder
        if self.block_level:
            if cfg.targets is not None:
                raise ValueError(
                    f"model.lora.targets={cfg.targets!r} selects projections, but model.method=MTLoRA adapts "
                    "whole blocks (block_level=true); leave model.lora.targets null or set block_level=false"
                )
            kinds = ("attention", "ffn") if self.block == "both" else (self.block,)
            sites = _block_sites(encoder, kinds)
            if not sites:
                raise ValueError(
                    f"model.method=MTLoRA block={self.block!r}: no {'/'.join(kinds)} sublayer output module "
                    f"taking (hidden_states, input_tensor) in model_type {encoder.config.model_type!r} "
                    "(BERT-style post-LN layers are supported); set block_level=false to adapt model.lora.targets"
                )
            dims = [
                (name, layer, kind, encoder.config.hidden_size, encoder.config.hidden_size)
                for name, layer, kind in sites
            ]
        else:
            linears = [(n, m) for n, m in encoder.named_modules() if isinstance(m, nn.Linear)]
            dims = []
            for name, lin in linears:
                target = next((t for t in module.targets if matches_target(name, t)), None)
                layer = next((int(p) for p in name.split(".") if p.isdigit()), None)
                if target is not None and layer is not None:
                    dims.append((name, layer, target, lin.in_features, lin.out_features))
            if not dims:
                raise ValueError(
                    f"model.lora.targets={list(module.targets)} match no linear in a numbered layer"
                )
        router = AdapterRouter(T)
        generator = torch.Generator().manual_seed(cfg.init_seed)
        modules = dict(encoder.named_modules())
        slots = []
        for name, layer, kind, d_in, d_out in dims:
            init_A = torch.empty(cfg.r, d_in)  # (r, d_in): one draw per site, shared by all tasks (DESIGN.md)
            nn.init.kaiming_uniform_(init_A, a=math.sqrt(5), generator=generator)
            delta = TaskLoRA(
                d_in,
                d_out,
                T,
                cfg.r,
                cfg.alpha / cfg.r,
                cfg.dropout,
                router,
                init_A,
                routing=self.routing,
                group_size=self.routing_group_size,
            )
            base = modules[name]
            _replace(
                encoder, name, BlockWithLoRA(base, delta) if self.block_level else LinearWithLoRA(base, delta)
            )
            slots.append(LoRASlot(name, layer, kind, d_in, d_out))
        module.router, module.slots = router, slots

    # ------------------------------------------------------------------ a training step
    def extra_losses(
        self, module: SpecLoRAModule, batch: dict[str, Tensor], outputs: dict
    ) -> dict[str, Tensor]:
        """``mtlora_spectral`` = λ · mean over sites of :func:`spectral_orthogonality` of the experts."""
        if not self.spectral_reg or self.reg_weight == 0:
            return {}
        step = int(module.global_step)
        terms = []
        for _, delta in _sites(module.encoder):
            last = int(delta.svd_step)
            if last < 0 or step - last >= self.svd_every:
                delta.refresh_spectrum(self.shared_fraction, step)
            terms.append(spectral_orthogonality(delta.components(), delta.svd_omega))
        return {"mtlora_spectral": self.reg_weight * torch.stack(terms).mean()}

    # ------------------------------------------------------------------ export
    def _config(self, module: SpecLoRAModule) -> dict[str, Any]:
        return {
            "format": EXPORT_FORMAT,
            "base_model_name_or_path": resolve_backbone(module.backbone_name),
            "method": self.hparams()["init_args"],
            "r": module.lora_cfg.r,
            "lora_alpha": module.lora_cfg.alpha,
            "sites": [slot.name for slot in module.slots],
            "tasks": [spec.name for spec in module.specs],
            "update": "block sites: LN(F(x) + x + B A x) (B A x added to the block's residual input); "
            "linear sites: W x + b + B A x",
        }

    def export(self, module: SpecLoRAModule, out_dir: Path) -> list[Path]:
        """Per task: its effective adapter (peft LoRA for component level, else the block format), the raw
        mtLoRA state, its head."""
        from peft import LoraConfig

        sites = _sites(module.encoder)
        state = {k: v.detach().cpu().contiguous() for k, v in _raw_state(module).items()}
        config = self._config(module)
        written = []
        for t, spec in enumerate(module.specs):
            folder = Path(out_dir) / spec.name
            folder.mkdir(parents=True, exist_ok=True)
            factors = {name: delta.effective(t) for name, delta in sites}
            rank = next(iter(factors.values()))[0].shape[0]
            if self.block_level:
                tensors = {
                    f"{name}.{k}": v
                    for name, (A, B) in factors.items()
                    for k, v in (("lora_A", A), ("lora_B", B))
                }
            else:  # peft LoRA with lora_alpha = r: scaling 1, s already folded into B
                LoraConfig(
                    r=rank,
                    lora_alpha=rank,
                    target_modules=list(module.targets),
                    lora_dropout=module.lora_cfg.dropout,
                    bias="none",
                    base_model_name_or_path=config["base_model_name_or_path"],
                ).save_pretrained(str(folder))
                tensors = {
                    f"base_model.model.{name}.lora_{k}.weight": v
                    for name, (A, B) in factors.items()
                    for k, v in (("A", A), ("B", B))
                }
            tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
            save_file(
                tensors, str(folder / (BLOCK_WEIGHTS if self.block_level else "adapter_model.safetensors"))
            )
            save_file(state, str(folder / STATE_WEIGHTS))
            (folder / CONFIG_NAME).write_text(
                json.dumps({**config, "task": spec.name, "task_index": t, "rank": rank}, indent=2)
            )
            module.write_task_head(t, folder)
            written.append(folder)
        return written

    def load(self, module: SpecLoRAModule, in_dir: Path) -> None:
        """Restore the raw mtLoRA parameters and every head from :meth:`export`'s folders (``ValueError``,
        the file when the folder was written by another configuration)."""
        tasks = [spec.name for spec in module.specs]
        want = self._config(module)
        for t, task in enumerate(tasks):
            path = Path(in_dir) / task / CONFIG_NAME
            if not path.is_file():
                raise ValueError(f"in_dir: {path} not found; expected MTLoRA.export's folders")
            got = json.loads(path.read_text())
            for key in ("format", "method", "r", "lora_alpha", "sites", "tasks"):
                if got.get(key) != want[key]:
                    raise ValueError(f"{path}: {key} = {got.get(key)!r}, but the module has {want[key]!r}")
            module.heads.load_head(t, path.parent)
        state = load_file(str(Path(in_dir) / tasks[0] / STATE_WEIGHTS))
        params = _raw_state(module)
        if set(state) != set(params):
            raise ValueError(
                f"{Path(in_dir) / tasks[0] / STATE_WEIGHTS}: keys differ from the module's mtLoRA state"
            )
        with torch.no_grad():
            for key, p in params.items():
                p.copy_(state[key])

    def hparams(self) -> dict[str, Any]:
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(vars(self))}


def _raw_state(module: SpecLoRAModule) -> dict[str, Tensor]:
    """Every mtLoRA parameter, by its path in the encoder (lora_A, lora_B, routing of each site)."""
    return {n: p for n, p in module.encoder.named_parameters() if ".delta." in n}


def apply_block_adapter(encoder: nn.Module, folder: str | Path) -> nn.Module:
    """Add one task's exported block-level adapter (``mtlora_block.safetensors``) to ``encoder``, in place:
    every site's output module becomes LN(F(x) + x + B A x). Returns the encoder."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG_NAME).read_text())
    if config.get("format") != EXPORT_FORMAT or not config["method"]["block_level"]:
        raise ValueError(
            f"{folder / CONFIG_NAME}: not a block-level mtLoRA export (component-level ones are peft folders)"
        )
    weights = load_file(str(folder / BLOCK_WEIGHTS))
    modules = dict(encoder.named_modules())
    for name in config["sites"]:
        if name not in modules:
            raise ValueError(
                f"{folder / CONFIG_NAME}: site {name!r} is not a module of {type(encoder).__name__}"
            )
        A, B = weights[f"{name}.lora_A"], weights[f"{name}.lora_B"]  # (R, d_in), (d_out, R)
        delta = TaskLoRA(A.shape[1], B.shape[0], 1, A.shape[0], 1.0, 0.0, None, A)
        with torch.no_grad():
            delta.lora_B[0].copy_(B)
        _replace(encoder, name, BlockWithLoRA(modules[name], delta))
    return encoder
