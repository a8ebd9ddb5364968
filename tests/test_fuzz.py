"""Fuzzing the input side with generated rows, valid and broken in every way we know of plus random bytes, across JSON
Lines, JSON arrays and documents, CSV, Parquet, raw text and gzip. Whatever the input: nothing raises, every row read
is kept or reported with its file, line and reason, and the valid rows come out exactly as from a clean input of only
those rows.

* ``test_reading_*``: hypothesis drives the rows of one file at a time through ``read_records`` (many examples);
* ``test_build_*``: ``sftdata.build`` over a directory of ``SFTDATA_FUZZ_ROWS`` generated rows (default 100,000, most
  of them broken, so the encoder's share stays small), compared token for token with a clean build of the valid rows.

Sizes: ``SFTDATA_FUZZ_ROWS`` (build), ``SFTDATA_FUZZ_EXAMPLES`` (hypothesis examples, default 100),
``SFTDATA_FUZZ_SEED`` (the build's generator).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import random
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sftdata import build
from sftdata.ingest import read_records
from sftdata.record import ProblemLog

from conftest import TINY_TOKENIZER

FUZZ_ROWS = int(os.environ.get("SFTDATA_FUZZ_ROWS", "100000"))
FUZZ_EXAMPLES = int(os.environ.get("SFTDATA_FUZZ_EXAMPLES", "100"))
FUZZ_SEED = int(os.environ.get("SFTDATA_FUZZ_SEED", "20261202"))
ROW_CAP = 8192  # the read fuzz's row cap: valid rows stay far below it in every format, oversized rows far above

ADVERSARIAL = ["", " ", "\n", "\r\n", "\r", "\t", "a,b", 'say "hi"', "\\", "\\n", "\\ud83d", "{}", "[1,", "null",
               "é", "日本語", "😀", "👩‍👩‍👧", "e\u0301", "\u200b", "\u202e", "\ufeff", "\x00", "\x1f", "\u2028", "𝔘𝔫𝔦",
               "<|im_start|>", "<|im_end|>", "#### 42", "line1\nline2", "  padded  ", "\U0010fffd", "'; DROP", "%s{0}"]
HEX_TO_DIGITS = str.maketrans("abcdef", "012345")
WORDS = ["alpha", "beta", "gamma", "x", "42", "3.14", "Natalia", "sold", "clips"]


# -- generated rows ---------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One generated row: ``value`` (valid rows) or the reasons it may be refused (``kinds``; None: any ingest
    reason, for checks whose names belong to the row normalizer). ``data``: its bytes in the file (JSON) or fields."""

    data: Any
    value: dict[str, Any] | None = None
    kinds: frozenset[str] | None = None

    @property
    def valid(self) -> bool:
        return self.value is not None


def some_text(rng: random.Random, palette: list[str], *, nonblank: bool = False) -> str:
    pieces = [rng.choice(palette) if rng.random() < 0.5 else rng.choice(WORDS) for _ in range(rng.randint(0, 3))]
    text = rng.choice(["", " ", "\n"]).join(pieces)
    return text + rng.choice(WORDS) if nonblank and not text.strip() else text


def json_value(rng: random.Random, palette: list[str], depth: int = 0) -> Any:
    pick = rng.random()
    if depth < 4 and pick < 0.2:
        return [json_value(rng, palette, depth + 1) for _ in range(rng.randint(0, 3))]
    if depth < 4 and pick < 0.4:
        return {some_text(rng, palette): json_value(rng, palette, depth + 1) for _ in range(rng.randint(0, 3))}
    return rng.choice([None, True, False, rng.randint(-10**6, 10**6), 10**25 + rng.randrange(10**6), -2**63 - 1,
                       2**64, rng.random() * 1e6, -0.0, 1e300, float("inf"), some_text(rng, palette)])


def valid_row(rng: random.Random, palette: list[str], *, flat: bool = False) -> dict[str, Any]:
    """A row every reader must keep, in one format; ``flat``: Alpaca of strings only (CSV, Parquet)."""
    fmt = "alpaca" if flat else rng.choice(["alpaca", "messages", "sharegpt", "prompt-completion", "text"])
    text = lambda: some_text(rng, palette)  # noqa: E731
    reply = lambda: some_text(rng, palette, nonblank=True)  # noqa: E731
    if fmt == "alpaca":
        row: dict[str, Any] = {"instruction": text(), "input": text() if rng.random() < 0.5 else "", "output": reply()}
    elif fmt == "messages":
        turns = [{"role": "system", "content": text()}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            turns += [{"role": "user", "content": text()}, {"role": "assistant", "content": reply()}]
        row = {"messages": turns}
    elif fmt == "sharegpt":
        row = {"conversations": [{"from": "human", "value": text()}, {"from": "gpt", "value": reply()}]}
    elif fmt == "prompt-completion":
        row = {"prompt": text(), "completion": reply()}
    else:
        row = {"text": reply()}
    if not flat and rng.random() < 0.3:
        row["meta"] = json_value(rng, palette)
    return row


def dump(rng: random.Random, value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=rng.random() < 0.5).encode()


def marked(rng: random.Random, palette: list[str], mark: bytes, replacement: bytes, in_used_field: bool) -> bytes:
    row = valid_row(rng, palette, flat=True)
    row["instruction" if in_used_field else "note"] = f"a{mark.decode()}b"
    return dump(rng, row).replace(mark, replacement)


def bad_json_row(rng: random.Random, palette: list[str], *, in_array: bool) -> Row:
    """A JSON row that must be refused, with the reasons it may be refused for."""
    kinds = ["surrogate", "bigint", "deep", "wrong-type", "unknown-format", "non-object", "conversation", "missing",
             "bad-utf8"] + ([] if in_array else ["truncated", "garbage"])
    kind = rng.choice(kinds)
    used = rng.random() < 0.5
    if kind == "surrogate":
        escape = rng.choice([b"\\ud83d", b"\\udc00", b"\\ude00\\ud83d", b"\\uDBFF x"])
        return Row(marked(rng, palette, b"QQSURQQ", escape, used), kinds=frozenset({"lone-surrogate"}))
    if kind == "bigint":
        digits = rng.randbytes(2300).hex().translate(HEX_TO_DIGITS)[:rng.randint(4300, 4500)]
        return Row(b'{"instruction": "q", "output": "a", "n": 9' + digits.encode() + b"}", kinds=frozenset({"bad-number"}))
    if kind == "deep":
        depth = rng.choice([129, 300, 999, 1000, 1024, 1025, 1500])
        nest = "[" * depth + "]" * depth if rng.random() < 0.5 else '{"a":' * depth + "1" + "}" * depth
        data = ('{"instruction": "q", "output": "a", "x": ' + nest + "}").encode()
        return Row(data, kinds=frozenset({"too-deep"} | ({"row-too-large"} if len(data) > ROW_CAP else set())))
    if kind == "wrong-type":
        value = rng.choice([{"instruction": 5, "output": "a"}, {"messages": "x"}, {"prompt": "p", "completion": 7},
                            {"messages": [{"role": "user", "content": {"a": 1}}, {"role": "assistant", "content": "b"}]}])
        return Row(dump(rng, value))
    if kind == "unknown-format":
        return Row(dump(rng, rng.choice([{}, {"foo": 1}, {"question": "q", "answer": "a"}])),
                   kinds=frozenset({"unknown-format"}))
    if kind == "non-object":
        return Row(rng.choice([b"5", b'"text"', b"[1, 2]", b"null", b"true", b"-0.5"]), kinds=frozenset({"wrong-type"}))
    if kind == "conversation":
        value = rng.choice([
            {"messages": [{"role": "user", "content": "u"}]},
            {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": " \n"}]},
            {"messages": [{"role": "user", "content": "u"}, {"role": "user", "content": "u"},
                          {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "wizard", "content": "u"}, {"role": "assistant", "content": "a"}]},
            {"conversations": [{"from": "human", "value": "h"}]},
        ])
        return Row(dump(rng, value))
    if kind == "missing":
        return Row(dump(rng, rng.choice([{"instruction": "no output"}, {"prompt": "no completion"}])))
    if kind == "bad-utf8":
        return Row(marked(rng, palette, b"QQBADQQ", rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88"]), used),
                   kinds=frozenset({"bad-utf8"}))
    if kind == "truncated":
        whole = dump(rng, valid_row(rng, palette))
        return Row(whole[:rng.randint(1, len(whole) - 1)], kinds=frozenset({"malformed-json", "bad-utf8"}))
    garbage = rng.randbytes(rng.randint(0, 80)).replace(b"\n", b"")
    return Row(rng.choice([b"\xff", b"\x00", b"#", b"]", b"{{"]) + garbage, kinds=frozenset({"malformed-json", "bad-utf8"}))


def oversized_row(rng: random.Random) -> Row:
    return Row(json.dumps({"instruction": "q", "output": "a", "blob": "x" * rng.randint(2 * ROW_CAP, 3 * ROW_CAP)}).encode(),
               kinds=frozenset({"row-too-large"}))


def json_rows(rng: random.Random, palette: list[str], n: int, valid_share: float, *, in_array: bool,
              oversized: bool = False) -> list[Row]:
    rows = []
    for i in range(n):
        if i == 0 or rng.random() < valid_share:  # a valid first row: the file's format is always known
            value = valid_row(rng, palette)
            rows.append(Row(dump(rng, value), value=value))
        elif oversized and rng.random() < 0.05:
            rows.append(oversized_row(rng))
        else:
            rows.append(bad_json_row(rng, palette, in_array=in_array))
    return rows


CSV_HEADER = ["instruction", "input", "output"]


def csv_rows(rng: random.Random, palette: list[str], n: int, valid_share: float) -> list[Row]:
    rows = []
    for i in range(n):
        if i == 0 or rng.random() < valid_share:
            value = valid_row(rng, palette, flat=True)
            rows.append(Row([value[k] for k in CSV_HEADER], value=value))
            continue
        kind = rng.choice(["more", "fewer", "bad-byte", "empty-output"])
        fields = [some_text(rng, palette) for _ in CSV_HEADER]
        if kind == "more":
            rows.append(Row(fields + ["extra"], kinds=frozenset({"csv-field-count"})))
        elif kind == "fewer":
            rows.append(Row(fields[:rng.randint(1, 2)], kinds=frozenset({"csv-field-count"})))
        elif kind == "bad-byte":
            rows.append(Row(fields[:2] + [f"ok QQBADQQ{fields[2]}"], kinds=frozenset({"bad-utf8"})))
        else:
            rows.append(Row(fields[:2] + [" "]))
    return rows


_LINE_END = re.compile(r"\r\n|\r|\n")


def csv_bytes(rows: list[Row]) -> tuple[bytes, list[int]]:
    """The file and the line each row starts at (counting line ends as csv reads them: CRLF, LF or a lone CR)."""
    out, starts, line = [], [], 1
    for fields in [CSV_HEADER] + [row.data for row in rows]:
        buffer = io.StringIO()
        csv.writer(buffer).writerow(fields)
        text = buffer.getvalue()
        starts.append(line)
        line += len(_LINE_END.findall(text))
        out.append(text.encode().replace(b"QQBADQQ", b"\xff"))  # a byte that is not UTF-8, inside a quoted field too
    return b"".join(out), starts[1:]


def parquet_rows(rng: random.Random, palette: list[str], n: int, valid_share: float) -> list[Row]:
    rows = []
    for i in range(n):
        value = dict(valid_row(rng, palette, flat=True), id=rng.randint(-2**63, 2**63 - 1))
        if i == 0 or rng.random() < valid_share:
            rows.append(Row(value, value=value))
        elif rng.random() < 0.5:
            rows.append(Row(dict(value, instruction=None)))  # a missing field
        else:
            rows.append(Row(dict(value, output=" ")))  # an empty reply
    return rows


def write_jsonl(path: Path, rows: list[Row]) -> None:
    data = b"".join(row.data + b"\n" for row in rows)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def write_json_array(path: Path, rows: list[Row], *, keyed: bool = False) -> None:
    body = b"[\n" + b",\n".join(row.data for row in rows) + b"\n]"
    data = b'{"data": ' + body + b', "version": "1.0"}' if keyed else body
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


# -- the read fuzz (hypothesis) -------------------------------------------------------------------------------------


def read(path: Path) -> tuple[list[Any], ProblemLog, int]:
    problems, stats = ProblemLog(keep_per_kind=1 << 30), []
    records = [r for batch in read_records([str(path)], problems=problems, stats=stats, max_row_bytes=ROW_CAP)
               for r in batch]
    return records, problems, sum(s.rows for s in stats)


def as_read(records: list[Any]) -> list[tuple[Any, ...]]:
    return [(r.messages, r.text, r.extra) for r in records]


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, report_multiple_bugs=False,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(rng=st.randoms(use_true_random=False), palette=st.lists(st.text(max_size=12), min_size=1, max_size=8),
       container=st.sampled_from(["jsonl", "jsonl.gz", "json", "csv", "csv.gz", "parquet"]),
       n=st.integers(1, 80), valid_share=st.sampled_from([0.1, 0.5, 0.9]))
def test_reading_any_rows_keeps_the_valid_ones_and_reports_every_other_one(tmp_path_factory, rng, palette, container,
                                                                           n, valid_share):
    palette = palette + ADVERSARIAL
    directory = tmp_path_factory.mktemp("read")
    path = directory / f"rows.{container}"
    if container.startswith("jsonl"):
        rows = json_rows(rng, palette, n, valid_share, in_array=False, oversized=True)
        write_jsonl(path, rows)
        starts = list(range(1, n + 1))
    elif container == "json":
        rows = json_rows(rng, palette, n, valid_share, in_array=True, oversized=True)
        write_json_array(path, rows)
        starts = list(range(1, n + 1))
    elif container.startswith("csv"):
        rows = csv_rows(rng, palette, n, valid_share)
        data, starts = csv_bytes(rows)
        path.write_bytes(gzip.compress(data) if container.endswith(".gz") else data)
    else:
        rows = parquet_rows(rng, palette, n, valid_share)
        pq.write_table(pa.Table.from_pylist([row.data for row in rows]), path, row_group_size=rng.randint(1, 50))
        starts = list(range(1, n + 1))

    records, problems, rows_read = read(path)
    assert rows_read == len(rows) == len(records) + problems.total
    assert [r.row for r in records] == [start for start, row in zip(starts, rows) if row.valid]
    reported = sorted((p.row, p.kind) for kind in problems.examples.values() for p in kind)
    assert problems.total == len(reported)
    expected = [(start, row.kinds) for start, row in zip(starts, rows) if not row.valid]
    assert [start for start, _ in reported] == [start for start, _ in expected]
    for (start, kind), (_, kinds) in zip(reported, expected):
        assert kinds is None or kind in kinds, f"row {start}: {kind} not in {kinds}"

    clean = directory / "clean.jsonl"
    clean.write_text("".join(json.dumps(row.value) + "\n" for row in rows if row.valid))
    clean_records, clean_problems, _ = read(clean)
    assert clean_problems.total == 0
    assert as_read(records) == as_read(clean_records)


def test_reading_random_bytes_never_raises(tmp_path):
    """Pure garbage under every name: each file is read to its end or stops at one reported row."""
    rng = random.Random(FUZZ_SEED)
    for i in range(200):
        data = rng.randbytes(rng.randint(1, 3000))
        name = f"g{i}." + rng.choice(["jsonl", "json", "csv", "txt", "parquet", "jsonl.gz", "csv.gz"])
        path = tmp_path / name
        path.write_bytes(gzip.compress(data)[:rng.randint(10, 60)] + data if name.endswith(".gz") and i % 2 else data)
        problems, stats = ProblemLog(), []
        try:
            records = [r for b in read_records([str(path)], problems=problems, stats=stats) for r in b]
        except Exception as e:  # noqa: BLE001 - the one allowed stop: a file of objects of no known format
            assert type(e).__name__ == "DataError" and "cannot tell the format" in str(e), f"{name}: {e!r}"
            continue
        assert stats[0].rows == len(records) + problems.total
        assert all(p.source == str(path) and p.detail for kind in problems.examples.values() for p in kind)


# -- the build fuzz -----------------------------------------------------------------------------------------------------


@dataclass
class FuzzFile:
    name: str
    rows: list[Row]
    starts: list[int]
    breaks: bool = False  # damaged: reading stops at a reported row, the rows after it are lost


def corrupt_gzip(first: bytes, rest: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    return compressor.compress(first) + compressor.flush(zlib.Z_FULL_FLUSH) + b"\xff" * 32 + rest


def make_fuzz_inputs(directory: Path, total: int, seed: int) -> list[FuzzFile]:
    rng = random.Random(seed)
    palette = ADVERSARIAL + ["".join(chr(rng.choice([rng.randrange(32, 0xD800), rng.randrange(0xE000, 0x110000)]))
                                     for _ in range(rng.randint(1, 6))) for _ in range(40)]
    share = 0.04  # mostly broken rows: they cost reading only, the valid ones cost encoding twice
    size = lambda fraction: max(2, int(total * fraction))  # noqa: E731
    files = []

    rows = json_rows(rng, palette, size(0.35), share, in_array=False)
    write_jsonl(directory / "a.jsonl", rows)
    files.append(FuzzFile("a.jsonl", rows, list(range(1, len(rows) + 1))))

    rows = json_rows(rng, palette, size(0.15), share, in_array=False)
    cut = len(rows) * 3 // 4
    (directory / "b.jsonl.gz").write_bytes(corrupt_gzip(b"".join(r.data + b"\n" for r in rows[:cut]),
                                                       gzip.compress(b"".join(r.data + b"\n" for r in rows[cut:]))))
    files.append(FuzzFile("b.jsonl.gz", rows, list(range(1, len(rows) + 1)), breaks=True))

    rows = json_rows(rng, palette, size(0.15), share, in_array=True)
    write_json_array(directory / "c.json", rows)
    files.append(FuzzFile("c.json", rows, list(range(1, len(rows) + 1))))

    rows = json_rows(rng, palette, size(0.1), share, in_array=True)
    rows.insert(len(rows) * 2 // 3, Row(b'{"instruction": "q" "output": "a"}', kinds=frozenset({"malformed-json"})))
    write_json_array(directory / "d.json.gz", rows, keyed=True)
    files.append(FuzzFile("d.json.gz", rows, list(range(1, len(rows) + 1)), breaks=True))

    for name, fraction in (("e.csv", 0.1), ("f.csv.gz", 0.05)):
        rows = csv_rows(rng, palette, size(fraction), share)
        data, starts = csv_bytes(rows)
        (directory / name).write_bytes(data if name == "e.csv" else gzip.compress(data)[:-200])
        files.append(FuzzFile(name, rows, starts, breaks=name.endswith(".gz")))

    rows = parquet_rows(rng, palette, size(0.1), share)
    pq.write_table(pa.Table.from_pylist([row.data for row in rows]), directory / "g.parquet", row_group_size=5000)
    files.append(FuzzFile("g.parquet", rows, list(range(1, len(rows) + 1))))
    (directory / "h.parquet").write_bytes(b"PAR1" + rng.randbytes(3000) + b"PAR1")
    files.append(FuzzFile("h.parquet", [], [], breaks=True))
    return files


def split_rows(directory: Path) -> list[dict[str, Any]]:
    table = pq.read_table(sorted(directory.glob("train/train-*.parquet")))
    return table.to_pylist()


TOKEN_COLUMNS = ("input_ids", "labels", "num_tokens", "num_trained", "truncated")


def test_build_of_fuzzed_inputs_reports_every_bad_row_and_matches_a_clean_build(tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    files = make_fuzz_inputs(inputs, FUZZ_ROWS, FUZZ_SEED)
    text = "".join(some_text(random.Random(FUZZ_SEED), ADVERSARIAL, nonblank=True) + "\n" for _ in range(50))
    (inputs / "z.txt").write_text(text)
    options = {"template": "chatml", "tokenizer": str(TINY_TOKENIZER)}
    fuzzed = build([str(inputs)], output=tmp_path / "fuzzed", max_skipped_fraction=1, shuffle=False, **options)

    counts = fuzzed.manifest["counts"]
    assert counts["rows_read"] == counts["rows_kept"] + counts["skipped_total"] + sum(counts["removed"].values())
    assert counts["rows_read"] >= FUZZ_ROWS * 0.8  # the damaged files lose their tails, nothing else is unread
    problems = [json.loads(line) for line in (tmp_path / "fuzzed" / "problems.jsonl").read_text().splitlines()]
    assert len(problems) == counts["skipped_total"]
    assert all(p["source"] and isinstance(p["row"], int) and p["kind"] and p["detail"] for p in problems)

    # Where each damaged file stopped, from its one "rest not read" problem.
    stops: dict[str, int] = {}
    for p in problems:
        name = os.path.basename(p["source"])
        if p["kind"] in ("corrupt-gzip", "truncated-gzip", "unreadable-file") or "the rest of the file" in p["detail"]:
            assert name not in stops, f"{name} stopped twice"
            stops[name] = p["row"]
    assert sorted(stops) == sorted(f.name for f in files if f.breaks)
    assert stops["d.json.gz"] == next(i for i, r in enumerate(files[3].rows, 1) if r.data.startswith(b'{"instruction": "q" "'))

    # The valid rows read before any stop, as one clean input.
    expected_problems: Counter[tuple[str, int]] = Counter((name, row) for name, row in stops.items())
    clean_rows, origin = [], []
    for f in files:
        stop = stops.get(f.name, 1 << 62)
        for start, row in zip(f.starts, f.rows):
            if start >= stop:
                break
            if row.valid:
                clean_rows.append(row.value)
                origin.append((f.name, start))
            else:
                expected_problems[(f.name, start)] += 1
    clean_inputs = tmp_path / "clean"
    clean_inputs.mkdir()
    (clean_inputs / "a.jsonl").write_text("".join(json.dumps(v, ensure_ascii=False) + "\n" for v in clean_rows))
    (clean_inputs / "z.txt").write_text(text)
    clean = build([str(clean_inputs)], output=tmp_path / "clean-out", shuffle=False, **options)

    # Rows the encoder refuses are refused in both builds: map the clean build's to the fuzzed files.
    clean_problems = [json.loads(line) for line in (tmp_path / "clean-out" / "problems.jsonl").read_text().splitlines()]
    assert all(p["source"].endswith("a.jsonl") for p in clean_problems)
    refused = {p["row"] for p in clean_problems}
    expected_problems.update(origin[row - 1] for row in refused)
    assert Counter((os.path.basename(p["source"]), p["row"]) for p in problems) == expected_problems

    fuzzed_rows, clean_out = split_rows(tmp_path / "fuzzed"), split_rows(tmp_path / "clean-out")
    kept_origin = [o for i, o in enumerate(origin, 1) if i not in refused] + [("z.txt", 1)]
    assert [(os.path.basename(r["source"]), r["row"]) for r in fuzzed_rows] == kept_origin
    assert [tuple(r[c] for c in TOKEN_COLUMNS) for r in fuzzed_rows] == [tuple(r[c] for c in TOKEN_COLUMNS) for r in clean_out]
    assert clean.manifest["tokens"]["total"] == fuzzed.manifest["tokens"]["total"]
    assert clean.manifest["tokens"]["trained"] == fuzzed.manifest["tokens"]["trained"]
