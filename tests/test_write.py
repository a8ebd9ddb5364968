"""The output directory: paths that would overwrite an input, the lock between builds, recovery after a kill (real
processes killed with SIGKILL, at random points and exactly between the two renames of the swap), files sftdata did
not write, a read-only place and a full disk, and the up-to-date check (shard sizes and hashes, package version,
--report on a no-op build)."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sftdata.build import build
from sftdata.record import DataError
from sftdata.write import OutputClaim, check_output_files, read_manifest

from conftest import REPO, TINY_TOKENIZER

TOK = str(TINY_TOKENIZER)


def write_rows(path: Path, n: int, tag: str = "") -> Path:
    path.write_text("".join(json.dumps({"instruction": f"question {i}{tag}", "output": f"answer {i} " * 5}) + "\n"
                            for i in range(n)))
    return path


def siblings(output: Path) -> list[str]:
    """Hidden entries beside ``output``: staging and moved-aside directories, the lock file of a running build."""
    return sorted(p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}."))


def assert_intact(output: Path) -> dict:
    """The output is complete: every file the manifest records is there with its size and sha256, and it loads."""
    manifest = read_manifest(output)
    assert check_output_files(output, manifest) == []
    rows = sum(pq.read_table(output / f).num_rows for f in manifest["splits"]["train"]["files"])
    assert rows == manifest["counts"]["rows_kept"]
    return manifest


def run_sftdata(args: list[str], *, prelude: str = "", env: dict | None = None, **kwargs) -> subprocess.Popen:
    """Start ``sftdata ARGS`` in a fresh Python process (``prelude`` runs first: a patch that kills or pauses it)."""
    code = f"import sys\n{prelude}\nfrom sftdata.cli import main\nsys.argv = ['sftdata'] + {args!r}\nmain()\n"
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.Popen([sys.executable, "-c", code], env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


# --- paths that would overwrite an input ----------------------------------------------------------------------

def test_report_pointing_at_an_input_is_refused_and_the_input_untouched(tmp_path):
    src = write_rows(tmp_path / "in.jsonl", 3)
    before = src.read_bytes()
    with pytest.raises(DataError, match=r"--report .*in.jsonl is the input .*in.jsonl; it would be overwritten"):
        build([str(src)], output=tmp_path / "out", tokenizer=TOK, report=src)
    evals = write_rows(tmp_path / "eval.jsonl", 1)
    with pytest.raises(DataError, match=r"is the input .*eval.jsonl"):
        build([str(src)], output=tmp_path / "out", tokenizer=TOK, decontaminate=[str(evals)], report=evals)
    os.link(src, tmp_path / "hardlink.jsonl")  # the same file under other names
    (tmp_path / "symlink.jsonl").symlink_to(src)
    for alias in ("hardlink.jsonl", "symlink.jsonl"):
        with pytest.raises(DataError, match=rf"--report .*{alias} is the input .*in.jsonl"):
            build([str(src)], output=tmp_path / "out", tokenizer=TOK, report=tmp_path / alias)
    assert src.read_bytes() == before and not (tmp_path / "out").exists()


def test_output_paths_that_hold_an_input_are_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    inside = write_rows(out / "data.jsonl", 2)
    with pytest.raises(DataError, match=r"input .*out/data.jsonl is inside the output directory .*out, which the build "
                                        "replaces"):
        build([str(inside)], output=out, tokenizer=TOK)
    with pytest.raises(DataError, match="is inside the output directory"):
        build([str(inside)], output=inside, tokenizer=TOK)  # the output is the input itself
    src = write_rows(tmp_path / "in.jsonl", 2)
    with pytest.raises(DataError, match=r"--report .*removed.jsonl is inside the output directory"):
        build([str(src)], output=tmp_path / "o2", tokenizer=TOK, report=tmp_path / "o2" / "removed.jsonl")
    with pytest.raises(DataError, match=r"--report .*: directory .*nowhere does not exist"):
        build([str(src)], output=tmp_path / "o2", tokenizer=TOK, report=tmp_path / "nowhere" / "r.jsonl")
    assert inside.read_text().count("\n") == 2


# --- files sftdata did not write --------------------------------------------------------------------------------

def test_an_output_holding_other_files_stops_the_build_and_nothing_moves(tmp_path):
    src = write_rows(tmp_path / "in.jsonl", 3)
    out = tmp_path / "out"
    build([str(src)], output=out, tokenizer=TOK)
    (out / "notes.txt").write_text("mine")
    (out / "data.jsonl").write_text("{}\n")
    (out / "plots").mkdir()
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    with pytest.raises(DataError) as caught:
        build([str(src)], output=out, tokenizer=TOK, force=True)
    assert str(caught.value) == (f"output {out} holds files sftdata did not write: data.jsonl, notes.txt, plots; the "
                                 "build replaces the whole directory, so move them elsewhere or choose another --output "
                                 "(nothing was changed)")
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before
    assert siblings(out) == []


def test_a_directory_sftdata_did_not_write_is_refused_naming_its_files(tmp_path):
    src = write_rows(tmp_path / "in.jsonl", 1)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("x")
    with pytest.raises(DataError, match=r"is not an sftdata output directory \(it holds thesis.tex\)"):
        build([str(src)], output=precious, tokenizer=TOK)
    assert (precious / "thesis.tex").read_text() == "x"


# --- the lock: one build per output -----------------------------------------------------------------------------

def test_a_second_build_of_a_locked_output_fails_naming_the_holder(tmp_path):
    src = write_rows(tmp_path / "in.jsonl", 2)
    out = tmp_path / "out"
    with OutputClaim(out):
        with pytest.raises(DataError, match=rf"output .*out is being built by pid {os.getpid()} on .*; wait for that "
                                            "build to finish or choose another --output"):
            build([str(src)], output=out, tokenizer=TOK)
    assert_intact(build([str(src)], output=out, tokenizer=TOK).output)  # released: the next build runs


def test_two_concurrent_build_processes_one_output_one_clear_error(tmp_path):
    # Build A pauses (before closing its shards) until the test opens a gate; build B starts meanwhile.
    src_a, src_b = write_rows(tmp_path / "a.jsonl", 50, "a"), write_rows(tmp_path / "b.jsonl", 50, "b")
    out, gate, ready = tmp_path / "out", tmp_path / "gate", tmp_path / "ready"
    pause = (f"import time, pathlib, sftdata.write as w\n_close = w.ShardWriter.close\n"
             f"def close(self):\n    pathlib.Path({str(ready)!r}).touch()\n"
             f"    while not pathlib.Path({str(gate)!r}).exists(): time.sleep(0.05)\n    _close(self)\n"
             f"w.ShardWriter.close = close")
    a = run_sftdata(["build", str(src_a), "-o", str(out), "--tokenizer", TOK, "-q"], prelude=pause)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert a.poll() is None and time.monotonic() < deadline, a.communicate()
            time.sleep(0.05)
        b = run_sftdata(["build", str(src_b), "-o", str(out), "--tokenizer", TOK, "-q"])
        _, b_err = b.communicate(timeout=120)
        assert b.returncode == 1
        assert len(b_err.splitlines()) == 1
        assert re.fullmatch(re.escape(f"error: output {out} is being built by pid {a.pid} on {socket.gethostname()}, "
                                      "started ") + r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
                            + re.escape(f": sftdata build {src_a} -o {out} --tokenizer {TOK} -q; wait for that build "
                                        "to finish or choose another --output"), b_err.strip()), b_err
    finally:
        gate.touch()
        _, a_err = a.communicate(timeout=120)
    assert a.returncode == 0, a_err
    manifest = assert_intact(out)
    assert [i["path"] for i in manifest["inputs"]] == [str(src_a)] and manifest["counts"]["rows_kept"] == 50
    assert siblings(out) == []


# --- kills ------------------------------------------------------------------------------------------------------

KILL_BETWEEN_RENAMES = """
import os, signal, pathlib
_rename = pathlib.Path.rename
def rename(self, target):
    if ".tmp-" in self.name:  # the second rename of the swap: the old output is already moved aside
        os.kill(os.getpid(), signal.SIGKILL)
    return _rename(self, target)
pathlib.Path.rename = rename
"""


def test_kill_between_the_two_renames_then_the_previous_output_comes_back(tmp_path):
    out = tmp_path / "out"
    first = build([str(write_rows(tmp_path / "in.jsonl", 5))], output=out, tokenizer=TOK).manifest
    src2 = write_rows(tmp_path / "in2.jsonl", 7)
    killed = run_sftdata(["build", str(src2), "-o", str(out), "--tokenizer", TOK, "-q"], prelude=KILL_BETWEEN_RENAMES)
    killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL
    # The window: no output, the previous one moved aside, the finished new one still staged (and the lock file of
    # the dead build, which the kernel unlocked).
    assert not out.exists()
    assert siblings(out) == [".out.lock", f".out.old-{killed.pid}", f".out.tmp-{killed.pid}"]
    # Any reader puts the previous output back and clears what the killed build left.
    assert read_manifest(out)["fingerprint"] == first["fingerprint"]
    assert assert_intact(out)["created"] == first["created"]
    assert siblings(out) == []


def test_a_build_restores_a_moved_aside_output_and_cleans_stale_siblings(tmp_path):
    out = tmp_path / "out"
    src = write_rows(tmp_path / "in.jsonl", 4)
    first = build([str(src)], output=out, tokenizer=TOK).manifest
    out.rename(tmp_path / ".out.old-4000001")  # as a build killed between the renames leaves it
    (tmp_path / ".out.tmp-4000002").mkdir()  # staging of a build killed while writing
    (tmp_path / ".out.tmp-4000002" / "train-00000.parquet").write_bytes(b"PAR1")
    again = build([str(src)], output=out, tokenizer=TOK)
    assert again.up_to_date and again.manifest["created"] == first["created"]
    assert siblings(out) == []


def test_a_reader_waits_for_a_live_build_in_its_swap_and_a_failed_swap_rolls_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = build([str(write_rows(tmp_path / "in.jsonl", 3))], output=out, tokenizer=TOK).manifest
    with OutputClaim(out) as claim:  # a live build, between its two renames
        out.rename(tmp_path / f".out.old-{os.getpid()}")
        with pytest.raises(DataError, match=rf"^{out} is being replaced by a running build \(pid {os.getpid()} on "):
            read_manifest(out)
        (tmp_path / f".out.old-{os.getpid()}").rename(out)
        staged = claim.stage()
        (staged / "manifest.json").write_text("{}")
        rename = Path.rename

        def failing(self, target):
            if self == staged:
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            return rename(self, target)

        monkeypatch.setattr(Path, "rename", failing)
        with pytest.raises(OSError):
            claim.commit(staged)
        monkeypatch.undo()
        assert out.is_dir() and not (tmp_path / f".out.old-{os.getpid()}").exists()  # rolled back at once
    assert assert_intact(out)["created"] == first["created"]


@pytest.mark.slow
def test_kill_9_at_random_points_leaves_a_complete_output(tmp_path):
    """SIGKILL builds at random moments of their data phase (reading, writing shards, packing, the swap): the output
    is always the previous build or the new one, complete and loadable, and nothing is left beside it."""
    rng = random.Random(14)
    out = tmp_path / "out"
    inputs = [write_rows(tmp_path / f"in{k}.jsonl", 1500, str(k)) for k in range(2)]
    options = ["-o", str(out), "--tokenizer", TOK, "--max-length", "48", "--pack", "-q"]
    assert run_sftdata(["build", str(inputs[0]), *options]).wait(timeout=300) == 0
    manifest = read_manifest(out)
    data_seconds = manifest["seconds"] - manifest["seconds_setup"]
    current = manifest["fingerprint"]
    for attempt in range(3):
        src = inputs[(attempt + 1) % 2]
        proc = run_sftdata(["build", str(src), *options])
        staging = tmp_path / f".out.tmp-{proc.pid}"
        while not staging.exists() and proc.poll() is None:  # setup (imports, tokenizer, preflight) is not the point
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 1.2) * data_seconds)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=300)
        manifest = assert_intact(out)  # restores a moved-aside output when the kill fell between the renames
        if manifest["fingerprint"] != current:  # the kill came after the swap: the new build, complete
            assert [i["path"] for i in manifest["inputs"]] == [str(src)]
        current = manifest["fingerprint"]
        with OutputClaim(out):  # what the next build does first: clear what the killed one left
            pass
        assert siblings(out) == []


# --- read-only place, full disk ---------------------------------------------------------------------------------

def _without_permission_override() -> None:
    """In the child, before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, so that a
    process running as root obeys permission bits like any user (root ignores them otherwise)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_read_only_parent_is_one_line(tmp_path):
    src = write_rows(tmp_path / "in.jsonl", 2)
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    try:
        as_user = {"preexec_fn": _without_permission_override} if os.geteuid() == 0 else {}
        proc = run_sftdata(["build", str(src), "-o", str(readonly / "out"), "--tokenizer", TOK, "-q"], **as_user)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, err
        assert err.splitlines() == [f"error: cannot write {readonly}/.out.lock (permission denied); nothing was replaced: "
                                    "choose an --output in a directory you can write to"]
        assert list(readonly.iterdir()) == []
    finally:
        readonly.chmod(0o755)


def test_full_disk_is_one_line_and_the_previous_output_stays(tmp_path, monkeypatch):
    import pyarrow.parquet

    src = write_rows(tmp_path / "in.jsonl", 4)
    out = tmp_path / "out"
    first = build([str(src)], output=out, tokenizer=TOK).manifest

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(pyarrow.parquet.ParquetWriter, "write_table", full_disk)
    with pytest.raises(DataError) as caught:
        build([str(src)], output=out, tokenizer=TOK, force=True)
    assert str(caught.value) == (f"no space left on the device while writing {out}; nothing was replaced: free some "
                                 "space or choose an --output on another disk")
    assert assert_intact(out)["created"] == first["created"] and siblings(out) == []


def test_permission_error_on_an_input_is_not_reported_as_an_output_error(tmp_path):
    from sftdata.write import describe_write_error

    error = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "in.jsonl"))
    assert describe_write_error(error, tmp_path / "out") is None
    staged = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / ".out.tmp-7" / "train-00000.parquet"))
    assert describe_write_error(staged, tmp_path / "out", written=[str(tmp_path / ".out.")]) == (
        f"cannot write {tmp_path}/.out.tmp-7/train-00000.parquet (permission denied); nothing was replaced: choose an "
        "--output in a directory you can write to")


# --- the up-to-date check ---------------------------------------------------------------------------------------

def test_a_deleted_or_truncated_shard_is_not_up_to_date(tmp_path):
    src = write_rows(tmp_path / "in.jsonl", 6)
    out = tmp_path / "out"
    manifest = build([str(src)], output=out, tokenizer=TOK).manifest
    shard = out / "train" / "train-00000.parquet"
    assert manifest["files"]["train/train-00000.parquet"] == {"bytes": shard.stat().st_size,
                                                        "sha256": __import__("sftdata.write").write.file_sha256(shard)}
    assert set(manifest["files"]) == {"train/train-00000.parquet", "problems.jsonl", "removed.jsonl"}
    assert build([str(src)], output=out, tokenizer=TOK).up_to_date
    shard.unlink()
    assert check_output_files(out, manifest) == ["train/train-00000.parquet is missing"]
    rebuilt = build([str(src)], output=out, tokenizer=TOK)
    assert not rebuilt.up_to_date and assert_intact(out)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    assert check_output_files(out, rebuilt.manifest) == [
        f"train/train-00000.parquet has {len(data) // 2:,} bytes, the manifest says {len(data):,}"]
    assert not build([str(src)], output=out, tokenizer=TOK).up_to_date
    flipped = bytearray(shard.read_bytes())
    flipped[len(flipped) // 2] ^= 1  # same size, other content
    shard.write_bytes(bytes(flipped))
    assert not build([str(src)], output=out, tokenizer=TOK).up_to_date
    assert assert_intact(out)


def test_the_package_version_is_in_the_fingerprint(tmp_path, monkeypatch):
    build_module = sys.modules["sftdata.build"]  # the package's `sftdata.build` attribute is the function
    src = write_rows(tmp_path / "in.jsonl", 2)
    out = tmp_path / "out"
    first = build([str(src)], output=out, tokenizer=TOK).manifest
    monkeypatch.setattr(build_module, "__version__", "99.0.0")
    upgraded = build([str(src)], output=out, tokenizer=TOK)
    assert not upgraded.up_to_date and upgraded.manifest["fingerprint"] != first["fingerprint"]


def test_report_on_an_up_to_date_build_is_written_from_the_output(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"instruction": q, "output": "4"}) + "\n" for q in ("2+2?", "2+2?", "3+1?")))
    out = tmp_path / "out"
    report = tmp_path / "removed.jsonl"
    build([str(src)], output=out, tokenizer=TOK, dedup=True, report=report)
    first = report.read_text()
    assert [json.loads(line)["row"] for line in first.splitlines()] == [2]
    report.unlink()
    again = build([str(src)], output=out, tokenizer=TOK, dedup=True, report=report)
    assert again.up_to_date and report.read_text() == first == (out / "removed.jsonl").read_text()
