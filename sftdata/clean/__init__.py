"""Cleaning stages: exact and MinHash-LSH near-duplicate removal, and eval-set decontamination.

Stage objects work on batches of :class:`~sftdata.record.Record` (used by ``sftdata build``); :func:`dedup` and
:func:`decontaminate` are the file-to-file API behind the ``sftdata dedup`` / ``sftdata decontaminate`` commands.
See ``docs/cleaning.md`` for the rules and the measured figures.
"""

from sftdata.clean.api import decontaminate, dedup
from sftdata.clean.decontaminate import Decontaminator
from sftdata.clean.dedup import REPRESENTATIVE_RULE, Deduplicator
from sftdata.clean.io import DEFAULT_EVAL_FIELDS, EvalSegment, load_eval_segments
from sftdata.clean.normalize import Normalizer, record_text

__all__ = [
    "DEFAULT_EVAL_FIELDS",
    "REPRESENTATIVE_RULE",
    "Decontaminator",
    "Deduplicator",
    "EvalSegment",
    "Normalizer",
    "decontaminate",
    "dedup",
    "load_eval_segments",
    "record_text",
]
