"""Splits and mixing: pure functions over arrays of per-example facts, computed from global counts.

* **Splits** (:func:`assign_splits`): each example carries a stable 64-bit hash of its *group* (the conversation it
  comes from, or a named field such as a session or document id), so every example of a group lands in the same
  split and a rebuild assigns the same split. Without stratification a group goes to the split whose cumulative
  fraction interval holds its hash (fractions hold in expectation); with ``stratify`` the groups of each source are
  ranked by hash and cut at the fractions, so every source gets them exactly (to one group).
* **Mixing** (:func:`plan_mix`): the training split's sources reach their target shares by seeded down- or
  up-sampling of whole records (all examples of a conversation together). Targets, in rows or tokens
  (``mix_by``): a source with ``samples`` or ``epochs`` gets exactly that; one with neither keeps what it has; the
  weighted sources share the rest so that each makes up its ``weight`` of the whole split. When every source is
  weighted, the one with the largest weight keeps all its data and the others are sampled to match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import xxhash

SPLIT_ORDER = ("train", "validation", "test")


def group_hash(key: str, seed: int) -> int:
    """The stable 64-bit hash of a group key (seeded: another seed gives another split)."""
    return xxhash.xxh64_intdigest(f"{seed}:{key}".encode("utf-8"))


def assign_splits(hashes: np.ndarray, fractions: dict[str, float], strata: np.ndarray | None = None) -> np.ndarray:
    """Index into :data:`SPLIT_ORDER` for each example, from its group hash (``uint64``); ``strata`` (e.g. the source
    index) makes the fractions exact per stratum, counted in groups."""
    names = [s for s in SPLIT_ORDER if fractions.get(s, 0) > 0]
    codes = np.array([SPLIT_ORDER.index(s) for s in names], dtype=np.int8)
    bounds = np.cumsum([fractions[s] for s in names])
    bounds[-1] = 1.0
    if strata is None:
        position = hashes.astype(np.float64) / 2.0**64
    else:
        position = np.zeros(hashes.size, dtype=np.float64)
        for stratum in np.unique(strata):
            members = np.flatnonzero(strata == stratum)
            groups, inverse = np.unique(hashes[members], return_inverse=True)  # sorted by hash: a seeded random order
            position[members] = (np.arange(groups.size, dtype=np.float64) + 0.5)[inverse] / groups.size
    return codes[np.searchsorted(bounds, position, side="right").clip(max=len(names) - 1)]


@dataclass
class MixTarget:
    """How one source enters the training split."""

    weight: float | None = None
    samples: int | None = None
    epochs: float | None = None


def source_targets(amounts: np.ndarray, rows: np.ndarray, targets: Sequence[MixTarget], by_tokens: bool) -> np.ndarray:
    """The target amount (rows, or tokens when ``by_tokens``) of each source, given what each has (``amounts`` in the
    mix unit, ``rows``) and how it is asked to enter."""
    n = len(targets)
    goal = np.zeros(n, dtype=np.float64)
    fixed = np.zeros(n, dtype=bool)
    for i, t in enumerate(targets):
        if t.samples is not None:
            per_row = amounts[i] / rows[i] if rows[i] else 0.0
            goal[i], fixed[i] = t.samples * (per_row if by_tokens else 1.0), True
        elif t.epochs is not None:
            goal[i], fixed[i] = t.epochs * amounts[i], True
        elif t.weight is None:
            goal[i], fixed[i] = amounts[i], True
    weighted = [i for i, t in enumerate(targets) if not fixed[i]]
    if weighted:
        w = np.array([targets[i].weight for i in weighted], dtype=np.float64)
        rest = goal[fixed].sum()
        if fixed.any() and w.sum() < 1:
            total = rest / (1.0 - w.sum())
        else:  # every source weighted: the largest weight keeps all of its data
            anchor = weighted[int(np.argmax(w))]
            total = amounts[anchor] / targets[anchor].weight if targets[anchor].weight else 0.0
        for i, wi in zip(weighted, w):
            goal[i] = wi * total
    return goal


def sample_to(amounts: np.ndarray, goal: float, rng: np.random.Generator) -> np.ndarray:
    """How many times to take each unit so the taken amount is as close as possible to ``goal``: every unit as many
    whole times as fit, then a seeded random subset for the remainder (a prefix of a permutation)."""
    total = float(amounts.sum())
    count = np.zeros(amounts.size, dtype=np.int64)
    if amounts.size == 0 or total <= 0 or goal <= 0:
        return count
    whole = int(goal // total)
    count += whole
    rest = goal - whole * total
    if rest > 0:
        order = rng.permutation(amounts.size)
        cum = np.cumsum(amounts[order])
        k = int(np.searchsorted(cum, rest))  # cum[k] >= rest: take k or k+1 units, whichever lands nearer
        if k < order.size and (k == 0 or abs(cum[k] - rest) <= abs(cum[k - 1] - rest)):
            k += 1
        count[order[:k]] += 1
    return count


def plan_mix(unit_source: np.ndarray, unit_rows: np.ndarray, unit_tokens: np.ndarray, targets: Sequence[MixTarget],
             *, by_tokens: bool, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """How many times each unit (a record: all its training examples) enters the training split, and a report of
    targets and achieved shares per source (rows and tokens)."""
    n = len(targets)
    unit_amount = unit_tokens if by_tokens else unit_rows
    amounts = np.bincount(unit_source, weights=unit_amount, minlength=n)
    rows = np.bincount(unit_source, weights=unit_rows, minlength=n)
    goal = source_targets(amounts, rows, targets, by_tokens)
    rng = np.random.default_rng(seed)
    count = np.zeros(unit_source.size, dtype=np.int64)
    for i in range(n):
        members = np.flatnonzero(unit_source == i)
        count[members] = sample_to(unit_amount[members].astype(np.float64), goal[i], rng)
    taken_rows = np.bincount(unit_source, weights=unit_rows * count, minlength=n)
    taken_tokens = np.bincount(unit_source, weights=unit_tokens * count, minlength=n)
    report = {
        "by": "tokens" if by_tokens else "rows",
        "sources": [{"available_rows": int(rows[i]), "available_tokens": int(np.bincount(
                        unit_source, weights=unit_tokens, minlength=n)[i]),
                     "target": round(float(goal[i]), 2), "rows": int(taken_rows[i]), "tokens": int(taken_tokens[i]),
                     "share_rows": round(float(taken_rows[i] / taken_rows.sum()), 6) if taken_rows.sum() else 0.0,
                     "share_tokens": round(float(taken_tokens[i] / taken_tokens.sum()), 6) if taken_tokens.sum() else 0.0,
                     **({"weight": targets[i].weight} if targets[i].weight is not None else {}),
                     **({"samples": targets[i].samples} if targets[i].samples is not None else {}),
                     **({"epochs": targets[i].epochs} if targets[i].epochs is not None else {})}
                    for i in range(n)],
    }
    return count, report
