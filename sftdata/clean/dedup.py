"""Exact and near-duplicate removal: pure steps over batches and arrays, and the in-process engine that runs them.

The steps are the ones a distributed engine runs (each a pure function of its inputs, so the same code runs on a
worker, and the local engine is only their composition):

1. :func:`sketch_batch` (per batch of records): each record's text (roles included, see
   :func:`~sftdata.clean.normalize.record_text`) is normalized and tokenized; a 128-bit xxh3 hash of the token
   sequence is its **exact key**; its word n-gram shingles are hashed and sketched with MinHash; the signature gives
   the LSH **band keys** and a one-byte-per-column **screen signature**.
2. **Exact dedup** is a group-by on the exact key (:func:`exact_first`): every row points at the earliest row with
   the same key.
3. **Candidates**: a group-by on each band key over the rows that are the first of their exact group
   (:func:`~sftdata.clean.minhash.band_collisions`); each pair is **screened** by its MinHash estimate
   (:meth:`~sftdata.clean.minhash.Screen.pairs`) and the distinct survivors are the candidate pairs.
4. **Verification** (:func:`~sftdata.clean.pairs.pair_jaccard`): the exact Jaccard of the two shingle sets of every
   candidate pair; a pair with ``J >= threshold`` is an edge.
5. **Clustering** (:func:`~sftdata.clean.pairs.connected_min_labels`): connected components over the edges, each
   row labelled with the earliest row of its component, which is the one kept.

Representative rule: in every cluster (exact or near) the **earliest row in input order** is kept; every other
member is removed and its removal names that representative, the cluster id (the 0-based input position of the
representative) and the exact Jaccard with it.

:class:`Deduplicator` runs the steps in-process in two passes: :meth:`~Deduplicator.add_batch` sketches (per
distinct row it keeps ~300 bytes of numpy arrays, per exact repeat ~40; shingle sets go to a temporary file named
by path, opened only while appending or reading, so the object stays picklable), :meth:`~Deduplicator.finalize`
clusters, :meth:`~Deduplicator.filter_batch` returns kept records and :class:`~sftdata.record.Removal` s.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from array import array
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import xxhash

from sftdata.arrays import sorted_unique
from sftdata.clean.minhash import (
    MinHasher,
    Screen,
    band_collisions,
    band_keys,
    choose_bands,
    miss_rate,
    screen_miss_rate,
)
from sftdata.clean.normalize import Normalizer, record_text, shingle_hashes, token_hashes
from sftdata.clean.pairs import connected_min_labels, pair_jaccard, set_matrix, set_values
from sftdata.record import Record, Removal

REPRESENTATIVE_RULE = "earliest row in input order is kept; later members of its cluster are removed"

KEEP, EXACT, NEAR = 0, 1, 2
_U64 = np.uint64


@dataclass(frozen=True)
class DedupConfig:
    """Everything that decides a dedup result, as plain data (picklable; shipped to workers as it is).

    ``threshold``: Jaccard of the word ``ngram``-shingle sets at or above which two rows are near duplicates.
    ``num_perm``: MinHash permutations, of which ``bands x rows`` are used. ``screen_margin``: candidates whose
    MinHash estimate is below ``threshold - screen_margin`` are not verified (``None``: verify all)."""

    exact: bool = True
    near: bool = True
    threshold: float = 0.8
    num_perm: int = 128
    ngram: int = 5
    normalizer: Normalizer = field(default_factory=Normalizer)
    seed: int = 1
    bands: int = 21
    rows: int = 6
    screen_margin: float | None = 0.15

    @classmethod
    def from_options(cls, *, exact: bool = True, near: bool = True, threshold: float = 0.8, num_perm: int = 128,
                     ngram: int = 5, normalize: Normalizer | dict[str, Any] | str | None = None, seed: int = 1,
                     bands: int | None = None, rows: int | None = None, max_miss: float = 0.01,
                     screen_margin: float | None = 0.15) -> "DedupConfig":
        """Validate the options; bands x rows default to the most rows whose miss rate at the threshold is at most
        ``max_miss``."""
        if ngram < 1:
            raise ValueError("ngram must be >= 1")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], not {threshold}")
        if num_perm < 1:
            raise ValueError("num_perm must be positive")
        if bands is None or rows is None:
            auto_b, auto_r = choose_bands(threshold, num_perm, max_miss)
            bands = bands or (num_perm // rows if rows else auto_b)
            rows = rows or auto_r
        if bands * rows > num_perm:
            raise ValueError(f"bands x rows = {bands * rows} exceeds num_perm = {num_perm}")
        return cls(exact=exact, near=near, threshold=float(threshold), num_perm=int(num_perm), ngram=int(ngram),
                   normalizer=Normalizer.from_spec(normalize), seed=seed, bands=int(bands), rows=int(rows),
                   screen_margin=screen_margin)

    @property
    def columns(self) -> int:
        """Signature columns used (``bands x rows``)."""
        return self.bands * self.rows

    @cached_property
    def hasher(self) -> MinHasher:
        return MinHasher(self.num_perm, self.seed)


@dataclass
class BatchSketch:
    """What :func:`sketch_batch` computes for ``n`` records, as arrays.

    ``exact_keys`` (n, 2) uint64: the 128-bit exact key. ``has_tokens``: the normalized text has a token (rows
    without are never near duplicates). ``band_keys`` (n, bands) uint64 and ``screen`` (n, bands x rows) uint8, the
    low byte of each signature value: empty (0 columns) when near dedup is off. ``sets`` / ``set_offsets``: row
    ``i``'s shingles are ``sets[set_offsets[i]:set_offsets[i + 1]]`` (:func:`~sftdata.clean.pairs.set_values` of
    their hashes, in text order with repeats: the set is formed when verifying)."""

    exact_keys: np.ndarray
    has_tokens: np.ndarray
    band_keys: np.ndarray
    screen: np.ndarray
    sets: np.ndarray
    set_offsets: np.ndarray


def sketch_batch(records: list[Record], config: DedupConfig) -> BatchSketch:
    """Exact keys, band keys, screen signatures and shingle hashes of a batch of records (a pure function)."""
    return sketch_texts([record_text(r) for r in records], config)


def sketch_texts(texts: list[str], config: DedupConfig) -> BatchSketch:
    """:func:`sketch_batch` for the texts :func:`~sftdata.clean.normalize.record_text` gives."""
    norm = config.normalizer
    docs = [norm.normalize_bytes(t) for t in texts]
    tok, off = token_hashes(docs)
    n = len(texts)
    has_tokens = off[1:] > off[:-1]
    h128 = xxhash.xxh3_128_digest
    by_tokens = norm.whitespace
    digests = []
    for i, (lo, hi) in enumerate(zip(off[:-1].tolist(), off[1:].tolist())):
        if hi > lo:
            digests.append(h128(tok[lo:hi].tobytes()) if by_tokens else h128(docs[i]))
        else:  # nothing left after normalization: only the identical raw text is a duplicate
            digests.append(h128(b"\x00raw\x00" + texts[i].encode("utf-8", "surrogatepass")))
    exact_keys = np.frombuffer(b"".join(digests), dtype=_U64).reshape(n, 2) if n else np.zeros((0, 2), _U64)
    if not config.near:
        return BatchSketch(exact_keys, has_tokens, np.zeros((n, 0), _U64), np.zeros((n, 0), np.uint8),
                           np.zeros(0, np.int64), np.zeros(n + 1, np.int64))
    sh, soff = shingle_hashes(tok, off, config.ngram)
    sig = config.hasher.signatures(sh, soff, columns=config.columns)
    keys = band_keys(sig, config.bands, config.rows)
    return BatchSketch(exact_keys, has_tokens, keys, sig.astype(np.uint8), set_values(sh), soff)


def is_edge(jaccard: np.ndarray, threshold: float) -> np.ndarray:
    """Verified pairs: exact Jaccard at or above the threshold (with a margin for the float division)."""
    return jaccard + 1e-12 >= threshold


def exact_first(exact_keys: np.ndarray) -> np.ndarray:
    """For each row, the earliest row with the same exact key (itself if it is the first): a hash group-by."""
    n = len(exact_keys)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((np.arange(n), exact_keys[:, 1], exact_keys[:, 0]))
    ks = exact_keys[order]
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = (ks[1:] != ks[:-1]).any(axis=1)
    group_first = order[np.flatnonzero(new_group)]  # stable on the row index: the earliest row of each group
    first = np.empty(n, dtype=np.int64)
    first[order] = np.repeat(group_first, np.diff(np.append(np.flatnonzero(new_group), n)))
    return first


class ShingleSpill:
    """Per-row shingle sets (int64 values) appended to a temporary file, read back for the rows that need exact
    verification.

    Holds the file's path, never an open file: each append and read opens and closes it. A pickled copy carries the
    hashes themselves and spills them to a file of its own."""

    def __init__(self, directory: str | None = None):
        self.directory = directory
        self.path: str | None = None
        self._offsets = array("q", [0])

    def append(self, values: np.ndarray, offsets: np.ndarray) -> None:
        if self.path is None:
            fd, self.path = tempfile.mkstemp(prefix="sftdata-dedup-", suffix=".u64", dir=self.directory)
            os.close(fd)
            weakref.finalize(self, _unlink, self.path)
        with open(self.path, "ab") as f:
            f.write(np.ascontiguousarray(values, dtype=np.int64).tobytes())
        self._offsets.extend((offsets[1:] + self._offsets[-1]).tolist())

    def __getstate__(self) -> dict[str, Any]:
        data = b""
        if self.path is not None:
            with open(self.path, "rb") as f:
                data = f.read()
        return {"directory": self.directory, "offsets": self._offsets, "data": data}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.directory, self.path, self._offsets = state["directory"], None, array("q", [0])
        if state["data"]:
            self.append(np.frombuffer(state["data"], dtype=np.int64), np.array([0, 0], dtype=np.int64))
        self._offsets = state["offsets"]

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The sets of ``rows`` (sorted, unique row numbers) as ``(values, offsets)``: one read per run of rows
        stored back to back, straight into the result."""
        offs = np.frombuffer(self._offsets, dtype=np.int64)
        starts, ends = offs[rows], offs[rows + 1]
        out_off = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(ends - starts, out=out_off[1:])
        values = np.empty(int(out_off[-1]), dtype=np.int64)
        if self.path is None or not len(values):
            return values, out_off
        run_start = np.flatnonzero(np.concatenate(([True], starts[1:] != ends[:-1])))
        run_end = np.append(run_start[1:], len(rows))
        view = memoryview(values).cast("B")
        with open(self.path, "rb") as f:
            for lo, hi, at in zip(starts[run_start].tolist(), ends[run_end - 1].tolist(), out_off[run_start].tolist()):
                f.seek(lo * 8)
                f.readinto(view[at * 8:(at + hi - lo) * 8])
        return values, out_off

    def remove(self) -> None:
        if self.path is not None:
            _unlink(self.path)
            self.path = None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class Deduplicator:
    """Two-pass in-process deduplicator (see the module docstring); options as in :meth:`DedupConfig.from_options`."""

    stage = "dedup"
    compact_min_rows = 1 << 16  # near rows added before the first compaction

    def __init__(
        self,
        *,
        exact: bool = True,
        near: bool = True,
        threshold: float = 0.8,
        num_perm: int = 128,
        ngram: int = 5,
        normalize: Normalizer | dict[str, Any] | str | None = None,
        seed: int = 1,
        bands: int | None = None,
        rows: int | None = None,
        max_miss: float = 0.01,
        screen_margin: float | None = 0.15,
        spill_dir: str | None = None,
    ):
        self.config = DedupConfig.from_options(exact=exact, near=near, threshold=threshold, num_perm=num_perm,
                                               ngram=ngram, normalize=normalize, seed=seed, bands=bands, rows=rows,
                                               max_miss=max_miss, screen_margin=screen_margin)
        # per input row, in input order
        self._source_ids: dict[str, int] = {}
        self._sources: list[str] = []
        self._src = array("i")
        self._row = array("q")
        self._exact_keys: list[np.ndarray] = []
        # per row that may be a near duplicate (has tokens, first of its exact group as far as seen)
        self._near_rows: list[np.ndarray] = []
        self._band_keys: list[np.ndarray] = []
        self._screen: list[np.ndarray] = []
        self._near_compacted = 0  # near rows left by the last compaction
        self._near_pending = 0    # near rows added since
        self._spill = ShingleSpill(spill_dir) if near else None
        # results
        self._finalized = False
        self._status = np.zeros(0, dtype=np.int8)
        self._ref = np.zeros(0, dtype=np.int64)       # exact: the earlier twin; near: the representative
        self._rep = np.zeros(0, dtype=np.int64)       # the kept row of each row's cluster
        self._jac = np.zeros(0, dtype=np.float32)
        self._via: dict[int, tuple[int, float]] = {}  # near members not linked to the representative directly
        self._cursor = 0
        self._index: dict[tuple[str, int], int] | None = None
        self._stats: dict[str, int] = {}

    # -- pass 1 ------------------------------------------------------------------------------------------------
    def add_batch(self, records: list[Record]) -> None:
        self.add_sketch([(rec.source, rec.row) for rec in records], sketch_batch(records, self.config))

    @property
    def rows_seen(self) -> int:
        return len(self._src)

    def add_positions(self, positions: list[tuple[str, int]]) -> None:
        """Number rows whose sketches are kept elsewhere (a cluster: :mod:`sftdata.clean.dedup_ray`, which then
        finishes with :meth:`adopt`)."""
        for source, row in positions:
            sid = self._source_ids.get(source)
            if sid is None:
                sid = self._source_ids[source] = len(self._sources)
                self._sources.append(source)
            self._src.append(sid)
            self._row.append(row)

    def add_sketch(self, positions: list[tuple[str, int]], sketch: BatchSketch) -> None:
        """Add a batch sketched elsewhere (a worker ran :func:`sketch_batch` with this ``config``): ``positions`` are
        the ``(source, row)`` of its records, in order. Same result as :meth:`add_batch` of those records."""
        if self._finalized:
            raise RuntimeError("add_batch after finalize")
        start = len(self._src)
        self.add_positions(positions)
        self._exact_keys.append(sketch.exact_keys)
        if self._spill is None:
            return
        local = np.flatnonzero(sketch.has_tokens)
        if self.config.exact:  # a later copy of a row in this batch is never a near-dedup candidate
            local = local[exact_first(sketch.exact_keys)[local] == local]
        self._near_rows.append(start + local)
        self._band_keys.append(sketch.band_keys[local])
        self._screen.append(sketch.screen[local])
        counts = np.diff(sketch.set_offsets)
        wanted = np.zeros(len(positions), dtype=bool)
        wanted[local] = True
        offsets = np.zeros(len(positions) + 1, dtype=np.int64)
        np.cumsum(np.where(wanted, counts, 0), out=offsets[1:])
        self._spill.append(sketch.sets[np.repeat(wanted, counts)], offsets)
        self._near_pending += len(local)
        if self.config.exact and self._near_pending >= max(self.compact_min_rows, self._near_compacted):
            self._compact()

    def _compact(self) -> None:
        """Drop the sketches of rows that turned out to repeat an earlier row exactly: memory then grows with the
        distinct rows, not with the input. Runs when the rows added since the last compaction outnumber those it
        left, so the sorting stays proportional to the input overall."""
        first = exact_first(np.concatenate(self._exact_keys))
        rows = np.concatenate(self._near_rows)
        keep = first[rows] == rows
        self._near_rows = [rows[keep]]
        self._band_keys = [_stack_kept(self._band_keys, keep, self.config.bands, _U64)]
        self._screen = [_stack_kept(self._screen, keep, self.config.columns, np.uint8)]
        self._near_compacted, self._near_pending = int(np.count_nonzero(keep)), 0

    # -- between the passes ---------------------------------------------------------------------------------------
    def finalize(self) -> None:
        if self._finalized:
            return
        cfg = self.config
        n = len(self._src)
        exact_keys = _concat(self._exact_keys, (0, 2), _U64)
        self._exact_keys = []
        first = exact_first(exact_keys) if cfg.exact else np.arange(n, dtype=np.int64)
        del exact_keys
        stats = {"band_collisions": 0, "screened_out": 0, "candidate_pairs": 0, "verified_pairs": 0,
                 "rejected_pairs": 0}
        edges = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
        jaccard = None
        if self._spill is not None:
            rows = _concat(self._near_rows, (0,), np.int64)
            keep = first[rows] == rows
            eligible = rows[keep]
            keys = _stack_kept(self._band_keys, keep, cfg.bands, _U64, transpose=True)  # each band contiguous
            screen = Screen(_stack_kept(self._screen, keep, cfg.columns, np.uint8))
            self._near_rows = []
            a, b = self._candidates(keys, screen, stats)
            del keys, screen
            edges, jaccard = self._verify(eligible[a], eligible[b], stats)
        self.adopt(first, *edges, jaccard, stats)
        if self._spill is not None:
            self._spill.remove()

    def _candidates(self, keys: np.ndarray, screen: Screen, stats: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
        """Distinct pairs sharing a band key whose MinHash estimate passes the screen (indices into ``keys``)."""
        cfg = self.config
        m = keys.shape[1]
        kept = []
        for a, b in band_collisions(keys):
            stats["band_collisions"] += len(a)
            if cfg.screen_margin is not None:
                ok = screen.pairs(a, b, threshold=cfg.threshold, margin=cfg.screen_margin)
                stats["screened_out"] += int(len(a) - np.count_nonzero(ok))
                a, b = a[ok], b[ok]
            kept.append(a * m + b)
        codes = sorted_unique(np.concatenate(kept)) if kept else np.zeros(0, dtype=np.int64)
        stats["candidate_pairs"] = int(len(codes))
        return np.divmod(codes, max(m, 1))

    def _verify(self, a: np.ndarray, b: np.ndarray, stats: dict[str, int]) -> tuple[tuple[np.ndarray, ...], Any]:
        """The exact Jaccard of the candidate pairs (input positions ``a < b``): the edges ``(a, b, j)`` with
        ``j >= threshold``, and a function giving the Jaccard of any pairs of the candidates' rows."""
        docs = sorted_unique(np.concatenate([a, b]))
        sets = set_matrix(*self._spill.read(docs))
        j = pair_jaccard(sets, np.searchsorted(docs, a), np.searchsorted(docs, b))
        edge = is_edge(j, self.config.threshold)
        stats["verified_pairs"] = int(np.count_nonzero(edge))
        stats["rejected_pairs"] = int(len(edge) - stats["verified_pairs"])
        return (a[edge], b[edge], j[edge]), lambda x, y: pair_jaccard(sets, np.searchsorted(docs, x),
                                                                        np.searchsorted(docs, y))

    def adopt(self, first: np.ndarray, ea: np.ndarray, eb: np.ndarray, ej: np.ndarray, jaccard: Any,
              stats: dict[str, int]) -> None:
        """Finish from the global facts, however they were computed (here, or on a cluster: sftdata/engine_ray.py):
        ``first`` (each input position's earliest exact twin), the verified edges ``(ea, eb, ej)`` between input
        positions, ``jaccard(x, y)`` (the exact Jaccard of position pairs, asked for each near member and its
        representative that share no edge) and the candidate statistics."""
        n = len(self._src)
        idx = np.arange(n, dtype=np.int64)
        status = np.zeros(n, dtype=np.int8)
        ref = idx.copy()
        rep = idx.copy()
        jac = np.ones(n, dtype=np.float32)
        if len(ea):
            self._cluster(ea, eb, ej, jaccard, status, ref, rep, jac)
        if self.config.exact and n:
            dup = first != idx
            status[dup] = EXACT
            ref[dup] = first[dup]
            rep[dup] = rep[first[dup]]
            jac[dup] = 1.0
        self._status, self._ref, self._rep, self._jac = status, ref, rep, jac
        self._stats = stats
        self._finalized = True

    def _cluster(self, ea: np.ndarray, eb: np.ndarray, ej: np.ndarray, jaccard: Any, status: np.ndarray,
                 ref: np.ndarray, rep: np.ndarray, jac: np.ndarray) -> None:
        """Cluster the verified edges (input positions), fill the per-row results."""
        docs = sorted_unique(np.concatenate([ea, eb]))
        ea, eb = np.searchsorted(docs, ea), np.searchsorted(docs, eb)
        # docs are sorted, so the smallest local index of a component is its earliest input row
        label = connected_min_labels(len(docs), ea, eb)
        member = np.flatnonzero(label != np.arange(len(docs)))
        if not len(member):
            return
        rows, reps = docs[member], docs[label[member]]
        status[rows] = NEAR
        ref[rows] = reps
        rep[rows] = reps
        # the Jaccard with the representative: the edge's where there is one, else computed
        code = ea * len(docs) + eb
        order = np.argsort(code)
        at = np.minimum(np.searchsorted(code[order], label[member] * len(docs) + member), len(code) - 1)
        direct = code[order][at] == label[member] * len(docs) + member
        member_j = np.empty(len(member), dtype=np.float64)
        member_j[direct] = ej[order][at[direct]]
        if not direct.all():
            member_j[~direct] = jaccard(reps[~direct], rows[~direct])
        jac[rows] = member_j
        # how each member joined: its earliest verified neighbour (reported when that is not the representative)
        node, other, oj = np.concatenate([ea, eb]), np.concatenate([eb, ea]), np.concatenate([ej, ej])
        order = np.lexsort((other, node))
        node, other, oj = node[order], other[order], oj[order]
        firsts = np.flatnonzero(np.concatenate(([True], node[1:] != node[:-1])))
        via_node, via_other, via_j = node[firsts], other[firsts], oj[firsts]
        indirect = via_other != label[via_node]
        self._via = {int(docs[d]): (int(docs[o]), float(x))
                     for d, o, x in zip(via_node[indirect], via_other[indirect], via_j[indirect])}

    # -- pass 2 ---------------------------------------------------------------------------------------------------
    def _locate(self, rec: Record) -> int:
        c = self._cursor
        sid = self._source_ids.get(rec.source, -1)
        if c < len(self._src) and self._src[c] == sid and self._row[c] == rec.row:
            self._cursor = c + 1
            return c
        if self._index is None:
            self._index = {}
            for i in range(len(self._src) - 1, -1, -1):
                self._index[(self._sources[self._src[i]], self._row[i])] = i
        idx = self._index.get((rec.source, rec.row))
        if idx is None:
            raise KeyError(f"{rec.where}: record was not seen by add_batch")
        self._cursor = idx + 1
        return idx

    def _who(self, idx: int) -> dict[str, Any]:
        return {"source": self._sources[self._src[idx]], "row": int(self._row[idx])}

    def representative(self, idx: int) -> int:
        """Input position of the row kept for the cluster of input position ``idx``."""
        return int(self._rep[idx])

    def keep_mask(self) -> np.ndarray:
        """Per input position (the order of :meth:`add_batch`), whether the row is kept."""
        if not self._finalized:
            self.finalize()
        return self._status == KEEP

    def positions(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """``(sources, source_index, row)`` of every input position: ``sources[source_index[i]]:row[i]``."""
        return list(self._sources), np.frombuffer(self._src, dtype=np.int32), np.frombuffer(self._row, dtype=np.int64)

    def removal(self, idx: int, record: Record) -> Removal | None:
        """The :class:`Removal` of the row at input position ``idx`` (``record`` is that row), or None if it is kept."""
        st = self._status[idx]
        if st == KEEP:
            return None
        rep = int(self._rep[idx])
        if st == EXACT:
            other = int(self._ref[idx])
            matched = {**self._who(other), "cluster": rep, "jaccard": 1.0, "method": "exact"}
            if rep != other:
                matched["representative"] = self._who(rep)
            w = self._who(other)
            return Removal(record, self.stage, "exact-duplicate", f"same normalized text as {w['source']}:{w['row']}",
                           matched)
        matched = {**self._who(rep), "cluster": rep, "jaccard": round(float(self._jac[idx]), 4),
                   "method": "minhash-lsh+exact-jaccard"}
        partner = self._via.get(idx)
        if partner is not None:
            matched["linked_via"] = {**self._who(partner[0]), "jaccard": round(partner[1], 4)}
        detail = (f"near-duplicate of {matched['source']}:{matched['row']} "
                  f"(Jaccard {matched['jaccard']:.3f} on {self.config.ngram}-gram shingles, cluster {rep})")
        return Removal(record, self.stage, "near-duplicate", detail, matched)

    def filter_batch(self, records: list[Record]) -> tuple[list[Record], list[Removal]]:
        if not self._finalized:
            self.finalize()
        kept: list[Record] = []
        removed: list[Removal] = []
        for rec in records:
            gone = self.removal(self._locate(rec), rec)
            if gone is None:
                kept.append(rec)
            else:
                removed.append(gone)
        return kept, removed

    def screen_miss_rate(self) -> float:
        """Probability that a pair at exactly the threshold is screened out by its MinHash estimate."""
        cfg = self.config
        return 0.0 if cfg.screen_margin is None else screen_miss_rate(cfg.threshold, cfg.screen_margin, cfg.columns)

    def summary(self) -> dict[str, Any]:
        cfg = self.config
        removed: dict[str, int] = {}
        clusters = 0
        if self._finalized:
            counts = np.bincount(self._status, minlength=3)
            removed = {"exact-duplicate": int(counts[EXACT]), "near-duplicate": int(counts[NEAR])}
            clusters = int(len(sorted_unique(self._rep[self._status != KEEP])))
        return {
            "stage": self.stage,
            "exact": cfg.exact,
            "near": cfg.near,
            "threshold": cfg.threshold,
            "num_perm": cfg.num_perm,
            "ngram": cfg.ngram,
            "seed": cfg.seed,
            "bands": cfg.bands,
            "rows": cfg.rows,
            "miss_rate_at_threshold": miss_rate(cfg.threshold, cfg.bands, cfg.rows),
            "screen_margin": cfg.screen_margin,
            "screen_miss_rate_at_threshold": self.screen_miss_rate(),
            "normalization": cfg.normalizer.to_dict(),
            "representative_rule": REPRESENTATIVE_RULE,
            "rows_seen": len(self._src),
            "removed": removed,
            "duplicate_clusters": clusters,
            **self._stats,
        }


def _stack_kept(parts: list[np.ndarray], keep: np.ndarray, width: int, dtype: Any,
                transpose: bool = False) -> np.ndarray:
    """The rows of the stacked ``(rows, width)`` ``parts`` where ``keep`` is true (transposed if asked), filled one
    part at a time so the whole stack is never copied; ``parts`` is emptied."""
    m = int(np.count_nonzero(keep))
    out = np.empty((width, m) if transpose else (m, width), dtype=dtype)
    lo = pos = 0
    parts.reverse()
    while parts:
        part = parts.pop()
        rows = part[keep[lo:lo + len(part)]]
        if transpose:
            out[:, pos:pos + len(rows)] = rows.T
        else:
            out[pos:pos + len(rows)] = rows
        lo, pos = lo + len(part), pos + len(rows)
    return out


def _concat(parts: list[np.ndarray], empty_shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    if not parts:
        return np.zeros(empty_shape, dtype=dtype)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
