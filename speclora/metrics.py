"""Measures: the benchmarks' official per-task metrics, the suite average, ITR, IC and the conflict rate.

Per task (shared/DESIGN.md, "Measures"): the official metrics with torchmetrics, DDP-synchronised through
their states. A task's score is 100 times the mean of its metrics, as the leaderboards compute it:

- CoLA: matthews; score = 100 * MCC
- MRPC, QQP: f1, accuracy; score = 100 * (F1 + acc) / 2
- STS-B: pearson, spearman; score = 100 * (r + rho) / 2
- CB: macro_f1, accuracy; score = 100 * (macro-F1 + acc) / 2
- MultiRC: f1a, em; score = 100 * (F1 over all answers + question EM) / 2
- ReCoRD: record_f1, record_em; score = 100 * (mean token F1 + mean EM) / 2
- MNLI: accuracy on two entries (mnli_m, mnli_mm), one task in the suite average

Across tasks and runs, with s(t) a task score in points:

    suite average = mean_t s(t)                          (an entry-averaged task counts once)
    ITR_t = s_multi(t) / s_single(t),                    ITR = mean_t ITR_t
    IC_t  = max(0, s_single(t) - s_multi(t)) / s_single(t),  IC = mean_t IC_t
    conflict rate = #{i < j : cos(g_i, g_j) < 0} / (T (T - 1) / 2)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.aggregation import MeanMetric, SumMetric
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryF1Score,
    BinaryMatthewsCorrCoef,
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassMatthewsCorrCoef,
)
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef
from torchmetrics.regression.pearson import _final_aggregation
from torchmetrics.utilities import dim_zero_cat

from speclora.tasks.registry import TaskSpec

# The metrics each head kind can report; "f1", "f1a" and "em" also need num_labels == 2.
_ALLOWED: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "f1", "macro_f1", "matthews", "f1a", "em"),
    "regression": ("pearson", "spearman"),
    "choice": ("accuracy", "record_f1", "record_em"),
}
_BINARY_ONLY = ("f1", "f1a", "em")
_PEARSON_STATES = (
    "mean_x",
    "mean_y",
    "max_abs_dev_x",
    "max_abs_dev_y",
    "var_x",
    "var_y",
    "corr_xy",
    "n_total",
)


class GroupExactMatch(Metric):
    """MultiRC's exact match: the share of questions whose every answer is predicted correctly.

        EM = (1 / |Q|) * sum_q prod_{a in q} [pred_a == label_a]

    States are concatenated long ``(group, correct)`` pairs, so that a question whose answers were scored on
    different DDP ranks is judged on all of them after the sync. Group ids must be global over the split
    (``Example.group``). Repeated rows (a DistributedSampler's padding) leave EM unchanged.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("groups", default=[], dist_reduce_fx="cat")
        self.add_state("correct", default=[], dist_reduce_fx="cat")
        self._seed_states()

    def _seed_states(self) -> None:
        # A rank without examples would otherwise send torchmetrics' float placeholder for an empty list,
        # which a rank holding long ids cannot gather with; an empty long tensor keeps dtypes equal.
        self.groups.append(torch.zeros(0, dtype=torch.long, device=self.device))
        self.correct.append(torch.zeros(0, dtype=torch.long, device=self.device))

    def reset(self) -> None:
        super().reset()
        self._seed_states()

    def update(self, preds: Tensor, labels: Tensor, groups: Tensor) -> None:
        """preds, labels, groups: (E,) integer tensors (predicted class, gold class, question id)."""
        self.groups.append(groups.long())  # (E,)
        self.correct.append((preds == labels).long())  # (E,) 1 where the answer is right

    def compute(self) -> Tensor:
        groups = dim_zero_cat(self.groups).long()  # (N,)
        correct = dim_zero_cat(self.correct).long()  # (N,)
        if groups.numel() == 0:
            return torch.tensor(float("nan"), device=self.device)
        # question q is right iff min_{a in q} correct_a == 1
        uniq, inverse = torch.unique(groups, return_inverse=True)  # (Q,), (N,)
        all_right = torch.ones_like(uniq).scatter_reduce(0, inverse, correct, reduce="amin")  # (Q,)
        return all_right.float().mean()


def _build_metric(name: str, spec: TaskSpec) -> Metric:
    """The torchmetrics object for one metric name of a task (checked against the kind beforehand)."""
    k = spec.num_labels
    if name == "accuracy":
        if spec.kind == "choice":  # acc = mean [pred == gold option]; the number of options varies
            return MeanMetric(nan_strategy="error")
        return BinaryAccuracy() if k == 2 else MulticlassAccuracy(num_classes=k, average="micro")
    if name in ("f1", "f1a"):  # F1 of the positive class 1
        return BinaryF1Score()
    # macro-F1 = mean over classes of per-class F1; a class absent from both preds and labels is skipped
    if name == "macro_f1":
        return MulticlassF1Score(num_classes=k, average="macro")
    if name == "matthews":
        return BinaryMatthewsCorrCoef() if k == 2 else MulticlassMatthewsCorrCoef(num_classes=k)
    if name == "pearson":
        return PearsonCorrCoef()
    if name == "spearman":
        with warnings.catch_warnings():  # the eval sets are small; its memory warning is noise here
            warnings.filterwarnings("ignore", message=".*will save all targets and predictions.*")
            return SpearmanCorrCoef()
    if name == "em":
        return GroupExactMatch()
    if name in ("record_f1", "record_em"):  # mean over queries of the chosen candidate's F1 / EM
        return MeanMetric(nan_strategy="error")
    raise ValueError(
        f"metric {name!r}: unknown; allowed: {', '.join(sorted(set().union(*_ALLOWED.values())))}"
    )


class TaskMetrics(nn.Module):
    """The official metrics of one evaluated entry of a task, DDP-synchronised, reset per epoch.

    One instance per evaluated entry (``mnli_m`` and ``mnli_mm`` each get one). Every metric is a
    torchmetrics ``Metric`` whose states carry a ``dist_reduce_fx``, so ``compute()`` returns the value
    over all ranks. Hold instances in an ``nn.ModuleDict`` so they follow the module's device; call
    ``reset()`` at the end of each evaluation epoch.

    ``compute()`` returns each metric of ``spec.metrics`` (accuracy, f1, macro_f1, f1a, em, record_*
    as fractions in [0, 1]; matthews, pearson, spearman in [-1, 1]) and

        score = 100 * mean_m metric_m          (the leaderboard's task score, in points)

    Empty and undefined values:
        - ``compute()`` with no example since the last reset (on all ranks together) raises
          ``RuntimeError`` naming the entry; it never returns a made-up number.
        - Matthews of a constant prediction is 0 (torchmetrics' convention, as sklearn's).
        - Pearson with a constant prediction or label vector is undefined: NaN (torchmetrics warns),
          and so is the score; Spearman returns 0 there (torchmetrics adds an epsilon).

    Args:
        spec: the task.
        name: the entry's log name, one of ``spec.eval_names``; defaults to the first (the task's name).
    """

    def __init__(self, spec: TaskSpec, name: str | None = None) -> None:
        super().__init__()
        if name is None:
            name = spec.eval_names[0]
        if name not in spec.eval_names:
            raise ValueError(
                f"name: {name!r} is not an entry of task {spec.name!r}; allowed: {spec.eval_names}"
            )
        if not spec.metrics:
            raise ValueError(f"task {spec.name!r}: metrics is empty; allowed: {_ALLOWED[spec.kind]}")
        for m in spec.metrics:
            if m not in _ALLOWED[spec.kind]:
                raise ValueError(
                    f"task {spec.name!r}: metric {m!r} does not fit kind {spec.kind!r}; "
                    f"allowed: {_ALLOWED[spec.kind]}"
                )
            if m in _BINARY_ONLY and spec.num_labels != 2:
                raise ValueError(
                    f"task {spec.name!r}: metric {m!r} needs num_labels=2, got {spec.num_labels}"
                )
        if "macro_f1" in spec.metrics and spec.num_labels < 2:
            raise ValueError(f"task {spec.name!r}: macro_f1 needs num_labels >= 2, got {spec.num_labels}")
        self.spec = spec
        self.name = name
        self.metrics = nn.ModuleDict({m: _build_metric(m, spec) for m in spec.metrics})
        self.count = SumMetric(nan_strategy="error")  # examples seen, summed over ranks

    def update(
        self,
        preds: Tensor,
        labels: Tensor,
        groups: Tensor | None = None,
        chosen_scores: Tensor | None = None,
    ) -> None:
        """Add a batch of E examples of this entry (E may be 0: a mixed batch without this task).

        Args:
            preds: (E,) long predicted class (``classification``), float prediction (``regression``)
                or long chosen option (``choice``).
            labels: (E,) long gold class / float gold score / long gold option.
            groups: (E,) long question ids; required for ``em`` (MultiRC), ignored otherwise.
            chosen_scores: (E, 2) float (F1, EM) of the chosen candidate against the gold answers;
                required for ``record_f1``/``record_em`` (ReCoRD), ignored otherwise.
        """
        self._check(preds, labels, groups, chosen_scores)
        n = preds.shape[0]
        if n == 0:
            return
        self.count.update(float(n))
        for m, metric in self.metrics.items():
            if m == "em":
                metric.update(preds, labels, groups)
            elif m == "record_f1":
                metric.update(chosen_scores[:, 0].float())  # (E,)
            elif m == "record_em":
                metric.update(chosen_scores[:, 1].float())  # (E,)
            elif m == "accuracy" and self.spec.kind == "choice":
                metric.update((preds == labels).float())  # (E,)
            elif self.spec.kind == "regression":
                metric.update(preds.float(), labels.float())
            else:
                metric.update(preds, labels)

    def _check(
        self, preds: Tensor, labels: Tensor, groups: Tensor | None, chosen_scores: Tensor | None
    ) -> None:
        """Shapes and dtypes only: no value is read, so no device sync (torchmetrics checks ranges)."""
        where = f"TaskMetrics({self.name!r})"
        if preds.ndim != 1 or labels.shape != preds.shape:
            raise ValueError(
                f"{where}: preds and labels must both be (E,), "
                f"got {tuple(preds.shape)} and {tuple(labels.shape)}"
            )
        if self.spec.kind == "regression":
            if not (preds.is_floating_point() and labels.is_floating_point()):
                raise ValueError(
                    f"{where}: regression preds/labels must be float, got {preds.dtype} and {labels.dtype}"
                )
        else:
            if preds.is_floating_point() or labels.is_floating_point():
                what = "class indices" if self.spec.kind == "classification" else "option indices"
                raise ValueError(
                    f"{where}: preds/labels must be integer {what} (argmax the logits first), "
                    f"got {preds.dtype} and {labels.dtype}"
                )
        if "em" in self.metrics:
            if groups is None:
                raise ValueError(f"{where}: groups is required for metric 'em' (MultiRC question ids)")
            if groups.shape != preds.shape or groups.is_floating_point():
                raise ValueError(
                    f"{where}: groups must be an integer (E,) = {tuple(preds.shape)}, "
                    f"got {groups.dtype} {tuple(groups.shape)}"
                )
        if "record_f1" in self.metrics or "record_em" in self.metrics:
            if chosen_scores is None:
                raise ValueError(
                    f"{where}: chosen_scores (E, 2) = (F1, EM) is required for record_f1/record_em"
                )
            if chosen_scores.shape != (preds.shape[0], 2):
                raise ValueError(
                    f"{where}: chosen_scores must be (E, 2) = ({preds.shape[0]}, 2), "
                    f"got {tuple(chosen_scores.shape)}"
                )

    def compute(self) -> dict[str, Tensor]:
        """Each metric of ``spec.metrics`` and ``score`` = 100 * their mean (see the class docstring).

        Raises:
            RuntimeError: no example was given on any rank since the last reset.
        """
        with warnings.catch_warnings():  # "compute before update" is reported below, by name
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
            n = self.count.compute()  # synced over ranks: every rank takes the same branch
        if n == 0:
            raise RuntimeError(
                f"TaskMetrics({self.name!r}).compute(): no example since the last reset; "
                "was the evaluation set of this entry empty?"
            )
        out = {m: metric.compute().float() for m, metric in self.metrics.items()}
        # score = 100 * mean_m metric_m
        out["score"] = 100.0 * torch.stack(list(out.values())).mean()
        return out

    def reset(self) -> None:
        """Forget every example (call at the end of each evaluation epoch)."""
        self.count.reset()
        for metric in self.metrics.values():
            metric.reset()

    def merge_state(self, other: TaskMetrics) -> None:
        """Add ``other``'s examples to this one's, as the DDP sync does across ranks.

        PearsonCorrCoef keeps running moments that torchmetrics cannot ``merge_state``; they are
        combined with its own parallel-variance aggregation (the one its ``compute`` uses after a sync).
        """
        if not isinstance(other, TaskMetrics) or other.name != self.name or other.spec != self.spec:
            got = other.name if isinstance(other, TaskMetrics) else type(other).__name__
            raise ValueError(f"merge_state: expected TaskMetrics({self.name!r}), got {got!r}")
        self.count.merge_state(other.count)
        for m, metric in self.metrics.items():
            incoming = other.metrics[m]
            if isinstance(metric, PearsonCorrCoef):
                stacked = [torch.stack([getattr(metric, s), getattr(incoming, s)]) for s in _PEARSON_STATES]
                for s, value in zip(_PEARSON_STATES, _final_aggregation(*stacked)):
                    setattr(metric, s, value)
            else:
                metric.merge_state(incoming)
            metric._computed = None  # drop a cached compute() from before the merge
        self.count._computed = None


def task_scores(scores: Mapping[str, float], tasks: Sequence[TaskSpec]) -> dict[str, float]:
    """One score per task: the mean of its evaluated entries' scores (MNLI: (mnli_m + mnli_mm) / 2).

    Args:
        scores: entry log name (``TaskSpec.eval_names``) -> score in points; extra keys are ignored.
        tasks: the tasks to score, each once.

    Raises:
        ValueError: a task is repeated, or one of its entries has no score.
    """
    out: dict[str, float] = {}
    for spec in tasks:
        if spec.name in out:
            raise ValueError(f"tasks: {spec.name!r} is given twice")
        missing = [e for e in spec.eval_names if e not in scores]
        if missing:
            raise ValueError(
                f"scores: no entry {missing[0]!r} (task {spec.name!r}); entries given: {sorted(scores)}"
            )
        # s(t) = mean over the task's entries
        out[spec.name] = sum(float(scores[e]) for e in spec.eval_names) / len(spec.eval_names)
    return out


def suite_average(scores: Mapping[str, float], tasks: Sequence[TaskSpec]) -> float:
    """The suite average in points: the plain mean of the task scores, an entry-averaged task once.

        avg = (1 / |tasks|) * sum_t s(t),   s(t) = mean of t's entries (``task_scores``)

    Raises:
        ValueError: ``tasks`` is empty, repeats a task, or an entry of a task has no score.
    """
    if len(tasks) == 0:
        raise ValueError("tasks: empty; give at least one task to average")
    per_task = task_scores(scores, tasks)
    return sum(per_task.values()) / len(per_task)


def _paired(multi: Mapping[str, float], single: Mapping[str, float]) -> list[tuple[str, float, float]]:
    """(task, s_multi, s_single) for the tasks of ``multi`` (in its order), each with a positive reference.

    Keys of ``single`` that ``multi`` lacks are ignored: the single-task references may cover more tasks.
    """
    if not multi:
        raise ValueError("multi: no task scores given")
    out = []
    for t, m in multi.items():
        if t not in single:
            raise ValueError(f"single: no single-task score for task {t!r}; tasks given: {sorted(single)}")
        s = float(single[t])
        if not s > 0:  # also refuses NaN
            raise ValueError(f"single[{t!r}] = {s}: a single-task reference score must be > 0")
        out.append((t, float(m), s))
    return out


def intertask_transfer_ratio(
    multi: Mapping[str, float], single: Mapping[str, float]
) -> tuple[dict[str, float], float]:
    """Inter-task transfer ratio, per task and averaged.

        ITR_t = s_multi(t) / s_single(t),   ITR = (1 / |T|) * sum_t ITR_t

    Args:
        multi: task -> score of the multi-task run (the tasks measured).
        single: task -> score of the single-task reference; must hold every task of ``multi``.

    Raises:
        ValueError: ``multi`` is empty, a task of ``multi`` has no reference, or a reference is <= 0.
    """
    per = {t: m / s for t, m, s in _paired(multi, single)}
    return per, sum(per.values()) / len(per)


def interference_cost(
    multi: Mapping[str, float], single: Mapping[str, float]
) -> tuple[dict[str, float], float]:
    """Interference cost: the relative loss against the single-task reference, gains counted as 0.

        IC_t = max(0, s_single(t) - s_multi(t)) / s_single(t),   IC = (1 / |T|) * sum_t IC_t

    Arguments and errors as ``intertask_transfer_ratio``.
    """
    per = {t: max(0.0, s - m) / s for t, m, s in _paired(multi, single)}
    return per, sum(per.values()) / len(per)


def conflict_rate(grads: Tensor) -> float:
    """The share of task pairs whose gradients on the shared parameters point against each other.

        rate = #{i < j : cos(g_i, g_j) < 0} / (T (T - 1) / 2)

    cos(g_i, g_j) < 0 exactly when <g_i, g_j> < 0 and both norms are positive; a zero gradient has a
    zero inner product with everything, so a pair holding one is never a conflict (but still counts in
    the denominator).

    Args:
        grads: (T, P) per-task gradients on the shared parameters, one row per task.

    Raises:
        ValueError: ``grads`` is not 2-D, has fewer than 2 rows, or holds NaN/inf.
    """
    if grads.ndim != 2:
        raise ValueError(f"grads: expected (T, P), got shape {tuple(grads.shape)}")
    t = grads.shape[0]
    if t < 2:
        raise ValueError(f"grads: a conflict rate needs T >= 2 tasks, got T={t}")
    g = grads.detach()
    if g.dtype in (torch.float16, torch.bfloat16) or not g.is_floating_point():
        g = g.float()
    finite = torch.isfinite(g).all(dim=1)  # (T,)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        raise ValueError(f"grads: rows {bad} hold NaN or inf")
    # G G^T: <g_i, g_j> for every pair
    gram = g @ g.T  # (T, T)
    i, j = torch.triu_indices(t, t, offset=1, device=g.device)  # (T(T-1)/2,) each
    conflicts = int((gram[i, j] < 0).sum())
    return conflicts / math.comb(t, 2)
