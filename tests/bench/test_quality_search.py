"""The learning-rate search of the quality matrix: its cells, the choice on validation scores, the rates used."""

from __future__ import annotations

import pytest

from speclora.bench.quality_scales import REPO_CONFIGS, SCALES, Cell, CellFactory, fmt_rate, plan_matrix
from speclora.bench.quality_search import (
    Choice,
    at_edge,
    beyond,
    choose,
    grid_of,
    parse_grid,
    rate_cells,
    rate_line,
    rates,
    search_cells,
    search_table,
    snap,
    tuned_arms,
    widened,
)

MAKE = CellFactory(REPO_CONFIGS, "b")
SUITE = ["rte", "stsb"]


def _ok(val: float) -> dict:
    return {"status": "ok", "val_best": val}


def test_the_search_runs_each_method_and_single_at_each_rate_of_its_grid():
    arms = ("independent", "full_ft", "speclora/no_filtering")
    assert tuned_arms(arms) == ["independent", "full_ft", "speclora", "single"]
    cells = search_cells(SCALES["smoke"], arms, (1e-3, 3e-3), MAKE, SUITE)
    # rate by rate, the highest first, so that a search stopped early holds whole rates
    assert [(c.group, c.arm, c.lr, c.tasks) for c in cells] == [
        ("main", "independent", 3e-3, ("rte", "stsb")), ("main", "full_ft", 1e-4, ("rte", "stsb")),
        ("main", "speclora", 3e-3, ("rte", "stsb")),
        ("single", "single", 3e-3, ("rte",)), ("single", "single", 3e-3, ("stsb",)),
        ("main", "independent", 1e-3, ("rte", "stsb")), ("main", "full_ft", 5e-5, ("rte", "stsb")),
        ("main", "speclora", 1e-3, ("rte", "stsb")),
        ("single", "single", 1e-3, ("rte",)), ("single", "single", 1e-3, ("stsb",)),
        ("main", "full_ft", 2e-5, ("rte", "stsb"))]
    assert all(c.seed == 0 for c in cells)
    # the rate comes after the method's config, so it wins over full_ft.yaml's own model.optim.lr
    full = cells[-1].args
    assert full.index("--model.optim.lr") > full.index(str(REPO_CONFIGS / "methods" / "full_ft.yaml"))
    assert full[full.index("--model.optim.lr") + 1] == "2e-5"


def test_the_seed0_matrix_cell_at_the_chosen_rate_is_the_search_run():
    cells = search_cells(SCALES["smoke"], ("independent",), (1e-3, 3e-3), MAKE, SUITE)
    plan = plan_matrix(SCALES["smoke"], ("independent",), 2, REPO_CONFIGS, "b", fewshot=False, one_task=(),
                       suite=SUITE, lrs={"independent": 3e-3, "single": 1e-3})
    searched = {c.run_id: c.args for c in cells}
    seed0 = [c for c in plan.cells if c.seed == 0]
    assert [c.run_id for c in seed0] == ["main__independent__suite__seed0__lr3e-3", "single__single__rte__seed0__lr1e-3",
                                         "single__single__stsb__seed0__lr1e-3"]
    assert all(searched[c.run_id] == c.args for c in seed0)  # same run id, same command
    assert all(c.run_id not in searched for c in plan.cells if c.seed == 1)


def test_choice_is_the_best_validation_score_ties_to_the_smaller_rate():
    cells = search_cells(SCALES["smoke"], ("independent", "shared"), (3e-4, 1e-3, 3e-3), MAKE, ["rte"])
    val = {("independent", 3e-4): 50.0, ("independent", 1e-3): 61.5, ("independent", 3e-3): 60.0,
           ("shared", 3e-4): 55.0, ("shared", 1e-3): 55.0, ("shared", 3e-3): 54.0,
           ("single", 3e-4): 40.0, ("single", 1e-3): 45.0, ("single", 3e-3): 70.0}
    rows = {c.run_id: _ok(val[c.arm, c.lr]) for c in cells}
    # test scores are never read: a test average that would pick another rate changes nothing
    rows[cells[0].run_id]["average"] = 99.0
    got = choose(cells, rows)
    assert {a: c.lr for a, c in got.items()} == {"independent": 1e-3, "shared": 3e-4, "single": 3e-3}
    assert got["independent"].scores == {3e-4: 50.0, 1e-3: 61.5, 3e-3: 60.0}
    assert rates(("independent", "shared", "speclora/no_filtering"), got) == {
        "independent": 1e-3, "shared": 3e-4, "speclora/no_filtering": None, "single": 3e-3}


def test_several_search_seeds_score_a_rate_by_their_mean_so_a_rate_one_seed_survives_loses():
    with pytest.raises(ValueError, match="--search-seeds=0; allowed"):
        search_cells(SCALES["smoke"], ("shared",), (1e-3,), MAKE, SUITE, seeds=0)
    cells = search_cells(SCALES["smoke"], ("shared",), (1e-3, 3e-3), MAKE, ["rte"], seeds=2)
    assert [(c.arm, c.lr, c.seed) for c in cells if c.arm == "shared"] == [
        ("shared", 3e-3, 0), ("shared", 3e-3, 1), ("shared", 1e-3, 0), ("shared", 1e-3, 1)]
    # 3e-3 is best on seed 0 and collapses on seed 1 (the cpu matrix's shared and unolora_star, 2026-12-01)
    val = {(3e-3, 0): 70.0, (3e-3, 1): 40.0, (1e-3, 0): 68.0, (1e-3, 1): 67.0}
    rows = {c.run_id: _ok(val[c.lr, c.seed] if c.arm == "shared" else 50.0) for c in cells}
    one = choose([c for c in cells if c.seed == 0], rows)["shared"]
    two = choose(cells, rows)["shared"]
    assert one.lr == 3e-3 and two.lr == 1e-3 and two.scores == {1e-3: 67.5, 3e-3: 55.0}
    # the matrix's seed-0 and seed-1 cells at the chosen rate are search runs, not run twice
    plan = plan_matrix(SCALES["smoke"], ("shared",), 3, REPO_CONFIGS, "b", fewshot=False, one_task=(),
                       suite=["rte"], lrs={"shared": 1e-3, "single": 1e-3})
    searched = {c.run_id for c in cells}
    assert [c.seed for c in plan.cells if c.run_id in searched and c.arm == "shared"] == [0, 1]
    assert "mean over seeds 0–1" in search_table({"shared": two.to_json()}, ["shared"], seeds=2)


def test_single_is_scored_by_the_mean_over_the_suite_and_needs_every_task():
    cells = search_cells(SCALES["smoke"], ("independent",), (1e-3, 3e-3), MAKE, SUITE)
    single = {(c.lr, c.tasks[0]): c.run_id for c in cells if c.arm == "single"}
    rows = {c.run_id: _ok(10.0) for c in cells if c.arm == "independent"}
    rows[single[1e-3, "rte"]] = _ok(50.0)
    rows[single[1e-3, "stsb"]] = _ok(20.0)  # mean 35
    rows[single[3e-3, "rte"]] = _ok(90.0)  # stsb missing at 3e-3: no score there
    got = choose(cells, rows)["single"]
    assert got.scores == {1e-3: 35.0, 3e-3: None} and got.lr == 1e-3


def test_an_arm_whose_search_failed_says_so_and_runs_at_its_configs_rate():
    cells = search_cells(SCALES["smoke"], ("independent",), (1e-3,), MAKE, ["rte"])
    rows = {c.run_id: {"status": "failed", "val_best": None} for c in cells}
    got = choose(cells, rows)
    assert got["independent"].lr is None and got["independent"].note == "every search run failed (1)"
    assert choose(cells, {})["independent"].note == "search not run yet"
    table = search_table({a: c.to_json() for a, c in got.items()}, ["independent", "single"])
    assert "| independent | 1e-3: failed | configs' rate (every search run failed (1)) |" in table
    assert Choice.from_json(got["independent"].to_json()) == got["independent"]


def test_table_marks_the_chosen_rate():
    choice = Choice("shared", {3e-4: 50.0, 1e-3: 61.25, 3e-3: None}, 1e-3)
    table = search_table({"shared": choice.to_json()}, ["shared"])
    assert "| shared | 3e-4: 50.0 · **1e-3: 61.2** · 3e-3: – | 1e-3 | every cell |" in table
    assert "end of the grid" not in table  # 3e-3 not scored yet: no edge to speak of


@pytest.mark.parametrize(("scores", "edge"), [
    ({3e-4: 50.0, 1e-3: 60.0, 3e-3: 70.0}, "highest"),
    ({3e-4: 70.0, 1e-3: 60.0, 3e-3: 50.0}, "lowest"),
    ({3e-4: 50.0, 1e-3: 70.0, 3e-3: 60.0}, ""),
    ({1e-3: 70.0}, ""),  # a grid of one rate has no inside
    ({3e-4: None, 1e-3: 70.0, 3e-3: 60.0}, ""),  # 3e-4 not scored: can't tell yet
])
def test_a_rate_chosen_at_an_end_of_the_grid_is_named(scores, edge):
    best = max((v, -lr) for lr, v in scores.items() if v is not None)
    choice = Choice("shared", scores, -best[1])
    assert at_edge(choice) == edge
    table = search_table({"shared": choice.to_json()}, ["shared"])
    if edge:
        assert f"| {fmt_rate(choice.lr)} (the {edge} of its grid) |" in table
        assert f"Chosen at an end of the grid: shared ({edge})." in table and "--lr-grid" in table
    else:
        assert "of its grid" not in table and "end of the grid" not in table


@pytest.mark.parametrize("text", ["", "0", "1e-3,-1", "fast", "nan"])
def test_a_bad_grid_names_the_flag(text):
    with pytest.raises(ValueError, match=r"--lr-grid=.*allowed: a comma list of positive numbers"):
        parse_grid(text)


def test_grid_parsing_and_rate_spelling():
    assert parse_grid("3e-3, 1e-3,1e-3") == (1e-3, 3e-3)
    assert grid_of("full_ft", (1e-3,)) == (2e-5, 5e-5, 1e-4) and grid_of("shared", (1e-3,)) == (1e-3,)
    assert [fmt_rate(x) for x in (3e-4, 1e-3, 0.003, 2.5e-5, 1.0)] == ["3e-4", "1e-3", "3e-3", "2.5e-5", "1e0"]


def test_search_seeds_reach_the_planned_search_runs(tmp_path, capsys):
    from speclora.bench.quality import main

    main(["quality", "--scale", "smoke", "--out", str(tmp_path), "--methods", "shared", "--no-fewshot",
          "--no-single", "--lr-grid", "1e-3", "--search-seeds", "2", "--dry-run"])
    printed = capsys.readouterr().out
    assert "[lr search] main__shared__suite__seed0__lr1e-3:" in printed
    assert "[lr search] main__shared__suite__seed1__lr1e-3:" in printed
    assert "seed2" not in printed


def test_the_rate_past_an_end_of_a_grid_steps_on_the_grids_own_ratio_snapped_to_the_ladder():
    assert [snap(x) for x in (9e-3, 3.3e-2, 4e-4, 8e-6, 3e-3, 0.0010000001)] == [1e-2, 3e-2, 5e-4, 1e-5, 3e-3, 1e-3]
    grid = (3e-4, 1e-3, 3e-3)
    assert beyond(grid, "highest") == 1e-2 and beyond(grid, "lowest") == 1e-4
    assert beyond((*grid, 1e-2), "highest") == 3e-2
    assert beyond((2e-5, 5e-5, 1e-4), "highest") == 2e-4 and beyond((2e-5, 5e-5, 1e-4, 2e-4), "highest") == 5e-4
    # a grid finer than the ladder would snap back onto its own end: the step is taken unrounded instead
    assert beyond((1e-3, 1.1e-3), "highest") == 1.2e-3 and beyond((1e-3, 1.1e-3), "lowest") == 9.1e-4
    for rates_, edge in (((1e-3,), "highest"), ((1e-3, 3e-3), "middle")):
        with pytest.raises(ValueError, match="allowed: two or more rates and 'highest' or 'lowest'"):
            beyond(rates_, edge)


def _widen(val, widen=2, arms=("shared", "independent", "full_ft"), done=None):
    """The widened search of ``arms`` (and single) on RTE, every cell finished with ``val(arm, lr)`` (None: not
    run; a string: that status) except where ``done(arm, lr)`` is False."""
    scale, grid = SCALES["smoke"], (3e-4, 1e-3, 3e-3)

    def rows(cells):
        out = {}
        for c in cells:
            v = val(c.arm, c.lr)
            if v is not None and (done is None or done(c.arm, c.lr)):
                out[c.run_id] = _ok(v) if not isinstance(v, str) else {"status": v, "val_best": None}
        return out

    base = search_cells(scale, arms, grid, MAKE, ["rte"])
    cells = widened(base, rows, grid, widen, lambda arm, lr: rate_cells(scale, MAKE, arm, lr, ["rte"]))
    assert cells[:len(base)] == base  # the grid's cells first, as they were
    return {arm: c for arm, c in choose(cells, rows(cells)).items()}, cells[len(base):]


def test_an_arm_chosen_at_an_end_of_its_grid_tries_the_rates_past_it_up_to_the_widening():
    def val(arm, lr):  # shared climbs up to 1e-2, independent peaks inside its grid, full_ft climbs on and on,
        if arm == "shared":  # single is best at the bottom
            return {3e-4: 60.0, 1e-3: 65.0, 3e-3: 70.0, 1e-2: 72.0, 3e-2: 50.0}[lr]
        if arm == "independent":
            return {3e-4: 60.0, 1e-3: 70.0, 3e-3: 65.0}[lr]
        return 1000 * lr if arm == "full_ft" else {3e-5: 62.0, 1e-4: 61.0, 3e-4: 60.0, 1e-3: 55.0,
                                                   3e-3: 50.0}[lr]

    choices, added = _widen(val)
    assert [(c.arm, c.lr) for c in added] == [("shared", 1e-2), ("full_ft", 2e-4), ("single", 1e-4),
                                             ("shared", 3e-2), ("full_ft", 5e-4), ("single", 3e-5)]
    assert {a: c.lr for a, c in choices.items()} == {"shared": 1e-2, "independent": 1e-3, "full_ft": 5e-4,
                                                    "single": 3e-5}
    # shared came back inside; full_ft ran out of widening at the top, single at the bottom: still marked
    assert [at_edge(choices[a]) for a in ("shared", "full_ft", "single")] == ["", "highest", "lowest"]
    assert list(choices["shared"].scores) == [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
    assert all(c.tasks == ("rte",) and c.seed == 0 and f"--model.optim.lr {fmt_rate(c.lr)}" in " ".join(c.args)
               for c in added)
    assert _widen(val, widen=0)[1] == ()  # a fixed grid
    assert [(c.arm, c.lr) for c in _widen(val, widen=1)[1]] == [("shared", 1e-2), ("full_ft", 2e-4), ("single", 1e-4)]


def test_widening_waits_for_every_rate_and_a_failed_rate_past_the_end_stops_it():
    def val(arm, lr):
        return "failed" if lr == 1e-2 else 100 * lr if arm == "shared" else 50.0

    choices, added = _widen(val, arms=("shared",))
    # 1e-2 failed: shared stays at 3e-3, with nothing more tried above it; single ties everywhere: the smallest
    assert [(c.arm, c.lr) for c in added] == [("shared", 1e-2)] + [("single", 1e-4), ("single", 3e-5)]
    assert choices["shared"].lr == 3e-3 and choices["shared"].failed and at_edge(choices["shared"]) == ""
    # 3e-4 not run yet: no choice at an end can be told, so nothing is added until it is
    assert _widen(val, arms=("shared",), done=lambda arm, lr: lr != 3e-4)[1] == ()


def test_the_report_line_says_how_the_grid_was_widened():
    assert rate_line({"lr_grid": [1e-3, 3e-3], "lr_widen": 2, "search_seeds": 1}).startswith(
        "chosen per method on the validation split from the grid {1e-3, 3e-3} (full_ft: {2e-5, 5e-5, 1e-4}), "
        "widened by up to 2 rates past an end of a method's grid while its best rate was at that end, seed 0, ")
    assert "widened" not in rate_line({"lr_grid": [1e-3], "search_seeds": 1})  # a matrix from before widening
    assert "widened by up to 1 rate past" in rate_line({"lr_grid": [1e-3], "lr_widen": 1})
    assert rate_line({"lr_grid": None}) == "every method at its configs' rate (no search: `--lr-grid none`)"


def test_a_widened_search_runs_resumes_and_plans_the_matrix_at_its_choice(tmp_path, monkeypatch, capsys):
    import json

    from speclora.bench import quality, quality_run

    def val(arm, lr):  # independent climbs past its grid's top, shared peaks inside, single is best at the bottom
        return {"independent": 100 * lr, "shared": 50.0 - abs(lr - 1e-3)}.get(arm, 60.0 - 1000 * lr)

    ran = []

    def fake_run(cell, run_dir, *args):
        ran.append(cell.run_id)
        result = {"run_id": cell.run_id, "group": cell.group, "arm": cell.arm, "seed": cell.seed,
                  "tasks": list(cell.tasks), "status": "ok", "val_best": val(cell.arm, cell.lr), "average": 50.0}
        (run_dir / "result.json").write_text(json.dumps(result))
        return result

    monkeypatch.setattr(quality_run, "run_cell", fake_run)
    monkeypatch.setattr(quality, "report", lambda out, doc: out / "results.md")  # the tables: the runner's tests
    argv = ["quality", "--scale", "smoke", "--out", str(tmp_path), "--methods", "independent,shared", "--tasks",
            "rte", "--seeds", "2", "--no-fewshot", "--one-task", "", "--backbone", "b", "--lr-grid",
            "3e-4,1e-3,3e-3", "--lr-widen", "1"]
    with pytest.raises(SystemExit, match="--lr-widen=-1; allowed: an integer >= 0"):
        quality.main([*argv, "--lr-widen", "-1"])
    assert quality.main(argv) == 0
    printed = capsys.readouterr().out
    assert ("learning-rate search widened past an end of a grid: main__independent__suite__seed0__lr1e-2, "
            "single__single__rte__seed0__lr1e-4") in printed
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert {a: c["lr"] for a, c in plan["lr_choice"].items()} == {"independent": 1e-2, "shared": 1e-3,
                                                                 "single": 1e-4}
    assert {Cell.from_json(c).run_id for c in plan["cells"]} == {
        f"main__{arm}__suite__seed{s}__lr{lr}" for arm, lr in (("independent", "1e-2"), ("shared", "1e-3"))
        for s in (0, 1)} | {f"single__single__rte__seed{s}__lr1e-4" for s in (0, 1)}
    assert json.loads((tmp_path / "meta.json").read_text())["lr_widen"] == 1
    # shared's rate was chosen by the end of the grid: its seed 1 ran in the widening round, after its search runs
    assert "learning-rate search and 2 matrix cells of the methods whose rate is chosen" in printed
    assert (ran.index("main__independent__suite__seed0__lr1e-2") < ran.index("main__shared__suite__seed1__lr1e-3")
            < ran.index("main__independent__suite__seed1__lr1e-2"))
    assert len(ran) == len(set(ran)) == 14  # 9 on the grid, 2 past it, seed 1 of 3 arms: nothing twice
    # a second invocation finds the same widened search from the runs on disk, and runs nothing
    monkeypatch.setattr(quality_run, "run_cell", lambda *a: pytest.fail("a finished run ran again"))
    assert quality.main(argv) == 0
    assert "learning-rate search: 11 cells, 11 already done, 0 to run" in capsys.readouterr().out
    quality.main([*argv, "--dry-run"])
    assert "[lr search] main__independent__suite__seed0__lr1e-2:" in capsys.readouterr().out
