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

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from speclora.backbone import resolve_backbone
from speclora.checks import check_int
from speclora.methods.base import Method
from speclora.methods.mtlora_layers import (
    BlockWithLoRA,
    LinearWithLoRA,
    SpectralTaskLoRA,
    block_sites,
    low_rank_svd,
    replace_module,
    spectral_orthogonality,
    spectral_weights,
    task_lora_sites,
)
from speclora.model.adapted import AdaptedEncoder, BuildInputs
from speclora.model.lora import AdapterRouter, LoRASlot, MultiTaskLoRA, matches_target

if TYPE_CHECKING:
    from speclora.model.module import SpecLoRAModule

__all__ = [
    "MTLoRA",
    "SpectralTaskLoRA",
    "apply_block_adapter",
    "low_rank_svd",
    "spectral_orthogonality",
    "spectral_weights",
]

EXPORT_FORMAT = "speclora.mtlora/1"
CONFIG_NAME = "mtlora.json"
BLOCK_WEIGHTS = "mtlora_block.safetensors"
STATE_WEIGHTS = "mtlora_state.safetensors"

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
    needs_tasks: ClassVar[str | None] = "couples several tasks"

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
    def build(self, inputs: BuildInputs) -> AdaptedEncoder:
        """Wrap the block output modules (or target linears) of ``inputs.encoder`` with :class:`SpectralTaskLoRA`."""
        cfg, T = inputs.lora, inputs.num_tasks
        encoder = inputs.encoder
        if self.block_level:
            if cfg.targets is not None:
                raise ValueError(
                    f"model.lora.targets={cfg.targets!r} selects projections, but model.method=MTLoRA adapts "
                    "whole blocks (block_level=true); leave model.lora.targets null or set block_level=false"
                )
            kinds = ("attention", "ffn") if self.block == "both" else (self.block,)
            sites = block_sites(encoder, kinds)
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
                target = next((t for t in inputs.targets if matches_target(name, t)), None)
                layer = next((int(p) for p in name.split(".") if p.isdigit()), None)
                if target is not None and layer is not None:
                    dims.append((name, layer, target, lin.in_features, lin.out_features))
            if not dims:
                raise ValueError(
                    f"model.lora.targets={list(inputs.targets)} match no linear in a numbered layer"
                )
        router = AdapterRouter(T)
        generator = torch.Generator().manual_seed(cfg.init_seed)
        modules = dict(encoder.named_modules())
        slots = []
        for name, layer, kind, d_in, d_out in dims:
            init_A = torch.empty(cfg.r, d_in)  # (r, d_in): one draw per site, shared by all tasks (DESIGN.md)
            nn.init.kaiming_uniform_(init_A, a=math.sqrt(5), generator=generator)
            delta = SpectralTaskLoRA(
                d_in,
                d_out,
                T,
                cfg.r,
                cfg.alpha,
                cfg.dropout,
                router,
                init_A,
                routing=self.routing,
                group_size=self.routing_group_size,
            )
            base = modules[name]
            replace_module(
                encoder, name, BlockWithLoRA(base, delta) if self.block_level else LinearWithLoRA(base, delta)
            )
            slots.append(LoRASlot(name, layer, kind, d_in, d_out))
        return AdaptedEncoder(self, inputs, router, slots)

    # ------------------------------------------------------------------ a training step
    def extra_losses(
        self, module: SpecLoRAModule, batch: dict[str, Tensor], outputs: dict
    ) -> dict[str, Tensor]:
        """``mtlora_spectral`` = λ · mean over sites of :func:`spectral_orthogonality` of the experts."""
        if not self.spectral_reg or self.reg_weight == 0:
            return {}
        step = int(module.global_step)
        terms = []
        for _, delta in task_lora_sites(module.encoder):
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

        sites = task_lora_sites(module.encoder)
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
        R = A.shape[0]
        delta = MultiTaskLoRA(A.shape[1], B.shape[0], 1, R, float(R), 0.0, AdapterRouter(1), A)  # alpha/r = 1
        with torch.no_grad():
            delta.lora_B[0].copy_(B)
        replace_module(encoder, name, BlockWithLoRA(modules[name], delta))
    return encoder
