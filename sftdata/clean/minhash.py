"""Vectorized MinHash and banded LSH.

Signatures use datasketch's ``affine32`` scheme (its default since 2.0): each 32-bit shingle hash is pre-mixed
with the MurmurHash3 32-bit finalizer, then permutation ``k`` is ``a_k * h + b_k mod 2^32`` with ``a_k`` odd,
and ``(a, b)`` drawn exactly as datasketch draws them from ``RandomState(seed)``. Given the same 32-bit input
hashes, a signature here is bit-identical to ``datasketch.MinHash(num_perm, seed).update_batch(...)``; the
difference is that a whole batch of documents is sketched in a few numpy operations instead of one Python
object and one hash call per shingle.

LSH: ``bands x rows`` chosen so that a pair at exactly the threshold is missed with probability
``(1 - t**rows) ** bands`` below ``max_miss`` (default 1%), taking the most rows (fewest spurious candidates)
that achieve it. For t = 0.8 and 128 permutations that is 21 x 6: miss 0.17% at J = 0.8, versus ~60% for
datasketch's automatic choice at the same threshold. Every candidate is then verified with exact Jaccard.
"""

from __future__ import annotations

import numpy as np

U64 = np.uint64
U32 = np.uint32
EMPTY = np.uint32(0xFFFFFFFF)


def miss_rate(threshold: float, bands: int, rows: int) -> float:
    """Probability that a pair with Jaccard exactly ``threshold`` shares no band (is never a candidate)."""
    return float((1.0 - threshold ** rows) ** bands)


def choose_bands(threshold: float, num_perm: int, max_miss: float = 0.01) -> tuple[int, int]:
    """``(bands, rows)`` with the most rows per band whose miss rate at ``threshold`` is at most ``max_miss``."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], not {threshold}")
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if bands < 1:
            break
        if miss_rate(threshold, bands, rows) <= max_miss:
            best = (bands, rows)
    return best


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``(a, b)`` datasketch's ``affine32`` scheme draws for ``MinHash(num_perm, seed)``."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=U32) * U32(2) + U32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=U64).astype(U32)
    return a, b


def fold32(h64: np.ndarray) -> np.ndarray:
    """The 32-bit shingle hash fed to MinHash: the two halves of the 64-bit shingle hash xor-ed."""
    return (h64 ^ (h64 >> U64(32))).astype(U32)


class MinHasher:
    def __init__(self, num_perm: int = 128, seed: int = 1, chunk_rows: int = 4096):
        if num_perm < 1:
            raise ValueError("num_perm must be positive")
        self.num_perm = num_perm
        self.seed = seed
        self.a, self.b = permutations(num_perm, seed)
        self.chunk_rows = chunk_rows

    def signatures(self, sets: np.ndarray, offsets: np.ndarray, columns: int | None = None) -> np.ndarray:
        """``(docs, columns)`` uint32 signatures of the shingle sets ``sets[offsets[d]:offsets[d+1]]``.

        Documents without shingles get the all-``0xFFFFFFFF`` signature (datasketch's empty sketch)."""
        from sftdata.clean.normalize import fmix32

        k = self.num_perm if columns is None else columns
        a = self.a[:k]
        b = self.b[:k]
        n_docs = len(offsets) - 1
        out = np.full((n_docs, k), EMPTY, dtype=U32)
        if n_docs == 0 or len(sets) == 0:
            return out
        x = fmix32(fold32(sets))
        counts = np.diff(offsets)
        nonempty = np.flatnonzero(counts > 0)
        # chunks of consecutive non-empty documents holding about chunk_rows shingles; the (perm, shingle)
        # layout keeps each document's shingles contiguous for the min-reduction
        cum = offsets[nonempty + 1]
        out_t = np.empty((k, len(nonempty)), dtype=U32)
        b_col = b[:, None]
        i = 0
        while i < len(nonempty):
            lo = offsets[nonempty[i]]
            stop = max(int(np.searchsorted(cum, lo + self.chunk_rows, side="right")), i + 1)
            hi = cum[stop - 1]
            with np.errstate(over="ignore"):
                m = np.multiply.outer(a, x[lo:hi])
                m += b_col
            out_t[:, i:stop] = np.minimum.reduceat(m, offsets[nonempty[i:stop]] - lo, axis=1)
            i = stop
        out[nonempty] = out_t.T
        return out


_BAND_MULT = U64(0x9E3779B97F4A7C15)


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """``(docs, bands)`` 64-bit keys: band ``j`` hashes signature columns ``j*rows .. (j+1)*rows-1``."""
    from sftdata.clean.normalize import fmix64

    n = sig.shape[0]
    keys = np.empty((n, bands), dtype=U64)
    s64 = sig.astype(U64)
    with np.errstate(over="ignore"):
        for j in range(bands):
            acc = np.full(n, U64(j + 1), dtype=U64)
            for r in range(rows):
                acc = acc * _BAND_MULT + s64[:, j * rows + r]
            keys[:, j] = fmix64(acc)
    return keys


def bucket_pairs(keys: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """All pairs of documents sharing at least one band key, as sorted unique int64 codes ``i * n + j`` (i < j)."""
    n = keys.shape[0]
    ids = np.arange(n, dtype=np.int64) if valid is None else np.flatnonzero(valid).astype(np.int64)
    codes = []
    for j in range(keys.shape[1]):
        col = keys[ids, j]
        order = np.argsort(col, kind="stable")
        ks = col[order]
        docs = ids[order]
        same = ks[1:] == ks[:-1]
        if not same.any():
            continue
        # runs of equal keys: [run_start, run_end)
        boundary = np.flatnonzero(np.concatenate(([True], ~same, [True])))
        run_start = boundary[:-1]
        run_len = np.diff(boundary)
        multi = run_len > 1
        run_start, run_len = run_start[multi], run_len[multi]
        # every element q of a run pairs with the elements after it in the run
        elem_pos = _run_positions(run_start, run_len)
        elem_run_end = np.repeat(run_start + run_len, run_len)
        per = elem_run_end - elem_pos - 1
        total = int(per.sum())
        if total == 0:
            continue
        first = np.repeat(elem_pos, per)
        block_start = np.repeat(np.cumsum(per) - per, per)
        second = first + 1 + (np.arange(total) - block_start)
        a = docs[first]
        b = docs[second]
        lo = np.minimum(a, b)
        hi = np.maximum(a, b)
        codes.append(lo * n + hi)
    if not codes:
        return np.zeros(0, dtype=np.int64)
    allc = np.sort(np.concatenate(codes))
    keep = np.ones(len(allc), dtype=bool)
    keep[1:] = allc[1:] != allc[:-1]
    return allc[keep]


def _run_positions(run_start: np.ndarray, run_len: np.ndarray) -> np.ndarray:
    total = int(run_len.sum())
    base = np.repeat(run_start - (np.cumsum(run_len) - run_len), run_len)
    return base + np.arange(total)


def jaccard_sorted(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard of two sorted unique arrays; two empty sets have Jaccard 0 (they are not duplicates)."""
    if len(a) == 0 or len(b) == 0:
        return 0.0
    if len(a) > len(b):
        a, b = b, a
    idx = np.searchsorted(b, a)
    idx[idx == len(b)] = 0
    inter = int(np.count_nonzero(b[idx] == a))
    return inter / (len(a) + len(b) - inter)
