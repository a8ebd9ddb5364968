"""Readers under bad input: every bad row is a problem with its file, line and reason and reading goes on; huge
inputs stream; formats are detected over a sample and per row; inputs are resolved and checked before anything loads."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import zlib
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sftdata.ingest import InputSource, read_records, resolve_inputs
from sftdata.ingest import readers
from sftdata.ingest.readers import MAX_NESTING, parse_json_row
from sftdata.record import DataError, ProblemLog

from conftest import TINY_TOKENIZER


def alpaca(i, **extra):
    return {"instruction": f"q{i}", "output": f"a{i}", **extra}


def read_all(paths, **kwargs):
    problems = kwargs.pop("problems", None) or ProblemLog()
    stats = []
    records = [r for batch in read_records(paths, problems=problems, stats=stats, **kwargs) for r in batch]
    return records, problems, stats


def found(problems):
    return sorted((os.path.basename(p.source), p.row, p.kind, p.detail) for ps in problems.examples.values() for p in ps)


def write_lines(path, lines):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


SURROGATE = "{where} holds a lone UTF-16 surrogate \\ud83d (half of an escaped pair, e.g. a cut emoji), which cannot be encoded as UTF-8"


# -- one bad row never stops reading ----------------------------------------------------------------------------------


@pytest.mark.parametrize("container", ["jsonl", "json"])
def test_json_rows_that_break_later_stages_are_problems(tmp_path, container):
    rows = [
        json.dumps(alpaca(1)),
        '{"instruction": "x \\ud83d", "output": "y"}',                       # 2 lone surrogate (used field)
        '{"instruction": "ok", "output": "\\ud83d\\ude00 pair"}',            # 3 a valid pair: kept
        '{"instruction": "n", "output": "y", "id": ' + "9" * 5000 + "}",     # 4 integer over 4,300 digits (unused field)
        '{"instruction": "d", "output": "y", "x": ' + "[" * 1000 + "]" * 1000 + "}",  # 5 nesting the parser refuses
        '{"instruction": "d", "output": "y", "x": ' + "[" * 200 + "]" * 200 + "}",    # 6 deeper than MAX_NESTING
        '{"instruction": "d", "output": "y", "x": ' + "[" * 100 + "]" * 100 + "}",    # 7 deep but allowed: kept
        '{"instruction": "big", "output": "y", "id": 123456789012345678901234567890}',  # 8 beyond 64 bits: kept exactly
        '{"instruction": "k", "output": "y", "meta": {"\\udc00": 1}}',       # 9 lone surrogate in a key
        json.dumps(alpaca(10)),
    ]
    path = tmp_path / f"rows.{container}"
    path.write_text("\n".join(rows) + "\n" if container == "jsonl" else "[\n" + ",\n".join(rows) + "\n]")
    records, problems, stats = read_all([str(path)])
    assert [r.row for r in records] == [1, 3, 7, 8, 10]
    assert records[1].messages[1].content == "\U0001F600 pair"
    assert records[3].extra["id"] == 123456789012345678901234567890
    name = path.name
    lone_key = ("{where} holds a lone UTF-16 surrogate \\udc00 (half of an escaped pair, e.g. a cut emoji), which "
                "cannot be encoded as UTF-8").format(where="the key 'meta.\\udc00'")
    assert found(problems) == sorted([
        (name, 2, "lone-surrogate", SURROGATE.format(where="instruction")),
        (name, 4, "bad-number", "Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits"),
        (name, 5, "too-deep", f"nested deeper than {MAX_NESTING} levels" + (" (at x" + "[0]" * 9 + "..." + "[0]" * 9 + ")"
                                                                            if container == "jsonl" else "")),
        (name, 6, "too-deep", f"nested deeper than {MAX_NESTING} levels (at x" + "[0]" * 9 + "..." + "[0]" * 9 + ")"),
        (name, 9, "lone-surrogate", lone_key),
    ])
    assert stats[0].rows == 10


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
                    max_leaves=12))
def test_parsed_rows_are_exactly_what_json_loads_gives(value):
    """JSON Lines go through orjson where it agrees with json.loads; floats, huge integers and escapes included."""
    line = json.dumps(value).encode()
    assert parse_json_row(line) == json.loads(line)
    assert repr(parse_json_row(line)) == repr(json.loads(line))  # -0.0, 1e16 vs int: same types, not only equal


def test_corrupt_and_truncated_gzip_report_where_they_broke_and_the_next_file_is_read(tmp_path):
    lines = b"".join(json.dumps(alpaca(i)).encode() + b"\n" for i in range(1, 2001))
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
    corrupt = tmp_path / "a.jsonl.gz"  # a sound first half, then a deflate block of an invalid type
    corrupt.write_bytes(compressor.compress(lines) + compressor.flush(zlib.Z_FULL_FLUSH) + b"\xff" * 64 + b"lost" * 1000)
    truncated = tmp_path / "b.jsonl.gz"
    truncated.write_bytes(gzip.compress(lines)[:-2000])
    after = write_lines(tmp_path / "c.jsonl", [json.dumps(alpaca(1))])
    records, problems, stats = read_all([str(corrupt), str(truncated), str(after)])

    by_file = {name: [r.row for r in records if r.source.endswith(name)] for name in ("a.jsonl.gz", "b.jsonl.gz", "c.jsonl")}
    assert by_file["c.jsonl"] == [1]
    (broken,) = problems.examples["corrupt-gzip"]
    read_before = by_file["a.jsonl.gz"]
    assert read_before == list(range(1, len(read_before) + 1)) and 1000 < len(read_before) < 2000
    size = corrupt.stat().st_size
    assert broken.row == len(read_before) + 1
    assert broken.detail.startswith(f"the gzip stream is corrupt after row {len(read_before)} (Error -3 while "
                                    "decompressing data: invalid block type); the rest of the file (from about "
                                    "compressed byte ")
    assert re.search(rf"compressed byte [0-9,]+ of {size:,}, [0-9]+% of the file\) was not read$", broken.detail)
    (ended,) = problems.examples["truncated-gzip"]
    read_before = by_file["b.jsonl.gz"]
    assert ended.row == len(read_before) + 1 and read_before == list(range(1, len(read_before) + 1))
    assert ended.detail.startswith(f"the gzip stream ends early after row {len(read_before)} (Compressed file ended "
                                   "before the end-of-stream marker was reached); the rest of the file")
    # rows_read accounts for the row where each file broke
    assert [s.rows for s in stats] == [len(by_file["a.jsonl.gz"]) + 1, len(by_file["b.jsonl.gz"]) + 1, 1]


def test_csv_bad_records_are_skipped_and_reported_at_their_file_line(tmp_path):
    long_field = "y" * 200_000  # over csv's own 131,072 field limit, under the row cap: a valid row
    path = tmp_path / "rows.csv"
    path.write_bytes(
        b"\xef\xbb\xbfinstruction,output,notes\n"
        b"q1,a1,\n"                                   # 2
        b"q2,a2,n,extra\n"                            # 3 more fields than the header
        b'"multi\nline, with ""quotes""",a4,\n'       # 4-5 one record over two lines
        b"q6,a6\n"                                    # 6 fewer fields
        b"q7 \xff,a7,\n"                              # 7 a byte that is not UTF-8
        b"\n"                                         # 8 blank: ignored
        b'5" screen,a9,\n'                            # 9 a bare quote inside an unquoted field: csv keeps it
        b"q10,a10," + long_field.encode() + b"\n"     # 10
        b'q11,"a11\n\nstill a11",\n'                  # 11-13
        b'q14,"never closed\nq15,a15,\n'              # 14 a quote that never closes (swallows the rest)
    )
    records, problems, stats = read_all([str(path)])
    assert [(r.row, r.messages[0].content, r.messages[1].content) for r in records] == [
        (2, "q1", "a1"), (4, 'multi\nline, with "quotes"', "a4"), (9, '5" screen', "a9"), (10, "q10", "a10"),
        (11, "q11", "a11\n\nstill a11")]
    assert records[3].extra["notes"] == long_field
    assert found(problems) == [
        ("rows.csv", 3, "csv-field-count", "the row has 4 fields, the header 3"),
        ("rows.csv", 6, "csv-field-count", "the row has 2 fields, the header 3"),
        ("rows.csv", 7, "bad-utf8", "invalid UTF-8 in the record"),
        ("rows.csv", 14, "malformed-csv", "a quoted field opened in the record at line 14 never closes (the file ends at line 15)"),
    ]
    assert stats[0].rows == 9


def test_csv_oversized_record_is_skipped_without_losing_the_framing(tmp_path):
    body = "x" * 5000
    rows = [["instruction", "output"], ["q1", "a1"], ["q2", f"{body}\n\"quoted\", still\n{body}"], ["q3", "a3"],
            ["q4", body * 2], ["q5", "a5"]]
    records_text = []
    for row in rows:
        buffer = io.StringIO()
        csv.writer(buffer).writerow(row)
        records_text.append(buffer.getvalue())
    path = tmp_path / "big.csv.gz"
    path.write_bytes(gzip.compress("".join(records_text).encode()))
    records, problems, _ = read_all([str(path)], max_row_bytes=4000)
    assert [(r.row, r.messages[0].content) for r in records] == [(2, "q1"), (6, "q3"), (8, "q5")]
    assert found(problems) == [
        ("big.csv.gz", 3, "row-too-large", f"row is {len(records_text[2]):,} bytes, over the 4,000-byte row cap"),
        ("big.csv.gz", 7, "row-too-large", f"row is {len(records_text[4]):,} bytes, over the 4,000-byte row cap"),
    ]


def test_csv_with_lone_carriage_returns_and_a_broken_header(tmp_path):
    cr = tmp_path / "mac.csv"
    cr.write_bytes(b'instruction,output\rq1,a1\r"q2\rsame field",a2\r')
    records, problems, _ = read_all([str(cr)])
    assert [(r.row, r.messages[0].content) for r in records] == [(2, "q1"), (3, "q2\rsame field")]
    header = tmp_path / "header.csv"
    header.write_bytes(b"instr\xffuction,output\nq1,a1\n")
    records, problems, stats = read_all([str(header)])
    assert records == [] and stats[0].rows == 1 and found(problems) == [
        ("header.csv", 1, "bad-csv-header", "invalid UTF-8 in the record; the file cannot be read without a header")]


def test_parquet_bad_row_groups_and_oversized_rows(tmp_path):
    rows = [alpaca(i, output="x" * (10 * i)) for i in range(1, 301)]
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=100)
    records, problems, _ = read_all([str(path)], max_row_bytes=2000)
    kept = [r.row for r in records]
    assert kept[0] == 1 and kept[-1] < 300 and kept == list(range(1, len(kept) + 1))
    assert [p.row for p in problems.examples["row-too-large"]] == list(range(len(kept) + 1, 300 + 1))[:20]
    assert problems.counts["row-too-large"] == 300 - len(kept)

    data = bytearray(path.read_bytes())
    middle = pq.ParquetFile(path).metadata.row_group(1).column(1)
    start = middle.data_page_offset
    data[start:start + 200] = b"\x55" * 200  # the second row group's 'output' pages
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(bytes(data))
    records, problems, stats = read_all([str(broken)])
    assert [r.row for r in records] == list(range(1, 101)) + list(range(201, 301))
    (problem,) = problems.examples["corrupt-parquet"]
    assert problem.row == 101 and problem.detail.startswith("row group 1 could not be read (")
    assert problem.detail.endswith("); its rows 101-200 were not read")
    assert stats[0].rows == 201


# -- the first row does not decide everything -------------------------------------------------------------------------


def test_format_is_detected_over_a_sample_and_each_row_that_does_not_fit_is_redetected(tmp_path):
    messages = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
    path = write_lines(tmp_path / "mixed.jsonl", [
        "{}", json.dumps({"foo": 1, "bar": 2}), json.dumps(alpaca(3)), json.dumps(messages), json.dumps({"text": "raw"}),
        "5", json.dumps({"instruction": "no output"}), json.dumps(alpaca(8)),
        json.dumps({"conversations": [{"from": "human", "value": "h"}, {"from": "gpt", "value": "g"}]})])
    records, problems, stats = read_all([str(path)])
    assert [(r.row, r.text or [m.content for m in r.messages]) for r in records] == [
        (3, ["q3", "a3"]), (4, ["u", "a"]), (5, "raw"), (8, ["q8", "a8"]), (9, ["h", "g"])]
    assert found(problems) == [
        ("mixed.jsonl", 1, "unknown-format", "the fields [] match no known format"),
        ("mixed.jsonl", 2, "unknown-format", "the fields ['bar', 'foo'] match no known format"),
        ("mixed.jsonl", 6, "wrong-type", "row must be an object, got int"),
        ("mixed.jsonl", 7, "missing-field", "missing field 'output'"),
    ]
    assert stats[0].format == "alpaca"
    assert dict(stats[0].formats) == {"alpaca": 2, "messages": 1, "text": 1, "sharegpt": 1}
    first_batch_stats = []  # the format is known once the first batch is out (build reads one batch to learn it)
    next(read_records([str(path)], batch_size=1, stats=first_batch_stats))
    assert first_batch_stats[0].format == "alpaca"


def test_rows_detected_only_to_be_refused_never_stop_the_run(tmp_path):
    pair = {"prompt": "p", "chosen": "c", "rejected": "r"}
    path = write_lines(tmp_path / "dpo.jsonl", [json.dumps({"chosen": "c", "rejected": "r"})] * 3 + [
        json.dumps({"chosen": "only"}), json.dumps(alpaca(5)), json.dumps(pair)])
    records, problems, stats = read_all([str(path)])
    assert [r.row for r in records] == [5] and stats[0].format == "preference"
    assert [(row, kind) for _, row, kind, _ in found(problems)] == [
        (1, "preference-pair"), (2, "preference-pair"), (3, "preference-pair"), (4, "unknown-format"),
        (6, "preference-pair")]


def test_a_file_of_no_known_format_stops_with_its_fields_and_a_forced_format_is_not_redetected(tmp_path):
    path = write_lines(tmp_path / "qa.jsonl", ["{}"] + [json.dumps({"question": f"q{i}", "answer": "a"}) for i in range(3)])
    with pytest.raises(DataError, match=r"qa.jsonl: cannot tell the format from the fields \['answer', 'question'\] "
                                        r"\(first 100 rows\); pass --format, or --columns"):
        read_all([str(path)])
    records, problems, _ = read_all([str(path)], columns="instruction=question,output=answer")
    assert [r.row for r in records] == [2, 3, 4] and found(problems)[0][2] == "unknown-format"
    mixed = write_lines(tmp_path / "m.jsonl", [json.dumps(alpaca(1)), json.dumps({"text": "t"})])
    records, problems, _ = read_all([str(mixed)], format="alpaca")
    assert [r.row for r in records] == [1] and found(problems) == [("m.jsonl", 2, "missing-field", "missing field 'instruction'")]


# -- memory: streaming, caps, parts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["array", "array-ascii", "keyed", "keyed-last"])
def test_json_documents_are_streamed_row_by_row_across_read_windows(tmp_path, monkeypatch, layout):
    monkeypatch.setattr(readers, "_CHUNK", 97)  # a tiny read window: rows, strings, escapes and numbers straddle it
    rows = [alpaca(i, input="é ü 😀 \\ \" \n" * (i % 5), score=i / 7, n=10 ** (i % 25), flag=None) for i in range(200)]
    document = {"data": rows, "version": "1.0"} if layout == "keyed" else {"version": "1.0", "data": rows}
    text = {"array": lambda: json.dumps(rows, indent=2, ensure_ascii=False),
            "array-ascii": lambda: json.dumps(rows),
            "keyed": lambda: json.dumps(document, ensure_ascii=False),
            "keyed-last": lambda: json.dumps(document, ensure_ascii=False)}[layout]()
    path = tmp_path / "rows.json.gz"
    path.write_bytes(gzip.compress(text.encode()))
    # "keyed": a document larger than the row cap streams {"data": [...]} row by row
    records, problems, _ = read_all([str(path)], max_row_bytes=300 if layout == "keyed" else 10_000)
    assert problems.total == 0
    assert [r.extra["score"] for r in records] == [row["score"] for row in rows]
    assert [r.extra["n"] for r in records] == [row["n"] for row in rows]
    assert [r.messages[0].fields["input"] for r in records] == [row["input"] for row in rows]


def test_json_document_layouts_and_damage(tmp_path):
    def read_text(name, text, **kwargs):
        path = tmp_path / name
        path.write_text(text)
        records, problems, _ = read_all([str(path)], **kwargs)
        return [r.row for r in records], found(problems)

    assert read_text("lines.json", json.dumps(alpaca(1)) + "\n" + json.dumps(alpaca(2)) + "\n") == ([1, 2], [])
    assert read_text("cols.json", json.dumps({"instruction": ["a", "b"], "output": ["c", "d"]})) == ([1, 2], [])
    assert read_text("ids.json", json.dumps({"x": alpaca(1), "y": alpaca(2)})) == ([1, 2], [])
    one = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
    assert read_text("one.json", json.dumps(one)) == ([1], [])  # one conversation, not a list of two rows
    turns = {"turns": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
    assert read_text("turns.json", json.dumps(turns), columns="messages=turns") == ([1], [])
    assert read_text("broken.json", "[" + json.dumps(alpaca(1)) + ",\n" + json.dumps(alpaca(2))[:-1] + "\n]") == (
        [1], [("broken.json", 2, "malformed-json", "malformed JSON: Expecting ',' delimiter at line 3 column 1; "
                                                   "the rest of the file was not read")])
    assert read_text("extra.json", json.dumps([alpaca(1)]) + " []") == (
        [1], [("extra.json", 0, "malformed-json", "malformed JSON: extra data after the end of the document at "
                                                  "line 1 column 41; the rest of the file was not read")])
    assert read_text("scalar.json", "42") == ([], [("scalar.json", 0, "malformed-json", "a .json file must hold an "
                                                    "array or an object, found '4' at line 1 column 1")])
    assert read_text("blank.json", "  \n") == ([], [("blank.json", 0, "empty-file", "the file holds no JSON")])
    huge = "[" + json.dumps(alpaca(1)) + ',{"instruction": "' + "x" * 5000 + '", "output": "y"},' + json.dumps(alpaca(3)) + "]"
    assert read_text("huge.json", huge, max_row_bytes=1000) == (
        [1, 3], [("huge.json", 2, "row-too-large", "row is 5,034 characters, over the 1,000-byte row cap")])
    with pytest.raises(DataError, match=r"several.json: holds several arrays of rows \('train', 'test'\); write one file per split"):
        read_text("several.json", json.dumps({"train": [alpaca(1)], "test": [alpaca(2)]}))


def test_oversized_jsonl_rows_are_skipped_without_being_held(tmp_path):
    path = write_lines(tmp_path / "big.jsonl", [json.dumps(alpaca(1)), json.dumps(alpaca(2, output="x" * 100_000)),
                                                json.dumps(alpaca(3))])
    records, problems, _ = read_all([str(path)], max_row_bytes=50_000)
    assert [r.row for r in records] == [1, 3]
    assert found(problems) == [("big.jsonl", 2, "row-too-large", "row is 100,036 bytes, over the 50,000-byte row cap")]


def test_txt_is_read_in_parts_cut_at_line_boundaries(tmp_path):
    lines = [f"line {i} " + "word " * (i % 13) for i in range(2000)]
    text = "".join(line + ("\n\n" if i % 7 == 0 else "\n") + ("    indented\n" if i % 11 == 0 else "")
                   for i, line in enumerate(lines))
    path = tmp_path / "doc.txt"
    path.write_text("\ufeff" + text)
    records, problems, _ = read_all([str(path)], text_part_bytes=4096)
    assert problems.total == 0 and len(records) > 10
    assert "".join(r.text for r in records) == text
    assert [r.continued for r in records] == [True] * (len(records) - 1) + [False]
    assert all(r.text.endswith("\n") and not r.text[0].isspace() for r in records)
    assert all(4096 - 200 <= len(r.text.encode()) <= 2 * 4096 for r in records[:-1])  # ~ the part size
    assert [r.row for r in records] == [1 + sum(r.text.count("\n") for r in records[:k]) for k in range(len(records))]
    assert text.splitlines()[records[3].row - 1] == records[3].text.splitlines()[0]

    one_line = tmp_path / "one.txt"
    one_line.write_text("wörd " * 3000)
    records, _, _ = read_all([str(one_line)], text_part_bytes=1000, max_row_bytes=2000)
    assert "".join(r.text for r in records) == "wörd " * 3000
    assert all(r.text.endswith(" ") and len(r.text.encode()) <= 2000 for r in records)

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good line\n" * 300 + b"bad \xff line\n" + b"good again\n" * 300)
    records, problems, _ = read_all([str(bad)], text_part_bytes=1000)
    ((bad_row, detail),) = [(p.row, p.detail) for p in problems.examples["bad-utf8"]]  # the part holding line 301
    next_row = min(r.row for r in records if r.row > bad_row)
    assert bad_row <= 301 < next_row
    assert detail.startswith(f"invalid UTF-8 at byte {(301 - bad_row) * 10 + 4} ")
    assert sum(r.text.count("\n") for r in records) + (next_row - bad_row) == 601  # every other line is kept
    assert all(r.continued for r in records[:-1]) and records[-1].continued is False


# -- inputs -------------------------------------------------------------------------------------------------------------


def test_a_directory_of_files_is_read_file_by_file_and_a_saved_dataset_stays_one_input(tmp_path):
    import datasets

    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / ".cache").mkdir()
    write_lines(data / "b.jsonl", [json.dumps(alpaca(2))])
    write_lines(data / "a.jsonl", [json.dumps(alpaca(1))])
    (data / "sub" / "c.csv.gz").write_bytes(gzip.compress(b"instruction,output\nq3,a3\n"))
    write_lines(data / ".cache" / "x.jsonl", [json.dumps(alpaca(9))])
    (data / "README.md").write_text("notes")
    saved = tmp_path / "saved"
    datasets.Dataset.from_list([alpaca(4), alpaca(5)]).save_to_disk(str(saved))

    sources = resolve_inputs([str(data), str(saved)])
    assert sources == [InputSource(str(data / "a.jsonl"), "file", str(data)),
                       InputSource(str(data / "b.jsonl"), "file", str(data)),
                       InputSource(str(data / "sub" / "c.csv.gz"), "file", str(data)),
                       InputSource(str(saved), "dataset", str(saved))]
    records, problems, stats = read_all([str(data), str(saved)])
    assert problems.total == 0
    assert [(os.path.relpath(r.source, tmp_path), r.row, r.messages[0].content) for r in records] == [
        ("data/a.jsonl", 1, "q1"), ("data/b.jsonl", 1, "q2"), ("data/sub/c.csv.gz", 2, "q3"), ("saved", 1, "q4"),
        ("saved", 2, "q5")]
    assert [(os.path.relpath(s.path, tmp_path), s.rows) for s in stats] == [
        ("data/a.jsonl", 1), ("data/b.jsonl", 1), ("data/sub/c.csv.gz", 1), ("saved", 2)]


def test_inputs_are_checked_with_one_line_naming_the_bad_one(tmp_path, monkeypatch):
    good = write_lines(tmp_path / "a.jsonl", [json.dumps(alpaca(1))])
    (tmp_path / "notes.xml").write_text("<x/>")
    (tmp_path / "empty").mkdir()
    cases = {
        str(tmp_path / "missing.jsonl"): f"{tmp_path / 'missing.jsonl'}: no such file or directory",
        str(tmp_path / "notes.xml"): f"{tmp_path / 'notes.xml'}: unsupported file type; expected .jsonl, .json, .csv, .parquet or .txt (optionally .gz)",
        str(tmp_path / "empty"): f"{tmp_path / 'empty'}: directory holds no data files (.jsonl, .ndjson, .json, .csv, .parquet, .txt, optionally .gz) and is not a saved dataset (Dataset.save_to_disk)",
        "data/train": "data/train: no such file or directory",  # a missing local path, not taken for a hub id
    }
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    for bad, message in cases.items():
        with pytest.raises(DataError) as error:
            resolve_inputs([str(good), bad])
        assert str(error.value) == message
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="pipe.jsonl: not a regular file"):
        resolve_inputs([str(fifo)])
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(DataError, match="a.jsonl: permission denied"):
        resolve_inputs([str(good)])


def test_a_hub_dataset_is_pinned_to_its_resolved_revision(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import RepositoryNotFoundError

    revision = {"org/ds": "a" * 40}

    def dataset_info(self, name, *, revision=None, timeout=None):
        if name not in revisions:
            raise RepositoryNotFoundError(f"{name} not found", response=SimpleNamespace(headers={}, status_code=404, request=None))
        return SimpleNamespace(sha=revisions[name])

    revisions = revision
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", dataset_info)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert resolve_inputs(["org/ds:test"]) == [InputSource(f"org/ds@{'a' * 40}:test", "hub", "org/ds:test")]
    revisions["org/ds"] = "b" * 40  # the dataset changed upstream: a different input, so a different fingerprint
    assert resolve_inputs(["org/ds"])[0].path == f"org/ds@{'b' * 40}"
    assert resolve_inputs([f"org/ds@{'c' * 40}"])[0].path == f"org/ds@{'c' * 40}"  # a pinned commit needs no lookup
    with pytest.raises(DataError, match="^org/none: no such file or directory, and no hub dataset 'org/none'$"):
        resolve_inputs(["org/none"])

    cache = tmp_path / "hub"
    (cache / "datasets--org--ds" / "refs").mkdir(parents=True)
    (cache / "datasets--org--ds" / "refs" / "main").write_text("d" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_inputs(["org/ds"])[0].path == f"org/ds@{'d' * 40}"
    with pytest.raises(DataError, match="org/other: no such file or directory, and hub dataset 'org/other' is not "
                                        r"in the local cache \(HF_HUB_OFFLINE is set\)"):
        resolve_inputs(["org/other"])


def test_build_checks_inputs_before_loading_a_tokenizer(tmp_path, monkeypatch):
    import importlib

    build_module = importlib.import_module("sftdata.build")

    def no_tokenizer(*args, **kwargs):
        raise AssertionError("the tokenizer was loaded before the inputs were checked")

    monkeypatch.setattr(build_module, "load_tokenizer", no_tokenizer)
    good = write_lines(tmp_path / "a.jsonl", [json.dumps(alpaca(1))])
    with pytest.raises(DataError, match="nope.jsonl: no such file or directory"):
        build_module.build([str(good), str(tmp_path / "nope.jsonl")], tokenizer=str(TINY_TOKENIZER), output=tmp_path / "out")


def test_build_reads_a_directory_records_each_file_and_survives_every_bad_row(tmp_path):
    from sftdata import build

    data = tmp_path / "data"
    data.mkdir()
    write_lines(data / "a.jsonl", [
        json.dumps(alpaca(1)), '{"instruction": "x \\ud83d", "output": "y"}', "{}",
        '{"instruction": "n", "output": "y", "id": ' + "9" * 5000 + "}", json.dumps(alpaca(5))])
    (data / "b.csv").write_bytes(b"instruction,output\nq1,a1\nq2,a2,extra\nq3 \xff,a3\nq4,a4\n")
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    (data / "c.jsonl.gz").write_bytes(compressor.compress(json.dumps(alpaca(1)).encode() + b"\n") +
                                      compressor.flush(zlib.Z_FULL_FLUSH) + b"\xff" * 64)  # one read: all lost
    result = build([str(data)], template="chatml", tokenizer=str(TINY_TOKENIZER), output=tmp_path / "out",
                   max_skipped_fraction=1)
    manifest = result.manifest
    assert [(os.path.basename(i["path"]), i["rows"]) for i in manifest["inputs"]] == [
        ("a.jsonl", 5), ("b.csv", 4), ("c.jsonl.gz", 1)]
    assert manifest["counts"]["rows_kept"] == 4
    assert manifest["counts"]["skipped"] == {"bad-number": 1, "bad-utf8": 1, "corrupt-gzip": 1, "csv-field-count": 1,
                                             "lone-surrogate": 1, "unknown-format": 1}
    problems = [json.loads(line) for line in (tmp_path / "out" / "problems.jsonl").read_text().splitlines()]
    assert [(os.path.basename(p["source"]), p["row"], p["kind"]) for p in problems] == [
        ("a.jsonl", 2, "lone-surrogate"), ("a.jsonl", 3, "unknown-format"), ("a.jsonl", 4, "bad-number"),
        ("b.csv", 3, "csv-field-count"), ("b.csv", 4, "bad-utf8"), ("c.jsonl.gz", 1, "corrupt-gzip")]
    with pytest.raises(DataError, match=r"a.jsonl:2: \[ingest/lone-surrogate\] instruction holds a lone UTF-16 surrogate"):
        build([str(data)], template="chatml", tokenizer=str(TINY_TOKENIZER), output=tmp_path / "out2", on_error="fail")
