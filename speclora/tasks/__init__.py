"""Task registry: fields, label spaces, head kinds and metrics of every GLUE and SuperGLUE task."""

from speclora.tasks.example import Example
from speclora.tasks.registry import (
    DEFAULT_SUITE,
    TASKS,
    EvalSet,
    TaskSpec,
    eval_names,
    get_task,
    resolve_tasks,
)

__all__ = ["DEFAULT_SUITE", "TASKS", "EvalSet", "Example", "TaskSpec", "eval_names", "get_task", "resolve_tasks"]
