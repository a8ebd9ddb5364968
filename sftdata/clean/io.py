"""Small I/O helpers for the cleaning commands: eval-set loading and writing kept rows / audit reports."""

from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from sftdata.record import DataError, Removal

# Fields read from an eval row when none are selected (the first ones present are used, all of them):
# GSM8K `question`, HumanEval `prompt`, MT-bench `turns`, chat `messages` (user turns), and common alternatives.
DEFAULT_EVAL_FIELDS = ("question", "prompt", "turns", "messages", "problem", "instruction", "input", "text")
ID_FIELDS = ("task_id", "question_id", "id", "idx", "uid")


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
# Output: kept rows exactly as they were read, their provenance, and the audit report


def is_jsonl(path: str | Path) -> bool:
    """A JSON-lines input file (optionally gzip): its kept lines can be copied byte for byte."""
    name = Path(path).name.lower()
    name = name[:-3] if name.endswith(".gz") else name
    return name.endswith((".jsonl", ".ndjson")) and Path(path).is_file()


def jsonl_lines(path: str | Path) -> Iterable[tuple[int, bytes]]:
    """``(line number, line)`` of a JSON-lines file (gzip detected by its magic bytes), numbered as ingest numbers
    rows; the line has no line break and no byte-order mark."""
    with open(path, "rb") as raw:
        head = raw.read(2)
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw) if head == b"\x1f\x8b" else raw
        for number, line in enumerate(stream, start=1):
            if number == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            yield number, line.rstrip(b"\r\n")


def parquet_schema(paths: list[str]) -> Any:
    """The Arrow schema shared by ``paths`` when every one is a Parquet file with the same schema, else None."""
    import pyarrow.parquet as pq

    schemas = []
    for p in paths:
        if not (str(p).lower().endswith(".parquet") and Path(p).is_file()):
            return None
        try:
            schemas.append(pq.read_schema(p))
        except Exception:
            return None
    if schemas and all(s.equals(schemas[0]) for s in schemas[1:]):
        return schemas[0].remove_metadata()
    return None


def default_provenance_path(output: str | Path) -> Path:
    """Where the provenance of ``output``'s rows goes by default: ``kept.jsonl`` -> ``kept.provenance.jsonl``."""
    output = Path(output)
    return output.with_name(output.with_suffix("").name + ".provenance.jsonl")


def report_row(removal: Removal) -> dict[str, Any]:
    """A removed row in the audit report of ``sftdata dedup`` / ``decontaminate``: where it was, why it went, what it
    matched, and the input row as read (``input``), so a person can check the decision or restore the row."""
    return {"source": removal.record.source, "row": removal.record.row, "stage": removal.stage,
            "reason": removal.reason, "detail": removal.detail, "matched": removal.matched,
            "input": removal.record.raw}


class JsonlFile:
    """A JSONL file written to ``PATH.tmp`` and renamed into place on :meth:`close` (removed on :meth:`abort`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._file = open(self._tmp, "wb")

    def write(self, rows: Iterable[Any]) -> None:
        self._file.writelines(json.dumps(r, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass") + b"\n"
                              for r in rows)

    def write_lines(self, lines: Iterable[bytes]) -> None:
        """Rows already serialized, one JSON object per item (no line break)."""
        self._file.write(b"".join(line + b"\n" for line in lines))

    def close(self) -> None:
        self._file.close()
        self._tmp.replace(self.path)

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


class RowWriter:
    """Writes input rows unchanged: as JSONL, or as Parquet when the path ends in ``.parquet`` (buffered, one row
    group per flush; ``schema``, e.g. the inputs' own Parquet schema, keeps their column types)."""

    def __init__(self, path: str | Path, schema: Any = None):
        self.path = Path(path)
        self.parquet = self.path.name.lower().endswith(".parquet")
        self.schema = schema
        self.rows = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._buffer: list[dict[str, Any]] = []
        self._writer = None
        self._file = None if self.parquet else open(self._tmp, "wb")

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        """Rows as parsed (dicts)."""
        if self._file is not None:
            for row in rows:
                self.rows += 1
                self._file.write(json.dumps(row, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass") + b"\n")
        else:
            for row in rows:
                self.rows += 1
                self._buffer.append(row)
            if len(self._buffer) >= 50_000:
                self._flush()

    def write_lines(self, lines: Iterable[bytes]) -> None:
        """Rows as JSON text, one per line, written to JSONL byte for byte."""
        if self._file is not None:
            lines = list(lines)
            self.rows += len(lines)
            if lines:
                self._file.write(b"\n".join(lines) + b"\n")
        else:
            self.write(json.loads(line) for line in lines)

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._buffer:
            return
        schema = self.schema if self.schema is not None else (self._writer.schema if self._writer else None)
        if schema is not None:
            extra = set().union(*(row.keys() for row in self._buffer)) - set(schema.names)
            if extra:  # from_pylist would drop them silently
                raise DataError(f"{self.path}: rows have fields {sorted(extra)} that the output's Parquet schema "
                                "lacks; write JSONL instead")
        try:
            table = pa.Table.from_pylist(self._buffer, schema=schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise DataError(f"{self.path}: rows do not fit one Parquet schema ({e}); write JSONL instead") from None
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._tmp, table.schema, compression="zstd")
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
                pq.write_table((self.schema or pa.schema([])).empty_table(), self._tmp)
            else:
                self._writer.close()
        self._tmp.replace(self.path)

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._writer is not None:
            self._writer.close()
        self._tmp.unlink(missing_ok=True)
