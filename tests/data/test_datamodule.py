"""The datamodule on the real files: splits, caps, cache, collation, evaluation sharding."""

from __future__ import annotations

import pytest
import torch

from speclora.data.datamodule import MultiTaskDataModule
from speclora.data.loaders import ShardSampler
from speclora.data.sources import read_split
from speclora.tasks import get_task

TASKS = ["rte", "stsb", "copa", "cb"]


@pytest.fixture(scope="module")
def dm(tiny_backbone, data_root, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "token_cache"
    module = MultiTaskDataModule(
        tasks=TASKS, data_dir=str(data_root), tokenizer=tiny_backbone, max_length=64, batch_size=8,
        cache_dir=str(cache), max_train_per_task=200,
    )
    module.prepare_data()
    module.setup("fit")
    return module


def test_unolora_rule_halves_dev_of_small_tasks(dm, data_root):
    # RTE (2490 train rows < 10k): validation and test are disjoint halves of the official dev set
    val = dict(dm._parts["validation"])["rte"]
    test = dict(dm._parts["test"])["rte"]
    dev = read_split(get_task("rte"), "dev", data_root)
    v, t = set(val.rows.tolist()), set(test.rows.tolist())
    assert not v & t
    assert v | t == set(range(len(dev)))
    assert abs(len(v) - len(t)) <= 1


def test_large_task_holds_out_train_records(tiny_backbone, data_root, tmp_path):
    # SST-2 (67k train rows): 1000 training records are the validation split, the dev set the test split
    dm = MultiTaskDataModule(tasks=["sst2"], data_dir=str(data_root), tokenizer=tiny_backbone, max_length=32,
                             cache_dir=str(tmp_path.parent / "token_cache"))
    dm.setup("fit")
    (name, val), = dm._parts["validation"]
    (_, train), = dm._parts["train"]
    (_, test), = dm._parts["test"]
    assert name == "sst2" and len(val) == 1000
    assert val.split is train.split  # both carved from the train file
    assert not set(val.rows.tolist()) & set(train.rows.tolist())
    assert len(train) + len(val) == 67349
    assert len(test) == 872


def test_multirc_split_keeps_passages_whole(tiny_backbone, data_root, tmp_path):
    dm = MultiTaskDataModule(tasks=["multirc"], data_dir=str(data_root), tokenizer=tiny_backbone, max_length=32,
                             cache_dir=str(tmp_path.parent / "token_cache"))
    dm.setup("fit")
    (_, val), = dm._parts["validation"]
    (_, test), = dm._parts["test"]
    records = val.split.records
    assert not set(records[val.rows].tolist()) & set(records[test.rows].tolist())
    assert len(val) + len(test) == 4848  # every answer of the 83 dev passages, exactly once


def test_caps_and_train_sizes(dm):
    assert dm.train_sizes == [200, 200, 200, 200]
    probs = dm.mixing_weights()
    assert torch.allclose(probs, torch.full((4,), 0.25, dtype=probs.dtype))


def test_cache_is_reused_and_keyed_by_length(tiny_backbone, data_root, tmp_path):
    kwargs = dict(tasks=["cb"], data_dir=str(data_root), tokenizer=tiny_backbone, cache_dir=str(tmp_path))
    MultiTaskDataModule(max_length=32, **kwargs).prepare_data()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2  # train + dev of CB
    MultiTaskDataModule(max_length=32, **kwargs).prepare_data()
    assert sorted(p.name for p in tmp_path.iterdir()) == files  # nothing new: the cache was hit
    MultiTaskDataModule(max_length=48, **kwargs).prepare_data()
    assert len(list(tmp_path.iterdir())) == 4


def test_mixed_batch_layout(dm):
    batch = next(iter(dm.train_dataloader()))
    n_ex = batch["task"].shape[0]
    assert n_ex == 8
    n_seq = batch["input_ids"].shape[0]
    copa = TASKS.index("copa")
    # a COPA example brings two sequences (its two choices); every other example one
    assert n_seq == n_ex + int((batch["task"] == copa).sum())
    assert torch.equal(batch["seq_task"], batch["task"][batch["seq_example"]])
    # dynamic padding: the longest sequence fills the width exactly
    assert int(batch["attention_mask"].sum(1).max()) == batch["input_ids"].shape[1]
    assert not torch.isnan(batch["labels"]).any()


def test_length_grouped_batches_pad_less_and_keep_the_tasks(tiny_backbone, data_root, tmp_path_factory):
    kwargs = dict(tasks=TASKS, data_dir=str(data_root), tokenizer=tiny_backbone, max_length=64, batch_size=8,
                  cache_dir=str(tmp_path_factory.getbasetemp() / "token_cache"), max_train_per_task=200)
    window = 10
    plain = MultiTaskDataModule(**kwargs)
    grouped = MultiTaskDataModule(**kwargs, group_by_length=window)
    for m in (plain, grouped):
        m.setup("fit")
    a, b = list(plain.train_dataloader()), list(grouped.train_dataloader())
    full = len(a) // window * window  # whole windows: each holds the same examples in both orders
    tasks = lambda batches: sorted(zip(torch.cat([x["task"] for x in batches]).tolist(),  # noqa: E731
                                       torch.cat([x["uid"] for x in batches]).tolist()))
    assert tasks(a[:full]) == tasks(b[:full])
    width = lambda batches: sum(x["input_ids"].numel() for x in batches[:full])  # noqa: E731
    assert width(b) < 0.8 * width(a)
    with pytest.raises(ValueError, match="data.group_by_length=0; allowed: null or an integer >= 1"):
        MultiTaskDataModule(**kwargs, group_by_length=0)


def test_max_length_padding(tiny_backbone, data_root, tmp_path):
    dm = MultiTaskDataModule(tasks=["cb"], data_dir=str(data_root), tokenizer=tiny_backbone, max_length=64,
                             cache_dir=str(tmp_path.parent / "token_cache"), padding="max_length", batch_size=4)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["input_ids"].shape == (4, 64)


def test_eval_loaders_name_their_entries(dm):
    loaders = dm.val_dataloader()
    assert dm.entries("validation") == TASKS
    for name, loader in zip(TASKS, loaders):
        batch = next(iter(loader))
        assert batch["entry"] == name


def test_shard_sampler_covers_every_example_once():
    shards = [list(ShardSampler(11, r, 3)) for r in range(3)]
    flat = sorted(i for s in shards for i in s)
    assert flat == list(range(11))


def test_predict_split_is_the_unlabelled_official_test(dm):
    dm.setup("predict")
    name, part = dm._parts["predict"][0]
    assert name == "rte" and len(part) == 3000
    assert torch.isnan(part.split.labels).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tasks=["nope"]), "unknown task 'nope'"),
        (dict(tasks=["rte", "RTE"]), "name the same task"),
        (dict(batch_size=0), "data.batch_size=0"),
        (dict(mixing="random"), "random"),
        (dict(temperature=0.5), "temperature"),
        (dict(split_rule="half"), "data.split_rule='half'"),
        (dict(subset="k-shot-13", tasks=["rte"]), "data.subset='k-shot-13' does not exist"),
        (dict(max_train_per_task=0), "data.max_train_per_task=0"),
    ],
)
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiTaskDataModule(**kwargs)


def test_missing_data_folder_is_named(tiny_backbone, tmp_path):
    dm = MultiTaskDataModule(tasks=["rte"], data_dir=str(tmp_path / "nowhere"), tokenizer=tiny_backbone,
                             cache_dir="none")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        dm.setup("fit")
