"""UnoLoRA*: one shared LoRA whose rank components a shared hypernetwork scales per task, layer and sample.

seeds/unolora.txt, §3.1 (eq. 1-7) and §3.3 (eq. 8-9). For a row n of task t(n), sample encoding x̄_n and LoRA
layer slot k (a (layer, module) pair: the paper's "position" p), with notation as in docs/methods.md:

    b_n      = B(x̄_n)                                   bottleneck MLP                      (eq. 3)
    e_{k,n}  = C([E_task(t(n)), E_pos(k), b_n])          fusion MLP                          (eq. 4-5)
    s_{k,n}  = S(e_{k,n}) ∈ R^r                          linear                              (eq. 6)
    W'_{k,n} = W_k + (alpha / r) · B_k diag(s_{k,n}) A_k                                     (eq. 9)

A_k, B_k are the single LoRA shared by every task (speclora.model.lora, one adapter); the hypernetwork
(E_task, E_pos, B, C, S) is shared by every task and every layer. All (k, n) scales come from one batched
hypernetwork call per forward and reach the layers through ``router.scales: (S, N, r)``.

Choices where the paper is silent (docs/methods.md, "unolora_star"): x̄_n is the mean of the row's frozen
input word embeddings over its attention mask; E_pos has one entry per LoRA slot; the MLPs have one hidden
layer with ReLU; S starts at weight ~ N(0, init_std²), bias 1, so that s ≈ 1 and UnoLoRA* starts as UnoLoRA.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from lightning.pytorch.utilities import rank_zero_info
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from speclora.backbone import resolve_backbone
from speclora.checks import check_int
from speclora.methods.base import Method
from speclora.model.adapted import AdaptedEncoder, BuildInputs
from speclora.model.lora import DEFAULT_TARGETS, lora_modules

if TYPE_CHECKING:
    from speclora.model.module import SpecLoRAModule

__all__ = [
    "EXPORT_CONFIG",
    "EXPORT_WEIGHTS",
    "SharedHypernetwork",
    "UnoLoRAStar",
    "import_unolora_star",
    "mean_token_embedding",
    "query_value_targets",
]

EXPORT_FORMAT = "speclora.unolora_star/1"
EXPORT_CONFIG = "unolora_star.json"
EXPORT_WEIGHTS = "unolora_star.safetensors"


def query_value_targets(model_type: str) -> tuple[str, str]:
    """The query and value projections of an architecture: UnoLoRA*'s own targets (§3.3, eq. 8)."""
    if model_type not in DEFAULT_TARGETS:
        raise ValueError(
            f"model.method=UnoLoRAStar: no query/value preset for model_type {model_type!r} (known: "
            f"{', '.join(sorted(DEFAULT_TARGETS))}); set model.lora.targets explicitly"
        )
    query, _, value, _ = DEFAULT_TARGETS[model_type]  # (q, k, v, o)
    return query, value


def mean_token_embedding(embeddings: nn.Embedding, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """x̄_n = Σ_i m_{n,i} E[x_{n,i}] / Σ_i m_{n,i}: the sample encoding s of eq. 2-3.

    input_ids, attention_mask: (N, L) -> (N, d_s), d_s the embedding width. The table is the backbone's frozen
    input word embedding (no position or type embedding, no layer norm), so the encoding costs one lookup.
    """
    with torch.no_grad():
        tokens = embeddings(input_ids)  # (N, L, d_s)
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)  # (N, L, 1)
        return (tokens * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (N, d_s)


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out))


class SharedHypernetwork(nn.Module):
    """(task, sample encoding) -> the rank-wise scale of every LoRA slot: s = S(C([E_task, E_pos, B(x̄)])).

    Args:
        num_tasks: |T|, rows of E_task.
        num_positions: P, rows of E_pos, one per LoRA slot (layer × target module).
        sample_dim: d_s, width of the sample encoding x̄.
        rank: r, the LoRA rank (the output width of S).
        task_dim: width of E_task and of E_pos.
        hidden_dim: d_h, the hidden width of the MLPs B and C.
        bottleneck_dim: d_b, the width of b = B(x̄).
        embed_dim: d_e, the width of e = C(...).
        init_std: std of S's initial weight; its bias starts at 1, so s ≈ 1 at the start.
    """

    def __init__(
        self,
        num_tasks: int,
        num_positions: int,
        sample_dim: int,
        rank: int,
        task_dim: int,
        hidden_dim: int,
        bottleneck_dim: int,
        embed_dim: int,
        init_std: float,
    ) -> None:
        super().__init__()
        self.task_embedding = nn.Embedding(num_tasks, task_dim)  # E_task (eq. 4)
        self.pos_embedding = nn.Embedding(num_positions, task_dim)  # E_pos (eq. 4)
        self.bottleneck = _mlp(sample_dim, hidden_dim, bottleneck_dim)  # B (eq. 3)
        self.combine = _mlp(2 * task_dim + bottleneck_dim, hidden_dim, embed_dim)  # C (eq. 5)
        self.scale = nn.Linear(embed_dim, rank)  # S (eq. 6)
        nn.init.normal_(self.scale.weight, std=init_std)
        nn.init.ones_(self.scale.bias)

    @property
    def num_positions(self) -> int:
        return self.pos_embedding.num_embeddings

    def forward(self, task: Tensor, sample: Tensor) -> Tensor:
        """task: (N,) long, sample: (N, d_s) -> s: (P, N, r), the scale of row n in slot p."""
        n, p = task.shape[0], self.num_positions
        b = self.bottleneck(sample)  # (N, d_b) = B(x̄)
        e_task = self.task_embedding(task)  # (N, d_t)
        e_pos = self.pos_embedding.weight  # (P, d_t)
        # [e_task, e_pos, b] for every (slot, row), one batched call over the slots
        joint = torch.cat(
            [e_task.expand(p, n, -1), e_pos.unsqueeze(1).expand(p, n, -1), b.expand(p, n, -1)], dim=-1
        )  # (P, N, 2 d_t + d_b)
        e = self.combine(joint)  # (P, N, d_e) = C([e_task, e_pos, b])
        return self.scale(e)  # (P, N, r) = S(e)


class UnoLoRAStar(Method):
    """UnoLoRA*: the shared LoRA of UnoLoRA, its rank components scaled per task, slot and sample by a shared
    hypernetwork (seeds/unolora.txt §3.1-3.3, eq. 2-9).

    Adapts the query and value projections (§3.3, eq. 8) when ``model.lora.targets`` is null; an explicit
    ``model.lora.targets`` (or ``attention``) is kept. The paper's Table 2 (its dimensions) is missing from
    the seed text: the widths below follow HyperFormer++ (task embedding 64, hidden 128).

    Args:
        task_dim: width of the task and position embeddings E_task, E_pos (eq. 4).
        hidden_dim: d_h, hidden width of the bottleneck B and the fusion network C (eq. 3, 5).
        bottleneck_dim: d_b, width of the sample's bottleneck representation b (eq. 3).
        embed_dim: d_e, width of the task-specific embedding e_t (eq. 5).
        init_std: std of the initial weight of S (eq. 6), whose bias starts at 1 (s ≈ 1 at the start).
    """

    name: ClassVar[str] = "unolora_star"
    one_adapter = True

    def __init__(
        self,
        task_dim: int = 64,
        hidden_dim: int = 128,
        bottleneck_dim: int = 64,
        embed_dim: int = 64,
        init_std: float = 0.01,
    ) -> None:
        for key, value in (
            ("task_dim", task_dim),
            ("hidden_dim", hidden_dim),
            ("bottleneck_dim", bottleneck_dim),
            ("embed_dim", embed_dim),
        ):
            check_int(f"model.method.init_args.{key}", value)
        if not init_std >= 0:
            raise ValueError(f"model.method.init_args.init_std={init_std!r}; allowed: a number >= 0")
        self.task_dim = task_dim
        self.hidden_dim = hidden_dim
        self.bottleneck_dim = bottleneck_dim
        self.embed_dim = embed_dim
        self.init_std = float(init_std)

    # ------------------------------------------------------------------ construction
    def build(self, inputs: BuildInputs) -> AdaptedEncoder:
        if inputs.lora.targets is None:  # the paper's query and value, unless the run names its targets
            inputs = replace(inputs, targets=query_value_targets(inputs.encoder.config.model_type))
        adapted = super().build(inputs)  # one shared LoRA on every target
        embeddings = adapted.encoder.get_input_embeddings()
        if not isinstance(embeddings, nn.Embedding):
            raise ValueError(
                f"model.method=UnoLoRAStar encodes a sample by its mean input embedding, but the backbone's "
                f"input embeddings are a {type(embeddings).__name__}, not an nn.Embedding"
            )
        adapted.method_net = SharedHypernetwork(
            num_tasks=inputs.num_tasks,
            num_positions=len(adapted.slots),
            sample_dim=embeddings.embedding_dim,
            rank=inputs.lora.r,
            task_dim=self.task_dim,
            hidden_dim=self.hidden_dim,
            bottleneck_dim=self.bottleneck_dim,
            embed_dim=self.embed_dim,
            init_std=self.init_std,
        )
        lora = sum(p.numel() for _, m in lora_modules(adapted.encoder) for p in (m.lora_A, m.lora_B))
        hyper = sum(p.numel() for p in adapted.method_net.parameters())
        rank_zero_info(
            f"unolora_star: shared LoRA {lora:,} parameters on {list(adapted.targets)}, hypernetwork {hyper:,}"
        )
        return adapted

    # ------------------------------------------------------------------ a training step
    def scales(self, adapted: AdaptedEncoder, batch: dict[str, Tensor]) -> Tensor:
        """(S, N, r): s_{k,n} for every LoRA slot k and batch row n, in one hypernetwork call."""
        sample = mean_token_embedding(
            adapted.encoder.get_input_embeddings(), batch["input_ids"], batch["attention_mask"]
        )  # (N, d_s)
        dtype = next(adapted.method_net.parameters()).dtype  # a bf16 frozen encoder feeds an fp32 hypernetwork
        return adapted.method_net(batch["seq_task"], sample.to(dtype))  # (S, N, r)

    def before_encode(self, adapted: AdaptedEncoder, batch: dict[str, Tensor]) -> None:
        adapted.router.set_scales(self.scales(adapted, batch))

    # ------------------------------------------------------------------ export
    def export(self, module: SpecLoRAModule, out_dir: Path) -> list[Path]:
        """Write one self-contained folder per task (docs/methods.md, "unolora_star", for the format)."""
        tensors: dict[str, Tensor] = {}
        for name, layer in lora_modules(module.encoder):
            tensors[f"lora.{name}.lora_A"] = layer.lora_A[0].detach().cpu().contiguous()  # (r, d_in)
            tensors[f"lora.{name}.lora_B"] = layer.lora_B[0].detach().cpu().contiguous()  # (d_out, r)
        for key, value in module.adapted.method_net.state_dict().items():
            tensors[f"hypernet.{key}"] = value.detach().cpu().contiguous()
        config = {
            "format": EXPORT_FORMAT,
            "base_model_name_or_path": resolve_backbone(module.backbone_name),
            "r": module.lora_cfg.r,
            "lora_alpha": module.lora_cfg.alpha,
            "lora_dropout": module.lora_cfg.dropout,
            "target_modules": list(module.targets),
            "slots": [slot.name for slot in module.slots],
            "tasks": [spec.name for spec in module.specs],
            "hypernetwork": dict(vars(self)),
            "sample_encoding": "mean of the frozen input word embeddings over the attention mask",
            "update": "W' = W + (lora_alpha / r) * B_k diag(s) A_k, s = S(C([E_task[t], E_pos[k], B(x)]))",
        }
        written = []
        for t, spec in enumerate(module.specs):
            folder = out_dir / spec.name
            folder.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(folder / EXPORT_WEIGHTS), metadata={"format": "pt"})
            (folder / EXPORT_CONFIG).write_text(
                json.dumps({**config, "task": spec.name, "task_index": t}, indent=2)
            )
            module.write_task_head(t, folder)
            written.append(folder)
        return written

    def load(self, module: SpecLoRAModule, in_dir: Path) -> None:
        """Load what :meth:`export` wrote (see :func:`import_unolora_star`)."""
        import_unolora_star(module, in_dir)


def import_unolora_star(module: SpecLoRAModule, in_dir: str | Path) -> None:
    """Load what :meth:`UnoLoRAStar.export` wrote (shared LoRA, hypernetwork, heads) into a UnoLoRA* module.

    Raises ``ValueError`` naming the file when the folder's format, rank, alpha, slots or task list differ
    from the module's.
    """
    if not isinstance(module.method, UnoLoRAStar):
        raise ValueError(
            f"import_unolora_star: the module's method is {module.method_name!r}, not 'unolora_star'"
        )
    in_dir = Path(in_dir)
    tasks = [spec.name for spec in module.specs]
    weights: dict[str, Tensor] | None = None
    for t, name in enumerate(tasks):
        folder = in_dir / name
        config_path = folder / EXPORT_CONFIG
        if not config_path.is_file():
            raise ValueError(
                f"in_dir: {config_path} not found; expected a folder written by UnoLoRAStar.export"
            )
        config = json.loads(config_path.read_text())
        for key, want in (
            ("format", EXPORT_FORMAT),
            ("r", module.lora_cfg.r),
            ("lora_alpha", module.lora_cfg.alpha),
            ("slots", [slot.name for slot in module.slots]),
            ("tasks", tasks),
            ("task_index", t),
        ):
            if config.get(key) != want:
                raise ValueError(f"{config_path}: {key} = {config.get(key)!r}, but the module has {want!r}")
        if weights is None:  # every task's folder holds the same shared weights
            weights = load_file(str(folder / EXPORT_WEIGHTS))
        module.heads.load_head(t, folder)
    assert weights is not None  # tasks is never empty (resolve_tasks)
    hyper = {k.removeprefix("hypernet."): v for k, v in weights.items() if k.startswith("hypernet.")}
    module.adapted.method_net.load_state_dict(hyper)
    with torch.no_grad():
        for name, layer in lora_modules(module.encoder):
            layer.lora_A[0].copy_(weights[f"lora.{name}.lora_A"])  # (r, d_in)
            layer.lora_B[0].copy_(weights[f"lora.{name}.lora_B"])  # (d_out, r)
