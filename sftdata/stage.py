"""The stage protocol: every step of a build is a small object with a batch function and mergeable counters.

A stage is built from plain data (its options), so it pickles to a worker process or to another machine, and its
``process`` is a pure function of the batch it is given: the same stage runs in-process, in a process pool or as a
Ray Data ``map_batches`` function, and an engine merges the per-batch results in any order.

* A :class:`RecordStage` works on :class:`~sftdata.record.Record` batches (before tokenization: quality filters,
  decontamination); an :class:`ExampleStage` on :class:`~sftdata.render.Encoded` batches (after it: token-length
  filters). Both return a :class:`StageResult`: what is kept, and for what is not, a :class:`~sftdata.record.Problem`
  (the row cannot be used as written) or a :class:`~sftdata.record.Removal` (a deliberate cleaning decision), plus
  counters keyed by reason.
* Global decisions that need every row (dedup, splits, mixing, packing) are explicit passes of the engine, fed by the
  per-batch results of the stages.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from sftdata.record import Problem, Removal

T = TypeVar("T")


@dataclass
class StageResult(Generic[T]):
    """One batch through one stage: the items kept (in input order), the problems and removals of the others, and
    counters (by reason, or any other stage-specific count) that the engine adds up across batches."""

    kept: list[T]
    problems: list[Problem] = field(default_factory=list)
    removals: list[Removal] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)


@runtime_checkable
class RecordStage(Protocol):
    """A per-row stage over records; ``name`` keys its counters and removals in the manifest."""

    name: str

    def process(self, records: list[Any]) -> StageResult: ...

    def summary(self, counts: Counter) -> dict[str, Any]:
        """What the manifest records for this stage, given its counters summed over every batch."""
        ...


@runtime_checkable
class ExampleStage(Protocol):
    """A per-example stage over encoded examples (after tokenization)."""

    name: str

    def process_examples(self, examples: list[Any]) -> StageResult: ...

    def summary(self, counts: Counter) -> dict[str, Any]: ...
