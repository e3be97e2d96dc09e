"""Per-task heads on the pooled encoder output, and the per-task losses and predictions.

Head by task kind (``speclora.tasks.registry``):

``classification``  dropout → Linear(H, H) → tanh → dropout → Linear(H, C); cross-entropy.
``regression``      the same with C = 1; mean squared error on the score.
``choice``          the same with C = 1 applied to every option's sequence; softmax over the example's
                    options (COPA: 2, ReCoRD: one per candidate entity); cross-entropy on the gold option.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speclora.tasks import TaskSpec


def _head(hidden: int, out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.Tanh(), nn.Dropout(dropout), nn.Linear(hidden, out)
    )


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


class TaskHeads(nn.Module):
    """One head per task of the run, in task order.

    Args:
        specs: the run's tasks (index = the task index carried by the batch).
        hidden: encoder width H.
        dropout: dropout inside the heads.
    """

    def __init__(self, specs: list[TaskSpec], hidden: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.specs = specs
        self.heads = nn.ModuleList(
            _head(hidden, s.num_labels if s.kind == "classification" else 1, dropout) for s in specs
        )

    def forward(self, pooled: Tensor, batch: dict[str, Tensor]) -> dict[int, TaskOutput]:
        """pooled: (N, H) one vector per sequence; returns the outputs of every task present."""
        out: dict[int, TaskOutput] = {}
        seq_task, seq_example = batch["seq_task"], batch["seq_example"]  # (N,), (N,)
        for t in torch.unique(batch["task"]).tolist():
            spec = self.specs[t]
            rows = (seq_task == t).nonzero().squeeze(1)  # (N_t,)
            logits = self.heads[t](pooled[rows])  # (N_t, C)
            if spec.kind == "choice":
                out[t] = self._choice(logits.squeeze(-1), seq_example[rows], batch, rows)
            else:
                examples = seq_example[rows]  # (E_t,) one sequence per example
                out[t] = self._single(spec, logits, batch["labels"][examples], examples)
        return out

    @staticmethod
    def _single(spec: TaskSpec, logits: Tensor, labels: Tensor, examples: Tensor) -> TaskOutput:
        labelled = ~torch.isnan(labels)  # (E_t,)
        if spec.kind == "regression":
            preds = logits.squeeze(-1)  # (E_t,)
            loss = F.mse_loss(preds[labelled].float(), labels[labelled]) if labelled.any() else None
            return TaskOutput(examples, loss, preds.detach(), None, None)
        loss = None
        if labelled.any():
            loss = F.cross_entropy(logits[labelled].float(), labels[labelled].long())
        probs = logits.detach().float().softmax(-1)  # (E_t, C)
        return TaskOutput(examples, loss, probs.argmax(-1), probs, None)

    @staticmethod
    def _choice(scores: Tensor, seq_example: Tensor, batch: dict[str, Tensor], rows: Tensor) -> TaskOutput:
        # Lay the options of each example out in a row: (E_t, C_max), padding with -inf.
        examples, inverse, counts = torch.unique(seq_example, return_inverse=True, return_counts=True)
        n_ex, c_max = len(examples), int(counts.max())
        first = torch.zeros(n_ex, dtype=torch.long, device=scores.device)  # (E_t,) first option position
        first[1:] = torch.cumsum(counts, 0)[:-1]
        position = torch.arange(len(scores), device=scores.device) - first[inverse]  # (N_t,) option index
        table = scores.new_full((n_ex, c_max), float("-inf"))  # (E_t, C_max)
        table[inverse, position] = scores
        labels = batch["labels"][examples]  # (E_t,)
        labelled = ~torch.isnan(labels)
        loss = None
        if labelled.any():
            loss = F.cross_entropy(table[labelled].float(), labels[labelled].long())
        probs = table.detach().float().softmax(-1)  # (E_t, C_max)
        chosen = probs.argmax(-1)  # (E_t,)
        chosen_rows = rows[first + chosen]  # (E_t,) batch row of the chosen option
        chosen_scores = batch["seq_scores"][chosen_rows]  # (E_t, 2)
        return TaskOutput(examples, loss, chosen, probs, chosen_scores)
