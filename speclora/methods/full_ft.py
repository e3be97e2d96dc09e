"""``full_ft``: full fine-tuning, single- or multi-task: every encoder weight trained, no LoRA layers.

The upper references of UnoLoRA's Table 1 (seeds/unolora.txt, "Baselines": "Single-Task Fine-Tuning ...
updating all parameters" and "Multi-Task Fine-Tuning: simultaneous fine-tuning ... on all tasks"): one
encoder shared by all tasks, per-task heads, the loss Σ_t λ_t L_t of the module. The module's optimiser
puts the whole encoder in its "adapters" group at ``model.optim.lr`` (configs/methods/full_ft.yaml lowers it).

Export format (docs/methods.md, "full_ft")::

    out_dir/encoder/              encoder.save_pretrained (+ the backbone's tokenizer): AutoModel-loadable
    out_dir/<task>/head.safetensors, speclora_task.json   the task's head and metadata, as for LoRA methods
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from speclora.backbone import resolve_backbone
from speclora.methods.base import Method
from speclora.model.adapted import AdaptedEncoder, BuildInputs

if TYPE_CHECKING:
    from speclora.model.module import SpecLoRAModule

__all__ = ["ENCODER_DIR", "FullFT"]

ENCODER_DIR = "encoder"


class FullFT(Method):
    """Full fine-tuning of the encoder with per-task heads; any number of tasks (one: single-task FT).

    It has no LoRA layers, so it refuses ``model.lora`` values other than the defaults (they would do
    nothing) and writes its own export (module docstring).
    """

    name: ClassVar[str] = "full_ft"

    # ------------------------------------------------------------------ construction
    def num_adapters(self, num_tasks: int) -> int:
        return 0

    def build(self, inputs: BuildInputs) -> AdaptedEncoder:
        """No LoRA layers (no router, no slots); every encoder parameter trainable."""
        defaults = asdict(type(inputs.lora)())
        changed = {k: v for k, v in asdict(inputs.lora).items() if v != defaults[k]}
        if changed:
            given = ", ".join(f"model.lora.{k}={v!r}" for k, v in changed.items())
            raise ValueError(
                f"{given}: model.method=FullFT has no LoRA layers, so LoRA options would do nothing; "
                f"leave model.lora at its defaults ({defaults})"
            )
        for p in inputs.encoder.parameters():
            p.requires_grad_(True)
        return AdaptedEncoder(self, inputs)

    def adapter_of_task(self, task_index: int) -> int:
        raise ValueError(
            "model.method=FullFT holds no LoRA adapters; export_adapters writes the whole encoder and the heads"
        )

    # ------------------------------------------------------------------ export
    def export(self, module: SpecLoRAModule, out_dir: Path) -> list[Path]:
        """Write the encoder once (``out_dir/encoder``) and each task's head under ``out_dir/<task>``.

        Returns the task folders, in task order, as LoRA methods do; each one's ``speclora_task.json``
        names the encoder folder.
        """
        from transformers import AutoTokenizer

        out_dir = Path(out_dir)
        encoder_dir = out_dir / ENCODER_DIR
        module.encoder.save_pretrained(encoder_dir)
        AutoTokenizer.from_pretrained(resolve_backbone(module.backbone_name)).save_pretrained(encoder_dir)
        written = []
        for t, spec in enumerate(module.specs):
            folder = out_dir / spec.name
            module.write_task_head(t, folder, encoder=f"../{ENCODER_DIR}")
            written.append(folder)
        return written

    def load(self, module: SpecLoRAModule, in_dir: Path) -> None:
        """Load what :meth:`export` wrote: the encoder weights and each task's head."""
        from transformers import AutoModel

        in_dir = Path(in_dir)
        encoder_dir = in_dir / ENCODER_DIR
        if not (encoder_dir / "config.json").is_file():
            raise FileNotFoundError(f"no exported FullFT encoder at {encoder_dir} (expected config.json there)")
        state = AutoModel.from_pretrained(encoder_dir).state_dict()
        module.encoder.load_state_dict(state, strict=True)
        for t, spec in enumerate(module.specs):
            module.heads.load_head(t, in_dir / spec.name)
