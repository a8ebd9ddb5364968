"""Exact and near-duplicate removal, streaming in two passes over batches of records.

Pass 1 (:meth:`Deduplicator.add_batch`): each record's text (roles included, see
:func:`~sftdata.clean.normalize.record_text`) is normalized and tokenized; a 128-bit xxh3 hash of its token
sequence finds exact duplicates; the first occurrence of every distinct text is shingled (word n-grams) and
sketched with MinHash (its signature and LSH band keys stay in memory, ~0.7 KB per row). Its shingle hashes are
appended to a temporary file on disk, so memory is bounded by the signatures, never by the texts.

:meth:`Deduplicator.finalize`: pairs sharing a band key are candidates; a candidate whose MinHash estimate is far
below the threshold (``threshold - screen_margin``; a pair at the threshold is screened out with probability
``screen_miss_rate_at_threshold`` in the summary, ~1e-5 by default) is dropped; every other candidate is verified
with the **exact** Jaccard of the two shingle sets (read back from the file) and counts only if
``J >= threshold``; verified pairs are merged with union-find. A candidate whose two rows are already in one
cluster is not re-verified (it could not change the clustering).

Representative rule: in every cluster (exact or near) the **earliest row in input order** is kept; every other
member is removed and its removal names that representative, the cluster id (the 0-based input position of the
representative) and the exact Jaccard with it.

Pass 2 (:meth:`Deduplicator.filter_batch`): the same records again, in any batching; returns kept records and
:class:`~sftdata.record.Removal` s (``exact-duplicate`` / ``near-duplicate``).
"""

from __future__ import annotations

import math
import tempfile
from array import array
from typing import Any

import numpy as np
import xxhash

from sftdata.clean.minhash import MinHasher, band_keys, bucket_pairs, choose_bands, miss_rate
from sftdata.clean.normalize import Normalizer, record_text, shingle_hashes, token_hashes
from sftdata.record import Record, Removal

REPRESENTATIVE_RULE = "earliest row in input order is kept; later members of its cluster are removed"

KEEP, EXACT, NEAR = 0, 1, 2


class Deduplicator:
    """Two-pass streaming deduplicator (see the module docstring).

    ``threshold``: Jaccard of the word ``ngram``-shingle sets at or above which two rows are near duplicates.
    ``num_perm``: MinHash permutations. ``bands``/``rows``: LSH banding (default: chosen so that the miss rate
    at the threshold is at most ``max_miss``). ``normalize``: a :class:`Normalizer`, a dict or a spec string.
    """

    stage = "dedup"

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
        if ngram < 1:
            raise ValueError("ngram must be >= 1")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], not {threshold}")
        self.exact = exact
        self.near = near
        self.threshold = float(threshold)
        self.num_perm = int(num_perm)
        self.ngram = int(ngram)
        self.normalizer = Normalizer.from_spec(normalize)
        self.seed = seed
        if bands is None or rows is None:
            auto_b, auto_r = choose_bands(self.threshold, self.num_perm, max_miss)
            bands = bands or (self.num_perm // rows if rows else auto_b)
            rows = rows or auto_r
        if bands * rows > self.num_perm:
            raise ValueError(f"bands x rows = {bands * rows} exceeds num_perm = {self.num_perm}")
        self.bands, self.rows = int(bands), int(rows)
        self.screen_margin = screen_margin
        self.hasher = MinHasher(self.num_perm, seed)
        # per input record
        self._source_ids: dict[str, int] = {}
        self._sources: list[str] = []
        self._src = array("i")
        self._row = array("q")
        self._first = array("q")        # index of the first record with the same normalized text (itself if new)
        self._exact_seen: dict[int, int] = {}
        # per sketched (first-occurrence, non-empty) record
        self._near_doc = array("q")
        self._keys: list[np.ndarray] = []
        self._sigs: list[np.ndarray] = []
        self._set_offsets = array("q", [0])
        self._spill = tempfile.TemporaryFile(dir=spill_dir, prefix="sftdata-dedup-") if near else None
        # results
        self._finalized = False
        self._status: np.ndarray | None = None
        self._ref: np.ndarray | None = None
        self._jac: np.ndarray | None = None
        self._via: dict[int, tuple[int, float]] = {}
        self._cursor = 0
        self._index: dict[tuple[str, int], int] | None = None
        self._stats: dict[str, int] = {}

    # -- pass 1 ------------------------------------------------------------------------------------------------
    def add_batch(self, records: list[Record]) -> None:
        if self._finalized:
            raise RuntimeError("add_batch after finalize")
        norm = self.normalizer
        texts = [record_text(r) for r in records]
        docs = [norm.normalize_bytes(t) for t in texts]
        tok, off = token_hashes(docs)
        off_list = off.tolist()
        start = len(self._src)
        new_local: list[int] = []
        source_ids = self._source_ids
        seen = self._exact_seen
        h128 = xxhash.xxh3_128_intdigest
        by_tokens = norm.whitespace
        for i, rec in enumerate(records):
            idx = start + i
            sid = source_ids.get(rec.source)
            if sid is None:
                sid = source_ids[rec.source] = len(self._sources)
                self._sources.append(rec.source)
            self._src.append(sid)
            self._row.append(rec.row)
            lo, hi = off_list[i], off_list[i + 1]
            if hi > lo:
                key = h128(tok[lo:hi].tobytes()) if by_tokens else h128(docs[i])
            else:  # nothing left after normalization: only the identical raw text is a duplicate
                key = h128(b"\x00raw\x00" + texts[i].encode("utf-8", "surrogatepass"))
            first = seen.setdefault(key, idx) if self.exact else idx
            self._first.append(first)
            if first == idx and hi > lo and self.near:
                new_local.append(i)
        if new_local:
            self._sketch(tok, off, new_local, start)

    def _sketch(self, tok: np.ndarray, off: np.ndarray, local: list[int], start: int) -> None:
        sh, soff = shingle_hashes(tok, off, self.ngram)
        if len(local) < len(off) - 1:  # keep the shingles of the new (first-occurrence) documents only
            sel = np.asarray(local, dtype=np.int64)
            counts = np.diff(soff)[sel]
            mask = np.zeros(len(off) - 1, dtype=bool)
            mask[sel] = True
            sh = sh[np.repeat(mask, np.diff(soff))]
            soff = np.zeros(len(sel) + 1, dtype=np.int64)
            np.cumsum(counts, out=soff[1:])
        sig = self.hasher.signatures(sh, soff, columns=self.bands * self.rows)
        self._keys.append(band_keys(sig, self.bands, self.rows))
        self._sigs.append(sig)
        self._near_doc.extend(start + i for i in local)
        last = self._set_offsets[-1]
        self._set_offsets.extend((soff[1:] + last).tolist())
        self._spill.write(sh.tobytes())

    # -- between the passes ---------------------------------------------------------------------------------------
    def finalize(self) -> None:
        if self._finalized:
            return
        self._finalized = True
        n = len(self._src)
        status = np.zeros(n, dtype=np.int8)
        ref = np.arange(n, dtype=np.int64)
        jac = np.ones(n, dtype=np.float32)
        first = np.frombuffer(self._first, dtype=np.int64) if n else np.zeros(0, dtype=np.int64)
        stats = {"candidate_pairs": 0, "rejected_by_estimate": 0, "verified_pairs": 0, "rejected_pairs": 0,
                 "rejected_by_size": 0, "skipped_same_cluster": 0}
        near_rep = np.arange(n, dtype=np.int64)  # for first occurrences: representative of their near cluster
        m = len(self._near_doc)
        if self.near and m > 1:
            self._spill.flush()
            sets = _map_spill(self._spill)
            offs = np.frombuffer(self._set_offsets, dtype=np.int64)
            cache: dict[int, frozenset] = {}

            def shingle_set(k: int) -> frozenset:
                """Doc k's shingle-hash set (read back from the spill file; a bounded cache)."""
                got = cache.get(k)
                if got is None:
                    if len(cache) > 8192:
                        cache.clear()
                    got = cache[k] = frozenset(sets[offs[k]:offs[k + 1]].tolist())
                return got

            keys = np.concatenate(self._keys) if len(self._keys) > 1 else self._keys[0]
            codes = bucket_pairs(keys)
            stats["candidate_pairs"] = int(len(codes))
            # cheap screen: the MinHash estimate over all signature columns. A pair is dropped before the exact
            # check only if its estimate is below threshold - screen_margin (for J >= threshold that happens with
            # probability screen_miss_rate_at_threshold, ~3e-5 by default); everything else is verified exactly.
            sigs = np.concatenate(self._sigs) if len(self._sigs) > 1 else self._sigs[0]
            self._sigs = []
            if len(codes) and self.screen_margin is not None:
                k = sigs.shape[1]
                cut = math.ceil((self.threshold - self.screen_margin) * k - 1e-9)
                keep = np.empty(len(codes), dtype=bool)
                step = 32768
                for lo in range(0, len(codes), step):
                    ia, ib = np.divmod(codes[lo:lo + step], m)
                    # stage 1 on a third of the columns with twice the margin, stage 2 on all columns
                    head = k // 3
                    c1 = np.count_nonzero(sigs[ia, :head] == sigs[ib, :head], axis=1)
                    alive = np.flatnonzero(c1 >= math.ceil((self.threshold - 2 * self.screen_margin) * head - 1e-9))
                    c2 = c1[alive] + np.count_nonzero(sigs[ia[alive], head:] == sigs[ib[alive], head:], axis=1)
                    part = np.zeros(len(ia), dtype=bool)
                    part[alive[c2 >= cut]] = True
                    keep[lo:lo + step] = part
                stats["rejected_by_estimate"] = int(np.count_nonzero(~keep))
                codes = codes[keep]
            del sigs
            parent = list(range(m))

            def find(x: int) -> int:
                root = x
                while parent[root] != root:
                    root = parent[root]
                while parent[x] != root:
                    parent[x], x = root, parent[x]
                return root

            t = self.threshold
            via: dict[int, tuple[int, float]] = {}
            for code in codes.tolist():
                a, b = divmod(code, m)
                ra, rb = find(a), find(b)
                if ra == rb:
                    stats["skipped_same_cluster"] += 1
                    continue
                set_a, set_b = shingle_set(a), shingle_set(b)
                sa, sb = len(set_a), len(set_b)
                if min(sa, sb) < t * max(sa, sb) - 1e-12:  # J <= min/max: cannot reach the threshold
                    stats["rejected_by_size"] += 1
                    continue
                inter = len(set_a & set_b)
                j = inter / (sa + sb - inter)
                if j + 1e-12 >= t:
                    stats["verified_pairs"] += 1
                    if ra < rb:
                        parent[rb] = ra
                    else:
                        parent[ra] = rb
                    via.setdefault(b, (a, j))
                    via.setdefault(a, (b, j))
                else:
                    stats["rejected_pairs"] += 1
            near_doc = np.frombuffer(self._near_doc, dtype=np.int64)
            for k in range(m):
                r = find(k)
                if r != k:
                    d = int(near_doc[k])
                    near_rep[d] = int(near_doc[r])
                    status[d] = NEAR
                    ref[d] = near_doc[r]
                    sk, sr = shingle_set(k), shingle_set(r)
                    inter = len(sk & sr)
                    jac[d] = inter / (len(sk) + len(sr) - inter)
                    partner, pj = via[k]
                    self._via[d] = (int(near_doc[partner]), float(pj))
        if self._spill is not None:
            self._spill.close()
            self._spill = None
        if self.exact and n:
            dup = first != np.arange(n)
            status[dup] = EXACT
            ref[dup] = first[dup]
            jac[dup] = 1.0
        self._status, self._ref, self._jac = status, ref, jac
        self._near_rep = near_rep
        self._stats = stats

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
        assert self._ref is not None
        return int(self._near_rep[int(self._ref[idx])])

    def filter_batch(self, records: list[Record]) -> tuple[list[Record], list[Removal]]:
        if not self._finalized:
            self.finalize()
        kept: list[Record] = []
        removed: list[Removal] = []
        status, ref, jac = self._status, self._ref, self._jac
        for rec in records:
            idx = self._locate(rec)
            st = status[idx]
            if st == KEEP:
                kept.append(rec)
                continue
            rep = self.representative(idx)
            other = int(ref[idx])
            matched = {**self._who(rep), "cluster": rep, "jaccard": round(float(jac[idx]), 4)}
            if st == EXACT:
                matched = {**self._who(other), "cluster": rep, "jaccard": 1.0, "method": "exact"}
                if rep != other:
                    matched["representative"] = self._who(rep)
                w = self._who(other)
                detail = f"same normalized text as {w['source']}:{w['row']}"
                removed.append(Removal(rec, self.stage, "exact-duplicate", detail, matched))
            else:
                matched["method"] = "minhash-lsh+exact-jaccard"
                partner = self._via.get(idx)
                if partner is not None and partner[0] != rep:
                    matched["linked_via"] = {**self._who(partner[0]), "jaccard": round(partner[1], 4)}
                detail = (f"near-duplicate of {matched['source']}:{matched['row']} "
                          f"(Jaccard {matched['jaccard']:.3f} on {self.ngram}-gram shingles, cluster {rep})")
                removed.append(Removal(rec, self.stage, "near-duplicate", detail, matched))
        return kept, removed

    def screen_miss_rate(self) -> float:
        """Probability that a pair at exactly the threshold is screened out by its MinHash estimate (binomial)."""
        if self.screen_margin is None:
            return 0.0
        t = self.threshold

        def below(k: int, margin: float) -> float:  # P(Binomial(k, t) < ceil((t - margin) k))
            cut = math.ceil((t - margin) * k - 1e-9)
            return sum(math.comb(k, i) * t ** i * (1 - t) ** (k - i) for i in range(max(cut, 0)))

        k = self.bands * self.rows
        return float(min(1.0, below(k // 3, 2 * self.screen_margin) + below(k, self.screen_margin)))

    def summary(self) -> dict[str, Any]:
        removed: dict[str, int] = {}
        clusters = 0
        if self._finalized and self._status is not None:
            counts = np.bincount(self._status, minlength=3)
            removed = {"exact-duplicate": int(counts[EXACT]), "near-duplicate": int(counts[NEAR])}
            if len(self._status):
                reps = self._near_rep[self._ref[self._status != KEEP]]
                clusters = int(len(np.unique(reps)))
        return {
            "stage": self.stage,
            "exact": self.exact,
            "near": self.near,
            "threshold": self.threshold,
            "num_perm": self.num_perm,
            "ngram": self.ngram,
            "seed": self.seed,
            "bands": self.bands,
            "rows": self.rows,
            "miss_rate_at_threshold": miss_rate(self.threshold, self.bands, self.rows),
            "screen_margin": self.screen_margin,
            "screen_miss_rate_at_threshold": self.screen_miss_rate(),
            "normalization": self.normalizer.to_dict(),
            "representative_rule": REPRESENTATIVE_RULE,
            "rows_seen": len(self._src),
            "rows_sketched": len(self._near_doc),
            "removed": removed,
            "duplicate_clusters": clusters,
            **self._stats,
        }


def _map_spill(f) -> np.ndarray:
    """The spilled shingle sets, memory-mapped (pages are read on demand, not held in memory)."""
    f.flush()
    f.seek(0, 2)
    if f.tell() == 0:
        return np.zeros(0, dtype=np.uint64)
    return np.memmap(f, dtype=np.uint64, mode="r")
