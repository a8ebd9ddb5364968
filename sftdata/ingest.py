"""Ingest: read corpora in any common layout and normalize every row into a :class:`~sftdata.record.Record`.

Readers stream ``.jsonl``, ``.json`` (array, or object holding rows), ``.csv``, ``.parquet``, ``.txt`` (raw
text, one document per file), any of them gzip-compressed, saved Hugging Face dataset directories and, for
real users, hub dataset ids. Row formats (Alpaca, OpenAI ``messages``, ShareGPT, prompt/completion, raw text)
are detected per file from the first usable row, or forced with ``format=``.

A bad row never crashes the run and is never dropped silently: it becomes a :class:`Problem` with the file,
the 1-based line/row and the reason, recorded in the caller's :class:`ProblemLog`.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from sftdata.record import ROLES, DataError, Message, Problem, ProblemLog, Record

FORMATS = ("alpaca", "messages", "sharegpt", "prompt-completion", "text")

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
    "function_call": "assistant",
}

_CANONICAL_FIELDS = ("instruction", "input", "output", "system", "prompt", "completion", "text", "messages", "conversations")


@dataclass
class ReadStats:
    """Per-file facts for the manifest: detected format and rows seen."""

    path: str
    format: str | None = None
    rows: int = 0
    bytes: int = 0


@dataclass
class IngestOptions:
    """How rows are interpreted.

    ``columns`` maps canonical field names to this corpus's names, e.g. ``{"instruction": "question",
    "output": "answer"}`` for GSM8K. ``strip`` trims whitespace around every message (off by default:
    whitespace is kept exactly as written).
    """

    format: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    strip: bool = False


def parse_columns(spec: str | dict[str, str] | None) -> dict[str, str]:
    """Parse ``"instruction=question,output=answer"`` into ``{"instruction": "question", "output": "answer"}``."""
    if not spec:
        return {}
    if isinstance(spec, dict):
        return dict(spec)
    mapping: dict[str, str] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise DataError(f"bad column mapping {part!r}: expected CANONICAL=FIELD, e.g. instruction=question")
        canonical, source = (s.strip() for s in part.split("=", 1))
        if canonical not in _CANONICAL_FIELDS:
            raise DataError(
                f"bad column mapping {part!r}: {canonical!r} is not one of {', '.join(_CANONICAL_FIELDS)}"
            )
        mapping[canonical] = source
    return mapping


# --------------------------------------------------------------------------------------------------------------
# Row normalization


class RowError(Exception):
    """A row that cannot be normalized; ``kind`` is the stable key counted in the manifest."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def detect_format(row: dict[str, Any], columns: dict[str, str] | None = None) -> str | None:
    """Name the format a row is in, or None when no known layout fits."""
    columns = columns or {}
    keys = set(row)

    def has(canonical: str) -> bool:
        return columns.get(canonical) in keys or canonical in keys

    if has("messages"):
        return "messages"
    if has("conversations"):
        return "sharegpt"
    if has("instruction") and (has("output") or "response" in keys):
        return "alpaca"
    if has("prompt") and has("completion"):
        return "prompt-completion"
    if has("text"):
        return "text"
    return None


def _string_field(row: dict[str, Any], name: str, *, required: bool) -> str | None:
    value = row.get(name)
    if value is None:
        if required:
            raise RowError("missing-field", f"missing field {name!r}")
        return None
    if not isinstance(value, str):
        raise RowError("wrong-type", f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def _message(role: Any, content: Any, index: int, *, role_map: dict[str, str] | None = None) -> Message:
    if not isinstance(role, str):
        raise RowError("wrong-type", f"message {index}: role must be a string, got {type(role).__name__}")
    mapped = (role_map or {}).get(role.lower(), role) if role_map is not None else role
    if mapped not in ROLES:
        raise RowError("unknown-role", f"message {index}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
    if content is None:
        content = ""
    if isinstance(content, list):
        # OpenAI content parts: keep only text parts, refuse anything else (images, audio) explicitly.
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise RowError("wrong-type", f"message {index}: non-text content part {part!r:.60}")
        content = "".join(texts)
    if not isinstance(content, str):
        raise RowError("wrong-type", f"message {index}: content must be a string, got {type(content).__name__}")
    return Message(mapped, content)


def validate_conversation(messages: list[Message]) -> None:
    """Raise :class:`RowError` unless the conversation is trainable as written.

    Rules: at least one assistant turn; ``system`` only first; no two consecutive user or assistant turns
    (tool results may follow an assistant turn or each other); no empty assistant turn.
    """
    if not messages:
        raise RowError("empty-conversation", "conversation has no messages")
    if not any(m.role == "assistant" for m in messages):
        raise RowError("no-assistant", "conversation has no assistant turn to train on")
    previous = None
    for i, m in enumerate(messages):
        if m.role == "system" and i != 0:
            raise RowError("misplaced-system", f"message {i}: system message must come first")
        if m.role in ("user", "assistant") and m.role == previous:
            raise RowError("consecutive-role", f"messages {i - 1} and {i} are both {m.role!r}")
        if m.role == "assistant" and m.content.strip() == "":
            raise RowError("empty-assistant", f"message {i}: assistant content is empty")
        previous = m.role


def normalize_row(row: Any, fmt: str, options: IngestOptions) -> tuple[list[Message] | None, str | None, dict[str, Any]]:
    """Turn one raw row into ``(messages, text, extra)``; raises :class:`RowError` with the reason."""
    if not isinstance(row, dict):
        raise RowError("wrong-type", f"row must be an object, got {type(row).__name__}")
    col = options.columns
    # A mapping applies where the mapped field exists, so one --columns works across mixed inputs.
    name = lambda canonical: col[canonical] if col.get(canonical) in row else canonical  # noqa: E731
    used: set[str] = set()
    messages: list[Message] | None = None
    text: str | None = None

    if fmt == "alpaca":
        instruction = _string_field(row, name("instruction"), required=True)
        output_name = name("output")
        if output_name not in row and "output" not in col and "response" in row:
            output_name = "response"
        output = _string_field(row, output_name, required=True)
        extra_input = _string_field(row, name("input"), required=False) or ""
        system = _string_field(row, name("system"), required=False)
        used |= {name("instruction"), output_name, name("input"), name("system")}
        if output_name == "output" and "response" in row:
            used.add("response")  # CodeAlpaca carries both keys with the same text
        user = instruction if not extra_input else f"{instruction}\n\n{extra_input}"
        messages = ([Message("system", system)] if system else []) + [Message("user", user), Message("assistant", output)]
        # Keep the Alpaca split (instruction vs input) so the Alpaca template can render "### Input:".
        row_extra = {"alpaca_input": extra_input, "alpaca_instruction": instruction}
    elif fmt == "messages":
        raw = row.get(name("messages"))
        used.add(name("messages"))
        if not isinstance(raw, list):
            raise RowError("wrong-type", f"field {name('messages')!r} must be a list of messages")
        messages = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict):
                raise RowError("wrong-type", f"message {i} must be an object")
            if "role" not in m:
                raise RowError("missing-field", f"message {i}: missing 'role'")
            messages.append(_message(m.get("role"), m.get("content"), i))
        row_extra = {}
    elif fmt == "sharegpt":
        raw = row.get(name("conversations"))
        used.add(name("conversations"))
        if not isinstance(raw, list):
            raise RowError("wrong-type", f"field {name('conversations')!r} must be a list of turns")
        messages = []
        system = row.get("system")
        if isinstance(system, str) and system:
            messages.append(Message("system", system))
            used.add("system")
        for i, m in enumerate(raw):
            if not isinstance(m, dict):
                raise RowError("wrong-type", f"turn {i} must be an object")
            role = m.get("from", m.get("role"))
            if role is None:
                raise RowError("missing-field", f"turn {i}: missing 'from'")
            messages.append(_message(role, m.get("value", m.get("content")), i, role_map=SHAREGPT_ROLES))
        row_extra = {}
    elif fmt == "prompt-completion":
        prompt = row.get(name("prompt"))
        completion = row.get(name("completion"))
        used |= {name("prompt"), name("completion")}
        if prompt is None or completion is None:
            raise RowError("missing-field", "missing field 'prompt' or 'completion'")
        if isinstance(prompt, list):  # conversational prompt/completion (TRL style)
            messages = [_message(m.get("role"), m.get("content"), i) for i, m in enumerate(prompt) if isinstance(m, dict)]
        elif isinstance(prompt, str):
            messages = [Message("user", prompt)]
        else:
            raise RowError("wrong-type", "field 'prompt' must be a string or a list of messages")
        if isinstance(completion, list):
            messages += [_message(m.get("role"), m.get("content"), len(messages) + i) for i, m in enumerate(completion) if isinstance(m, dict)]
        elif isinstance(completion, str):
            messages.append(Message("assistant", completion))
        else:
            raise RowError("wrong-type", "field 'completion' must be a string or a list of messages")
        row_extra = {}
    elif fmt == "text":
        text = _string_field(row, name("text"), required=True)
        used.add(name("text"))
        if text == "":
            raise RowError("empty-text", "text is empty")
        row_extra = {}
    else:
        raise DataError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")

    if messages is not None:
        if options.strip:
            messages = [Message(m.role, m.content.strip()) for m in messages]
        validate_conversation(messages)
    extra = {k: v for k, v in row.items() if k not in used}
    extra.update(row_extra)
    return messages, text, extra


# --------------------------------------------------------------------------------------------------------------
# File readers: each yields (row_number, row_or_RowError) and keeps a byte position for progress bars.


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


def read_records(
    paths: list[str] | str,
    *,
    format: str | None = None,
    columns: dict[str, str] | str | None = None,
    strip: bool = False,
    problems: ProblemLog | None = None,
    batch_size: int = 1000,
    stats: list[ReadStats] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> Iterator[list[Record]]:
    """Stream records from ``paths`` in batches of ``batch_size``.

    Bad rows are recorded in ``problems`` (file, row, reason) and skipped; with ``ProblemLog(on_error="fail")``
    the first bad row raises :class:`DataError`. ``stats`` (if given) receives one :class:`ReadStats` per file,
    and ``on_progress(bytes)`` is called with the bytes consumed since the previous call.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [str(paths)]
    if format is not None and format not in FORMATS:
        raise DataError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    options = IngestOptions(format=format, columns=parse_columns(columns), strip=strip)
    problems = problems if problems is not None else ProblemLog()
    batch: list[Record] = []
    for path_str in paths:
        path = Path(path_str)
        file_stats = ReadStats(path=str(path_str))
        if stats is not None:
            stats.append(file_stats)
        if path.is_dir():
            reader: Callable[[Any, _Position], Iterator[tuple[int, Any]]] = _read_hf_dataset
        elif path.exists():
            reader = _reader_for(path)
            if path.stat().st_size == 0:
                problems.add(Problem(str(path_str), 0, "ingest", "empty-file", "file is empty"))
                continue
        elif "/" in path_str and not path_str.startswith((".", "/")) and path.suffix == "":
            reader, path = _read_hf_dataset, path_str  # type: ignore[assignment]
        else:
            raise DataError(f"{path_str}: no such file or directory")
        if isinstance(path, Path) and not os.access(path, os.R_OK):
            raise DataError(f"{path_str}: permission denied")

        pos = _Position()
        reported = 0
        fmt = options.format or (None if reader is not _read_text else "text")
        try:
            for row_number, row in reader(path, pos):
                file_stats.rows += 1
                if on_progress is not None and pos.done != reported:
                    on_progress(pos.done - reported)
                    reported = pos.done
                if isinstance(row, RowError):
                    problems.add(Problem(str(path_str), row_number, "ingest", row.kind, row.detail))
                    continue
                if fmt is None and isinstance(row, dict):
                    fmt = detect_format(row, options.columns)
                    if fmt is None:
                        raise DataError(
                            f"{path_str}:{row_number}: cannot tell the format from the fields {sorted(row)[:8]}; "
                            "pass --format, or --columns to map them (e.g. --columns instruction=question,output=answer)"
                        )
                    file_stats.format = fmt
                try:
                    messages, text, extra = normalize_row(row, fmt or "text", options)
                except RowError as e:
                    problems.add(Problem(str(path_str), row_number, "ingest", e.kind, e.detail))
                    continue
                batch.append(Record(source=str(path_str), row=row_number, messages=messages, text=text, extra=extra))
                if len(batch) >= batch_size:
                    yield batch
                    batch = []
        except OSError as e:
            raise DataError(f"{path_str}: cannot read file: {e}") from None
        except EOFError as e:
            raise DataError(f"{path_str}: truncated compressed file: {e}") from None
        file_stats.format = file_stats.format or fmt
        file_stats.bytes = input_size(path_str)
        if on_progress is not None and file_stats.bytes > reported:
            on_progress(file_stats.bytes - reported)
    if batch:
        yield batch
