"""Pack: best-fit-decreasing over a whole split (SFT), or fixed-length blocks (raw text).

Conventions of a packed row (the same for both modes, see ``docs/packing.md``):

- ``input_ids`` / ``labels``: the examples of the row concatenated, at most ``max_length`` tokens. Rows are **not
  padded** (``padding_tokens`` is 0): collators pad, and padding-free trainers need no padding at all.
- ``seq_lengths``: the lengths of the examples in the row, in order; ``sum(seq_lengths) == num_tokens``.
- ``position_ids``: ``concat(range(n) for n in seq_lengths)`` -- they restart at 0 at every example, which is what
  flash-attention varlen (``cu_seq_lens``), transformers' SDPA/eager block-diagonal mask (built from ``position_ids``
  when ``attention_mask is None``), TRL padding-free and ``DataCollatorWithFlattening`` all expect.
- ``labels`` are unshifted (the model shifts). The label of the **first token of every example** in a row is -100:
  in a packed row the logit before it belongs to the previous example, and unpacked training never uses
  ``labels[0]`` either (the shift drops it), so this keeps packed and unpacked losses identical.
  TRL's padding-free collator and ``DataCollatorWithFlattening`` apply the same rule.
- ``source`` / ``row`` / ``truncated``: per example of the row (lists, same order as ``seq_lengths``).
- ``num_tokens`` / ``num_trained``: per row (``num_trained`` counts labels != -100 after the rule above).
- ``kinds``: per token, what it is (``sftdata.render.KINDS``: markup, system, user, content, reasoning, tool call, tool
  result), for ``show`` and ``stats``; labels never depend on it.

SFT packing is exact best-fit-decreasing over the *whole* split: examples sorted by length (longest first, ties by
input index) each go into the open row with the least free space that still fits them (ties: the row that reached
that free space first), or a new row. Row order in the output is then shuffled with ``seed`` (deterministic), so that
a consumer that does not shuffle does not see a longest-first curriculum.

Raw-text packing concatenates the documents (each already ends with EOS) and cuts every ``max_length`` tokens; the
last block may be shorter (kept, not dropped). Position ids restart at 0 at every document start *and* at every
block start (a document cut by a block boundary continues in the next row as a new segment): documents never attend
to each other inside a block (intra-document attention, as in Llama 3 pre-training). A trainer that wants the
classic ``group_texts`` behaviour (cross-document attention) can simply ignore ``position_ids``/``seq_lengths``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sftdata.arrays import concat_ranges

IGNORE_INDEX = -100

PACKED_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("position_ids", pa.list_(pa.int32())),
    ("seq_lengths", pa.list_(pa.int32())),
    ("source", pa.list_(pa.string())),
    ("row", pa.list_(pa.int64())),
    ("truncated", pa.list_(pa.bool_())),
    ("num_tokens", pa.int32()),
    ("num_trained", pa.int32()),
    ("kinds", pa.list_(pa.int8())),
])

_INPUT_TYPES = {
    "input_ids": pa.list_(pa.int32()),
    "labels": pa.list_(pa.int32()),
    "source": pa.string(),
    "row": pa.int64(),
    "truncated": pa.bool_(),
    "kinds": pa.list_(pa.int8()),
}
_CHUNK_TOKENS = 1 << 23  # tokens per output batch: bounds the extra memory of writing a split


# ----------------------------------------------------------------------------------------------------------------
# Best-fit decreasing
# ----------------------------------------------------------------------------------------------------------------

def bfd_arrays(lengths: Any, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit-decreasing as arrays: ``(items, offsets)``; bin ``b`` holds ``items[offsets[b]:offsets[b+1]]``.

    Exactly the sequential algorithm (items longest first, ties by index; each goes to the bin with the least free
    space that fits it, ties to the bin that reached that free space first; else a new bin), computed in batches:
    all items of one length are placed together, bucket by bucket of free space, so the Python loop runs per
    (distinct length x visited bucket), not per item. Bins are numbered in creation order; inside a bin the items
    are in placement order (longest first).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n = int(lengths.size)
    cap = int(max_length)
    if cap <= 0:
        raise ValueError(f"max_length must be positive, not {max_length}")
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(1, np.int64)
    if lengths.min() <= 0:
        raise ValueError(f"example {int(np.argmin(lengths))} has {int(lengths.min())} tokens; every example needs >= 1")
    if lengths.max() > cap:
        i = int(np.argmax(lengths))
        raise ValueError(f"example {i} has {int(lengths[i])} tokens > max_length {cap}: truncate or drop it first")

    order = np.argsort(-lengths, kind="stable")
    sorted_len = lengths[order]
    cuts = np.flatnonzero(np.diff(sorted_len)) + 1
    starts = np.concatenate(([0], cuts))
    ends = np.concatenate((cuts, [n]))

    assign = np.empty(n, np.int64)  # bin of the i-th item in sorted order
    buckets: list[list[np.ndarray]] = [[] for _ in range(cap + 1)]  # bins with exactly c tokens free, FIFO
    count = np.zeros(cap + 1, np.int64)
    n_bins = 0

    def push(c: int, bins: np.ndarray) -> None:
        if c > 0 and bins.size:
            buckets[c].append(bins)
            count[c] += bins.size

    for s, e in zip(starts.tolist(), ends.tolist()):
        size = int(sorted_len[s])
        pos = s
        while pos < e:
            k = e - pos
            candidates = np.flatnonzero(count[size:cap])
            if candidates.size:  # the fullest open bin that fits, and the ones after it in FIFO order
                c = size + int(candidates[0])
                queue = buckets[c]
                bins = queue[0] if len(queue) == 1 else np.concatenate(queue)
                fresh = False
            else:  # open new bins
                c = cap
                per_bin = cap // size
                bins = np.arange(n_bins, n_bins + -(-k // per_bin), dtype=np.int64)
                n_bins += bins.size
                fresh = True
            # A bin keeps taking items of this length until it has less than `size` free: no other bin has free
            # space in [size, c), so after each item it is again the best fit.
            per_bin = c // size
            used = min(bins.size, -(-k // per_bin))
            take = min(k, used * per_bin)
            assign[pos:pos + take] = np.repeat(bins[:used], per_bin)[:take]
            full, rest = divmod(take, per_bin)
            push(c - per_bin * size, bins[:full])
            if rest:
                push(c - rest * size, bins[full:full + 1])
            if not fresh:
                left = bins[used:]
                buckets[c] = [left] if left.size else []
                count[c] = left.size
            pos += take

    placed = np.argsort(assign, kind="stable")  # sorted positions grouped by bin, in placement order
    items = order[placed]
    offsets = np.zeros(n_bins + 1, np.int64)
    np.cumsum(np.bincount(assign, minlength=n_bins), out=offsets[1:])
    return items, offsets


def best_fit_decreasing(lengths: Any, max_length: int) -> list[list[int]]:
    """Exact best-fit-decreasing over all ``lengths``: the example indices of each bin (row), bins in creation order.

    Deterministic: ties in length are broken by index, ties in free space by the bin that reached it first (the
    same rule as TRL's ``_pack_bfd``, so on one batch both give the same bins). Every length must be in
    ``1..max_length``. 1M lengths take about a second.
    """
    items, offsets = bfd_arrays(lengths, max_length)
    flat = items.tolist()
    bounds = offsets.tolist()
    return [flat[bounds[b]:bounds[b + 1]] for b in range(len(bounds) - 1)]


# ----------------------------------------------------------------------------------------------------------------
# Building packed rows
# ----------------------------------------------------------------------------------------------------------------

def _as_table(columns: Mapping[str, Any] | pa.Table) -> pa.Table:
    if isinstance(columns, pa.Table):
        table = columns
    else:
        columns = dict(columns)
        n = len(columns["input_ids"])
        columns.setdefault("labels", columns["input_ids"])
        columns.setdefault("source", [""] * n)
        columns.setdefault("row", list(range(1, n + 1)))
        columns.setdefault("truncated", [False] * n)
        columns.setdefault("kinds", [[0] * len(ids) for ids in columns["input_ids"]])
        table = pa.table({k: pa.array(columns[k], type=t) for k, t in _INPUT_TYPES.items()})
    if "labels" not in table.column_names:
        table = table.append_column("labels", table["input_ids"])
    if "source" not in table.column_names:
        table = table.append_column("source", pa.array([""] * table.num_rows, pa.string()))
    if "row" not in table.column_names:
        table = table.append_column("row", pa.array(np.arange(1, table.num_rows + 1), pa.int64()))
    if "truncated" not in table.column_names:
        table = table.append_column("truncated", pa.array(np.zeros(table.num_rows, bool)))
    if "kinds" not in table.column_names:
        lengths = _lengths(table)
        table = table.append_column("kinds", pa.ListArray.from_arrays(
            pa.array(np.concatenate(([0], np.cumsum(lengths))), pa.int32()), pa.array(np.zeros(int(lengths.sum()), np.int8))))
    return table.select(list(_INPUT_TYPES)).cast(pa.schema(list(_INPUT_TYPES.items())))


def _lengths(table: pa.Table) -> np.ndarray:
    return pc.list_value_length(table["input_ids"]).to_numpy(zero_copy_only=False).astype(np.int64)


def _flat(column: pa.ChunkedArray) -> np.ndarray:
    return pc.list_flatten(column).to_numpy(zero_copy_only=False)


def _list(offsets: np.ndarray, values: Any, type_: pa.DataType) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, type_))


def _rows(segments: pa.Table, seg_lengths: np.ndarray, seg_offsets: np.ndarray, ids: np.ndarray, labels: np.ndarray,
          kinds: np.ndarray) -> tuple[pa.Table, int]:
    """Packed rows from segments laid out row by row: ``seg_offsets`` (rows+1) index segments, the token arrays are
    the segments' tokens concatenated. Returns the table and how many trained first-token labels were masked."""
    n_tokens = int(seg_lengths.sum())
    seg_starts = np.zeros(seg_lengths.size, np.int64)
    np.cumsum(seg_lengths[:-1], out=seg_starts[1:])
    positions = np.arange(n_tokens, dtype=np.int64) - np.repeat(seg_starts, seg_lengths)
    labels = labels.astype(np.int32, copy=True)
    masked = int(np.count_nonzero(labels[seg_starts] != IGNORE_INDEX)) if n_tokens else 0
    labels[seg_starts] = IGNORE_INDEX
    token_offsets = np.concatenate(([0], np.cumsum(seg_lengths)))[seg_offsets]
    trained = np.concatenate(([0], np.cumsum(labels != IGNORE_INDEX)))
    table = pa.Table.from_arrays([
        _list(token_offsets, ids.astype(np.int32, copy=False), pa.int32()),
        _list(token_offsets, labels, pa.int32()),
        _list(token_offsets, positions.astype(np.int32), pa.int32()),
        _list(seg_offsets, seg_lengths.astype(np.int32), pa.int32()),
        pa.ListArray.from_arrays(pa.array(seg_offsets, pa.int32()), segments["source"].combine_chunks()),
        pa.ListArray.from_arrays(pa.array(seg_offsets, pa.int32()), segments["row"].combine_chunks()),
        pa.ListArray.from_arrays(pa.array(seg_offsets, pa.int32()), segments["truncated"].combine_chunks()),
        pa.array(np.diff(token_offsets), pa.int32()),
        pa.array(trained[token_offsets[1:]] - trained[token_offsets[:-1]], pa.int32()),
        _list(token_offsets, kinds.astype(np.int8, copy=False), pa.int8()),
    ], schema=PACKED_SCHEMA)
    return table, masked


@dataclass
class PackPlan:
    """Which examples of a split go into which packed row, in output order: computed from the examples' lengths
    alone (cheap: the driver of a distributed build plans a whole split), and read by :func:`packed_rows` for any
    range of output rows (so each shard can be built apart, by a worker that gathers only its own examples).

    A row is a bin (``bfd``: whole examples) or a block (``blocks``: pieces of documents); row ``r`` is unit
    ``order[r]``, made of segments ``unit_segments[u]:unit_segments[u+1]``, segment ``s`` being tokens
    ``begin[s]:end[s]`` of example ``example[s]``."""

    strategy: str
    max_length: int
    seed: int | None
    lengths: np.ndarray  # tokens of each example of the split
    truncated: int  # examples of the split that were truncated
    order: np.ndarray
    unit_segments: np.ndarray
    example: np.ndarray
    begin: np.ndarray
    end: np.ndarray

    @property
    def rows(self) -> int:
        return int(self.order.size)

    def chunk_rows(self, chunk_tokens: int | None = None) -> int:
        """Rows built at a time: a bounded number of tokens."""
        return max(1, (_CHUNK_TOKENS if chunk_tokens is None else chunk_tokens) // self.max_length)


def plan_packing(lengths: np.ndarray, max_length: int, *, seed: int | None, raw_text: bool = False,
                 truncated: int = 0, describe: Any = None) -> PackPlan:
    """The :class:`PackPlan` of examples of ``lengths`` tokens: best-fit-decreasing, or fixed-length blocks of the
    documents in order (``raw_text``); rows shuffled with ``seed``. ``describe(i)`` names example ``i`` in the error
    for an example longer than ``max_length`` (BFD)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if raw_text:
        doc_starts = np.concatenate(([0], np.cumsum(lengths)))
        total = int(doc_starts[-1])
        n_units = -(-total // max_length)
        # segment boundaries: every document start and every block start
        bounds = np.union1d(doc_starts, np.arange(0, total + 1, max_length, dtype=np.int64))
        bounds = np.union1d(bounds, [total])
        seg_begin, seg_end = bounds[:-1], bounds[1:]
        example = np.searchsorted(doc_starts, seg_begin, side="right") - 1
        unit_segments = np.searchsorted(seg_begin // max_length, np.arange(n_units + 1))
        begin, end = seg_begin - doc_starts[example], seg_end - doc_starts[example]
    else:
        if lengths.size and lengths.max() > max_length:
            i = int(np.argmax(lengths))
            name = describe(i) if describe is not None else f"example {i}"
            raise ValueError(f"{name} has {int(lengths[i])} tokens > max_length {max_length}: build truncates or drops "
                             "such examples before packing")
        example, unit_segments = bfd_arrays(lengths, max_length)
        n_units = unit_segments.size - 1
        begin, end = np.zeros(example.size, np.int64), lengths[example]
    order = np.arange(n_units) if seed is None else np.random.default_rng(seed).permutation(n_units)
    return PackPlan("blocks" if raw_text else "bfd", max_length, seed, lengths, truncated, order, unit_segments,
                    example, begin, end)


def packed_rows(plan: PackPlan, take: Any, start: int, stop: int) -> tuple[pa.Table, int]:
    """Packed rows ``start:stop`` of ``plan`` and how many trained first-token labels were masked; ``take(indices)``
    gives the unpacked columns of those examples of the split (numpy int64 indices, in that order)."""
    chosen = plan.order[start:stop]
    segs, seg_offsets = concat_ranges(plan.unit_segments[chosen], plan.unit_segments[chosen + 1])
    docs = plan.example[segs]
    seg_lengths = plan.end[segs] - plan.begin[segs]
    if plan.strategy == "bfd":  # whole examples: take them in row order
        segments = take(docs)
        return _rows(segments, seg_lengths, seg_offsets, _flat(segments["input_ids"]), _flat(segments["labels"]),
                     _flat(segments["kinds"]))
    # pieces of documents: take each document once, slice its tokens
    used_docs, inverse = np.unique(docs, return_inverse=True)
    sub = take(used_docs)
    sub_starts = np.concatenate(([0], np.cumsum(plan.lengths[used_docs])))
    seg_src = sub_starts[inverse] + plan.begin[segs]  # first token of each piece in `sub`
    gather, _ = concat_ranges(seg_src, seg_src + seg_lengths)
    ids, labels, kinds = _flat(sub["input_ids"])[gather], _flat(sub["labels"])[gather], _flat(sub["kinds"])[gather]
    return _rows(sub.take(pa.array(inverse)), seg_lengths, seg_offsets, ids, labels, kinds)


def write_packed_shard(plan: PackPlan, take: Any, directory: str | Path, split: str, index: int, start: int, stop: int,
                       chunk_rows: int) -> "_Stats":
    """Build packed rows ``start:stop`` of ``plan`` and write them as shard ``index`` of ``split``, in the row groups
    a writer of the whole split makes (:func:`~sftdata.write.chunk_ranges`); the shard's share of the stats (merge
    them with :meth:`_Stats.merge`)."""
    from sftdata.write import chunk_ranges, write_shard

    stats = _Stats(plan.strategy, plan.max_length, plan.seed, 0, 0)

    def pieces():
        for lo, hi in chunk_ranges(start, stop, chunk_rows):
            rows, masked = packed_rows(plan, take, lo, hi)
            stats.add(rows, masked)
            yield rows

    write_shard(Path(directory), split, index, pieces(), schema=PACKED_SCHEMA)
    return stats


def _table_take(table: pa.Table) -> Any:
    return lambda indices: table.take(pa.array(indices, pa.int64()))


def _describe(table: pa.Table) -> Any:
    return lambda i: f"{table['source'][i].as_py()}:{table['row'][i].as_py()}"


def _batches(table: pa.Table, plan: PackPlan, chunk_tokens: int | None):
    per_chunk = plan.chunk_rows(chunk_tokens)
    for start in range(0, plan.rows, per_chunk):
        yield packed_rows(plan, _table_take(table), start, start + per_chunk)


def _bfd_batches(table: pa.Table, max_length: int, seed: int | None, chunk_tokens: int | None = None):
    """Yield (packed rows, masked) in output order, a bounded number of tokens at a time."""
    plan = plan_packing(_lengths(table), max_length, seed=seed, describe=_describe(table))
    yield from _batches(table, plan, chunk_tokens)


def _block_batches(table: pa.Table, max_length: int, seed: int | None, chunk_tokens: int | None = None):
    """Yield (packed rows, masked): documents concatenated in input order and cut every ``max_length`` tokens."""
    plan = plan_packing(_lengths(table), max_length, seed=seed, raw_text=True)
    yield from _batches(table, plan, chunk_tokens)


def _empty_stats(strategy: str, max_length: int, seed: int | None) -> dict[str, Any]:
    return {"strategy": strategy, "max_length": max_length, "seed": seed, "examples": 0, "rows": 0, "tokens": 0,
            "trained_tokens": 0, "fill_ratio": 0.0, "padding_tokens": 0, "padding_to_max_length": 0, "full_rows": 0,
            "examples_per_row": {"mean": 0.0, "min": 0, "max": 0}, "truncated_examples": 0,
            "first_token_labels_masked": 0,
            "position_ids": ("restart at 0 per example" if strategy == "bfd"
                             else "restart at 0 per document and per block"),
            "rows_padded": False}


class _Stats:
    def __init__(self, strategy: str, max_length: int, seed: int | None, examples: int, truncated: int):
        self.d = _empty_stats(strategy, max_length, seed)
        self.d["examples"] = examples
        self.d["truncated_examples"] = truncated
        self.seg_min, self.seg_max, self.segs = None, 0, 0

    def merge(self, other: "_Stats") -> None:
        """Add the rows another shard's stats counted (examples and truncated are the split's, set once)."""
        for key in ("rows", "tokens", "trained_tokens", "full_rows", "first_token_labels_masked"):
            self.d[key] += other.d[key]
        if other.seg_min is not None:
            self.seg_min = other.seg_min if self.seg_min is None else min(self.seg_min, other.seg_min)
        self.seg_max = max(self.seg_max, other.seg_max)
        self.segs += other.segs

    def add(self, rows: pa.Table, masked: int) -> None:
        d = self.d
        if not rows.num_rows:
            return
        d["rows"] += rows.num_rows
        d["tokens"] += int(pc.sum(rows["num_tokens"]).as_py())
        d["trained_tokens"] += int(pc.sum(rows["num_trained"]).as_py())
        d["full_rows"] += int(pc.sum(pc.equal(rows["num_tokens"], d["max_length"])).as_py())
        d["first_token_labels_masked"] += masked
        per_row = pc.list_value_length(rows["seq_lengths"])
        mm = pc.min_max(per_row).as_py()
        self.seg_min = mm["min"] if self.seg_min is None else min(self.seg_min, mm["min"])
        self.seg_max = max(self.seg_max, mm["max"])
        self.segs += int(pc.sum(per_row).as_py())

    def result(self, files: list[str] | None = None) -> dict[str, Any]:
        d = dict(self.d)
        if d["rows"]:
            d["fill_ratio"] = round(d["tokens"] / (d["rows"] * d["max_length"]), 6)
            d["padding_to_max_length"] = d["rows"] * d["max_length"] - d["tokens"]
            d["examples_per_row"] = {"mean": round(self.segs / d["rows"], 3), "min": self.seg_min, "max": self.seg_max}
        if d["strategy"] == "blocks":
            d["segments"] = self.segs
        if files is not None:
            d["files"] = files
        return d


def _count_truncated(table: pa.Table) -> int:
    return int(pc.sum(pc.cast(table["truncated"], pa.int64())).as_py() or 0) if table.num_rows else 0


def pack_examples(columns: Mapping[str, Any] | pa.Table, max_length: int, *, seed: int | None = None
                  ) -> tuple[pa.Table, dict[str, Any]]:
    """Pack tokenized examples into rows of at most ``max_length`` tokens with best-fit-decreasing.

    ``columns`` has ``input_ids`` and ``labels`` (lists of ints, same lengths) and optionally ``source``, ``row``,
    ``truncated`` (one per example); a ``pyarrow.Table`` with those columns works too. Every example must have
    1..max_length tokens. Returns the packed rows (:data:`PACKED_SCHEMA`) -- in BFD creation order, or shuffled
    with ``seed`` -- and the stats recorded under the manifest's ``packing`` key.
    """
    table = _as_table(columns)
    stats = _Stats("bfd", max_length, seed, table.num_rows, _count_truncated(table))
    parts = []
    for rows, masked in _bfd_batches(table, max_length, seed):
        stats.add(rows, masked)
        parts.append(rows)
    out = pa.concat_tables(parts) if parts else PACKED_SCHEMA.empty_table()
    return out, stats.result()


def pack_text_blocks(columns: Mapping[str, Any] | pa.Table, max_length: int, *, seed: int | None = None
                     ) -> tuple[pa.Table, dict[str, Any]]:
    """Raw-text (continued pre-training) packing: concatenate the documents in order (each already ends with EOS)
    and cut every ``max_length`` tokens; the last block may be shorter. Nothing is truncated or dropped.

    ``seq_lengths`` are the document pieces of each block and ``position_ids`` restart at 0 at each piece (a
    document start or a block start); ``source``/``row`` name each piece's document. Blocks are in document order,
    or shuffled with ``seed``.
    """
    table = _as_table(columns)
    stats = _Stats("blocks", max_length, seed, table.num_rows, _count_truncated(table))
    parts = []
    for rows, masked in _block_batches(table, max_length, seed):
        stats.add(rows, masked)
        parts.append(rows)
    out = pa.concat_tables(parts) if parts else PACKED_SCHEMA.empty_table()
    return out, stats.result()


def shard_rows_for(max_length: int) -> int:
    """Rows per Parquet shard: about 64M tokens per file."""
    return max(1000, (1 << 26) // max(1, max_length))


def pack_split(src_parquet_files: list[str], dst_dir: str, split: str, max_length: int, *, seed: int = 0,
               raw_text: bool = False) -> dict[str, Any]:
    """Pack one unpacked split written by build into ``dst_dir/{split}-NNNNN.parquet`` and return its stats.

    Reads the whole split (best-fit-decreasing needs every length; memory is about the size of the split) and writes
    the packed rows a bounded number of tokens at a time. ``raw_text`` selects block packing instead of BFD. The
    returned dict is what build records under ``manifest["packing"][split]``; ``files`` lists the shards written.
    """
    tables = [_as_table(pq.read_table(f)) for f in src_parquet_files]
    tables = [t for t in tables if t.num_rows]
    table = pa.concat_tables(tables) if tables else pa.schema(list(_INPUT_TYPES.items())).empty_table()
    return pack_table(table, dst_dir, split, max_length, seed=seed, raw_text=raw_text)


def pack_table(table: pa.Table, dst_dir: str | Path, split: str, max_length: int, *, seed: int = 0,
               raw_text: bool = False) -> dict[str, Any]:
    """Pack the examples of ``table`` (unpacked columns, in order) into ``dst_dir/{split}-NNNNN.parquet``; the stats
    and the ``files`` written, as :func:`pack_split`."""
    from sftdata.write import shard_ranges

    table = _as_table(table)
    plan = plan_packing(_lengths(table), max_length, seed=seed, raw_text=raw_text, truncated=_count_truncated(table),
                        describe=_describe(table))
    stats = plan_stats(plan, table.num_rows)
    files = []
    for index, (start, stop) in enumerate(shard_ranges(plan.rows, shard_rows_for(max_length))):
        stats.merge(write_packed_shard(plan, _table_take(table), dst_dir, split, index, start, stop, plan.chunk_rows()))
        files.append(f"{split}-{index:05d}.parquet")
    return stats.result(files=files)


def plan_stats(plan: PackPlan, examples: int) -> "_Stats":
    """Empty stats of a planned split, to merge its shards' stats into."""
    return _Stats(plan.strategy, plan.max_length, plan.seed, examples, plan.truncated)


def unpack_row(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Split one packed row back into its examples (``input_ids`` and ``labels``),
    using ``seq_lengths``. This is what feeds ``transformers.DataCollatorWithFlattening`` (see :func:`flattening_collator`).
    """
    out = []
    start = 0
    for n in row["seq_lengths"]:
        example = {"input_ids": row["input_ids"][start:start + n], "labels": row["labels"][start:start + n]}
        out.append(example)
        start += n
    return out


def flattening_collator(collator: Any = None):
    """A collator for packed rows: split each row at ``seq_lengths`` and hand the examples to
    ``transformers.DataCollatorWithFlattening`` (default settings unless ``collator`` is given), which concatenates
    them into one sequence with ``position_ids`` restarting per example and ``labels`` -100 at each example start.

    Passing packed rows to ``DataCollatorWithFlattening`` directly would be wrong: it treats each row as *one*
    sequence, so the examples in a row would attend to each other.
    """
    if collator is None:
        from transformers import DataCollatorWithFlattening

        collator = DataCollatorWithFlattening()

    def collate(rows: list[Mapping[str, Any]]) -> dict[str, Any]:
        return collator([example for row in rows for example in unpack_row(row)])

    return collate
