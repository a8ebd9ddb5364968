"""Eval decontamination: which rows go and which eval item each matched, for every leak kind; eval loaders."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest

from conftest import shared_path

from sftdata.clean import Decontaminator, decontaminate, load_eval_segments
from sftdata.record import DataError, Message, Record

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

Q1 = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
      "How many clips did Natalia sell altogether in April and May?")
Q2 = ("Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
      "How much did she earn?")
Q3 = ("A bakery packs cupcakes into boxes of 6. On Saturday it baked 150 cupcakes and sold 17 full boxes. "
      "How many cupcakes were left unsold at the end of the day?")
SHORT = "Rewrite it shorter."


def chat(i: int, user: str, assistant: str = "The answer is 72.") -> Record:
    return Record("train.jsonl", i, [Message("user", user), Message("assistant", assistant)])


@pytest.fixture()
def eval_file(tmp_path) -> Path:
    p = tmp_path / "evalset.jsonl"
    rows = [{"id": "q1", "question": Q1, "answer": "72"}, {"id": "q2", "question": Q2, "answer": "10"},
            {"id": "q3", "question": Q3, "answer": "48"}, {"id": "q4", "question": SHORT}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def wrap(s: str, width: int = 30) -> str:
    out, line = [], ""
    for w in s.split():
        if len(line) + len(w) > width:
            out.append(line)
            line = ""
        line += (" " if line else "") + w
    return "\n".join(out + [line])


def test_every_leak_kind_is_matched_to_its_eval_item(eval_file):
    records = [
        chat(1, Q1, "72"),                                                      # verbatim copy
        chat(2, "Here is a homework problem my teacher gave us today. " + Q2 + " Please show work."),  # embedded
        chat(3, wrap(Q3.upper().replace(",", " ,").replace(".", " !"))),        # case/punct/line wrapping
        chat(4, Q1, "I do not know."),                                          # question-only leak (other answer)
        chat(5, "Write a haiku about autumn leaves falling in the quiet park.", "Leaves drift..."),  # clean
        Record("train.jsonl", 6, [Message("system", "You are a tutor."), Message("user", "Solve this."),
                                  Message("assistant", Q2 + " She earned $10.")]),  # copy in the assistant turn
        chat(7, "In April Natalia sold hair clips to 48 friends; in May she sold only half as many clips. "
                "Altogether, what number of clips did Natalia sell across April and May?"),  # rephrased
        chat(8, "Rewrite it shorter."),                                         # eval item too short to match
    ]
    dc = Decontaminator([str(eval_file)])
    kept, removed = dc.filter_batch(records)
    assert [r.row for r in kept] == [5, 8]
    got = {r.record.row: (r.reason, r.matched["id"], r.matched["index"], r.matched["field"], r.matched["method"])
           for r in removed}
    assert got == {
        1: ("contaminated", "q1", 1, "question", "ngram"),
        2: ("contaminated", "q2", 2, "question", "ngram"),
        3: ("contaminated", "q3", 3, "question", "ngram"),
        4: ("contaminated", "q1", 1, "question", "ngram"),
        6: ("contaminated", "q2", 2, "question", "ngram"),
        7: ("contaminated", "q1", 1, "question", "rephrase"),
    }
    for r in removed:
        assert r.matched["file"] == str(eval_file)
        if r.matched["method"] == "ngram":
            assert r.matched["overlap"] == 1.0 and r.matched["matched_ngrams"] == r.matched["eval_ngrams"]
        else:
            assert dc.rephrase_threshold <= r.matched["overlap"] <= 1.0
    s = dc.summary()
    assert s["removed"] == {"contaminated": 6} and s["removed_by_method"] == {"ngram": 5, "rephrase": 1}
    assert s["eval_segments"] == 4 and s["eval_segments_too_short"] == 1


def test_noised_copies_are_caught_like_verbatim_ones(tmp_path):
    """Punctuation stripped (apostrophes, decimal points, thousands separators, underscores), lower-cased and
    double-spaced: the same tokens as the eval text once both are normalized."""
    import string

    items = ["Janet's ducks lay 16 eggs per day. She sells the remainder at $2.50 each, and she earns $1,000.",
             'def has_close_elements(numbers: List[float], threshold: float) -> bool:\n    """ Check if in given '
             'list of numbers, are any two numbers closer to each other than given threshold."""']
    p = tmp_path / "ev.jsonl"
    p.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in items))
    strip = str.maketrans("", "", string.punctuation)
    noised = ["  ".join(q.translate(strip).lower().split()) for q in items]
    replaced = ["  ".join("".join(c if c.isalnum() or c.isspace() else " " for c in q).split()) for q in items]
    dc = Decontaminator([str(p)], rephrase=False)
    got = [m and (m["index"], m["overlap"]) for m in dc.scan([chat(i, q) for i, q in enumerate(noised + replaced)])]
    # stripped: whole overlap. Punctuation replaced by spaces splits words ("janet s") the eval side keeps joined:
    # only the n-grams away from punctuation match (the code item keeps 82% of them, the short one too few)
    assert got == [(1, 1.0), (2, 1.0), None, (2, 0.8235)]
    assert dc.summary()["normalization"]["punctuation"] == "delete"
    assert dc.summary()["rephrase_normalization"]["punctuation"] == "space"  # content terms split at punctuation
    assert Decontaminator([str(p)], normalize="punctuation=space").normalizer.punctuation == "space"


def test_numbers_matter_and_unrelated_rows_stay(eval_file):
    dc = Decontaminator([str(eval_file)])
    # same wording, different numbers: still an n-gram copy of the template (overlap reported, below 1)
    templ = chat(1, Q3.replace("150", "210").replace("17", "20"))
    # same topic words but a different problem: not flagged
    topic = chat(2, "Natalia likes April and May. Her friends gave her some clips for her hair as a gift.")
    # rephrase with a wrong number: the numbers of a numeric item must all occur
    wrong = chat(3, "In April Natalia sold hair clips to 45 friends; in May she sold only half as many clips. "
                    "Altogether, what number of clips did Natalia sell across April and May?")
    kept, removed = dc.filter_batch([templ, topic, wrong])
    assert [r.row for r in kept] == [2, 3]
    assert removed[0].matched["id"] == "q3" and 0.5 <= removed[0].matched["overlap"] < 1.0
    no_rephrase = Decontaminator([str(eval_file)], rephrase=False)
    assert no_rephrase.scan([chat(7, "In April Natalia sold hair clips to 48 friends; in May she sold only half "
                                     "as many clips. Altogether, what number of clips did Natalia sell across "
                                     "April and May?")]) == [None]


def test_deterministic(eval_file):
    recs = [chat(i, Q1 if i % 3 == 0 else f"Unrelated prompt number {i} about cooking pasta.") for i in range(30)]
    a = [m and (m["id"], m["overlap"]) for m in Decontaminator([str(eval_file)]).scan(recs)]
    b = [m and (m["id"], m["overlap"]) for m in Decontaminator([str(eval_file)]).scan(recs)]
    assert a == b and sum(x is not None for x in a) == 10


def test_eval_loaders_formats_fields_and_errors(tmp_path):
    js = tmp_path / "e.json"
    js.write_text(json.dumps([{"question_id": 81, "turns": ["First turn text here please", "Second turn"]}]))
    cs = tmp_path / "e.csv"
    with open(cs, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "prompt"])
        w.writerow(["t", "Write a function that adds two numbers"])
    gz = tmp_path / "e.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(json.dumps({"task_id": "HumanEval/0", "prompt": "def f():\n    pass", "canonical_solution": "x"}) + "\n")
    pq_path = tmp_path / "e.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"messages": [[{"role": "user", "content": "hello there"},
                                           {"role": "assistant", "content": "hi"}]]}), pq_path)
    segs = load_eval_segments([str(js), str(cs), str(gz), str(pq_path)])
    assert [(s.id, s.field, s.text) for s in segs] == [
        ("81", "turns[0]", "First turn text here please"), ("81", "turns[1]", "Second turn"),
        ("2", "prompt", "Write a function that adds two numbers"),
        ("HumanEval/0", "prompt", "def f():\n    pass"),
        ("1", "messages[0]", "hello there"),
    ]
    sol = load_eval_segments([str(gz)], fields="canonical_solution")
    assert [(s.field, s.text) for s in sol] == [("canonical_solution", "x")]
    with pytest.raises(DataError, match="has fields"):
        load_eval_segments([str(js)], fields=["answer"])
    with pytest.raises(DataError, match="not found"):
        load_eval_segments([str(tmp_path / "nope.jsonl")])


def test_decontaminate_api_and_cli(eval_file, tmp_path):
    from click.testing import CliRunner

    from sftdata.cli_clean import decontaminate as cmd

    src = tmp_path / "train.jsonl"
    rows = [{"instruction": Q2, "output": "10", "meta": 1}, {"instruction": "Tell me a joke.", "output": "No.", "meta": 2}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = decontaminate([str(src)], tmp_path / "kept.jsonl", eval_paths=[str(eval_file)], report=tmp_path / "r.jsonl")
    assert result["removed"] == {"contaminated": 1} and result["rows_kept"] == 1
    kept = [json.loads(l) for l in (tmp_path / "kept.jsonl").read_text().splitlines()]
    assert kept == [rows[1]]  # the input row as read: its own schema and fields
    assert [json.loads(l) for l in (tmp_path / "kept.provenance.jsonl").read_text().splitlines()] == [
        {"source": str(src), "row": 2}]
    rep = json.loads((tmp_path / "r.jsonl").read_text())
    assert (rep["row"], rep["matched"]["id"], rep["matched"]["field"], rep["input"]) == (1, "q2", "question", rows[0])
    res = CliRunner().invoke(cmd, [str(src), "--eval", str(eval_file), "-o", str(tmp_path / "k2.jsonl"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output[res.output.index("{"):])["removed"] == {"contaminated": 1}


def _shared(name: str) -> Path:
    return shared_path("data", name)


def test_real_eval_sets_planted_leaks():
    he, gsm, mt = _shared("HumanEval.jsonl.gz"), _shared("gsm8k_test.jsonl"), _shared("mt_bench_questions.jsonl")
    dc = Decontaminator([str(gsm), str(he), str(mt)])
    segs = {(s.file, s.id): s for s in dc.segments}
    he0 = segs[(str(he), "HumanEval/0")].text
    g5 = segs[(str(gsm), "5")].text
    reindented = "\n".join("  " + line.strip() for line in he0.splitlines())  # indentation / whitespace changed
    records = [
        chat(1, "Complete this code:\n" + reindented, "    return False"),
        chat(2, g5.lower(), "42"),
        chat(3, "Plan a three day trip to Kyoto with a focus on temples and food.", "Day 1 ..."),
    ]
    got = [m and (m["id"], m["method"]) for m in dc.scan(records)]
    assert got == [("HumanEval/0", "ngram"), ("5", "ngram"), None]
