"""Small I/O helpers for the cleaning commands: eval-set loading and writing kept rows / audit reports."""

from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from sftdata.record import DataError, Record, Removal

# Fields read from an eval row when none are selected (the first ones present are used, all of them):
# GSM8K `question`, HumanEval `prompt`, MT-bench `turns`, chat `messages` (user turns), and common alternatives.
DEFAULT_EVAL_FIELDS = ("question", "prompt", "turns", "messages", "problem", "instruction", "input", "text")
ID_FIELDS = ("task_id", "question_id", "id", "idx", "uid")
INTERNAL_EXTRA = ("alpaca_input", "alpaca_instruction")  # added by ingest, not fields of the input row


@dataclass(frozen=True, slots=True)
class EvalSegment:
    """One piece of eval text checked for leaks: a field of one eval row (one turn for lists)."""

    file: str
    index: int        # 1-based row number in the file
    id: str           # the row's id field if it has one, else the row number
    field: str        # e.g. "question", "turns[1]", "messages[0]"
    text: str


def _open_text(path: Path) -> io.TextIOBase:
    raw = open(path, "rb")
    head = raw.read(2)
    raw.seek(0)
    stream = gzip.GzipFile(fileobj=raw) if head == b"\x1f\x8b" else raw
    return io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")


def _eval_rows(path: Path) -> Iterable[tuple[int, Any]]:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith((".jsonl", ".ndjson")):
        with _open_text(path) as f:
            for i, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        yield i, json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{i}: malformed JSON in eval file: {e.msg}") from None
    elif name.endswith(".json"):
        with _open_text(path) as f:
            text = f.read()
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data":  # JSON lines in a .json file
                yield from ((i, json.loads(line)) for i, line in enumerate(text.splitlines(), 1) if line.strip())
                return
            raise DataError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None
        if isinstance(doc, dict):
            lists = [v for v in doc.values() if isinstance(v, list)]
            doc = lists[0] if len(doc) == 1 and lists else [doc]
        yield from enumerate(doc, start=1)
    elif name.endswith(".csv"):
        with _open_text(path) as f:
            for i, row in enumerate(csv.DictReader(f), start=2):
                yield i, row
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:
            raise DataError(f"{path}: not a readable Parquet file: {e}") from None
        yield from enumerate(table.to_pylist(), start=1)
    else:
        raise DataError(f"{path}: unsupported eval file type; expected .jsonl, .json, .csv or .parquet (optionally .gz)")


def _texts_of(value: Any, field: str) -> list[tuple[str, str]]:
    if value is None:
        return []
    if isinstance(value, str):
        return [(field, value)]
    if isinstance(value, list):
        out: list[tuple[str, str]] = []
        for i, v in enumerate(value):
            if isinstance(v, str):
                out.append((f"{field}[{i}]", v))
            elif isinstance(v, dict):  # chat message: user / prompt side only
                role = v.get("role", v.get("from"))
                content = v.get("content", v.get("value"))
                if isinstance(content, str) and role in (None, "user", "human", "system"):
                    out.append((f"{field}[{i}]", content))
        return out
    if isinstance(value, (int, float)):
        return [(field, str(value))]
    return []


def load_eval_segments(paths: Iterable[str], fields: Iterable[str] | str | None = None) -> list[EvalSegment]:
    """Read eval files (JSONL/JSON/Parquet/CSV, optionally gzip) into the text segments to check for leaks.

    ``fields``: the field names to read (a list or a comma-separated string); by default every field of
    :data:`DEFAULT_EVAL_FIELDS` a row has. A file in which no row has a selected field is an error that names
    the fields it does have.
    """
    if isinstance(fields, str):
        fields = [f.strip() for f in fields.split(",") if f.strip()]
    wanted = tuple(fields) if fields else DEFAULT_EVAL_FIELDS
    segments: list[EvalSegment] = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise DataError(f"{p}: eval file not found")
        found = 0
        seen_keys: set[str] = set()
        for index, row in _eval_rows(path):
            if not isinstance(row, dict):
                raise DataError(f"{p}:{index}: eval row must be an object, got {type(row).__name__}")
            seen_keys.update(row)
            rid = next((str(row[k]) for k in ID_FIELDS if k in row and row[k] is not None), str(index))
            for name in wanted:
                for field, text in _texts_of(row.get(name), name):
                    if text.strip():
                        segments.append(EvalSegment(str(p), index, rid, field, text))
                        found += 1
        if not found:
            raise DataError(f"{p}: no eval text in fields {list(wanted)}; the file has fields {sorted(seen_keys)[:12]} "
                            "(choose with --field)")
    return segments


# ------------------------------------------------------------------------------------------------------------------
# Output


def record_row(record: Record) -> dict[str, Any]:
    """A kept record as an output row: canonical ``messages`` (or ``text``) plus the row's other fields."""
    row: dict[str, Any] = {}
    if record.is_chat:
        row["messages"] = [{k: v for k, v in m.to_json().items() if k not in (m.fields or {})} for m in record.messages]
    else:
        row["text"] = record.text
    for k, v in record.extra.items():
        if k not in row and k not in INTERNAL_EXTRA:
            row[k] = v
    return row


class RowWriter:
    """Writes rows as JSONL, or as Parquet when the path ends in ``.parquet`` (buffered, one row group per flush)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.parquet = self.path.name.lower().endswith(".parquet")
        self.rows = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._buffer: list[dict[str, Any]] = []
        self._writer = None
        self._file = None if self.parquet else open(self._tmp, "w", encoding="utf-8")

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            self.rows += 1
            if self._file is not None:
                self._file.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            else:
                self._buffer.append(row)
        if self.parquet and len(self._buffer) >= 50_000:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._buffer:
            return
        table = pa.Table.from_pylist(self._buffer)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._tmp, table.schema, compression="zstd")
        else:
            table = table.cast(self._writer.schema)
        self._writer.write_table(table)
        self._buffer = []

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            self._flush()
            if self._writer is None:
                pq.write_table(pa.table({"messages": pa.array([], pa.list_(pa.struct([("role", pa.string()),
                                                                                     ("content", pa.string())])))}),
                               self._tmp)
            else:
                self._writer.close()
        self._tmp.replace(self.path)

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._writer is not None:
            self._writer.close()
        self._tmp.unlink(missing_ok=True)


def removal_row(removal: Removal) -> dict[str, Any]:
    return removal.to_dict()
