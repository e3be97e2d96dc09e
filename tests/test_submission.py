"""speclora.submission: leaderboard files of a predict run, their validator, predictions on new inputs."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from speclora.cli import main as speclora_main
from speclora.data.datamodule import MultiTaskDataModule
from speclora.model.module import SpecLoRAModule
from speclora.submission import SubmissionWriter, read_inputs, validate_submission, write_submission
from speclora.submission.__main__ import main as submission_main
from speclora.submission.writer import Predictions, merge_ranks

# every task whose official test file is in ../shared/data (SOURCES.md)
TASKS_WITH_TESTS = ["cola", "sst2", "mrpc", "stsb", "qnli", "rte", "wnli", "boolq", "cb", "copa", "multirc",
                    "sg_rte", "wic", "wsc"]
GLUE = {  # file -> (test file, allowed predictions; None: an STS-B score)
    "CoLA.tsv": ("glue/CoLA/test.tsv", {"0", "1"}),
    "SST-2.tsv": ("glue/SST-2/test.tsv", {"0", "1"}),
    "MRPC.tsv": ("glue/MRPC/test.tsv", {"0", "1"}),
    "STS-B.tsv": ("glue/STS-B/test.tsv", None),
    "QNLI.tsv": ("glue/QNLI/test.tsv", {"entailment", "not_entailment"}),
    "RTE.tsv": ("glue/RTE/test.tsv", {"entailment", "not_entailment"}),
    "WNLI.tsv": ("glue/WNLI/test.tsv", {"0", "1"}),
}
SUPERGLUE = {  # file -> (test file, allowed labels, exact JSON type)
    "BoolQ.jsonl": ("superglue/BoolQ/test.jsonl", {"true", "false"}),
    "CB.jsonl": ("superglue/CB/test.jsonl", {"entailment", "contradiction", "neutral"}),
    "COPA.jsonl": ("superglue/COPA/test.jsonl", {0, 1}),
    "RTE.jsonl": ("superglue/RTE/test.jsonl", {"entailment", "not_entailment"}),
    "WiC.jsonl": ("superglue/WiC/test.jsonl", {"true", "false"}),
    "WSC.jsonl": ("superglue/WSC/test.jsonl", {"True", "False"}),
    "AX-b.jsonl": ("diagnostics/AX-b.jsonl", {"entailment", "not_entailment"}),
    "AX-g.jsonl": ("diagnostics/AX-g.jsonl", {"entailment", "not_entailment"}),
}


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny encoder's skinny matmuls run many times slower when two BLAS threads share busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _predict(model, dm, *callbacks) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=list(callbacks))
    trainer.predict(model, datamodule=dm, return_predictions=False)
    return trainer


def _dm(tasks, tiny_backbone, data_root, cache, **kw) -> MultiTaskDataModule:
    return MultiTaskDataModule(tasks=tasks, data_dir=str(data_root), tokenizer=tiny_backbone, max_length=16,
                               eval_batch_size=512, cache_dir=str(cache), **kw)


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").split("\n") if line]


@pytest.fixture(scope="module")
def submission(tiny_backbone, data_root, tmp_path_factory):
    """Every test file of ../shared/data (and AX-b/AX-g) predicted once by a tiny random encoder."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("submission")
    torch.manual_seed(0)
    model = SpecLoRAModule(tasks=TASKS_WITH_TESTS, backbone=tiny_backbone)
    writer = SubmissionWriter(out_dir=str(root / "out"))
    _predict(model, _dm(TASKS_WITH_TESTS, tiny_backbone, data_root, root / "cache"), writer)
    torch.set_num_threads(threads)
    return root / "out", writer.report


def test_glue_files_have_names_header_rows_and_labels(submission, data_root):
    out, report = submission
    assert sorted(p.name for p in (out / "glue").iterdir()) == sorted(GLUE)
    for name, (test_file, allowed) in GLUE.items():
        test_rows = _lines(data_root / test_file)[1:]
        lines = _lines(out / "glue" / name)
        assert lines[0] == "index\tprediction", name
        rows = [line.split("\t") for line in lines[1:]]
        assert len(rows) == len(test_rows), name
        assert [int(i) for i, _ in rows] == [int(r.split("\t")[0]) for r in test_rows], name
        for _, value in rows:
            if allowed is None:
                assert 0.0 <= float(value) <= 5.0 and len(value.split(".")[1]) == 3
            else:
                assert value in allowed, (name, value)
    assert report.written["glue"] == {n: len(_lines(data_root / f)) - 1 for n, (f, _) in GLUE.items()}


def test_superglue_files_have_names_rows_and_label_spellings(submission, data_root):
    out, _ = submission
    assert sorted(p.name for p in (out / "superglue").iterdir()) == sorted([*SUPERGLUE, "MultiRC.jsonl"])
    for name, (test_file, allowed) in SUPERGLUE.items():
        test_idx = [int(json.loads(line)["idx"]) for line in _lines(data_root / test_file)]
        records = [json.loads(line) for line in _lines(out / "superglue" / name)]
        assert [r["idx"] for r in records] == test_idx, name
        for r in records:
            assert set(r) == {"idx", "label"} and r["label"] in allowed, (name, r)
            assert type(r["label"]) is type(next(iter(allowed))), (name, r)  # COPA: 0, not "0"
    # MultiRC: one line per paragraph, answers nested under their question, labels 0/1
    test = [json.loads(line) for line in _lines(data_root / "superglue/MultiRC/test.jsonl")]
    written = [json.loads(line) for line in _lines(out / "superglue/MultiRC.jsonl")]
    assert [p["idx"] for p in written] == [p["idx"] for p in test]
    for got, want in zip(written, test):
        want_q = [(q["idx"], [a["idx"] for a in q["answers"]]) for q in want["passage"]["questions"]]
        got_q = [(q["idx"], [a["idx"] for a in q["answers"]]) for q in got["passage"]["questions"]]
        assert got_q == want_q
        assert {a["label"] for q in got["passage"]["questions"] for a in q["answers"]} <= {0, 1}


def test_zips_missing_files_and_manifest(submission):
    out, report = submission
    for bench in ("glue", "superglue"):
        with zipfile.ZipFile(out / f"{bench}.zip") as zf:
            assert sorted(zf.namelist()) == sorted(p.name for p in (out / bench).iterdir())
            assert zf.read("CoLA.tsv" if bench == "glue" else "CB.jsonl") == \
                (out / bench / ("CoLA.tsv" if bench == "glue" else "CB.jsonl")).read_bytes()
    missing = report.missing
    assert set(missing["glue"]) == {"QQP.tsv", "MNLI-m.tsv", "MNLI-mm.tsv", "AX.tsv"}
    assert set(missing["superglue"]) == {"ReCoRD.jsonl"}
    assert "mnli" in missing["glue"]["AX.tsv"] and "not in the run" in missing["glue"]["MNLI-m.tsv"]
    assert json.loads((out / "manifest.json").read_text())["superglue"]["missing"] == missing["superglue"]
    assert "ReCoRD.jsonl" in report.missing_message()
    assert not list(out.glob(".staging*")), "the staging folder was left behind"


def test_validator_accepts_every_written_file(submission, data_root):
    out, _ = submission
    report = validate_submission(out, data_root)
    assert len(report) == 16 and all(problems == [] for problems in report.values()), report
    assert submission_main(["validate", str(out / "superglue.zip"), "--data-dir", str(data_root)]) == 0


def _drop(lines, n):  # remove line n (1-based)
    return lines[: n - 1] + lines[n:]


@pytest.mark.parametrize(
    "name, damage, expected",
    [
        ("WNLI.tsv", lambda ls: _drop(ls, 5), ["no line for index 3", "145 rows, expected 146"]),
        ("WNLI.tsv", lambda ls: ls[:4] + [ls[3]] + ls[5:], ["line 5: index 2 repeats line 4", "no line for index 3"]),
        ("WNLI.tsv", lambda ls: ls[:5] + ["4\tentailment"] + ls[6:], ["line 6: unknown label 'entailment'"]),
        ("WNLI.tsv", lambda ls: ["index\tlabel"] + ls[1:], ["line 1: header 'index\\tlabel'"]),
        ("CB.jsonl", lambda ls: ls[:2] + ['{"idx": 2, "label": "maybe"}'] + ls[3:], ["line 3: unknown label 'maybe'"]),
        ("CB.jsonl", lambda ls: ls + ['{"idx": 9999, "label": "neutral"}'], ["line 251: index 9999 is not in"]),
        ("COPA.jsonl", lambda ls: ['{"idx": 0, "label": "1"}'] + ls[1:], ["line 1: unknown label '1'"]),
        ("MultiRC.jsonl", lambda ls: ls + [ls[0]], ["line 167: paragraph 0 repeats line 1", "repeats line 1"]),
    ],
)
def test_validator_names_the_bad_line(submission, data_root, tmp_path, capsys, name, damage, expected):
    out, _ = submission
    bench = "glue" if name.endswith(".tsv") else "superglue"
    lines = _lines(out / bench / name)
    (tmp_path / name).write_text("\n".join(damage(lines)) + "\n", encoding="utf-8")
    problems = validate_submission(tmp_path, data_root)[str(tmp_path / name)]
    for text in expected:
        assert any(text in p for p in problems), (text, problems)
    assert submission_main(["validate", str(tmp_path), "--data-dir", str(data_root)]) == 1
    assert expected[0] in capsys.readouterr().out


def test_diagnostics_without_an_entailment_task_are_named(tiny_backbone, data_root, tmp_path):
    dm = _dm(["cb"], tiny_backbone, data_root, tmp_path / "cache")
    writer = SubmissionWriter(out_dir=str(tmp_path / "out"), zip=False)
    _predict(SpecLoRAModule(tasks=["cb"], backbone=tiny_backbone), dm, writer)
    assert [e for e, _, _ in dm.predict_sources()] == ["cb"]
    for diag in ("AX-b.jsonl", "AX-g.jsonl"):
        assert "sg_rte or rte" in writer.report.missing["superglue"][diag]
    assert "glue" not in writer.report.missing  # no GLUE task in the run: no GLUE files expected
    assert not (tmp_path / "out" / "superglue.zip").exists()
    assert sorted(p.name for p in (tmp_path / "out" / "superglue").iterdir()) == ["CB.jsonl"]


@pytest.fixture
def synthetic_root(tmp_path) -> Path:
    """Hand-made MNLI and ReCoRD test files and GLUE's diagnostic, which ../shared/data lacks."""
    root = tmp_path / "data"
    (root / "glue" / "MNLI").mkdir(parents=True)
    (root / "glue" / "diagnostic").mkdir(parents=True)
    (root / "superglue" / "ReCoRD").mkdir(parents=True)
    pairs = ["A man sleeps.\tA person rests.", "A dog runs.\tA cat runs.", "It rains.\tThe street is dry."]
    for name in ("test_matched", "test_mismatched"):
        rows = [f"{i}\t{p}" for i, p in enumerate(pairs)]
        (root / "glue" / "MNLI" / f"{name}.tsv").write_text("\n".join(["index\tsentence1\tsentence2", *rows]) + "\n")
    diag = [f"{i}\t{p}" for i, p in enumerate(pairs + ["The cat sat.\tThe cat did not sit."])]
    (root / "glue" / "diagnostic" / "diagnostic.tsv").write_text("\n".join(["index\tsentence1\tsentence2", *diag]))
    text = "Paris and Rome are capitals.\n@highlight\nBerlin hosts the summit"
    entities = [{"start": text.index(w), "end": text.index(w) + len(w) - 1} for w in ("Paris", "Rome", "Berlin")]
    record = {"idx": 0, "passage": {"text": text, "entities": entities},
              "qas": [{"query": "@placeholder is in France.", "idx": "q-a"},
                      {"query": "The summit is in @placeholder.", "idx": "q-b"}]}
    (root / "superglue" / "ReCoRD" / "test.jsonl").write_text(json.dumps(record) + "\n")
    return root


def test_mnli_glue_diagnostic_and_record(tiny_backbone, synthetic_root, tmp_path):
    dm = _dm(["mnli", "record"], tiny_backbone, synthetic_root, tmp_path / "cache")
    writer = SubmissionWriter(out_dir=str(tmp_path / "out"))
    _predict(SpecLoRAModule(tasks=["mnli", "record"], backbone=tiny_backbone), dm, writer)
    mnli = {"entailment", "neutral", "contradiction"}
    for name, rows in (("MNLI-m.tsv", 3), ("MNLI-mm.tsv", 3), ("AX.tsv", 4)):
        lines = _lines(tmp_path / "out" / "glue" / name)
        assert lines[0] == "index\tprediction" and len(lines) == rows + 1
        assert {line.split("\t")[1] for line in lines[1:]} <= mnli
    records = [json.loads(line) for line in _lines(tmp_path / "out" / "superglue" / "ReCoRD.jsonl")]
    assert [r["idx"] for r in records] == ["q-a", "q-b"]
    assert {r["label"] for r in records} <= {"Paris", "Rome", "Berlin"}
    missing = writer.report.missing
    assert "sg_rte or rte" in missing["superglue"]["AX-b.jsonl"]
    assert set(missing["glue"]) == {"CoLA.tsv", "SST-2.tsv", "MRPC.tsv", "STS-B.tsv", "QQP.tsv", "QNLI.tsv",
                                    "RTE.tsv", "WNLI.tsv"}
    report = validate_submission(tmp_path / "out", synthetic_root)
    assert all(problems == [] for problems in report.values()), report
    # a ReCoRD answer that is not an entity of its query is refused
    bad = tmp_path / "bad" / "ReCoRD.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"idx": "q-a", "label": "Madrid"}\n{"idx": "q-b", "label": "Berlin"}\n')
    problems = validate_submission(bad.parent, synthetic_root)[str(bad)]
    assert problems == [f"{bad}, line 1: unknown label 'Madrid': not an entity of query 'q-a'"]


def test_missing_mnli_test_files_are_named(tiny_backbone, data_root, tmp_path):
    dm = _dm(["mnli", "rte"], tiny_backbone, data_root, tmp_path / "cache")
    dm.setup("predict")
    assert "test_matched.tsv" in dm.predict_skipped["mnli_m"] and "SOURCES.md" in dm.predict_skipped["mnli_m"]
    assert "diagnostic.tsv" in dm.predict_skipped["ax"]
    assert [e for e, _, _ in dm.predict_sources()] == ["rte", "ax_b", "ax_g"]  # GLUE RTE predicts AX-b/AX-g


def test_partial_predictions_are_not_written(tmp_path):
    split = SimpleNamespace(idx=[10, 11, 12], candidates=None)
    sources = {"wnli": ("wnli", split), "rte": ("rte", split)}
    full = Predictions(torch.arange(3), torch.tensor([0, 1, 0]))
    part = Predictions(torch.tensor([0, 2]), torch.tensor([1, 1]))
    report = write_submission(tmp_path, {"wnli": full, "rte": part}, sources, ["wnli", "rte"])
    assert report.written["glue"] == {"WNLI.tsv": 3}
    assert "cover 2 of the 3" in report.missing["glue"]["RTE.tsv"]
    assert not (tmp_path / "glue" / "RTE.tsv").exists()
    assert _lines(tmp_path / "glue" / "WNLI.tsv") == ["index\tprediction", "10\t0", "11\t1", "12\t0"]


def test_merge_ranks_joins_shards_in_uid_order():
    # the predict loop shards examples rank, rank + W, ...: rank 0 has uids 0, 2, 4 and rank 1 has 1, 3
    rank0 = {"cb": Predictions(torch.tensor([0, 2, 4]), torch.tensor([0, 2, 4]), torch.eye(3)[[0, 2, 1]])}
    rank1 = {"cb": Predictions(torch.tensor([1, 3]), torch.tensor([1, 3]), torch.eye(3)[[1, 0]])}
    merged = merge_ranks([rank0, rank1])["cb"]
    assert merged.uid.tolist() == [0, 1, 2, 3, 4] and merged.preds.tolist() == [0, 1, 2, 3, 4]
    assert merged.probs.argmax(1).tolist() == [0, 1, 2, 0, 1]


def test_exported_adapters_give_the_same_files(tiny_backbone, data_root, tmp_path):
    torch.manual_seed(0)
    trained = SpecLoRAModule(tasks=["wnli", "cb"], backbone=tiny_backbone)
    with torch.no_grad():
        for name, p in trained.encoder.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a zero B (LoRA's init) would make any adapter look right
    trained.export_adapters(tmp_path / "adapters")
    torch.manual_seed(1)  # other heads, other A
    fresh = SpecLoRAModule(tasks=["wnli", "cb"], backbone=tiny_backbone)
    for model, out, adapters in ((trained, "a", None), (fresh, "b", str(tmp_path / "adapters"))):
        dm = _dm(["wnli", "cb"], tiny_backbone, data_root, tmp_path / "cache")
        _predict(model, dm, SubmissionWriter(out_dir=str(tmp_path / out), adapters_dir=adapters))
    for rel in ("glue/WNLI.tsv", "superglue/CB.jsonl"):
        assert (tmp_path / "a" / rel).read_text() == (tmp_path / "b" / rel).read_text(), rel


def test_predict_jsonl_round_trips(tiny_backbone, tmp_path):
    torch.manual_seed(0)
    model = SpecLoRAModule(tasks=["rte", "stsb", "copa"], backbone=tiny_backbone)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict(),
                "datamodule_hyper_parameters": {"max_length": 32, "tokenizer": tiny_backbone}}, ckpt)
    inputs = {
        "rte": [{"sentence1": "A man sleeps.", "sentence2": "A person rests.", "idx": 7},
                {"sentence1": "It rains.", "sentence2": "The street is dry."},
                {"sentence1": "Dogs bark.", "sentence2": "Animals make noise."}],
        "stsb": [{"sentence1": "A cat.", "sentence2": "A kitten."}, {"sentence1": "Go.", "sentence2": "Stop."}],
        "copa": [{"premise": "The glass fell.", "question": "effect", "choice1": "It broke.",
                  "choice2": "It sang."}],
    }
    model.eval()
    for task, rows in inputs.items():
        src, dst = tmp_path / f"{task}.jsonl", tmp_path / f"{task}.out.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
        code = submission_main(["predict-jsonl", "--ckpt", str(ckpt), "--task", task, "--input", str(src),
                                "--output", str(dst), "--accelerator", "cpu", "--batch-size", "2",
                                "--no-progress-bar"])
        assert code == 0
        out = [json.loads(line) for line in _lines(dst)]
        assert [o["line"] for o in out] == list(range(1, len(rows) + 1))
        assert [o["idx"] for o in out] == [r.get("idx", i) for i, r in enumerate(rows)]
        # the same numbers as the model's own forward on the same inputs
        dm = MultiTaskDataModule(tasks=["rte", "stsb", "copa"], tokenizer=tiny_backbone, max_length=32,
                                 cache_dir="none")
        dm.predict_examples(task, read_inputs(task, src))
        dm.setup("predict")
        batch = next(iter(dm.predict_dataloader()[0]))
        with torch.no_grad():
            want = model.predict_step(batch, 0)
        if task == "stsb":
            assert [o["score"] for o in out] == pytest.approx(want["preds"][0].tolist(), abs=1e-5)
            continue
        names = model.specs[[s.name for s in model.specs].index(task)].label_names
        assert [o["label"] for o in out] == [names[int(p)] for p in want["preds"][0]]
        for o, probs in zip(out, want["probs"][0]):
            assert list(o["probs"]) == list(names)
            assert list(o["probs"].values()) == pytest.approx(probs[: len(names)].tolist(), abs=1e-5)


def test_predict_jsonl_names_a_missing_field(tiny_backbone, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"sentence1": "A man sleeps.", "sentence2": "A person rests."}\n{"premise": "x"}\n')
    with pytest.raises(ValueError, match=r"in.jsonl, line 2: rte inputs need the fields \['sentence1', 'sentence2'\]"):
        read_inputs("rte", src)


def test_speclora_predict_writes_the_submission(tiny_backbone, data_root, tmp_path):
    configs = Path(__file__).resolve().parents[1] / "configs"
    args = ["--config", str(configs / "default.yaml"), "--config", str(configs / "suites" / "small.yaml"),
            "--model.backbone", tiny_backbone, "--data.data_dir", str(data_root),
            "--data.cache_dir", str(tmp_path / "cache"), "--data.max_length", "16", "--data.batch_size", "8",
            "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false"]
    fit = speclora_main(["fit", *args, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"])
    ckpt = Path(fit.trainer.log_dir) / "checkpoints" / "last.ckpt"
    speclora_main(["predict", *args, "--ckpt_path", str(ckpt)])
    out = Path(fit.trainer.log_dir) / "submission"  # the default: beside the checkpoint's run
    assert sorted(p.name for p in (out / "glue").iterdir()) == ["RTE.tsv", "STS-B.tsv"]
    assert sorted(p.name for p in (out / "superglue").iterdir()) == ["AX-b.jsonl", "AX-g.jsonl", "COPA.jsonl"]
    assert (out / "glue.zip").is_file() and (out / "superglue.zip").is_file()
    shutil.rmtree(out)
    # the same checkpoint predicts new inputs
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"premise": "The glass fell.", "question": "cause", "choice1": "It slipped.",
                               "choice2": "It sang."}) + "\n")
    assert submission_main(["predict-jsonl", "--ckpt", str(ckpt), "--task", "copa", "--input", str(src),
                            "--output", str(dst), "--accelerator", "cpu", "--no-progress-bar"]) == 0
    (out_line,) = [json.loads(line) for line in _lines(dst)]
    assert out_line["label"] in ("0", "1") and sum(out_line["probs"].values()) == pytest.approx(1.0)
