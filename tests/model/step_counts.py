"""What a stretch of code asks of the host and how many ops it launches, counted by torch.profiler on the CPU.

Host reads ("syncs"): the ops that, on a GPU, make the host wait for the device: a value read back
(``aten::_local_scalar_dense``: ``.item()``, ``bool()``, ``int()``, ``float()`` of a tensor), the ops
whose output size depends on values (``nonzero``, boolean-mask indexing, ``unique``, ``masked_select``,
``repeat_interleave`` without a size, ``equal``), and copies to the host that the CPU profiler cannot see
(``.tolist()``, ``.numpy()``, ``.cpu()``: counted at the Python call; ``.to(device)`` is not, since on a
CPU run the training device is the host). Reads that a CPU
kernel makes of its own CPU scalars (the fused AdamW kernel reads its step counts; on a GPU it reads them
on the device) are not counted.

Ops: the aten ops that would launch work on a GPU: leaf ops that are not views or metadata, a multi-tensor
(``_foreach_*``, fused) op counted once (the CPU runs it as one op per tensor, a GPU as one kernel).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile

SYNC_OPS = frozenset({
    "aten::_local_scalar_dense", "aten::nonzero", "aten::nonzero_static", "aten::_unique2",
    "aten::unique_dim", "aten::unique_consecutive", "aten::masked_select", "aten::repeat_interleave",
    "aten::equal",
})
# CPU kernels that read their own CPU scalars (a GPU kernel reads them on the device)
KERNEL_INTERNAL = ("aten::_fused_adamw_", "aten::_fused_adam_")
MULTI_TENSOR = ("aten::_foreach_", "aten::_fused_", "aten::_amp_foreach_")
METADATA_OPS = frozenset({
    "aten::view", "aten::_unsafe_view", "aten::as_strided", "aten::_reshape_alias", "aten::reshape",
    "aten::resolve_conj", "aten::resolve_neg", "aten::detach", "aten::alias", "aten::empty", "aten::empty_like",
    "aten::empty_strided", "aten::expand", "aten::t", "aten::transpose", "aten::permute", "aten::squeeze",
    "aten::unsqueeze", "aten::select", "aten::slice", "aten::unbind", "aten::split", "aten::narrow",
    "aten::lift_fresh", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::numpy_T", "aten::flatten",
    "aten::view_as", "aten::expand_as", "aten::chunk", "aten::set_", "aten::result_type", "aten::is_nonzero",
    "aten::item", "aten::_local_scalar_dense", "aten::resize_", "aten::_has_compatible_shallow_copy_type",
})


@dataclass
class Counts:
    syncs: Counter = field(default_factory=Counter)  # op name -> host reads
    ops: Counter = field(default_factory=Counter)  # op name -> launches

    @property
    def num_syncs(self) -> int:
        return sum(self.syncs.values())

    @property
    def num_ops(self) -> int:
        return sum(self.ops.values())


def _ancestors(event) -> Iterator[str]:
    parent = event.cpu_parent
    while parent is not None:
        yield parent.name
        parent = parent.cpu_parent


def count_events(events) -> Counts:
    counts = Counts()
    for e in events:
        name = e.name
        if not name.startswith("aten::"):
            continue
        above = list(_ancestors(e))
        if name in SYNC_OPS and not any(a.startswith(KERNEL_INTERNAL) for a in above):
            counts.syncs[name] += 1
        if any(a.startswith(MULTI_TENSOR) for a in above):
            continue  # inside a multi-tensor op: that op is the launch
        if name.startswith(MULTI_TENSOR):
            counts.ops[name] += 1
        elif name not in METADATA_OPS and not any(c.name.startswith("aten::") for c in e.cpu_children):
            counts.ops[name] += 1
    return counts


class _HostCopies(TorchFunctionMode):
    """Counts the Python calls that copy a tensor to the host (on a GPU: a sync; on a CPU: no aten op)."""

    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in ("tolist", "numpy", "cpu"):
            self.counts[f"Tensor.{name}"] += 1
        return func(*args, **kwargs)


@contextmanager
def counting() -> Iterator[Counts]:
    """``with counting() as c: ...`` fills ``c`` with the host reads and ops of the block."""
    counts = Counts()
    prof = profile(activities=[ProfilerActivity.CPU])
    prof.__enter__()
    copies = _HostCopies(counts.syncs)
    copies.__enter__()
    try:
        yield counts
    finally:
        copies.__exit__(None, None, None)
        prof.__exit__(None, None, None)
    found = count_events(prof.events())
    counts.syncs.update(found.syncs)
    counts.ops.update(found.ops)
