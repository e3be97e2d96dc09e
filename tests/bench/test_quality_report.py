"""The tables and the CSV from toy results: failures are shown, ITR/IC and Δ come out as computed by hand."""

from __future__ import annotations

import csv

import pytest

from speclora.bench.quality import splice
from speclora.bench.report import ablation_table, against_each, cost_table, markdown, score_table, write_csv


def _row(group, arm, seed, scores, status="ok", **extra):
    row = {"run_id": f"{group}__{arm}__{seed}", "group": group, "arm": arm, "seed": seed, "tasks": list(scores),
           "status": status, "scores": scores if status == "ok" else None,
           "average": sum(scores.values()) / len(scores) if status == "ok" else None,
           "error": None if status == "ok" else "ValueError: boom", "params": {"trainable": 10, "encoder_side": 8},
           "fit_seconds": 2.0, "steps": 4, "peak_rss_mib": 100.0, "conflict": {"rate": 0.5, "mean_cos": 0.1}}
    row.update(extra)
    return row


def _toy():
    rows = []
    for seed in (0, 1):
        rows += [_row("single", "single", seed, {"rte": 50.0}), _row("single", "single", seed, {"copa": 60.0})]
        rows.append(_row("main", "independent", seed, {"rte": 55.0, "copa": 54.0}))  # ITR (1.1 + 0.9)/2 = 1
        rows.append(_row("main", "speclora", seed, {"rte": 40.0 + seed, "copa": 60.0}))
        rows.append(_row("main", "speclora/no_coordination", seed, {"rte": 38.0 + seed, "copa": 60.0}))
    rows.append(_row("main", "shared", 0, {"rte": 0.0, "copa": 0.0}, status="failed"))
    rows.append(_row("main", "shared", 1, {"rte": 0.0, "copa": 0.0}, status="missing"))
    return rows


def test_a_failed_run_is_reported_as_failed_not_dropped():
    rows = _toy()
    table, numbers = score_table(rows, "main", ["independent", "shared", "speclora"], ["rte", "copa"], "single")
    shared = next(line for line in table.splitlines() if line.startswith("| shared"))
    assert shared.split(" | ")[1:4] == ["0/2, 1 failed, 1 not run", "failed", "failed"]
    plan = {"suite": ["rte", "copa"], "fewshot_tasks": [], "skipped": {}}
    meta = {"scale": "smoke", "command": "speclora-bench quality", "machine": "m", "date": "d", "backbone": "b",
            "seeds": 2, "isolation": "inline", "jobs": 1, "threads": 1}
    doc = markdown(rows, plan, meta)
    assert "main__shared__0 | failed | ValueError: boom" in doc
    assert "1 failed, 1 not run" in doc


def test_cost_table_itr_ic_and_ablation_delta():
    rows = _toy()
    table = cost_table(rows, ["independent", "speclora"])
    independent = next(line for line in table.splitlines() if line.startswith("| independent"))
    cells = [c.strip() for c in independent.strip("|").split("|")]
    # ITR = (55/50 + 54/60) / 2 = 1.0 at both seeds; IC = (0 + 6/60) / 2 = 0.05
    assert cells[6:8] == ["1.000 ± 0.000", "0.050 ± 0.000"]
    assert cells[1] == "10 ± 0" and cells[4] == "0.500 ± 0.000"
    # speclora average 50.0 / 50.5, ablation 49.0 / 49.5: Δ = -1 point = -1.99% of 50.25
    abl = ablation_table(rows, ["speclora/no_coordination"], ["rte", "copa"])
    line = next(x for x in abl.splitlines() if x.startswith("| no_coordination"))
    assert "-1.00" in line and "-2.0%" in line


def test_speclora_against_each_baseline_paired_over_seeds():
    rows = _toy()
    table = against_each(rows, "main")
    lines = {x.split(" | ")[0].strip("| "): [c.strip() for c in x.strip("|").split("|")] for x in table.splitlines()[2:]}
    assert list(lines) == ["independent (vanilla LoRA)", "shared"]  # the baselines that ran, in BASELINES' order
    # speclora 50.0 / 50.5, independent 54.5 / 54.5: d = -4.5, -4.0; mean -4.25 = -7.8% of 54.5;
    # half-width t(0.975, 1) * sd / sqrt(2) = 12.706 * 0.3536 / 1.4142 = 3.18; t = -4.25 / 0.25 = -17 on one
    # degree of freedom (a Cauchy law): p = 2 * atan(1 / 17) / pi = 0.037
    # one test in the family (shared has none): Holm leaves its p as it is
    assert lines["independent (vanilla LoRA)"][2:] == ["-4.25", "-7.8%", "[-7.43, -1.07]", "0.037", "0.037", "2",
                                                       "worse"]
    assert lines["shared"][1] == "failed" and lines["shared"][2:4] == ["–", "–"]  # no ok run: no pairing
    assert lines["shared"][6:8] == ["–", "0"]  # no p, no pair
    plan = {"suite": ["rte", "copa"], "fewshot_tasks": [], "skipped": {}}
    meta = {"scale": "smoke", "command": "c", "machine": "m", "date": "d", "backbone": "b", "seeds": 2,
            "isolation": "inline", "jobs": 1, "threads": 1}
    assert "speclora's average against each baseline (suite):" in markdown(rows, plan, meta)


def test_csv_has_one_line_per_run_with_its_status(tmp_path):
    rows = _toy()
    write_csv(rows, tmp_path / "r.csv")
    lines = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert len(lines) == len(rows)
    assert [x["status"] for x in lines if x["method"] == "shared"] == ["failed", "missing"]
    assert lines[0]["score_rte"] == "50.0" and lines[0]["seconds_per_step"] == "0.5"


def test_splice_replaces_only_its_block(tmp_path):
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nintro\n")
    splice(doc, "smoke", "first")
    splice(doc, "cpu", "other")
    splice(doc, "smoke", "second")
    text = doc.read_text()
    assert text.startswith("# Results\n\nintro\n") and "first" not in text
    assert text.count("<!-- quality:smoke:start -->") == 1 and "second" in text and "other" in text


def _with_curves(rows):
    for r in rows:
        if r["status"] == "ok" and r["group"] == "main":
            r["curves"] = {"val/average": [[5, 40.0], [10, 50.0]], "train/loss": [[5, 2.0], [10, 1.0]]}
    return rows


def test_figures_are_drawn_and_logged_to_tensorboard(tmp_path):
    from speclora.bench import plots
    from speclora.bench.quality_figures import write_figures

    if not plots.available():
        pytest.skip("matplotlib is not installed")
    plan = {"suite": ["rte", "copa"], "fewshot_tasks": [], "skipped": {}}
    written = write_figures(_with_curves(_toy()), plan, tmp_path, "tables")
    assert {p.name for p in written} == {f"{name}.{ext}" for name in ("scores_main", "scores_ablations", "curves")
                                         for ext in ("png", "pdf")}
    assert all(p.stat().st_size > 1000 for p in written)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_without_pillow_the_tables_still_come_and_tensorboard_gets_the_curves(tmp_path, monkeypatch):
    from speclora.bench import plots
    from speclora.bench.quality_figures import write_figures

    monkeypatch.setattr(plots, "available", lambda: False)
    plan = {"suite": ["rte", "copa"], "fewshot_tasks": [], "skipped": {}}
    assert write_figures(_with_curves(_toy()), plan, tmp_path, "tables") == []
    assert not (tmp_path / "plots").exists()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_convergence_says_whether_the_mean_curve_is_flat_and_the_report_shows_the_search():
    from speclora.bench.quality_search import Choice

    rows = _toy()
    for r in rows:
        if r["status"] == "ok" and r["group"] == "main":
            rising = r["arm"] == "speclora"  # speclora still climbs 4 points over the last fifth
            r["curves"] = {"val/average": [[10, 40.0], [20, 50.0], [30, 55.0], [40, 56.0 if rising else 60.0],
                                           [50, 60.0]]}
    plan = {"suite": ["rte", "copa"], "fewshot_tasks": [], "skipped": {},
            "lr_choice": {"independent": Choice("independent", {1e-3: 51.0, 3e-3: 52.5}, 3e-3).to_json()}}
    meta = {"scale": "cpu", "command": "c", "machine": "m", "date": "d", "backbone": "b", "seeds": 2,
            "isolation": "inline", "jobs": 1, "threads": 1, "lr_grid": [1e-3, 3e-3]}
    search = [_row("main", "independent", 0, {"rte": 1.0, "copa": 1.0}, run_id="extra", lr=1e-3)]
    doc = markdown(rows, plan, meta, search)
    conv = doc.split("### Convergence")[1].split("###")[0]
    assert "| independent |" in conv and "| 0.0 (2) | yes |" in conv.split("| independent |")[1].split("\n")[0]
    assert "| 4.0 (2) | no (rises +4.0) |" in conv.split("| speclora |")[1].split("\n")[0]
    assert "| method \\ step | 10 | 20 | 30 | 40 | 50 |" in conv and "| speclora | 40.0 | 50.0 | 55.0 | 56.0 | 60.0 |" in conv
    assert "| independent | 1e-3: 51.0 · **3e-3: 52.5** | 3e-3 (the highest of its grid) | every cell |" in doc
    assert "Chosen at an end of the grid: independent (highest)." in doc
    assert "grid {1e-3, 3e-3} (full_ft: {2e-5, 5e-5, 1e-4})" in doc
    assert "runs: 13 (12 in the matrix, 1 more in the learning-rate search)" in doc


def test_search_figure_has_one_panel_per_method_and_one_curve_per_rate():
    from speclora.bench.quality_figures import search_curves

    curve = [[10, 40.0], [20, 50.0]]
    rows = [_row("main", arm, 0, {"rte": 1.0}, lr=lr, curves={"val/average": curve})
            for arm in ("shared", "hyperformer") for lr in (3e-3, 3e-4)]
    rows.append(_row("single", "single", 0, {"rte": 1.0}, lr=1e-3, curves={"val/average": curve}))
    rows.append(_row("main", "shared", 0, {"rte": 1.0}, status="failed", lr=1e-3))
    panels = search_curves(rows)
    assert [(title, list(series)) for title, _, series in panels] == [
        ("shared: val/average by rate", ["lr 3e-4", "lr 3e-3"]), ("hyperformer: val/average by rate", ["lr 3e-4", "lr 3e-3"])]
    rows.reverse()  # panels in the methods' order whatever the order of the runs
    assert [title for title, _, _ in search_curves(rows)][0].startswith("shared")
    assert panels[0][2]["lr 3e-4"] == ([10.0, 20.0], [40.0, 50.0], [0.0, 0.0])


def test_a_report_of_an_unfinished_matrix_says_what_to_run(tmp_path):
    from speclora.bench.quality import report

    (tmp_path / "plan.json").write_text("{}")  # planned, still running: no meta.json yet
    with pytest.raises(FileNotFoundError, match=r"meta\.json not found: run `speclora-bench quality` with --out"):
        report(tmp_path)
