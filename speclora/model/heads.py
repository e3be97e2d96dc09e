"""Per-task heads on the pooled encoder output, and the per-task losses and predictions.

Head by task kind (``speclora.tasks.registry``):

``classification``  dropout → Linear(H, H) → tanh → dropout → Linear(H, C); cross-entropy.
``regression``      the same with C = 1; mean squared error on the score standardised by the mean and std of
                    the task's training scores (``label_stats``; STS-B: y' = (y − 2.70) / 1.46), predicted
                    back as 2.70 + 1.46·z (below); ``regression_target`` chooses the map: ``standard``
                    (that), ``range`` (onto [−1, 1] by ``label_range``: (y − 2.5) / 2.5) or ``raw`` (none).
``choice``          the same with C = 1 applied to every option's sequence; softmax over the example's
                    options (COPA: 2, ReCoRD: one per candidate entity); cross-entropy on the gold option.

The heads of a mixed batch run as one batched computation (:meth:`TaskHeads.batched`), as the stacked
LoRA layer does: the weights of the P tasks present are concatenated, every row goes through all of them
in one matmul per layer and keeps its own task's output (a gather), and the losses are segment sums over
examples and tasks. Nothing is read back to the host, so a training step never waits on the device.
:meth:`TaskHeads.forward` gives the per-task view (one :class:`TaskOutput` per task present); building it
reads the device, which is fine for evaluation, prediction and tools.

Regression targets are scaled because a score far from 0 (STS-B's mean is about 2.7) makes the first steps'
loss about 10× a classification loss, and its gradient is nearly the same for every example: a shared adapter
at a high rate then moves every pooled vector the same way to raise the mean prediction, and the STS-B head
is left with inputs it cannot tell apart (the 2026-12-01 ``cpu`` matrix: ``shared`` and ``unolora_star`` at
3e-3 ended with validation Pearson ≈ 0.05 on some seeds, docs/results.md). Standardising (unit variance)
rather than mapping the range onto [−1, 1] (variance 0.34 on STS-B) keeps the task's share of the summed
loss near a classification loss's (docs/results.md, "Regression targets"). The shift and scale are buffers
of the state dict; a checkpoint written before them loads with the raw score (shift 0, scale 1), logged.

Which tasks a batch holds is host knowledge (the collator writes ``batch["present_tasks"]``); a batch
without it (built by hand) costs one host read to find them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speclora.tasks import TaskSpec

log = logging.getLogger(__name__)

HEAD_WEIGHTS = "head.safetensors"  # a task head's weights in an exported task folder
TASK_META = "speclora_task.json"  # the task's description (and the method's extras) next to them

KINDS = ("classification", "regression", "choice")
_CLASSIFICATION, _REGRESSION, _CHOICE = range(3)


def _head(hidden: int, out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.Tanh(), nn.Dropout(dropout), nn.Linear(hidden, out)
    )


REGRESSION_TARGETS = ("range", "standard", "raw")


def target_map(specs: Sequence[TaskSpec], how: str = "standard") -> tuple[list[float], list[float]]:
    """Per task, (shift, scale) with y' = (y − shift) / scale the target its head learns. For a regression task,
    by ``how``: ``range`` the middle and half width of its ``label_range``, ``standard`` the mean and std of its
    ``label_stats``, ``raw`` (0, 1); (0, 1) for every other task (labels are class indices)."""
    if how not in REGRESSION_TARGETS:
        raise ValueError(f"regression_target={how!r}; allowed: {', '.join(map(repr, REGRESSION_TARGETS))}")
    shift, scale = [0.0] * len(specs), [1.0] * len(specs)
    for t, spec in enumerate(specs):
        if spec.kind != "regression" or how == "raw":
            continue
        if how == "standard":
            if spec.label_stats is None or not spec.label_stats[1] > 0:
                raise ValueError(f"task {spec.name!r}: label_stats={spec.label_stats}, regression_target='standard' "
                                 "needs (mean, std) with std > 0; allowed otherwise: 'range', 'raw'")
            shift[t], scale[t] = spec.label_stats
        elif spec.label_range is not None:
            low, high = spec.label_range
            if not high > low:
                raise ValueError(f"task {spec.name!r}: label_range={spec.label_range}; allowed: (low, high), low < high")
            shift[t], scale[t] = (low + high) / 2, (high - low) / 2
    return shift, scale


def _shortest(value: Tensor) -> float:
    """A 0-d float32 tensor as the shortest decimal that reads back to it (2.7, not 2.700000047683716)."""
    return float(str(value.detach().cpu().numpy()))


def present_tasks(batch: Mapping[str, object]) -> tuple[int, ...]:
    """The sorted task indices with rows in the batch: the collator's ``present_tasks`` (host side), or, for a
    batch built without it, read from ``seq_task`` (one host read)."""
    tasks = batch.get("present_tasks")
    if tasks is None:
        return tuple(torch.unique(batch["seq_task"]).tolist())
    return tuple(tasks)


@dataclass
class TaskOutput:
    """What one task's rows of a batch produced.

    Attributes:
        examples: (E_t,) positions of the task's examples in the batch.
        loss: mean loss over the task's labelled examples (None when none is labelled).
        preds: (E_t,) predicted class / score / chosen option.
        probs: (E_t, C) class or option probabilities (options padded with 0); None for regression.
        chosen_scores: (E_t, 2) ReCoRD-style (F1, EM) of the chosen option; None elsewhere.
    """

    examples: Tensor
    loss: Tensor | None
    preds: Tensor
    probs: Tensor | None
    chosen_scores: Tensor | None


@dataclass
class HeadOutput:
    """Every row's own head output and the batch's losses, for all tasks at once (no host read).

    Attributes:
        logits: (N, C) float32 logits of each sequence's own task head, C = the widest head; the columns
            past a task's own width hold 0 (choice and regression use column 0).
        first_row: (E,) the first sequence row of each example (its only one outside ``choice``).
        example_loss: (E,) each example's loss; 0 where unlabelled.
        labelled: (E,) bool, the example has a label.
        task_loss: (T,) L_t, the mean loss over task t's labelled examples of the batch; 0 where none.
        task_count: (T,) float, labelled examples of each task in the batch.
        tasks: the tasks with rows in the batch (host side, sorted).
    """

    logits: Tensor
    first_row: Tensor
    example_loss: Tensor
    labelled: Tensor
    task_loss: Tensor
    task_count: Tensor
    tasks: tuple[int, ...]


# ---------------------------------------------------------------------- segment math (pure functions)
def first_rows(seq_example: Tensor, num_examples: int) -> Tensor:
    """(E,) the smallest row n with seq_example[n] = e: first[e] = min{n : e(n) = e}."""
    n = seq_example.shape[0]
    rows = torch.arange(n, device=seq_example.device)  # (N,)
    first = torch.full((num_examples,), n, dtype=torch.long, device=seq_example.device)  # (E,)
    return first.scatter_reduce(0, seq_example, rows, reduce="amin")  # (E,)


def segment_logsumexp(scores: Tensor, segment: Tensor, num_segments: int) -> Tensor:
    """(S,) lse_s = m_s + log Σ_{n: seg(n)=s} exp(x_n − m_s), m_s = max of the segment (held constant: the
    lse does not depend on it, so no gradient flows through it). Every segment must hold a row."""
    m = scores.new_full((num_segments,), float("-inf"))  # (S,)
    m = m.scatter_reduce(0, segment, scores.detach(), reduce="amax")  # (S,)
    total = scores.new_zeros(num_segments).index_add(0, segment, torch.exp(scores - m[segment]))  # (S,)
    return m + torch.log(total)  # (S,)


def segment_argmax(scores: Tensor, segment: Tensor, position: Tensor, num_segments: int) -> Tensor:
    """(S,) the position (within its segment) of each segment's largest score; the first on ties."""
    best = scores.new_full((num_segments,), float("-inf")).scatter_reduce(
        0, segment, scores, reduce="amax")  # (S,)
    big = torch.iinfo(torch.long).max
    at_best = torch.where(scores == best[segment], position, torch.full_like(position, big))  # (N,)
    chosen = torch.full((num_segments,), big, dtype=torch.long, device=scores.device)  # (S,)
    return chosen.scatter_reduce(0, segment, at_best, reduce="amin")  # (S,)


def example_losses(logits: Tensor, first: Tensor, seq_example: Tensor, labels: Tensor, kind: Tensor,
                   width: Tensor) -> tuple[Tensor, Tensor]:
    """Each example's loss by its task's kind, and which examples are labelled.

    logits: (N, C) row logits; first: (E,) first row of each example; seq_example: (N,); labels: (E,)
    float, NaN = unlabelled; kind: (E,) kind code of each example's task; width: (E,) its head's C_t.

        classification  CE_e = logsumexp_{c < C_t} z_{e,c} − z_{e,y_e}
        regression      SE_e = (z_{e,0} − y_e)²
        choice          CE_e = logsumexp_{n ∈ e} s_n − s_{gold(e)},   s_n = z_{n,0}

    Returns (E,) losses (0 where unlabelled) and (E,) bool labelled.
    """
    num_examples, c = first.shape[0], logits.shape[1]
    labelled = ~torch.isnan(labels)  # (E,)
    target = torch.where(labelled, labels, torch.zeros_like(labels))  # (E,) 0 where unlabelled
    z = logits.index_select(0, first)  # (E, C): the example's (first) row
    # classification: cross-entropy over the task's own C_t columns
    cols = torch.arange(c, device=logits.device)  # (C,)
    masked = z.masked_fill(cols >= width.unsqueeze(1), float("-inf"))  # (E, C)
    y = torch.minimum(target.long().clamp_min(0), width - 1)  # (E,) a valid column for every example
    ce = torch.logsumexp(masked, dim=1) - masked.gather(1, y.unsqueeze(1)).squeeze(1)  # (E,)
    se = (z[:, 0] - target).square()  # (E,)
    # choice: softmax over the example's option rows, option index = row - first row
    s = logits[:, 0]  # (N,)
    position = torch.arange(s.shape[0], device=s.device) - first[seq_example]  # (N,)
    gold = torch.where(kind == _CHOICE, target.long(), torch.full_like(y, -1))  # (E,) -1: no option is gold
    is_gold = (position == gold[seq_example]).to(s.dtype)  # (N,)
    gold_score = s.new_zeros(num_examples).index_add(0, seq_example, s * is_gold)  # (E,)
    choice = segment_logsumexp(s, seq_example, num_examples) - gold_score  # (E,)
    loss = torch.where(kind == _CLASSIFICATION, ce, torch.where(kind == _REGRESSION, se, choice))  # (E,)
    return torch.where(labelled, loss, torch.zeros_like(loss)), labelled


def task_means(values: Tensor, weights: Tensor, task: Tensor, num_tasks: int) -> tuple[Tensor, Tensor]:
    """L_t = Σ_{e: task(e)=t} w_e v_e / Σ_{e: task(e)=t} w_e (0 where the denominator is 0); returns (T,) L
    and (T,) the denominators. values, weights, task: (E,)."""
    w = weights.to(values.dtype)  # (E,)
    total = values.new_zeros(num_tasks).index_add(0, task, values * w)  # (T,)
    count = values.new_zeros(num_tasks).index_add(0, task, w)  # (T,)
    return total / count.clamp_min(1.0), count


class TaskHeads(nn.Module):
    """One head per task of the run, in task order.

    Args:
        specs: the run's tasks (index = the task index carried by the batch).
        hidden: encoder width H.
        dropout: dropout inside the heads.
        regression_target: how a regression head's target is mapped (:func:`target_map`).
    """

    def __init__(self, specs: list[TaskSpec], hidden: int, dropout: float = 0.1,
                 regression_target: str = "standard") -> None:
        super().__init__()
        self.specs = specs
        self.dropout = float(dropout)
        widths = [s.num_labels if s.kind == "classification" else 1 for s in specs]
        self.heads = nn.ModuleList(_head(hidden, w, dropout) for w in widths)
        self.width = max(widths)
        # per task: its kind code and its head's width C_t (not state: rebuilt from the specs)
        self.register_buffer("kind_code", torch.tensor([KINDS.index(s.kind) for s in specs]), persistent=False)
        self.register_buffer("task_width", torch.tensor(widths), persistent=False)
        # (T,), (T,): y' = (y − shift) / scale; state (what the heads learnt)
        shift, scale = target_map(specs, regression_target)
        self.register_buffer("target_shift", torch.tensor(shift))
        self.register_buffer("target_scale", torch.tensor(scale))
        self._slot_cache: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}  # (2, T) per task set

    # ------------------------------------------------------------------ the batched computation
    def _slots(self, tasks: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor]:
        """(T,) position of each task among ``tasks`` and (T,) the first column of its head's block in the
        concatenated second layer (0 for tasks not in ``tasks``); cached per task set and device."""
        key = (tasks, device)
        cached = self._slot_cache.get(key)
        if cached is None:
            if len(self._slot_cache) > 4096:
                self._slot_cache.clear()
            slot, offset, column = [0] * len(self.specs), [0] * len(self.specs), 0
            for position, t in enumerate(tasks):
                slot[t], offset[t] = position, column
                column += self.heads[t][4].out_features
            cached = self._slot_cache[key] = torch.tensor([slot, offset], dtype=torch.long, device=device)
        return cached[0], cached[1]

    def _check_tasks(self, tasks: tuple[int, ...]) -> None:
        if not tasks:
            raise ValueError("a batch without rows reached the task heads")
        if tasks[0] < 0 or tasks[-1] >= len(self.specs) or list(tasks) != sorted(set(tasks)):
            raise ValueError(f"batch['present_tasks']={tasks}: expected sorted distinct task indices in "
                             f"[0, {len(self.specs) - 1}] (the run has {len(self.specs)} tasks)")

    def row_logits(self, pooled: Tensor, seq_task: Tensor, tasks: Sequence[int]) -> Tensor:
        """(N, C) float32 logits of each row's own task head; columns past C_t hold 0.

        pooled: (N, H); seq_task: (N,) task of each row, every one of them in ``tasks`` (sorted, host side).
        With the P heads of ``tasks`` concatenated, W1: (P·H, H), W2: (Σ C_p, H):

            z_n = W1_{t(n)} dropout(x_n) + b1_{t(n)},   logits_n = W2_{t(n)} dropout(tanh z_n) + b2_{t(n)}

        each layer as one matmul over all P heads whose row n keeps its own head's block (a gather).
        """
        tasks = tuple(tasks)
        self._check_tasks(tasks)
        n, hidden = pooled.shape
        p, c = len(tasks), self.width
        first = [self.heads[t][1] for t in tasks]
        second = [self.heads[t][4] for t in tasks]
        slot, offset = self._slots(tasks, pooled.device)  # (T,), (T,)
        slot, offset = slot[seq_task], offset[seq_task]  # (N,), (N,): row n's head among the P, its W2 block
        w1 = torch.cat([m.weight for m in first])  # (P·H, H)
        x = F.dropout(pooled.to(w1.dtype), self.dropout, self.training)  # (N, H), in the heads' dtype
        b1 = torch.stack([m.bias for m in first])  # (P, H)
        z = (x @ w1.T).view(n, p, hidden)  # (N, P, H): every head's first layer
        z = z.gather(1, slot.view(n, 1, 1).expand(n, 1, hidden)).squeeze(1)  # (N, H): its own head's
        h = F.dropout(torch.tanh(z + b1.index_select(0, slot)), self.dropout, self.training)  # (N, H)
        w2 = torch.cat([m.weight for m in second])  # (Σ C_p, H)
        b2 = torch.cat([m.bias for m in second])  # (Σ C_p,)
        out = torch.addmm(b2, h, w2.T)  # (N, Σ C_p): every head's second layer
        cols = torch.arange(c, device=pooled.device)  # (C,)
        index = (offset.unsqueeze(1) + cols).clamp_max(out.shape[1] - 1)  # (N, C): its own block's columns
        own = cols < self.task_width[seq_task].unsqueeze(1)  # (N, C): the columns its head has
        return torch.where(own, out.gather(1, index), 0.0).float()  # (N, C)

    def batched(self, pooled: Tensor, batch: Mapping[str, Tensor]) -> HeadOutput:
        """Every row's head and the batch's per-example and per-task losses, without a host read.

        pooled: (N, H) one vector per sequence; batch: the collated batch (``seq_task``, ``seq_example``,
        ``task``, ``labels``; ``present_tasks`` when the collator wrote it).
        """
        tasks = present_tasks(batch)
        seq_task, seq_example, task = batch["seq_task"], batch["seq_example"], batch["task"]  # (N,), (N,), (E,)
        logits = self.row_logits(pooled, seq_task, tasks)  # (N, C)
        num_examples = task.shape[0]
        first = first_rows(seq_example, num_examples)  # (E,)
        target = (batch["labels"].float() - self.target_shift[task].float()) / self.target_scale[task].float()  # (E,)
        loss, labelled = example_losses(logits, first, seq_example, target, self.kind_code[task],
                                        self.task_width[task])  # (E,), (E,)
        task_loss, count = task_means(loss, labelled, task, len(self.specs))  # (T,), (T,)
        return HeadOutput(logits, first, loss, labelled, task_loss, count, tasks)

    # ------------------------------------------------------------------ predictions
    def predict(self, t: int, out: HeadOutput, batch: Mapping[str, Tensor], examples: Tensor | None = None,
                probs: bool = True) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Task t's (preds, probs, chosen_scores) for ``examples`` (default: every example of the batch,
        all of task t, as in an evaluation batch). Without ``probs`` (and outside ``choice``) no host read.

        preds: (E_t,) class (long) / score (float) / chosen option (long); probs: (E_t, C_t) class or
        (E_t, C_max) option probabilities, options padded with 0 (None for regression, or when not asked);
        chosen_scores: (E_t, 2) of the chosen option (``choice``), else None.
        """
        spec = self.specs[t]
        first = out.first_row if examples is None else out.first_row[examples]  # (E_t,)
        if spec.kind == "regression":
            return out.logits[first, 0].detach() * self.target_scale[t] + self.target_shift[t], None, None  # (E_t,)
        if spec.kind == "classification":
            p = out.logits[first, : spec.num_labels].detach().softmax(-1)  # (E_t, C_t)
            return p.argmax(-1), (p if probs else None), None
        seq_example = batch["seq_example"]  # (N,)
        if examples is not None:  # keep the rows of the chosen examples, renumbered 0..E_t-1
            local = torch.full((batch["task"].shape[0],), -1, dtype=torch.long, device=seq_example.device)
            local[examples] = torch.arange(len(examples), device=seq_example.device)
            rows = (local[seq_example] >= 0).nonzero().squeeze(1)  # (N_t,)
            seq_example, row_ids = local[seq_example[rows]], rows
        else:
            row_ids = torch.arange(seq_example.shape[0], device=seq_example.device)  # (N,)
        num = first.shape[0]
        s = out.logits[row_ids, 0].detach()  # (N_t,) option scores
        row_first = first_rows(seq_example, num)  # (E_t,) position of each example's first row in row_ids
        position = torch.arange(s.shape[0], device=s.device) - row_first[seq_example]  # (N_t,)
        chosen = segment_argmax(s, seq_example, position, num)  # (E_t,)
        chosen_scores = batch["seq_scores"][row_ids[row_first + chosen]]  # (E_t, 2)
        table = None
        if probs:
            options = int(position.max()) + 1 if position.numel() else 1  # host read: the table's width
            p = torch.exp(s - segment_logsumexp(s, seq_example, num)[seq_example])  # (N_t,)
            table = s.new_zeros(num, options)  # (E_t, C_max)
            table[seq_example, position] = p
        return chosen, table, chosen_scores

    def split(self, out: HeadOutput, batch: Mapping[str, Tensor], t: int) -> TaskOutput:
        """Task t's :class:`TaskOutput` (reads the device: which examples are the task's, whether any is
        labelled)."""
        examples = (batch["task"] == t).nonzero().squeeze(1)  # (E_t,)
        loss = out.task_loss[t] if bool(out.task_count[t] > 0) else None
        preds, probs, chosen_scores = self.predict(t, out, batch, examples)
        return TaskOutput(examples, loss, preds, probs, chosen_scores)

    def forward(self, pooled: Tensor, batch: Mapping[str, Tensor]) -> dict[int, TaskOutput]:
        """pooled: (N, H) one vector per sequence; returns the outputs of every task present."""
        return dict(TaskOutputs(self, self.batched(pooled, batch), batch))


    # ------------------------------------------------------------------ a task's head on disk
    def save_head(self, t: int, folder: Path, **meta: Any) -> None:
        """Task t's head (``head.safetensors``) and its description (``speclora_task.json``: task, kind,
        num_labels, label_names, then ``meta``, e.g. pooling and method) into ``folder``. Every exported
        format (peft, mtLoRA, UnoLoRA*, AdaLoRA, FullFT) writes its heads here."""
        from safetensors.torch import save_file

        spec = self.specs[t]
        folder.mkdir(parents=True, exist_ok=True)
        head = {k: v.detach().cpu().contiguous() for k, v in self.heads[t].state_dict().items()}
        save_file(head, str(folder / HEAD_WEIGHTS))
        (folder / TASK_META).write_text(json.dumps(
            {"task": spec.name, "kind": spec.kind, "num_labels": spec.num_labels,
             "label_names": list(spec.label_names), "target_shift": _shortest(self.target_shift[t]),
             "target_scale": _shortest(self.target_scale[t]), **meta}, indent=2))

    def load_head(self, t: int, folder: Path) -> None:
        """Task t's head from ``folder/head.safetensors`` (:meth:`save_head`); FileNotFoundError naming the file."""
        from safetensors.torch import load_file

        path = Path(folder) / HEAD_WEIGHTS
        if not path.is_file():
            raise FileNotFoundError(f"no exported head for task {self.specs[t].name!r} at {path.parent}")
        self.heads[t].load_state_dict(load_file(str(path)))
        meta_path = path.parent / TASK_META
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        if "target_shift" not in meta and self.specs[t].kind == "regression":
            log.warning("the head of %r at %s was exported before scaled regression targets: it predicts the raw "
                        "score (shift 0, scale 1)", self.specs[t].name, path.parent)
        self.target_shift[t] = float(meta.get("target_shift", 0.0))
        self.target_scale[t] = float(meta.get("target_scale", 1.0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # a checkpoint written before the target buffers: its heads learnt the raw score (module docstring)
        if prefix + "target_shift" not in state_dict and any(k.startswith(prefix + "heads.") for k in state_dict):
            if bool((self.target_shift != 0).any() or (self.target_scale != 1).any()):  # a map the raw score lacks
                log.warning("a checkpoint without %starget_shift/target_scale (written before scaled regression "
                            "targets): its regression heads keep the raw score", prefix)
            state_dict[prefix + "target_shift"] = torch.zeros_like(self.target_shift)
            state_dict[prefix + "target_scale"] = torch.ones_like(self.target_scale)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class TaskOutputs(Mapping[int, TaskOutput]):
    """The per-task view of a :class:`HeadOutput`: task -> :class:`TaskOutput` for the tasks present, each
    built (with host reads) on first access. Iterating gives the task indices without reading the device."""

    def __init__(self, heads: TaskHeads, out: HeadOutput, batch: Mapping[str, Tensor]) -> None:
        self.heads, self.out, self.batch = heads, out, batch
        self._built: dict[int, TaskOutput] = {}

    def __getitem__(self, t: int) -> TaskOutput:
        if t not in self.out.tasks:
            raise KeyError(t)
        if t not in self._built:
            self._built[t] = self.heads.split(self.out, self.batch, t)
        return self._built[t]

    def __iter__(self) -> Iterator[int]:
        return iter(self.out.tasks)

    def __len__(self) -> int:
        return len(self.out.tasks)
