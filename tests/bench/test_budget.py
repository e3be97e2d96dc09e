"""``speclora-bench budget``: the cells at each budget, the reading (gains, convergence, the recommended budget),
the rates taken from a quality matrix, the reuse of its cells, and one real run on the smoke scale."""

from __future__ import annotations

import json
import math

import pytest

from speclora.bench import budget as bud
from speclora.bench.quality import main as bench_main
from speclora.bench.quality_scales import REPO_CONFIGS, SCALES, CellFactory, plan_matrix

MAKE = CellFactory(REPO_CONFIGS, "b")
SUITE = ["rte", "stsb"]
SMOKE = SCALES["smoke"]  # 20 steps, validated every 5: four validations


def _arg(cell, flag):
    args = list(cell.args)
    return args[args.index(flag) + 1] if flag in args else None


def test_steps_need_two_positive_budgets():
    assert bud.parse_steps("40, 10,20,20") == (10, 20, 40)
    for bad in ("20", "0,20", "ten,20", ""):
        with pytest.raises(ValueError, match="--steps=.*at least two positive integers"):
            bud.parse_steps(bad)


def test_validations_end_at_the_budget_and_are_at_least_the_scales():
    assert [bud.val_interval(b, 4) for b in (10, 20, 30, 40, 7, 3)] == [2, 5, 6, 10, 1, 1]
    assert bud.val_interval(400, 10) == 40 and bud.val_interval(6000, 20) == 300


def test_each_budget_is_the_scale_config_with_its_own_steps_and_as_many_validations():
    cells = bud.budget_cells(SMOKE, ["independent", "speclora/no_filtering"], (10, 20, 40), 2, MAKE, SUITE,
                             {"independent": 3e-3, "speclora/no_filtering": 1e-3})
    assert len(cells) == 2 * 3 * 2 and len({c.run_id for c in cells}) == len(cells)
    by = {(c.arm, c.steps, c.seed): c for c in cells}
    for arm, lr in (("independent", 3e-3), ("speclora/no_filtering", 1e-3)):
        for seed in (0, 1):
            c10, c40 = by[(arm, 10, seed)], by[(arm, 40, seed)]
            assert (_arg(c10, "--trainer.max_steps"), _arg(c10, "--trainer.val_check_interval")) == ("10", "2")
            assert (_arg(c40, "--trainer.max_steps"), _arg(c40, "--trainer.val_check_interval")) == ("40", "10")
            assert c10.lr == c40.lr == lr and c10.group == "budget" and "__steps40" in c40.run_id
            # the scale's own budget is the quality matrix's main cell: same arguments, same run id
            own = by[(arm, None, seed)]
            assert _arg(own, "--trainer.max_steps") is None and own.group == "main"
    matrix = plan_matrix(SMOKE, ("independent",), 2, REPO_CONFIGS, "b", fewshot=False, suite=SUITE,
                         lrs={"independent": 3e-3}, reference=False)
    assert {c.run_id: c.args for c in matrix.cells} == {c.run_id: c.args for c in cells
                                                        if c.arm == "independent" and c.steps is None}


def _row(val_best, curve=((8, 1.0), (10, 2.0)), status="ok"):
    return {"status": status, "val_best": val_best, "curves": {"val/average": [list(p) for p in curve]}}


def test_convergence_is_the_smallest_budget_no_larger_budget_beats_by_more_than_tol():
    cells = bud.budget_cells(SMOKE, ["independent", "shared"], (10, 20, 40, 80), 2, MAKE, SUITE, {})
    # independent: +5 then +0.5 then +0.4 (converged at 20); shared: 20 → 80 gains 1.5 in two small steps,
    # so 20 is not converged although each single step gains under 1 point; 40 is
    best = {("independent", 10): (50, 52), ("independent", 20): (55, 57), ("independent", 40): (56, 57),
            ("independent", 80): (56, 58), ("shared", 10): (60, 60), ("shared", 20): (61, 61),
            ("shared", 40): (61.8, 61.8), ("shared", 80): (62.5, 62.5)}
    rows = {}
    for c in cells:
        rows[c.run_id] = _row(best[(c.arm, c.steps or 20)][c.seed])
    s = bud.summarise(cells, rows, own=20)
    ind, sh = s["arms"]["independent"], s["arms"]["shared"]
    assert ind["val"] == {10: 51, 20: 56, 40: 56.5, 80: 57} and ind["gain"][10] == 5
    assert ind["converged_at"] == 20 and sh["converged_at"] == 40
    assert s["recommended"] == 40 and s["complete"]
    assert ind["tail"][10] == 1.0  # the run's last fifth holds steps 8 and 10
    # a failed run: nothing is recommended, and the table says why
    rows[cells[0].run_id] = _row(None, status="failed")
    s = bud.summarise(cells, rows, own=20)
    assert s["recommended"] is None and not s["complete"] and s["arms"]["independent"]["converged_at"] is None
    assert s["arms"]["independent"]["ok"][10] == "1/2"
    text = bud.markdown(s, (10, 20, 40, 80), {"scale": "smoke", "command": "c", "machine": "m", "date": "d",
                                              "seeds": 2, "rates": "r", "validations": 4})
    assert "runs missing" in text and "No budget of these is recommended" in text


def test_an_arm_still_rising_at_the_last_budget_recommends_none():
    cells = bud.budget_cells(SMOKE, ["shared"], (10, 20), 1, MAKE, SUITE, {})
    rows = {c.run_id: _row(60.0 if c.steps == 10 else 62.0) for c in cells}
    s = bud.summarise(cells, rows, own=20)
    assert s["arms"]["shared"]["converged_at"] is None and s["recommended"] is None and s["complete"]
    assert math.isclose(s["arms"]["shared"]["gain"][10], 2.0)
    # one that collapses at the larger budget is marked, not just "converged"
    rows = {c.run_id: _row(60.0 if c.steps == 10 else 40.0) for c in cells}
    s = bud.summarise(cells, rows, own=20)
    meta = {"scale": "smoke", "command": "c", "machine": "m", "date": "d", "seeds": 1, "rates": "r", "validations": 4}
    assert "| 10 (loses 20.0 at a larger budget) |" in bud.markdown(s, (10, 20), meta)


def test_rates_come_from_a_matrix_search_and_ablations_take_the_spectral_rate(tmp_path):
    with pytest.raises(FileNotFoundError, match="no plan.json"):
        bud.chosen_rates(tmp_path, ["shared"])
    (tmp_path / "plan.json").write_text(json.dumps({"lr_choice": {"shared": {"lr": 3e-3}, "speclora": {"lr": 1e-3}}}))
    assert bud.chosen_rates(tmp_path, ["shared", "speclora/no_filtering"]) == {"shared": 3e-3,
                                                                               "speclora/no_filtering": 1e-3}
    with pytest.raises(ValueError, match="chose no rate for 'ortho'"):
        bud.chosen_rates(tmp_path, ["ortho"])
    assert bud.chosen_rates(None, ["ortho"]) == {}


def test_a_given_rate_comes_before_the_matrix_and_bad_ones_are_refused(tmp_path):
    (tmp_path / "plan.json").write_text(json.dumps({"lr_choice": {"shared": {"lr": 3e-3}}}))
    given = bud.parse_rates(["speclora=1e-3", "shared=1e-4"])
    assert given == {"speclora": 1e-3, "shared": 1e-4}
    # an arm the matrix never searched runs at its given rate; a given rate wins over the matrix's choice
    assert bud.chosen_rates(tmp_path, ["shared", "speclora", "speclora/no_filtering"], given) == {
        "shared": 1e-4, "speclora": 1e-3, "speclora/no_filtering": 1e-3}
    assert bud.chosen_rates(None, ["shared", "ortho"], {"shared": 3e-3}) == {"shared": 3e-3}
    with pytest.raises(ValueError, match="--rate for 'ortho', not among the arms' methods; allowed: shared"):
        bud.chosen_rates(None, ["shared"], {"ortho": 1e-3})
    for bad in ("shared", "shared=fast", "=1e-3", "shared=-1e-3"):
        with pytest.raises(ValueError, match="allowed: METHOD=LR with LR a positive number"):
            bud.parse_rates([bad])


def test_the_scale_budget_cells_of_a_matrix_are_reused_not_rerun(tmp_path):
    cells = bud.budget_cells(SMOKE, ["shared"], (10, 20), 1, MAKE, SUITE, {"shared": 3e-3})
    own = next(c for c in cells if c.steps is None)
    src = tmp_path / "matrix" / "runs" / own.run_id
    src.mkdir(parents=True)
    (src / "result.json").write_text(json.dumps(_row(61.0)))
    out = tmp_path / "probe"
    assert bud.reuse(cells, tmp_path / "matrix", out) == 1
    assert json.loads((out / "runs" / own.run_id / "result.json").read_text())["val_best"] == 61.0
    assert bud.reuse(cells, tmp_path / "matrix", out) == 0  # already there


def test_budget_runs_on_the_smoke_scale(tmp_path, data_root):
    out = tmp_path / "probe"
    code = bench_main(["budget", "--scale", "smoke", "--out", str(out), "--steps", "10,20", "--methods", "independent",
                       "--tasks", "rte,stsb", "--data-dir", str(data_root), "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    result = json.loads((out / "budget.json").read_text())
    assert result["meta"]["steps"] == [10, 20] and result["complete"]
    arm = result["arms"]["independent"]
    assert arm["ok"] == {"10": "1/1", "20": "1/1"}
    for run_id, last in (("budget__independent__suite__seed0__steps10", 10), ("main__independent__suite__seed0", 20)):
        curve = json.loads((out / "runs" / run_id / "result.json").read_text())["curves"]["val/average"]
        # its own budget, validated at its last step and at least as often as the scale (10 steps: every 2)
        assert curve[-1][0] == last and len(curve) == (5 if last == 10 else 4)
    assert "| independent |" in (out / "budget.md").read_text()
    # a second run reuses every finished cell
    again = ["budget", "--scale", "smoke", "--out", str(out), "--steps", "10,20", "--methods", "independent",
             "--tasks", "rte,stsb", "--data-dir", str(data_root)]
    assert bench_main(again) == 0
    # a failed cell is kept (the probe is incomplete) unless --retry-failed runs it again
    path = out / "runs" / "budget__independent__suite__seed0__steps10" / "result.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "status": "failed", "error": "SystemExit: 2"}))
    assert bench_main(again) == 1 and json.loads(path.read_text())["status"] == "failed"
    assert bench_main([*again, "--retry-failed"]) == 0 and json.loads(path.read_text())["status"] == "ok"


def test_set_adds_a_fit_option_to_every_cell_and_refuses_the_probes_own():
    sets = bud.parse_sets(["model.regression_target=standard", "model.head_dropout = 0.0"])
    assert sets == ("--model.regression_target", "standard", "--model.head_dropout", "0.0")
    cells = bud.budget_cells(SMOKE, ["shared"], (10, 20), 1, MAKE, SUITE, {"shared": 3e-3}, sets)
    assert all(_arg(c, "--model.regression_target") == "standard" for c in cells) and len(cells) == 2
    assert {_arg(c, "--trainer.max_steps") for c in cells} == {"10", None}  # the budget is still the probe's
    for bad, match in (("model.regression_target", "allowed: KEY=VALUE"), ("=x", "allowed: KEY=VALUE"),
                       ("--model.x=1", "allowed: KEY=VALUE"), ("trainer.max_steps=5", "use --steps instead"),
                       ("model.optim.lr=1e-3", "use --rate instead")):
        with pytest.raises(ValueError, match=match):
            bud.parse_sets([bad])


def test_an_output_folder_keeps_the_set_it_was_run_with(tmp_path):
    out = tmp_path / "probe"
    (out / "runs" / "r").mkdir(parents=True)
    bud.check_sets(out, ("--model.regression_target", "standard"))  # a new folder records its options
    bud.check_sets(out, ("--model.regression_target", "standard"))  # and resumes with the same
    (out / "runs" / "r" / "result.json").write_text("{}")
    with pytest.raises(ValueError, match="holds runs made with --set --model.regression_target standard, not "
                                         r"\(none\); allowed: the same options, or another --out"):
        bud.check_sets(out, ())
    old = tmp_path / "old"  # a folder of runs from before set.json: made without any --set
    (old / "runs" / "r").mkdir(parents=True)
    (old / "runs" / "r" / "result.json").write_text("{}")
    bud.check_sets(old, ())
    (old / "set.json").unlink()
    with pytest.raises(ValueError, match=r"made with --set \(none\)"):
        bud.check_sets(old, ("--model.regression_target", "raw"))
