"""speclora.metrics: hand-computed values on hand-sized toys, the DDP-style merge, and the errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from scipy import stats

from speclora.metrics import (
    TaskMetrics,
    conflict_rate,
    interference_cost,
    intertask_transfer_ratio,
    suite_average,
    task_scores,
)
from speclora.tasks import get_task


def _t(*xs, dtype=torch.long) -> torch.Tensor:
    return torch.tensor(xs, dtype=dtype)


def _f(*xs) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


# ------------------------------------------------------------------------- per-task metrics


def test_mrpc_f1_accuracy_and_score():
    # TP=3 (0,1,3), FP=2 (2,4), FN=0, TN=1 (5): F1 = 2TP/(2TP+FP+FN) = 6/8, acc = 4/6
    m = TaskMetrics(get_task("mrpc"))
    m.update(_t(1, 1, 1, 1, 1, 0), _t(1, 1, 0, 1, 0, 0))
    out = m.compute()
    assert set(out) == {"f1", "accuracy", "score"}
    assert out["f1"].item() == pytest.approx(0.75)
    assert out["accuracy"].item() == pytest.approx(4 / 6)
    assert out["score"].item() == pytest.approx(100 * (0.75 + 4 / 6) / 2)


def test_stsb_pearson_spearman_match_scipy():
    preds = [0.5, 2.0, 1.0, 4.5, 3.0, 3.0]  # a tie, to check average ranks
    labels = [1.0, 1.5, 2.0, 5.0, 2.5, 4.0]
    m = TaskMetrics(get_task("stsb"))
    m.update(_f(*preds[:4]), _f(*labels[:4]))
    m.update(_f(*preds[4:]), _f(*labels[4:]))
    out = m.compute()
    r = stats.pearsonr(preds, labels)[0]
    rho = stats.spearmanr(preds, labels)[0]
    assert out["pearson"].item() == pytest.approx(r, abs=1e-6)
    assert out["spearman"].item() == pytest.approx(rho, abs=1e-6)
    assert out["score"].item() == pytest.approx(100 * (r + rho) / 2, abs=1e-4)


def test_cola_matthews_formula_and_constant_prediction():
    # TP=4, FN=1, TN=2, FP=1: MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = 7/15
    m = TaskMetrics(get_task("cola"))
    m.update(_t(1, 0, 1, 0, 1, 1, 0, 1), _t(1, 1, 1, 0, 0, 1, 0, 1))
    out = m.compute()
    assert out["matthews"].item() == pytest.approx(7 / 15)
    assert out["score"].item() == pytest.approx(100 * 7 / 15)

    m.reset()
    m.update(_t(1, 1, 1, 1), _t(0, 1, 0, 1))  # a collapsed classifier: MCC is 0, not NaN
    out = m.compute()
    assert out["matthews"].item() == 0.0
    assert out["score"].item() == 0.0


def test_cb_macro_f1_with_a_class_never_predicted():
    # class 0: TP=2 FP=1 FN=0 -> 0.8; class 1: TP=1 FP=1 FN=1 -> 0.5; class 2 (never predicted): 0
    m = TaskMetrics(get_task("cb"))
    m.update(_t(0, 0, 1, 1, 0), _t(0, 1, 1, 2, 0))
    out = m.compute()
    assert out["macro_f1"].item() == pytest.approx((0.8 + 0.5 + 0.0) / 3)
    assert out["accuracy"].item() == pytest.approx(3 / 5)
    assert out["score"].item() == pytest.approx(100 * ((1.3 / 3) + 0.6) / 2)


def test_mnli_entries_multiclass_accuracy():
    spec = get_task("mnli")
    m = TaskMetrics(spec, "mnli_mm")
    assert m.name == "mnli_mm"
    assert TaskMetrics(spec).name == "mnli_m"
    m.update(_t(0, 1, 2, 2), _t(0, 1, 1, 2))
    assert m.compute()["accuracy"].item() == pytest.approx(0.75)


_MULTIRC = dict(  # q10: 3 answers, all right; q11: 2 answers, the first wrong; q12: 2 answers, all right
    groups=_t(10, 10, 10, 11, 11, 12, 12),
    labels=_t(1, 0, 1, 0, 1, 1, 0),
    preds=_t(1, 0, 1, 1, 1, 1, 0),
)


def test_multirc_em_and_f1a():
    # EM = 2/3 questions all right; F1a over answers: TP=4, FP=1, FN=0 -> 8/9
    m = TaskMetrics(get_task("multirc"))
    m.update(_MULTIRC["preds"], _MULTIRC["labels"], groups=_MULTIRC["groups"])
    out = m.compute()
    assert out["em"].item() == pytest.approx(2 / 3)
    assert out["f1a"].item() == pytest.approx(8 / 9)
    assert out["score"].item() == pytest.approx(100 * (8 / 9 + 2 / 3) / 2)


def test_record_from_chosen_scores():
    m = TaskMetrics(get_task("record"))
    scores = torch.tensor([[1.0, 1.0], [0.5, 0.0], [0.0, 0.0], [0.8, 0.0]])
    m.update(_t(0, 2, 1, 3), _t(0, 1, 0, 3), chosen_scores=scores)
    out = m.compute()
    assert set(out) == {"record_f1", "record_em", "score"}
    assert out["record_f1"].item() == pytest.approx(2.3 / 4)
    assert out["record_em"].item() == pytest.approx(0.25)
    assert out["score"].item() == pytest.approx(100 * (0.575 + 0.25) / 2)


def test_copa_choice_accuracy():
    m = TaskMetrics(get_task("copa"))
    m.update(_t(0, 1, 1, 0), _t(0, 1, 0, 0))
    assert m.compute()["accuracy"].item() == pytest.approx(0.75)


def test_empty_batch_is_skipped_and_empty_epoch_raises():
    m = TaskMetrics(get_task("stsb"))
    m.update(_f(), _f())  # a mixed batch with no STS-B rows
    with pytest.raises(RuntimeError, match="'stsb'.*no example"):
        m.compute()
    m.update(_f(1.0, 2.0, 3.0), _f(1.0, 3.0, 2.0))
    m.compute()
    m.reset()
    with pytest.raises(RuntimeError, match="no example"):
        m.compute()


# ------------------------------------------------------------------------- DDP-style merge


def _split_equals_whole(task: str, preds, labels, cut: int, **extra) -> None:
    spec = get_task(task)
    whole, a, b = TaskMetrics(spec), TaskMetrics(spec), TaskMetrics(spec)
    whole.update(preds, labels, **extra)
    a.update(preds[:cut], labels[:cut], **{k: v[:cut] for k, v in extra.items()})
    b.update(preds[cut:], labels[cut:], **{k: v[cut:] for k, v in extra.items()})
    a.merge_state(b)
    want, got = whole.compute(), a.compute()
    assert set(got) == set(want)
    for k in want:
        # float32 state: a score in points (~90) matches to about one ulp (7.6e-6) of the whole
        assert got[k].item() == pytest.approx(want[k].item(), rel=1e-6, abs=1e-5), k


def test_merge_multirc_question_split_across_ranks():
    # q11 has its wrong answer in the first half and its right one in the second: per-half EMs are
    # 1/2 and 1, but the merged EM must judge q11 on both answers: 2/3.
    _split_equals_whole("multirc", _MULTIRC["preds"], _MULTIRC["labels"], 4, groups=_MULTIRC["groups"])
    a = TaskMetrics(get_task("multirc"))
    b = TaskMetrics(get_task("multirc"))
    a.update(_MULTIRC["preds"][:4], _MULTIRC["labels"][:4], groups=_MULTIRC["groups"][:4])
    b.update(_MULTIRC["preds"][4:], _MULTIRC["labels"][4:], groups=_MULTIRC["groups"][4:])
    a.merge_state(b)
    assert a.compute()["em"].item() == pytest.approx(2 / 3)


def test_merge_accuracy_f1_correlations_and_record():
    _split_equals_whole("mrpc", _t(1, 1, 1, 1, 1, 0), _t(1, 1, 0, 1, 0, 0), 2)
    _split_equals_whole("cb", _t(0, 0, 1, 1, 0), _t(0, 1, 1, 2, 0), 3)
    _split_equals_whole("cola", _t(1, 0, 1, 0, 1, 1, 0, 1), _t(1, 1, 1, 0, 0, 1, 0, 1), 5)
    _split_equals_whole("stsb", _f(0.5, 2.0, 1.0, 4.5, 3.0, 3.0), _f(1.0, 1.5, 2.0, 5.0, 2.5, 4.0), 2)
    _split_equals_whole("copa", _t(0, 1, 1, 0), _t(0, 1, 0, 0), 1)
    scores = torch.tensor([[1.0, 1.0], [0.5, 0.0], [0.0, 0.0], [0.8, 0.0]])
    _split_equals_whole("record", _t(0, 2, 1, 3), _t(0, 1, 0, 3), 1, chosen_scores=scores)


def test_merge_with_an_empty_side_and_update_after_merge():
    spec = get_task("stsb")
    whole, a, b = TaskMetrics(spec), TaskMetrics(spec), TaskMetrics(spec)
    preds, labels = _f(0.5, 2.0, 1.0, 4.5), _f(1.0, 1.5, 2.0, 5.0)
    whole.update(preds, labels)
    a.update(preds[:2], labels[:2])
    a.merge_state(b)  # b saw nothing
    a.update(preds[2:], labels[2:])  # the merged state keeps accepting batches
    assert a.compute()["pearson"].item() == pytest.approx(whole.compute()["pearson"].item(), abs=1e-6)


def test_merge_refuses_another_entry():
    spec = get_task("mnli")
    with pytest.raises(ValueError, match="mnli_m"):
        TaskMetrics(spec, "mnli_m").merge_state(TaskMetrics(spec, "mnli_mm"))


# ------------------------------------------------------------------------- input errors


def test_errors_name_the_bad_input():
    multirc = TaskMetrics(get_task("multirc"))
    with pytest.raises(ValueError, match="groups is required"):
        multirc.update(_t(1, 0), _t(1, 1))
    with pytest.raises(ValueError, match="groups must be"):
        multirc.update(_t(1, 0), _t(1, 1), groups=_t(1, 2, 3))
    with pytest.raises(ValueError, match="integer class indices.*float32"):
        TaskMetrics(get_task("sst2")).update(_f(0.2, 0.9), _t(0, 1))
    with pytest.raises(ValueError, match="regression.*float.*int64"):
        TaskMetrics(get_task("stsb")).update(_t(1, 2), _t(1, 2))
    with pytest.raises(ValueError, match=r"\(E,\).*\(2, 1\)"):
        TaskMetrics(get_task("stsb")).update(torch.zeros(2, 1), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="chosen_scores .* required"):
        TaskMetrics(get_task("record")).update(_t(0), _t(0))
    with pytest.raises(ValueError, match=r"\(1, 2\), got \(1, 3\)"):
        TaskMetrics(get_task("record")).update(_t(0), _t(0), chosen_scores=torch.zeros(1, 3))


def test_spec_errors_name_the_metric_and_entry():
    cola = get_task("cola")
    with pytest.raises(ValueError, match="'pearson'.*'classification'"):
        TaskMetrics(dataclasses.replace(cola, metrics=("pearson",)))
    with pytest.raises(ValueError, match="'f1'.*num_labels=2, got 3"):
        TaskMetrics(dataclasses.replace(get_task("mnli"), metrics=("f1",)))
    with pytest.raises(ValueError, match="'cola_m'.*'cola'"):
        TaskMetrics(cola, "cola_m")


# ------------------------------------------------------------------------- suite, ITR, IC


def test_suite_average_counts_mnli_once():
    tasks = [get_task("cola"), get_task("mnli"), get_task("mrpc")]
    scores = {"cola": 50.0, "mnli_m": 80.0, "mnli_mm": 82.0, "mrpc": 90.0, "unused": 1.0}
    assert task_scores(scores, tasks) == {"cola": 50.0, "mnli": 81.0, "mrpc": 90.0}
    assert suite_average(scores, tasks) == pytest.approx((50 + 81 + 90) / 3)
    del scores["mnli_mm"]
    with pytest.raises(ValueError, match="'mnli_mm'"):
        suite_average(scores, tasks)
    with pytest.raises(ValueError, match="empty"):
        suite_average(scores, [])


def test_itr_and_ic_on_a_toy_table():
    single = {"a": 80.0, "b": 50.0, "c": 90.0, "only_single": 70.0}
    multi = {"a": 84.0, "b": 40.0, "c": 90.0}
    per, itr = intertask_transfer_ratio(multi, single)
    assert per == pytest.approx({"a": 1.05, "b": 0.8, "c": 1.0})
    assert itr == pytest.approx((1.05 + 0.8 + 1.0) / 3)
    per, ic = interference_cost(multi, single)
    assert per == pytest.approx({"a": 0.0, "b": 0.2, "c": 0.0})  # a gain counts as 0 cost
    assert ic == pytest.approx(0.2 / 3)


def test_itr_ic_errors():
    with pytest.raises(ValueError, match="'d'"):
        intertask_transfer_ratio({"a": 1.0, "d": 2.0}, {"a": 1.0})
    with pytest.raises(ValueError, match=r"single\['a'\] = 0.0.*> 0"):
        interference_cost({"a": 1.0}, {"a": 0.0})
    with pytest.raises(ValueError, match="multi"):
        intertask_transfer_ratio({}, {"a": 1.0})


# ------------------------------------------------------------------------- conflict rate


def test_conflict_rate_one_of_three_pairs():
    grads = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, 1.0, 0.0]])
    # cos(g0, g1) = 0, cos(g0, g2) < 0, cos(g1, g2) > 0
    assert conflict_rate(grads) == pytest.approx(1 / 3)
    assert conflict_rate(-grads) == pytest.approx(1 / 3)  # flipping all signs keeps every cosine


def test_conflict_rate_zero_gradient_is_no_conflict():
    grads = torch.tensor([[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0]])
    assert conflict_rate(grads) == pytest.approx(1 / 3)  # only (g0, g2); the pairs with 0 do not count
    assert conflict_rate(torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=torch.bfloat16)) == 1.0


def test_conflict_rate_errors():
    with pytest.raises(ValueError, match="T >= 2.*T=1"):
        conflict_rate(torch.ones(1, 4))
    with pytest.raises(ValueError, match=r"\(T, P\).*\(4,\)"):
        conflict_rate(torch.ones(4))
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        conflict_rate(torch.tensor([[1.0, 0.0], [float("nan"), 1.0]]))


# ------------------------------------------------------------------------- real DDP sync (gloo, CPU)


def _ddp_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        multirc, stsb, cola = (
            TaskMetrics(get_task("multirc")),
            TaskMetrics(get_task("stsb")),
            TaskMetrics(get_task("cola")),
        )
        p, y, g = _MULTIRC["preds"], _MULTIRC["labels"], _MULTIRC["groups"]
        sp, sy = _f(0.5, 2.0, 1.0, 4.5, 3.0, 3.0), _f(1.0, 1.5, 2.0, 5.0, 2.5, 4.0)
        if rank == 0:  # rank 0: the first half of MultiRC (q11 split across ranks), all of STS-B
            multirc.update(p[:4], y[:4], groups=g[:4])
            stsb.update(sp[:2], sy[:2])
        else:  # rank 1: the rest; no CoLA example on either rank
            multirc.update(p[4:], y[4:], groups=g[4:])
            stsb.update(sp[2:], sy[2:])
        lonely = TaskMetrics(get_task("multirc"))  # only rank 0 sees examples: empty cat states on rank 1
        if rank == 0:
            lonely.update(p, y, groups=g)
        result = {"multirc": {k: v.item() for k, v in multirc.compute().items()}}
        result["lonely"] = {k: v.item() for k, v in lonely.compute().items()}
        result["stsb"] = {k: v.item() for k, v in stsb.compute().items()}
        try:
            cola.compute()
            result["cola"] = "no error"
        except RuntimeError as err:
            result["cola"] = str(err)
        torch.save(result, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_sync_two_ranks_equals_one(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"out.{k}") for k in range(2)]
    assert r[0] == r[1]  # every rank reads the same numbers
    assert r[0]["multirc"]["em"] == pytest.approx(2 / 3)
    assert r[0]["multirc"]["f1a"] == pytest.approx(8 / 9)
    assert r[0]["lonely"] == pytest.approx(r[0]["multirc"])
    preds, labels = [0.5, 2.0, 1.0, 4.5, 3.0, 3.0], [1.0, 1.5, 2.0, 5.0, 2.5, 4.0]
    assert r[0]["stsb"]["pearson"] == pytest.approx(stats.pearsonr(preds, labels)[0], abs=1e-6)
    assert r[0]["stsb"]["spearman"] == pytest.approx(stats.spearmanr(preds, labels)[0], abs=1e-6)
    assert "no example" in r[0]["cola"]
