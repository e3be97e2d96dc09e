"""The LightningDataModule that reads, splits, tokenises and mixes GLUE and SuperGLUE tasks.

Splits (test labels are not public, so the labelled test split is carved out of what is public):

``split_rule="unolora"`` (UnoLoRA §4, after Zhang et al. 2020)
    tasks with fewer than 10k training records split the official dev set in half (by record, seeded
    with ``split_seed``) into validation and test; larger tasks hold out 1k training records as
    validation and use the official dev set as test.
``split_rule="dev"``
    validation and test are both the official dev set (what most papers report).

The official (unlabelled) test files are the ``predict`` split, for leaderboard submissions, with the
diagnostics (GLUE AX, SuperGLUE AX-b/AX-g) that an entailment task of the run predicts; or, after
:meth:`MultiTaskDataModule.predict_examples`, new inputs of one task.
Training batches mix tasks with :class:`~speclora.data.mixture.MixtureBatchSampler`; every row carries
its task index. Evaluation runs one dataloader per evaluated entry (MNLI has two), each batch naming
its entry.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from speclora.backbone import resolve_backbone
from speclora.data.loaders import EntryCollator, MixedTrain, ResumableLoader, ShardSampler, TaskPart
from speclora.data.mixture import MixtureBatchSampler, mixing_probabilities
from speclora.data.predict_inputs import PREDICT_DIAGNOSTICS, PredictInputs, read_predict_diagnostic
from speclora.data.sources import read_hub_split, read_split, resolve_data_root
from speclora.data.tokenized import (
    MultiTaskCollator,
    TokenizedSplit,
    cache_key,
    file_fingerprint,
    load_or_tokenize,
    tokenizer_fingerprint,
)
from speclora.tasks import DEFAULT_SUITE, Example, TaskSpec, get_task, resolve_tasks
from speclora.tasks.registry import LARGE_TASK_HOLDOUT

log = logging.getLogger(__name__)

Stage = Literal["train", "validation", "test", "predict"]

class MultiTaskDataModule(PredictInputs, L.LightningDataModule):
    """GLUE + SuperGLUE tasks, tokenised once, mixed into batches of several tasks.

    Args:
        tasks: task names (see ``speclora.tasks.TASKS``; benchmark spellings such as ``SST-2`` work).
        data_dir: folder holding ``glue/`` and ``superglue/`` as in the official downloads; default
            the environment variable ``SPECLORA_DATA``.
        source: ``local`` reads the official files; ``hub`` loads the HF hub datasets (needs network
            and ``pip install datasets``).
        tokenizer: tokenizer name or folder; ``default`` is the packaged all-MiniLM-L6-v2. The CLI
            links it to ``model.backbone``.
        max_length: tokens per sequence after truncation (pairs: longest first).
        batch_size: examples per training batch on each device.
        eval_batch_size: examples per evaluation batch.
        mixing: ``proportional`` (p ∝ n_t), ``temperature`` (p ∝ n_t^{1/T}) or ``equal``.
        temperature: T of temperature mixing (UnoLoRA §4 uses 10).
        samples_per_epoch: training samples per epoch over all devices; default the summed train sizes.
        max_train_per_task: cap on training examples per task (a seeded random subset), for quick runs.
        max_eval_per_task: cap on validation/test examples per entry.
        split_rule: ``unolora`` or ``dev`` (module docstring).
        split_seed: seed of the validation/test carving; independent of the training seed.
        subset: train on a published few-shot subset (``k-shot-13``, ``fewglue``: see the registry);
            its ``dev`` file is the validation split and the full official dev set the test split.
            A mapping ``{task: subset}`` names one per task (``{qnli: k-shot-13, boolq: fewglue}``: LM-BFF
            and FewGLUE in one run); tasks it leaves out train on their full data.
        cache_dir: where tokenised splits are cached; default ``$SPECLORA_CACHE`` or
            ``~/.cache/speclora``; ``none`` disables the cache.
        padding: ``dynamic`` (to the longest sequence of the batch) or ``max_length``.
        group_by_length: batches of similar lengths (less padding): the mixed stream is sorted by length
            inside windows of this many batches, which are then shuffled; the tasks' frequencies are those of
            ``mixing`` (every window keeps its samples). null keeps the stream's order.
        pad_to_multiple_of: round dynamic padding up to a multiple (8 suits GPU tensor cores).
        num_workers: DataLoader worker processes.
        seed: seed of the mixing sampler (the run's seed).
    """

    def __init__(
        self,
        tasks: list[str] = DEFAULT_SUITE,  # noqa: B006 - jsonargparse needs a literal default
        data_dir: str | None = None,
        source: Literal["local", "hub"] = "local",
        tokenizer: str = "default",
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        mixing: Literal["proportional", "temperature", "equal"] = "temperature",
        temperature: float = 10.0,
        samples_per_epoch: int | None = None,
        max_train_per_task: int | None = None,
        max_eval_per_task: int | None = None,
        split_rule: Literal["unolora", "dev"] = "unolora",
        split_seed: int = 42,
        subset: str | dict[str, str] | None = None,
        cache_dir: str | None = None,
        padding: Literal["dynamic", "max_length"] = "dynamic",
        pad_to_multiple_of: int | None = None,
        group_by_length: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.specs: list[TaskSpec] = resolve_tasks(tasks)
        self.tasks = [s.name for s in self.specs]
        for key, value, low in (("max_length", max_length, 8), ("batch_size", batch_size, 1),
                                ("eval_batch_size", eval_batch_size, 1), ("num_workers", num_workers, 0)):
            if value < low:
                raise ValueError(f"data.{key}={value}; allowed: an integer >= {low}")
        for key, value in (("max_train_per_task", max_train_per_task), ("max_eval_per_task", max_eval_per_task),
                           ("samples_per_epoch", samples_per_epoch), ("group_by_length", group_by_length)):
            if value is not None and value < 1:
                raise ValueError(f"data.{key}={value}; allowed: null or an integer >= 1")
        if split_rule not in ("unolora", "dev"):
            raise ValueError(f"data.split_rule={split_rule!r}; allowed: 'unolora', 'dev'")
        if source not in ("local", "hub"):
            raise ValueError(f"data.source={source!r}; allowed: 'local', 'hub'")
        self.subsets: dict[str, str] = self._subset_per_task(subset)
        mixing_probabilities([1] * len(self.specs), mixing, temperature)  # validates mixing/temperature
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.source = source
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.mixing = mixing
        self.temperature = temperature
        self.samples_per_epoch = samples_per_epoch
        self.max_train = max_train_per_task
        self.max_eval = max_eval_per_task
        self.split_rule = split_rule
        self.split_seed = split_seed
        self.subset = subset
        self.cache_dir = cache_dir
        self.padding = padding
        self.pad_to_multiple_of = pad_to_multiple_of
        self.group_by_length = group_by_length
        self.num_workers = num_workers
        self.seed = seed
        self._tokenizer = None
        self._parts: dict[Stage, list[tuple[str, TaskPart]]] = {}
        self._train_sampler: MixtureBatchSampler | None = None
        self._predict_inputs: tuple[str, list[Example]] | None = None
        self.predict_skipped: dict[str, str] = {}  # predict entry -> why it has no dataloader

    # ------------------------------------------------------------------ building blocks
    def _subset_per_task(self, subset: str | dict[str, str] | None) -> dict[str, str]:
        """``data.subset`` as task name -> subset name (every task for a string), checked against the registry."""
        if subset is None:
            return {}
        if isinstance(subset, str):
            wanted = {s.name: subset for s in self.specs}
        else:
            wanted = {}
            for key, value in dict(subset).items():
                name = get_task(key).name
                if name not in self.tasks:
                    raise ValueError(f"data.subset names task {key!r}, which is not in data.tasks {self.tasks}")
                wanted[name] = value
        missing = [t for t, sub in wanted.items() if sub not in get_task(t).subsets]
        if missing:
            raise ValueError(f"data.subset={subset!r} does not exist for {missing}; tasks with subsets: "
                             + ", ".join(f"{s.name} {sorted(s.subsets)}" for s in self.specs if s.subsets))
        return wanted

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(resolve_backbone(self.tokenizer_name))
        return self._tokenizer

    def _cache_path(self) -> Path | None:
        value = self.cache_dir or os.environ.get("SPECLORA_CACHE") or str(Path.home() / ".cache" / "speclora")
        return None if value.lower() == "none" else Path(value).expanduser()

    def _tokenized(self, spec: TaskSpec, split: str, subset: str | None = None) -> TokenizedSplit:
        """One official file split (or subset file), tokenised through the cache."""
        tokenizer = self.tokenizer
        if self.source == "hub":
            source_fp = f"hub:{spec.name}:{split}"

            def build():
                return read_hub_split(spec, split)
        else:
            root = resolve_data_root(self.data_dir)
            rel = spec.subsets[subset][split] if subset is not None else spec.files.get(split, "")
            source_fp = file_fingerprint(root / rel) if (root / rel).is_file() else f"missing:{rel}"

            def build():
                return read_split(spec, split, root, subset=subset)

        name = f"{split}@{subset}" if subset else split
        key = cache_key(tokenizer_fingerprint(tokenizer), spec.name, name, self.max_length, source_fp)
        return load_or_tokenize(self._cache_path(), key, build, tokenizer, self.max_length)

    def _carve(self, split: TokenizedSplit, generator: torch.Generator, take: int | None,
               halves: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Split a file split by record (a MultiRC passage stays whole) into (held, rest) example rows.

        halves=True: the first half of the shuffled records is ``held``; else ``take`` records are.
        """
        records = split.records  # (E,)
        unique = torch.unique(records)  # (R,)
        order = unique[torch.randperm(len(unique), generator=generator)]  # (R,)
        n_held = len(unique) // 2 if halves else min(take or 0, len(unique) - 1)
        held_mask = torch.isin(records, order[:n_held])  # (E,)
        rows = torch.arange(len(records))
        return rows[held_mask], rows[~held_mask]

    def _cap(self, rows: torch.Tensor, cap: int | None, salt: int) -> torch.Tensor:
        if cap is None or len(rows) <= cap:
            return rows
        g = torch.Generator().manual_seed(self.split_seed * 1_000_003 + salt)
        return rows[torch.randperm(len(rows), generator=g)[:cap]].sort().values

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Tokenise (and cache) every split the run needs, once per machine."""
        if self.trainer is not None and self.trainer.state.fn == "predict":
            return  # predict reads only the test files (and diagnostics), in setup("predict")
        for spec in self.specs:
            for split in self._file_splits(spec):
                self._tokenized(spec, *split)

    def _file_splits(self, spec: TaskSpec) -> list[tuple[str, str | None]]:
        out: list[tuple[str, str | None]] = []
        subset = self.subsets.get(spec.name)
        if subset is not None:
            out += [("train", subset), ("dev", subset)]
        else:
            out.append(("train", None))
        out += [(es.dev_split, None) for es in spec.eval_sets]
        return out

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", "validate", "test", None) and "train" not in self._parts:
            self._build_labelled()
        if stage in ("predict",) and "predict" not in self._parts:
            self._build_predict()

    def _build_labelled(self) -> None:
        train, val, test = [], [], []
        for ti, spec in enumerate(self.specs):
            g = torch.Generator().manual_seed(self.split_seed * 7919 + ti)
            dev_splits = [(name, self._tokenized(spec, es.dev_split))
                          for name, es in zip(spec.eval_names, spec.eval_sets)]
            subset = self.subsets.get(spec.name)
            if subset is not None:
                tr = self._tokenized(spec, "train", subset)
                dv = self._tokenized(spec, "dev", subset)
                train_part = TaskPart(tr, torch.arange(len(tr)), ti)
                val.append((spec.name, TaskPart(dv, self._cap(torch.arange(len(dv)), self.max_eval, ti), ti)))
                test += [(n, TaskPart(d, self._cap(torch.arange(len(d)), self.max_eval, ti), ti)) for n, d in dev_splits]
            else:
                tr = self._tokenized(spec, "train")
                rows = torch.arange(len(tr))
                if self.split_rule == "dev":
                    for n, d in dev_splits:
                        all_rows = self._cap(torch.arange(len(d)), self.max_eval, ti)
                        val.append((n, TaskPart(d, all_rows, ti)))
                        test.append((n, TaskPart(d, all_rows, ti)))
                elif spec.is_small:
                    for n, d in dev_splits:
                        held, rest = self._carve(d, g, None, halves=True)
                        val.append((n, TaskPart(d, self._cap(held, self.max_eval, ti), ti)))
                        test.append((n, TaskPart(d, self._cap(rest, self.max_eval, ti), ti)))
                else:
                    held, rows = self._carve(tr, g, LARGE_TASK_HOLDOUT, halves=False)
                    val.append((spec.name, TaskPart(tr, self._cap(held, self.max_eval, ti), ti)))
                    test += [(n, TaskPart(d, self._cap(torch.arange(len(d)), self.max_eval, ti), ti))
                             for n, d in dev_splits]
                train_part = TaskPart(tr, self._cap(rows, self.max_train, 10_000 + ti), ti)
            if len(train_part) == 0:
                raise ValueError(f"task {spec.name!r} has no training examples after the split")
            train.append((spec.name, train_part))
        self._parts.update(train=train, validation=val, test=test)
        sizes = self.train_sizes
        log.info("train examples per task: %s", dict(zip(self.tasks, sizes)))

    # ------------------------------------------------------------------ what the rest of the run reads
    @property
    def train_sizes(self) -> list[int]:
        """Training examples per task, in task order (after caps)."""
        return [len(p) for _, p in self._parts["train"]]

    def mixing_weights(self) -> torch.Tensor:
        return mixing_probabilities(self.train_sizes, self.mixing, self.temperature)

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        if trainer.world_size > 1 and trainer._accelerator_connector.use_distributed_sampler:
            raise ValueError(
                "trainer.use_distributed_sampler=true would re-shard speclora's task-mixing sampler; "
                "set --trainer.use_distributed_sampler=false (the speclora CLI does by default)"
            )
        return trainer.global_rank, trainer.world_size

    def _pin_memory(self) -> bool:
        """Page-locked batches when training on a CUDA device: their copy to the device does not block."""
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def _collator(self) -> MultiTaskCollator:
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return MultiTaskCollator(pad_id, self.padding, self.max_length, self.pad_to_multiple_of)

    def train_dataloader(self) -> ResumableLoader:
        rank, world = self._rank_world()
        sampler = MixtureBatchSampler(
            self.train_sizes,
            self.batch_size,
            strategy=self.mixing,
            temperature=self.temperature,
            samples_per_epoch=self.samples_per_epoch,
            seed=self.seed,
            rank=rank,
            world_size=world,
            lengths=[p.lengths() for _, p in self._parts["train"]] if self.group_by_length else None,
            length_window=self.group_by_length,
        )
        self._train_sampler = sampler
        loader = ResumableLoader(
            MixedTrain([p for _, p in self._parts["train"]]),
            batch_sampler=sampler,
            collate_fn=self._collator(),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self._pin_memory(),
            # its own generator: creating the iterator must not draw from the global RNG (exact resume)
            generator=torch.Generator().manual_seed(self.seed),
        )
        trainer = self.trainer
        if trainer is not None:
            loader.consumed_fn = lambda: trainer.fit_loop.epoch_loop.batch_progress.current.processed
            loader.epoch_fn = lambda: trainer.current_epoch
        return loader

    def _eval_loaders(self, stage: Stage) -> list[DataLoader]:
        rank, world = self._rank_world()
        collate = self._collator()
        return [
            DataLoader(
                part,
                batch_size=self.eval_batch_size,
                sampler=ShardSampler(len(part), rank, world),
                collate_fn=EntryCollator(collate, name),
                num_workers=self.num_workers,
                pin_memory=self._pin_memory(),
                # its own generator: evaluation must not draw from the global RNG (dropout after resume)
                generator=torch.Generator().manual_seed(self.seed),
            )
            for name, part in self._parts[stage]
        ]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("validation")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")

    def predict_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("predict")

    def entries(self, stage: Stage) -> list[str]:
        """Names of the evaluated entries of a stage, in dataloader order."""
        return [name for name, _ in self._parts[stage]]

    def steps_per_epoch(self) -> int:
        total = self.samples_per_epoch or sum(self.train_sizes)
        _, world = self._rank_world()
        return max(1, math.floor(total / (self.batch_size * world)))


# re-exported: the predict inputs and loaders lived in this file before they had files of their own
__all__ = ["PREDICT_DIAGNOSTICS", "EntryCollator", "MixedTrain", "MultiTaskDataModule", "ResumableLoader",
           "ShardSampler", "TaskPart", "read_predict_diagnostic"]
