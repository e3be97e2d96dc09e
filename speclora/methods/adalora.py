"""``adalora``: peft's AdaLoRA (Zhang et al., ICLR 2023), ONE adapter shared by every task, mixed batches.

Each targeted linear W gets the SVD-shaped update of AdaLoRA (paper eq. 3, peft ``SVDLinear``)::

    W x + (alpha / (r_init + 1e-5)) · P diag(λ) Q dropout(x),
    P = lora_B: (d_out, r_init),  λ = lora_E: (r_init, 1),  Q = lora_A: (r_init, d_in)

and the rank budget moves with peft's ``RankAllocator``: full budget r_init per matrix for ``tinit`` steps,
then a cubic decrease to ``target_r`` per matrix on average, masking the least important triplets (P_i, λ_i,
Q_i) every ``deltaT`` steps (importance: EMA sensitivity × uncertainty of |θ·∇θ|, paper eq. 6-8), and the
last ``tfinal`` steps fine-tune the final pattern. peft only does this when ``update_and_allocate(step)``
is called after every optimizer step; without it AdaLoRA silently trains as a plain rank-r_init LoRA. Here
the :meth:`AdaLoRA.after_optimizer_step` hook calls it, and ``total_step`` is the trainer's
``estimated_stepping_batches``, read in :meth:`AdaLoRA.on_fit_start` (it is unknown when the model is built).

peft's orthogonal regulariser is added to the loss inside ``AdaLoraModel.forward`` only when the wrapped
model returns a ``.loss``; our encoder returns hidden states, so :func:`orthogonal_penalty` recomputes it
exactly as peft does and :meth:`AdaLoRA.extra_losses` adds it.

peft allows a single trainable AdaLoRA adapter, so all tasks share it (the task heads stay per task).

Export (docs/methods.md, "adalora"): each ``out_dir/<task>`` holds peft's own ``save_pretrained`` of the
shared adapter (the same files in every task folder; ``PeftModel.from_pretrained(AutoModel..., folder)``
loads it, pruned triplets resized away by peft's ``rank_pattern``) plus the task's ``head.safetensors`` and
``speclora_task.json``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from speclora.backbone import resolve_backbone
from speclora.checks import check_int, is_int_in
from speclora.methods.base import Method
from speclora.model.adapted import AdaptedEncoder, BuildInputs

if TYPE_CHECKING:
    from peft import PeftModel

    from speclora.model.module import SpecLoRAModule

__all__ = ["ADAPTER_NAME", "AdaLoRA", "orthogonal_penalty", "resolve_steps"]

log = logging.getLogger(__name__)

ADAPTER_NAME = "default"  # peft's name of the single adapter
_UNSET_TOTAL = 1  # peft's config needs total_step > 0 before the trainer's budget is known


def orthogonal_penalty(factors: Iterable[tuple[str, Tensor]]) -> Tensor:
    """peft's AdaLoRA orthogonal regulariser: the mean over the adapter's factor matrices of

        R(Q) = ‖Q Qᵀ − I‖_F   for Q = lora_A: (r, d_in)      (rows of Q orthonormal)
        R(P) = ‖Pᵀ P − I‖_F   for P = lora_B: (d_out, r)     (columns of P orthonormal)

    ``factors``: (kind, tensor) pairs, kind ``"A"`` or ``"B"``. The AdaLoRA paper (eq. 4) squares the two
    norms; peft (``AdaLoraModel.forward``, v0.21) does not and averages over matrices; this is peft's form.
    Returns a 0-d tensor (0 for no factor).
    """
    total: Tensor | None = None
    count = 0
    for kind, p in factors:
        if kind not in ("A", "B"):
            raise ValueError(f"orthogonal_penalty: kind must be 'A' or 'B', got {kind!r}")
        gram = p @ p.T if kind == "A" else p.T @ p  # (r, r)
        eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)  # (r, r)
        term = torch.linalg.matrix_norm(gram - eye)  # ‖·‖_F, not squared (peft)
        total = term if total is None else total + term
        count += 1
    if total is None:
        return torch.zeros(())
    return total / count


def resolve_steps(value: int | float, total: int, key: str) -> int:
    """A phase length: an int counts optimizer steps; a float in [0, 1) is a share of ``total`` (floored)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"model.method.init_args.{key}={value!r}; allowed: an int >= 0 (steps) or a float in [0, 1)"
        )
    if isinstance(value, float):
        if not 0.0 <= value < 1.0:
            raise ValueError(
                f"model.method.init_args.{key}={value}; a float is a share of the run, "
                f"allowed: 0 <= {key} < 1 "
                "(give an int to count steps)"
            )
        return int(math.floor(value * total))
    if value < 0:
        raise ValueError(
            f"model.method.init_args.{key}={value}; allowed: an int >= 0 (steps) or a float in [0, 1)"
        )
    return value


class AdaLoRA(Method):
    """peft's AdaLoRA, one adapter shared by all tasks, rank budget reallocated after every optimizer step.

    Args:
        init_r: initial rank of every adapted matrix (peft ``init_r``); null: ceil(1.5 · target_r), the
            ratio of peft's defaults (init_r 12, target_r 8).
        target_r: final average rank per matrix (peft ``target_r``); null: ``model.lora.r``, so that the
            final budget matches the LoRA methods'.
        tinit: initial phase at full budget (peft ``tinit``): an int counts steps, a float in [0, 1) is a
            share of ``total_step`` (the trainer's ``estimated_stepping_batches``).
        tfinal: final phase at the frozen rank pattern (peft ``tfinal``), as ``tinit``.
        deltaT: steps between two reallocations during the budget decrease (peft ``deltaT``).
        beta1: EMA factor of the sensitivity (paper eq. 7; peft ``beta1``).
        beta2: EMA factor of the uncertainty (paper eq. 8; peft ``beta2``).
        orth_reg_weight: weight γ of the orthogonal regulariser (peft ``orth_reg_weight``; 0 turns it off).

    The adapter's scale ``alpha``, dropout, target modules and init seed come from ``model.lora``
    (``lora.r`` is only the default of ``target_r``).
    """

    name: ClassVar[str] = "adalora"
    one_adapter = True

    def __init__(
        self,
        init_r: int | None = None,
        target_r: int | None = None,
        tinit: int | float = 0.1,
        tfinal: int | float = 0.2,
        deltaT: int = 10,  # noqa: N803 - peft's name
        beta1: float = 0.85,
        beta2: float = 0.85,
        orth_reg_weight: float = 0.5,
    ) -> None:
        for key, value in (("init_r", init_r), ("target_r", target_r)):
            if value is not None and not is_int_in(value, 1):
                raise ValueError(f"model.method.init_args.{key}={value!r}; allowed: null or an integer >= 1")
        if init_r is not None and target_r is not None and target_r > init_r:
            raise ValueError(
                f"model.method.init_args.target_r={target_r} > init_r={init_r}; AdaLoRA only prunes ranks, "
                "allowed: target_r <= init_r"
            )
        resolve_steps(tinit, 1, "tinit")  # type and range checks; the steps are resolved at fit start
        resolve_steps(tfinal, 1, "tfinal")
        check_int("model.method.init_args.deltaT", deltaT)
        for key, value in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 < value < 1.0:
                raise ValueError(f"model.method.init_args.{key}={value}; allowed: 0 < {key} < 1")
        if not orth_reg_weight >= 0:
            raise ValueError(
                f"model.method.init_args.orth_reg_weight={orth_reg_weight}; allowed: a number >= 0"
            )
        self.init_r = init_r
        self.target_r = target_r
        self.tinit = tinit
        self.tfinal = tfinal
        self.deltaT = deltaT
        self.beta1 = beta1
        self.beta2 = beta2
        self.orth_reg_weight = orth_reg_weight
        self._peft: PeftModel | None = None  # built in build(); holds module.encoder, not registered in it
        self._scheduled = False  # total_step known (on_fit_start or set_total_step)

    # ------------------------------------------------------------------ construction
    def ranks(self, lora_r: int) -> tuple[int, int]:
        """(init_r, target_r) given ``model.lora.r``."""
        target_r = self.target_r if self.target_r is not None else lora_r
        init_r = self.init_r if self.init_r is not None else math.ceil(1.5 * target_r)
        if target_r > init_r:
            raise ValueError(
                f"model.method.init_args.init_r={init_r} < target_r={target_r} (target_r defaults to "
                "model.lora.r); allowed: target_r <= init_r"
            )
        return init_r, target_r

    def build(self, inputs: BuildInputs) -> AdaptedEncoder:
        """Wrap ``inputs.encoder`` in place with peft's AdaLoRA layers (no ``inject_lora``, no router)."""
        from peft import AdaLoraConfig, get_peft_model

        cfg = inputs.lora
        init_r, target_r = self.ranks(cfg.r)
        config = AdaLoraConfig(
            init_r=init_r,
            target_r=target_r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=list(inputs.targets),
            tinit=0,
            tfinal=0,
            deltaT=self.deltaT,
            beta1=self.beta1,
            beta2=self.beta2,
            orth_reg_weight=self.orth_reg_weight,
            total_step=_UNSET_TOTAL,
            base_model_name_or_path=resolve_backbone(inputs.backbone),
        )
        with torch.random.fork_rng(devices=[]):  # peft draws A, E, B from the global RNG: pin it to init_seed
            torch.manual_seed(cfg.init_seed)
            self._peft = get_peft_model(inputs.encoder, config, adapter_name=ADAPTER_NAME)
        self._scheduled = False
        return AdaptedEncoder(self, inputs)

    @property
    def peft_model(self) -> PeftModel:
        if self._peft is None:
            raise RuntimeError("AdaLoRA.build has not run: build the SpecLoRAModule with this method first")
        return self._peft

    @property
    def config(self) -> Any:
        """The live ``AdaLoraConfig`` (shared with peft's RankAllocator)."""
        return self.peft_model.peft_config[ADAPTER_NAME]

    def kept_ranks(self) -> dict[str, int]:
        """Per adapted matrix (module path in the encoder), the triplets the allocator keeps: the True entries
        of peft's ``rank_pattern`` once it has masked, else all ``init_r``."""
        pattern = self.config.rank_pattern
        if pattern:
            return {
                k.removesuffix(f".{ADAPTER_NAME}").removesuffix(".lora_E"): int(sum(v))
                for k, v in pattern.items()
            }
        suffix = f".lora_E.{ADAPTER_NAME}"
        encoder = self.peft_model.base_model.model
        return {
            n.removesuffix(suffix): self.config.init_r
            for n, _ in encoder.named_parameters()
            if n.endswith(suffix)
        }

    # ------------------------------------------------------------------ the schedule
    def set_total_step(self, total_step: int) -> None:
        """Fix peft's ``total_step`` and resolve ``tinit`` / ``tfinal`` against it (peft's own check)."""
        if total_step < 1:
            raise ValueError(f"AdaLoRA: total_step={total_step}; allowed: an integer >= 1")
        tinit = resolve_steps(self.tinit, total_step, "tinit")
        tfinal = resolve_steps(self.tfinal, total_step, "tfinal")
        if tinit >= total_step - tfinal:
            raise ValueError(
                f"model.method.init_args.tinit={self.tinit} ({tinit} steps) and tfinal={self.tfinal} "
                f"({tfinal} steps) leave no budgeting phase in a run of {total_step} optimizer steps; "
                "allowed: tinit < total_step - tfinal"
            )
        config = self.config
        config.total_step, config.tinit, config.tfinal = total_step, tinit, tfinal
        allocator = self.peft_model.base_model.rankallocator
        if (
            allocator.peft_config is not config
        ):  # peft shares the config object; a copy would keep _UNSET_TOTAL
            allocator.peft_config = config
        self._scheduled = True
        rank_zero_info(
            f"AdaLoRA schedule: {total_step} steps; full budget (r={config.init_r}) until step {tinit}, cubic "
            f"decrease to target_r={config.target_r} by step {total_step - tfinal}, reallocating every "
            f"{config.deltaT} steps"
        )

    def on_fit_start(self, module: SpecLoRAModule) -> None:
        """total_step = the trainer's ``estimated_stepping_batches`` (max_steps, or epochs × batches / accum.)."""
        total = module.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError(
                "model.method=AdaLoRA needs a finite number of optimizer steps for its rank schedule; "
                "set trainer.max_steps (or trainer.max_epochs)"
            )
        self.set_total_step(int(total))

    def after_optimizer_step(self, module: SpecLoRAModule) -> None:
        """peft's ``update_and_allocate(step)``, step = optimizer steps done, this one included (1 after the
        first), so that the last step of a run with tfinal = 0 reaches total_step and the final allocation."""
        if not self._scheduled:
            raise RuntimeError(
                "AdaLoRA: total_step is unset; the module's on_fit_start sets it (or call set_total_step)"
            )
        if module.last_step_skipped:  # the module dropped a non-finite step: no sensitivity to read
            rank_zero_warn(f"AdaLoRA: no gradients at step {module.global_step + 1}; rank allocation skipped")
            return
        step, config = int(module.global_step) + 1, self.config  # global_step does not count this step yet
        tuner, final = self.peft_model.base_model, config.total_step - config.tfinal
        if step > final and not config.rank_pattern:
            # resumed in the final phase: the pattern is not in the checkpoint, but masked triplets have λ = 0
            config.rank_pattern = {
                n: (p != 0).view(-1).tolist()
                for n, p in module.encoder.named_parameters()
                if n.endswith(f"lora_E.{ADAPTER_NAME}")
            }
        elif step >= final and not tuner.rankallocator.exp_avg_ipt and not config.rank_pattern:
            # a run too short to score importance before its final allocation (fast_dev_run): peft would fail
            rank_zero_warn(
                f"AdaLoRA: no importance scores before the final allocation at step {step} of "
                f"{config.total_step}; the ranks stay unpruned"
            )
            return
        tuner.update_and_allocate(step)

    # ------------------------------------------------------------------ a training step
    def extra_losses(
        self, module: SpecLoRAModule, batch: dict[str, Tensor], outputs: dict
    ) -> dict[str, Tensor]:
        """γ · :func:`orthogonal_penalty` over the adapter's lora_A / lora_B (peft adds it only with a model
        loss); also logs ``train/adalora_rank``, the mean number of triplets kept per matrix."""
        ranks = self.kept_ranks()
        module.log("train/adalora_rank", sum(ranks.values()) / max(1, len(ranks)), batch_size=1)
        if self.orth_reg_weight == 0:
            return {}
        return {"adalora_orth": self.orth_reg_weight * orthogonal_penalty(self._factors(module))}

    @staticmethod
    def _factors(module: SpecLoRAModule) -> list[tuple[str, Tensor]]:
        # peft's selection in AdaLoraModel.forward: "lora_A" / "lora_B" parameters of the trainable adapter
        out = []
        for n, p in module.encoder.named_parameters():
            if ADAPTER_NAME in n and ("lora_A" in n or "lora_B" in n):
                out.append(("A" if "lora_A" in n else "B", p))
        return out

    # ------------------------------------------------------------------ export
    def export(self, module: SpecLoRAModule, out_dir: Path) -> list[Path]:
        """peft's ``save_pretrained`` of the shared adapter in every ``out_dir/<task>``, plus the task head."""
        written = []
        for t, spec in enumerate(module.specs):
            folder = Path(out_dir) / spec.name
            self.peft_model.save_pretrained(str(folder))
            module.write_task_head(t, folder)
            written.append(folder)
        return written

    def load(self, module: SpecLoRAModule, in_dir: Path) -> None:
        """Load what :meth:`export` wrote: the shared adapter (pruned triplets back at their rank index, with
        λ = 0) and every task's head. Raises ``ValueError`` naming the file when the folder does not fit."""
        from peft.utils.save_and_load import load_peft_weights

        in_dir = Path(in_dir)
        config = self.config
        folders = [in_dir / spec.name for spec in module.specs]
        for folder in folders:
            if not (folder / "adapter_config.json").is_file():
                raise ValueError(
                    f"in_dir: {folder / 'adapter_config.json'} not found; expected AdaLoRA.export's folders"
                )
        saved = json.loads((folders[0] / "adapter_config.json").read_text())
        for key, want in (
            ("peft_type", "ADALORA"),
            ("init_r", config.init_r),
            ("lora_alpha", config.lora_alpha),
            ("target_modules", sorted(config.target_modules)),
        ):
            got = sorted(saved.get(key) or []) if key == "target_modules" else saved.get(key)
            if got != want:
                raise ValueError(
                    f"{folders[0] / 'adapter_config.json'}: {key} = {got!r}, but the module has {want!r}"
                )
        weights = load_peft_weights(str(folders[0]), device="cpu")
        pattern: dict[str, list[bool]] = saved.get("rank_pattern") or {}
        params = dict(module.encoder.named_parameters())
        with torch.no_grad():
            for key, value in weights.items():
                stem, kind = key.removeprefix("base_model.model.").rsplit(".", 1)  # "...query", "lora_A"
                param = params.get(f"{stem}.{kind}.{ADAPTER_NAME}")
                if param is None:
                    raise ValueError(f"{folders[0]}: key {key!r} matches no AdaLoRA parameter of the module")
                keep = pattern.get(f"{stem}.lora_E")
                index = (
                    torch.arange(config.init_r) if keep is None else torch.tensor(keep).nonzero().squeeze(1)
                )
                if kind == "lora_E":
                    param.zero_()
                if kind == "lora_B":
                    param[:, index] = value.to(param.dtype)  # (d_out, kept)
                else:
                    param[index] = value.to(param.dtype)  # (kept, d_in) | (kept, 1)
        if pattern:
            config.rank_pattern = pattern
        for t, folder in enumerate(folders):
            module.heads.load_head(t, folder)
