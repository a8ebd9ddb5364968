"""Write: Parquet shards and ``manifest.json``, made in a staging directory and swapped into place.

An interrupted build leaves the previous output (or nothing) at ``DIR``, never a half-written one; two builds of
one output cannot run at once; files sftdata did not write are never replaced (see :class:`OutputClaim`).
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from sftdata.record import DataError

try:
    import fcntl
except ImportError:  # Windows: builds of one output are not locked against each other there
    fcntl = None

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


class ShardWriter:
    """Writes shard ``index`` of a split, ``{split}-{index:05d}.parquet``, one row group per table written; a shard
    with no row still gets its file, so loaders see the split and its schema."""

    def __init__(self, directory: Path, split: str, index: int, schema: pa.Schema = UNPACKED_SCHEMA):
        self.name = f"{split}-{index:05d}.parquet"
        self._writer = pq.ParquetWriter(Path(directory) / self.name, schema, compression="zstd")

    def write_table(self, table: pa.Table) -> None:
        if table.num_rows:
            self._writer.write_table(table)

    def close(self) -> None:
        self._writer.close()


def shard_ranges(rows: int, shard_rows: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each shard of a split of ``rows`` rows, ``shard_rows`` rows each but the last (an empty
    split has one empty shard)."""
    return [(start, min(start + shard_rows, rows)) for start in range(0, rows, shard_rows)] or [(0, 0)]


def chunk_ranges(start: int, stop: int, chunk_rows: int) -> list[tuple[int, int]]:
    """The row groups of the shard ``[start, stop)`` of a split: a cut at every multiple of ``chunk_rows`` counted from
    the split's first row, and at the shard's ends. A pure function of the shard, so a shard is byte-identical
    whoever writes it (the local loop or a Ray task)."""
    cuts = [start, *range((start // chunk_rows + 1) * chunk_rows, stop, chunk_rows), stop]
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def write_shard(directory: Path, split: str, index: int, pieces: Iterable[pa.Table],
                schema: pa.Schema = UNPACKED_SCHEMA) -> str:
    """Write shard ``index`` of a split (``{split}-{index:05d}.parquet``), one row group per piece; its file name."""
    writer = ShardWriter(Path(directory), split, index, schema=schema)
    try:
        for piece in pieces:
            writer.write_table(piece)
    finally:
        writer.close()
    return writer.name


def is_sftdata_output(directory: Path) -> bool:
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("format", "").startswith("sftdata/")
    except (OSError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------------------------
# The output directory of one build: path checks, a lock, recovery of an interrupted swap, staging and the swap.
#
# A build writes everything into a staging sibling ``.NAME.tmp-PID`` and swaps it in with two renames
# (``NAME → .NAME.old-PID``, ``.NAME.tmp-PID → NAME``). A kill between them leaves no ``NAME``; the next build, show,
# stats or read_manifest puts the previous output back from ``.NAME.old-PID``. Every build holds an flock on
# ``.NAME.lock`` from start to end (and removes the file when done), so whoever holds that lock knows that every other
# ``.NAME.tmp-*``/``.old-*`` is left over from a killed build (the kernel drops a killed process's lock) and removes it.
# ----------------------------------------------------------------------------------------------------------------

OWN_FILES = (MANIFEST, "problems.jsonl", "removed.jsonl")


class OutputLocked(DataError):
    """Another build holds the output's lock."""


def _sibling(output: Path, kind: str, pid: int | str = "*") -> Path:
    return output.with_name(f".{output.name}.{kind}-{pid}")


def _siblings(output: Path, kind: str) -> list[Path]:
    return sorted(output.parent.glob(glob.escape(f".{output.name}.{kind}-") + "*"))


def lock_path(output: str | Path) -> Path:
    """The lock file a build of ``output`` holds: ``.NAME.lock`` beside it, removed when the build ends."""
    output = Path(output).resolve()
    return output.with_name(f".{output.name}.lock")


def refuse_overwriting_inputs(option: str, path: str | Path, inputs: Iterable[str | Path]) -> None:
    """Raise :class:`DataError` when output file ``path`` (given as ``option``, e.g. ``--report``) is one of
    ``inputs``, by resolved path or as the same file under another name (a hard or symbolic link)."""
    target = Path(path)
    for source in (Path(p) for p in inputs):
        if not source.exists():  # a hub id
            continue
        same = target.resolve() == source.resolve() or (target.exists() and os.path.samefile(target, source))
        if same:
            raise DataError(f"{option} {path} is the input {source}; it would be overwritten: choose another file")


def check_output_paths(output: str | Path, *, inputs: Iterable[str | Path], report: str | Path | None = None) -> None:
    """Refuse output paths that would overwrite an input: the output directory holding (or being) an input, or
    ``report`` being an input or lying inside the output directory (which the build replaces). Pure path checks."""
    inputs = list(inputs)
    out = Path(output).resolve()
    for path in (Path(p) for p in inputs):
        resolved = path.resolve()
        if path.exists() and (resolved == out or out in resolved.parents):
            raise DataError(f"input {path} is inside the output directory {out}, which the build replaces; "
                            "choose another --output")
    if report is None:
        return
    refuse_overwriting_inputs("--report", report, inputs)
    resolved = Path(report).resolve()
    if resolved == out or out in resolved.parents:
        raise DataError(f"--report {report} is inside the output directory {out}, which the build replaces (it holds "
                        "removed.jsonl already); write the report elsewhere")
    if not resolved.parent.is_dir():
        raise DataError(f"--report {report}: directory {resolved.parent} does not exist")


def output_files(directory: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file of a finished output (the manifest excepted), as the manifest records them."""
    return {f.relative_to(directory).as_posix(): {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
            for f in sorted(directory.rglob("*")) if f.is_file() and f.name != MANIFEST}


def check_output_files(directory: str | Path, manifest: dict[str, Any], *, hashes: bool = True) -> list[str]:
    """What differs between ``directory`` and the files its manifest records (missing, other size, other sha256);
    empty when the output is intact. A manifest without a file list (an older sftdata) counts as not intact."""
    files = manifest.get("files")
    if not isinstance(files, dict):
        return ["the manifest records no file sizes and hashes (written by an older sftdata)"]
    problems = []
    for name, expected in files.items():
        path = Path(directory) / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != expected.get("bytes"):
            problems.append(f"{name} has {path.stat().st_size:,} bytes, the manifest says {expected.get('bytes'):,}")
        elif hashes and file_sha256(path) != expected.get("sha256"):
            problems.append(f"{name} changed since it was written (sha256 differs)")
    return problems


def foreign_files(directory: Path, manifest: dict[str, Any]) -> list[str]:
    """Entries of an sftdata output directory that sftdata did not write (a user's notes, an input file)."""
    own = set(OWN_FILES) | set(manifest.get("files") or {})
    for info in (manifest.get("splits") or {}).values():
        own.update(info.get("files") or [])
    own_dirs = {Path(name).parts[0] for name in own if len(Path(name).parts) > 1}  # split directories
    strangers = []
    for p in sorted(directory.rglob("*")):
        name = p.relative_to(directory).as_posix()
        if (name not in own_dirs) if p.is_dir() else (name not in own):
            strangers.append(name)
    return strangers


def _is_complete(directory: Path) -> bool:
    """A finished output: its manifest and every file it records, at the recorded size (hashes are not read)."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if "files" not in manifest:  # written by an older sftdata: its shards must at least be there
        return all((directory / f).is_file() for info in (manifest.get("splits") or {}).values()
                   for f in info.get("files") or [])
    return not check_output_files(directory, manifest, hashes=False)


def _holder(lock: Path) -> str:
    try:
        info = json.loads(lock.read_text(encoding="utf-8"))
        return f"pid {info['pid']} on {info['host']}, started {info['started']}: {info['command']}"
    except (OSError, ValueError, KeyError):
        return "another process"


def describe_write_error(error: OSError, output: str | Path, *, written: Iterable[str | Path] = ()) -> str | None:
    """One line for an error writing the output (full disk, read-only or unwritable place); None for any other error,
    including a permission error on a path that is neither ``output`` nor one of ``written`` (an input, say)."""
    output = Path(output)
    text = str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in text:
        return (f"no space left on the device while writing {output}; nothing was replaced: free some space or "
                "choose an --output on another disk")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        roots = [str(Path(p).resolve()) for p in (output, *written)]
        where = str(error.filename) if error.filename else next((r for r in roots if r in text), None)
        if where is None or not any(_within(str(Path(where).resolve()), r) for r in roots):
            return None
        reason = "read-only file system" if error.errno == errno.EROFS else "permission denied"
        return f"cannot write {where} ({reason}); nothing was replaced: choose an --output in a directory you can write to"
    return None


def _within(path: str, root: str) -> bool:
    """``path`` is ``root`` or below it; a root ending in ``.`` (``/dir/.NAME.``) is a name prefix."""
    return path == root or path.startswith(root if root.endswith(".") else root + os.sep)


def _existing_parent(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


class OutputClaim:
    """Exclusive use of one output directory for one build.

    ``acquire()`` takes the lock (a second build of the same output fails naming the holder), puts back an output
    that a killed build left moved aside, removes what killed builds left behind, and refuses an output that holds
    files sftdata did not write. ``stage()`` gives the staging directory; ``commit()`` swaps it in.
    """

    def __init__(self, output: str | Path):
        self.output = Path(output).resolve()
        self.lock = lock_path(self.output)
        self._fd: int | None = None

    def __enter__(self) -> "OutputClaim":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self, *, check_contents: bool = True) -> "OutputClaim":
        output = self.output
        if output.exists() and not output.is_dir():
            raise DataError(f"output {output} exists and is not a directory")
        while self._fd is None:
            try:
                output.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                message = describe_write_error(e, output, written=[self.lock, _existing_parent(output)])
                raise DataError(message or f"cannot create {self.lock}: {e.strerror}") from None
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputLocked(f"output {output} is being built by {_holder(self.lock)}; wait for that build to "
                                   "finish or choose another --output") from None
            # The holder before us removes the file when it finishes: we may have locked a file that is no longer
            # at that path, which locks nothing. Keep the lock only if the path still names the file we locked.
            try:
                current = os.stat(self.lock)
                same = (current.st_ino, current.st_dev) == (os.fstat(fd).st_ino, os.fstat(fd).st_dev)
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
            else:
                os.close(fd)
        try:
            command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"
            info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                    "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(self._fd, 0)
            os.write(self._fd, json.dumps(info).encode())
            recover_locked(output)
            if check_contents:
                self._check_contents()
        except BaseException as e:
            self.release()
            if isinstance(e, OSError) and (message := self.describe_error(e)) is not None:
                raise DataError(message) from None
            raise
        return self

    def _check_contents(self) -> None:
        output = self.output
        if not output.is_dir() or not any(output.iterdir()):
            return
        if not is_sftdata_output(output):
            names = sorted(p.name for p in output.iterdir())
            raise DataError(f"output {output} exists and is not an sftdata output directory (it holds "
                            f"{_listing(names)}); refusing to replace it: choose another --output")
        strangers = foreign_files(output, json.loads((output / MANIFEST).read_text(encoding="utf-8")))
        if strangers:
            raise DataError(f"output {output} holds files sftdata did not write: {_listing(strangers)}; the build "
                            "replaces the whole directory, so move them elsewhere or choose another --output "
                            "(nothing was changed)")

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.unlink(self.lock)  # while still holding it, so nobody locks a file that is about to go
            except OSError:
                pass
            if fcntl is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def describe_error(self, error: OSError, *, report: str | Path | None = None) -> str | None:
        """:func:`describe_write_error` for this output, its staging siblings and ``report``."""
        siblings = str(self.output.with_name(f".{self.output.name}."))  # .NAME.tmp-PID, .NAME.old-PID, .NAME.lock
        return describe_write_error(error, self.output, written=[siblings] + ([report] if report else []))

    def stage(self) -> Path:
        """A fresh staging directory beside the output (same file system, so the swap is a rename)."""
        tmp = _sibling(self.output, "tmp", os.getpid())
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        return tmp

    def commit(self, tmp: Path) -> None:
        """Replace the output by ``tmp``: move the old one aside, move the new one in, then delete the old one.

        A kill between the two renames leaves the old output at ``.NAME.old-PID``; :func:`recover_locked` (run by
        the next build, show, stats or read_manifest) moves it back."""
        output = self.output
        old = None
        if output.exists():
            old = _sibling(output, "old", os.getpid())
            shutil.rmtree(old, ignore_errors=True)
            output.rename(old)
        try:
            tmp.rename(output)
        except BaseException:
            if old is not None and not output.exists():
                old.rename(output)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _listing(names: list[str], most: int = 8) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def recover_locked(output: Path) -> Path | None:
    """With the output's lock held: put back an output that a killed build moved aside (``.NAME.old-PID``) when
    ``NAME`` is missing, and remove every other staging or moved-aside sibling (their builds are gone: a live
    build would hold the lock). Returns the directory restored from, if any."""
    restored = None
    if not output.exists():
        candidates = sorted(_siblings(output, "old"), key=lambda p: p.stat().st_mtime, reverse=True)
        restored = next((c for c in candidates if _is_complete(c)), None)
        if restored is not None:
            restored.rename(output)
    for stale in _siblings(output, "tmp") + _siblings(output, "old"):
        shutil.rmtree(stale, ignore_errors=True)
    return restored


def restore_interrupted(output: str | Path) -> bool:
    """Put back an output that a killed build left moved aside; True when one was restored. Used by readers
    (show, stats, read_manifest) when the output directory is missing."""
    output = Path(output).resolve()
    if output.exists() or not _siblings(output, "old"):
        return False
    claim = OutputClaim(output)
    try:
        claim.acquire(check_contents=False)
    except OutputLocked:
        raise DataError(f"{output} is being replaced by a running build ({_holder(claim.lock)}); try again when it "
                        "has finished") from None
    except DataError:  # cannot even create the lock file: nothing can be moved back either
        return False
    claim.release()
    return output.exists()


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    path = directory / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Load ``DIR/manifest.json`` (putting back an output a killed build left moved aside); a clear error when DIR
    is not an sftdata output."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        if not Path(directory).exists() and not restore_interrupted(directory):
            raise DataError(f"{directory} does not exist: build it first (`sftdata build FILE --output {directory}`)")
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
