"""The recipe: one typed config that describes a build. It is the Python API, the file format and the CLI.

A :class:`Recipe` says where the data comes from (:class:`Source`, with mixing weights), how it is cleaned and
filtered, how it is rendered (template, tokenizer, encode options), split and packed, and where it goes.
``sftdata build --config recipe.yaml`` reads one (a ``build:`` section, or the whole file; a ``train:`` section of
the same file drives ``sftdata train``), the CLI flags are generated from the same fields and override the file,
``sftdata.build(recipe)`` takes one, the fingerprint is computed from it, and the manifest stores it, so
``sftdata build --config DIR/manifest.json`` replays a build bit for bit. Unknown keys are errors naming the valid
ones (:mod:`sftdata.config`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftdata.config import ConfigError, config_section, dataclass_from_dict, read_config_file
from sftdata.ingest.formats import FORMATS
from sftdata.record import DataError
from sftdata.render import HISTORY_POLICIES, SPECIAL_TEXT_POLICIES, TOKENIZATION_POLICIES, TRAIN_TURNS

DEFAULT_OUTPUT = "sftdata-out"
SPLIT_NAMES = ("train", "validation", "test")


def _f(default: Any, help: str, **meta: Any) -> Any:
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class Source:
    """One input of a build: a file, a list of files, a directory (a saved dataset or a folder of data files), a hub
    id, or (Python API) a ``datasets.Dataset`` / list of dicts; its format and column map; and how much of the
    training split it makes up: ``weight`` (a target share, by rows or tokens: see ``Recipe.mix_by``), ``samples`` (a
    fixed number of training examples) or ``epochs`` (a repeat factor), reached by seeded down- or up-sampling."""

    path: str | list[str] | None = _f(None, "File(s), directory or hub id.")
    data: Any = _f(None, "Python API only: a datasets.Dataset or an iterable of row dicts.")
    name: str | None = _f(None, "Label in the manifest and the build summary (default: the path).")
    format: str | None = _f(None, "Row format (default: detected).", choices=FORMATS)
    columns: dict[str, str] = _f({}, "Canonical field -> this source's field, e.g. {instruction: question}.")
    weight: float | None = _f(None, "Target share of the training split (0-1).")
    samples: int | None = _f(None, "Exactly this many training examples (down- or up-sampled).")
    epochs: float | None = _f(None, "Repeat factor for this source's training examples (0.5 keeps half).")

    def label(self, index: int) -> str:
        if self.name:
            return self.name
        if isinstance(self.path, str):
            return self.path
        if isinstance(self.path, list) and self.path:
            return self.path[0] if len(self.path) == 1 else f"{self.path[0]} (+{len(self.path) - 1})"
        return f"source{index}"

    def paths(self) -> list[str]:
        return [] if self.path is None else [self.path] if isinstance(self.path, str) else list(self.path)


@dataclass
class Recipe:
    """Everything a build does. Field names are the recipe keys and the ``sftdata build`` flags."""

    sources: list[Source] = _f([], "Inputs, with mixing weights (recipe files; on the command line: INPUTS).")
    template: str = _f("chatml", "Built-in template (see `sftdata templates`), a .jinja file, or 'tokenizer'.",
                       flags=["--template", "-t"])
    tokenizer: str | None = _f(None, "Local tokenizer directory, hub id or bundled name.",
                               default_help="the bundled qwen3 (mistral-7b-v0.1 for llama2/alpaca)")
    output: str = _f(DEFAULT_OUTPUT, "Output directory (replaced atomically).", flags=["--output", "-o"])
    seed: int = _f(0, "Seed for splits, mixing, shuffling and packing order.")
    # how rows are read
    format: str | None = _f(None, "Row format of every source without its own (default: detected per file and row).",
                            choices=FORMATS)
    columns: dict[str, str] = _f({}, "Column map for every source without its own, e.g. instruction=question,"
                                     "output=answer.", metavar="MAP", default_help="none")
    strip: bool = _f(False, "Trim whitespace around message content (default: kept exactly as written).")
    system_prompt: str | None = _f(None, "System message added to conversations that have none.", metavar="TEXT")
    max_row_bytes: int = _f(8 * 1024 * 1024, "Rows larger than this are skipped with a reason.")
    on_error: str = _f("skip", "Bad rows: skip them (counted, listed in problems.jsonl) or stop.",
                       choices=("skip", "fail"))
    max_skipped_fraction: float = _f(0.5, "Fail the build when more than this share of rows is skipped or removed "
                                          "(naming the top reasons); 1 disables the check.")
    # how they are rendered
    template_kwargs: dict[str, Any] = _f({}, 'Template variables for every row, e.g. enable_thinking=false or JSON.',
                                         metavar="MAP", default_help="none")
    template_date: str | None = _f(None, "Date (YYYY-MM-DD) rendered by templates that print today's date.",
                                   default_help="the build's date, recorded")
    train_turns: str = _f("all", "Which trained assistant turns are trained.", choices=TRAIN_TURNS)
    train_on_prompt: bool = _f(False, "Train every token, prompt included.")
    special_text: str = _f("reject", "Content holding a control-token string (<|im_end|>, [INST] ...): skip the row, "
                                     "or escape it with U+200B so it stays text.", choices=SPECIAL_TEXT_POLICIES)
    history_policy: str = _f("auto", "A turn the template renders differently in history than as the final turn: its "
                                     "own example as served (auto, split), context (last), or a skipped row (fail).",
                             choices=HISTORY_POLICIES)
    tokenization: str = _f("auto", "A turn whose serving prompt merges with the reply in context: tok(prompt) + "
                                   "tok(reply) as a server feeds it (auto), or a skipped row (context).",
                           choices=TOKENIZATION_POLICIES)
    allow_unverified: bool = _f(False, "Build even when the template/tokenizer pair fails the preflight checks.")
    max_length: int | None = _f(None, "Truncate (or pack) to N tokens.")
    truncation: str = _f("right", "Over-long examples: cut from the right or drop.", choices=("right", "drop"))
    # cleaning and filters
    filters: dict[str, Any] = _f({}, "Quality filters (see docs/filters.md), e.g. {min_response_chars: 50}.")
    dedup: dict[str, Any] | None = _f(None, "Exact + MinHash near-dedup options, e.g. {threshold: 0.8} ({} for the "
                                            "defaults); null disables it.")
    decontaminate: dict[str, Any] | None = _f(None, "Eval decontamination: {eval: [files], ...options}.")
    # splits, mixing, packing
    splits: dict[str, float] = _f({"train": 1.0}, "Split fractions, e.g. train=0.8,validation=0.1,test=0.1.",
                                  metavar="MAP", default_help="train=1")
    split_by: str = _f("conversation", "What stays together in one split: each conversation (all its examples), "
                                       "or the name of a field holding a group id (a session, a document).")
    stratify: bool = _f(False, "Give every source the split fractions exactly (instead of in expectation).")
    mix_by: str = _f("rows", "What source weights count: rows or tokens of the training split.",
                     choices=("rows", "tokens"))
    shuffle: bool = _f(True, "Shuffle every split (seeded).")
    pack: bool = _f(False, "Pack examples into rows of max_length tokens (best-fit decreasing).")
    # running
    report: str | None = _f(None, "Also write the removed rows (dedup, decontamination, filters, mixing) here.")
    engine: str = _f("local", "Where reading and per-row work run: this machine (local, see workers) or a Ray "
                              "cluster (ray: pip install 'sftdata[ray]'). The output is the same.",
                     choices=("local", "ray"))
    ray_address: str | None = _f(None, "Ray cluster to connect to: auto (the `ray start` cluster of this machine) or "
                                       "HOST:PORT (default: a local Ray started for the build).")
    ray_dedup: str = _f("cluster", "Engine ray: where dedup clusters the sketches the workers compute: on the cluster "
                                   "(Ray Data group-bys and joins) or on the driver (in-process, far cheaper per core "
                                   "while the sketches fit one machine: docs/scale.md). The output is the same.",
                        choices=("cluster", "driver"))
    workers: int = _f(1, "Encoder processes of the local engine (1 = in-process).")
    batch_size: int = _f(1000, "Rows per batch.")
    train: dict[str, Any] | None = _f(None, "The `sftdata train` settings (read by `sftdata train --config`).")

    def __post_init__(self) -> None:
        self.sources = [s if isinstance(s, Source) else _source(s, i) for i, s in enumerate(self.sources)]

    # -- checks ---------------------------------------------------------------------------------------------------
    def validate(self) -> "Recipe":
        """Raise :class:`DataError` for combinations that cannot be built (one line naming the key)."""
        if not self.sources:
            raise DataError("no input given: pass INPUTS or a recipe with sources")
        for i, s in enumerate(self.sources):
            if s.path is None and s.data is None:
                raise DataError(f"sources[{i}]: needs a path (or, from Python, data)")
            given = [k for k in ("weight", "samples", "epochs") if getattr(s, k) is not None]
            if len(given) > 1:
                raise DataError(f"sources[{i}] ({s.label(i)}): give one of weight, samples, epochs, not {' and '.join(given)}")
            if s.weight is not None and not 0 < s.weight <= 1:
                raise DataError(f"sources[{i}] ({s.label(i)}): weight must be in (0, 1], not {s.weight}")
            if s.samples is not None and s.samples < 0 or s.epochs is not None and s.epochs < 0:
                raise DataError(f"sources[{i}] ({s.label(i)}): samples and epochs must be >= 0")
        weights = [s.weight for s in self.sources if s.weight is not None]
        if sum(weights) > 1 + 1e-9:
            raise DataError(f"source weights add up to {sum(weights):g} > 1")
        if weights and len(weights) == len(self.sources) and abs(sum(weights) - 1) > 1e-6:
            raise DataError(f"every source has a weight, so they must add up to 1, not {sum(weights):g}")
        unknown = [k for k in self.splits if k not in SPLIT_NAMES]
        if unknown:
            raise DataError(f"splits: unknown split {unknown[0]!r}; valid: {', '.join(SPLIT_NAMES)}")
        if "train" not in self.splits or self.splits["train"] <= 0:
            raise DataError("splits: needs a train fraction > 0")
        if any(v < 0 for v in self.splits.values()) or abs(sum(self.splits.values()) - 1) > 1e-6:
            raise DataError(f"splits: fractions must be >= 0 and add up to 1, not {sum(self.splits.values()):g}")
        if self.pack and not self.max_length:
            raise DataError("pack needs max_length (the packed row length)")
        if not 0 <= self.max_skipped_fraction <= 1:
            raise DataError(f"max_skipped_fraction must be in [0, 1], not {self.max_skipped_fraction}")
        if self.decontaminate is not None and not self.decontaminate.get("eval"):
            raise DataError("decontaminate: needs eval: [files]")
        if self.engine == "local" and self.ray_address:
            raise DataError("ray_address needs engine: ray")
        return self

    # -- serialization --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (what the manifest stores); Python-only ``data`` sources are named, not stored."""
        out = dataclasses.asdict(self)
        out["sources"] = [{k: v for k, v in dataclasses.asdict(s).items() if k != "data" and v not in (None, {}, [])}
                          | ({"data": f"<{type(s.data).__name__}>"} if s.data is not None else {})
                          for s in self.sources]
        return out

    def fingerprint_dict(self) -> dict[str, Any]:
        """The fields that change what a build writes (not where it goes, how it runs or what it reports)."""
        out = self.to_dict()
        for key in ("output", "report", "engine", "ray_address", "ray_dedup", "workers", "batch_size", "train"):
            out.pop(key, None)
        for s in out["sources"]:
            s.pop("path", None)  # inputs are fingerprinted by content, not by name
            s.pop("data", None)
        return out


def _source(value: Any, index: int) -> Source:
    if isinstance(value, str):
        return Source(path=value)
    if isinstance(value, dict):
        return dataclass_from_dict(Source, value, source=f"sources[{index}]")
    if hasattr(value, "column_names") or isinstance(value, list):  # a datasets.Dataset or a list of row dicts
        return Source(data=value)
    raise ConfigError(f"sources[{index}]: a path, a mapping or a dataset, not {type(value).__name__}")


def recipe_from_dict(data: dict[str, Any], *, source: str = "recipe") -> Recipe:
    """A :class:`Recipe` from a mapping (a recipe file's ``build:`` section, or a manifest's ``recipe``)."""
    data = dict(data)
    sources = data.pop("sources", [])
    if not isinstance(sources, list):
        raise ConfigError(f"{source}: sources must be a list")
    recipe = dataclass_from_dict(Recipe, data, source=source)
    recipe.sources = [_source(s, i) for i, s in enumerate(sources)]
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe file (YAML or JSON: its ``build:`` section, or the whole file), or a build's ``manifest.json``
    (its ``recipe``: replays that build). Relative source paths are taken relative to the current directory."""
    data = read_config_file(path)
    if isinstance(data.get("format"), str) and data["format"].startswith("sftdata/"):
        if "recipe" not in data:
            raise ConfigError(f"{path}: this manifest was written before recipes were recorded; rebuild it once")
        return recipe_from_dict(data["recipe"], source=f"{path} (recipe)")
    section = config_section(data, "build", source=str(path))
    if "build" in data and "train" in data:
        section["train"] = data["train"]  # one file drives build and train: keep the train section with the recipe
    return recipe_from_dict(section, source=str(path))
