"""Scale benchmark: rows/s per core of a build and of its dedup, local engine vs Ray engine, and Ray's scheduling
overhead, side by side in one run on this machine (the figures docs/scale.md plans 100M conversations with).

Corpus: the real rows of ../shared/data (GSM8K train, CodeAlpaca, GPTeacher x3, ShareGPT) plus planted near-duplicate
families (bench_dedup.plant), written as 8 JSONL shards of OpenAI ``messages`` rows; template chatml, the qwen3
tokenizer, max_length 2048.

  build        ``sftdata.build`` without dedup: read → render/tokenize with exact masks → truncate → split →
               write. Time = the manifest's data seconds (setup, i.e. tokenizer load and preflight, excluded).
  dedup        local: ``Deduplicator.add_batch`` over the corpus' records in batches of 1,000, ``finalize``
               (CPU seconds of this process); ray: the build with ``dedup: {}`` minus the build without, i.e. what
               dedup adds to a Ray build (sketching on the workers, the group-bys and joins, the clustering);
               ray-driver: the same with ``ray_dedup: driver`` (sketches on the workers, clustering on the driver).
  local        engine local, in-process: one core (the tokenizer's threads limited to one).
  sizes        every figure at two corpus sizes (all rows, every third row): the marginal rate (rows between
               the sizes / seconds between them) is what more data costs; the intercept is the fixed cost of a
               run (Ray: actor start-up, shuffle stages), which does not grow with the data.
  ray          engine ray on a local Ray with --cpus CPUs (started once, before the timings): rows/s per core is
               rows/s divided by the CPUs.
  overhead     Ray Data on the same Ray: an identity ``map_batches`` over N one-row batches (task pool, and actor
               pool as the engine runs it): seconds per dataset and milliseconds per batch.

    python bench/bench_scale.py            # about 6 minutes on a 2-core machine
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

# one core per process for the tokenizer too (its Rust threads would otherwise make "one core" two): per-core rates
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")

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


def local_dedup_seconds(data: Path) -> float:
    from sftdata.clean import Deduplicator
    from sftdata.ingest import read_records

    batches = list(read_records([str(data)], batch_size=1000))
    dedup = Deduplicator()
    started = time.process_time()
    for batch in batches:
        dedup.add_batch(batch)
    dedup.finalize()
    return time.process_time() - started


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


def measure(records, tmp: Path, label: str) -> tuple[dict[str, float], dict]:
    data = tmp / f"data-{label}"
    write_shards(records, data)
    times: dict[str, float] = {}
    times["local build"], local = timed_build(data, tmp / f"a-{label}")
    times["local dedup"] = local_dedup_seconds(data)
    times["ray build"], remote = timed_build(data, tmp / f"c-{label}", engine="ray")
    times["ray build+dedup"], remote_dedup = timed_build(data, tmp / f"d-{label}", engine="ray", dedup={})
    times["ray dedup"] = times["ray build+dedup"] - times["ray build"]
    times["ray build+dedup on the driver"], _ = timed_build(data, tmp / f"e-{label}", engine="ray", dedup={},
                                                            ray_dedup="driver")
    times["ray-driver dedup"] = times["ray build+dedup on the driver"] - times["ray build"]
    assert local["counts"] == remote["counts"] and local["splits"] == remote["splits"], "the engines disagree"
    return times, remote_dedup["cleaning"]["dedup"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a third of the corpus")
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray (default: all)")
    args = ap.parse_args()
    clean = load_corpus()
    if args.quick:
        clean = clean[::3]
    records = clean + [p[0] for p in plant(clean, 3000 // (3 if args.quick else 1), seed=2)]
    small = records[::3]
    import ray

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             object_store_memory=512 * 1024 * 1024)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        with tempfile.TemporaryDirectory() as tmpdir:
            tmp = Path(tmpdir)
            warm = tmp / "warm.jsonl"
            write_corpus(records[:200], warm)
            build([str(warm)], template="chatml", tokenizer=str(TOKENIZER), output=tmp / "warm", engine="ray",
                  dedup={})  # Ray's first start of the workers (imports) out of the timings
            t_small, _ = measure(small, tmp, "small")
            t_all, stats = measure(records, tmp, "all")
            costs = overhead(ray, 200)
    finally:
        ray.shutdown()
    n_small, n = len(small), len(records)
    print(f"corpus: {n:,} rows (and every third of them, {n_small:,}) in 8 JSONL shards; Ray: {args.cpus} CPUs here")
    print(f"dedup of the {n:,}: removed {stats['removed']}, {stats['band_collisions']:,} band collisions, "
          f"{stats['candidate_pairs']:,} candidates, {stats['verified_pairs']:,} verified")
    print()
    print("time(N) = fixed + N / (rate x cores): rate from the two sizes (marginal), fixed = the intercept")
    print(f"{'phase':6} {'engine':10} {'cores':>5} {'s @' + format(n_small, ','):>10} {'s @' + format(n, ','):>10} "
          f"{'rows/s/core':>12} {'marginal rows/s/core':>21} {'fixed s':>8} {'marginal/core vs local':>23}")
    rates: dict[str, float] = {}
    for phase in ("build", "dedup"):
        for engine, cores in (("local", 1), ("ray", args.cpus)) + ((("ray-driver", args.cpus),) if phase == "dedup"
                                                                    else ()):
            key = f"{engine} {phase}"
            a, b = t_small[key], t_all[key]
            if b - a < 0.1 * b:  # the difference of two timings is within the noise: no marginal rate to quote
                rates[key] = float("nan")
                print(f"{phase:6} {engine:10} {cores:5d} {a:10.2f} {b:10.2f} {n / b / cores:12,.0f} "
                      f"{'(noise)':>21} {'':>8} {'':>23}")
                continue
            marginal = (n - n_small) / (b - a) / cores
            fixed = max(0.0, a - n_small / (marginal * cores))
            rates[key] = marginal
            print(f"{phase:6} {engine:10} {cores:5d} {a:10.2f} {b:10.2f} {n / b / cores:12,.0f} {marginal:21,.0f} "
                  f"{fixed:8.1f} {marginal / rates[f'local {phase}']:22.2f}x")
    print()
    print("Ray Data scheduling overhead (identity map_batches, one row per batch):")
    for label in ("tasks", "actors"):
        one, many = costs[f"{label}:1"], costs[f"{label}:200"]
        print(f"  {label:6}: {one:5.2f} s for a 1-batch dataset, {(many - one) / 199 * 1000:6.1f} ms per further batch")
    print(json.dumps({"rows": [n_small, n], "cpus": args.cpus,
                      "seconds": {"small": {k: round(v, 3) for k, v in t_small.items()},
                                  "all": {k: round(v, 3) for k, v in t_all.items()}},
                      "overhead_s": {k: round(v, 3) for k, v in costs.items()}}))


if __name__ == "__main__":
    main()
