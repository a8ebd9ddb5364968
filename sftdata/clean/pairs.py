"""Exact verification of candidate pairs and clustering over the verified edges, as pure functions over arrays.

These are the steps after candidate generation in near-dedup. They take plain arrays, so the same code verifies
one partition of candidate pairs on a worker, or all of them in-process:

- :func:`set_matrix`: documents' shingle sets as a sparse 0/1 matrix (one row per document, the hash is the
  column);
- :func:`pair_jaccard`: the exact Jaccard of many document pairs at once. The intersections are scipy's sparse
  element-wise product, a merge of the two sorted rows in compiled code (measured 3.5x faster than the best
  numpy-only formulation, a sort of the pairs' packed keys, and 20x faster than Python sets);
- :func:`connected_min_labels`: the connected components of a graph given as an edge list, each node labelled
  with the smallest node of its component (min-label propagation with pointer jumping: the algorithm a distributed
  engine runs as repeated joins, here on arrays).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import scipy.sparse as sp



def set_values(hashes: np.ndarray) -> np.ndarray:
    """64-bit shingle hashes as set elements: their top 63 bits, a non-negative int64 usable as a column index."""
    return (hashes >> np.uint64(1)).astype(np.int64)


def set_matrix(values: np.ndarray, offsets: np.ndarray) -> "sp.csr_matrix":
    """Row ``d`` holds a 1 in column ``v`` for every distinct ``v`` of ``values[offsets[d]:offsets[d + 1]]``
    (:func:`set_values`, in any order, repeats allowed); scipy sorts each row and merges repeats in compiled code.
    The matrix takes ``values`` over as its index array (sorted in place): pass a copy to keep it."""
    import scipy.sparse as sp  # imported when needed: it costs every `import sftdata` half a second otherwise

    n_docs = len(offsets) - 1
    matrix = sp.csr_matrix((np.ones(len(values), dtype=bool), values.astype(np.int64, copy=False),
                            offsets.astype(np.int64, copy=False)), shape=(n_docs, np.iinfo(np.int64).max))
    matrix.sum_duplicates()
    return matrix


def pair_jaccard(sets: "sp.csr_matrix", a: np.ndarray, b: np.ndarray, chunk: int = 1 << 14) -> np.ndarray:
    """Exact Jaccard of rows ``a[i]`` and ``b[i]`` of a :func:`set_matrix` (float64, one per pair); two empty sets
    have Jaccard 0 (they are not duplicates of each other). ``chunk`` pairs are multiplied at a time."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    size = np.diff(sets.indptr).astype(np.int64)
    inter = np.zeros(len(a), dtype=np.int64)
    for i in range(0, len(a), chunk):
        both = sets[a[i:i + chunk]].multiply(sets[b[i:i + chunk]]).tocsr()
        inter[i:i + chunk] = np.diff(both.indptr)
    union = size[a] + size[b] - inter
    out = np.zeros(len(a), dtype=np.float64)
    np.divide(inter, union, out=out, where=union > 0)
    return out


def connected_min_labels(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For nodes ``0 .. n-1`` and undirected edges ``(a[i], b[i])``: each node's label is the smallest node of its
    connected component.

    Each round hooks the root of the larger label of every edge whose ends disagree onto the smaller one (labels only
    ever point to smaller nodes, so no cycle forms), then jumps pointers until every node points at a root."""
    label = np.arange(n, dtype=np.int64)
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    while len(a):
        la, lb = label[a], label[b]
        differ = la != lb
        if not differ.any():
            break
        a, b, la, lb = a[differ], b[differ], la[differ], lb[differ]  # edges already inside a component stay so
        np.minimum.at(label, np.maximum(la, lb), np.minimum(la, lb))
        while True:
            up = label[label]
            if np.array_equal(up, label):
                break
            label = up
    return label
