"""Write: Parquet shards and ``manifest.json``, made in a temporary directory and renamed into place atomically.

An interrupted build leaves the previous output (or nothing) at ``DIR``, never a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from sftdata.record import DataError

MANIFEST = "manifest.json"
FORMAT = "sftdata/1"
LABELS_NOTE = "unshifted: labels[i] is the target for input_ids[i]; the model shifts (Hugging Face convention)"
SHARD_ROWS = 200_000

UNPACKED_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("source", pa.string()),
    ("row", pa.int64()),
    ("num_tokens", pa.int32()),
    ("num_trained", pa.int32()),
    ("truncated", pa.bool_()),
    ("kinds", pa.list_(pa.int8())),
])


class SplitWriter:
    """Streams rows of one split into ``{split}-NNNNN.parquet`` shards of at most ``shard_rows`` rows."""

    def __init__(self, directory: Path, split: str, schema: pa.Schema = UNPACKED_SCHEMA, shard_rows: int = SHARD_ROWS):
        self.directory = directory
        self.split = split
        self.schema = schema
        self.shard_rows = shard_rows
        self.files: list[str] = []
        self.rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_shard = 0

    def write_table(self, table: pa.Table) -> None:
        offset = 0
        while offset < table.num_rows:
            if self._writer is None or self._rows_in_shard >= self.shard_rows:
                self._open()
            take = min(table.num_rows - offset, self.shard_rows - self._rows_in_shard)
            self._writer.write_table(table.slice(offset, take))
            self._rows_in_shard += take
            self.rows += take
            offset += take

    def write_rows(self, columns: dict[str, list[Any]]) -> None:
        if columns and len(next(iter(columns.values()))):
            self.write_table(pa.table(columns, schema=self.schema))

    def _open(self) -> None:
        if self._writer is not None:
            self._writer.close()
        name = f"{self.split}-{len(self.files):05d}.parquet"
        self.files.append(name)
        self._writer = pq.ParquetWriter(self.directory / name, self.schema, compression="zstd")
        self._rows_in_shard = 0

    def close(self) -> None:
        if self._writer is None:  # an empty split still gets a file, so loaders see the split and its schema
            self._open()
        self._writer.close()
        self._writer = None


def is_sftdata_output(directory: Path) -> bool:
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("format", "").startswith("sftdata/")
    except (OSError, ValueError):
        return False


def staging_dir(output: Path) -> Path:
    """A fresh temporary directory beside ``output`` (same filesystem, so the final rename is atomic)."""
    output = output.resolve()
    if output.exists() and not output.is_dir():
        raise DataError(f"output {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not is_sftdata_output(output):
        raise DataError(f"output {output} exists and is not an sftdata output directory; refusing to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit_dir(tmp: Path, output: Path) -> None:
    """Replace ``output`` by ``tmp``: rename the old one aside, rename the new one in, then delete the old."""
    output = output.resolve()
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        output.rename(old)
    tmp.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    path = directory / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Load ``DIR/manifest.json``; a clear error when DIR is not an sftdata output."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise DataError(f"{directory} is not an sftdata output directory (no {MANIFEST})")
    return json.loads(path.read_text(encoding="utf-8"))


def split_files(directory: str | Path, split: str | None = None) -> dict[str, list[Path]]:
    """The Parquet files of each split, in order, as listed in the manifest."""
    manifest = read_manifest(directory)
    out = {}
    for name, info in manifest.get("splits", {}).items():
        if split is None or name == split:
            out[name] = [Path(directory) / f for f in info["files"]]
    return out


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint(parts: Iterable[Any]) -> str:
    """sha256 over JSON-serialized parts (input hashes, template, tokenizer, options): the prepared-data cache key."""
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()
