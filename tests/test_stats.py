"""stats(): length histogram against N, trained-token share per source, truncation and packing figures; the
terminal, HTML and PNG renderings; the `sftdata stats` command on a real `build --pack` output."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from click.testing import CliRunner

from sftdata.pack import pack_split
from sftdata.stats import histogram, render_html, render_png, render_terminal, stats

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


def _manifest(directory: Path, splits: dict, max_length=None, packing=None, truncated=0, too_long=0):
    (directory / "manifest.json").write_text(json.dumps({
        "format": "sftdata/1", "options": {"max_length": max_length, "truncation": "right", "pack": bool(packing)},
        "counts": {"truncated": truncated, "skipped": {"too-long": too_long} if too_long else {}},
        "splits": splits, "packing": packing}))


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
                               "dropped_too_long": 2}
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
    png = render_png(r)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    idat = png[png.index(b"IDAT") + 4:png.index(b"IEND") - 8]
    raw = zlib.decompress(idat)
    assert len(raw) == height * (1 + 3 * width)
    pixels = np.frombuffer(raw, np.uint8).reshape(height, 1 + 3 * width)[:, 1:].reshape(height, width, 3)
    assert ((pixels == (44, 160, 44)).all(-1)).any()  # green bars
    assert ((pixels == (255, 127, 14)).all(-1)).any()  # the N line


def test_cli_stats_on_packed_build(tmp_path):
    from sftdata.cli import main

    out = tmp_path / "out"
    runner = CliRunner()
    built = runner.invoke(main, ["build", str(REPO / "examples" / "data" / "alpaca.jsonl"),
                                 str(REPO / "examples" / "data" / "chat.jsonl"), "--max-length", "128", "--pack",
                                 "--eval-fraction", "0.3", "--seed", "1", "-o", str(out), "-q"])
    assert built.exit_code == 0, built.output
    html_file, png_file = tmp_path / "s.html", tmp_path / "s.png"
    result = runner.invoke(main, ["stats", str(out), "--html", str(html_file), "--png", str(png_file), "--no-color"])
    assert result.exit_code == 0, result.output
    assert "N = 128" in result.output and "packing" in result.output
    assert html_file.read_text().count("<svg") >= 2 and png_file.read_bytes()[:4] == b"\x89PNG"
    as_json = json.loads(runner.invoke(main, ["stats", str(out), "--json"]).output)
    manifest = json.loads((out / "manifest.json").read_text())
    assert as_json["packed"] and as_json["packing"] == manifest["packing"]
    for split, s in as_json["splits"].items():
        assert s["examples"] == manifest["packing"][split]["examples"]
        assert s["rows"] == manifest["packing"][split]["rows"]
    missing = runner.invoke(main, ["stats", str(tmp_path)])
    assert missing.exit_code == 1 and "no sftdata output" in missing.output
