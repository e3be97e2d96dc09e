"""speclora-bench quality end to end on the smoke scale (tiny random encoder), resume, failures, few-shot."""

from __future__ import annotations

import csv
import json

import pytest

from speclora.bench import code_commit, quality, quality_run
from speclora.bench.isolation import differences
from speclora.bench.quality_pool import CellPool
from speclora.bench.quality_scales import (
    REPO_CONFIGS,
    SCALES,
    Cell,
    CellFactory,
    Plan,
    arm_configs,
    fewshot_availability,
    fmt_rate,
    plan_matrix,
    select_arms,
)
from speclora.bench.quality_search import search_cells


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, data_root, tiny_backbone):
    """Two tasks, the spectral method, one baseline and one ablation, two seeds, the single-task case on RTE,
    each method's learning rate chosen from two rates."""
    out = tmp_path_factory.mktemp("bench") / "smoke"
    cache = tmp_path_factory.getbasetemp() / "token_cache"
    argv = ["quality", "--scale", "smoke", "--out", str(out), "--methods", "independent,speclora,speclora/no_coordination",
            "--seeds", "2", "--tasks", "rte,stsb", "--one-task", "rte", "--no-fewshot", "--backbone", tiny_backbone,
            "--data-dir", str(data_root), "--cache-dir", str(cache), "--lr-grid", "3e-3,1e-3"]
    assert quality.main(argv) == 0
    return out, argv


def test_the_smoke_matrix_writes_every_table(smoke):
    out, _ = smoke
    lines = list(csv.DictReader((out / "results.csv").open()))
    assert {r["status"] for r in lines} == {"ok"}, [r["error"] for r in lines]
    rows = [r for r in lines if r["role"] == "matrix"]
    # 3 arms x 2 seeds, single x 2 tasks x 2 seeds, speclora on RTE alone x 2 seeds
    assert len(rows) == 12
    # and the search runs at the rates not chosen: independent, speclora, single on 2 tasks
    assert len(lines) == 16 and {r["seed"] for r in lines if r["role"] == "lr search"} == {"0"}
    assert {(r["group"], r["method"]) for r in rows} == {
        ("main", "independent"), ("main", "speclora"), ("main", "speclora/no_coordination"),
        ("single", "single"), ("one_task", "speclora")}
    for r in rows:
        assert float(r["trainable_params"]) > 0 and float(r["fit_seconds"]) > 0 and float(r["peak_rss_mib"]) > 0
        assert r["conflict_rate"] != "" or r["group"] != "main"
    doc = (out / "results.md").read_text()
    assert f"- code: {code_commit()} (16 runs)" in doc  # the code every run ran, kept in its result.json
    for title in ("Table 5", "Table 6", "Convergence", "Table 7", "Single-task case", "Significance", "Learning rates",
                  "smoke run on a tiny random encoder", "Mean validation average (over seeds) at each validation step"):
        assert title in doc
    table5 = doc.split("### Table 5")[1].split("###")[0]
    assert "| speclora | 2/2 |" in table5 and "| single (reference, one run per task) | 4/4 |" in table5
    assert "| no_coordination | 2/2 |" in doc
    for png in ("scores_main", "scores_ablations", "curves", "lr_search", "spectrum", "coordination"):
        assert (out / "plots" / f"{png}.png").stat().st_size > 1000
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    lr = json.loads((out / "plan.json").read_text())["lr_choice"]["speclora"]["lr"]
    run = out / "runs" / f"main__speclora__suite__seed0__lr{fmt_rate(lr)}"
    spectral = json.loads((run / "result.json").read_text())
    assert spectral["spectral"]["num_nodes"] == 2 * 2 * 8  # 2 (A, B) x T=2 x 8 slots of the tiny BERT
    assert spectral["curves"]["val/average"] and not list(out.rglob("*.ckpt"))
    one = json.loads((out / "runs" / f"one_task__speclora__rte__seed0__lr{fmt_rate(lr)}" / "result.json").read_text())
    # one task: the graph keeps its intra-task and inter-layer edges and has no inter-task edge
    edges = one["spectral"]["edges"]
    assert edges["inter_task"] == 0 and edges["intra"] > 0 and edges["inter_layer"] > 0
    assert one["scores"].keys() == {"rte"}


def test_each_method_runs_at_the_rate_with_the_best_validation_score(smoke):
    out, _ = smoke
    plan = json.loads((out / "plan.json").read_text())
    search = [Cell.from_json(c) for c in plan["search"]]
    assert {(c.arm, c.lr) for c in search} == {(a, lr) for a in ("independent", "speclora", "single")
                                                 for lr in (1e-3, 3e-3)}
    assert all(c.seed == 0 and f"--model.optim.lr {fmt_rate(c.lr)}" in " ".join(c.args) for c in search)
    results = {c.run_id: json.loads((out / "runs" / c.run_id / "result.json").read_text()) for c in search}
    for arm in ("independent", "speclora", "single"):
        val = {}  # rate -> validation score: the run's best val/average (single: mean over its tasks)
        for c in (c for c in search if c.arm == arm):
            val.setdefault(c.lr, []).append(results[c.run_id]["val_best"])
        val = {lr: sum(v) / len(v) for lr, v in val.items()}
        chosen = plan["lr_choice"][arm]["lr"]
        assert val[chosen] == max(val.values()), (arm, val, chosen)
        assert dict(plan["lr_choice"][arm]["scores"]) == pytest.approx(val)
    cells = [Cell.from_json(c) for c in plan["cells"]]
    rate = {a: plan["lr_choice"][a]["lr"] for a in ("independent", "speclora", "single")}
    for c in cells:  # every cell at its method's rate; the ablation at speclora's
        assert c.lr == rate["speclora" if c.arm.startswith("speclora") else c.arm], c.run_id
    # the seed-0 cells at the chosen rates are the search runs themselves: nothing ran twice
    assert {c.run_id for c in cells if c.seed == 0 and c.arm != "speclora/no_coordination" and c.group != "one_task"} <= {
        c.run_id for c in search}
    assert len(list((out / "runs").iterdir())) == 16
    doc = (out / "results.md").read_text()
    table = doc.split("### Learning rates")[1].split("###")[0]
    assert f"**{fmt_rate(rate['speclora'])}: " in table.split("| speclora |")[1].split("\n")[0]


def test_resume_skips_finished_runs(smoke, monkeypatch, capsys):
    out, argv = smoke
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/result.json")}

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(quality_run, "run_cell", must_not_run)  # where the runner calls it
    assert quality.main(argv) == 0
    printed = capsys.readouterr().out
    assert "learning-rate search: 8 cells, 8 already done, 0 to run" in printed
    assert "quality matrix: 12 cells, 12 already done, 0 to run" in printed
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/result.json")} == before
    assert json.loads((out / "meta.json").read_text())["this_invocation_ran"] == 0  # the second run ran nothing
    # the matrix's wall time comes from its runs, so a second invocation that ran nothing leaves it as it was
    wall = (out / "results.md").read_text().split("- matrix wall time: ")[1].split(" h ")[0]
    assert float(wall) > 0


def test_cells_run_in_a_pool_give_the_results_of_inline_runs(smoke, tmp_path):
    """Three cells of the matrix (the spectral method, a baseline, a single-task reference) one after the other
    in one pool worker: every measure of result.json and spectral.npz as in the inline run, timings aside."""
    out, _ = smoke
    plan = Plan.from_json(json.loads((out / "plan.json").read_text()))
    picked = [next(c for c in plan.cells if c.seed == 1 and (c.group, c.arm) == key)
              for key in (("main", "speclora"), ("main", "independent"), ("single", "single"))]
    with CellPool(1, tmp_path / "pool", threads=1) as pool:
        rows = quality.run_plan(Plan(tuple(picked), plan.suite, (), {}), tmp_path, isolation="pool", threads=1,
                                conflict_batches=SCALES["smoke"].conflict_batches, pool=pool, progress=lambda s: None)
    assert [r["status"] for r in rows] == ["ok"] * 3 and len(pool.started) == 1
    assert (tmp_path / "runs" / picked[0].run_id / "spectral.npz").is_file()
    assert [d for c in picked for d in differences(c.run_id, out, tmp_path)] == []


def test_a_failing_run_is_reported_as_failed(tmp_path, tiny_backbone, data_root):
    good = plan_matrix(SCALES["smoke"], ("independent",), 1, REPO_CONFIGS, tiny_backbone, str(data_root),
                       fewshot=False, one_task=(), suite=["rte"])
    bad = Cell("main", "shared", 0, ("rte",), (*good.cells[0].args, "--model.lora.r", "0"))
    plan = Plan((bad,), ("rte",), (), {})
    (tmp_path / quality.PLAN).write_text(json.dumps(plan.to_json()))
    (tmp_path / quality.META).write_text(json.dumps({"scale": "smoke", "command": "x", "machine": "m", "date": "d",
                                                     "backbone": "b", "seeds": 1, "isolation": "inline", "jobs": 1,
                                                     "threads": 1}))
    rows = quality.run_plan(plan, tmp_path, progress=lambda s: None)
    assert rows[0]["status"] == "failed" and "lora.r" in rows[0]["error"]
    doc = quality.report(tmp_path).read_text()
    assert "| shared | 0/1, 1 failed | failed | failed |" in doc
    assert "main__shared__suite__seed0 | failed |" in doc
    line = next(csv.DictReader((tmp_path / "results.csv").open()))
    assert line["status"] == "failed" and "lora.r" in line["error"]


def test_fewshot_cells_use_published_subsets_and_skip_tasks_without_a_dev_set(data_root):
    why = fewshot_availability(["mnli", "qqp", "qnli", "boolq", "record", "rte"], str(data_root))
    assert why["qnli"] is None and why["boolq"] is None
    assert "dev_matched" in why["mnli"] and "ReCoRD" in why["record"] and "no published" in why["rte"]
    plan = plan_matrix(SCALES["smoke"], select_arms("independent,speclora", REPO_CONFIGS), 2, REPO_CONFIGS, "b",
                       str(data_root), fewshot_tasks=["mnli", "qnli", "boolq"])
    assert plan.fewshot_tasks == ("qnli", "boolq") and "fewshot/mnli" in plan.skipped
    few = [c for c in plan.cells if c.group == "fewshot"]
    assert [json.loads(c.args[c.args.index("--data.subset") + 1]) for c in few] == [
        {"qnli": "k-shot-13", "boolq": "fewglue"}] * 2 + [{"qnli": "k-shot-21", "boolq": "fewglue"}] * 2
    singles = [c for c in plan.cells if c.group == "fewshot_single"]
    assert [c.tasks for c in singles] == [("qnli",), ("boolq",)] * 2
    assert all(str(REPO_CONFIGS / "bench" / "smoke_fewshot.yaml") in c.args for c in few + singles)


def test_fewshot_datamodule_mixes_lmbff_and_fewglue_and_tests_on_the_official_dev_set(data_root, tiny_backbone,
                                                                                       tmp_path_factory):
    from speclora.data.datamodule import MultiTaskDataModule

    dm = MultiTaskDataModule(tasks=["qnli", "boolq"], data_dir=str(data_root), tokenizer=tiny_backbone, max_length=32,
                             subset={"qnli": "k-shot-13", "boolq": "fewglue"},
                             cache_dir=str(tmp_path_factory.getbasetemp() / "token_cache"))
    dm.setup("fit")
    assert dm.train_sizes == [32, 32]  # LM-BFF 16 per label x 2; FewGLUE 32
    assert [len(p) for _, p in dm._parts["validation"]] == [32, 32]  # the subsets' dev files
    assert [len(p) for _, p in dm._parts["test"]] == [5463, 3270]  # the full official dev sets
    with pytest.raises(ValueError, match="not in data.tasks"):
        MultiTaskDataModule(tasks=["qnli"], subset={"boolq": "fewglue"})


def test_every_arm_has_a_config_and_selection_is_checked():
    arms = select_arms("all", REPO_CONFIGS)
    assert "speclora" in arms and "speclora/no_filtering" in arms and "single" not in arms
    assert select_arms("methods", REPO_CONFIGS)[-1] == "speclora"
    with pytest.raises(ValueError, match="unknown arm 'nope'"):
        select_arms("independent,nope", REPO_CONFIGS)


def test_a_variant_arm_layers_its_config_on_speclora_and_runs_only_when_named(tmp_path):
    assert "speclora/legacy" not in select_arms("all", REPO_CONFIGS)  # variants are not ablations
    assert select_arms("speclora,speclora/legacy,speclora/carry_index", REPO_CONFIGS) == (
        "speclora", "speclora/legacy", "speclora/carry_index")
    methods = REPO_CONFIGS / "methods"
    assert arm_configs("speclora/legacy", REPO_CONFIGS) == [methods / "speclora.yaml", methods / "speclora_legacy.yaml"]
    assert arm_configs("speclora/no_filtering", REPO_CONFIGS) == [
        methods / "speclora.yaml", methods / "speclora_ablations" / "no_filtering.yaml"]
    plan = plan_matrix(SCALES["smoke"], ("speclora", "speclora/legacy"), 1, REPO_CONFIGS, "b", fewshot=False,
                       one_task=(), suite=["rte", "stsb"])
    cell = next(c for c in plan.cells if c.arm == "speclora/legacy")
    assert cell.run_id == "main__speclora-legacy__suite__seed0"
    configs = [cell.args[i + 1] for i, a in enumerate(cell.args) if a == "--config"]
    assert configs[-2:] == [str(methods / "speclora.yaml"), str(methods / "speclora_legacy.yaml")]
    # a name that is both an ablation and a variant is refused, naming both files
    fake = tmp_path / "configs"
    (fake / "methods" / "speclora_ablations").mkdir(parents=True)
    for f in ("speclora.yaml", "speclora_x.yaml", "speclora_ablations/x.yaml"):
        (fake / "methods" / f).write_text("{}\n")
    with pytest.raises(ValueError, match="ambiguous"):
        arm_configs("speclora/x", fake)
    with pytest.raises(ValueError, match="has no config"):
        arm_configs("speclora/nope", REPO_CONFIGS)


def test_no_single_leaves_out_the_reference_cells_and_their_search():
    arms = ("speclora", "speclora/legacy")
    with_ref = plan_matrix(SCALES["smoke"], arms, 2, REPO_CONFIGS, "b", fewshot=False, one_task=(), suite=["rte"])
    without = plan_matrix(SCALES["smoke"], arms, 2, REPO_CONFIGS, "b", fewshot=False, one_task=(), suite=["rte"],
                          reference=False)
    assert {c.group for c in with_ref.cells} == {"main", "single"}
    assert [c.run_id for c in without.cells] == [c.run_id for c in with_ref.cells if c.group == "main"]
    make = CellFactory(REPO_CONFIGS, "b")
    assert [c.arm for c in search_cells(SCALES["smoke"], arms, (1e-3,), make, ["rte"], reference=False)] == ["speclora"]
    assert "single" in [c.arm for c in search_cells(SCALES["smoke"], arms, (1e-3,), make, ["rte"])]


@pytest.mark.slow
def test_the_whole_smoke_scale_in_separate_processes(tmp_path, data_root, tiny_backbone):
    """Every method, every ablation, few-shot and the single-task case, each run in its own process."""
    argv = ["quality", "--scale", "smoke", "--out", str(tmp_path / "smoke"), "--isolation", "process", "--jobs", "2",
            "--backbone", tiny_backbone, "--data-dir", str(data_root)]
    assert quality.main(argv) == 0
    rows = list(csv.DictReader((tmp_path / "smoke" / "results.csv").open()))
    assert {r["status"] for r in rows} == {"ok"}, [(r["run_id"], r["error"]) for r in rows if r["status"] != "ok"]
    assert {r["group"] for r in rows} == {"main", "single", "one_task", "fewshot", "fewshot_single"}
