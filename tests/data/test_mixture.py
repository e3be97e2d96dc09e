"""The task-mixing batch sampler: probabilities, stream statistics, sharding, determinism, resume."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from speclora.data.mixture import MixtureBatchSampler, group_by_length, mixing_probabilities, mixture_stream


def _flat(batches: list[list[tuple[int, int]]]) -> list[tuple[int, int]]:
    return [pair for batch in batches for pair in batch]


# ---------------------------------------------------------------- mixing_probabilities


def test_temperature_hand_sized():
    # n = [100, 400], T = 2: n^{1/2} = [10, 20] → p = [1/3, 2/3]
    p = mixing_probabilities([100, 400], "temperature", temperature=2.0)
    assert p.dtype == torch.float64
    assert torch.equal(p, torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))


def test_proportional_equal_and_limits():
    sizes = [100, 300, 600]
    prop = mixing_probabilities(sizes, "proportional")
    assert torch.equal(prop, torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64))
    assert torch.equal(mixing_probabilities(sizes, "temperature", temperature=1.0), prop)
    assert torch.equal(mixing_probabilities(sizes, "equal"), torch.full((3,), 1 / 3, dtype=torch.float64))
    # T → ∞ tends to equal; T = 10 (UnoLoRA §4) sits between
    far = mixing_probabilities(sizes, "temperature", temperature=1e9)
    assert float((far - 1 / 3).abs().max()) < 1e-8
    t10 = mixing_probabilities(sizes, "temperature")
    assert prop[0] < t10[0] < 1 / 3 and float(t10.sum()) == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sizes": [10], "strategy": "uniform"}, r"strategy must be one of .*'uniform'"),
        ({"sizes": [10], "strategy": "temperature", "temperature": 0.5}, r"temperature .*>= 1.*0\.5"),
        ({"sizes": [10], "strategy": "temperature", "temperature": math.inf}, r"temperature .*finite.*inf"),
        ({"sizes": [10], "strategy": "temperature", "temperature": math.nan}, r"temperature .*nan"),
        ({"sizes": [], "strategy": "equal"}, r"sizes must name at least one task"),
        ({"sizes": [10, 0], "strategy": "equal"}, r"sizes\[1\] must be a positive int.*got 0"),
        ({"sizes": [10, -3], "strategy": "proportional"}, r"sizes\[1\].*-3"),
    ],
)
def test_mixing_probabilities_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mixing_probabilities(**kwargs)


# ---------------------------------------------------------------- the stream


def test_task_frequencies_match_p():
    sizes = [50, 1000, 7000]
    p = mixing_probabilities(sizes, "temperature", temperature=3.0)
    N = 40_000
    stream = mixture_stream(sizes, p, N, seed=3, epoch=0)  # (N, 2)
    counts = torch.bincount(stream[:, 0], minlength=3).to(torch.float64)
    # binomial: count_t ~ Bin(N, p_t), std = sqrt(N p_t (1 - p_t)); allow 5 sigma
    std = (N * p * (1 - p)).sqrt()
    assert torch.all((counts - N * p).abs() <= 5 * std), (counts, N * p)


def test_rows_without_replacement_until_exhausted():
    sizes = [7, 30, 200]
    p = mixing_probabilities(sizes, "equal")
    stream = mixture_stream(sizes, p, 600, seed=0, epoch=0)  # task 0 drawn ~200 times: ~28 passes
    for t, n_t in enumerate(sizes):
        rows = stream[stream[:, 0] == t, 1]
        assert rows.numel() >= n_t
        # every complete pass over task t is a permutation of range(n_t); the last one is partial
        for start in range(0, rows.numel() - n_t + 1, n_t):
            assert sorted(rows[start : start + n_t].tolist()) == list(range(n_t))
        tail = rows[(rows.numel() // n_t) * n_t :].tolist()
        assert len(set(tail)) == len(tail)
    # each pass is a fresh permutation, not a replay of the first
    rows0 = stream[stream[:, 0] == 0, 1]
    passes = {tuple(rows0[i : i + 7].tolist()) for i in range(0, rows0.numel() - 6, 7)}
    assert len(passes) > 1


def test_determinism_and_set_epoch():
    def run(seed: int, epoch: int) -> list[list[tuple[int, int]]]:
        s = MixtureBatchSampler([40, 90, 300], batch_size=8, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    a = run(seed=1, epoch=0)
    assert len(a) == 430 // 8 and all(len(b) == 8 for b in a)
    assert all(isinstance(t, int) and isinstance(r, int) for t, r in _flat(a))
    assert run(seed=1, epoch=0) == a
    assert run(seed=1, epoch=1) != a
    assert run(seed=2, epoch=0) != a
    # iterating twice without set_epoch replays the same epoch
    s = MixtureBatchSampler([40, 90, 300], batch_size=8, seed=1)
    assert list(s) == list(s) == a


def test_len_and_errors():
    s = MixtureBatchSampler([10, 20], batch_size=4, samples_per_epoch=100, world_size=3, rank=2)
    assert len(s) == 100 // 12 == len(list(s))
    with pytest.raises(ValueError, match=r"samples_per_epoch=5 .*batch_size \* world_size = 3 \* 2 = 6"):
        MixtureBatchSampler([10], batch_size=3, samples_per_epoch=5, world_size=2)
    with pytest.raises(ValueError, match=r"rank \(world_size=2\) must be an int in \[0, 1\], got 2"):
        MixtureBatchSampler([10], batch_size=1, rank=2, world_size=2)
    with pytest.raises(ValueError, match=r"rank .*got -1"):
        MixtureBatchSampler([10], batch_size=1, rank=-1)
    with pytest.raises(ValueError, match=r"world_size must be an int >= 1, got 0"):
        MixtureBatchSampler([10], batch_size=1, world_size=0)
    with pytest.raises(ValueError, match=r"batch_size must be an int >= 1, got 0"):
        MixtureBatchSampler([10], batch_size=0)
    with pytest.raises(ValueError, match=r"strategy must be one of"):
        MixtureBatchSampler([10], batch_size=1, strategy="size")


# ---------------------------------------------------------------- sharding


def test_sharding_two_ranks_interleave_to_single_rank_stream():
    kw = {"sizes": [30, 70, 150], "seed": 5, "samples_per_epoch": 200}
    r0 = list(MixtureBatchSampler(batch_size=4, rank=0, world_size=2, **kw))
    r1 = list(MixtureBatchSampler(batch_size=4, rank=1, world_size=2, **kw))
    single = list(MixtureBatchSampler(batch_size=8, **kw))
    assert len(r0) == len(r1) == len(single) == 25
    # global batch k = rank 0's batch k followed by rank 1's batch k
    assert [b0 + b1 for b0, b1 in zip(r0, r1)] == single
    # disjoint in position: together they cover each stream position exactly once
    assert len(_flat(r0)) + len(_flat(r1)) == len(_flat(single))
    # the global order does not depend on the world size: world_size 1 with batch_size 4
    assert _flat(list(MixtureBatchSampler(batch_size=4, **kw))) == _flat(single)


# ---------------------------------------------------------------- resume


def test_resume_same_world_size():
    kw = {"sizes": [25, 60, 140], "batch_size": 4, "seed": 9, "world_size": 2}
    for rank in range(2):
        s = MixtureBatchSampler(rank=rank, **kw)
        s.set_epoch(3)
        full = list(s)
        state = s.state_dict(consumed_batches=7)
        assert state["epoch"] == 3 and state["consumed_batches"] == 7

        fresh = MixtureBatchSampler(rank=rank, **kw)
        fresh.load_state_dict(state)
        fresh.set_epoch(3)  # Lightning sets the epoch again on restart; the skip survives it
        assert list(fresh) == full[7:]
        assert list(fresh) == full  # the skip applied once


def test_resume_at_another_world_size():
    kw = {"sizes": [25, 60, 140], "batch_size": 4, "seed": 9}
    w2 = [list(MixtureBatchSampler(rank=r, world_size=2, **kw)) for r in range(2)]
    state = MixtureBatchSampler(rank=0, world_size=2, **kw).state_dict(consumed_batches=6)

    # 6 batches x 2 ranks = 12 global units of batch_size: W' = 4 resumes after 3 batches each
    w4_full = [list(MixtureBatchSampler(rank=r, world_size=4, **kw)) for r in range(4)]
    rest = []
    for r in range(4):
        s = MixtureBatchSampler(rank=r, world_size=4, **kw)
        s.load_state_dict(state)
        rest.append(list(s))
        assert rest[r] == w4_full[r][3:]
    # and what is left is the rest of the same global stream
    consumed = _flat([b for k in range(6) for b in (w2[0][k], w2[1][k])])
    remaining = _flat([b for k in range(len(rest[0])) for b in (rest[r][k] for r in range(4))])
    whole = _flat([b for k in range(len(w2[0])) for b in (w2[0][k], w2[1][k])])
    assert consumed + remaining == whole[: len(consumed) + len(remaining)]

    # 12 is not divisible by 5
    s5 = MixtureBatchSampler(rank=0, world_size=5, **kw)
    with pytest.raises(ValueError, match=r"world_size=5.*allowed world sizes: \[1, 2, 3, 4, 6, 12\]"):
        s5.load_state_dict(state)


def test_resume_skip_dropped_on_another_epoch():
    s = MixtureBatchSampler([30, 50], batch_size=4, seed=2)
    s.set_epoch(1)
    state = s.state_dict(consumed_batches=5)
    fresh = MixtureBatchSampler([30, 50], batch_size=4, seed=2)
    fresh.load_state_dict(state)
    assert fresh.epoch == 1
    fresh.set_epoch(2)
    other = MixtureBatchSampler([30, 50], batch_size=4, seed=2)
    other.set_epoch(2)
    assert list(fresh) == list(other)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("sizes", [30, 51], r"sizes was \[30, 51\] when saved, is \[30, 50\] now"),
        ("seed", 3, r"seed was 3 when saved, is 2 now"),
        ("strategy", "equal", r"strategy was 'equal' when saved, is 'temperature' now"),
        ("temperature", 2.0, r"temperature was 2.0 when saved, is 10.0 now"),
        ("batch_size", 8, r"batch_size was 8 when saved, is 4 now"),
        ("samples_per_epoch", 40, r"samples_per_epoch was 40 when saved, is 80 now"),
    ],
)
def test_incompatible_resume_raises(key, value, match):
    s = MixtureBatchSampler([30, 50], batch_size=4, seed=2)
    state = s.state_dict(consumed_batches=2)
    state[key] = value
    with pytest.raises(ValueError, match=match):
        MixtureBatchSampler([30, 50], batch_size=4, seed=2).load_state_dict(state)


def test_state_dict_checks():
    s = MixtureBatchSampler([30, 50], batch_size=4)
    with pytest.raises(ValueError, match=r"consumed_batches must be an int in \[0, 20\], got 21"):
        s.state_dict(consumed_batches=21)
    state = s.state_dict(consumed_batches=0)
    del state["epoch"]
    with pytest.raises(ValueError, match=r"missing keys \['epoch'\]"):
        s.load_state_dict(state)


# ---------------------------------------------------------------- length grouping


def _lengths(sizes: list[int], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 128, (n,), generator=g) for n in sizes]


def test_group_by_length_keeps_every_window_and_sorts_its_batches():
    # a hand-sized window: lengths 5, 1, 4, 2, 3, 6 (tasks 0/1 alternate) in batches of 2
    stream = torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1], [0, 2], [1, 2]])
    lengths = [torch.tensor([5, 4, 3]), torch.tensor([1, 2, 6])]
    out = group_by_length(stream, lengths, batch_size=2, window=3, generator=torch.Generator().manual_seed(0))
    size = {(0, 0): 5, (0, 1): 4, (0, 2): 3, (1, 0): 1, (1, 1): 2, (1, 2): 6}
    batches = [sorted(size[tuple(x)] for x in out[k: k + 2].tolist()) for k in range(0, 6, 2)]
    assert sorted(batches) == [[1, 2], [3, 4], [5, 6]]  # sorted by length, then the batches shuffled
    assert sorted(map(tuple, out.tolist())) == sorted(map(tuple, stream.tolist()))


def test_length_grouping_keeps_the_mixing_frequencies_and_cuts_padding():
    sizes, batch, window = [300, 900, 2000], 8, 16
    lengths = _lengths(sizes)
    plain = MixtureBatchSampler(sizes, batch_size=batch, seed=3)
    grouped = MixtureBatchSampler(sizes, batch_size=batch, seed=3, lengths=lengths, length_window=window)
    a, b = list(plain), list(grouped)
    assert len(a) == len(b)
    span = window  # batches per window: each window holds the same samples, so the same task counts
    for k in range(0, len(a) - span + 1, span):
        assert sorted(_flat(a[k: k + span])) == sorted(_flat(b[k: k + span])), f"window at batch {k} changed"
    counts = torch.bincount(torch.tensor([t for t, _ in _flat(b)]), minlength=3).double()
    expected = plain.probabilities * counts.sum()
    assert torch.allclose(counts, expected, rtol=0.08)  # the mixing p, as for the plain stream

    def padded(batches):  # tokens a batch pads to: its longest sequence, times its size
        return sum(max(int(lengths[t][r]) for t, r in x) * len(x) for x in batches)

    assert padded(b) < 0.7 * padded(a)
    assert any(len({t for t, _ in x}) > 1 for x in b)  # batches still mix tasks


def test_length_grouping_resumes_at_another_world_size():
    sizes, lengths = [25, 60, 140], _lengths([25, 60, 140], seed=1)
    kw = {"sizes": sizes, "batch_size": 4, "seed": 9, "lengths": lengths, "length_window": 3}
    w1 = list(MixtureBatchSampler(**kw))
    w2 = [list(MixtureBatchSampler(rank=r, world_size=2, **kw)) for r in range(2)]
    # the global order does not depend on the world size: ranks interleave to the one-process stream
    assert _flat([b for k in range(len(w2[0])) for b in (w2[0][k], w2[1][k])]) == _flat(w1[: 2 * len(w2[0])])
    state = MixtureBatchSampler(rank=0, world_size=2, **kw).state_dict(consumed_batches=3)
    resumed = MixtureBatchSampler(**kw)
    resumed.load_state_dict(state)
    assert list(resumed) == w1[6:]
    plain = MixtureBatchSampler(sizes, batch_size=4, seed=9)
    with pytest.raises(ValueError, match="length_window was 3 when saved, is None now"):
        plain.load_state_dict(state)


def test_length_window_needs_the_lengths():
    with pytest.raises(ValueError, match=r"length_window=4 needs lengths.*sizes \[30, 50\]; got None"):
        MixtureBatchSampler([30, 50], batch_size=4, length_window=4)
    with pytest.raises(ValueError, match=r"got \[30, 49\]"):
        MixtureBatchSampler([30, 50], batch_size=4, length_window=4, lengths=_lengths([30, 49]))
    with pytest.raises(ValueError, match="length_window must be an int >= 1, got 0"):
        MixtureBatchSampler([30, 50], batch_size=4, length_window=0, lengths=_lengths([30, 50]))


# ---------------------------------------------------------------- DataLoader


class _TaggedRows(Dataset):
    """Toy multi-task dataset: item (t, r) is the tensor [t, 1000 t + r]."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes

    def __len__(self) -> int:
        return sum(self.sizes)

    def __getitem__(self, index: tuple[int, int]) -> torch.Tensor:
        t, r = index
        assert 0 <= r < self.sizes[t]
        return torch.tensor([t, 1000 * t + r])


def test_dataloader_with_batch_sampler():
    sizes = [12, 40, 9]
    sampler = MixtureBatchSampler(sizes, batch_size=5, strategy="equal", seed=4)
    loader = DataLoader(_TaggedRows(sizes), batch_sampler=sampler)
    batches = list(loader)
    assert len(loader) == len(batches) == 61 // 5
    expected = list(sampler)
    for batch, pairs in zip(batches, expected):
        assert batch.shape == (5, 2)  # (batch_size, [task, tagged row])
        assert batch.tolist() == [[t, 1000 * t + r] for t, r in pairs]
