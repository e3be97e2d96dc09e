"""The arithmetic of the quality tables, pinned to hand-computed values on toy tables."""

from __future__ import annotations

import math

import pytest

from speclora.bench import quality_stats as qs
from speclora.bench.quality_scales import REPO_CONFIGS, scale_budget


def _row(group, arm, seed, scores, average=None, status="ok", curves=None):
    if average is None and scores:
        average = sum(scores.values()) / len(scores)
    return {"group": group, "arm": arm, "seed": seed, "tasks": list(scores), "status": status, "scores": scores,
            "average": average, "curves": curves or {}}


def test_itr_and_ic_equal_hand_computed_values():
    # seed 0: ITR = (80/100 + 60/50) / 2 = 1.0;   IC = (20/100 + 0) / 2 = 0.1
    # seed 1: ITR = (90/90 + 40/80) / 2 = 0.75;   IC = (0 + 40/80) / 2 = 0.25
    rows = [_row("main", "m", 0, {"a": 80.0, "b": 60.0}), _row("main", "m", 1, {"a": 90.0, "b": 40.0})]
    rows += [_row("single", "single", s, {t: v}) for s, t, v in
             [(0, "a", 100.0), (0, "b", 50.0), (1, "a", 90.0), (1, "b", 80.0)]]
    singles = qs.single_table(rows)
    assert singles == {0: {"a": 100.0, "b": 50.0}, 1: {"a": 90.0, "b": 80.0}}
    tr = qs.transfer(qs.select(rows, "main", "m"), singles)
    assert tr.itr == pytest.approx({0: 1.0, 1: 0.75})
    assert tr.ic == pytest.approx({0: 0.1, 1: 0.25})
    assert tr.itr_stat.mean == pytest.approx(0.875)
    assert tr.itr_stat.std == pytest.approx(math.sqrt(2 * 0.125**2))  # sample std, n - 1 = 1
    assert tr.ic_stat.mean == pytest.approx(0.175)
    assert tr.excluded == {}


def test_tasks_without_a_positive_reference_are_left_out_and_named():
    rows = [_row("main", "m", 0, {"a": 80.0, "b": 10.0, "c": float("nan")})]
    rows += [_row("single", "single", 0, {"a": 100.0}), _row("single", "single", 0, {"b": 0.0}),
             _row("single", "single", 0, {"c": 50.0})]
    tr = qs.transfer(rows[:1], qs.single_table(rows))
    assert tr.itr == {0: pytest.approx(0.8)} and tr.ic == {0: pytest.approx(0.2)}
    assert tr.excluded == {0: ["b", "c"]}


def test_failed_runs_do_not_enter_the_means():
    rows = [_row("main", "m", 0, {"a": 50.0}), _row("main", "m", 1, {}, status="failed")]
    assert qs.by_seed(rows) == {0: 50.0}
    assert qs.mean_std(qs.by_seed(rows).values()) == qs.Stat(50.0, qs.mean_std([1.0]).std, 1)


def test_mean_std_and_paired_t_interval():
    st = qs.mean_std([1.0, 2.0, float("nan"), 3.0, None])
    assert (st.mean, st.std, st.n) == (2.0, 1.0, 3)
    assert st.fmt(1) == "2.0 ± 1.0"
    # differences 1, 2, 3: mean 2, sd 1, n 3; t_{0.975, 2} = 4.302652729911275
    p = qs.paired({0: 11.0, 1: 12.0, 2: 13.0, 3: 1.0}, {0: 10.0, 1: 10.0, 2: 10.0})
    half = 4.302652729911275 / math.sqrt(3)
    assert (p.mean, p.n) == (2.0, 3)
    assert (p.low, p.high) == (pytest.approx(2 - half), pytest.approx(2 + half))
    # df = 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2)), t = 2 / (1 / sqrt 3) = sqrt 12
    t = math.sqrt(12)
    assert p.p == pytest.approx(2 * (0.5 - t / (2 * math.sqrt(2 + t * t))))
    assert p.verdict == "no significant difference"
    assert qs.t_interval([1.0, 1.1, 0.9, 1.0]).verdict == "better"
    assert qs.t_interval([-1.0, -1.1, -0.9]).verdict == "worse"
    assert qs.t_interval([1.0]).verdict == "too few seeds"


def test_holm_adjusts_each_p_by_its_rank_and_keeps_the_order():
    # sorted: 0.01 (x 3 = 0.03), 0.02 (x 2 = 0.04), 0.04 (x 1 = 0.04); NaN is outside the family
    assert qs.holm([0.04, 0.01, math.nan, 0.02]) == pytest.approx([0.04, 0.03, math.nan, 0.04], nan_ok=True)
    # monotone: a larger p never gets a smaller adjusted p (0.5 x 1 < 0.3 x 2 = 0.6); capped at 1
    assert qs.holm([0.3, 0.5]) == pytest.approx([0.6, 0.6])
    assert qs.holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])
    assert qs.holm([]) == []


def test_steps_to_95_percent_of_the_final_value():
    assert qs.steps_to_fraction([[5, 10.0], [10, 38.0], [15, 40.0]]) == 10.0  # 0.95 * 40 = 38
    assert qs.steps_to_fraction([[5, 39.0], [10, 41.0], [15, 40.0]]) == 5.0
    assert math.isnan(qs.steps_to_fraction([[5, -3.0], [10, -1.0]]))  # no target below a score <= 0
    assert math.isnan(qs.steps_to_fraction([]))
    rows = [_row("main", "m", s, {"a": 1.0}, curves={"val/average": c})
            for s, c in ((0, [[5, 10.0], [10, 40.0]]), (1, [[5, 40.0], [10, 40.0]]))]
    assert qs.convergence(rows) == {0: 10.0, 1: 5.0}


def test_mean_curve_and_best_baseline():
    steps, mean, std = qs.mean_curve([[[5, 1.0], [10, 3.0]], [[5, 3.0], [10, 5.0], [15, 9.0]]])
    assert steps == [5.0, 10.0] and mean == [2.0, 4.0] and std == pytest.approx([math.sqrt(2)] * 2)
    rows = [_row("main", "x", 0, {"a": 50.0}), _row("main", "y", 0, {"a": 60.0}),
            _row("main", "z", 0, {"a": 90.0}), _row("main", "w", 0, {}, status="failed")]
    assert qs.best_baseline(rows, "main", ["x", "y", "w"]) == "y"
    assert qs.best_baseline(rows, "main", ["w"]) is None


def test_tail_change_over_the_last_fifth():
    steps = [20.0, 40.0, 60.0, 80.0, 100.0]
    # window: steps >= 80 -> 70.0, 70.8: change 0.8, flat
    t = qs.tail(steps, [10.0, 50.0, 65.0, 70.0, 70.8])
    assert t.n == 2 and t.change == pytest.approx(0.8) and t.rise == pytest.approx(0.8) and t.flat is True
    # still rising by 3 points over the last fifth: not flat
    t = qs.tail(steps, [10.0, 50.0, 65.0, 67.0, 70.0])
    assert t.change == pytest.approx(3.0) and t.flat is False
    # one validation in the window: can't tell; NaNs are skipped
    assert qs.tail([50.0, 100.0], [1.0, 2.0]).flat is None
    assert qs.tail(steps, [math.nan] * 5).n == 0
    t = qs.tail([10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 100.0], [0, 0, 0, 0, 0, 0, 0, 70.0, 72.0, 71.0])
    assert t.n == 3 and t.change == pytest.approx(2.0) and t.rise == pytest.approx(1.0) and t.flat is False



@pytest.mark.parametrize("scale", ["cpu", "gpu"])
def test_the_measuring_scales_validate_often_enough_to_tell_a_flat_tail(scale):
    # the report's convergence column ("flat (<= 1 point)") needs validations in the last fifth; the cpu and
    # gpu overlays promise three, and their last validation at the last step
    steps, validations = scale_budget(REPO_CONFIGS / "bench" / f"{scale}.yaml")
    every = steps // validations
    assert steps % every == 0, f"{scale}.yaml: max_steps {steps} is not a multiple of val_check_interval {every}"
    t = qs.tail([float(s) for s in range(every, steps + 1, every)], [70.0] * validations)
    assert t.n >= 3 and t.flat is True


def test_matrix_wall_time_is_the_union_of_the_runs_intervals():
    def run(a, b):
        return {"started": f"2026-01-01T10:{a:02d}:00+00:00", "finished": f"2026-01-01T10:{b:02d}:00+00:00"}

    # two runs at once (0-10, 5-12), a gap, then 20-25, and one nested run (21-22): 12 + 5 minutes
    rows = [run(0, 10), run(5, 12), run(20, 25), run(21, 22), {"status": "missing"}]
    assert qs.busy_seconds(rows) == (17 * 60.0, 4)
    assert qs.busy_seconds([]) == (0.0, 0)


def test_the_code_of_the_runs_is_counted_per_commit_in_the_order_they_ran():
    def run(commit, minute, status="ok"):
        row = {"status": status, "started": f"2026-01-01T10:{minute:02d}:00+00:00"}
        return {**row, "commit": commit} if commit else row

    rows = [run("bbb2222", 30), run(None, 1), run("aaa1111", 10), run("aaa1111", 11, "failed"),
            run("bbb2222+changes", 40), run("ccc", 50, "missing")]
    assert qs.commits(rows) == "not recorded (1 run), aaa1111 (2 runs), bbb2222 (1 run), bbb2222+changes (1 run)"
    assert qs.commits([{"status": "missing"}]) == "no runs"
