"""The Ray engine gives the local engine's answer (issue 11): for a recipe with two sources, filters, dedup with planted
near-duplicate families, decontamination and packing, every output file, the dedup keep set and every count of the
manifest are identical between engine local and engine ray — on a local Ray cluster, on a two-node cluster started
with ``ray start``, and when a worker dies mid-build."""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from sftdata.build import build
from sftdata.cli import main
from sftdata.recipe import Recipe, Source

from conftest import REPO, TINY_TOKENIZER, shared_path

ray = pytest.importorskip("ray") if not os.environ.get("CI") else __import__("ray")

OBJECT_STORE = 200 * 1024 * 1024
VOLATILE = ("created", "seconds", "seconds_setup")  # when and how long, not what


# -- the corpus -----------------------------------------------------------------------------------------------------

def _near_copy(text: str, copy: int = 0) -> str:
    """The text with its ``copy + 1``-th word from the end changed (each copy of a family a different word): a change
    near the end of a row touches at most ``copy + 1`` of its 5-gram shingles, so the copy stays a near duplicate."""
    words = text.split(" ")
    words[-1 - copy] = "changed" + words[-1 - copy]
    return " ".join(words)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """Source "math": a directory of two JSONL files (GSM8K rows with planted exact and near-duplicate families,
    leaked GSM8K test rows, bad rows); source "roleplay": GPTeacher rows (a JSON array) with near-duplicate families,
    one of them across the sources; the eval file: GSM8K test rows, five of them leaked."""
    root = tmp_path_factory.mktemp("corpus")
    gsm = [json.loads(line) for line in shared_path("data", "gsm8k_train.jsonl").read_text().splitlines()[:300]]
    test = [json.loads(line) for line in shared_path("data", "gsm8k_test.jsonl").read_text().splitlines()[:40]]
    roleplay = json.loads(shared_path("data", "gpteacher_roleplay.json").read_text())[:200]
    math = root / "math"
    math.mkdir()
    first = [json.dumps(r) for r in gsm[:150]]
    first.insert(10, '{"question": "broken json"')  # an unreadable row
    first.insert(20, json.dumps({"question": "no answer here"}))  # a row missing its answer
    first.append(json.dumps({"question": "Short?", "answer": "No."}))  # too short for the response filter
    (math / "part-0.jsonl").write_text("\n".join(first) + "\n")
    second = [json.dumps(r) for r in gsm[150:]]
    near = 0
    for family in range(12):  # families of 1-3 near copies of an earlier row
        for copy in range(1 + family % 3):
            second.append(json.dumps({**gsm[family * 7], "answer": _near_copy(gsm[family * 7]["answer"], copy)}))
            near += 1
    second += [json.dumps(gsm[3]), json.dumps(gsm[160])]  # exact copies (one across the files, one within)
    second += [json.dumps(t) for t in test[:5]]  # leaked eval rows
    (math / "part-1.jsonl").write_text("\n".join(second) + "\n")
    rows = list(roleplay)
    for family in range(5):
        rows.append({**roleplay[family * 11], "response": _near_copy(roleplay[family * 11]["response"])})
        near += 1
    rows.append({"instruction": gsm[5]["question"], "input": "", "response": _near_copy(gsm[5]["answer"])})
    near += 1
    (root / "roleplay.json").write_text(json.dumps(rows))
    (root / "eval.jsonl").write_text("".join(json.dumps(t) + "\n" for t in test))
    return {"math": str(math), "roleplay": str(root / "roleplay.json"), "eval": str(root / "eval.jsonl"),
            "planted": {"exact-duplicate": 2, "near-duplicate": near, "contaminated": 5}}


def recipe_for(corpus: dict, output: Path, **options) -> Recipe:
    return Recipe(
        sources=[Source(path=corpus["math"], name="math", columns={"instruction": "question", "output": "answer"},
                        weight=0.7),
                 Source(path=corpus["roleplay"], name="roleplay", weight=0.3)],
        tokenizer=str(shared_path("tokenizers", "qwen3")), output=str(output), seed=4, batch_size=64,
        splits={"train": 0.9, "validation": 0.1}, filters={"min_response_chars": 20, "drop_refusals": True},
        dedup={}, decontaminate={"eval": [corpus["eval"]]}, max_length=512, **{"pack": True, **options})


# -- comparing two builds -------------------------------------------------------------------------------------------

def examples(output: Path, split: str) -> Counter:
    """The multiset of (input_ids, labels, source, row) of a split, packed or not."""
    manifest = json.loads((output / "manifest.json").read_text())
    out: Counter = Counter()
    for f in manifest["splits"][split]["files"]:
        for r in pq.read_table(output / f).to_pylist():
            if "seq_lengths" not in r:
                out[(tuple(r["input_ids"]), tuple(r["labels"]), r["source"], r["row"])] += 1
                continue
            start = 0
            for length, source, row in zip(r["seq_lengths"], r["source"], r["row"], strict=True):
                out[(tuple(r["input_ids"][start:start + length]), tuple(r["labels"][start:start + length]), source,
                     row)] += 1
                start += length
    return out


def assert_same_build(local: Path, other: Path) -> dict:
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (local, other))
    assert a["recipe"]["engine"] == "local" and b["recipe"]["engine"] == "ray"
    for m in (a, b):
        for key in VOLATILE:
            m.pop(key)
        for section in ("recipe", "options"):
            for key in ("engine", "ray_address", "ray_dedup", "output"):
                m[section].pop(key)
    assert a == b  # every count, the fingerprint, the dedup summary, the splits, the file hashes
    for split in a["splits"]:
        assert examples(local, split) == examples(other, split)
    for name in ("problems.jsonl", "removed.jsonl"):
        assert (local / name).read_bytes() == (other / name).read_bytes(), name
    return a


# -- the clusters ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory):
    """A two-CPU Ray started by the test; its workers run tests/ray_hooks.py (nothing the driver ships is rebuilt
    in a worker; a crash on demand; the Parquet files they write logged in writers.log beside the crash marker)."""
    marker = tmp_path_factory.mktemp("crash") / "crash-next-batch"
    env = {"SFTDATA_TEST_CRASH_MARKER": str(marker), "SFTDATA_TEST_WRITER_LOG": str(marker.with_name("writers.log")),
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH", "")])}
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=OBJECT_STORE, log_to_driver=False,
             runtime_env={"env_vars": env, "worker_process_setup_hook": "ray_hooks.install"})
    yield marker
    ray.shutdown()


@pytest.fixture(scope="module")
def local_build(corpus, tmp_path_factory):
    output = tmp_path_factory.mktemp("local") / "out"
    build(recipe_for(corpus, output))
    return output


def shards_written_by_workers(local_cluster: Path, output: Path) -> dict[str, set[int]]:
    """The output shards (``split/file``) Ray workers opened for writing during the build of ``output``, each with the
    pids that wrote it (the log is emptied for the next build)."""
    log = local_cluster.with_name("writers.log")
    written: dict[str, set[int]] = {}
    for line in (log.read_text().splitlines() if log.exists() else []):
        pid, path = line.split(" ", 1)
        path = Path(path)
        # a split's shard in the build's staging directory (not a dedup sketch file there)
        if path.parent.parent.name.startswith(f".{output.name}.tmp-") and path.name.startswith(path.parent.name + "-"):
            written.setdefault(f"{path.parent.name}/{path.name}", set()).add(int(pid))
    log.unlink(missing_ok=True)
    return written


def assert_shards_written_by_ray_tasks(local_cluster: Path, output: Path) -> list[str]:
    files = [f for info in json.loads((output / "manifest.json").read_text())["splits"].values() for f in info["files"]]
    written = shards_written_by_workers(local_cluster, output)
    assert sorted(written) == sorted(files)
    assert os.getpid() not in set().union(*written.values())
    return files


def test_ray_build_is_the_local_build(corpus, local_build, local_cluster, tmp_path):
    shards_written_by_workers(local_cluster, tmp_path / "ray")  # forget earlier tests' writes
    build(recipe_for(corpus, tmp_path / "ray", engine="ray"))
    manifest = assert_same_build(local_build, tmp_path / "ray")
    assert assert_shards_written_by_ray_tasks(local_cluster, tmp_path / "ray") == ["train/train-00000.parquet",
                                                                                    "validation/validation-00000.parquet"]
    # the recipe exercises what it claims to: the comparison is not between two empty builds
    counts = manifest["counts"]
    assert counts["skipped"] == {"malformed-json": 1, "missing-field": 1}
    assert counts["removed"]["short-response"] == 1 and counts["removed"]["mixing"] > 0
    planted = corpus["planted"]
    assert manifest["cleaning"]["dedup"]["removed"] == {k: planted[k] for k in ("exact-duplicate", "near-duplicate")}
    assert {k: counts["removed"][k] for k in planted} == planted
    assert counts["rows_read"] == counts["rows_kept"] + counts["skipped_total"] + counts["removed_total"]
    assert {i["source"] for i in manifest["inputs"]} == {"math", "roleplay"} and len(manifest["inputs"]) == 3
    assert set(manifest["splits"]) == {"train", "validation"} and manifest["packing"]["train"]["rows"] > 0


@pytest.mark.parametrize("pack", [True, False])
def test_many_shards_per_split_written_by_ray_tasks_are_the_local_shards(corpus, local_cluster, tmp_path, monkeypatch,
                                                                          pack):
    """Small shards (9 packed rows, 40 examples) fed in chunks that do not divide them (4 packed rows of 512 tokens,
    15 examples): every shard, row group for row group, is the local engine's, and each was written by a Ray task."""
    build_module, pack_module = importlib.import_module("sftdata.build"), importlib.import_module("sftdata.pack")
    monkeypatch.setattr(build_module, "SHARD_ROWS", 40)
    monkeypatch.setattr(build_module, "GATHER_ROWS", 15)
    monkeypatch.setattr(pack_module, "shard_rows_for", lambda max_length: 9)
    monkeypatch.setattr(pack_module, "_CHUNK_TOKENS", 4 * 512)
    build(recipe_for(corpus, tmp_path / "local", pack=pack))
    shards_written_by_workers(local_cluster, tmp_path / "ray")
    build(recipe_for(corpus, tmp_path / "ray", engine="ray", pack=pack))
    manifest = assert_same_build(tmp_path / "local", tmp_path / "ray")
    files = assert_shards_written_by_ray_tasks(local_cluster, tmp_path / "ray")
    train = [f for f in files if f.startswith("train/")]
    assert train == [f"train/train-{k:05d}.parquet" for k in range(len(train))] and len(train) > 3
    per_shard = 9 if pack else 40
    rows = [pq.ParquetFile(tmp_path / "ray" / f).metadata.num_rows for f in train]
    assert rows[:-1] == [per_shard] * (len(train) - 1) and sum(rows) == manifest["splits"]["train"]["rows"]
    groups = [pq.ParquetFile(tmp_path / "ray" / f).metadata.num_row_groups for f in train]
    assert groups[:2] == ([3, 3] if pack else [3, 4])  # rows 0-9: 4+4+1, 9-18: 3+4+2; 0-40: 15+15+10, 40-80: 5+15+15+5


def test_distributed_dedup_decides_what_the_local_dedup_decides(local_cluster, tmp_path):
    """Real rows, exact repeats and chains of near duplicates (A~B, B~C, not A~C: C joins A's cluster through B, and
    its Jaccard with A is computed for a pair that is no edge): the keep set, every removal and every statistic of
    the Ray Data group-bys and joins equal the local Deduplicator's."""
    from sftdata.clean.dedup import Deduplicator, sketch_batch
    from sftdata.clean.dedup_ray import dedup_on_ray, sketch_file, write_sketch
    from sftdata.record import Record

    rows = [json.loads(line) for line in shared_path("data", "gsm8k_train.jsonl").read_text().splitlines()[:400]]
    texts = [r["question"] + " " + r["answer"] for r in rows]
    texts += texts[:30:3]  # exact repeats
    for k in range(8):  # chains of 80 distinct words: B changes word 20 of A, C word 60 of B (J 0.88, 0.88, 0.77)
        a = [f"w{k}x{i}" for i in range(80)]
        b = a[:20] + ["changed"] + a[21:]
        c = b[:60] + ["changed"] + b[61:]
        texts[40 * k + 5:40 * k + 5] = [" ".join(a)]
        texts += [" ".join(b), " ".join(c)]
    records = [Record(source=f"part-{i // 100}", row=i % 100 + 1, text=t) for i, t in enumerate(texts)]
    local, distributed = Deduplicator(), Deduplicator()
    offsets = {}
    for start in range(0, len(records), 64):
        batch = records[start:start + 64]
        local.add_batch(batch)
        file = sketch_file(tmp_path, 0, start)
        offsets[file.name] = distributed.rows_seen
        write_sketch(file, sketch_batch(batch, distributed.config))
        distributed.add_positions([(r.source, r.row) for r in batch])
    local.finalize()
    dedup_on_ray(distributed, tmp_path, offsets, partitions=2)
    assert distributed.summary() == local.summary()
    assert local.summary()["removed"] == {"exact-duplicate": 10, "near-duplicate": 16}
    removals = [(local.removal(i, r), distributed.removal(i, r)) for i, r in enumerate(records)]
    assert all(a == b for a, b in removals)
    linked = [a.matched for a, _ in removals if a is not None and "linked_via" in a.matched]
    assert len(linked) == 8 and all(m["jaccard"] < 0.8 <= m["linked_via"]["jaccard"] for m in linked)


def test_a_worker_killed_mid_build_is_retried_and_the_output_is_the_same(corpus, local_build, local_cluster, tmp_path):
    """Also with ray_dedup: driver (the workers' sketches clustered in-process): the same output again."""
    local_cluster.write_text("")
    build(recipe_for(corpus, tmp_path / "ray", engine="ray", ray_dedup="driver"))
    assert not local_cluster.exists()  # a worker did die
    assert_same_build(local_build, tmp_path / "ray")


def test_on_error_fail_stops_at_the_same_row_as_local(local_cluster, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "x"}) + "\n")
    result = CliRunner().invoke(main, ["build", str(src), "-o", str(tmp_path / "o"), "--on-error", "fail", "-q",
                                       "--tokenizer", str(TINY_TOKENIZER), "--engine", "ray"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{src}:2: [ingest/missing-field] missing field 'output'" in " ".join(result.output.split())
    assert not (tmp_path / "o").exists()


def test_without_ray_the_error_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    result = CliRunner().invoke(main, ["build", str(REPO / "examples" / "data" / "chat.jsonl"), "-q", "--engine", "ray",
                                       "--tokenizer", str(TINY_TOKENIZER), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "engine ray needs Ray: pip install 'sftdata[ray]'" in result.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_cluster_started_with_ray_start(corpus, local_build, local_cluster, tmp_path):
    """`ray start --head` and a second `ray start --address` (two raylets on this machine); the build connects with
    ray_address, as `sftdata build --engine ray --ray-address HOST:PORT` does."""
    ray.shutdown()  # leaves the module's local cluster: this test runs last
    port = _free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    ray_bin = Path(sys.executable).with_name("ray")
    common = ["--num-cpus=1", "--disable-usage-stats", f"--object-store-memory={OBJECT_STORE}"]
    session = None
    try:
        subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                        "--include-dashboard=false", *common], env=env, check=True, capture_output=True, timeout=120)
        session = Path(os.path.realpath("/tmp/ray/session_latest")).name  # both nodes' processes name it
        subprocess.run([ray_bin, "start", f"--address={address}", "--node-ip-address=127.0.0.1", *common], env=env,
                       check=True, capture_output=True, timeout=120)
        ray.init(address=address, log_to_driver=False)  # the build uses this connection (and leaves it open)
        nodes = [n for n in ray.nodes() if n["Alive"]]
        assert len(nodes) == 2 and ray.cluster_resources()["CPU"] == 2
        build(recipe_for(corpus, tmp_path / "ray", engine="ray", ray_address=address))
        assert_same_build(local_build, tmp_path / "ray")
    finally:
        ray.shutdown()
        _stop_cluster(session, port)


def _stop_cluster(session: str | None, port: int) -> None:
    """Stop the processes of the cluster this test started, by id (`ray stop` would stop every Ray on the machine)."""
    import psutil  # a Ray dependency

    if session:
        ours = [p for p in psutil.process_iter(["cmdline"]) if session in " ".join(p.info["cmdline"] or [])]
        for p in ours:
            p.terminate()
        _, alive = psutil.wait_procs(ours, timeout=20)
        for p in alive:
            p.kill()
    current = Path("/tmp/ray/ray_current_cluster")  # what `ray start --head` registers for `address="auto"`
    if current.is_file() and current.read_text().strip().endswith(f":{port}"):
        current.unlink()
