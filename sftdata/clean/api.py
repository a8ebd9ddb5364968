"""File-to-file Python API behind ``sftdata dedup`` and ``sftdata decontaminate``.

Both commands write every kept row as the input row as it was read, in input order: a JSON-lines row byte for
byte, any other row with all its fields (Parquet output keeps the inputs' column types when every input is Parquet
with one schema). Beside the output, a provenance file (JSONL) gives for line ``i`` of it the ``source`` file and
``row`` of output row ``i``, so every kept row can be traced back; the optional report lists every removed row with
its reason, what it matched and the input row itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable

from sftdata.clean.decontaminate import Decontaminator
from sftdata.clean.dedup import Deduplicator
from sftdata.clean.io import JsonlFile, RowWriter, default_provenance_path, is_jsonl, jsonl_lines, parquet_schema, \
    report_row
from sftdata.record import DataError, ProblemLog, Record, Removal


def _read(inputs, *, format, columns, problems, batch_size, progress, keep_raw=False):
    from sftdata.ingest import read_records  # imported late: ingest is optional for the in-memory stages

    return read_records(list(inputs), format=format, columns=columns, problems=problems, batch_size=batch_size,
                        on_progress=progress, keep_raw=keep_raw)


class _Outputs:
    """The files a cleaning command writes: kept rows, their provenance and (optionally) the report of removed rows.
    Each is written under a temporary name and renamed into place only when the whole run succeeds."""

    def __init__(self, inputs: list[str], output: str | Path, report: str | Path | None,
                 provenance: str | Path | None):
        self.output = Path(output)
        self.provenance_path = Path(provenance) if provenance else default_provenance_path(output)
        self.report_path = Path(report) if report else None
        targets = [self.output, self.provenance_path] + ([self.report_path] if self.report_path else [])
        sources = {Path(p).resolve() for p in inputs}
        for target in targets:
            if target.resolve() in sources:
                raise DataError(f"{target}: this is also an input file; write the output to another path")
        if len(set(t.resolve() for t in targets)) < len(targets):
            raise DataError(f"output, provenance and report must be different files: {[str(t) for t in targets]}")
        self.rows = RowWriter(self.output, schema=parquet_schema(inputs))
        self.provenance = JsonlFile(self.provenance_path)
        self.report = JsonlFile(self.report_path) if self.report_path else None

    def keep(self, records: list[Record]) -> None:
        self.rows.write(r.raw for r in records)
        self.provenance.write({"source": r.source, "row": r.row} for r in records)

    def keep_lines(self, source: str, rows: list[int], lines: list[bytes]) -> None:
        self.rows.write_lines(lines)
        head = b'{"source": ' + json.dumps(source, ensure_ascii=False).encode("utf-8", "surrogatepass") + b', "row": '
        self.provenance.write_lines(head + str(row).encode() + b"}" for row in rows)

    def remove(self, removals: Iterable[Removal]) -> None:
        if self.report is not None:
            self.report.write(report_row(r) for r in removals)

    def __enter__(self) -> "_Outputs":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        files = [self.rows, self.provenance] + ([self.report] if self.report else [])
        try:
            if kind is None:
                for f in files:  # the rows first: closing them is what can still fail (a Parquet schema)
                    f.close()
                return
        except BaseException:
            for f in files:
                f.abort()
            raise
        for f in files:
            f.abort()


def _summary(kind: str, rows_read: int, rows_kept: int, removed: dict[str, int], problems: ProblemLog,
             out: _Outputs, stage: Any) -> dict[str, Any]:
    return {
        "command": kind,
        "rows_read": rows_read,
        "rows_kept": rows_kept,
        "removed": {k: v for k, v in sorted(removed.items()) if v},
        "skipped": problems.to_dict()["by_kind"],
        "problems": problems.to_dict()["examples"],
        "output": str(out.output),
        "provenance": str(out.provenance_path),
        "report": str(out.report_path) if out.report_path else None,
        "cleaning": stage.summary(),
    }


def dedup(
    inputs: list[str] | str,
    output: str | Path,
    *,
    report: str | Path | None = None,
    provenance: str | Path | None = None,
    format: str | None = None,
    columns: dict[str, str] | str | None = None,
    exact: bool = True,
    near: bool = True,
    threshold: float = 0.8,
    num_perm: int = 128,
    ngram: int = 5,
    normalize: Any = None,
    seed: int = 1,
    batch_size: int = 1000,
    on_error: str = "skip",
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Remove exact and near duplicates from ``inputs``; write the kept rows, unchanged, to ``output``.

    The inputs are parsed once (sketching); the kept rows are then copied from the inputs (JSON lines byte for byte;
    other formats are read again). ``provenance`` (default ``OUTPUT-STEM.provenance.jsonl``): the source and row of
    every output row. Returns a JSON-able summary (counts by reason, the stage's settings and statistics)."""
    inputs = [str(inputs)] if isinstance(inputs, (str, Path)) else [str(p) for p in inputs]
    dd = Deduplicator(exact=exact, near=near, threshold=threshold, num_perm=num_perm, ngram=ngram,
                      normalize=normalize, seed=seed)
    problems = ProblemLog(on_error)
    with _Outputs(inputs, output, report, provenance) as out:
        for batch in _read(inputs, format=format, columns=columns, problems=problems, batch_size=batch_size,
                           progress=progress):
            dd.add_batch(batch)
        dd.finalize()
        kept = _write_kept(dd, inputs, out, format=format, columns=columns, batch_size=batch_size, progress=progress)
    return _summary("dedup", len(dd.keep_mask()), kept, dd.summary()["removed"], problems, out, dd)


def _write_kept(dd: Deduplicator, inputs: list[str], out: _Outputs, *, format, columns, batch_size, progress) -> int:
    """Copy the rows ``dd`` keeps from ``inputs`` to ``out`` in input order (and report the removed ones)."""
    keep = dd.keep_mask()
    sources, src, rows = dd.positions()
    source_id = {s: i for i, s in enumerate(sources)}
    n, pos, kept = len(keep), 0, 0
    for path in inputs:
        if is_jsonl(path):  # fast path: no parsing, the kept lines as they are
            sid = source_id.get(path, -1)
            keep_rows: list[int] = []
            keep_lines: list[bytes] = []
            done = 0
            for number, line in jsonl_lines(path):
                done += len(line) + 1
                if pos < n and src[pos] == sid and rows[pos] == number:
                    if keep[pos]:
                        keep_rows.append(number)
                        keep_lines.append(line)
                    elif out.report is not None:
                        out.remove([dd.removal(pos, Record(path, number, raw=json.loads(line)))])
                    pos += 1
                if len(keep_lines) >= batch_size:
                    out.keep_lines(path, keep_rows, keep_lines)
                    kept += len(keep_lines)
                    keep_rows, keep_lines = [], []
                if progress is not None and done >= 1 << 20:
                    progress(done)
                    done = 0
            out.keep_lines(path, keep_rows, keep_lines)
            kept += len(keep_lines)
            if progress is not None:
                progress(done)
            continue
        for batch in _read([path], format=format, columns=columns, problems=ProblemLog("skip"),
                           batch_size=batch_size, progress=progress, keep_raw=True):
            kept_records = []
            for rec in batch:
                if not (pos < n and sources[src[pos]] == rec.source and rows[pos] == rec.row):
                    raise DataError(f"{rec.where}: the input changed while it was being deduplicated")
                if keep[pos]:
                    kept_records.append(rec)
                else:
                    out.remove([dd.removal(pos, rec)])
                pos += 1
            out.keep(kept_records)
            kept += len(kept_records)
    if pos != n:
        raise DataError(f"{', '.join(inputs)}: the input changed while it was being deduplicated")
    return kept


def decontaminate(
    inputs: list[str] | str,
    output: str | Path,
    *,
    eval_paths: list[str],
    fields: Iterable[str] | str | None = None,
    report: str | Path | None = None,
    provenance: str | Path | None = None,
    format: str | None = None,
    columns: dict[str, str] | str | None = None,
    ngram: int = 8,
    min_overlap: float = 0.5,
    rephrase: bool = True,
    rephrase_threshold: float = 0.75,
    normalize: Any = None,
    batch_size: int = 1000,
    on_error: str = "skip",
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Remove rows of ``inputs`` that overlap the eval sets ``eval_paths``; write the kept rows, unchanged, to
    ``output`` and their source and row to ``provenance`` (default ``OUTPUT-STEM.provenance.jsonl``)."""
    inputs = [str(inputs)] if isinstance(inputs, (str, Path)) else [str(p) for p in inputs]
    dc = Decontaminator(list(eval_paths), fields=fields, ngram=ngram, min_overlap=min_overlap, rephrase=rephrase,
                        rephrase_threshold=rephrase_threshold, normalize=normalize)
    problems = ProblemLog(on_error)
    rows_read = rows_kept = 0
    with _Outputs(inputs, output, report, provenance) as out:
        for batch in _read(inputs, format=format, columns=columns, problems=problems, batch_size=batch_size,
                           progress=progress, keep_raw=True):
            kept, gone = dc.filter_batch(batch)
            out.keep(kept)
            out.remove(gone)
            rows_read += len(batch)
            rows_kept += len(kept)
    return _summary("decontaminate", rows_read, rows_kept, dc.summary()["removed"], problems, out, dc)
