"""Exact and near dedup on a Ray cluster: the steps of :mod:`sftdata.clean.dedup` as Ray Data group-bys and joins.

The workers of phase 1 sketch every batch (:func:`~sftdata.clean.dedup.sketch_batch`) and write the sketch as one
Parquet file per batch (:func:`write_sketch`) into a scratch directory every node can reach (the build's staging
directory); the driver only learns how many rows each file holds, so it can number them in input order. Then
(:func:`dedup_on_ray`):

1. **exact**: a group-by on the 128-bit exact key; each group's rows point at its smallest position;
2. **band group-by and screen**: each row that may be a near duplicate (it has tokens and is the first of its exact
   group) becomes one ``(band, key, position, screen bytes)`` row per band; a group-by on the band key forms every
   pair of a bucket and screens it by its MinHash estimate (:class:`~sftdata.clean.minhash.Screen`) right there, as
   the local engine screens each band's pairs;
3. **candidates**: a group-by on the pair: the distinct pairs that passed the screen;
4. **verify**: the candidates are joined with the shingle sets of both rows and verified by exact Jaccard
   (:func:`~sftdata.clean.pairs.pair_jaccard`);
5. **components**: the verified edges (few: one per near-duplicate link) are gathered by the driver, which labels
   connected components by min-label propagation and fills in the keep set (:meth:`Deduplicator.adopt
   <sftdata.clean.dedup.Deduplicator.adopt>`), exactly as the local engine does with the same functions; the
   Jaccard of a member and its representative that share no edge (chains: few) is computed from the gathered sets
   of those rows.

Group-bys shuffle rows by a coarse partition id and group each partition with numpy (see below).

Every statistic (band collisions, screened out, candidates, verified, rejected) and every decision equals the local
one; ``tests/test_engine_ray.py`` checks it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from sftdata.clean.dedup import BatchSketch, DedupConfig, Deduplicator, exact_first, is_edge
from sftdata.clean.minhash import Screen
from sftdata.clean.pairs import pair_jaccard, set_matrix

__all__ = ["dedup_on_ray", "sketch_file", "write_sketch"]


def sketch_file(directory: str | Path, shard: int, seq: int) -> Path:
    return Path(directory) / f"{shard:08d}-{seq:08d}.parquet"


def write_sketch(path: Path, sketch: BatchSketch) -> int:
    """Write a batch's sketch (rows in input order) atomically: a retried task rewrites the same file."""
    n = len(sketch.exact_keys)
    offsets = pa.array(sketch.set_offsets.astype(np.int32))
    table = pa.table({
        "index": pa.array(np.arange(n, dtype=np.int64)),
        "k0": pa.array(sketch.exact_keys[:, 0]), "k1": pa.array(sketch.exact_keys[:, 1]),
        "tokens": pa.array(sketch.has_tokens),
        "bands": pa.FixedSizeListArray.from_arrays(pa.array(sketch.band_keys.reshape(-1)), sketch.band_keys.shape[1])
        if sketch.band_keys.shape[1] else pa.nulls(n, pa.list_(pa.uint64())),
        "screen": pa.FixedSizeListArray.from_arrays(pa.array(sketch.screen.reshape(-1)), sketch.screen.shape[1])
        if sketch.screen.shape[1] else pa.nulls(n, pa.list_(pa.uint8())),
        "sets": pa.ListArray.from_arrays(offsets, pa.array(sketch.sets)),
    })
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return n


# -- the Ray Data steps (module-level functions: they run on the workers) ---------------------------------------------

def _read_sketches(batch: dict[str, np.ndarray], offsets: dict[str, int]) -> Any:
    """Read sketch files (a task per file), each row numbered with its input position: the file's first position
    plus its index in it. (pyarrow directly: ray.data.read_parquet needs a newer fsspec than some environments
    pin, and a file is one block anyway.)"""
    for path in batch["path"]:
        table = pq.read_table(path)
        start = offsets[os.path.basename(path)]
        yield table.append_column("pos", pa.compute.add(table["index"], start)).drop_columns(["index"])


# The group-bys shuffle rows by a coarse partition id (a hash of the key modulo ``partitions``) and group each whole
# partition with numpy: Ray Data's map_groups calls Python once per group, which for band buckets (one per row and
# band) measured ~1,000 times slower than sorting a partition.

def _partition_of(values: np.ndarray, partitions: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        mixed = values.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return ((mixed >> np.uint64(32)) % np.uint64(partitions)).astype(np.int32)


def _runs(*keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort order over ``keys`` (the last the primary one) and the runs of equal keys: ``(order, start, length)``."""
    order = np.lexsort(keys)
    n = len(order)
    if n == 0:
        return order, np.zeros(0, np.int64), np.zeros(0, np.int64)
    change = np.zeros(n, dtype=bool)
    change[0] = True
    for k in keys[1:]:  # every key but the first (the tie-breaker) defines the groups
        ks = k[order]
        change[1:] |= ks[1:] != ks[:-1]
    start = np.flatnonzero(change)
    return order, start, np.diff(np.append(start, n))


def _exact_partition(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every row of the partition that repeats an earlier row's exact key, with that earliest row (the local
    engine's :func:`~sftdata.clean.dedup.exact_first`, over the partition's rows in input order)."""
    order = np.argsort(group["pos"], kind="stable")
    pos = group["pos"][order]
    first = pos[exact_first(np.stack([group["k0"][order], group["k1"][order]], axis=1))]
    later = pos != first
    return {"pos": pos[later], "first": first[later]}


# Steps that touch the shingle sets work on Arrow batches: list<int64> columns stay flat values + offsets (a numpy
# batch would turn them into one Python object per row).

def _eligible(batch: pa.Table, repeats: np.ndarray) -> pa.Table:
    """Rows that may be near duplicates: with tokens and the first of their exact group."""
    keep = batch["tokens"].to_numpy(zero_copy_only=False) & ~np.isin(batch["pos"].to_numpy(), repeats)
    return batch.filter(pa.array(keep))


def _flat_sets(column: Any) -> tuple[np.ndarray, np.ndarray]:
    """An Arrow list<int64> column as ``(values, offsets)`` for :func:`~sftdata.clean.pairs.set_matrix`."""
    lists = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pa.compute.list_value_length(lists).fill_null(0).to_numpy().astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return pa.compute.list_flatten(lists).to_numpy().astype(np.int64), offsets


def _band_rows(batch: dict[str, np.ndarray], partitions: int) -> dict[str, np.ndarray]:
    """One row per band of each row: the band, its key, the row's position and its screen bytes (carried along so
    that a bucket's pairs are screened where they are formed, instead of joining every band collision)."""
    bands = np.stack(batch["bands"]) if len(batch["bands"]) else np.zeros((0, 0), np.uint64)
    n, b = bands.shape
    key = bands.reshape(-1).astype(np.uint64)
    out = {"band": np.tile(np.arange(b, dtype=np.int16), n), "key": key, "pos": np.repeat(batch["pos"], b),
           "part": _partition_of(key, partitions)}
    if "screen" in batch:
        out["screen"] = np.repeat(np.stack(batch["screen"]), b, axis=0)
    return out


def _bucket_pairs(group: dict[str, np.ndarray], partitions: int, threshold: float,
                  margin: float | None) -> dict[str, np.ndarray]:
    """Every pair ``a < b`` sharing a band bucket, once per bucket (the band group-by, a partition at a time), with
    whether it passes the screen (:meth:`~sftdata.clean.minhash.Screen.pairs`, as the local engine screens each
    band's pairs)."""
    from sftdata.clean.minhash import _pairs_of_runs

    order, start, length = _runs(group["pos"], group["key"], group["band"])
    multi = length > 1
    i, j = _pairs_of_runs(np.arange(len(order)), start[multi], length[multi])  # indices into the sorted rows
    pos = group["pos"][order]
    a, b = pos[i], pos[j]
    if margin is None or not len(a):
        ok = np.ones(len(a), dtype=bool)
    else:
        screen = Screen(np.ascontiguousarray(np.stack(group["screen"])[order], dtype=np.uint8))
        ok = screen.pairs(i, j, threshold=threshold, margin=margin)
    return {"a": a, "b": b, "ok": ok, "part": _partition_of(a * 1_000_003 + b, partitions)}


def _count_pairs(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Distinct pairs of the partition that passed the screen: the candidates."""
    ok = group["ok"]
    a, b = group["a"][ok], group["b"][ok]
    order, start, _ = _runs(np.zeros(len(a), np.int8), b, a)
    return {"a": a[order][start], "b": b[order][start]}


def _jaccard_pairs(batch: pa.Table) -> pa.Table:
    """The exact Jaccard of each pair's two shingle sets (columns ``sets_a``, ``sets_b``), as column ``j``."""
    m = batch.num_rows
    va, oa = _flat_sets(batch["sets_a"])
    vb, ob = _flat_sets(batch["sets_b"])
    sets = set_matrix(np.concatenate([va, vb]), np.concatenate([oa, ob[1:] + oa[-1]]))
    j = pair_jaccard(sets, np.arange(m), np.arange(m, 2 * m)) if m else np.zeros(0)
    return batch.drop_columns(["sets_a", "sets_b"]).append_column("j", pa.array(j, pa.float64()))


def _join_side(pairs: Any, rows: Any, column: str, side: str, partitions: int) -> Any:
    """``pairs`` with ``column`` of row ``side`` (a or b) joined on as ``<column>_<side>``."""
    right = rows.select_columns(["pos", column]).rename_columns({"pos": side, column: f"{column}_{side}"})
    return pairs.join(right, join_type="inner", num_partitions=partitions, on=(side,))


def _numpy(ds: Any, columns: list[str]) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for c in columns:
            parts[c].append(batch[c])
    return {c: np.concatenate(v) if v else np.zeros(0, np.int64) for c, v in parts.items()}


def dedup_on_ray(dedup: Deduplicator, directory: str | Path, offsets: dict[str, int], *, partitions: int = 2) -> None:
    """Run the dedup of the sketches in ``directory`` on the connected Ray cluster and finish ``dedup`` with the
    result (its positions were added with :meth:`~sftdata.clean.dedup.Deduplicator.add_positions`); ``offsets``:
    each sketch file's first input position; ``partitions``: of each group-by and join."""

    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    context = DataContext.get_current()
    saved = context.shuffle_strategy, context.enable_progress_bars
    context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED  # group-bys as tasks (joins hash regardless)
    context.enable_progress_bars = False
    try:
        _dedup_on_ray(dedup, directory, offsets, partitions)
    finally:
        context.shuffle_strategy, context.enable_progress_bars = saved


def _dedup_on_ray(dedup: Deduplicator, directory: str | Path, offsets: dict[str, int], partitions: int) -> None:
    import ray.data as rd

    cfg: DedupConfig = dedup.config
    n = dedup.rows_seen
    stats = {"band_collisions": 0, "screened_out": 0, "candidate_pairs": 0, "verified_pairs": 0, "rejected_pairs": 0}
    first = np.arange(n, dtype=np.int64)
    empty = np.zeros(0, np.int64)
    files = sorted(str(p) for p in Path(directory).glob("*.parquet"))
    if not files:
        dedup.adopt(first, empty, empty, np.zeros(0), None, stats)
        return
    rows = (rd.from_items([{"path": f} for f in files], override_num_blocks=len(files))
            .map_batches(_read_sketches, fn_args=(offsets,), batch_size=1, batch_format="numpy").materialize())
    if cfg.exact:
        keys = rows.select_columns(["pos", "k0", "k1"]).map_batches(
            lambda b: {**b, "part": _partition_of(b["k0"], partitions)}, batch_format="numpy")
        later = _numpy(keys.groupby("part").map_groups(_exact_partition, batch_format="numpy"), ["pos", "first"])
        first[later["pos"]] = later["first"]
    if not cfg.near:
        dedup.adopt(first, empty, empty, np.zeros(0), None, stats)
        return
    repeats = np.sort(np.flatnonzero(first != np.arange(n)))  # shipped once per task (Ray Data puts fn_args)
    near = rows.map_batches(_eligible, fn_args=(repeats,), batch_format="pyarrow").materialize()
    columns = ["pos", "bands"] + (["screen"] if cfg.screen_margin is not None else [])
    collisions = (near.select_columns(columns).map_batches(_band_rows, fn_args=(partitions,), batch_format="numpy")
                  .groupby("part").map_groups(_bucket_pairs, batch_format="numpy",
                                              fn_args=(partitions, cfg.threshold, cfg.screen_margin))
                  .materialize())
    stats["band_collisions"] = int(collisions.count())
    if stats["band_collisions"]:
        stats["screened_out"] = stats["band_collisions"] - int(collisions.sum("ok"))
    pairs = collisions.groupby("part").map_groups(_count_pairs, batch_format="numpy").materialize()
    if pairs.count() == 0:
        dedup.adopt(first, empty, empty, np.zeros(0), None, stats)
        return
    verified = _verify(pairs, near, partitions).materialize()
    stats["candidate_pairs"] = int(verified.count())
    edges = _numpy(verified.map_batches(_edges_only, fn_args=(cfg.threshold,), batch_format="numpy"), ["a", "b", "j"])
    stats["verified_pairs"] = int(len(edges["a"]))
    stats["rejected_pairs"] = stats["candidate_pairs"] - stats["verified_pairs"]

    def jaccard(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Members and representatives with no edge between them (chains: few): their sets are gathered and the
        pairs verified here, with the same functions."""
        wanted = np.unique(np.concatenate([x, y]))
        tables = list(near.map_batches(_rows_in, fn_args=(wanted,), batch_format="pyarrow")
                      .iter_batches(batch_format="pyarrow", batch_size=None))
        table = pa.concat_tables(tables).sort_by("pos")
        pos = table["pos"].to_numpy()
        sets = set_matrix(*_flat_sets(table["sets"]))
        return pair_jaccard(sets, np.searchsorted(pos, x), np.searchsorted(pos, y))

    dedup.adopt(first, edges["a"], edges["b"], edges["j"], jaccard, stats)


def _rows_in(batch: pa.Table, wanted: np.ndarray) -> pa.Table:
    return batch.select(["pos", "sets"]).filter(pa.array(np.isin(batch["pos"].to_numpy(), wanted)))


def _edges_only(batch: dict[str, np.ndarray], threshold: float) -> dict[str, np.ndarray]:
    keep = is_edge(batch["j"], threshold)
    return {k: batch[k][keep] for k in ("a", "b", "j")}


def _verify(pairs: Any, near: Any, partitions: int) -> Any:
    """``pairs`` with ``j``, the exact Jaccard of each pair's shingle sets."""
    joined = _join_side(_join_side(pairs, near, "sets", "a", partitions), near, "sets", "b", partitions)
    return joined.map_batches(_jaccard_pairs, batch_format="pyarrow")
