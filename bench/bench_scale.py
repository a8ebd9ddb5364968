"""Scale benchmark: rows/s per core of a build and of its dedup, local engine vs Ray engine, and Ray's scheduling
overhead, side by side in one run on this machine (the figures docs/scale.md plans 100M conversations with).

Corpus: the real rows of ../shared/data (GSM8K train, CodeAlpaca, GPTeacher x3, ShareGPT) plus planted near-duplicate
families (bench_dedup.plant), written as 8 JSONL shards of OpenAI ``messages`` rows; template chatml, the qwen3
tokenizer, max_length 2048.

  build        ``sftdata.build`` without dedup: read → render/tokenize with exact masks → truncate → split →
               write. Time = the manifest's data seconds (setup, i.e. tokenizer load and preflight, excluded).
  dedup        the same build with ``dedup: {}`` minus the build without: what dedup adds to a build (sketching
               on the workers, the group-bys and joins, the clustering).
  local        engine local, in-process: one core.
  ray          engine ray on a local Ray with --cpus CPUs (started once, before the timings): rows/s per core is
               rows/s divided by the CPUs.
  overhead     Ray Data on the same Ray: an identity ``map_batches`` over N one-row batches (task pool, and actor
               pool as the engine runs it): seconds per dataset and milliseconds per batch.

    python bench/bench_scale.py            # about 4 minutes on a 2-core machine
    python bench/bench_scale.py --quick    # a third of the corpus

On a shared 2-core machine the absolute figures are noise; the per-core ratios are what to quote.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_dedup import load_corpus, plant, write_corpus  # noqa: E402

from sftdata.build import build  # noqa: E402

TOKENIZER = ROOT.parent / "shared" / "tokenizers" / "qwen3"


def write_shards(records, directory: Path, shards: int = 8) -> None:
    directory.mkdir()
    size = -(-len(records) // shards)
    for i in range(shards):
        write_corpus(records[i * size:(i + 1) * size], directory / f"part-{i:02d}.jsonl")


def timed_build(data: Path, output: Path, **options) -> tuple[float, dict]:
    manifest = build([str(data)], template="chatml", tokenizer=str(TOKENIZER), output=output, max_length=2048,
                     max_skipped_fraction=1, force=True, **options).manifest
    return manifest["seconds"] - manifest["seconds_setup"], manifest


def overhead(ray, batches: int) -> dict[str, float]:
    import numpy as np
    from ray.data import ActorPoolStrategy

    class Identity:
        def __call__(self, batch):
            return batch

    out = {}
    for label, kwargs in (("tasks", {}), ("actors", {"compute": ActorPoolStrategy(min_size=1, max_size=2)})):
        fn = Identity if kwargs else (lambda batch: batch)
        for n in (1, batches):
            ds = ray.data.from_items([{"x": np.int64(i)} for i in range(n)], override_num_blocks=n)
            started = time.perf_counter()
            rows = ds.map_batches(fn, batch_size=1, **kwargs).count()
            assert rows == n
            out[f"{label}:{n}"] = time.perf_counter() - started
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a third of the corpus")
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray (default: all)")
    args = ap.parse_args()
    clean = load_corpus()
    if args.quick:
        clean = clean[::3]
    records = clean + [p[0] for p in plant(clean, 3000 // (3 if args.quick else 1), seed=2)]
    import ray

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        data = tmp / "data"
        write_shards(records, data)
        n = len(records)
        print(f"corpus: {n:,} rows in 8 JSONL shards; Ray: {args.cpus} CPUs on this machine")
        times: dict[str, float] = {}
        times["local build"], local = timed_build(data, tmp / "a")
        times["local build+dedup"], local_dedup = timed_build(data, tmp / "b", dedup={})
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
                 object_store_memory=512 * 1024 * 1024)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            build([str(data / "part-00.jsonl")], template="chatml", tokenizer=str(TOKENIZER), output=tmp / "warm", engine="ray",
                  max_skipped_fraction=1)  # workers' first start (imports) out of the timings
            times["ray build"], remote = timed_build(data, tmp / "c", engine="ray")
            times["ray build+dedup"], remote_dedup = timed_build(data, tmp / "d", engine="ray", dedup={})
            costs = overhead(ray, 200)
        finally:
            ray.shutdown()
        for a, b in ((local, remote), (local_dedup, remote_dedup)):
            assert a["counts"] == b["counts"] and a["splits"] == b["splits"], "the engines disagree"
        dedup_stats = local_dedup["cleaning"]["dedup"]
        kept = local["counts"]["rows_kept"]
        print(f"rows read {n:,}, examples {kept:,}; dedup removed {dedup_stats['removed']}, "
              f"{dedup_stats['band_collisions']:,} band collisions, {dedup_stats['candidate_pairs']:,} candidates")
        print()
        print(f"{'phase':8} {'engine':7} {'cores':>5} {'seconds':>8} {'rows/s':>8} {'rows/s/core':>12} {'per core vs local':>18}")
        rows = {}
        for phase, local_s, ray_s in (("build", times["local build"], times["ray build"]),
                                      ("dedup", times["local build+dedup"] - times["local build"],
                                       times["ray build+dedup"] - times["ray build"])):
            for engine, seconds, cores in (("local", local_s, 1), ("ray", ray_s, args.cpus)):
                rate = n / seconds
                rows[(phase, engine)] = rate / cores
                ratio = rows[(phase, engine)] / rows[(phase, "local")]
                print(f"{phase:8} {engine:7} {cores:5d} {seconds:8.2f} {rate:8,.0f} {rate / cores:12,.0f} {ratio:17.2f}x")
        print()
        print("Ray Data scheduling overhead (identity map_batches, one row per batch):")
        for label in ("tasks", "actors"):
            one, many = costs[f"{label}:1"], costs[f"{label}:200"]
            print(f"  {label:6}: {one:5.2f} s for a 1-batch dataset, {(many - one) / 199 * 1000:6.1f} ms per further batch")
        print(json.dumps({"rows": n, "cpus": args.cpus, "seconds": {k: round(v, 3) for k, v in times.items()},
                          "rows_per_s_per_core": {f"{p}/{e}": round(v, 1) for (p, e), v in rows.items()},
                          "overhead_s": {k: round(v, 3) for k, v in costs.items()}}))


if __name__ == "__main__":
    main()
