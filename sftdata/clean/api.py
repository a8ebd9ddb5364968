"""File-to-file Python API behind ``sftdata dedup`` and ``sftdata decontaminate``."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable

from sftdata.clean.dedup import Deduplicator
from sftdata.clean.decontaminate import Decontaminator
from sftdata.clean.io import RowWriter, record_row
from sftdata.record import ProblemLog, Removal


def _read(inputs, *, format, columns, problems, batch_size, progress):
    from sftdata.ingest import read_records  # imported late: ingest is optional for the in-memory stages

    return read_records(list(inputs), format=format, columns=columns, problems=problems, batch_size=batch_size,
                        on_progress=progress)


class _Report:
    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.file = None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "w", encoding="utf-8")

    def write(self, removals: Iterable[Removal]) -> None:
        if self.file is not None:
            for r in removals:
                self.file.write(json.dumps(r.to_dict(), ensure_ascii=False, default=str) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _filter_to_file(kind: str, stage: Any, batches: Iterable[list], problems: ProblemLog, output, report) -> dict[str, Any]:
    """Run ``stage.filter_batch`` over ``batches``: kept rows to ``output``, removals to ``report``; the summary."""
    writer = RowWriter(output)
    rep = _Report(report)
    removed: Counter = Counter()
    rows_read = rows_kept = 0
    try:
        for batch in batches:
            kept, gone = stage.filter_batch(batch)
            rows_read += len(batch)
            rows_kept += len(kept)
            writer.write(record_row(r) for r in kept)
            rep.write(gone)
            removed.update(r.reason for r in gone)
    except BaseException:
        writer.abort()
        raise
    finally:
        rep.close()
    writer.close()
    return {
        "command": kind,
        "rows_read": rows_read,
        "rows_kept": rows_kept,
        "removed": dict(sorted(removed.items())),
        "skipped": problems.to_dict()["by_kind"],
        "problems": problems.to_dict()["examples"],
        "output": str(output),
        "report": str(report) if report else None,
        "cleaning": stage.summary(),
    }


def dedup(
    inputs: list[str] | str,
    output: str | Path,
    *,
    report: str | Path | None = None,
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
    """Remove exact and near duplicates from ``inputs`` and write the kept rows to ``output``.

    Reads the inputs twice (pass 1 sketches, pass 2 filters); memory holds per-row integers and LSH band keys.
    Returns a JSON-able summary (counts by reason, the stage's settings and statistics)."""
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    dd = Deduplicator(exact=exact, near=near, threshold=threshold, num_perm=num_perm, ngram=ngram,
                      normalize=normalize, seed=seed)
    problems = ProblemLog(on_error)
    for batch in _read(inputs, format=format, columns=columns, problems=problems, batch_size=batch_size,
                       progress=progress):
        dd.add_batch(batch)
    dd.finalize()
    # pass 2 reads again with a throwaway log: bad rows were already reported in pass 1
    batches = _read(inputs, format=format, columns=columns, problems=ProblemLog("skip"), batch_size=batch_size,
                    progress=progress)
    return _filter_to_file("dedup", dd, batches, problems, output, report)


def decontaminate(
    inputs: list[str] | str,
    output: str | Path,
    *,
    eval_paths: list[str],
    fields: Iterable[str] | str | None = None,
    report: str | Path | None = None,
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
    """Remove rows of ``inputs`` that overlap the eval sets ``eval_paths``; write the kept rows to ``output``."""
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    dc = Decontaminator(list(eval_paths), fields=fields, ngram=ngram, min_overlap=min_overlap, rephrase=rephrase,
                        rephrase_threshold=rephrase_threshold, normalize=normalize)
    problems = ProblemLog(on_error)
    batches = _read(inputs, format=format, columns=columns, problems=problems, batch_size=batch_size,
                    progress=progress)
    return _filter_to_file("decontaminate", dc, batches, problems, output, report)
