"""``speclora-bench perf``: the tiny report end to end, its time limits, failures and device checks."""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import time

import pytest
import torch

from speclora.bench import REPO, eigensolver, measure, perf, quality, throughput
from speclora.bench.perf import Section, section_limit

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")


@pytest.fixture
def token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECLORA_CACHE", str(tmp_path.parent / "token_cache"))  # shared with the other tests


def _report(out) -> dict:
    return json.loads((out / "perf.json").read_text())


def _records(report: dict, section: str, table: str | None = None) -> list[dict]:
    sec = next(s for s in report["sections"] if s["name"] == section)
    return [r for r in sec["records"] if table is None or r["table"] == table]


# ---------------------------------------------------------------------- the tiny report, end to end
def test_quick_report_has_every_figure_finite_with_its_command(tiny_backbone, data_root, token_cache, tmp_path):
    out = tmp_path / "perf"
    threads = torch.get_num_threads()
    assert perf.main(["--quick", "--backbone", tiny_backbone, "--data-dir", str(data_root), "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads  # --quick's 1 thread does not leak out of the run
    report = _report(out)
    for key in ("torch", "cuda", "lightning", "transformers", "peft", "torch_geometric"):
        assert report["versions"][key]
    assert report["device"] == "cpu" and report["device name"] and report["date"]
    assert [s["name"] for s in report["sections"]] == ["eigensolver", "throughput", "overhead", "methods"]
    md = (out / "perf.md").read_text()
    for sec in report["sections"]:
        assert sec["status"] == "ok", sec
        assert sec["records"], sec["name"]
        for rec in sec["records"]:
            assert rec["command"].startswith("OMP_NUM_THREADS=1 python -m speclora.bench."), rec  # --quick: 1 thread
            assert f"`{rec['command']}`" in md
            assert rec["figures"] and not rec["failures"], rec
            assert all(isinstance(v, int | float) and math.isfinite(v) for v in rec["figures"].values()), rec

    scaling = _records(report, "eigensolver", "eigensolver scaling")
    assert {r["labels"]["graph"] for r in scaling} == {"param", "random"}
    for r in scaling:
        fig = r["figures"]
        assert {"cold_s", "cold_it", "cold_res", "cold_orth", "warm_s", "warm_it", "warm_res", "dense_s"} <= set(fig)
        assert fig["cold_orth"] <= 1e-3 and fig["warm_res"] <= 1e-3
    crossings = _records(report, "eigensolver", "eigensolver crossover")
    assert {r["labels"]["vs"] for r in crossings} == {"warm", "cold"}

    steps = {r["labels"]["variant"]: r["figures"] for r in _records(report, "throughput")}
    assert set(steps) == {"independent", "shared", "peft", "independent-compiled"}
    assert steps["independent"]["vs_independent"] == 1.0
    assert steps["independent-compiled"]["compile_fallbacks"] == 0  # compiled (--quick: dynamo's eager backend)
    assert "compile_fallbacks" not in steps["independent"] and steps["independent"]["warmup_s"] > 0
    for fig in steps.values():
        assert fig["ms_per_step"] > 0 and fig["samples_per_s"] > 0 and fig["aten_ops"] >= fig["leaf_ops"] > 0
        assert fig["host_reads"] >= 0

    (overhead,) = _records(report, "overhead")
    assert overhead["figures"]["pairs"] == 4  # 2 rounds × (3 steps − 1 warm-up)
    assert 0 < overhead["figures"]["own_share"] < 1 and overhead["figures"]["paired_ratio"] > 0

    methods = {r["labels"]["method"]: r["figures"] for r in _records(report, "methods")}
    assert methods["independent"]["step_vs_independent"] == 1.0
    assert methods["shared"]["trainable"] < methods["independent"]["trainable"]
    assert methods["shared"]["aten_ops"] > 0

    # a row's command measures that row again: same graph, same solve
    row = scaling[0]
    args = eigensolver.parse_args(shlex.split(row["command"])[4:])
    assert len(args.sizes) == 1 and args.graph == [row["labels"]["graph"]]
    again = eigensolver.measure_one(args, args.graph[0], args.sizes[0], torch.device("cpu"))
    assert (again["n"], again["E"]) == (row["labels"]["n"], row["labels"]["E"])
    assert again["cold_res"] <= 1e-3


# ---------------------------------------------------------------------- time limits, failures, signals
def _fake_run(kind: str):
    def run(args, emit=None):
        emit(measure.record("fake", {"kind": kind}, {"value": 1.0}, "python -m speclora.bench.fake"))
        if kind == "slow":
            time.sleep(30)
        elif kind == "raise":
            raise RuntimeError("broken on purpose")
        elif kind == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)

    return run


def _patch(monkeypatch, **kinds):
    modules = {"eigensolver": eigensolver, "throughput": throughput}
    for name, kind in kinds.items():
        monkeypatch.setattr(modules[name], "run", _fake_run(kind))


def test_a_section_past_its_limit_or_failing_keeps_its_figures_and_the_next_runs(monkeypatch, tiny_backbone,
                                                                                 tmp_path):
    _patch(monkeypatch, eigensolver="slow", throughput="raise")
    start = time.monotonic()
    code = perf.main(["--quick", "--backbone", tiny_backbone, "--out", str(tmp_path), "--sections", "eigensolver",
                      "throughput", "--limit", "eigensolver=1"])
    assert code == 0 and time.monotonic() - start < 20
    eig, thr = _report(tmp_path)["sections"]
    assert eig["status"] == "timed out" and "time limit of 1 s" in eig["message"]
    assert thr["status"] == "failed" and "broken on purpose" in thr["message"]
    assert [r["figures"] for r in eig["records"] + thr["records"]] == [{"value": 1.0}] * 2
    assert "status: **timed out**" in (tmp_path / "perf.md").read_text()


def test_sigterm_writes_the_report_with_what_was_measured(monkeypatch, tiny_backbone, tmp_path):
    _patch(monkeypatch, eigensolver="sigterm")
    handler = signal.getsignal(signal.SIGTERM)
    code = perf.main(["--quick", "--backbone", tiny_backbone, "--out", str(tmp_path), "--sections", "eigensolver",
                      "throughput"])
    assert code == 143
    assert signal.getsignal(signal.SIGTERM) == handler  # restored
    sections = _report(tmp_path)["sections"]
    assert [s["status"] for s in sections] == ["interrupted"]  # throughput never started
    assert sections[0]["records"][0]["figures"] == {"value": 1.0}


def test_deadline_shrinks_every_limit_in_proportion():
    secs = [Section(n, n, "m", limit, ()) for n, limit in (("a", 100.0), ("b", 200.0), ("c", 100.0))]
    assert section_limit(secs, {}, None, 1) == 200.0
    assert section_limit(secs, {}, 1000.0, 0) == 100.0  # enough time: the section's own limit
    assert section_limit(secs, {}, 200.0, 0) == 50.0  # 100 · 200 / 400
    assert section_limit(secs, {}, 150.0, 1) == 100.0  # 200 · 150 / 300
    assert section_limit(secs, {"c": 300.0}, 250.0, 1) == 100.0  # 200 · 250 / 500


# ---------------------------------------------------------------------- bad input
@no_cuda
def test_device_cuda_without_cuda_fails_at_once_naming_the_setting(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        perf.main(["--device", "cuda", "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--device='cuda'" in err and "no CUDA device" in err and "CPU cores" in err
    assert not (tmp_path / "perf.json").exists()
    for module in (eigensolver, throughput):
        with pytest.raises(SystemExit):
            module.parse_args(["--device", "cuda"])
        assert "no CUDA device" in capsys.readouterr().err


def test_speclora_bench_dispatches_perf(capsys):
    with pytest.raises(SystemExit) as exc:
        quality.main(["perf", "--help"])
    assert exc.value.code == 0
    assert "usage: speclora-bench perf" in capsys.readouterr().out


def test_bad_perf_options_name_the_key(tmp_path, capsys):
    for argv, words in ((["--sections", "speed"], "--sections speed"), (["--limit", "eigensolver"], "--limit"),
                        (["--limit", "methods=-1"], "SECONDS > 0"), (["--deadline", "0"], "--deadline=0")):
        with pytest.raises(SystemExit):
            perf.main(["--device", "cpu", "--out", str(tmp_path), *argv])
        assert words in capsys.readouterr().err


def test_a_wrong_compile_backend_of_the_throughput_bench_names_the_option(capsys):
    with pytest.raises(SystemExit):
        throughput.parse_args(["--device", "cpu", "--variants", "independent-compiled", "--compile-backend", "nope"])
    assert "--compile-backend: model.compile.backend='nope' is not a torch.compile backend" in capsys.readouterr().err
    args = throughput.parse_args(["--device", "cpu", "--compile-dynamic", "auto"])
    assert args.compile_dynamic is None and args.compile_backend == "inductor"


def test_check_device_names_what_is_allowed():
    assert measure.check_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device='tpu'.*allowed: cpu, cuda, cuda:N"):
        measure.check_device("tpu")
    with pytest.raises(ValueError, match="--accelerator='mps'"):
        measure.check_device("mps", option="--accelerator")


# ---------------------------------------------------------------------- the pieces
def test_count_events_counts_each_host_read_once():
    x = torch.arange(-3.0, 5.0)
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w, torch.nn.Parameter(torch.ones(2))])

    def step():
        x.sum().item()  # _local_scalar_dense
        x[x > 0]  # index with a mask: nonzero inside, counted once
        torch.unique(x)  # _unique2
        w.sum().backward()
        opt.step()  # reads its CPU step counters (one item() per parameter): not host reads

    counts = measure.profile_steps(step, 2, "cpu")
    assert counts["host_reads"] == 3.0
    assert counts["aten_ops"] >= counts["leaf_ops"] > 0
    assert "cuda_launches" not in counts


def test_crossover_interpolates_log_log_between_the_bracketing_sizes():
    def row(n, dense, warm):
        return {"n": n, "dense_s": dense, "warm_s": warm, "failures": {}}

    cross = eigensolver.crossover([row(100, 0.5, 1.0), row(400, 2.0, 1.0), row(1600, 8.0, 1.0)])
    assert cross["bound"] == "interpolated" and cross["n"] == pytest.approx(200.0)  # r = 0.5 → 2: halfway in log n
    assert eigensolver.crossover([row(100, 0.1, 1.0), row(400, 0.5, 1.0)]) == {"n": 400.0, "bound": "above",
                                                                               "between": None}
    assert eigensolver.crossover([row(100, 2.0, 1.0), row(400, 5.0, 1.0)])["bound"] == "below"
    assert eigensolver.crossover([row(100, 2.0, 1.0)]) is None
    failed = {**row(400, 2.0, 1.0), "failures": {"warm": "kept previous"}}
    assert eigensolver.crossover([row(100, 0.5, 1.0), failed]) is None  # a failed refresh is not a time


def test_with_options_narrows_the_command_line():
    argv = ["--graph", "param", "random", "--sizes", "10", "20", "--k", "4", "--count"]
    assert measure.with_options(argv, sizes=[20], graph=["random"], count=False, dense_max=5) == [
        "--k", "4", "--sizes", "20", "--graph", "random", "--dense-max", "5"]
    assert measure.command("speclora.bench.x", ["--out", "a b"]) == "python -m speclora.bench.x --out 'a b'"


def test_record_moves_non_finite_figures_to_failures():
    rec = measure.record("t", {"n": 1}, {"a": 1.5, "b": float("nan"), "c": None, "d": 3}, "cmd")
    assert rec["figures"] == {"a": 1.5, "d": 3}
    assert rec["failures"] == {"b": "not a finite number (nan)"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quick_report_on_cuda(tiny_backbone, data_root, token_cache, tmp_path):
    assert perf.main(["--quick", "--device", "cuda", "--backbone", tiny_backbone, "--data-dir", str(data_root),
                      "--out", str(tmp_path)]) == 0
    report = _report(tmp_path)
    assert [s["status"] for s in report["sections"]] == ["ok"] * 4
    steps = _records(report, "throughput")
    assert all("cuda_launches" in r["figures"] and "cuda_syncs" in r["figures"] for r in steps)
    compiled = next(r["figures"] for r in steps if r["labels"]["variant"] == "independent-compiled")
    assert compiled["compile_fallbacks"] == 0


def test_a_child_process_reports_its_own_peak_memory_not_its_parents(tmp_path):
    import subprocess
    import sys

    ballast = b"\x01" * (400 * 2**20)  # the parent holds 400 MiB more than the child will ever touch
    parent = measure.peak_rss_mib()
    code = "from speclora.bench.measure import peak_rss_mib; print(peak_rss_mib())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    del ballast
    assert float(out.stdout) < parent - 300  # getrusage's ru_maxrss would report the parent's, kept across exec
