"""stats(): length histogram against N, trained-token share per source, rows skipped/removed by reason, truncation
(examples and tokens lost), assistant turns per conversation and packing figures; the terminal and HTML renderings
(headers whole at 80 columns); the `sftdata stats` command on a real `build --pack` output."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from click.testing import CliRunner

from sftdata.pack import pack_split
from sftdata.stats import histogram, render_html, render_terminal, stats

REPO = Path(__file__).resolve().parents[1]


def _unpacked(path: Path, lengths, trained, sources, truncated=None):
    input_ids = [list(range(3, 3 + n)) for n in lengths]
    labels = [[-100] * (n - k) + ids[n - k:] for ids, n, k in zip(input_ids, lengths, trained)]
    truncated = truncated or [False] * len(lengths)
    pq.write_table(pa.table({
        "input_ids": pa.array(input_ids, pa.list_(pa.int32())), "labels": pa.array(labels, pa.list_(pa.int32())),
        "source": sources, "row": pa.array(range(1, len(lengths) + 1), pa.int64()),
        "num_tokens": pa.array(lengths, pa.int32()), "num_trained": pa.array(trained, pa.int32()),
        "truncated": truncated}), path)


def _manifest(directory: Path, splits: dict, max_length=None, packing=None, truncated=0, too_long=0, **extra):
    (directory / "manifest.json").write_text(json.dumps({
        "format": "sftdata/1", "options": {"max_length": max_length, "truncation": "right", "pack": bool(packing)},
        "counts": {"truncated": truncated, "skipped": {"too-long": too_long} if too_long else {}},
        "splits": splits, "packing": packing, **extra}))


def test_histogram_bins_against_n():
    h = histogram(np.array([1, 16, 17, 32, 33, 64, 70]), 64, bins=4)
    assert h["edges"] == [0, 16, 32, 48, 64]
    assert h["counts"] == [2, 2, 1, 1]  # (0,16] (16,32] (32,48] (48,64]
    assert h["above_max_length"] == 1
    free = histogram(np.array([5, 95]), None, bins=10)
    assert free["edges"][0] == 0 and free["edges"][-1] >= 95 and sum(free["counts"]) == 2


def test_stats_unpacked(tmp_path):
    _unpacked(tmp_path / "train-00000.parquet", [10, 20, 30, 64], [5, 0, 10, 20], ["a.jsonl", "b.jsonl", "a.jsonl",
                                                                                     "b.jsonl"],
              truncated=[False, False, False, True])
    _unpacked(tmp_path / "validation-00000.parquet", [8], [4], ["a.jsonl"])
    _manifest(tmp_path, {"train": {"rows": 4, "files": ["train-00000.parquet"]},
                         "validation": {"rows": 1, "files": ["validation-00000.parquet"]}},
              max_length=64, truncated=1, too_long=2)
    r = stats(tmp_path)
    assert r["max_length"] == 64 and not r["packed"]
    train = r["splits"]["train"]
    assert (train["rows"], train["examples"], train["tokens"], train["trained"]) == (4, 4, 124, 35)
    assert train["at_max_length"] == 1 and train["truncated"] == 1
    assert sum(train["histogram"]["counts"]) == 4 and train["histogram"]["above_max_length"] == 0
    assert train["per_source"] == {
        "b.jsonl": {"examples": 2, "tokens": 84, "trained": 20, "trained_share": round(20 / 35, 6),
                    "trained_fraction": round(20 / 84, 6)},
        "a.jsonl": {"examples": 2, "tokens": 40, "trained": 15, "trained_share": round(15 / 35, 6),
                    "trained_fraction": round(15 / 40, 6)},
    }
    assert r["truncation"] == {"policy": "right", "truncated": 1, "truncated_per_split": {"train": 1, "validation": 0},
                               "dropped_too_long": 2, "tokens_lost": None, "trained_tokens_lost": None}
    assert r["conversations"] == {"count": 0, "assistant_turns": {}, "mean_assistant_turns": 0.0}
    json.dumps(r)


def test_stats_packed_matches_unpacked(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 60, size=50).tolist()
    trained = [int(rng.integers(0, n - 1)) for n in lengths]  # first token never trained, so packing keeps all
    sources = [f"s{i % 3}.jsonl" for i in range(50)]
    src = tmp_path / "unpacked"
    src.mkdir()
    _unpacked(src / "train-00000.parquet", lengths, trained, sources)
    flat = tmp_path / "flat"
    flat.mkdir()
    _unpacked(flat / "train-00000.parquet", lengths, trained, sources)
    _manifest(flat, {"train": {"rows": 50, "files": ["train-00000.parquet"]}}, max_length=64)
    packed = tmp_path / "packed"
    packed.mkdir()
    p = pack_split([str(src / "train-00000.parquet")], str(packed), "train", 64, seed=0)
    _manifest(packed, {"train": {"rows": p["rows"], "files": p["files"]}}, max_length=64, packing={"train": p})
    a, b = stats(flat)["splits"]["train"], stats(packed)["splits"]["train"]
    for key in ("examples", "tokens", "trained", "length", "histogram", "per_source"):
        assert a[key] == b[key], key
    assert b["rows"] == p["rows"] and b["fill_ratio"] == p["fill_ratio"]
    assert sum(b["row_fill"]["counts"]) == p["rows"]
    assert stats(packed)["packed"] and stats(packed)["packing"]["train"]["rows"] == p["rows"]


def test_renderings(tmp_path):
    _unpacked(tmp_path / "train-00000.parquet", [10, 20, 64], [5, 3, 20], ["a.jsonl", "<b>&.jsonl", "a.jsonl"])
    _manifest(tmp_path, {"train": {"rows": 3, "files": ["train-00000.parquet"]}}, max_length=64)
    r = stats(tmp_path)
    from rich.console import Console

    console = Console(record=True, width=120, no_color=True)
    render_terminal(r, console)
    text = console.export_text()
    assert "N = 64" in text and "a.jsonl" in text and "truncation" in text
    page = render_html(r)
    assert page.startswith("<!doctype html>") and page.count("<svg") == 2 and "N = 64" in page
    assert "&lt;b&gt;&amp;.jsonl" in page and "<b>&" not in page  # escaped


def test_counts_by_reason_tokens_lost_and_turns_from_the_manifest(tmp_path):
    _unpacked(tmp_path / "train-00000.parquet", [10, 64], [5, 20], ["a.jsonl", "a.jsonl"], truncated=[False, True])
    _manifest(tmp_path, {"train": {"rows": 2, "files": ["train-00000.parquet"]}}, max_length=64, truncated=1,
              too_long=1, tokens={"lost_to_truncation": {"tokens": 36, "trained": 30}},
              conversations={"assistant_turns": {"1": 3, "2": 1, "5": 1}})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["counts"].update({"rows_read": 7, "rows_kept": 2, "skipped": {"too-long": 1, "malformed-json": 2},
                               "removed": {"exact-duplicate": 2}})
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    r = stats(tmp_path)
    assert r["counts"] == {"rows_read": 7, "rows_kept": 2, "skipped": {"too-long": 1, "malformed-json": 2},
                           "removed": {"exact-duplicate": 2}}
    assert (r["truncation"]["tokens_lost"], r["truncation"]["trained_tokens_lost"]) == (36, 30)
    assert r["conversations"] == {"count": 5, "assistant_turns": {"1": 3, "2": 1, "5": 1}, "mean_assistant_turns": 2.0}
    from rich.console import Console

    console = Console(record=True, width=80, no_color=True)
    render_terminal(r, console)
    lines = console.export_text().splitlines()
    assert [line for line in lines if line.startswith("│ ")][:5] == [
        "│ rows read                │     7 │", "│ examples kept            │     2 │",
        "│ skipped: too-long        │     1 │", "│ skipped: malformed-json  │     2 │",
        "│ removed: exact-duplicate │     2 │"]
    assert ("truncation (policy right): 1 examples truncated to N (train 1) · 36 tokens cut off, 30 of them trained "
            "· 1 dropped as too long") in lines
    turns = lines.index("assistant turns per conversation: 5 conversations, mean 2.0")
    assert lines[turns + 1:turns + 4] == ["1 " + "█" * 40 + " 3", "2 " + "█" * 13 + " 1", "5 " + "█" * 13 + " 1"]
    page = render_html(r)
    assert "<td>skipped: malformed-json</td><td>2</td>" in page and "<td>36</td><td>30</td>" in page
    assert "conversations by assistant turns" in page


def test_tables_keep_whole_headers_at_80_columns(tmp_path):
    from rich.console import Console

    _unpacked(tmp_path / "train-00000.parquet", [10, 20], [5, 3], ["/a/very/long/path/to/some/corpus/file-one.jsonl",
                                                                  "/a/very/long/path/to/some/corpus/file-two.jsonl"])
    packing = {"train": {"strategy": "bfd", "examples": 2, "rows": 1, "fill_ratio": 0.46875, "padding_tokens": 34,
                         "truncated_examples": 0, "full_rows": 0, "max_length": 64,
                         "examples_per_row": {"mean": 2.0, "min": 2, "max": 2}}}
    _manifest(tmp_path, {"train": {"rows": 2, "files": ["train-00000.parquet"]}}, max_length=64, packing=packing)
    console = Console(record=True, width=80, no_color=True)
    render_terminal(stats(tmp_path), console)
    text = console.export_text()
    table_lines = [line for line in text.splitlines() if line[:1] in "┏┃┡│└"]
    assert max(len(line) for line in table_lines) <= 80 and "…" not in text
    header = next(line for line in text.splitlines() if "examples" in line and "┃" in line)
    assert [c.strip() for c in header.split("┃")[1:-1]] == ["source", "examples", "tokens", "trained", "% of trained",
                                                           "trained %"]
    for label in ("strategy", "fill ratio", "examples per row, mean (min–max)", "padding tokens", "truncated examples",
                  "full rows"):
        assert re.search(rf"│ {re.escape(label)} +│", text), label


def test_cli_stats_on_packed_build(tmp_path):
    from sftdata.cli import main

    out = tmp_path / "out"
    runner = CliRunner()
    built = runner.invoke(main, ["build", str(REPO / "examples" / "data" / "alpaca.jsonl"),
                                 str(REPO / "examples" / "data" / "chat.jsonl"), "--max-length", "128", "--pack",
                                 "--eval-fraction", "0.3", "--seed", "1", "-o", str(out), "-q"])
    assert built.exit_code == 0, built.output
    html_file = tmp_path / "s.html"
    result = runner.invoke(main, ["stats", str(out), "--html", str(html_file), "--no-color"])
    assert result.exit_code == 0, result.output
    assert "N = 128" in result.output and "packing" in result.output
    assert html_file.read_text().count("<svg") >= 2
    as_json = json.loads(runner.invoke(main, ["stats", str(out), "--json"]).output)
    manifest = json.loads((out / "manifest.json").read_text())
    assert as_json["packed"] and as_json["packing"] == manifest["packing"]
    for split, s in as_json["splits"].items():
        assert s["examples"] == manifest["packing"][split]["examples"]
        assert s["rows"] == manifest["packing"][split]["rows"]
    missing = runner.invoke(main, ["stats", str(tmp_path)])
    assert missing.exit_code == 1 and "no sftdata output" in missing.output
    assert as_json["truncation"]["tokens_lost"] == manifest["tokens"]["lost_to_truncation"]["tokens"] > 0
    assert sum(as_json["conversations"]["assistant_turns"].values()) == 200  # 150 Alpaca rows + 50 conversations


def test_stats_help_mentions_only_what_it_takes():
    from sftdata.cli import main

    text = CliRunner().invoke(main, ["stats", "--help"]).output
    mentioned = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", text))
    taken = {"--html", "--json", "--color", "--no-color", "--help"}
    assert mentioned - taken == {"--max-length"} and "(build --max-length)" in " ".join(text.split())


def test_tokens_lost_to_truncation_match_an_untruncated_build(tmp_path):
    from sftdata.build import build

    chat = str(REPO / "examples" / "data" / "chat.jsonl")
    full = build([chat], output=tmp_path / "full").manifest
    cut = build([chat], output=tmp_path / "cut", max_length=40).manifest
    kept = {r["row"] for r in pq.read_table(tmp_path / "cut" / "train" / "train-00000.parquet", columns=["row"]).to_pylist()}
    rows = [r for r in pq.read_table(tmp_path / "full" / "train" / "train-00000.parquet", columns=["row", "labels"]).to_pylist()
            if r["row"] in kept]  # rows left with no trained token after the cut are skipped, not truncated
    expected_tokens = sum(max(0, len(r["labels"]) - 40) for r in rows)
    expected_trained = sum(sum(1 for x in r["labels"][40:] if x != -100) for r in rows)
    assert cut["tokens"]["lost_to_truncation"] == {"tokens": expected_tokens, "trained": expected_trained}
    assert full["tokens"]["lost_to_truncation"] == {"tokens": 0, "trained": 0}
    assert cut["tokens"]["total"] + expected_tokens == sum(len(r["labels"]) for r in rows)
    report = stats(tmp_path / "cut")
    assert (report["truncation"]["tokens_lost"], report["truncation"]["trained_tokens_lost"]) == (
        expected_tokens, expected_trained)


def test_stats_counts_turns_and_trained_tokens_by_kind(tmp_path):
    import json

    from sftdata.build import build
    from test_show import AGENT_ROW

    src = tmp_path / "agent.jsonl"
    src.write_text(json.dumps(AGENT_ROW) + "\n")
    build([str(src)], template="qwen3", output=tmp_path / "o")
    report = stats(tmp_path / "o")
    assert report["turns"] == {"turns_trained": 2, "turns_trained_tool_call": 1, "turns_trained_reasoning": 2}
    # "Use add.\n" and "Got 5.\n" are reasoning; <tool_call>...</tool_call> the call; "5." the answer; the rest markup
    assert report["splits"]["train"]["trained_by_kind"] == {"markup": 10, "content": 2, "reasoning": 7, "tool_call": 24}
    assert sum(report["splits"]["train"]["trained_by_kind"].values()) == report["splits"]["train"]["trained"]
