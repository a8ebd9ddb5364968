"""The per-row part of a build, composed from the recipe's stages: filters → decontamination → render/tokenize with
exact masks → truncate → token filters, one batch of records at a time.

:class:`RowPipeline` is what every engine runs: in-process, in a process pool, or as a Ray Data ``map_batches``
function. It is built from plain data (template source, tokenizer location, options): pickling it ships that spec,
and a worker loads the tokenizer and compiles the template once, on its first batch. ``process`` is a pure function
of its batch: it returns the examples as an Arrow table (the staging format every engine writes) with the per-batch
counters, problems and removals that the driver merges.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import xxhash

from sftdata.record import Problem, Record, Removal
from sftdata.render import EncodeOptions, Encoded, Encoder, truncate
from sftdata.write import UNPACKED_SCHEMA

# Columns of the staging table: what the output needs, plus what splits and mixing are computed from.
STAGE_SCHEMA = pa.schema(list(UNPACKED_SCHEMA) + [
    pa.field("origin", pa.int16()),   # index of the recipe source the row came from
    pa.field("group", pa.uint64()),   # stable hash of the split group (the conversation, or the split_by field)
])


@dataclass
class PipelineSpec:
    """Everything a worker needs to rebuild the pipeline: plain data only."""

    template: Any  # a ChatTemplate (pickles as its source) or a template spec string
    tokenizer: str | None
    default_template: str
    encode: EncodeOptions
    max_length: int | None = None
    truncation: str = "right"
    split_by: str = "conversation"
    seed: int = 0
    filters: dict[str, Any] = field(default_factory=dict)
    decontaminate: dict[str, Any] | None = None


@dataclass
class BatchOutput:
    """One batch through the pipeline: the kept examples (staging columns), and everything the driver adds up."""

    table: pa.Table
    problems: list[Problem] = field(default_factory=list)
    removals: list[Removal] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    survivors: list[Record] = field(default_factory=list)  # records with an example kept (for dedup sketching)


class RowPipeline:
    """The per-row stages of a recipe; see the module docstring."""

    def __init__(self, spec: PipelineSpec, *, tokenizer: Any = None, encoder: Encoder | None = None,
                 decontaminator: Any = None):
        """``tokenizer``, ``encoder``, ``decontaminator``: already built (an engine that ships the loaded tokenizer
        and the eval index to its workers once); otherwise each is built from ``spec`` on first use."""
        self.spec = spec
        self._tokenizer = tokenizer
        self._encoder = encoder
        self._decontaminator = decontaminator
        self._stages: tuple[Any, Any, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec}  # the tokenizer and compiled template are rebuilt in the worker

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["spec"])

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            from sftdata.templates import ChatTemplate, load_template
            from sftdata.tokenizer import load_tokenizer

            tok = self._tokenizer or load_tokenizer(self.spec.tokenizer, template=self.spec.default_template)
            template = self.spec.template
            if not isinstance(template, ChatTemplate):
                template = load_template(template, tok)
            self._encoder = Encoder(template, tok, self.spec.encode)
        return self._encoder

    @property
    def stages(self) -> tuple[Any, Any, Any]:
        """(record filter, decontaminator, token filter), each None when the recipe does not ask for it."""
        if self._stages is None:
            record_filter = token_filter = decontaminator = None
            if self.spec.filters:
                from sftdata.filter import FilterOptions, filters_from_options
                from sftdata.config import dataclass_from_dict

                record_filter, token_filter = filters_from_options(
                    dataclass_from_dict(FilterOptions, self.spec.filters, source="filters"))
            if self._decontaminator is not None:
                decontaminator = self._decontaminator
            elif self.spec.decontaminate:
                from sftdata.clean import Decontaminator

                options = dict(self.spec.decontaminate)
                decontaminator = Decontaminator(list(options.pop("eval")), **options)
            self._stages = (record_filter, decontaminator, token_filter)
        return self._stages

    def group_key(self, record: Record) -> str:
        """What keeps examples together in one split: by default the conversation's content (so exact duplicates can
        never straddle train and test) or, for a raw-text file read in parts, the file; else a named field."""
        if self.spec.split_by != "conversation":
            value = record.extra.get(self.spec.split_by)
            return f"field:{value}" if value is not None else f"row:{record.source}:{record.row}"
        if not record.is_chat and record.source.lower().removesuffix(".gz").endswith(".txt"):
            return f"file:{record.source}"
        content = [m.to_json() for m in record.messages] if record.is_chat else record.text
        return json.dumps([content, record.tools], ensure_ascii=False, sort_keys=True, default=str)

    def process(self, records: list[Record], origin: int = 0) -> BatchOutput:
        """Run one batch of records through every per-row stage."""
        out = BatchOutput(table=STAGE_SCHEMA.empty_table())
        record_filter, decontaminator, token_filter = self.stages
        for stage in (record_filter, decontaminator):
            if stage is None or not records:
                continue
            if hasattr(stage, "process"):
                result = stage.process(records)
                records, removals = result.kept, result.removals
                out.problems.extend(result.problems)
                out.counts.update({f"{stage.name}:{k}": v for k, v in result.counts.items()})
            else:
                records, removals = stage.filter_batch(records)
            out.removals.extend(removals)
        for record in records:
            if record.is_chat:
                out.counts[f"conversations_with_turns:{sum(m.role == 'assistant' for m in record.messages)}"] += 1
        examples, problems = self.encoder.encode_batch(records)
        out.problems.extend(problems)
        examples = self._truncate(examples, out)
        if token_filter is not None and examples:
            result = token_filter.process_examples(examples)
            examples = result.kept
            out.removals.extend(result.removals)
            out.problems.extend(result.problems)
            out.counts.update({f"{token_filter.name}:{k}": v for k, v in result.counts.items()})
        kept_rows = {(e.source, e.row) for e in examples}
        survivors = [r for r in records if (r.source, r.row) in kept_rows]
        groups = {(r.source, r.row): xxhash.xxh64_intdigest(f"{self.spec.seed}:{self.group_key(r)}".encode("utf-8"))
                  for r in survivors}
        out.survivors = survivors
        for e in examples:
            out.counts.update(e.counts)
            for s, end in e.spans:
                if not e.is_text and not (e.truncated and end >= (self.spec.max_length or 0)):
                    out.counts[f"end_id:{e.input_ids[end - 1]}"] += 1
        out.table = _table(examples, origin, groups)
        return out

    def _truncate(self, examples: list[Encoded], out: BatchOutput) -> list[Encoded]:
        limit = self.spec.max_length
        if not limit:
            return examples
        kept = []
        for example in examples:
            if len(example.input_ids) <= limit or example.is_text and self.spec.truncation == "blocks":
                kept.append(example)
                continue
            if self.spec.truncation == "drop":
                out.problems.append(_too_long(example, limit, "dropped (truncation: drop)"))
                continue
            cut = truncate(example, limit)
            if cut is None:
                out.problems.append(_too_long(example, limit, "truncation would leave no trained token"))
                continue
            out.counts["truncated"] += 1
            out.counts["tokens_lost_to_truncation"] += len(example.input_ids) - len(cut.input_ids)
            out.counts["trained_tokens_lost_to_truncation"] += example.num_trained - cut.num_trained
            kept.append(cut)
        return kept


def _too_long(example: Encoded, limit: int, why: str) -> Problem:
    return Problem(example.source, example.row, "truncate", "too-long",
                   f"{len(example.input_ids)} tokens > max_length {limit}: {why}")


def _table(examples: list[Encoded], origin: int, groups: dict[tuple[str, int], int]) -> pa.Table:
    return pa.table({
        "input_ids": [e.input_ids for e in examples],
        "labels": [e.labels for e in examples],
        "source": [e.source for e in examples],
        "row": [e.row for e in examples],
        "num_tokens": [len(e.input_ids) for e in examples],
        "num_trained": [e.num_trained for e in examples],
        "truncated": [e.truncated for e in examples],
        "kinds": [e.kinds for e in examples],
        "origin": [origin] * len(examples),
        "group": [groups[(e.source, e.row)] for e in examples],
    }, schema=STAGE_SCHEMA)


def data_source_file(data: Any, directory: Path, index: int) -> Path:
    """A Python-API source (a ``datasets.Dataset`` or an iterable of row dicts) written as JSON lines, so it is read,
    checked and fingerprinted exactly like a file."""
    path = directory / f"data-source-{index}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for row in data:
            f.write(json.dumps(dict(row), ensure_ascii=False, default=str) + "\n")
    return path
