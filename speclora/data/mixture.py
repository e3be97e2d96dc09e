"""Task mixing: a deterministic, DDP-sharded, resumable batch sampler over several task datasets.

An epoch is planned as one GLOBAL stream of ``samples_per_epoch`` samples ``(task, row)``, generated
from a ``torch.Generator`` seeded from ``(seed, epoch)`` only:

1. the task of every position is drawn i.i.d. from the mixing distribution ``p`` (below);
2. the rows of task ``t`` are read from its own random permutation of ``range(n_t)``, walked in order
   and re-permuted (same generator) when exhausted, so a task's rows are seen without replacement
   until all ``n_t`` are used.

Global batch ``k`` (``batch_size * world_size`` samples) is ``stream[k*B*W : (k+1)*B*W]`` and rank ``r``
takes the slice ``[r*B : (r+1)*B]`` of it. Ranks never overlap, their union is the global stream, and
the global order of samples does not depend on the world size, which is what lets a run resume at
another world size (:meth:`MixtureBatchSampler.load_state_dict`).

The sampler shards by itself: run Lightning with ``Trainer(use_distributed_sampler=False)`` and hand
each rank a sampler built with its ``rank`` and ``world_size``.

Length grouping (optional, :func:`group_by_length`): the stream is cut into windows of ``length_window``
batches; inside a window the samples are sorted by length, cut into batches, and the batches shuffled.
Batches still mix tasks, but each holds sequences of similar length (less padding), and every window holds
the same samples as before: the task frequencies of each window, and of the epoch, do not change. Windows
are counted in per-rank batches, so the global order still does not depend on the world size.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Iterator, Sequence
from typing import Any, Literal, get_args

import torch
from torch.utils.data import Sampler

from speclora.checks import is_int_in

MixingStrategy = Literal["proportional", "temperature", "equal"]
STRATEGIES: tuple[str, ...] = get_args(MixingStrategy)

_MASK64 = (1 << 64) - 1


def _check_sizes(sizes: Sequence[int]) -> list[int]:
    """Return ``sizes`` as a list of Python ints, each >= 1, or raise naming the bad entry."""
    out: list[int] = []
    for t, n in enumerate(sizes):
        if isinstance(n, bool):
            raise ValueError(f"sizes[{t}] must be a positive int, got {n!r}")
        try:
            n_int = operator.index(n)
        except TypeError:
            raise ValueError(f"sizes[{t}] must be a positive int, got {n!r}") from None
        if n_int <= 0:
            raise ValueError(f"sizes[{t}] must be a positive int (a task with rows), got {n_int}")
        out.append(n_int)
    if not out:
        raise ValueError("sizes must name at least one task, got an empty sequence")
    return out


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    """``value`` if it is an int in ``[low, high]`` (``high`` None: unbounded), else a ValueError naming ``name``."""
    if not is_int_in(value, low, high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an int {allowed}, got {value!r}")
    return value


def _divisors(m: int) -> list[int]:
    """The divisors of ``m >= 1``, ascending."""
    small = [d for d in range(1, math.isqrt(m) + 1) if m % d == 0]
    return sorted(set(small + [m // d for d in small]))


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(f"temperature must be a finite float >= 1, got {temperature!r}")
    if not math.isfinite(temperature) or temperature < 1.0:
        raise ValueError(
            f"temperature must be a finite float >= 1 (1 = proportional, large = near equal), got {temperature!r}"
        )
    return float(temperature)


def mixing_probabilities(sizes: Sequence[int], strategy: str, temperature: float = 10.0) -> torch.Tensor:
    """The probability of drawing each task, from the tasks' sizes ``n_t``.

    - ``proportional``: ``p_t = n_t / Σ_s n_s``.
    - ``temperature``: ``p_t = n_t^{1/T} / Σ_s n_s^{1/T}``, ``T >= 1``; ``T = 1`` is proportional and
      ``T → ∞`` tends to equal. UnoLoRA (§4) mixes GLUE with ``T = 10``, the default here.
    - ``equal``: ``p_t = 1 / (number of tasks)``.

    Args:
        sizes: rows per task, each >= 1.
        strategy: one of ``proportional``, ``temperature``, ``equal``.
        temperature: ``T``; checked whatever the strategy (it must be finite and >= 1), used by ``temperature``.

    Returns:
        ``(num_tasks,)`` float64 tensor summing to 1.
    """
    n_list = _check_sizes(sizes)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    T = _check_temperature(temperature)
    n = torch.tensor(n_list, dtype=torch.float64)  # (num_tasks,)
    if strategy == "proportional":
        w = n  # w_t = n_t
    elif strategy == "temperature":
        w = n.pow(1.0 / T)  # w_t = n_t^{1/T}; n_t <= 2^63 so no overflow for T >= 1
    else:
        w = torch.ones_like(n)  # w_t = 1
    return w / w.sum()  # (num_tasks,) p_t = w_t / Σ_s w_s


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed from ``(seed, epoch)`` by a splitmix64 mix, so that nearby pairs
    (``(0, 1)`` vs ``(1, 0)``) give unrelated streams, unlike ``seed + epoch``."""
    z = ((seed & _MASK64) * 0x9E3779B97F4A7C15 + (epoch & _MASK64) + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return z >> 1


def mixture_stream(
    sizes: Sequence[int], probabilities: torch.Tensor, num_samples: int, seed: int, epoch: int
) -> torch.Tensor:
    """The global sample stream of one epoch, ``(num_samples, 2)`` int64 rows ``(task, row)``.

    Depends on ``(sizes, probabilities, num_samples, seed, epoch)`` only. Time and memory are
    O(num_samples + Σ_t n_t): one loop over tasks, no loop over samples.
    """
    g = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
    num_tasks = len(sizes)
    # task_i = min{t : u_i < Σ_{s<=t} p_s}, u_i ~ U[0, 1): inverse-CDF sampling with replacement
    cdf = probabilities.to(torch.float64).cumsum(0)  # (num_tasks,)
    u = torch.rand(num_samples, dtype=torch.float64, generator=g)  # (N,)
    tasks = torch.searchsorted(cdf, u, right=True).clamp_(max=num_tasks - 1)  # (N,)
    rows = torch.empty(num_samples, dtype=torch.int64)  # (N,)
    for t, n_t in enumerate(sizes):
        pos = (tasks == t).nonzero().squeeze(1)  # (m_t,) positions of task t in the stream
        m_t = pos.numel()
        if m_t == 0:
            continue
        # k = ⌈m_t / n_t⌉ independent permutations of range(n_t), concatenated and cut to m_t
        k = -(-m_t // n_t)
        keys = torch.rand(k, n_t, dtype=torch.float64, generator=g)  # (k, n_t)
        perms = keys.argsort(dim=1, stable=True)  # (k, n_t) each row a permutation of range(n_t)
        rows[pos] = perms.reshape(-1)[:m_t]  # (m_t,)
    return torch.stack([tasks, rows], dim=1)  # (N, 2)


def group_by_length(
    stream: torch.Tensor, lengths: Sequence[torch.Tensor], batch_size: int, window: int, generator: torch.Generator
) -> torch.Tensor:
    """The stream reordered inside windows of ``window * batch_size`` samples: each window sorted by length
    (stably, so ties keep their stream order), cut into batches of ``batch_size``, its full batches shuffled
    (a last, partial batch stays last). Each window keeps its samples.

    Args:
        stream: (N, 2) rows (task, row).
        lengths: per task, (n_t,) the length (tokens, padded unit) of each of its rows.
        batch_size: samples per batch.
        window: batches per window, >= 1.
        generator: draws the batch order of every window.

    Returns:
        (N, 2), a permutation of ``stream`` that moves no sample out of its window.
    """
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)  # (T + 1,)
    offsets[1:] = torch.cumsum(torch.tensor([len(x) for x in lengths], dtype=torch.int64), 0)
    flat = torch.cat([torch.as_tensor(x, dtype=torch.int64) for x in lengths])  # (Σ n_t,)
    size = flat[offsets[stream[:, 0]] + stream[:, 1]]  # (N,) length of each sample
    out = torch.empty_like(stream)  # (N, 2)
    span = window * batch_size
    for start in range(0, stream.shape[0], span):
        stop = min(start + span, stream.shape[0])
        order = torch.argsort(size[start:stop], stable=True)  # (M,) shortest first
        full = (stop - start) // batch_size
        batches = torch.randperm(full, generator=generator)  # (full,) the order of the full batches
        picks = order[: full * batch_size].view(full, batch_size)[batches].reshape(-1)  # (full·B,)
        picks = torch.cat([picks, order[full * batch_size:]])  # (M,)
        out[start:stop] = stream[start:stop][picks]
    return out


_STATE_KEYS = (
    "epoch",
    "consumed_batches",
    "sizes",
    "seed",
    "strategy",
    "temperature",
    "batch_size",
    "world_size",
    "samples_per_epoch",
)


class MixtureBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this rank's batches of ``(task_index, row_index)`` pairs, tasks mixed by ``p`` (see
    :func:`mixing_probabilities`), in the order described in the module docstring.

    Use as ``DataLoader(dataset, batch_sampler=sampler)`` with a dataset whose ``__getitem__`` takes
    the ``(task, row)`` tuple, and ``Trainer(use_distributed_sampler=False)``.

    Args:
        sizes: rows per task, each >= 1.
        batch_size: samples per batch on each rank (the global batch is ``batch_size * world_size``).
        strategy: ``proportional``, ``temperature`` or ``equal``.
        temperature: ``T`` of the ``temperature`` strategy, >= 1; UnoLoRA §4 uses ``T = 10``.
        samples_per_epoch: global samples per epoch, all ranks together; default ``Σ_t n_t``. The
            remainder that does not fill a global batch is dropped.
        seed: the stream of epoch ``e`` depends on ``(seed, e)`` only.
        rank: this process's rank, ``0 <= rank < world_size``.
        world_size: number of processes sharing the stream.
        lengths: per task, the length of each row (needed by ``length_window``).
        length_window: group similar lengths into batches, sorting windows of this many batches
            (:func:`group_by_length`); None leaves the stream's order.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        batch_size: int,
        *,
        strategy: str = "temperature",
        temperature: float = 10.0,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        lengths: Sequence[Sequence[int] | torch.Tensor] | None = None,
        length_window: int | None = None,
    ) -> None:
        self.sizes = _check_sizes(sizes)
        if length_window is not None:
            _check_int("length_window", length_window, 1)
            if lengths is None or len(lengths) != len(self.sizes) or any(
                    len(x) != n for x, n in zip(lengths, self.sizes)):
                got = None if lengths is None else [len(x) for x in lengths]
                raise ValueError(f"length_window={length_window} needs lengths: one length per row of every task, "
                                 f"sizes {self.sizes}; got {got}")
            lengths = [torch.as_tensor(x, dtype=torch.int64) for x in lengths]
        self.length_window = length_window
        self._lengths = lengths if length_window is not None else None
        self._probabilities = mixing_probabilities(self.sizes, strategy, temperature)
        self.strategy = strategy
        self.temperature = float(temperature)
        _check_int("batch_size", batch_size, 1)
        _check_int("world_size", world_size, 1)
        _check_int(f"rank (world_size={world_size})", rank, 0, world_size - 1)
        if not is_int_in(seed):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if samples_per_epoch is None:
            samples_per_epoch = sum(self.sizes)
        _check_int("samples_per_epoch", samples_per_epoch, 1)
        if samples_per_epoch // (batch_size * world_size) < 1:
            raise ValueError(
                f"samples_per_epoch={samples_per_epoch} does not fill one global batch of "
                f"batch_size * world_size = {batch_size} * {world_size} = {batch_size * world_size}; "
                f"samples_per_epoch must be >= {batch_size * world_size}"
            )
        self.batch_size = batch_size
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self._epoch = 0
        # (epoch, batches of this rank to skip), set by load_state_dict, consumed by the next __iter__
        self._resume: tuple[int, int] | None = None

    @property
    def probabilities(self) -> torch.Tensor:
        """``(num_tasks,)`` float64 mixing distribution ``p``."""
        return self._probabilities.clone()

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose stream the next ``__iter__`` yields (Lightning calls this each epoch).

        A pending resume skip (from :meth:`load_state_dict`) is dropped if ``epoch`` is not the saved one.
        """
        _check_int("epoch", epoch, 0)
        self._epoch = epoch
        if self._resume is not None and self._resume[0] != epoch:
            self._resume = None

    def __len__(self) -> int:
        """Batches per rank per full epoch: ``samples_per_epoch // (batch_size * world_size)``; a resumed
        iteration yields fewer (the ones not yet consumed)."""
        return self.samples_per_epoch // (self.batch_size * self.world_size)

    def _rank_batches(self, epoch: int) -> torch.Tensor:
        """``(len(self), batch_size, 2)``: this rank's slice of every global batch of ``epoch``."""
        num_batches, B, W = len(self), self.batch_size, self.world_size
        stream = mixture_stream(
            self.sizes, self._probabilities, self.samples_per_epoch, self.seed, epoch
        )  # (N, 2)
        if self.length_window is not None:
            # its own generator: the plain stream above is the same with and without grouping
            g = torch.Generator().manual_seed(_epoch_seed(_epoch_seed(self.seed, epoch), 1))
            stream = group_by_length(stream, self._lengths, B, self.length_window, g)  # (N, 2)
        # global batch k = stream[k*B*W : (k+1)*B*W]; rank r takes its [r*B : (r+1)*B] slice
        used = stream[: num_batches * W * B].view(num_batches, W, B, 2)  # (num_batches, W, B, 2)
        return used[:, self.rank]  # (num_batches, B, 2)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self._epoch
        skip = 0
        if self._resume is not None and self._resume[0] == epoch:
            skip = self._resume[1]
        self._resume = None  # the skip applies once
        batches = self._rank_batches(epoch)  # (num_batches, B, 2)
        return self._yield(batches, skip)

    @staticmethod
    def _yield(batches: torch.Tensor, skip: int) -> Iterator[list[tuple[int, int]]]:
        for k in range(skip, batches.shape[0]):
            yield [(t, r) for t, r in batches[k].tolist()]

    def state_dict(self, consumed_batches: int) -> dict[str, Any]:
        """What a checkpoint stores: the epoch, this rank's consumed batches of it, and the settings
        the stream depends on (checked by :meth:`load_state_dict`)."""
        _check_int("consumed_batches", consumed_batches, 0, len(self))
        return {
            "epoch": self._epoch,
            "consumed_batches": consumed_batches,
            "sizes": list(self.sizes),
            "seed": self.seed,
            "strategy": self.strategy,
            "temperature": self.temperature,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "samples_per_epoch": self.samples_per_epoch,
            "length_window": self.length_window,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next ``__iter__`` over the saved epoch starts right after the consumed batches.

        The saved run consumed ``c`` batches per rank at world size ``W``, i.e. ``c * W * batch_size``
        samples of the global stream. A different world size ``W'`` resumes there when ``c * W`` is
        divisible by ``W'``. ``temperature`` is compared only under the ``temperature`` strategy.
        """
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"sampler state is missing keys {missing}; it must hold {list(_STATE_KEYS)}")
        current = {
            "sizes": list(self.sizes),
            "seed": self.seed,
            "strategy": self.strategy,
            "batch_size": self.batch_size,
            "samples_per_epoch": self.samples_per_epoch,
        }
        if self.strategy == "temperature":
            current["temperature"] = self.temperature
        if "length_window" in state or self.length_window is not None:  # older checkpoints: no grouping
            state = {**state, "length_window": state.get("length_window")}
            current["length_window"] = self.length_window
        for key, value in current.items():
            saved = list(state[key]) if key == "sizes" else state[key]
            if saved != value:
                raise ValueError(
                    f"sampler state does not match: {key} was {saved!r} when saved, is {value!r} now; "
                    f"resume with the same {key}"
                )
        epoch, consumed, saved_world = (
            int(state["epoch"]),
            int(state["consumed_batches"]),
            int(state["world_size"]),
        )
        if (
            epoch < 0
            or saved_world < 1
            or not 0 <= consumed <= self.samples_per_epoch // (self.batch_size * saved_world)
        ):
            raise ValueError(
                f"sampler state is inconsistent: epoch={epoch}, consumed_batches={consumed}, world_size={saved_world}"
            )
        global_batches = consumed * saved_world  # consumed global position, in units of batch_size samples
        if global_batches % self.world_size != 0:
            allowed = _divisors(global_batches)
            raise ValueError(
                f"cannot resume at world_size={self.world_size}: the checkpoint consumed "
                f"consumed_batches * world_size = {consumed} * {saved_world} = {global_batches} batches of "
                f"batch_size={self.batch_size}, which must split evenly over the ranks; allowed world sizes: {allowed}"
            )
        self._epoch = epoch
        self._resume = (epoch, global_batches // self.world_size)
