"""Export and import one task's adapter in the standard peft LoRA format.

A folder holds ``adapter_config.json`` (a ``peft.LoraConfig``) and ``adapter_model.safetensors`` with, for
every LoRA-wrapped linear ``{name}`` of the backbone, the keys peft saves for a ``PeftModel`` wrapping a plain
``AutoModel``:

    base_model.model.{name}.lora_A.weight: (r, d_in)      = lora_A[adapter]
    base_model.model.{name}.lora_B.weight: (d_out, r)     = lora_B[adapter]

so that ``peft.PeftModel.from_pretrained(AutoModel.from_pretrained(base), folder)`` runs that task alone.
``model`` below is the backbone given to :func:`speclora.model.lora.inject_lora`, not a module wrapping it,
since the module names become the keys.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from torch import nn

from speclora.backbone import resolve_backbone
from speclora.checks import is_int_in
from speclora.model.lora import MultiTaskLoRALinear, lora_modules, matches_target

if TYPE_CHECKING:
    from speclora.model.module import SpecLoRAModule

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "export_adapter", "import_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# LoraConfig fields whose non-default values change the model in ways MultiTaskLoRALinear does not hold
UNSUPPORTED: dict[str, object] = {
    "use_dora": False,
    "use_rslora": False,
    "bias": "none",
    "lora_bias": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
}


def _keys(name: str) -> tuple[str, str]:
    return f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"


def _lora_layers(model: nn.Module) -> list[tuple[str, MultiTaskLoRALinear]]:
    layers = lora_modules(model)
    if not layers:
        raise ValueError(
            f"model: {type(model).__name__} holds no MultiTaskLoRALinear; call inject_lora first"
        )
    return layers


def _check_adapter(adapter: int, layers: list[tuple[str, MultiTaskLoRALinear]]) -> None:
    num = layers[0][1].num_adapters
    if not is_int_in(adapter, 0, num - 1):
        raise ValueError(f"adapter: expected an index in [0, {num - 1}], got {adapter!r}")


def _targeted(
    layers: list[tuple[str, MultiTaskLoRALinear]], model: nn.Module, targets: str | Sequence[str]
) -> set[str]:
    """The linears of ``model`` (wrapped or not) that peft would wrap for ``target_modules=targets``."""
    wrapped = {f"{n}.base" for n, _ in layers}
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in wrapped]
    linears += [n for n, _ in layers]
    if isinstance(targets, str):  # peft: a string is a regex matched against the whole name
        return {n for n in linears if re.fullmatch(targets, n)}
    return {n for n in linears if any(matches_target(n, t) for t in targets)}


def export_adapter(
    model: nn.Module,
    adapter: int,
    out_dir: Path | str,
    base_model_name_or_path: str,
    targets: Sequence[str],
    r: int,
    alpha: float,
    dropout: float,
) -> Path:
    """Write adapter ``adapter`` of ``model``'s LoRA layers to ``out_dir`` as a peft LoRA folder; return it.

    ``targets``, ``r`` and ``alpha`` are those given to ``inject_lora``; they are checked against the model's
    layers so that peft rebuilds exactly the same modules with the same scaling ``alpha / r``.
    """
    layers = _lora_layers(model)
    _check_adapter(adapter, layers)
    name0, layer0 = layers[0]
    if r != layer0.r:
        raise ValueError(f"r: {r} differs from the model's LoRA rank {layer0.r} ({name0})")
    if not math.isclose(alpha, layer0.alpha):
        raise ValueError(f"alpha: {alpha} differs from the model's LoRA alpha {layer0.alpha} ({name0})")
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    expected = _targeted(layers, model, targets)
    have = {n for n, _ in layers}
    if expected != have:
        raise ValueError(
            f"targets: {list(targets)} select {sorted(expected - have)[:4]} that carry no LoRA and miss "
            f"{sorted(have - expected)[:4]} that do; pass the targets given to inject_lora"
        )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(targets),
        lora_dropout=dropout,
        bias="none",
        base_model_name_or_path=base_model_name_or_path,
    )
    config.save_pretrained(str(out_dir))

    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers:
        key_a, key_b = _keys(name)
        tensors[key_a] = layer.lora_A[adapter].detach().cpu().clone().contiguous()  # (r, d_in)
        tensors[key_b] = layer.lora_B[adapter].detach().cpu().clone().contiguous()  # (d_out, r)
    save_file(tensors, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    return out_dir


def import_adapter(model: nn.Module, in_dir: Path | str, adapter: int) -> None:
    """Load a peft LoRA folder (as :func:`export_adapter` writes it) into slot ``adapter`` of ``model``.

    Raises ``ValueError`` naming the file and key when a key is missing or extra or has the wrong shape, and
    when the folder's r, lora_alpha or target_modules differ from the model's (or it uses DoRA, rsLoRA,
    per-module rank/alpha patterns or LoRA biases, which this layer does not hold).
    """
    layers = _lora_layers(model)
    _check_adapter(adapter, layers)
    in_dir = Path(in_dir)
    config_path, weights_path = in_dir / CONFIG_NAME, in_dir / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ValueError(
                f"in_dir: {path} not found; expected a peft LoRA folder with {CONFIG_NAME} and {WEIGHTS_NAME}"
            )

    config = json.loads(config_path.read_text())
    name0, layer0 = layers[0]
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{config_path}: peft_type {config.get('peft_type')!r}, expected 'LORA'")
    if config.get("r") != layer0.r:
        raise ValueError(
            f"{config_path}: r = {config.get('r')!r} differs from the model's LoRA rank {layer0.r}"
        )
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or not math.isclose(alpha, layer0.alpha):
        raise ValueError(
            f"{config_path}: lora_alpha = {alpha!r} differs from the model's alpha {layer0.alpha}"
        )
    for key, plain in UNSUPPORTED.items():
        if (config.get(key) or plain) != plain:  # absent, None, {} and False all read as the plain value
            raise ValueError(
                f"{config_path}: {key} = {config.get(key)!r} is not supported, expected {plain!r}"
            )
    targets = config.get("target_modules")
    if targets is None:
        raise ValueError(f"{config_path}: target_modules is missing")
    selected, have = _targeted(layers, model, targets), {n for n, _ in layers}
    if selected != have:
        raise ValueError(
            f"{config_path}: target_modules {targets!r} differ from the model's LoRA targets: they select "
            f"{sorted(selected - have)[:4]} (no LoRA in the model) and miss {sorted(have - selected)[:4]}"
        )

    tensors = load_file(str(weights_path))
    wanted = {key: (layer, kind) for name, layer in layers for key, kind in zip(_keys(name), "AB")}
    missing = [k for k in wanted if k not in tensors]
    if missing:
        raise ValueError(f"{weights_path}: missing key {missing[0]!r} ({len(missing)} missing in all)")
    extra = sorted(set(tensors) - set(wanted))
    if extra:
        raise ValueError(f"{weights_path}: unexpected key {extra[0]!r} ({len(extra)} extra in all)")
    for key, (layer, kind) in wanted.items():
        want = (layer.r, layer.in_features) if kind == "A" else (layer.out_features, layer.r)
        if tuple(tensors[key].shape) != want:
            raise ValueError(
                f"{weights_path}: key {key!r} has shape {tuple(tensors[key].shape)}, expected {want}"
            )

    with torch.no_grad():
        for key, (layer, kind) in wanted.items():
            param = layer.lora_A if kind == "A" else layer.lora_B  # (T, r, d_in) | (T, d_out, r)
            param[adapter].copy_(tensors[key])  # (r, d_in) | (d_out, r)


# ---------------------------------------------------------------------- a module's tasks, one folder each
def export_task_adapters(module: SpecLoRAModule, out_dir: Path) -> list[Path]:
    """Each task's adapter as a peft folder, plus its head (TaskHeads.save_head), under ``out_dir/<task>``;
    the folders in task order (``SpecLoRAModule.export_peft_adapters``)."""
    written = []
    for t, spec in enumerate(module.specs):
        folder = out_dir / spec.name
        cfg = module.lora_cfg
        export_adapter(
            module.encoder, module.method.adapter_of_task(t), folder,
            base_model_name_or_path=resolve_backbone(module.backbone_name), targets=list(module.targets),
            r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout,
        )
        module.write_task_head(t, folder)
        written.append(folder)
    return written


def import_task_adapters(module: SpecLoRAModule, in_dir: Path) -> None:
    """Load :func:`export_task_adapters`' folders (adapters and heads) back into their task slots."""
    for t, spec in enumerate(module.specs):
        folder = in_dir / spec.name
        if not folder.is_dir():
            raise FileNotFoundError(f"no exported adapter for task {spec.name!r} at {folder}")
        import_adapter(module.encoder, folder, module.method.adapter_of_task(t))
        module.heads.load_head(t, folder)
