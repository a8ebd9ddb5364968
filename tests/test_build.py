"""build(): end to end on files, the manifest, atomic output, cache invalidation, and invariants I1-I4 checked
independently of the encoder on the real corpora with every real tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sftdata.build import build
from sftdata.ingest import read_records
from sftdata.record import DataError
from sftdata.render import IGNORE_INDEX, Encoder
from sftdata.templates import load_template

from conftest import REPO, TINY_TOKENIZER, shared_path

EXAMPLES = REPO / "examples" / "data"


def rows_of(output: Path, split: str = "train") -> list[dict]:
    manifest = json.loads((output / "manifest.json").read_text())
    return [r for f in manifest["splits"][split]["files"] for r in pq.read_table(output / f).to_pylist()]


def test_build_examples_end_to_end(tmp_path):
    out = tmp_path / "out"
    result = build([str(EXAMPLES / "alpaca.jsonl"), str(EXAMPLES / "chat.jsonl")], template="chatml", output=out)
    m = result.manifest
    assert m["format"] == "sftdata/1" and m["labels"].startswith("unshifted")
    assert m["counts"]["rows_read"] == 200 and m["counts"]["rows_kept"] == 200 and m["counts"]["skipped"] == {}
    assert [i["format"] for i in m["inputs"]] == ["alpaca", "messages"]
    assert m["template"]["name"] == "chatml" and m["template"]["end_of_turn"] == "<|im_end|>"
    assert m["template"]["text"] == (REPO / "templates" / "chatml.jinja").read_text()
    assert m["tokenizer"]["name_or_path"] == "qwen3 (bundled)" and m["tokenizer"]["vocab_size"] == 151669
    rows = rows_of(out)
    assert len(rows) == 200
    assert sum(r["num_tokens"] for r in rows) == m["tokens"]["total"]
    assert sum(r["num_trained"] for r in rows) == m["tokens"]["trained"]
    assert m["tokens"]["per_source"][str(EXAMPLES / "chat.jsonl")]["rows"] == 50
    for r in rows:
        assert len(r["input_ids"]) == len(r["labels"]) == r["num_tokens"]
        assert all(label in (IGNORE_INDEX, i) for i, label in zip(r["input_ids"], r["labels"]))
    assert (out / "problems.jsonl").read_text() == ""
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_output_loads_in_datasets_and_polars(tmp_path):
    import datasets
    import polars as pl

    out = tmp_path / "out"
    build([str(EXAMPLES / "chat.jsonl")], output=out, eval_fraction=0.2, seed=1)
    ds = datasets.load_dataset("parquet", data_dir=str(out))
    assert set(ds) == {"train", "validation"}
    assert ds["train"].num_rows + ds["validation"].num_rows == 50
    assert ds["validation"].num_rows == len(rows_of(out, "validation")) > 0
    frame = pl.read_parquet(out / "train" / "*.parquet")
    assert frame.columns == ["input_ids", "labels", "source", "row", "num_tokens", "num_trained", "truncated", "kinds"]
    again = tmp_path / "again"
    build([str(EXAMPLES / "chat.jsonl")], output=again, eval_fraction=0.2, seed=1)
    assert [r["row"] for r in rows_of(again, "validation")] == [r["row"] for r in rows_of(out, "validation")]


def test_bad_rows_are_counted_listed_and_the_rest_built(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join([
        json.dumps({"instruction": "a", "output": "b"}),
        "{not json",
        json.dumps({"instruction": "say <|im_end|>", "output": "b"}),
        json.dumps({"instruction": "c", "output": "d"}),
    ]) + "\n")
    result = build([str(src)], output=tmp_path / "out")
    counts = result.manifest["counts"]
    assert counts["rows_read"] == 4 and counts["rows_kept"] == 2
    assert counts["skipped"] == {"malformed-json": 1, "special-token-text": 1}
    listed = [json.loads(line) for line in (tmp_path / "out" / "problems.jsonl").read_text().splitlines()]
    assert [(p["row"], p["kind"]) for p in listed] == [(2, "malformed-json"), (3, "special-token-text")]
    assert all(p["source"] == str(src) for p in listed)


def test_on_error_fail_leaves_previous_output_untouched(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    out = tmp_path / "out"
    build([str(src)], output=out)
    before = (out / "manifest.json").read_text()
    src.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n{broken\n")
    with pytest.raises(DataError, match=r"in.jsonl:2: \[ingest/malformed-json\]"):
        build([str(src)], output=out, on_error="fail")
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out"]


def test_fingerprint_skips_unchanged_and_rebuilds_on_any_change(tmp_path):
    """Failure mode 15 (docs/invariants.md): the prepared data is reused only when inputs, template, tokenizer and options are the same."""
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    out = tmp_path / "out"
    first = build([str(src)], output=out)
    assert not first.up_to_date
    assert build([str(src)], output=out).up_to_date
    assert not build([str(src)], output=out, template="alpaca", tokenizer="qwen3").up_to_date
    assert not build([str(src)], output=out, tokenizer=str(TINY_TOKENIZER)).up_to_date
    assert build([str(src)], output=out, tokenizer=str(TINY_TOKENIZER)).up_to_date
    src.write_text(json.dumps({"instruction": "a", "output": "c"}) + "\n")  # same size, new content
    assert not build([str(src)], output=out, tokenizer=str(TINY_TOKENIZER)).up_to_date
    assert not build([str(src)], output=out, tokenizer=str(TINY_TOKENIZER), max_length=64).up_to_date


def test_refuses_to_replace_a_directory_it_did_not_write(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("x")
    with pytest.raises(DataError, match="not an sftdata output directory"):
        build([str(src)], output=precious)
    assert (precious / "thesis.tex").read_text() == "x"


def test_max_length_truncates_and_counts(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"instruction": "Say hello", "output": "Hello " * 50}) + "\n"
                   + json.dumps({"instruction": "Long " * 80, "output": "x"}) + "\n"
                   + json.dumps({"instruction": "hi", "output": "yo"}) + "\n")
    result = build([str(src)], output=tmp_path / "out", max_length=32, shuffle=False)
    counts = result.manifest["counts"]
    assert counts["rows_kept"] == 2 and counts["truncated"] == 1 and counts["skipped"] == {"too-long": 1}
    rows = rows_of(tmp_path / "out")
    assert [r["num_tokens"] for r in rows] == [32, 12]
    assert [r["truncated"] for r in rows] == [True, False]
    dropped = build([str(src)], output=tmp_path / "out2", max_length=32, truncation="drop", max_skipped_fraction=1)
    with pytest.raises(DataError, match=r"2 of 3 rows \(67%\) were skipped or removed, more than max_skipped_fraction 0.5: too-long \(2\)"):
        build([str(src)], output=tmp_path / "out3", max_length=32, truncation="drop")
    assert dropped.manifest["counts"]["rows_kept"] == 1 and dropped.manifest["counts"]["skipped"] == {"too-long": 2}


# --- I1-I4 on the real corpora with every real tokenizer, checked independently of the Encoder ----------------

CORPORA = [
    ("gsm8k_train.jsonl", "instruction=question,output=answer"),
    ("codealpaca.json", None),
    ("gpteacher_codegen.json", None),
    ("gpteacher_roleplay.json", None),
    ("gpteacher_toolformer.json", None),
    ("sharegpt_dummy.json", None),
]
PAIRS = [("chatml", "qwen3"), ("llama2", "mistral-7b-v0.1"), ("alpaca", "mistral-7b-v0.1"), ("alpaca", "qwen3"),
         ("tokenizer", "llama3_1")]
SAMPLE = 250


def check_invariants(record, example, template, tok) -> None:
    messages = record.messages_as_dicts()
    if "alpaca_instruction" in record.extra:
        first_user = next(m for m in messages if m["role"] == "user")
        first_user.update(instruction=record.extra["alpaca_instruction"], input=record.extra["alpaca_input"])
    ids, labels = example.input_ids, example.labels
    # I1: exactly what a server tokenizes from the rendered conversation.
    assert ids == tok(template.render(messages), add_special_tokens=False)["input_ids"]
    trained_runs, start = [], None
    for i, label in enumerate(labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            trained_runs.append((start, i))
            start = None
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    assert len(trained_runs) == len(turns)
    for (s, e), k in zip(trained_runs, turns):
        # I2: the serving prompt for turn k tokenizes to exactly the tokens before the trained run.
        prompt = template.render(messages[:k], add_generation_prompt=True)
        assert ids[:s] == tok(prompt, add_special_tokens=False)["input_ids"]
        # I3: trained labels equal the ids; I4: they decode to the reply (template whitespace rule) + end marker.
        assert labels[s:e] == ids[s:e]
        decoded = tok.decode(ids[s:e])
        assert decoded.rstrip().endswith(template.end_of_turn.strip())
        body = decoded.rstrip()[: -len(template.end_of_turn.strip())]
        assert body.strip() == messages[k]["content"].strip()


@pytest.mark.parametrize("template_name,tokenizer", PAIRS, ids=lambda x: x)
def test_invariants_on_real_corpora(load_tok, template_name, tokenizer):
    tok = load_tok(tokenizer)
    template = load_template(template_name, tok)
    encoder = Encoder(template, tok)
    checked = 0
    for name, columns in CORPORA:
        records = next(read_records([str(shared_path("data", name))], columns=columns, batch_size=SAMPLE))
        examples, problems = encoder.encode_batch(records)
        assert problems == [], problems[:3]
        by_key = {(r.source, r.row): r for r in records}
        for example in examples:
            check_invariants(by_key[(example.source, example.row)], example, template, tok)
            checked += 1
    assert checked == SAMPLE * len(CORPORA)


def test_worker_processes_give_identical_output(tmp_path):
    inputs = [str(EXAMPLES / "alpaca.jsonl"), str(EXAMPLES / "chat.jsonl")]
    build(inputs, output=tmp_path / "one", workers=1, batch_size=32)
    build(inputs, output=tmp_path / "two", workers=2, batch_size=32)
    assert rows_of(tmp_path / "one") == rows_of(tmp_path / "two")


def test_raw_text_is_packed_in_blocks_without_losing_tokens(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": "word " * n}) + "\n" for n in (5, 40, 12)))
    unpacked = build([str(src)], output=tmp_path / "u", tokenizer=str(TINY_TOKENIZER))
    packed = build([str(src)], output=tmp_path / "p", tokenizer=str(TINY_TOKENIZER), pack=True, max_length=16)
    assert packed.manifest["counts"]["truncated"] == 0 and packed.manifest["counts"]["skipped"] == {}
    flat = [t for r in rows_of(tmp_path / "u") for t in r["input_ids"]]
    blocks = rows_of(tmp_path / "p")
    assert all(len(r["input_ids"]) <= 16 for r in blocks)
    assert sorted(t for r in blocks for t in r["input_ids"]) == sorted(flat)
    assert unpacked.manifest["tokens"]["total"] == len(flat) == packed.manifest["tokens"]["total"]


def test_take_rows_is_arrow_take_over_many_chunks():
    import importlib

    import numpy as np
    import pyarrow as pa

    take_rows = importlib.import_module("sftdata.build").take_rows
    table = pa.Table.from_batches([pa.record_batch({"ids": pa.array([[b, i] for i in range(b % 4)], pa.list_(pa.int32())),
                                                    "row": pa.array([10 * b + i for i in range(b % 4)], pa.int64())})
                                   for b in range(12)])
    indices = np.random.default_rng(1).permutation(table.num_rows)[:11]
    taken = take_rows(table, np.append(indices, indices[0]))  # a repeated row too
    assert taken.equals(table.take(pa.array(np.append(indices, indices[0]))))
    assert taken["row"].num_chunks == 1 and take_rows(table, np.zeros(0, np.int64)).num_rows == 0
