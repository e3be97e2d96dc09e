"""The eager reference of the task heads: the per-task loop the batched heads replaced (one head call per
task on its rows, found with ``nonzero``; a per-task table for ``choice``). Kept to pin the batched
computation's losses and gradients; it reads the device many times per batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from speclora.model.heads import TaskHeads


def eager_task_losses(heads: TaskHeads, pooled: Tensor, batch: dict[str, Tensor]) -> dict[int, Tensor]:
    """{task: mean loss over its labelled examples} for the tasks of the batch, one head call per task."""
    out: dict[int, Tensor] = {}
    seq_task, seq_example = batch["seq_task"], batch["seq_example"]  # (N,), (N,)
    for t in torch.unique(batch["task"]).tolist():
        spec = heads.specs[t]
        rows = (seq_task == t).nonzero().squeeze(1)  # (N_t,)
        logits = heads.heads[t](pooled[rows])  # (N_t, C)
        if spec.kind == "choice":
            loss = _choice(logits.squeeze(-1), seq_example[rows], batch)
        else:
            examples = seq_example[rows]  # (E_t,)
            labels = (batch["labels"][examples] - heads.target_shift[t]) / heads.target_scale[t]
            loss = _single(spec.kind, logits, labels)
        if loss is not None:
            out[t] = loss
    return out


def _single(kind: str, logits: Tensor, labels: Tensor) -> Tensor | None:
    labelled = ~torch.isnan(labels)  # (E_t,)
    if not labelled.any():
        return None
    if kind == "regression":
        return F.mse_loss(logits.squeeze(-1)[labelled].float(), labels[labelled])
    return F.cross_entropy(logits[labelled].float(), labels[labelled].long())


def _choice(scores: Tensor, seq_example: Tensor, batch: dict[str, Tensor]) -> Tensor | None:
    # the options of each example laid out in a row: (E_t, C_max), padded with -inf
    examples, inverse, counts = torch.unique(seq_example, return_inverse=True, return_counts=True)
    n_ex, c_max = len(examples), int(counts.max())
    first = torch.zeros(n_ex, dtype=torch.long)  # (E_t,)
    first[1:] = torch.cumsum(counts, 0)[:-1]
    position = torch.arange(len(scores)) - first[inverse]  # (N_t,)
    table = scores.new_full((n_ex, c_max), float("-inf"))  # (E_t, C_max)
    table[inverse, position] = scores
    labels = batch["labels"][examples]  # (E_t,)
    labelled = ~torch.isnan(labels)
    if not labelled.any():
        return None
    return F.cross_entropy(table[labelled].float(), labels[labelled].long())
