"""Vectorized index helpers shared by the numpy-heavy stages (packing, decontamination)."""

from __future__ import annotations

import numpy as np


def concat_ranges(begins: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``concat(arange(b, e) for b, e in zip(begins, ends))`` without a Python loop, and the offsets of each range
    in the result (``len(begins) + 1`` values)."""
    counts = ends - begins
    offsets = np.zeros(begins.size + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    within = np.arange(int(offsets[-1])) - np.repeat(offsets[:-1], counts)
    return np.repeat(begins, counts) + within, offsets


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """``np.unique(values)`` (flattened, sorted, distinct) by one sort. NumPy >= 2.3 answers a plain ``np.unique``
    with a hash table, measured 100x slower than sorting on millions of distinct 64-bit integers."""
    s = np.sort(values.ravel())
    if s.size > 1:
        keep = np.empty(s.size, dtype=bool)
        keep[0] = True
        np.not_equal(s[1:], s[:-1], out=keep[1:])
        s = s[keep]
    return s
