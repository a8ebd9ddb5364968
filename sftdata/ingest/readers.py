"""File readers: each yields ``(row_number, row_or_RowError)`` from one input file and keeps a byte position for
progress bars. Row numbers are 1-based lines (JSONL, CSV) or rows (JSON arrays, Parquet, datasets)."""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path
from typing import Any, Callable, Iterator

from sftdata.ingest.formats import RowError
from sftdata.record import DataError


class _Position:
    """Bytes consumed so far from the underlying (possibly compressed) file, for progress reporting."""

    def __init__(self) -> None:
        self.done = 0


def _open_binary(path: Path) -> tuple[io.BufferedIOBase, Any]:
    raw = open(path, "rb")
    head = raw.read(2)
    raw.seek(0)
    if head == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw), raw
    return raw, raw


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RowError("bad-utf8", f"invalid UTF-8 at byte {e.start} ({data[max(0, e.start - 10):e.start + 10]!r})") from None


def _read_jsonl(path: Path, pos: _Position) -> Iterator[tuple[int, Any]]:
    stream, raw = _open_binary(path)
    with stream, raw:
        for lineno, line in enumerate(stream, start=1):
            pos.done = raw.tell()
            if not line.strip():
                continue
            try:
                text = _decode(line, f"{path}:{lineno}")
                if lineno == 1 and text.startswith("\ufeff"):
                    text = text[1:]
                yield lineno, json.loads(text)
            except RowError as e:
                yield lineno, e
            except json.JSONDecodeError as e:
                yield lineno, RowError("malformed-json", f"malformed JSON: {e.msg} at column {e.colno}")


def _rows_of_json_document(doc: Any, path: Path) -> list[Any]:
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict):
        lists = [v for v in doc.values() if isinstance(v, list)]
        if len(doc) == 1 and lists:  # {"data": [...]} / {"train": [...]}
            return lists[0]
        if doc and all(isinstance(v, dict) for v in doc.values()):  # {"id1": {...}, "id2": {...}}
            return list(doc.values())
        if doc and all(isinstance(v, list) for v in doc.values()) and len({len(v) for v in doc.values()}) == 1:
            keys = list(doc)  # column-oriented {"instruction": [...], "output": [...]}
            return [dict(zip(keys, values)) for values in zip(*doc.values())]
        return [doc]
    raise DataError(f"{path}: a .json file must hold an array of rows or an object of rows, not {type(doc).__name__}")


def _read_json(path: Path, pos: _Position) -> Iterator[tuple[int, Any]]:
    # A JSON array cannot be streamed with the standard library; corpora shipped as .json are small enough.
    data = _read_whole(path, pos)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        # A file named .json that holds JSON lines is common; read it as such instead of failing.
        if e.msg == "Extra data":
            yield from _read_jsonl(path, pos)
            return
        raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    for i, row in enumerate(_rows_of_json_document(doc, path), start=1):
        yield i, row


def _read_csv(path: Path, pos: _Position) -> Iterator[tuple[int, Any]]:
    stream, raw = _open_binary(path)
    with stream, raw:
        text_stream = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
        reader = csv.DictReader(text_stream)
        try:
            for i, row in enumerate(reader, start=1):
                pos.done = raw.tell()
                yield i + 1, dict(row)  # +1: the header is line 1; rows are reported by CSV record number + 1
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not valid UTF-8 near row {reader.line_num}: {e.reason}") from None
        except csv.Error as e:
            raise DataError(f"{path}: malformed CSV at line {reader.line_num}: {e}") from None


def _read_parquet(path: Path, pos: _Position) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable Parquet file: {e}") from None
    row = 0
    total = max(parquet.metadata.num_rows, 1)
    size = path.stat().st_size
    for batch in parquet.iter_batches(batch_size=2048):
        for item in batch.to_pylist():
            row += 1
            yield row, item
        pos.done = size * row // total


def _read_whole(path: Path, pos: _Position) -> bytes:
    stream, raw = _open_binary(path)
    with stream, raw:
        data = stream.read()
        pos.done = raw.tell()
    return data


def _read_text(path: Path, pos: _Position) -> Iterator[tuple[int, Any]]:
    data = _read_whole(path, pos)
    try:
        yield 1, {"text": _decode(data, str(path))}
    except RowError as e:
        yield 1, e


def _read_hf_dataset(path: Path | str, pos: _Position) -> Iterator[tuple[int, Any]]:
    import datasets

    if isinstance(path, Path) and path.is_dir():
        ds = datasets.load_from_disk(str(path))
    else:  # a hub id, optionally "org/name:split"
        name, _, split = str(path).partition(":")
        ds = datasets.load_dataset(name, split=split or "train", streaming=True)
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: dataset has splits {list(ds)}; name one as PATH:SPLIT")
        ds = ds["train"]
    for i, row in enumerate(ds, start=1):
        yield i, row


def _reader_for(path: Path) -> Callable[[Path, _Position], Iterator[tuple[int, Any]]]:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for suffix, reader in ((".jsonl", _read_jsonl), (".ndjson", _read_jsonl), (".json", _read_json),
                           (".csv", _read_csv), (".parquet", _read_parquet), (".txt", _read_text)):
        if name.endswith(suffix):
            return reader
    raise DataError(f"{path}: unsupported file type; expected .jsonl, .json, .csv, .parquet or .txt (optionally .gz)")


def input_size(path: str) -> int:
    """Bytes of an input file (0 for directories and hub ids), for progress totals."""
    p = Path(path)
    return p.stat().st_size if p.is_file() else 0
