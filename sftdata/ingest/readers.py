"""File readers: each yields ``(row_number, row)`` from one input, where ``row`` is a parsed row (usually a dict), a
:class:`TextPart` of a raw-text file, or a :class:`RowError` saying why that row could not be read.

Row numbers are 1-based: the file line where the row starts (JSONL, CSV, ``.txt`` parts) or the row's index (``.json``
arrays, Parquet, datasets); 0 means the file as a whole. Readers do not raise for bad data inside a file: a bad row
becomes a RowError and reading goes on with the next row; damage that ends a file early (broken JSON array structure,
an unreadable Parquet row group) becomes a RowError that says where it broke and what was not read. Every reader
streams: memory is bounded by the largest row (capped by ``max_row_bytes``), not by the file.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

from orjson import loads as _orjson_loads

from sftdata.ingest.formats import RowError, detect_format
from sftdata.record import DataError

DEFAULT_MAX_ROW_BYTES = 8 << 20  # ~2M tokens: more than any model's context; one 10 MB row took 1.85 GB to encode
TEXT_PART_BYTES = 1 << 20  # .txt files are read (and tokenized) in parts of about this size, cut at line boundaries
MAX_NESTING = 128  # deeper JSON is refused at read time (as serde_json does), long before Python's recursion limit

DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet", ".txt")

_CHUNK = 1 << 20


@dataclass(frozen=True)
class ReadOptions:
    """How files are read: ``max_row_bytes`` caps one row (bytes as stored; characters inside ``.json`` documents,
    Arrow bytes for Parquet and datasets); ``text_part_bytes`` is the size of the parts a ``.txt`` file is read in;
    ``columns`` (the field mapping) tells a one-row ``.json`` object such as ``{"turns": [...]}`` from rows."""

    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES
    text_part_bytes: int = TEXT_PART_BYTES
    columns: dict[str, str] = field(default_factory=dict)


class TextPart(NamedTuple):
    """One part of a raw-text file; ``continued``: the document goes on in the next part."""

    text: str
    continued: bool


class _Position:
    """Bytes consumed so far from the underlying (possibly compressed) file, for progress reporting."""

    def __init__(self) -> None:
        self.done = 0


Reader = Callable[[Any, _Position, ReadOptions], Iterator[tuple[int, Any]]]


def _open_binary(path: Path) -> tuple[Any, Any]:
    import gzip

    raw = open(path, "rb")
    head = raw.read(2)
    raw.seek(0)
    if head == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw), raw
    return raw, raw


def _too_large(size: int, cap: int, unit: str = "bytes") -> RowError:
    return RowError("row-too-large", f"row is {size:,} {unit}, over the {cap:,}-byte row cap")


def _bad_utf8(data: bytes, start: int) -> RowError:
    return RowError("bad-utf8", f"invalid UTF-8 at byte {start} ({data[max(0, start - 10):start + 10]!r})")


# -- JSON rows ------------------------------------------------------------------------------------------------------
# A row that json parses can still break later stages: a lone UTF-16 surrogate from a "\ud83d" escape cannot be
# encoded as UTF-8 (rendering and tokenizing fail), and deep nesting overflows the recursion of any later walk over
# the row (writing it back, a template's tojson). Both are refused here, with the reason.
#
# JSON Lines are parsed by orjson where it gives exactly what json.loads gives: it is several times faster and refuses
# lone surrogates and bytes that are not UTF-8 by itself, so the checks cost the hot path only a walk over the row's
# containers. orjson turns integers beyond 64 bits into floats, so a row in which orjson found a float is parsed again
# by json.loads, as is any line orjson refuses (to tell a real problem, with json's reason, from a valid row orjson
# does not take, such as NaN or 1e400).

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_DEEP, _FLOAT, _SURROGATE = 1, 2, 4


def _shape(value: Any) -> int:
    """Flags: _DEEP if containers nest more than MAX_NESTING deep, _FLOAT if a float occurs, _SURROGATE if a key or
    string holds a lone surrogate; 0 for an ordinary row. Visits containers and looks at each value's type (and, for
    the rare strings that are not ASCII, their characters), so it is cheap for rows of long strings."""
    stack = [(value, 1)]
    flags = 0
    while stack:
        item, depth = stack.pop()
        if depth > MAX_NESTING:
            return flags | _DEEP
        if type(item) is dict:
            for key in item:
                if not key.isascii() and _LONE_SURROGATE.search(key):
                    flags |= _SURROGATE
            children = item.values()
        else:
            children = item
        for child in children:
            kind = type(child)
            if kind is str:
                if not child.isascii() and _LONE_SURROGATE.search(child):
                    flags |= _SURROGATE
            elif kind is dict or kind is list:
                stack.append((child, depth + 1))
            elif kind is float:
                flags |= _FLOAT
    return flags


def _short(where: str) -> str:
    """A long field path shortened at element boundaries: ``x[0][0][0]...[0][0]``."""
    if len(where) <= 60:
        return where
    head, tail = where[:28], where[-28:]
    if where[28] not in "[.":
        head = head[:max(head.rfind("["), head.rfind("."))]
    return f"{head}...{tail[min((i for i in (tail.find('['), tail.find('.')) if i >= 0), default=0):]}"


def _json_problem(value: Any) -> RowError | None:
    """Why a parsed JSON row cannot be used (nested deeper than MAX_NESTING, a lone surrogate), or None."""
    stack: list[tuple[Any, int, str]] = [(value, 1, "")]
    while stack:
        item, depth, where = stack.pop()
        if isinstance(item, dict):
            if depth > MAX_NESTING:
                return RowError("too-deep", f"nested deeper than {MAX_NESTING} levels (at {_short(where)})")
            for key, child in item.items():
                path = f"{where}.{key}" if where else str(key)
                if _LONE_SURROGATE.search(key):
                    return _lone_surrogate(key, f"the key {_short(path)!r}")
                stack.append((child, depth + 1, path))
        elif isinstance(item, list):
            if depth > MAX_NESTING:
                return RowError("too-deep", f"nested deeper than {MAX_NESTING} levels (at {_short(where)})")
            stack.extend((child, depth + 1, f"{where}[{i}]") for i, child in enumerate(item))
        elif isinstance(item, str) and _LONE_SURROGATE.search(item):
            return _lone_surrogate(item, _short(where) or "the row")
    return None


def _lone_surrogate(text: str, where: str) -> RowError:
    char = _LONE_SURROGATE.search(text).group()  # type: ignore[union-attr]
    return RowError("lone-surrogate", f"{where} holds a lone UTF-16 surrogate \\u{ord(char):04x} (half of an escaped "
                                      "pair, e.g. a cut emoji), which cannot be encoded as UTF-8")


def _parse_error(e: ValueError | RecursionError) -> RowError:
    """A json parse failure as a row problem."""
    if isinstance(e, json.JSONDecodeError):
        return RowError("malformed-json", f"malformed JSON: {e.msg} at column {e.colno}")
    if isinstance(e, RecursionError):
        return RowError("too-deep", f"nested deeper than {MAX_NESTING} levels")
    return RowError("bad-number", str(e).split(";")[0])  # "Exceeds the limit (4300 digits) for integer string ..."


def parse_json_row(line: bytes, *, first_line: bool = False) -> Any:
    """One JSON row from its bytes: the value json.loads gives, or a RowError saying why the row cannot be used."""
    try:
        row = _orjson_loads(line)
    except ValueError:
        pass
    else:
        shape = _shape(row) if type(row) is dict or type(row) is list else (type(row) is float) * _FLOAT
        if shape == 0:
            return row
        if shape & _DEEP:
            return _json_problem(row)
    try:
        text = line.decode()
    except UnicodeDecodeError as e:
        return _bad_utf8(line, e.start)
    if first_line and text.startswith("\ufeff"):
        text = text[1:]
    try:
        row = json.loads(text)
    except (ValueError, RecursionError) as e:
        return _parse_error(e)
    if type(row) is str:
        return _json_problem(row) or row
    return _json_problem(row) if (type(row) is dict or type(row) is list) and _shape(row) & (_DEEP | _SURROGATE) else row


# -- JSON Lines -----------------------------------------------------------------------------------------------------


def _read_jsonl(path: Path, pos: _Position, opts: ReadOptions) -> Iterator[tuple[int, Any]]:
    cap = opts.max_row_bytes
    stream, raw = _open_binary(path)
    with stream, raw:
        readline, tell = stream.readline, raw.tell
        lineno = 0
        while True:
            line = readline(cap + 1)  # bounded: an oversized row is skipped without being held in memory
            if not line:
                return
            lineno += 1
            pos.done = tell()
            if len(line) > cap and line[-1] != 10:
                size = len(line)
                while line and line[-1] != 10:
                    line = readline(_CHUNK)
                    size += len(line)
                yield lineno, _too_large(size, cap)
                continue
            if line.isspace():
                continue
            yield lineno, parse_json_row(line, first_line=lineno == 1)


# -- JSON documents -------------------------------------------------------------------------------------------------
# The standard library parses each row (so a .json row reads exactly like the same row in JSON Lines); only the
# framing of a document into rows is done here. ijson was tried and rejected for untrusted input: its C backend
# (3.6.0) crashes the process on an integer of 4,301+ digits, silently turns a lone surrogate into "?", and was
# killed for memory on 100,000-deep nesting.

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_BRACKET_RUN = re.compile(r"\[+|\]+|\{+|\}+")
_STRING_TAIL = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_SCALAR = re.compile(r'[^,\]}\s]*')
_BAD_BYTE = re.compile("[\udc80-\udcff]")  # bytes that are not UTF-8, decoded with surrogateescape
_ROWS_KEY = re.compile(r'\{\s*("(?:[^"\\]|\\.)*")\s*:\s*(\[)\s*\{', re.S)  # {"data": [{...
_decoder = json.JSONDecoder()


class _Broken(Exception):
    """The document's structure is broken at ``position``: nothing after it can be framed into rows."""

    def __init__(self, message: str, position: int):
        super().__init__(message)
        self.position = position


class _JsonText:
    """A growing text window over a (possibly gzipped) file, for framing one JSON value at a time."""

    def __init__(self, path: Path, pos: _Position):
        self.path = path
        self.stream, self.raw = _open_binary(path)
        self.tail = b""
        self.pos = pos
        self.buf = ""
        self.i = 0
        self.dropped = 0  # characters before the window
        self.mark: int | None = None  # a window position whose line (and the line's start) is known, once asked for
        self.mark_line = self.mark_line_start = 0
        self.eof = False
        self.dirty = False  # some bytes were not UTF-8

    def close(self) -> None:
        self.stream.close()
        self.raw.close()

    def fill(self, size: int = _CHUNK) -> bool:
        """Append at least ``size`` more bytes of the file (False at the end of the file)."""
        if self.eof:
            return False
        data = self.stream.read(size)
        self.pos.done = self.raw.tell()
        if not data:
            self.eof = True
        data, cut = self.tail + data, len(self.tail) + len(data)
        if not self.eof:  # keep a character cut by the chunk boundary for the next read
            while cut > 0 and len(data) - cut < 4 and data[cut - 1] & 0xC0 == 0x80:
                cut -= 1
            if cut > 0 and data[cut - 1] >= 0xC0:
                cut -= 1
        self.tail = data[cut:]
        try:
            self.buf += data[:cut].decode()
        except UnicodeDecodeError:
            self.dirty = True  # bytes that are not UTF-8 become lone surrogates, found again per row
            self.buf += data[:cut].decode("utf-8", "surrogateescape")
        return bool(data)

    def forget_consumed(self) -> None:
        """Drop text before the current position once enough has accumulated (indices shift)."""
        if self.i > _CHUNK:
            if self.mark is not None:
                self._move_mark(self.i)
                self.mark -= self.i
            self.dropped += self.i
            self.buf = self.buf[self.i:]
            self.i = 0

    def peek(self) -> str:
        """The next non-whitespace character ('' at the end of the file), without consuming it."""
        if self.i < len(self.buf) and (c := self.buf[self.i]) not in " \t\n\r":
            return c
        while True:
            self.i = _WHITESPACE.match(self.buf, self.i).end()  # type: ignore[union-attr]
            if self.i < len(self.buf):
                return self.buf[self.i]
            if not self.fill():
                return ""

    def where(self, position: int) -> str:
        """'line L column C' of a position in the window. Lines are counted only once a message needs them: the first
        time by reading the file again up to the position, then incrementally from the last position asked for."""
        if self.mark is None or position < self.mark:
            self._locate(position)
        else:
            self._move_mark(position)
        return f"line {self.mark_line} column {self.dropped + position - self.mark_line_start + 1}"

    def _move_mark(self, position: int) -> None:
        if newlines := self.buf.count("\n", self.mark, position):
            self.mark_line += newlines
            self.mark_line_start = self.dropped + self.buf.rfind("\n", self.mark, position) + 1
        self.mark = position

    def _locate(self, position: int) -> None:
        offset = self.dropped + position
        stream, raw = _open_binary(self.path)
        decode = codecs.getincrementaldecoder("utf-8")("surrogateescape").decode
        line, seen, line_start = 1, 0, 0
        with stream, raw:
            while seen < offset and (text := decode(stream.read(_CHUNK), final=False)):
                part = text[:offset - seen]
                if newlines := part.count("\n"):
                    line += newlines
                    line_start = seen + part.rfind("\n") + 1
                seen += len(text)
        self.mark, self.mark_line, self.mark_line_start = position, line, line_start

    def parse(self, cap: int | None) -> tuple[Any, int] | None:
        """Parse the value at the current position: ``(value, end)``, or None when it runs past ``cap`` characters
        (the position is left at its start). Raises the parser's ValueError/RecursionError and :class:`_Broken`."""
        start = self.i
        size = _CHUNK
        while True:
            try:
                value, end = _decoder.raw_decode(self.buf, start)
            except json.JSONDecodeError as e:
                truncated = e.msg.startswith("Unterminated string") or e.pos >= len(self.buf) - 64
                if self.eof or not truncated:
                    raise _Broken(f"{e.msg} at {self.where(e.pos)}", e.pos) from None
            else:
                if end < len(self.buf) or self.eof:  # a number or literal at the end of the window may go on
                    return value, end
            if cap is not None and len(self.buf) - start > cap:
                return None
            self.fill(size)
            size *= 2

    def skip(self) -> int:
        """End of the value at the current position, found without building it (for rows that are refused)."""
        start = self.i
        if self.buf[start] not in '[{"':
            while (m := _SCALAR.match(self.buf, start)).end() == len(self.buf) and self.fill():  # type: ignore[union-attr]
                pass
            return m.end()  # type: ignore[union-attr]
        depth, at, size = 0, start, _CHUNK
        while True:
            # Brackets between two strings are counted in bulk; a stretch with enough closing brackets to end the
            # value is walked run of brackets by run.
            buf = self.buf
            quote = buf.find('"', at)
            end = quote if quote >= 0 else len(buf)
            closes = buf.count("]", at, end) + buf.count("}", at, end)
            if closes and closes >= depth:
                for run in _BRACKET_RUN.finditer(buf, at, end):
                    length = run.end() - run.start()
                    if buf[run.start()] in "[{":
                        depth += length
                    elif depth <= length:
                        return run.start() + depth
                    else:
                        depth -= length
            else:
                depth += buf.count("[", at, end) + buf.count("{", at, end) - closes
            if quote < 0:
                at = len(self.buf)
                if not self.fill(size):
                    raise _Broken(f"the value at {self.where(start)} never ends", start)
                size *= 2
                continue
            while (tail := _STRING_TAIL.match(self.buf, quote + 1)) is None:
                if not self.fill(size):
                    raise _Broken(f"the string at {self.where(quote)} never ends", quote)
                size *= 2
            at = tail.end()
            if depth == 0:
                return at

    def row(self, cap: int) -> Any:
        """The row at the current position, or a RowError for a row that cannot be used; moves past it."""
        if len(self.buf) - self.i < _CHUNK // 4:
            self.fill()  # a row cut by the end of the window costs a failed parse (and json counting its lines)
        start = self.i
        try:
            parsed = self.parse(cap)
        except (ValueError, RecursionError) as e:  # a huge integer or deep nesting: skip the row, keep the file
            self.i = self.skip()
            return _parse_error(e)
        if parsed is None:
            self.i = self.skip()
            return _too_large(self.i - start, cap, "characters")
        value, end = parsed
        self.i = end
        if end - start > cap:
            return _too_large(end - start, cap, "characters")
        if self.dirty and _BAD_BYTE.search(self.buf, start, end):
            return RowError("bad-utf8", f"invalid UTF-8 in the row at {self.where(start)}")
        if type(value) is dict or type(value) is list:
            if _shape(value) & (_DEEP | _SURROGATE):
                return _json_problem(value) or value
        elif type(value) is str and _LONE_SURROGATE.search(value):
            return _json_problem(value) or value
        return value

    def items(self, cap: int) -> Iterator[tuple[int, Any]]:
        """Rows of the array at the current position (which holds '['), then the position after its ']'."""
        self.i += 1
        index = 0
        if self.peek() == "]":
            self.i += 1
            return
        while True:
            index += 1
            try:
                yield index, self.row(cap)
            except _Broken as e:
                yield index, self._broken_row(e)
                raise _Stop from None
            self.forget_consumed()
            c = self.peek()
            if c == ",":
                self.i += 1
                self.peek()
            elif c == "]":
                self.i += 1
                return
            else:
                found = f"{c!r}" if c else "the end of the file"
                yield index + 1, self._broken_row(_Broken(f"expected ',' or ']' after row {index}, found {found} at "
                                                          f"{self.where(self.i)}", self.i))
                raise _Stop

    def _broken_row(self, e: _Broken) -> RowError:
        hint = " (a byte that is not UTF-8)" if _BAD_BYTE.match(self.buf, e.position) else ""
        return RowError("malformed-json", f"malformed JSON: {e}{hint}; the rest of the file was not read")


class _Stop(Exception):
    """The document ended early (already reported as a row)."""


def _rows_of_json_document(doc: Any, path: Path, columns: dict[str, str]) -> list[Any]:
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict):
        values = list(doc.values())
        if (values and all(isinstance(v, list) for v in values) and len({len(v) for v in values}) == 1
                and not any(isinstance(x, dict) for v in values for x in v)):
            keys = list(doc)  # column-oriented {"instruction": [...], "output": [...]}
            return [dict(zip(keys, row)) for row in zip(*values)]
        if detect_format(doc, columns) is not None:  # one row: {"messages": [...]} is a conversation, not a list of rows
            return [doc]
        row_lists = [k for k, v in doc.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
        if len(row_lists) > 1:
            raise DataError(f"{path}: holds several arrays of rows ({', '.join(map(repr, row_lists))}); "
                            "write one file per split")
        if row_lists:  # {"data": [...]}, {"version": 1, "data": [...]}
            return doc[row_lists[0]]
        if values and all(isinstance(v, dict) for v in values):  # {"id1": {...}, "id2": {...}}
            return values
        return [doc]
    raise DataError(f"{path}: a .json file must hold an array of rows or an object of rows, not {type(doc).__name__}")


def _document_rows(value: Any, path: Path, opts: ReadOptions, *, whole: bool) -> Iterator[tuple[int, Any]]:
    """Rows of a document read whole, with the checks rows of a streamed array get. ``whole``: the document is over
    the row cap, so each row is measured."""
    for index, row in enumerate(_rows_of_json_document(value, path, opts.columns), start=1):
        problem = _json_problem(row) if type(row) is not dict or _shape(row) & (_DEEP | _SURROGATE) else None
        if problem is None and whole and (size := len(json.dumps(row, ensure_ascii=False))) > opts.max_row_bytes:
            problem = _too_large(size, opts.max_row_bytes, "characters")
        yield index, problem or row


def _read_json(path: Path, pos: _Position, opts: ReadOptions) -> Iterator[tuple[int, Any]]:
    """A ``.json`` file: an array of rows or ``{"key": [rows]}`` (both streamed row by row), JSON Lines under a
    ``.json`` name (streamed), or another object layout (read whole: id-keyed or column-oriented rows)."""
    cap = opts.max_row_bytes
    doc = _JsonText(path, pos)
    try:
        doc.fill()
        if doc.buf.startswith("\ufeff"):
            doc.i = 1
        first = doc.peek()
        if first == "[":
            yield from doc.items(cap)
            _check_end(doc)
        elif first == "{":
            yield from _read_json_object(doc, path, pos, opts)
        elif first == "":
            yield 0, RowError("empty-file", "the file holds no JSON")
        else:
            yield 0, RowError("malformed-json", f"a .json file must hold an array or an object, found {first!r} "
                                                f"at {doc.where(doc.i)}")
    except _Stop:
        return
    except _Broken as e:
        yield 0, doc._broken_row(e)
    finally:
        doc.close()


def _check_end(doc: _JsonText) -> None:
    if doc.peek():
        raise _Broken(f"extra data after the end of the document at {doc.where(doc.i)}", doc.i)


def _read_json_object(doc: _JsonText, path: Path, pos: _Position, opts: ReadOptions) -> Iterator[tuple[int, Any]]:
    cap = opts.max_row_bytes
    start = doc.i
    keyed = _ROWS_KEY.match(doc.buf, start)  # {"data": [{...}, ...], ...}: rows streamed one by one
    if keyed is not None and detect_format({json.loads(keyed.group(1)): None}, opts.columns) is None:
        doc.i = keyed.start(2)
        yield from doc.items(cap)
        _finish_keyed_object(doc, path, json.loads(keyed.group(1)))
        return
    try:
        parsed = doc.parse(cap)
    except (ValueError, RecursionError) as e:
        yield 1, _parse_error(e)
        return
    whole = parsed is None  # larger than one row: a layout that can only be read whole (id-keyed, column-oriented)
    value, doc.i = doc.parse(None) if whole else parsed  # type: ignore[misc]
    if doc.peek():  # more values follow: JSON Lines under a .json name
        doc.close()
        yield from _read_jsonl(path, pos, opts)
        return
    yield from _document_rows(value, path, opts, whole=whole)


def _finish_keyed_object(doc: _JsonText, path: Path, rows_key: str) -> None:
    """After the streamed rows: the object's other keys are metadata, unless they hold rows too."""
    while doc.peek() == ",":
        doc.i += 1
        doc.peek()
        key, doc.i = doc.parse(None)  # type: ignore[misc]
        if doc.peek() != ":":
            raise _Broken(f"expected ':' at {doc.where(doc.i)}", doc.i)
        doc.i += 1
        doc.peek()
        value, doc.i = doc.parse(None)  # type: ignore[misc]
        if isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
            raise DataError(f"{path}: holds several arrays of rows ({rows_key!r}, {key!r}); write one file per split")
    if doc.peek() != "}":
        raise _Broken(f"expected ',' or '}}' at {doc.where(doc.i)}", doc.i)
    doc.i += 1
    _check_end(doc)


# -- CSV ------------------------------------------------------------------------------------------------------------


_LONE_CR = re.compile(r"\r(?!\n)")
_AFTER_LONE_CR = re.compile(r"(?<=\r)(?!\n)")


class _CsvLines:
    """Physical lines of a CSV file for csv.reader, watching each record as it is read.

    csv.reader frames records (a quoted field may span lines) and parses them; this feeds it one line at a time and
    notes, per record, a byte that is not UTF-8 and whether the record went over the row cap. Past the cap only the
    record's structure is fed (quotes, commas, line ends; every other run of characters as one 'x'), so csv.reader
    still finds where the record ends while memory stays bounded.
    """

    _CONTENT = re.compile(r'[^",\r\n]+')

    def __init__(self, stream: Any, raw: Any, pos: _Position, cap: int):
        self.readline, self.tell, self.pos, self.cap = stream.readline, raw.tell, pos, cap
        self.first = True
        self.exhausted = False
        self.pending: list[str] = []
        self.new_record()

    def new_record(self) -> None:
        self.size = 0
        self.bad_utf8 = False

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self.pending:
            return self.pending.pop()
        data = self.readline(self.cap + 1)
        if not data:
            self.exhausted = True
            raise StopIteration
        self.size += len(data)
        if self.size > self.cap:  # the record is over the cap: feed only its structure from here on
            text = self._structure(data)
            while data[-1] != 10 and (data := self.readline(_CHUNK)):
                self.size += len(data)
                text += self._structure(data)
        else:
            try:
                text = data.decode("utf-8-sig" if self.first else "utf-8")
            except UnicodeDecodeError:
                self.bad_utf8 = True
                text = data.decode("utf-8", "surrogateescape")  # keeps the structure; the record is refused
        self.first = False
        self.pos.done = self.tell()
        if "\r" in text and _LONE_CR.search(text):  # lines ended by a lone CR, as csv's universal newlines reads them
            lines = [line for line in _AFTER_LONE_CR.split(text) if line]
            self.pending = lines[:0:-1]
            return lines[0]
        return text

    def _structure(self, data: bytes) -> str:
        return self._CONTENT.sub("x", data.decode("utf-8", "surrogateescape"))


def _read_csv(path: Path, pos: _Position, opts: ReadOptions) -> Iterator[tuple[int, Any]]:
    cap = opts.max_row_bytes
    # csv's own field limit (131,072 characters, process-wide) would stop a long but legitimate field; rows are
    # capped by max_row_bytes instead, so raise csv's limit to at least that.
    if csv.field_size_limit() < cap + _CHUNK:
        csv.field_size_limit(cap + _CHUNK)
    stream, raw = _open_binary(path)
    with stream, raw:
        lines = _CsvLines(stream, raw, pos, cap)
        reader = csv.reader(lines)
        header: list[str] | None = None
        while True:
            start = reader.line_num + 1
            lines.new_record()
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield start, RowError("malformed-csv", f"malformed CSV: {e}")
                continue
            end = reader.line_num
            if not fields:
                continue  # a blank line
            problem = None
            if lines.exhausted:
                problem = RowError("malformed-csv", f"a quoted field opened in the record at line {start} never "
                                                    f"closes (the file ends at line {end})")
            elif lines.size > cap:
                problem = _too_large(lines.size, cap)
            elif lines.bad_utf8:
                problem = RowError("bad-utf8", f"invalid UTF-8 in the record (lines {start}-{end})"
                                   if end > start else "invalid UTF-8 in the record")
            if header is None:
                if problem is not None:
                    yield start, RowError("bad-csv-header", f"{problem.detail}; the file cannot be read without a header")
                    return
                header = fields
                continue
            if problem is None and len(fields) != len(header):
                problem = RowError("csv-field-count", f"the row has {len(fields)} fields, the header {len(header)}")
            yield start, problem if problem is not None else dict(zip(header, fields))


# -- Parquet and datasets -------------------------------------------------------------------------------------------


def _arrow_rows(batch: Any, first_row: int, cap: int) -> Iterator[tuple[int, Any]]:
    """Rows of one Arrow record batch, refusing rows over ``cap`` bytes and rows that cannot be converted."""
    try:
        rows: list[Any] | None = batch.to_pylist() if batch.nbytes <= cap else None
    except Exception:  # noqa: BLE001 - e.g. a string that is not UTF-8: convert row by row to find it
        rows = None
    if rows is not None:
        yield from enumerate(rows, start=first_row)
        return
    for i in range(batch.num_rows):
        one = batch.slice(i, 1)
        if one.nbytes > cap:
            yield first_row + i, _too_large(one.nbytes, cap)
            continue
        try:
            yield first_row + i, one.to_pylist()[0]
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad values
            yield first_row + i, RowError("bad-value", f"unreadable value: {type(e).__name__}: {e}")


def _read_parquet(path: Path, pos: _Position, opts: ReadOptions) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a corrupt file
        yield 0, RowError("unreadable-file", f"not a readable Parquet file: {e}")
        return
    size = path.stat().st_size
    total = max(parquet.metadata.num_rows, 1)
    first = 1
    for group in range(parquet.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        row = first
        try:
            for batch in parquet.iter_batches(batch_size=2048, row_groups=[group]):
                yield from _arrow_rows(batch, row, opts.max_row_bytes)
                row += batch.num_rows
                pos.done = size * (row - 1) // total
        except Exception as e:  # noqa: BLE001 - a corrupt page or column chunk: skip this row group, read the next
            yield row, RowError("corrupt-parquet", f"row group {group} could not be read ({type(e).__name__}: {e}); "
                                                   f"its rows {row}-{first + rows - 1} were not read")
        first += rows


def _read_hf_dataset(path: Path, pos: _Position, opts: ReadOptions) -> Iterator[tuple[int, Any]]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: dataset has splits {list(ds)}; name one as PATH:SPLIT")
        ds = ds["train"]
    row = 1
    for table in ds.with_format("arrow").iter(batch_size=2048):
        for batch in table.to_batches():
            yield from _arrow_rows(batch, row, opts.max_row_bytes)
            row += batch.num_rows


def _read_hub_dataset(spec: str, pos: _Position, opts: ReadOptions) -> Iterator[tuple[int, Any]]:
    """A hub dataset ``org/name@revision[:split]`` (as :func:`resolve_inputs` pins it), streamed."""
    import datasets

    name_revision, _, split = spec.partition(":")
    name, _, revision = name_revision.partition("@")
    ds = datasets.load_dataset(name, revision=revision or None, split=split or "train", streaming=True)
    yield from enumerate(ds, start=1)


# -- raw text -------------------------------------------------------------------------------------------------------


def _text_cut(buf: bytes, hard_limit: int) -> int:
    """Where to end a part of ``buf``: after the last line break that is followed by a non-space character (so a run
    of blank lines or an indentation is never split); failing that after any line break, or (a single line longer
    than ``hard_limit``) at the last space or the last character boundary. 0: read more first."""
    at = len(buf) - 1
    while (at := buf.rfind(b"\n", 0, at)) >= 0:
        if buf[at + 1] not in b" \t\r\n":
            return at + 1
    if len(buf) < hard_limit:
        return 0
    for separator in (b"\n", b" "):
        if (at := buf.rfind(separator, 0, hard_limit)) > 0:
            return at + 1
    at = min(hard_limit, len(buf) - 1)
    while at > 1 and buf[at] & 0xC0 == 0x80:  # the cut must not fall inside a UTF-8 sequence
        at -= 1
    return at


def _text_parts(path: Path, pos: _Position, opts: ReadOptions) -> Iterator[tuple[int, bytes]]:
    stream, raw = _open_binary(path)
    with stream, raw:
        buf, line = b"", 1
        while True:
            data = stream.read(opts.text_part_bytes)
            pos.done = raw.tell()
            buf += data
            while buf and (not data or len(buf) >= opts.text_part_bytes):
                cut = len(buf) if not data else _text_cut(buf, max(opts.max_row_bytes, opts.text_part_bytes))
                if cut == 0:
                    break
                yield line, buf[:cut]
                line += buf.count(b"\n", 0, cut)
                buf = buf[cut:]
            if not data:
                return


def _read_text(path: Path, pos: _Position, opts: ReadOptions) -> Iterator[tuple[int, Any]]:
    """A raw-text file, one document, read in parts of about ``text_part_bytes`` cut at line boundaries. Each part is
    yielded once the next good part exists, so ``continued`` is exact; a part that is not UTF-8 is reported."""
    held: tuple[int, str] | None = None
    bad: list[tuple[int, RowError]] = []
    for line, data in _text_parts(path, pos, opts):
        try:
            text = data.decode()
        except UnicodeDecodeError as e:
            bad.append((line, _bad_utf8(data, e.start)))
            continue
        if line == 1 and text.startswith("\ufeff"):
            text = text[1:]
        if held is not None:
            yield held[0], TextPart(held[1], True)
        yield from bad
        bad = []
        held = (line, text)
    if held is not None:
        yield held[0], TextPart(held[1], False)
    yield from bad


def reader_for(path: Path) -> Reader:
    """The reader for a file, by its name (``.gz`` allowed); DataError for an unsupported type."""
    name = path.name.lower().removesuffix(".gz")
    for suffix, reader in ((".jsonl", _read_jsonl), (".ndjson", _read_jsonl), (".json", _read_json),
                           (".csv", _read_csv), (".parquet", _read_parquet), (".txt", _read_text)):
        if name.endswith(suffix):
            return reader
    raise DataError(f"{path}: unsupported file type; expected .jsonl, .json, .csv, .parquet or .txt (optionally .gz)")


def input_size(path: str) -> int:
    """Bytes of an input file (0 for directories and hub ids), for progress totals."""
    p = Path(path)
    return p.stat().st_size if p.is_file() else 0
