"""What the quality matrix runs: the scales, the arms (methods, ablations, the single-task reference), the cells.

A *scale* is a budget: a CLI overlay ``configs/bench/<scale>.yaml`` (suite, steps, caps; parsed by the same
LightningCLI as every other config) for the multi-task suite, one ``<scale>_fewshot.yaml`` for the few-shot
setting, and the few runner settings below (seeds, the single-task case, how runs are isolated). An *arm*
is what a row of the tables is: a method config, or the spectral method with one Table 7 ablation on top.
A *cell* is one run: group × arm × tasks × seed, with the exact ``speclora`` arguments it runs with.

Groups of cells (and what they feed):

    main            every arm on the suite                          Tables 5, 6, 7; conflict; convergence
    single          ``single`` on each task of the suite            the reference of ITR and IC; one-task case
    one_task        ``speclora`` on one task alone                  single-task case (graph: intra + inter-layer)
    fewshot         every method arm on the few-shot tasks          few-shot table
    fewshot_single  ``single`` on each few-shot task                few-shot ITR / IC
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from speclora.data.sources import resolve_data_root
from speclora.tasks import get_task

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# The methods of the harness (DESIGN.md, "Methods in one harness"), one config each under configs/methods/.
METHOD_ARMS: tuple[str, ...] = ("independent", "shared", "unolora_star", "adalora", "ortho", "mtlora",
                                "hyperformer", "famo", "cagrad", "nash_mtl", "mtl_lora", "full_ft",
                                "speclora")
REFERENCE = "single"
SPECTRAL = "speclora"
# Baselines the spectral method is tested against (significance): the parameter-efficient ones. full_ft
# trains the whole encoder, a different budget: it is reported, as an upper reference, not a baseline.
BASELINES: tuple[str, ...] = ("independent", "shared", "unolora_star", "adalora", "ortho", "mtlora", "hyperformer",
                              "famo", "cagrad", "nash_mtl", "mtl_lora")
# Few-shot candidates: LM-BFF 16-shot GLUE and FewGLUE 32 SuperGLUE (SOURCES.md); LM-BFF seeds in order.
FEWSHOT_TASKS: tuple[str, ...] = ("mnli", "qqp", "qnli", "boolq", "record")
LMBFF_SEEDS: tuple[int, ...] = (13, 21, 42, 87, 100)

Group = Literal["main", "single", "one_task", "fewshot", "fewshot_single"]
GROUPS: tuple[str, ...] = ("main", "single", "one_task", "fewshot", "fewshot_single")


@dataclass(frozen=True)
class Scale:
    """A budget of the quality matrix.

    Args:
        name: ``smoke``, ``cpu`` or ``gpu``; the overlays are ``configs/bench/<name>{,_fewshot}.yaml``.
        seeds: default number of seeds (0 .. seeds-1).
        one_task: tasks of the single-task case (each: ``speclora`` alone vs ``single``).
        isolation: ``inline`` runs each cell in this process (no start-up cost; an exception fails the
            cell, not the matrix), ``process`` in a child process (a crash or OOM fails only the cell),
            ``pool`` in ``jobs`` long-lived child processes that run many cells each (a crash or OOM still
            fails only the cell; start-up paid once per worker: speclora.bench.quality_pool).
        jobs: cells run at once (``process`` and ``pool`` isolation).
        threads: torch CPU threads per run (None: torch's default).
        tiny_backbone: build the tiny random encoder under OUT/backbone and use it (smoke).
        conflict_batches: training batches the gradient-conflict measure reads.
        fewshot_arms: the method arms of the few-shot setting (None: every selected method).
        lr_grid: the learning rates each LoRA method is tried at before its seeds run (speclora.bench.quality_search);
            ``full_ft`` has its own grid (``ARM_LR_GRIDS``).
        search_seeds: seeds each rate of the search runs (its score the mean over them).
        lr_widen: rates the search may add past an end of an arm's grid when its best rate is at that end
            (speclora.bench.quality_search.widened; 0: the grid is fixed).
    """

    name: str
    seeds: int
    one_task: tuple[str, ...]
    isolation: Literal["inline", "process", "pool"]
    jobs: int = 1
    threads: int | None = None
    tiny_backbone: bool = False
    conflict_batches: int = 4
    fewshot_arms: tuple[str, ...] | None = None
    lr_grid: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    search_seeds: int = 1
    lr_widen: int = 2

    def overlay(self, configs: Path, fewshot: bool = False) -> Path:
        return configs / "bench" / f"{self.name}{'_fewshot' if fewshot else ''}.yaml"

    def backbone(self, out: Path, given: str | None = None) -> str:
        """The backbone the scale's runs train: ``given`` (``--backbone``), else the tiny random BERT built once
        under OUT/backbone (smoke), else ``default``."""
        if given is not None:
            return given
        return build_tiny_backbone(out / "backbone" / "tiny-bert") if self.tiny_backbone else "default"


SCALES: dict[str, Scale] = {
    # CI: a 2-layer, 32-wide random BERT, 20 steps per run; the whole matrix in a few minutes on 2 cores
    # (the learning-rate search on two rates: it checks the search, not which rate is best; not widened, as
    # one of two rates is always at an end)
    "smoke": Scale("smoke", seeds=2, one_task=("rte",), isolation="inline", threads=1,
                   tiny_backbone=True, lr_grid=(1e-3, 3e-3), lr_widen=0),
    # the default backbone on a 2-core CPU, one torch thread per run (two threads thrash on a shared machine),
    # two runs at once in separate processes (docs/results.md has the measured wall time)
    "cpu": Scale("cpu", seeds=3, one_task=("rte",), isolation="process", jobs=2, threads=1, conflict_batches=2,
                 fewshot_arms=("independent", "shared", "mtlora", "speclora")),
    # the full offline suite on one H100-class GPU, several runs at once (16 CPU cores) in a pool of long-lived
    # workers: imports, first backbone load and parsers paid once per worker, not once per run (docs/benchmarks.md)
    "gpu": Scale("gpu", seeds=3, one_task=("rte", "mrpc", "cola"), isolation="pool", jobs=6, threads=2),
}


def ablation_arms(configs: Path) -> tuple[str, ...]:
    """``speclora/<ablation>`` for every file of configs/methods/speclora_ablations/ (the paper's Table 7)."""
    folder = configs / "methods" / "speclora_ablations"
    return tuple(f"{SPECTRAL}/{p.stem}" for p in sorted(folder.glob("*.yaml")))


def variant_arms(configs: Path) -> tuple[str, ...]:
    """``speclora/<variant>`` for every configs/methods/speclora_<variant>.yaml: a setting of the spectral
    method layered on speclora.yaml (legacy, sparse, lobpcg, ...), run only when named in ``--methods``.
    Like an ablation it runs at the spectral method's rate and reports as a row of Table 7 (paired Δ)."""
    prefix = f"{SPECTRAL}_"
    return tuple(f"{SPECTRAL}/{p.stem[len(prefix):]}"
                 for p in sorted((configs / "methods").glob(f"{prefix}*.yaml")) if p.is_file())


def arm_configs(arm: str, configs: Path) -> list[Path]:
    """The method config files of an arm, in the order they are layered.

    ``speclora/<x>`` layers configs/methods/speclora_ablations/<x>.yaml (a Table 7 ablation) or, when no
    ablation has that name, configs/methods/speclora_<x>.yaml (a variant) on speclora.yaml.
    """
    method, _, extra = arm.partition("/")
    files = [configs / "methods" / f"{method}.yaml"]
    if extra:
        ablation = configs / "methods" / "speclora_ablations" / f"{extra}.yaml"
        variant = configs / "methods" / f"{method}_{extra}.yaml"
        if ablation.is_file() and variant.is_file():
            raise ValueError(f"--methods: arm {arm!r} is ambiguous: both {ablation} and {variant} exist")
        files.append(variant if variant.is_file() and not ablation.is_file() else ablation)
    for f in files:
        if not f.is_file():
            raise ValueError(f"--methods: arm {arm!r} has no config {f}")
    return files


def select_arms(spec: str, configs: Path) -> tuple[str, ...]:
    """``--methods``: a comma list of arm names and the keywords ``all`` (methods and ablations),
    ``methods`` (every method arm) and ``ablations`` (every ``speclora/<ablation>``). A variant
    ``speclora/<variant>`` (:func:`variant_arms`) runs only when named.

    Raises:
        ValueError: naming an unknown arm and what is allowed.
    """
    ablations = ablation_arms(configs)
    known = (*METHOD_ARMS, *ablations, *variant_arms(configs))
    out: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item == "all":
            picked = [*METHOD_ARMS, *ablations]
        elif item == "methods":
            picked = list(METHOD_ARMS)
        elif item == "ablations":
            picked = list(ablations)
        elif item in known:
            picked = [item]
        elif item == REFERENCE:
            picked = []  # always run: the reference of ITR and IC
        else:
            raise ValueError(f"--methods: unknown arm {item!r}; allowed: all, methods, ablations, "
                             + ", ".join(known))
        out += [a for a in picked if a not in out]
    if not out:
        raise ValueError(f"--methods={spec!r} selects no arm")
    return tuple(out)


def suite_tasks(overlay: Path) -> list[str]:
    """``data.tasks`` of a scale overlay (its registry names)."""
    data = yaml.safe_load(overlay.read_text()) or {}
    tasks = (data.get("data") or {}).get("tasks")
    if not tasks:
        raise ValueError(f"{overlay}: no data.tasks; a bench scale names its suite")
    return [get_task(t).name for t in tasks]


def scale_budget(overlay: Path) -> tuple[int, int]:
    """(max_steps, validations per run) of a scale overlay."""
    trainer = (yaml.safe_load(overlay.read_text()) or {}).get("trainer") or {}
    steps, every = trainer.get("max_steps"), trainer.get("val_check_interval")
    if not isinstance(steps, int) or not isinstance(every, int) or steps < 1 or every < 1:
        raise ValueError(f"{overlay}: trainer.max_steps and trainer.val_check_interval must be positive integers "
                         f"(a step count), got {steps!r} and {every!r}")
    return steps, max(1, steps // every)


def fewshot_subset(task: str, seed_index: int) -> str:
    """The published subset a run of seed index i trains on: LM-BFF seed i (mod 5), or FewGLUE (only one)."""
    subsets = get_task(task).subsets
    if "fewglue" in subsets:
        return "fewglue"
    return f"k-shot-{LMBFF_SEEDS[seed_index % len(LMBFF_SEEDS)]}"


def fewshot_availability(tasks: list[str], data_dir: str | None) -> dict[str, str | None]:
    """task -> None if its subset files and its official dev set(s) are in the data folder, else why not.

    Offline (shared/data) MNLI, QQP and ReCoRD have their subsets but not their official dev sets (SOURCES.md),
    so they cannot be tested on the full dev set there.
    """
    root = resolve_data_root(data_dir)
    out: dict[str, str | None] = {}
    for name in tasks:
        spec = get_task(name)
        if not spec.subsets:
            out[spec.name] = "the registry names no published few-shot subset for it"
            continue
        files = [spec.files[es.dev_split] for es in spec.eval_sets]
        files += [path for sub in spec.subsets.values() for path in sub.values()]
        missing = [f for f in files if not (root / f).is_file()]
        out[spec.name] = None if not missing else f"missing under {root}: {', '.join(missing)}"
    return out


def fmt_rate(lr: float) -> str:
    """A learning rate as written in run ids, commands and tables: 3e-4, 1e-3, 2.5e-5."""
    mantissa, exponent = f"{lr:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


@dataclass(frozen=True)
class Cell:
    """One run of the matrix: the ``speclora fit`` / ``speclora test`` arguments it shares, and what it is.

    ``lr``: the learning rate the runner chose or tries for the arm (``--model.optim.lr``, after the configs);
    None runs the configs' rate. ``steps``: a training budget other than the scale's (``speclora-bench
    budget``: ``--trainer.max_steps`` in ``args``); None runs the scale's.
    """

    group: str
    arm: str
    seed: int
    tasks: tuple[str, ...]
    args: tuple[str, ...] = field(compare=False)
    lr: float | None = None
    steps: int | None = None

    @property
    def run_id(self) -> str:
        where = self.tasks[0] if self.group in ("single", "one_task", "fewshot_single") else "suite"
        rate = "" if self.lr is None else f"__lr{fmt_rate(self.lr)}"
        budget = "" if self.steps is None else f"__steps{self.steps}"
        return f"{self.group}__{self.arm.replace('/', '-')}__{where}__seed{self.seed}{rate}{budget}"

    def to_json(self) -> dict:
        return {"group": self.group, "arm": self.arm, "seed": self.seed, "tasks": list(self.tasks),
                "args": list(self.args), "lr": self.lr, "steps": self.steps}

    @classmethod
    def from_json(cls, d: dict) -> Cell:
        return cls(d["group"], d["arm"], int(d["seed"]), tuple(d["tasks"]), tuple(d["args"]), d.get("lr"),
                   d.get("steps"))


@dataclass(frozen=True)
class CellFactory:
    """Builds cells with the full ``speclora`` argument list, the same layering for every cell.

    configs/default.yaml, the scale overlay, the arm's method config(s), then on the command line the
    cell's tasks, seed, backbone, data options and learning rate. Seed s sets ``seed_everything`` (data
    order, heads, dropout) and, for LoRA methods, ``model.lora.init_seed`` (the shared initial A); full_ft
    has no LoRA and refuses LoRA options. The rate replaces ``model.optim.lr`` (adapters and method modules;
    the heads keep ``model.optim.head_lr``).
    """

    configs: Path
    backbone: str
    data_dir: str | None = None
    cache_dir: str | None = None

    def cell(self, group: str, arm: str, seed: int, tasks: list[str], overlay: Path, lr: float | None = None,
             subset: dict[str, str] | None = None) -> Cell:
        out = ["--config", str(self.configs / "default.yaml"), "--config", str(overlay)]
        for f in arm_configs(arm, self.configs):
            out += ["--config", str(f)]
        out += ["--data.tasks", json.dumps(tasks), "--seed_everything", str(seed), "--model.backbone", self.backbone]
        if not arm.startswith("full_ft"):
            out += ["--model.lora.init_seed", str(seed)]
        if self.data_dir is not None:
            out += ["--data.data_dir", str(self.data_dir)]
        if self.cache_dir is not None:
            out += ["--data.cache_dir", str(self.cache_dir)]
        if subset:
            out += ["--data.subset", json.dumps(subset)]
        if lr is not None:
            out += ["--model.optim.lr", fmt_rate(lr)]
        return Cell(group, arm, seed, tuple(tasks), tuple(out), lr)


@dataclass(frozen=True)
class Plan:
    """The cells of a matrix, what was left out of it (and why), and the learning-rate search before it.

    ``search``: the cells of the learning-rate search (speclora.bench.quality_search); the seed-0 cells of
    ``cells`` at the chosen rates are the same runs (same run id), so they are not run twice.
    ``lr_choice``: arm -> what the search chose (``quality_search.Choice.to_json``).
    """

    cells: tuple[Cell, ...]
    suite: tuple[str, ...]
    fewshot_tasks: tuple[str, ...]
    skipped: dict[str, str]
    search: tuple[Cell, ...] = ()
    lr_choice: dict[str, dict] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"cells": [c.to_json() for c in self.cells], "suite": list(self.suite),
                "fewshot_tasks": list(self.fewshot_tasks), "skipped": dict(self.skipped),
                "search": [c.to_json() for c in self.search], "lr_choice": dict(self.lr_choice)}

    @classmethod
    def from_json(cls, d: dict) -> Plan:
        return cls(tuple(Cell.from_json(c) for c in d["cells"]), tuple(d["suite"]), tuple(d["fewshot_tasks"]),
                   dict(d["skipped"]), tuple(Cell.from_json(c) for c in d.get("search", [])),
                   dict(d.get("lr_choice", {})))


def plan_matrix(
    scale: Scale,
    arms: tuple[str, ...],
    seeds: int,
    configs: Path,
    backbone: str,
    data_dir: str | None = None,
    cache_dir: str | None = None,
    fewshot: bool = True,
    one_task: tuple[str, ...] | None = None,
    suite: list[str] | None = None,
    fewshot_tasks: list[str] | None = None,
    lrs: Mapping[str, float | None] | None = None,
    reference: bool = True,
) -> Plan:
    """Every cell of the matrix, each with the full ``speclora`` argument list it will run with (:class:`CellFactory`).

    ``suite`` and ``fewshot_tasks`` replace the overlays' task lists (fewer tasks for a quicker check).
    ``lrs``: arm (and ``single``) -> the learning rate its cells run at, in every group (the rate chosen on
    the main suite's validation split also runs the few-shot and one-task cells); an arm missing from it
    runs at its configs' rate. ``reference=False`` leaves out the ``single`` cells (no ITR, IC): a comparison
    between arms only.
    """
    if seeds < 1:
        raise ValueError(f"--seeds={seeds}; allowed: an integer >= 1")
    suite = [get_task(t).name for t in suite] if suite else suite_tasks(scale.overlay(configs))
    skipped: dict[str, str] = {}
    make = CellFactory(configs, backbone, data_dir, cache_dir)
    rate = dict(lrs or {})

    cells: list[Cell] = []
    main_overlay = scale.overlay(configs)
    for seed in range(seeds):
        for arm in arms:
            cells.append(make.cell("main", arm, seed, suite, main_overlay, rate.get(arm)))
        for task in suite if reference else ():
            cells.append(make.cell("single", REFERENCE, seed, [task], main_overlay, rate.get(REFERENCE)))
    one = scale.one_task if one_task is None else one_task
    if SPECTRAL in arms:
        for seed in range(seeds):
            for task in one:
                cells.append(make.cell("one_task", SPECTRAL, seed, [task], main_overlay, rate.get(SPECTRAL)))
    available: list[str] = []
    if fewshot:
        few_overlay = scale.overlay(configs, fewshot=True)
        wanted = [get_task(t).name for t in fewshot_tasks] if fewshot_tasks else suite_tasks(few_overlay)
        for task, why in fewshot_availability(wanted, data_dir).items():
            if why is None:
                available.append(task)
            else:
                skipped[f"fewshot/{task}"] = f"not run: its official dev set is not in the data folder ({why})"
        method_arms = [a for a in arms if "/" not in a and (scale.fewshot_arms is None or a in scale.fewshot_arms)]
        if len(available) < 2:
            skipped["fewshot"] = f"not run: fewer than two few-shot tasks are available ({available})"
        else:
            for seed in range(seeds):
                subset = {t: fewshot_subset(t, seed) for t in available}
                for arm in method_arms:
                    cells.append(make.cell("fewshot", arm, seed, available, few_overlay, rate.get(arm), subset))
                for task in available if reference else ():
                    cells.append(make.cell("fewshot_single", REFERENCE, seed, [task], few_overlay,
                                           rate.get(REFERENCE), {task: subset[task]}))
    return Plan(tuple(cells), tuple(suite), tuple(available), skipped)


def build_tiny_backbone(folder: Path) -> str:
    """A 2-layer, 32-wide random BERT with the packaged MiniLM tokenizer (as tests/conftest.py builds it).

    Built once: an existing folder holding a config is reused, so that a resumed matrix keeps its encoder.
    """
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from speclora.backbone import default_backbone_path

    if (folder / "config.json").is_file():
        return str(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(default_backbone_path()))
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    torch.random.set_rng_state(state)
    tok.save_pretrained(folder)
    return str(folder)
