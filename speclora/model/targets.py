"""Which linears of an encoder get LoRA: module-name suffixes, matched as peft matches them, and the
attention preset of each encoder family (the LoRA paper's W_q, W_k, W_v, W_o)."""

from __future__ import annotations

from collections.abc import Sequence

# model_type -> the attention query/key/value/output projections (the LoRA paper's W_q, W_k, W_v, W_o)
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "key", "value", "attention.output.dense"),
    "roberta": ("query", "key", "value", "attention.output.dense"),
    "xlm-roberta": ("query", "key", "value", "attention.output.dense"),
    "electra": ("query", "key", "value", "attention.output.dense"),
    "deberta-v2": ("query_proj", "key_proj", "value_proj", "attention.output.dense"),
    "distilbert": ("q_lin", "k_lin", "v_lin", "out_lin"),
}
ATTENTION_PRESET = "attention"


def matches_target(name: str, target: str) -> bool:
    """Whether module path ``name`` ends with ``target`` at a dot boundary (peft's rule for a list of targets)."""
    return name == target or name.endswith("." + target)


def layer_of(name: str) -> int | None:
    """The first numbered part of a module path (``encoder.layer.3.attention.self.query`` -> 3), or None."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def linear_patterns(names: Sequence[str], limit: int = 12) -> str:
    """A short listing of linear names, layer numbers folded: 'encoder.layer.{i}.attention.self.query, ...'."""
    folded = (".".join("{i}" if part.isdigit() else part for part in n.split(".")) for n in names)
    patterns = list(dict.fromkeys(folded))
    more = f", ... ({len(patterns) - limit} more)" if len(patterns) > limit else ""
    return ", ".join(patterns[:limit]) + more


def resolve_targets(model_type: str, targets: Sequence[str] | None) -> tuple[str, ...]:
    """The LoRA target suffixes: ``targets`` as given, or for ``None`` / ``"attention"`` the model type's
    attention query/key/value/output projections (:data:`DEFAULT_TARGETS`)."""
    if isinstance(targets, str):
        targets = (targets,)
    if targets is not None and tuple(targets) != (ATTENTION_PRESET,):
        targets = tuple(targets)
        if not targets:
            raise ValueError(f"targets: expected a non-empty list, None or {ATTENTION_PRESET!r}, got []")
        return targets
    if model_type not in DEFAULT_TARGETS:
        raise ValueError(
            f"targets: no {ATTENTION_PRESET!r} preset for model_type {model_type!r} (known: "
            f"{', '.join(sorted(DEFAULT_TARGETS))}); pass the target module names explicitly"
        )
    return DEFAULT_TARGETS[model_type]
