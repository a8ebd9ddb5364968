"""Ingest: read corpora in any common layout and normalize every row into a :class:`~sftdata.record.Record`.

Readers stream ``.jsonl``, ``.json`` (array, or object holding rows), ``.csv``, ``.parquet``, ``.txt`` (raw
text, one document per file), any of them gzip-compressed, saved Hugging Face dataset directories and, for
real users, hub dataset ids. Row formats (Alpaca, OpenAI ``messages``, ShareGPT, prompt/completion, raw text)
are detected per file from the first usable row, or forced with ``format=``.

A bad row never crashes the run and is never dropped silently: it becomes a :class:`Problem` with the file,
the 1-based line/row and the reason, recorded in the caller's :class:`ProblemLog`.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from sftdata.ingest.formats import (
    FORMATS,
    SHAREGPT_ROLES,
    IngestOptions,
    RowError,
    detect_format,
    normalize_row,
    parse_columns,
    validate_conversation,
)
from sftdata.ingest.readers import _Position, _read_hf_dataset, _read_text, _reader_for, input_size
from sftdata.record import DataError, Problem, ProblemLog, Record

__all__ = ["FORMATS", "SHAREGPT_ROLES", "IngestOptions", "ReadStats", "RowError", "detect_format", "input_size",
           "normalize_row", "parse_columns", "read_records", "validate_conversation"]


@dataclass
class ReadStats:
    """Per-file facts for the manifest: detected format, rows seen, and how often each input field was ignored."""

    path: str
    format: str | None = None
    rows: int = 0
    bytes: int = 0
    ignored_fields: Counter[str] = field(default_factory=Counter)



def read_records(
    paths: list[str] | str,
    *,
    format: str | None = None,
    columns: dict[str, str] | str | None = None,
    strip: bool = False,
    system_prompt: str | None = None,
    template_variables: frozenset[str] | set[str] = frozenset(),
    problems: ProblemLog | None = None,
    batch_size: int = 1000,
    stats: list[ReadStats] | None = None,
    on_progress: Callable[[int], None] | None = None,
    keep_raw: bool = False,
) -> Iterator[list[Record]]:
    """Stream records from ``paths`` in batches of ``batch_size``.

    Bad rows are recorded in ``problems`` (file, row, reason) and skipped; with ``ProblemLog(on_error="fail")``
    the first bad row raises :class:`DataError`. ``stats`` (if given) receives one :class:`ReadStats` per file,
    and ``on_progress(bytes)`` is called with the bytes consumed since the previous call. ``keep_raw``: each
    record's ``raw`` is the input row as read (for writers that pass rows through unchanged).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [str(paths)]
    if format is not None and format not in FORMATS:
        raise DataError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    options = IngestOptions(format=format, columns=parse_columns(columns), strip=strip, system_prompt=system_prompt,
                            template_variables=frozenset(template_variables))
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
                    normalized = normalize_row(row, fmt or "text", options)
                except RowError as e:
                    problems.add(Problem(str(path_str), row_number, "ingest", e.kind, e.detail))
                    continue
                file_stats.ignored_fields.update(normalized.ignored)
                batch.append(Record(source=str(path_str), row=row_number, messages=normalized.messages,
                                    text=normalized.text, tools=normalized.tools,
                                    template_kwargs=normalized.template_kwargs, extra=normalized.extra,
                                    raw=row if keep_raw else None))
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
