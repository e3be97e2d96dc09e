"""Readers of the official GLUE/SuperGLUE files (speclora.data.sources) on the real data and on
hand-made malformed files written into a fake data root."""

from __future__ import annotations

import json
import random
import sys
import types
from pathlib import Path

import pytest

from speclora.data.sources import (
    KNOWN_MISSING,
    example_from_hub_row,
    hub_split,
    read_diagnostic,
    read_hub_split,
    read_split,
    resolve_data_root,
)
from speclora.data.superglue_readers import normalize_answer, token_f1
from speclora.tasks import TASKS, Example, get_task

# Examples per official split (SOURCES.md); MultiRC counts answers here (passages/questions below).
COUNTS: dict[tuple[str, str], int] = {
    ("cola", "train"): 8551, ("cola", "dev"): 1043, ("cola", "test"): 1063,
    ("sst2", "train"): 67349, ("sst2", "dev"): 872, ("sst2", "test"): 1821,
    ("mrpc", "train"): 3668, ("mrpc", "dev"): 408, ("mrpc", "test"): 1725,
    ("stsb", "train"): 5749, ("stsb", "dev"): 1500, ("stsb", "test"): 1379,
    ("qnli", "dev"): 5463, ("qnli", "test"): 5463,
    ("rte", "train"): 2490, ("rte", "dev"): 277, ("rte", "test"): 3000,
    ("wnli", "train"): 635, ("wnli", "dev"): 71, ("wnli", "test"): 146,
    ("boolq", "dev"): 3270, ("boolq", "test"): 3245,
    ("cb", "train"): 250, ("cb", "dev"): 56, ("cb", "test"): 250,
    ("copa", "train"): 400, ("copa", "dev"): 100, ("copa", "test"): 500,
    ("multirc", "train"): 27243, ("multirc", "dev"): 4848, ("multirc", "test"): 9693,
    ("sg_rte", "train"): 2490, ("sg_rte", "dev"): 277, ("sg_rte", "test"): 3000,
    ("wic", "train"): 5428, ("wic", "dev"): 638, ("wic", "test"): 1400,
    ("wsc", "train"): 554, ("wsc", "dev"): 104, ("wsc", "test"): 146,
}
# MultiRC: (passages, questions) per split.
MULTIRC = {"train": (456, 5131), "dev": (83, 953), "test": (166, 1820)}
SUBSET_ROWS = {"mnli": 48, "qqp": 32, "qnli": 32, "boolq": 32, "record": 32}
SUBSETS = [(t, s, k) for t, n in SUBSET_ROWS.items() for s, files in TASKS[t].subsets.items() for k in files]


@pytest.fixture(scope="module")
def read(data_root: Path):
    """read(task, split, subset=None), each file read once per module (SST-2 train is 67k rows)."""
    cache: dict[tuple, list[Example]] = {}

    def _read(task: str, split: str, subset: str | None = None) -> list[Example]:
        key = (task, split, subset)
        if key not in cache:
            cache[key] = read_split(TASKS[task], split, data_root, subset=subset)
        return cache[key]

    return _read


def check_labels(task: str, split: str, examples: list[Example], labelled: bool) -> None:
    spec = TASKS[task]
    assert [e.uid for e in examples] == list(range(len(examples)))
    records = [e.record for e in examples]
    assert records == sorted(records) and records[0] >= 1
    for e in examples:
        assert len(e.segments) == 1 if spec.kind != "choice" else len(e.segments) >= 2
        if not labelled:
            assert e.label is None, (task, split, e)
        elif spec.kind == "classification":
            assert e.label in range(spec.num_labels), (task, split, e)
        elif spec.kind == "regression":
            assert 0.0 <= e.label <= 5.0, (task, split, e)
        else:
            assert e.label in range(len(e.segments)), (task, split, e)
    if task != "multirc":
        assert all(e.group == e.uid for e in examples)


# ------------------------------------------------------------------ the real files
def test_every_registered_file_is_counted_or_known_missing(data_root: Path) -> None:
    for name, spec in TASKS.items():
        for split, rel in spec.files.items():
            if (data_root / rel).is_file():
                assert (name, split) in COUNTS, f"{rel} is present but has no expected count"
            else:
                known = KNOWN_MISSING.get(name, frozenset())
                assert known is None or split in known, f"{rel} is missing but SOURCES.md has it"


@pytest.mark.parametrize(("task", "split"), list(COUNTS), ids=[f"{t}-{s}" for t, s in COUNTS])
def test_official_split_counts_and_labels(read, task: str, split: str) -> None:
    examples = read(task, split)
    assert len(examples) == COUNTS[(task, split)]
    check_labels(task, split, examples, labelled=not split.startswith("test"))


@pytest.mark.parametrize("split", list(MULTIRC))
def test_multirc_passages_questions_groups(read, split: str) -> None:
    examples = read("multirc", split)
    passages, questions = MULTIRC[split]
    assert len({e.idx["paragraph"] for e in examples}) == passages
    assert len({(e.idx["paragraph"], e.idx["question"]) for e in examples}) == questions
    # group is a running question counter: 0, 0, .., 1, .., questions - 1
    groups = [e.group for e in examples]
    assert groups[0] == 0 and groups[-1] == questions - 1
    assert all(b - a in (0, 1) for a, b in zip(groups, groups[1:]))
    first = examples[0]
    assert first.idx == {"paragraph": 0, "question": 0, "answer": 0}


@pytest.mark.parametrize(("task", "subset", "split"), SUBSETS, ids=[f"{t}-{s}-{k}" for t, s, k in SUBSETS])
def test_subset_counts_and_labels(read, task: str, subset: str, split: str) -> None:
    examples = read(task, split, subset)
    assert len(examples) == SUBSET_ROWS[task]
    check_labels(task, split, examples, labelled=True)


@pytest.mark.parametrize(("name", "rows"), [("AX-b", 1104), ("AX-g", 356)])
def test_diagnostics(data_root: Path, name: str, rows: int) -> None:
    examples = read_diagnostic(name, data_root)
    assert len(examples) == rows
    check_labels("sg_rte", "dev", examples, labelled=True)
    assert examples[0].idx == ("0" if name == "AX-b" else 0)  # as written in the file
    first = {"AX-b": ("The cat sat on the mat.", "The cat did not sit on the mat."),
             "AX-g": ("The taxpayer met with the accountant to get help filing his taxes.",
                      "The accountant sought help filing taxes.")}
    assert examples[0].segments == (first[name],)
    assert read_diagnostic(name.lower().replace("-", ""), data_root) == examples
    with pytest.raises(ValueError, match="unknown diagnostic 'AX-c'; allowed: AX-b, AX-g"):
        read_diagnostic("AX-c", data_root)


# ------------------------------------------------------------------ quirks of the official files
def test_cola_has_no_header(read) -> None:
    first = read("cola", "train")[0]
    assert first.segments == (("Our friends won't buy this analysis, let alone the next one we propose.", None),)
    assert (first.idx, first.label, first.record) == (0, 1.0, 1)
    test = read("cola", "test")[0]  # the test file does have a header
    assert (test.idx, test.record, test.segments[0][0]) == (0, 2, "Bill whistled past the house.")


def test_file_without_final_newline(read, data_root: Path) -> None:
    assert not (data_root / "glue/CoLA/dev.tsv").read_bytes().endswith(b"\n")
    last = read("cola", "dev")[-1]
    assert (last.record, last.segments[0][0], last.label) == (1043, "John talked to Bill about himself.", 1.0)
    assert read("cb", "test")[-1].idx == 249


def test_mrpc_bom_header(read, data_root: Path) -> None:
    assert (data_root / "glue/MRPC/train.tsv").read_bytes().startswith(b"\xef\xbb\xbfQuality")
    first = read("mrpc", "train")[0]
    assert first.label == 1.0 and first.segments[0][0].startswith("Amrozi accused his brother")
    assert first.segments[0][1].startswith("Referring to him as only")


def test_stsb_float_labels(read) -> None:
    labels = [e.label for e in read("stsb", "train")]
    assert labels[:2] == [5.0, 3.8]
    assert all(isinstance(x, float) for x in labels) and any(x != int(x) for x in labels)


def test_text_layouts(read) -> None:
    assert read("wic", "train")[0].segments[0][0] == "place: Do you want to come over to my place later?"
    assert read("wsc", "train")[0].segments[0][1] == 'Does "He" refer to "Mark"?'
    assert read("copa", "train")[0].segments == (
        ("My body cast a shadow over the grass. What was the cause?", "The sun was rising."),
        ("My body cast a shadow over the grass. What was the cause?", "The grass was cut."),
    )
    assert read("copa", "dev")[0].segments[0][0].endswith(" What happened as a result?")
    assert read("multirc", "dev")[1].segments[0][1] == (
        "Would the mass of a baseball affect how much force you have to use to pick it up? Yes")
    record = read("record", "train", "fewglue")[0]
    assert "@highlight" not in record.segments[0][0] and "\n- Chelsea come from behind" in record.segments[0][0]
    assert len(record.segments) == len(record.candidates) == len(record.candidate_scores)
    assert all("@placeholder" not in b and c in b for (_, b), c in zip(record.segments, record.candidates))


def test_record_gold_scores_on_real_subset(read) -> None:
    for e in read("record", "train", "fewglue") + read("record", "dev", "fewglue"):
        assert e.candidate_scores[int(e.label)] == (1.0, 1.0)
        assert len(set(e.candidates)) == len(e.candidates)


# ------------------------------------------------------------------ errors, on a fake data root
def write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


RTE_HEAD = "index\tsentence1\tsentence2\tlabel\n"


def test_wrong_column_count(tmp_path: Path) -> None:
    write(tmp_path, "glue/RTE/train.tsv", RTE_HEAD + "0\ta\tb\tentailment\n1\ta\tnot_entailment\n")
    with pytest.raises(ValueError, match=r"RTE/train\.tsv, line 3: found 3 columns, expected 4"):
        read_split(get_task("rte"), "train", tmp_path)


def test_empty_line_inside_a_file_is_a_row_not_skipped(tmp_path: Path) -> None:
    write(tmp_path, "glue/RTE/train.tsv", RTE_HEAD + "0\ta\tb\tentailment\n\n1\ta\tb\tentailment\n\n\n")
    with pytest.raises(ValueError, match=r"train\.tsv, line 3: found 1 columns, expected 4"):
        read_split(get_task("rte"), "train", tmp_path)


def test_trailing_empty_lines_and_crlf_are_ignored(tmp_path: Path) -> None:
    write(tmp_path, "glue/RTE/dev.tsv", (RTE_HEAD + "7\ta\tb\tnot_entailment\n\n").replace("\n", "\r\n"))
    (e,) = read_split(get_task("rte"), "dev", tmp_path)
    assert (e.idx, e.segments, e.label, e.record) == (7, (("a", "b"),), 1.0, 2)


def test_unknown_label(tmp_path: Path) -> None:
    write(tmp_path, "glue/RTE/dev.tsv", RTE_HEAD + "0\ta\tb\tentailment\n1\ta\tb\tmaybe")
    with pytest.raises(ValueError, match=r"RTE/dev\.tsv, line 3: unknown label 'maybe' for rte; "
                                         r"allowed labels: \['entailment', 'not_entailment'\]"):
        read_split(get_task("rte"), "dev", tmp_path)


def test_unknown_label_headerless_cola_and_stsb_range(tmp_path: Path) -> None:
    write(tmp_path, "glue/CoLA/train.tsv", "gj04\t1\t\tFine.\ngj04\t2\t*\tBad label.\n")
    with pytest.raises(ValueError, match=r"CoLA/train\.tsv, line 2: unknown label '2' for cola"):
        read_split(get_task("cola"), "train", tmp_path)
    head = "index\tsentence1\tsentence2\tscore\n"
    write(tmp_path, "glue/STS-B/dev.tsv", head + "0\ta\tb\t4.5\n1\ta\tb\t6.5\n")
    with pytest.raises(ValueError, match=r"STS-B/dev\.tsv, line 3: unknown label '6\.5' for stsb"):
        read_split(get_task("stsb"), "dev", tmp_path)


def test_missing_label(tmp_path: Path) -> None:
    write(tmp_path, "glue/SST-2/train.tsv", "sentence\tlabel\ngood .\t1\nbad .\t\n")
    with pytest.raises(ValueError, match=r"SST-2/train\.tsv, line 3: missing label for sst2"):
        read_split(get_task("sst2"), "train", tmp_path)
    write(tmp_path, "superglue/CB/val.jsonl", json.dumps({"premise": "p", "hypothesis": "h", "idx": 0}))
    with pytest.raises(ValueError, match=r"CB/val\.jsonl, line 1: missing label for cb"):
        read_split(get_task("cb"), "dev", tmp_path)
    write(tmp_path, "glue/SST-2/dev.tsv", "sentence\n")
    with pytest.raises(ValueError, match=r"SST-2/dev\.tsv, line 1: the header lacks column\(s\) \['label'\]"):
        read_split(get_task("sst2"), "dev", tmp_path)


def test_unknown_jsonl_label_and_missing_field(tmp_path: Path) -> None:
    rows = [{"question": "q", "passage": "p", "idx": 0, "label": True},
            {"question": "q", "passage": "p", "idx": 1, "label": "maybe"}]
    write(tmp_path, "superglue/BoolQ/val.jsonl", "\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match=r"BoolQ/val\.jsonl, line 2: unknown label 'maybe' for boolq"):
        read_split(get_task("boolq"), "dev", tmp_path)
    write(tmp_path, "superglue/BoolQ/test.jsonl", json.dumps({"question": "q", "idx": 0}))
    with pytest.raises(ValueError, match=r"BoolQ/test\.jsonl, line 1: missing field 'passage'"):
        read_split(get_task("boolq"), "test", tmp_path)


def test_invalid_json(tmp_path: Path) -> None:
    good = json.dumps({"premise": "p", "hypothesis": "h", "label": "neutral", "idx": 0})
    write(tmp_path, "superglue/CB/train.jsonl", good + '\n{"premise": "p", "hypo\n')
    with pytest.raises(ValueError, match=r"CB/train\.jsonl, line 2: invalid JSON"):
        read_split(get_task("cb"), "train", tmp_path)


def test_missing_file(tmp_path: Path, data_root: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"file not found: .*glue/RTE/dev\.tsv \(expected glue/RTE/dev\.tsv"):
        read_split(get_task("rte"), "dev", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"MNLI/train\.tsv; .*SOURCES\.md lists this file as missing.*"
                                                r"subsets that exist: k-shot-13, k-shot-21"):
        read_split(get_task("mnli"), "train", data_root)
    with pytest.raises(FileNotFoundError, match=r"BoolQ/train\.jsonl; .*missing.*subsets that exist: fewglue"):
        read_split(get_task("boolq"), "train", data_root)


def test_unknown_split_and_subset(data_root: Path) -> None:
    with pytest.raises(ValueError, match=r"rte: unknown split 'validation'; allowed splits: train, dev, test"):
        read_split(get_task("rte"), "validation", data_root)
    with pytest.raises(ValueError, match=r"mnli: unknown split 'dev'; allowed splits: train, dev_matched"):
        read_split(get_task("mnli"), "dev", data_root)
    with pytest.raises(ValueError, match=r"qnli: unknown subset 'k-shot-7'; allowed subsets: k-shot-13, "):
        read_split(get_task("qnli"), "train", data_root, subset="k-shot-7")
    with pytest.raises(ValueError, match=r"rte: unknown subset 'fewglue'; allowed subsets: none"):
        read_split(get_task("rte"), "train", data_root, subset="fewglue")
    with pytest.raises(ValueError, match=r"boolq subset 'fewglue': unknown split 'test'; allowed splits: train, dev"):
        read_split(get_task("boolq"), "test", data_root, subset="fewglue")


def test_resolve_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPECLORA_DATA", raising=False)
    assert resolve_data_root(str(tmp_path)) == tmp_path
    monkeypatch.setenv("SPECLORA_DATA", str(tmp_path))
    assert resolve_data_root(None) == tmp_path
    monkeypatch.setenv("SPECLORA_DATA", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=r"data_dir=None, \$SPECLORA_DATA='.*nope'.*glue/.*superglue/"):
        resolve_data_root(None)
    monkeypatch.delenv("SPECLORA_DATA")
    with pytest.raises(FileNotFoundError, match=r"data_dir='.*other', \$SPECLORA_DATA=None"):
        resolve_data_root(str(tmp_path / "other"))


# ------------------------------------------------------------------ ReCoRD soft gold, by hand
RECORD_TEXT = "Barack Obama met Michelle Obama in Chicago.\n@highlight\nObama speaks"


def record_line(answers: list[str] | None) -> str:
    def span(s: str, start: int = 0) -> dict:
        begin = RECORD_TEXT.index(s, start)
        return {"start": begin, "end": begin + len(s) - 1}  # end is inclusive

    # entities deliberately out of order and with a repeat: candidates follow the passage
    entities = [span("Chicago"), span("Barack Obama"), span("Obama", 50), span("Michelle Obama"),
                span("Obama", 7)]
    qa: dict = {"query": "@placeholder was born in Hawaii.", "idx": 11}
    if answers is not None:
        qa["answers"] = [dict(span(a), text=a) for a in answers]
    return json.dumps({"passage": {"text": RECORD_TEXT, "entities": entities}, "qas": [qa], "idx": 3})


def test_record_candidates_and_scores(tmp_path: Path) -> None:
    write(tmp_path, "superglue/ReCoRD/subsets/FewGLUE/train.jsonl", record_line(["Barack Obama"]))
    (e,) = read_split(get_task("record"), "train", tmp_path, subset="fewglue")
    assert e.candidates == ("Barack Obama", "Obama", "Michelle Obama", "Chicago")
    passage = "Barack Obama met Michelle Obama in Chicago.\n- Obama speaks"
    assert e.segments[2] == (passage, "Michelle Obama was born in Hawaii.")
    assert (e.idx, e.label, e.record) == (11, 0.0, 1)
    # "Obama" vs "Barack Obama": P = 1/1, R = 1/2 -> F1 = 2/3; "Michelle Obama": P = R = 1/2 -> F1 = 1/2
    f1s, ems = zip(*e.candidate_scores)
    assert f1s == pytest.approx((1.0, 2 / 3, 0.5, 0.0)) and ems == (1.0, 0.0, 0.0, 0.0)


def test_record_unlabelled_and_no_gold(tmp_path: Path) -> None:
    write(tmp_path, "superglue/ReCoRD/test.jsonl", record_line(None))
    (e,) = read_split(get_task("record"), "test", tmp_path)
    assert e.label is None and e.candidate_scores is None and len(e.candidates) == 4
    write(tmp_path, "superglue/ReCoRD/val.jsonl", record_line(["Obama"]).replace('"text": "Obama"',
                                                                             '"text": "Hawaii"'))
    with pytest.raises(ValueError, match=r"ReCoRD/val\.jsonl, line 1 \(query 11\): no candidate entity equals"):
        read_split(get_task("record"), "dev", tmp_path)


def test_squad_normalisation() -> None:
    assert normalize_answer("  The Eiffel-Tower,  an icon! ") == "eiffeltower icon"
    assert token_f1("the Paris", "Paris, France") == pytest.approx(2 / 3)  # P = 1, R = 1/2
    assert token_f1("London", "Paris") == 0.0


# ------------------------------------------------------------------ hub rows map like the files
def test_hub_rows_match_file_reader(read) -> None:
    sst = read("sst2", "train")[0]
    (hub,) = example_from_hub_row(TASKS["sst2"], {"sentence": sst.segments[0][0], "label": 0, "idx": 0}, 0)
    assert (hub.segments, hub.label, hub.idx) == (sst.segments, sst.label, sst.idx)
    (unl,) = example_from_hub_row(TASKS["sst2"], {"sentence": "x", "label": -1, "idx": 5}, 5)
    assert unl.label is None and unl.group == 5 and unl.record == 6

    copa = read("copa", "train")[0]
    row = {"premise": "My body cast a shadow over the grass.", "choice1": "The sun was rising.",
           "choice2": "The grass was cut.", "question": "cause", "label": 0, "idx": 0}
    (hub,) = example_from_hub_row(TASKS["copa"], row, 0)
    assert (hub.segments, hub.label) == (copa.segments, copa.label)


def test_hub_multirc_row(read, data_root: Path) -> None:
    first = json.loads((data_root / "superglue/MultiRC/val.jsonl").read_text().split("\n")[0])
    q = first["passage"]["questions"][0]
    file_ex = read("multirc", "dev")[1]
    row = {"paragraph": first["passage"]["text"], "question": q["question"], "answer": q["answers"][1]["text"],
           "idx": {"paragraph": 0, "question": 0, "answer": 1}, "label": 1}
    (hub,) = example_from_hub_row(TASKS["multirc"], row, 1, group=0)
    assert (hub.segments, hub.label, hub.idx, hub.group) == (file_ex.segments, 1.0, file_ex.idx, 0)


def test_hub_record_row(read, data_root: Path) -> None:
    raw = json.loads((data_root / "superglue/ReCoRD/subsets/FewGLUE/train.jsonl").read_text().split("\n")[0])
    file_ex = read("record", "train", "fewglue")[0]
    text, qa = raw["passage"]["text"], raw["qas"][0]
    spans = [{"text": text[e["start"]:e["end"] + 1], "start": e["start"], "end": e["end"]}
             for e in raw["passage"]["entities"]]
    random.Random(0).shuffle(spans)
    row = {"passage": text, "query": qa["query"], "entities": sorted({s["text"] for s in spans}),
           "entity_spans": {k: [s[k] for s in spans] for k in ("text", "start", "end")},  # datasets' dict of lists
           "answers": [a["text"] for a in qa["answers"]], "idx": {"passage": raw["idx"], "query": qa["idx"]}}
    (hub,) = example_from_hub_row(TASKS["record"], row, 0)
    assert (hub.segments, hub.candidates, hub.label, hub.idx) == (
        file_ex.segments, file_ex.candidates, file_ex.label, file_ex.idx)
    assert hub.candidate_scores == file_ex.candidate_scores
    # without entity_spans (older datasets): same candidates, ordered by first occurrence in the passage
    (old,) = example_from_hub_row(TASKS["record"], {**row, "entity_spans": None, "answers": []}, 0)
    assert set(old.candidates) == set(file_ex.candidates) and old.label is None and old.candidate_scores is None


def test_hub_row_errors() -> None:
    with pytest.raises(ValueError, match=r"hub sst2 row 3: hub label 2 for sst2, expected -1 or an int in \[0, 2\)"):
        example_from_hub_row(TASKS["sst2"], {"sentence": "x", "label": 2, "idx": 3}, 3)
    with pytest.raises(ValueError, match=r"hub rte row 0: missing column 'sentence2'"):
        example_from_hub_row(TASKS["rte"], {"sentence1": "x", "label": 0, "idx": 0}, 0)


def test_read_hub_split_without_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(ImportError, match="pip install datasets"):
        read_hub_split(TASKS["cb"], "dev")


def test_read_hub_split_with_a_fake_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    rows = [{"paragraph": "P", "question": f"Q{q}", "answer": f"A{a}", "label": a % 2,
             "idx": {"paragraph": 0, "question": q, "answer": a}} for q, a in [(0, 0), (0, 1), (1, 2), (2, 3)]]

    def load_dataset(path: str, config: str, split: str) -> list[dict]:
        calls.append((path, config, split))
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    examples = read_hub_split(TASKS["multirc"], "dev")
    assert calls == [("super_glue", "multirc", "validation")]
    assert [e.group for e in examples] == [0, 0, 1, 2] and [e.uid for e in examples] == [0, 1, 2, 3]
    assert examples[1].segments == (("P", "Q0 A1"),)
    assert hub_split(TASKS["mnli"], "dev_matched") == "validation_matched"
    assert hub_split(TASKS["mnli"], "test_mismatched") == "test_mismatched"
    with pytest.raises(ValueError, match=r"mnli: unknown hub split 'dev'; allowed: train, dev_matched"):
        hub_split(TASKS["mnli"], "dev")
