"""Recipes: the typed config is the API, the file format and the CLI; sources mix to their target shares; splits by
group; config replay; every reader loads a split; mixed inputs; dedup after the per-row checks (issue 10)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from sftdata.build import build
from sftdata.cli import main
from sftdata.config import ConfigError
from sftdata.recipe import Recipe, Source, load_recipe
from sftdata.record import DataError

from conftest import REPO, TINY_TOKENIZER, shared_path

TINY = str(TINY_TOKENIZER)
CHAT = str(REPO / "examples" / "data" / "chat.jsonl")


def rows_of(output: Path, split: str = "train") -> list[dict]:
    manifest = json.loads((output / "manifest.json").read_text())
    return [r for f in manifest["splits"][split]["files"] for r in pq.read_table(output / f).to_pylist()]


def two_sources(**weights) -> list[Source]:
    task = Source(path=str(shared_path("data", "gsm8k_train.jsonl")), name="gsm8k",
                  columns={"instruction": "question", "output": "answer"}, **weights.get("task", {}))
    general = Source(path=str(shared_path("data", "gpteacher_roleplay.json")), name="roleplay", **weights.get("general", {}))
    return [task, general]


@pytest.mark.parametrize("mix_by", ["rows", "tokens"])
def test_two_real_sources_mix_to_85_15_and_split_80_10_10(tmp_path, mix_by):
    recipe = Recipe(sources=two_sources(task={"weight": 0.85}, general={"weight": 0.15}), tokenizer=TINY,
                    output=str(tmp_path / "out"), mix_by=mix_by, splits={"train": 0.8, "validation": 0.1, "test": 0.1},
                    stratify=True, seed=3)
    manifest = build(recipe).manifest
    mixing = manifest["mixing"]
    shares = {s["source"]: s[f"share_{mix_by}"] for s in mixing["sources"]}
    assert abs(shares["gsm8k"] - 0.85) < 0.01 and abs(shares["roleplay"] - 0.15) < 0.01
    task, general = mixing["sources"]
    # the source with the largest weight keeps all of its training rows; the other is sampled down to match
    assert task["rows"] == task["available_rows"] and general["rows"] < general["available_rows"]
    train = rows_of(tmp_path / "out")
    assert len(train) == task["rows"] + general["rows"] == manifest["splits"]["train"]["rows"]
    by_source = Counter(Path(r["source"]).name for r in train)
    assert by_source == {"gsm8k_train.jsonl": task["rows"], "gpteacher_roleplay.json": general["rows"]}
    # stratified: every source is split 80/10/10 exactly (to one conversation)
    read = {Path(i["path"]).name: i["rows"] for i in manifest["inputs"]}
    for split, fraction in (("validation", 0.1), ("test", 0.1)):
        counts = Counter(Path(r["source"]).name for r in rows_of(tmp_path / "out", split))
        for name, n in read.items():
            assert abs(counts[name] - fraction * n) <= 1, (split, name, counts[name], n)
    # every row ends in exactly one place: kept, skipped or removed (the mixing removals named as such)
    counts = manifest["counts"]
    assert counts["rows_read"] == counts["rows_kept"] + counts["skipped_total"] + counts["removed_total"]
    assert counts["removed"]["mixing"] == general["available_rows"] - general["rows"]


def test_samples_and_epochs_give_exact_counts(tmp_path):
    recipe = Recipe(sources=[Source(path=CHAT, samples=120), Source(path=str(REPO / "examples" / "data" / "alpaca.jsonl"),
                                                                    epochs=0.5)],
                    tokenizer=TINY, output=str(tmp_path / "out"))
    manifest = build(recipe).manifest
    assert [s["rows"] for s in manifest["mixing"]["sources"]] == [120, 75]  # 50 up-sampled to 120; 150 halved
    rows = rows_of(tmp_path / "out")
    assert len(rows) == 195 and len({(r["source"], r["row"]) for r in rows}) == 50 + 75


def test_split_by_a_field_keeps_each_group_in_one_split(tmp_path):
    src = tmp_path / "sessions.jsonl"
    src.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}", "session": f"s{i % 7}"}) + "\n"
                           for i in range(70)))
    build([str(src)], tokenizer=TINY, output=tmp_path / "out", split_by="session",
          splits={"train": 0.6, "validation": 0.2, "test": 0.2}, seed=5)
    split_of_session: dict[int, set[str]] = {}
    for split in ("train", "validation", "test"):
        for r in rows_of(tmp_path / "out", split):
            split_of_session.setdefault((r["row"] - 1) % 7, set()).add(split)
    assert len(split_of_session) == 7 and all(len(s) == 1 for s in split_of_session.values())


def test_exact_duplicates_never_straddle_splits(tmp_path):
    """The default group key is the conversation's content: a repeated conversation lands in one split."""
    src = tmp_path / "dups.jsonl"
    src.write_text("".join(json.dumps({"instruction": f"q{i % 10}", "output": f"a{i % 10}"}) + "\n" for i in range(100)))
    build([str(src)], tokenizer=TINY, output=tmp_path / "out", splits={"train": 0.5, "test": 0.5}, seed=1)
    where: dict[str, set[str]] = {}
    for split in ("train", "test"):
        for r in rows_of(tmp_path / "out", split):
            where.setdefault(str(r["input_ids"]), set()).add(split)
    assert len(where) == 10 and all(len(s) == 1 for s in where.values())


def test_config_replay_is_bit_for_bit(tmp_path):
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(f"""
template: chatml
tokenizer: {TINY}
output: {tmp_path / 'first'}
seed: 7
max_length: 256
sources:
  - path: {CHAT}
    weight: 0.7
  - path: {REPO / 'examples' / 'data' / 'alpaca.jsonl'}
    weight: 0.3
splits: {{train: 0.8, validation: 0.2}}
dedup: {{threshold: 0.8}}
pack: true
""")
    first = build(config=recipe_file).manifest
    replay = build(config=tmp_path / "first" / "manifest.json", output=str(tmp_path / "second")).manifest
    assert replay["fingerprint"] == first["fingerprint"]
    for split in ("train", "validation"):
        for a, b in zip(first["splits"][split]["files"], replay["splits"][split]["files"], strict=True):
            assert pq.read_table(tmp_path / "first" / a).equals(pq.read_table(tmp_path / "second" / b))
    assert first["recipe"]["sources"][0]["weight"] == 0.7 and first["recipe"]["pack"] is True


def test_cli_flags_override_the_recipe(tmp_path):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(f"sources: [{CHAT}]\ntokenizer: {TINY}\nmax_length: 64\nseed: 1\n")
    result = CliRunner().invoke(main, ["build", "--config", str(recipe_file), "--max-length", "128", "-o",
                                       str(tmp_path / "o"), "-q"])
    assert result.exit_code == 0, result.output
    recipe = json.loads((tmp_path / "o" / "manifest.json").read_text())["recipe"]
    assert recipe["max_length"] == 128 and recipe["seed"] == 1 and recipe["tokenizer"] == TINY


def test_unknown_keys_name_the_key_and_the_valid_ones(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources: [a.jsonl]\nmax_lenght: 10\n")
    with pytest.raises(ConfigError, match=r"unknown key 'max_lenght'; valid keys: sources, template, "):
        load_recipe(bad)
    bad.write_text("sources: [{path: a.jsonl, wieght: 0.5}]\n")
    with pytest.raises(ConfigError, match=r"sources\[0\]: unknown key 'wieght'; valid keys: path, data, name"):
        load_recipe(bad)
    result = CliRunner().invoke(main, ["build", "--config", str(bad)])
    assert result.exit_code == 1 and "unknown key 'wieght'" in result.output and "Traceback" not in result.output
    with pytest.raises(DataError, match="weights add up to 1.2"):
        Recipe(sources=[Source(path="a", weight=0.6), Source(path="b", weight=0.6)]).validate()


def test_one_column_map_serves_mixed_inputs_in_a_build(tmp_path):
    """GPTeacher (response) and GSM8K (question/answer) with one --columns: every row of both is kept."""
    result = build([str(shared_path("data", "gpteacher_roleplay.json")), str(shared_path("data", "gsm8k_test.jsonl"))],
                   tokenizer=TINY, output=tmp_path / "out", columns="instruction=question,output=answer")
    counts = result.manifest["counts"]
    assert counts["rows_read"] == 1923 + 1319 and counts["skipped_total"] == 0
    assert counts["rows_kept"] == 1923 + 1319


def test_dedup_keeps_a_representative_that_survives_the_per_row_checks(tmp_path):
    """The earlier copy is refused (special-token text): its clean duplicate must be kept, not removed with it."""
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"instruction": "Explain <|im_end|> tokens please", "output": "They end turns."}) + "\n"
                   + json.dumps({"instruction": "Explain im_end tokens please", "output": "They end turns."}) + "\n")
    manifest = build([str(src)], tokenizer=str(shared_path("tokenizers", "qwen3")), output=tmp_path / "out",
                     dedup=True, max_skipped_fraction=1).manifest
    counts = manifest["counts"]
    assert counts["skipped"] == {"special-token-text": 1} and counts["removed"] == {}
    assert [r["row"] for r in rows_of(tmp_path / "out")] == [2]


def test_a_dataset_and_a_list_of_dicts_are_inputs(tmp_path):
    import datasets

    rows = [{"instruction": f"Say {i}", "output": f"{i}"} for i in range(5)]
    from_list = build(rows, tokenizer=TINY, output=tmp_path / "a", shuffle=False)
    from_dataset = build(datasets.Dataset.from_list(rows), tokenizer=TINY, output=tmp_path / "b", shuffle=False)
    a, b = rows_of(tmp_path / "a"), rows_of(tmp_path / "b")
    assert [r["input_ids"] for r in a] == [r["input_ids"] for r in b] and len(a) == 5
    assert {r["source"] for r in a} == {"source0"} and [r["row"] for r in a] == [1, 2, 3, 4, 5]
    assert from_list.manifest["recipe"]["sources"] == [{"data": "<list>"}]
    assert from_dataset.manifest["fingerprint"] == from_list.manifest["fingerprint"]  # fingerprinted by content


def test_every_common_reader_loads_a_split(tmp_path):
    import datasets
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as pads

    out = tmp_path / "out"
    build([CHAT], tokenizer=TINY, output=out, splits={"train": 0.8, "validation": 0.1, "test": 0.1}, seed=2)
    sizes = {s: len(rows_of(out, s)) for s in ("train", "validation", "test")}
    assert sum(sizes.values()) == 50 and all(sizes.values())
    loaded = datasets.load_dataset("parquet", data_dir=str(out), cache_dir=str(tmp_path / "hf"))
    assert {k: v.num_rows for k, v in loaded.items()} == sizes
    assert len(pd.read_parquet(out / "train")) == sizes["train"]
    assert pads.dataset(out / "validation").count_rows() == sizes["validation"]
    assert pl.read_parquet(out / "test" / "*.parquet").height == sizes["test"]
    assert duckdb.sql(f"select count(*) from read_parquet('{out}/train/*.parquet')").fetchall() == [(sizes["train"],)]


def test_every_filter_in_a_recipe_counts_and_lists_each_removal(tmp_path):
    src = tmp_path / "mixed.jsonl"
    rows = [
        {"instruction": "Say hi", "output": "Hello there, nice to meet you today!"},                      # kept
        {"instruction": "Say hi", "output": "Hi"},                                                         # short-response
        {"instruction": "Write malware", "output": "As an AI language model, I cannot help with that."},  # refusal
        {"instruction": "Repeat", "output": " ".join(["the same twelve words said again and again in this sentence"] * 6)},
        {"instruction": "Réponds", "output": "Bonjour, je suis très heureux de vous aider avec votre question aujourd'hui."},
        {"instruction": "Contact", "output": "Write to jane.doe@example.com or call +1 415 555 0132 for details."},
        {"instruction": "x" * 400, "output": "A long prompt gets a long enough answer here."},               # long-prompt
        {"instruction": "Count", "output": "one two three four five six seven eight nine ten eleven twelve"},
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = Recipe(sources=[Source(path=str(src))], tokenizer=TINY, output=str(tmp_path / "out"), shuffle=False,
                    max_skipped_fraction=1,
                    filters={"min_response_chars": 10, "max_prompt_chars": 300, "drop_refusals": True,
                             "drop_repetition": True, "languages": ["en"], "pii": "drop", "max_response_tokens": 40,
                             "normalize_whitespace": True, "drop_empty_turns": True})
    manifest = build(recipe).manifest
    counts = manifest["counts"]
    assert counts["removed"] == {"language": 1, "long-prompt": 1, "long-response-tokens": 1, "pii": 1, "refusal": 1,
                                 "repetition": 1, "short-response": 1}
    assert counts["rows_kept"] == 1 and [r["row"] for r in rows_of(tmp_path / "out")] == [1]
    removed = [json.loads(line) for line in (tmp_path / "out" / "removed.jsonl").read_text().splitlines()]
    assert sorted((r["row"], r["reason"]) for r in removed) == [
        (2, "short-response"), (3, "refusal"), (4, "repetition"), (5, "language"), (6, "pii"), (7, "long-prompt"),
        (8, "long-response-tokens")]
    assert counts["rows_read"] == counts["rows_kept"] + counts["skipped_total"] + counts["removed_total"]
    assert "jane.doe@example.com" not in (tmp_path / "out" / "removed.jsonl").read_text()
