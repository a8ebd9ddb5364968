"""Ingest: read corpora in any common layout and normalize every row into a :class:`~sftdata.record.Record`.

Inputs (checked up front by :func:`resolve_inputs`): ``.jsonl``, ``.json`` (an array, or an object holding rows),
``.csv``, ``.parquet``, ``.txt`` (raw text, one document per file, read in parts), any of them gzip-compressed; a
directory of such files (read file by file, sorted); a saved Hugging Face dataset directory; a hub dataset id, pinned
to the revision it resolves to. Every reader streams. Row formats (Alpaca, OpenAI ``messages``, ShareGPT,
prompt/completion, raw text) are detected per file over a sample of rows and per row where a file mixes formats, or
forced with ``format=``.

A bad row never crashes the run and is never dropped silently: it becomes a :class:`Problem` with the file, the
1-based line/row and the reason, recorded in the caller's :class:`ProblemLog`.
"""

from __future__ import annotations

import gzip
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from sftdata.ingest.formats import (
    FORMATS,
    SHAREGPT_ROLES,
    IngestOptions,
    RowError,
    detect_file_format,
    detect_format,
    marking_fields,
    normalize_row,
    parse_columns,
    row_format,
    validate_conversation,
)
from sftdata.ingest.readers import (
    DATA_SUFFIXES,
    DEFAULT_MAX_ROW_BYTES,
    TEXT_PART_BYTES,
    ReadOptions,
    TextPart,
    _Position,
    _read_hf_dataset,
    _read_hub_dataset,
    _read_text,
    input_size,
    reader_for,
)
from sftdata.record import DataError, Problem, ProblemLog, Record

__all__ = ["DEFAULT_MAX_ROW_BYTES", "FORMATS", "SHAREGPT_ROLES", "TEXT_PART_BYTES", "IngestOptions", "InputSource",
           "ReadStats", "RowError", "detect_format", "input_size", "normalize_row", "parse_columns", "read_records",
           "resolve_inputs", "validate_conversation"]

SAMPLE_ROWS = 100  # rows a file's format is detected over
BATCH_BYTES = 4 << 20  # a batch is also cut after this many input bytes, so a batch of huge rows stays small


@dataclass
class ReadStats:
    """Per-file facts for the manifest: the file's format (the one most rows are in), rows read, rows normalized per
    format (more than one where the file mixes formats), and how often each input field was ignored."""

    path: str
    format: str | None = None
    rows: int = 0
    bytes: int = 0
    formats: Counter[str] = field(default_factory=Counter)
    ignored_fields: Counter[str] = field(default_factory=Counter)


# -- inputs ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputSource:
    """One input to read: ``path`` is a file, a saved dataset directory (``kind`` "file" / "dataset"), or a hub
    dataset id pinned to the revision it resolved to, ``org/name@<commit>[:split]`` ("hub"), so that the fingerprint of
    the build changes when the dataset does. ``given`` is the argument it came from."""

    path: str
    kind: str
    given: str


_HUB_ID = re.compile(r"(?P<name>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+?))?(?::(?P<split>[\w.-]+))?")
_COMMIT = re.compile(r"[0-9a-f]{40}")


def resolve_inputs(paths: Iterable[str | os.PathLike] | str | os.PathLike) -> list[InputSource]:
    """Expand and check every input before anything is loaded: a file must exist, be readable and be of a known type;
    a directory is a saved dataset or its data files (recursively, sorted, hidden files skipped); anything else must
    be a hub dataset id, which is pinned to its current revision. Raises :class:`DataError` naming the bad input."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    sources: list[InputSource] = []
    for given in map(str, paths):
        path = Path(given)
        if path.is_dir():
            _check_readable(path, given)
            if _is_saved_dataset(path):
                sources.append(InputSource(given, "dataset", given))
                continue
            files = _data_files(path)
            if not files:
                raise DataError(f"{given}: directory holds no data files ({', '.join(DATA_SUFFIXES)}, optionally .gz) "
                                "and is not a saved dataset (Dataset.save_to_disk)")
            for file in files:
                _check_readable(file, str(file))
                sources.append(InputSource(str(file), "file", given))
        elif path.exists():
            if not path.is_file():
                raise DataError(f"{given}: not a regular file")
            reader_for(path)
            _check_readable(path, given)
            sources.append(InputSource(given, "file", given))
        elif (hub := _HUB_ID.fullmatch(given)) and _may_be_hub_id(path):
            revision = _pin_hub_revision(given, hub["name"], hub["revision"])
            split = f":{hub['split']}" if hub["split"] else ""
            sources.append(InputSource(f"{hub['name']}@{revision}{split}", "hub", given))
        else:
            raise DataError(f"{given}: no such file or directory")
    return sources


def _check_readable(path: Path, given: str) -> None:
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise DataError(f"{given}: permission denied")


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _data_files(directory: Path) -> list[Path]:
    """Data files under ``directory`` as ``load_dataset`` would take them: by name, skipping hidden ones."""
    found = []
    for file in directory.rglob("*"):
        parts = file.relative_to(directory).parts
        if any(part.startswith((".", "__")) for part in parts) or not file.is_file():
            continue
        name = file.name.lower().removesuffix(".gz")
        if name.endswith(DATA_SUFFIXES):
            found.append(file)
    return sorted(found, key=lambda f: f.relative_to(directory).as_posix())


def _may_be_hub_id(path: Path) -> bool:
    """A missing local path is not taken for a hub id when it names a data file or sits in an existing directory."""
    return not path.name.lower().removesuffix(".gz").endswith(DATA_SUFFIXES) and not path.parent.is_dir()


def _pin_hub_revision(given: str, name: str, revision: str | None) -> str:
    """The commit a hub dataset (at ``revision``, default the main branch) resolves to: asked of the hub, or read from
    the local cache when offline (``HF_HUB_OFFLINE=1``) or unreachable."""
    if revision and _COMMIT.fullmatch(revision):
        return revision
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    ref = Path(constants.HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}" / "refs" / (revision or "main")
    cached = ref.read_text().strip() if ref.is_file() else None
    if constants.HF_HUB_OFFLINE:
        if cached:
            return cached
        raise DataError(f"{given}: no such file or directory, and hub dataset {name!r} is not in the local cache "
                        "(HF_HUB_OFFLINE is set)")
    try:
        return HfApi().dataset_info(name, revision=revision, timeout=10).sha
    except (RepositoryNotFoundError, RevisionNotFoundError):
        at = f" at revision {revision!r}" if revision else ""
        raise DataError(f"{given}: no such file or directory, and no hub dataset {name!r}{at}") from None
    except Exception as e:  # noqa: BLE001 - no network: the HTTP client raises several types
        if cached:
            return cached
        raise DataError(f"{given}: no such file or directory, and the Hugging Face Hub cannot be reached to look up "
                        f"dataset {name!r} ({type(e).__name__}); check the path, or download the dataset and set "
                        "HF_HUB_OFFLINE=1") from None


# -- reading --------------------------------------------------------------------------------------------------------


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
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
    text_part_bytes: int = TEXT_PART_BYTES,
) -> Iterator[list[Record]]:
    """Stream records from ``paths`` (expanded by :func:`resolve_inputs`) in batches of at most ``batch_size``.

    Bad rows are recorded in ``problems`` (file, row, reason) and skipped; with ``ProblemLog(on_error="fail")`` the
    first bad row raises :class:`DataError`. A row over ``max_row_bytes`` is refused with that reason; a ``.txt`` file
    is read in parts of about ``text_part_bytes`` (``Record.continued`` on all but the last). ``stats`` (if given)
    receives one :class:`ReadStats` per file, and ``on_progress(bytes)`` is called with the bytes consumed since the
    previous call. ``keep_raw``: each record's ``raw`` is the input row as read (for writers that pass rows through
    unchanged).
    """
    if format is not None and format not in FORMATS:
        raise DataError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    options = IngestOptions(format=format, columns=parse_columns(columns), strip=strip, system_prompt=system_prompt,
                            template_variables=frozenset(template_variables))
    opts = ReadOptions(max_row_bytes=max_row_bytes, text_part_bytes=text_part_bytes, columns=options.columns)
    problems = problems if problems is not None else ProblemLog()
    batch: list[Record] = []
    for source in resolve_inputs(paths):
        path_str = source.path
        file_stats = ReadStats(path=path_str)
        if stats is not None:
            stats.append(file_stats)
        if source.kind == "file":
            path: Any = Path(path_str)
            reader = reader_for(path)
            if path.stat().st_size == 0:
                problems.add(Problem(path_str, 0, "ingest", "empty-file", "file is empty"))
                continue
        else:
            path = Path(path_str) if source.kind == "dataset" else path_str
            reader = _read_hf_dataset if source.kind == "dataset" else _read_hub_dataset

        pos = _Position()
        rows: Iterator[tuple[int, Any]] = _stop_at_broken_stream(reader(path, pos, opts), path_str, pos)
        fmt = "text" if reader is _read_text else options.format
        if fmt is None:
            sample = _sample(rows)
            fmt = detect_file_format([row for _, row in sample], options.columns)
            if fmt is None and any(type(row) is dict for _, row in sample):
                fields = sorted({str(key) for _, row in sample if type(row) is dict for key in row})
                raise DataError(
                    f"{path_str}: cannot tell the format from the fields {fields[:8]} (first {SAMPLE_ROWS} rows); "
                    "pass --format, or --columns to map them (e.g. --columns instruction=question,output=answer)"
                )
            rows = chain(sample, rows)
        file_stats.format = fmt  # known from here on (build reads one batch to learn an input's format)
        forced = options.format is not None
        file_key, mapped_key = marking_fields(fmt, options.columns) if fmt is not None else ("", "")
        trainable = fmt in FORMATS  # "preference" is detected only to be refused, and only rows that fully match
        reported = batch_start = 0
        for row_number, row in rows:
            file_stats.rows += 1
            if on_progress is not None and pos.done != reported:
                on_progress(pos.done - reported)
                reported = pos.done
            if type(row) is dict:
                if forced or file_key in row or mapped_key in row:
                    row_fmt = fmt if trainable or detect_format(row, options.columns) == fmt else None
                elif (row_fmt := row_format(row, options.columns)) not in FORMATS and row_fmt is not None:
                    row_fmt = row_fmt if detect_format(row, options.columns) == row_fmt else None
                if row_fmt is None:
                    problems.add(Problem(path_str, row_number, "ingest", "unknown-format",
                                         f"the fields {sorted(map(str, row))[:8]} match no known format"))
                    continue
                try:
                    normalized = normalize_row(row, row_fmt, options)
                except RowError as e:
                    problems.add(Problem(path_str, row_number, "ingest", e.kind, e.detail))
                    continue
                file_stats.formats[row_fmt] += 1
                file_stats.ignored_fields.update(normalized.ignored)
                batch.append(Record(source=path_str, row=row_number, messages=normalized.messages, text=normalized.text,
                                    tools=normalized.tools, template_kwargs=normalized.template_kwargs,
                                    extra=normalized.extra, raw=row if keep_raw else None))
            elif type(row) is TextPart:
                file_stats.formats["text"] += 1
                batch.append(Record(source=path_str, row=row_number, text=row.text, continued=row.continued))
            else:
                error = row if isinstance(row, RowError) else RowError(
                    "wrong-type", f"row must be an object, got {type(row).__name__}")
                problems.add(Problem(path_str, row_number, "ingest", error.kind, error.detail))
                continue
            if len(batch) >= batch_size or pos.done - batch_start >= BATCH_BYTES:
                yield batch
                batch = []
                batch_start = pos.done
        if fmt is None:  # no sampled row had a known format; name the one most rows turned out to have
            file_stats.format = next(iter(file_stats.formats.most_common(1)), (None,))[0]
        file_stats.bytes = input_size(path_str)
        if on_progress is not None and file_stats.bytes > reported:
            on_progress(file_stats.bytes - reported)
        if batch:  # a batch never spans two files: reading one file at a time (a sharded read) gives the same batches
            yield batch
            batch = []


def _sample(rows: Iterator[tuple[int, Any]]) -> list[tuple[int, Any]]:
    """The first rows of a file, up to SAMPLE_ROWS objects (or 100 times as many rows of any kind)."""
    sample: list[tuple[int, Any]] = []
    objects = 0
    for item in rows:
        sample.append(item)
        objects += type(item[1]) is dict
        if objects >= SAMPLE_ROWS or len(sample) >= 100 * SAMPLE_ROWS:
            break
    return sample


def _stop_at_broken_stream(rows: Iterator[tuple[int, Any]], path: str, pos: _Position) -> Iterator[tuple[int, Any]]:
    """Pass rows through; a corrupt or truncated gzip stream becomes one last row that says where the file broke and
    what was not read (reading goes on with the next file). Other read errors stop the run with one line."""
    last = 0
    try:
        for item in rows:
            last = item[0] or last
            yield item
    except (zlib.error, EOFError, gzip.BadGzipFile) as e:
        if isinstance(e, gzip.BadGzipFile) and str(e).startswith(("CRC check failed", "Incorrect length")):
            yield last + 1, RowError("corrupt-gzip", f"the gzip stream fails its integrity check at the end ({e}): "
                                                     "the rows read from this file may hold corrupt data")
            return
        size = input_size(path)
        unread = f"from about compressed byte {pos.done:,} of {size:,}, {1 - pos.done / max(size, 1):.0%} of the file"
        kind = "truncated-gzip" if isinstance(e, EOFError) else "corrupt-gzip"
        what = "ends early" if isinstance(e, EOFError) else "is corrupt"
        yield last + 1, RowError(kind, f"the gzip stream {what} after row {last} ({e}); the rest of the file "
                                       f"({unread}) was not read")
    except OSError as e:
        raise DataError(f"{path}: cannot read file: {e}") from None
