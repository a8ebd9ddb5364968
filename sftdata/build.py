"""``build``: run a :class:`~sftdata.recipe.Recipe` — read → filter → decontaminate → render/tokenize → truncate → dedup
→ split → mix → (pack) → write.

A build is three phases:

1. **Per row** (streaming, any engine): every source is read in batches and each batch goes through the
   :class:`~sftdata.pipeline.RowPipeline`; the examples are staged in an Arrow file, the counters, problems and
   removals merged, and the records that produced an example are sketched for dedup.
2. **Dedup** (global): clusters are formed over the rows that passed every per-row check, so the representative kept
   for a cluster is always a row that is in the output.
3. **Splits, mixing, writing** (global, over per-example facts only): each example's split comes from its group
   hash, the training split is mixed to the sources' target shares by seeded sampling of whole conversations, every
   split is shuffled (and packed: planned on the lengths), and written to ``DIR/<split>/`` next to ``manifest.json``,
   shard by shard (:func:`write_split_shard`: in a loop here, one Ray task per shard with engine ray).

Every row read ends in exactly one place: kept (in a split), skipped (``problems.jsonl``, by kind) or removed
(``removed.jsonl``, by reason): ``rows_read == rows_kept + skipped + removed`` in the manifest.
"""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sftdata import __version__
from sftdata.ingest import ReadStats, input_size, parse_columns, read_records, resolve_inputs
from sftdata.mix import SPLIT_ORDER, MixTarget, assign_splits, plan_mix
from sftdata.pipeline import STAGE_SCHEMA, BatchOutput, PipelineSpec, RowPipeline, data_source_file
from sftdata.policy import plan_history_policy
from sftdata.recipe import DEFAULT_OUTPUT, Recipe, Source, load_recipe
from sftdata.record import DataError, ProblemLog, Record, Removal
from sftdata.render import EncodeOptions, Encoder
from sftdata.templates import load_template
from sftdata.tokenizer import load_tokenizer, tokenizer_identity
from sftdata.verify import preflight
from sftdata.write import (
    FORMAT,
    LABELS_NOTE,
    SHARD_ROWS,
    UNPACKED_SCHEMA,
    OutputClaim,
    check_output_files,
    check_output_paths,
    chunk_ranges,
    file_sha256,
    fingerprint,
    is_sftdata_output,
    output_files,
    read_manifest,
    shard_ranges,
    write_manifest,
    write_shard,
)

__all__ = ["BuildResult", "DEFAULT_OUTPUT", "build", "run_recipe"]

GATHER_ROWS = 50_000  # examples gathered from the staging file at a time when writing a split


@dataclass
class BuildResult:
    output: Path
    manifest: dict[str, Any]
    up_to_date: bool = False


# -- entry points ---------------------------------------------------------------------------------------------------

def build(inputs: Any = None, *, config: str | Path | Recipe | None = None, force: bool = False, progress: bool = False,
          console: Any = None, **options: Any) -> BuildResult:
    """Build training-ready token data (Parquet per split + ``manifest.json``).

    ``inputs``: paths (a file, a list of files, a directory, a hub id), a ``datasets.Dataset``, a list of row dicts, or
    a :class:`~sftdata.recipe.Recipe`. ``config``: a recipe (file path, or a ``manifest.json`` to replay its build).
    ``options``: any recipe field (``template=``, ``max_length=``, ``splits=`` ...), overriding the config; also the
    shorthands ``eval_fraction`` (a validation split), ``dedup=True`` with ``dedup_options``, and ``decontaminate=[eval
    files]`` with ``decontaminate_options``. When the output already holds a build with the same fingerprint and every
    file it records is intact, nothing is redone unless ``force``.
    """
    recipe = recipe_for(inputs, config, options)
    return run_recipe(recipe, force=force, progress=progress, console=console)


def recipe_for(inputs: Any, config: str | Path | Recipe | None, options: dict[str, Any]) -> Recipe:
    """The recipe a ``build()`` call describes: the config (a Recipe or a file), the inputs as sources, the options."""
    if isinstance(inputs, Recipe):
        config, inputs = inputs, None
    recipe = replace(config) if isinstance(config, Recipe) else load_recipe(config) if config else Recipe()
    options = dict(options)
    eval_fraction = options.pop("eval_fraction", None)
    if eval_fraction:
        if not 0 < eval_fraction < 1:
            raise DataError(f"eval_fraction must be in [0, 1), not {eval_fraction}")
        options["splits"] = {"train": 1 - eval_fraction, "validation": eval_fraction}
    dedup, dedup_options = options.pop("dedup", None), options.pop("dedup_options", None)
    if dedup is True or dedup_options:
        options["dedup"] = dict(dedup_options or {})
    elif isinstance(dedup, dict):
        options["dedup"] = dedup
    evals, decontaminate_options = options.pop("decontaminate", None), options.pop("decontaminate_options", None)
    if isinstance(evals, dict):
        options["decontaminate"] = evals
    elif evals:
        options["decontaminate"] = {"eval": [str(p) for p in evals], **(decontaminate_options or {})}
    if "columns" in options:
        options["columns"] = parse_columns(options["columns"])
    known = {f.name for f in fields(Recipe)}
    unknown = [k for k in options if k not in known]
    if unknown:
        raise DataError(f"unknown build option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                        f"valid: {', '.join(sorted(known))}")
    for key, value in options.items():
        setattr(recipe, key, str(value) if key in ("output", "report") and value is not None else value)
    if inputs is not None:
        items = [inputs] if isinstance(inputs, (str, Path)) or hasattr(inputs, "column_names") else list(inputs)
        if items and all(isinstance(i, dict) for i in items):
            recipe.sources = [Source(data=items)]
        else:
            recipe.sources = [Source(path=str(i)) if isinstance(i, (str, Path)) else
                              i if isinstance(i, Source) else Source(data=i) for i in items]
    recipe.__post_init__()
    return recipe.validate()


# -- the run --------------------------------------------------------------------------------------------------------

def run_recipe(recipe: Recipe, *, force: bool = False, progress: bool = False, console: Any = None) -> BuildResult:
    """Run a validated recipe (see the module docstring)."""
    started = time.perf_counter()
    recipe.validate()
    scratch = Path(tempfile.mkdtemp(prefix="sftdata-sources-"))
    try:
        inputs = _resolve_sources(recipe, scratch)  # checked and expanded before any tokenizer loads
        output = Path(recipe.output)
        evals = list((recipe.decontaminate or {}).get("eval") or [])
        check_output_paths(output, inputs=[p for paths in inputs for p in paths] + evals, report=recipe.report)
        claim = OutputClaim(output).acquire()
        try:
            return _run_claimed(recipe, inputs, output, claim, started, force, progress, console)
        finally:
            claim.release()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run_claimed(recipe: Recipe, inputs: list[list[str]], output: Path, claim: OutputClaim, started: float,
                 force: bool, progress: bool, console: Any) -> BuildResult:
    tmp = None
    try:
        setup = _setup(recipe, inputs)
        if not force and is_sftdata_output(output):
            existing = read_manifest(output)
            # Up to date only when every file the manifest records is there with its size and sha256.
            if existing.get("fingerprint") == setup.key and not check_output_files(output, existing):
                if recipe.report is not None:
                    shutil.copyfile(output / "removed.jsonl", recipe.report)
                return BuildResult(output, existing, up_to_date=True)
        data_started = time.perf_counter()
        tmp = claim.stage()  # the in-progress output: any failure removes it and leaves `output` as it was
        with ExitStack() as stack:
            stack.enter_context(_frozen_heap())
            run = _Run(recipe, setup, tmp, stack, progress, console)
            run.per_row(inputs)
            removed_rows = run.dedup()
            run.check_skipped()
            splits, packing, mixing = run.write_splits(removed_rows)
        if recipe.report is not None:
            shutil.copyfile(tmp / "removed.jsonl", recipe.report)
        manifest = run.manifest(splits, packing, mixing, started, data_started)
        write_manifest(tmp, manifest)
        manifest["files"] = output_files(tmp)
        write_manifest(tmp, manifest)
        claim.commit(tmp)
        return BuildResult(output, manifest)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and (message := claim.describe_error(e, report=recipe.report)) is not None:
            raise DataError(message) from None
        raise


@contextmanager
def _frozen_heap() -> Iterator[None]:
    """The objects alive before the data phase (the libraries, tokenizer and template: most of the heap) kept out of the
    garbage collector's scans while it runs; otherwise every full collection walks them again (about a tenth of the CPU
    time of a build, measured with bench/bench_build.py). Left alone when the host process froze objects itself."""
    if not gc.isenabled() or gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@dataclass
class _Setup:
    tokenizer: Any
    template: Any
    encoder: Encoder
    history: Any
    verified: Any
    warnings: list[str]
    tok_identity: dict[str, Any]
    input_hashes: dict[str, str]
    key: str
    recipe_record: dict[str, Any]
    raw_text_blocks: bool


def _resolve_sources(recipe: Recipe, scratch: Path) -> list[list[str]]:
    """The files each source reads (Python-API data written as JSON lines first), checked and expanded."""
    out = []
    for i, source in enumerate(recipe.sources):
        paths = [str(data_source_file(source.data, scratch, i))] if source.data is not None else source.paths()
        out.append([s.path for s in resolve_inputs(paths)])
    return out


def _setup(recipe: Recipe, inputs: list[list[str]]) -> _Setup:
    """Tokenizer, template, encoder and preflight; input hashes and the fingerprint."""
    tok = load_tokenizer(recipe.tokenizer, template=recipe.template)
    tpl = load_template(recipe.template, tok)
    if "strftime_now" in tpl.source and recipe.template_date is None:
        # a template that prints today's date renders the build's date, recorded, so a replay renders the same text
        recipe.template_date = time.strftime("%Y-%m-%d", time.gmtime())
    raw_text_blocks = recipe.pack and all(_input_format(p, s.format or recipe.format, s.columns or recipe.columns) == "text"
                                          for s, paths in zip(recipe.sources, inputs) for p in paths)
    options = EncodeOptions(train_turns=recipe.train_turns, train_on_prompt=recipe.train_on_prompt,
                            special_text=recipe.special_text, history_policy=recipe.history_policy,
                            tokenization=recipe.tokenization, template_kwargs=dict(recipe.template_kwargs),
                            template_date=recipe.template_date,
                            max_length=recipe.max_length if recipe.truncation == "right" and not raw_text_blocks else None)
    encoder = Encoder(tpl, tok, options)
    history = plan_history_policy(encoder)
    verified = preflight(encoder)  # the invariants of docs/invariants.md on a built-in suite, before any data is read
    if not verified.invariant_ok and not recipe.allow_unverified:
        raise DataError(f"template {tpl.name!r} with tokenizer {getattr(tok, 'sftdata_name', tok.name_or_path)!r} fails "
                        f"the invariant checks (allow_unverified / --allow-unverified builds anyway):\n"
                        f"{verified.format_text()}")
    warnings: list[str] = []
    if verified.differs_from_tokenizer and recipe.tokenizer is not None:
        warnings.append(f"template {tpl.name!r} differs from the tokenizer's own chat_template; the trainer saves "
                        "this training template with the adapter, so serve with it")
    if not verified.invariant_ok:
        warnings.append("built with allow_unverified although the invariant checks failed")
    tok_identity = tokenizer_identity(tok)
    # What load_tokenizer() takes to get the same tokenizer back (show, train, eval).
    tok_identity["load"] = (str(Path(recipe.tokenizer).resolve()) if recipe.tokenizer and Path(recipe.tokenizer).exists()
                            else recipe.tokenizer or tok.sftdata_name.split(" ")[0])
    input_hashes = {p: (file_sha256(p) if Path(p).is_file() else _dir_hash(Path(p))) for paths in inputs for p in paths}
    evals = [file_sha256(p) for p in (recipe.decontaminate or {}).get("eval") or []]
    recorded = recipe.to_dict()
    key = fingerprint([FORMAT, __version__, [[input_hashes[p] for p in paths] for paths in inputs], evals, tpl.sha256,
                       tok_identity["sha256"], recipe.fingerprint_dict()])
    return _Setup(tok, tpl, encoder, history, verified, warnings, tok_identity, input_hashes, key, recorded,
                  raw_text_blocks)


class _Run:
    """The state of one build between its phases: counters, logs, the staging file."""

    def __init__(self, recipe: Recipe, setup: _Setup, tmp: Path, stack: ExitStack, progress: bool, console: Any):
        self.recipe, self.setup, self.tmp = recipe, setup, tmp
        self.problems = ProblemLog(on_error=recipe.on_error)
        self.problems.sink = stack.enter_context(open(tmp / "problems.jsonl", "w", encoding="utf-8"))
        self.removed_file = stack.enter_context(open(tmp / "removed.jsonl", "w", encoding="utf-8"))
        self.removed: Counter[str] = Counter()
        self.skipped_rows: Counter[str] = Counter()  # rows with no example, by the kind of their problem
        self.counts: Counter[str] = Counter()
        self._from_pipeline: Counter[str] = Counter()  # problems the pipeline logged (ingest logs the others)
        self.stats: list[ReadStats] = []
        self.stats_origin: list[int] = []
        self.staging = tmp / ".staging.arrow"
        self._sink = pa.OSFile(str(self.staging), "wb")
        stack.callback(self._sink.close)
        self._writer = pa.ipc.new_file(self._sink, STAGE_SCHEMA)
        stack.callback(self._close_writer)
        self.bar = stack.enter_context(_Progress(progress, console))
        self.sketch_offsets: dict[str, int] = {}  # engine ray: each dedup sketch file's first input position
        if recipe.engine == "ray":  # one connection for phases 1 and 2
            from sftdata.engine_ray import connect

            if connect(recipe.ray_address):
                import ray

                stack.callback(ray.shutdown)
        self.dedup_stage = None
        if recipe.dedup is not None:
            from sftdata.clean import Deduplicator

            self.dedup_stage = Deduplicator(**recipe.dedup)
        spec = PipelineSpec(template=setup.template, tokenizer=recipe.tokenizer, default_template=recipe.template,
                            encode=setup.encoder.options, max_length=recipe.max_length,
                            truncation="blocks" if setup.raw_text_blocks else recipe.truncation,
                            split_by=recipe.split_by, seed=recipe.seed, filters=dict(recipe.filters),
                            decontaminate=dict(recipe.decontaminate) if recipe.decontaminate else None)
        self.pipeline = RowPipeline(spec, tokenizer=setup.tokenizer, encoder=setup.encoder)

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # -- phase 1 ----------------------------------------------------------------------------------------------------
    def per_row(self, inputs: list[list[str]]) -> None:
        recipe = self.recipe
        total = sum(input_size(p) for paths in inputs for p in paths)
        self.bar.start("build", total)
        if recipe.engine == "ray":
            self._per_row_on_ray(inputs)
        else:
            for origin, batch, out in run_pipeline(self.pipeline, self._batches(inputs), workers=recipe.workers):
                self._merge(origin, batch, out)
        # every problem ingest logged is a row of its own (the pipeline's were counted per row in _merge)
        self.skipped_rows.update(self.problems.counts - self._from_pipeline)
        self._close_writer()
        self.bar.done()

    def _batches(self, inputs: list[list[str]]) -> Iterator[tuple[int, list[Record]]]:
        recipe = self.recipe
        for origin, (source, paths) in enumerate(zip(recipe.sources, inputs)):
            stats: list[ReadStats] = []
            label = source.label(origin)
            for batch in read_records(paths, problems=self.problems, stats=stats, on_progress=self.bar.advance,
                                      **self._read_options(source)):
                if source.data is not None:
                    for record in batch:
                        record.source = label
                self.bar.rows(len(batch))
                yield origin, batch
            for s in stats:
                if source.data is not None:
                    s.path = label
                self.stats.append(s)
                self.stats_origin.append(origin)

    def _read_options(self, source: Source) -> dict[str, Any]:
        recipe = self.recipe
        return dict(format=source.format or recipe.format, columns=source.columns or recipe.columns, strip=recipe.strip,
                    system_prompt=recipe.system_prompt, template_variables=self.setup.template.variables,
                    batch_size=recipe.batch_size, max_row_bytes=recipe.max_row_bytes)

    def _per_row_on_ray(self, inputs: list[list[str]]) -> None:
        """Phase 1 on Ray (:mod:`sftdata.engine_ray`): files read and batches processed on the cluster, merged here in
        input order exactly as the local engine merges them."""
        from sftdata.engine_ray import ReadShard, run_on_ray

        shards: list[ReadShard] = []
        for origin, (source, paths) in enumerate(zip(self.recipe.sources, inputs)):
            label = source.label(origin) if source.data is not None else None
            options = self._read_options(source)
            for path in paths:
                shards.append(ReadShard(len(shards), origin, path, options, label))
        dedup = self.dedup_stage.config if self.dedup_stage is not None else None
        on_cluster = dedup is not None and self.recipe.ray_dedup == "cluster"
        sketch_dir = self.tmp / ".dedup-sketches"  # in the staging directory: where the output goes, every node's
        if on_cluster:
            sketch_dir.mkdir()
        for part in run_on_ray(self.pipeline, shards, address=self.recipe.ray_address, dedup=dedup,
                               sketch_dir=str(sketch_dir) if on_cluster else None):
            self.problems.extend(part.problems)  # ingest problems, as read_records logs them before its batch
            if part.error is not None:
                raise part.error
            self.bar.advance(part.bytes_read)
            if part.output is not None:
                self.bar.rows(part.rows)
                self._merge(part.origin, [], part.output)
                if on_cluster and part.positions:
                    from sftdata.clean.dedup_ray import sketch_file

                    self.sketch_offsets[sketch_file(sketch_dir, part.shard, part.seq).name] = self.dedup_stage.rows_seen
                    self.dedup_stage.add_positions(part.positions)
                elif dedup is not None and part.positions:  # ray_dedup: driver, the sketch came with the part
                    self.dedup_stage.add_sketch(part.positions, part.sketch)
            for s in part.stats:
                self.stats.append(s)
                self.stats_origin.append(part.origin)

    def _merge(self, origin: int, records: list[Record], out: BatchOutput) -> None:
        kept_rows = set(zip(out.table["source"].to_pylist(), out.table["row"].to_pylist())) if out.table.num_rows else set()
        first_problem: dict[tuple[str, int], str] = {}
        for problem in out.problems:
            self.problems.add(problem)
            self._from_pipeline[problem.kind] += 1
            first_problem.setdefault((problem.source, problem.row), problem.kind)
        first_removal: dict[tuple[str, int], str] = {}
        for removal in out.removals:
            key = (removal.record.source, removal.record.row)
            first_removal.setdefault(key, removal.reason)
            if key not in kept_rows:
                self.removed_file.write(json.dumps(removal.to_dict(), ensure_ascii=False) + "\n")
        for key, reason in first_removal.items():
            if key not in kept_rows:
                self.removed[reason] += 1
            else:
                self.counts[f"examples_removed:{reason}"] += 1
        for key, kind in first_problem.items():
            if key not in kept_rows and key not in first_removal:
                self.skipped_rows[kind] += 1
            elif key in kept_rows:
                self.counts[f"examples_skipped:{kind}"] += 1
        self.counts.update(out.counts)
        if out.table.num_rows:
            table = out.table.set_column(STAGE_SCHEMA.get_field_index("origin"), "origin",
                                         pa.array([origin] * out.table.num_rows, pa.int16()))
            self._writer.write_table(table)
        if self.dedup_stage is not None and out.survivors:
            self.dedup_stage.add_batch(out.survivors)

    # -- phase 2 ----------------------------------------------------------------------------------------------------
    def dedup(self) -> set[tuple[str, int]]:
        """Cluster the surviving rows; the removed ones are written to removed.jsonl and returned."""
        stage = self.dedup_stage
        if stage is None:
            return set()
        self.bar.start("dedup", 0)
        if self.recipe.engine == "ray" and self.recipe.ray_dedup == "cluster":
            from sftdata.clean.dedup_ray import dedup_on_ray

            sketches = self.tmp / ".dedup-sketches"
            # a partition of the band group-by holds ~1M band rows (50k input rows): 2.5-2.9 GB peak RSS measured
            # for that task (docs/scale.md); fewer partitions than CPUs only when the input is small
            partitions = max(1, stage.rows_seen // 50_000)
            dedup_on_ray(stage, sketches, self.sketch_offsets, partitions=partitions)
            shutil.rmtree(sketches)
        stage.finalize()
        keep = stage.keep_mask()
        sources, source_index, rows = stage.positions()
        removed = set()
        for idx in np.flatnonzero(~keep):
            record = Record(sources[source_index[idx]], int(rows[idx]))
            removal = stage.removal(int(idx), record)
            removed.add((record.source, record.row))
            self.removed[removal.reason] += 1
            self.removed_file.write(json.dumps(removal.to_dict(), ensure_ascii=False) + "\n")
        self.bar.done()
        return removed

    def check_skipped(self) -> None:
        """Fail a build that skipped or removed more than ``max_skipped_fraction`` of its rows, naming the top reasons."""
        read = sum(s.rows for s in self.stats)
        lost = Counter(self.skipped_rows) + Counter({f"removed: {k}": v for k, v in self.removed.items()})
        share = sum(lost.values()) / read if read else 0.0
        if read and share > self.recipe.max_skipped_fraction:
            top = ", ".join(f"{k} ({v:,})" for k, v in lost.most_common(4))
            raise DataError(f"{sum(lost.values()):,} of {read:,} rows ({share:.0%}) were skipped or removed, more than "
                            f"max_skipped_fraction {self.recipe.max_skipped_fraction:g}: {top}; see problems.jsonl and "
                            "removed.jsonl (raise --max-skipped-fraction to build anyway)")

    # -- phase 3 ----------------------------------------------------------------------------------------------------
    def write_splits(self, removed_rows: set[tuple[str, int]]) -> tuple[dict, dict | None, dict | None]:
        recipe = self.recipe
        table = pa.ipc.open_file(pa.memory_map(str(self.staging))).read_all()
        n = table.num_rows
        source = np.asarray(table["source"].to_pylist(), dtype=object)
        row = table["row"].to_numpy()
        keep = np.ones(n, dtype=bool)
        if removed_rows:
            keep = np.fromiter(((s, int(r)) not in removed_rows for s, r in zip(source, row)), dtype=bool, count=n)
        origin = table["origin"].to_numpy().astype(np.int64)
        group = table["group"].to_numpy()
        split = assign_splits(group, recipe.splits, origin if recipe.stratify else None)
        # a unit is one input row: all its examples (a conversation split per turn) are sampled together
        unit_keys = np.char.add(np.char.add(source.astype(str), "\x00"), row.astype(str))
        _, unit = np.unique(unit_keys, return_inverse=True) if n else (None, np.zeros(0, dtype=np.int64))
        order_by_split: dict[str, np.ndarray] = {}
        mixing = None
        rng = np.random.default_rng(recipe.seed)
        for code, name in enumerate(SPLIT_ORDER):
            if recipe.splits.get(name, 0) <= 0:
                continue
            members = np.flatnonzero(keep & (split == code))
            if name == "train" and any(s.weight is not None or s.samples is not None or s.epochs is not None
                                       for s in recipe.sources):
                members, mixing = self._mix(members, unit, origin, table)
            if recipe.shuffle:
                members = members[rng.permutation(members.size)]
            order_by_split[name] = members
        kept_rows = {(source[i], int(row[i])) for idxs in order_by_split.values() for i in idxs}
        self.rows_kept = len(kept_rows)
        splits: dict[str, Any] = {}
        packing: dict[str, Any] | None = {} if recipe.pack else None
        columns = table.select(UNPACKED_SCHEMA.names)
        for name, members in order_by_split.items():
            self.bar.start(f"write {name}", 0)
            directory = self.tmp / name
            directory.mkdir()
            plan = None
            if recipe.pack:
                from sftdata import pack

                lengths = pc.list_value_length(columns["input_ids"]).to_numpy(zero_copy_only=False)[members]
                truncated = int(columns["truncated"].to_numpy(zero_copy_only=False)[members].sum())
                plan = pack.plan_packing(lengths, recipe.max_length, seed=recipe.seed,
                                         raw_text=self.setup.raw_text_blocks, truncated=truncated,
                                         describe=lambda i: f"{source[members[i]]}:{row[members[i]]}")
                shards, chunk_rows = shard_ranges(plan.rows, pack.shard_rows_for(recipe.max_length)), plan.chunk_rows()
            else:
                shards, chunk_rows = shard_ranges(members.size, SHARD_ROWS), GATHER_ROWS
            jobs = [ShardJob(str(self.staging), str(directory), name, k, start, stop, chunk_rows)
                    for k, (start, stop) in enumerate(shards)]
            if recipe.engine == "ray":
                from sftdata.engine_ray import write_shards_on_ray

                written = write_shards_on_ray(jobs, members, plan)
            else:
                written = [write_split_shard(job, members, plan) for job in jobs]
            files = [f"{name}/{name}-{job.index:05d}.parquet" for job in jobs]
            if plan is not None:
                stats = pack.plan_stats(plan, int(members.size))
                for part in written:
                    stats.merge(part)
                packing[name] = stats.result(files=[Path(f).name for f in files])
                splits[name] = {"rows": packing[name]["rows"], "examples": int(members.size), "files": files}
            else:
                splits[name] = {"rows": int(members.size), "files": files}
            splits[name].update(_split_stats(columns, members, source))
            self.bar.done()
        del table, columns
        self.staging.unlink()
        return splits, packing, mixing

    def _mix(self, members: np.ndarray, unit: np.ndarray, origin: np.ndarray, table: pa.Table
             ) -> tuple[np.ndarray, dict[str, Any]]:
        """The training examples after mixing: each unit taken as many times as plan_mix says."""
        recipe = self.recipe
        tokens = table["num_tokens"].to_numpy().astype(np.int64)
        units, first, inverse = np.unique(unit[members], return_index=True, return_inverse=True)
        unit_rows = np.bincount(inverse, minlength=units.size)
        unit_tokens = np.bincount(inverse, weights=tokens[members], minlength=units.size)
        unit_source = origin[members][first]
        targets = [MixTarget(s.weight, s.samples, s.epochs) for s in recipe.sources]
        count, report = plan_mix(unit_source, unit_rows, unit_tokens, targets, by_tokens=recipe.mix_by == "tokens",
                                 seed=recipe.seed)
        for i, entry in enumerate(report["sources"]):
            entry["source"] = recipe.sources[i].label(i)
        dropped = np.flatnonzero(count == 0)
        source = table["source"]
        row = table["row"]
        for u in dropped:
            i = members[first[u]]
            record = Record(source[i].as_py(), row[i].as_py())
            self.removed["mixing"] += 1
            self.removed_file.write(json.dumps(Removal(record, "mix", "mixing", "not sampled: its source is above its "
                                                       "target share of the training split").to_dict()) + "\n")
        return members[np.repeat(np.arange(members.size), count[inverse])], report

    # -- manifest ---------------------------------------------------------------------------------------------------
    def manifest(self, splits: dict, packing: dict | None, mixing: dict | None, started: float,
                 data_started: float) -> dict[str, Any]:
        recipe, setup, counts = self.recipe, self.setup, self.counts
        end_ids = Counter({int(k.split(":", 1)[1]): v for k, v in counts.items() if k.startswith("end_id:")})
        turns = Counter({int(k.split(":", 1)[1]): v for k, v in counts.items()
                         if k.startswith("conversations_with_turns:")})
        plain = {k: v for k, v in counts.items() if ":" not in k}
        per_kind = lambda prefix: {k.split(":", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith(prefix)}  # noqa: E731
        rows_read = sum(s.rows for s in self.stats)
        total = sum(s.get("tokens", 0) for s in splits.values())
        trained = sum(s.get("trained", 0) for s in splits.values())
        per_source: dict[str, Counter] = defaultdict(Counter)
        for info in splits.values():
            for name, entry in info.pop("per_source", {}).items():
                per_source[name].update(entry)
        tok = setup.tokenizer
        return {
            "format": FORMAT,
            "sftdata_version": __version__,
            "labels": LABELS_NOTE,
            "fingerprint": setup.key,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "recipe": setup.recipe_record,
            "inputs": [{"path": s.path, "source": recipe.sources[o].label(o), "sha256": setup.input_hashes.get(s.path),
                        "format": s.format, "formats": dict(s.formats), "rows": s.rows,
                        "ignored_fields": dict(s.ignored_fields.most_common())}
                       for s, o in zip(self.stats, self.stats_origin)],
            "template": {"name": setup.template.name, "origin": setup.template.origin, "text": setup.template.source,
                         "sha256": setup.template.sha256, "end_of_turn": setup.encoder.end_of_turn,
                         "variables": sorted(setup.template.variables),
                         "end_of_turn_ids": [i for i, _ in end_ids.most_common()],
                         "end_of_turn_tokens": {tok.convert_ids_to_tokens(i): n for i, n in end_ids.most_common()}},
            "tokenizer": setup.tok_identity,
            "options": {k: v for k, v in setup.recipe_record.items() if k != "sources"},
            "counts": {
                "rows_read": rows_read,
                "rows_kept": self.rows_kept,
                "skipped": dict(sorted(self.skipped_rows.items())),
                "skipped_total": sum(self.skipped_rows.values()),
                "removed": dict(sorted(self.removed.items())),
                "removed_total": sum(self.removed.values()),
                "examples": sum(s.get("examples", s["rows"]) for s in splits.values()),
                "examples_skipped": per_kind("examples_skipped:"),
                "examples_removed": per_kind("examples_removed:"),
                "problems_logged": dict(sorted(self.problems.counts.items())),
                "truncated": plain.get("truncated", 0),
                **{k: plain[k] for k in sorted(plain) if k not in ("truncated", "tokens_lost_to_truncation",
                                                                   "trained_tokens_lost_to_truncation")},
                "filters": {k: v for k, v in sorted(counts.items()) if k.startswith(("filter:", "token-filter:"))},
            },
            "tokens": {"total": total, "trained": trained,
                       "per_source": {k: dict(v) for k, v in per_source.items()},
                       "lost_to_truncation": {"tokens": counts["tokens_lost_to_truncation"],
                                              "trained": counts["trained_tokens_lost_to_truncation"]}},
            "conversations": {"assistant_turns": {str(k): v for k, v in sorted(turns.items())}},
            "splits": splits,
            "mixing": mixing,
            "packing": packing,
            "cleaning": {"dedup": self.dedup_stage.summary()} if self.dedup_stage is not None else {},
            "history_policy": setup.history.to_dict(),
            "verify": setup.verified.manifest_entry(),
            "warnings": setup.warnings,
            "problems": self.problems.to_dict()["examples"],
            "seconds": round(time.perf_counter() - started, 3),
            "seconds_setup": round(data_started - started, 3),
        }


@dataclass(frozen=True)
class ShardJob:
    """One output shard of a split: rows ``start:stop`` of the split (examples, or packed rows when packing) written
    to ``directory/{split}-{index:05d}.parquet`` in row groups cut every ``chunk_rows`` rows of the split."""

    staging: str  # the staging Arrow file (memory-mapped by whoever writes the shard)
    directory: str
    split: str
    index: int
    start: int
    stop: int
    chunk_rows: int


def write_split_shard(job: ShardJob, members: np.ndarray, plan: Any = None) -> Any:
    """Write one shard of a split, gathering its rows from the staging file: ``members`` are the split's examples
    (staging indices, in output order), ``plan`` its :class:`~sftdata.pack.PackPlan` when packing (returns the
    shard's packing stats). Both engines write every shard with this: the local one in a loop, Ray as one task each."""
    columns = pa.ipc.open_file(pa.memory_map(job.staging)).read_all().select(UNPACKED_SCHEMA.names)
    if plan is None:
        pieces = (take_rows(columns, members[lo:hi]) for lo, hi in chunk_ranges(job.start, job.stop, job.chunk_rows))
        write_shard(Path(job.directory), job.split, job.index, pieces)
        return None
    from sftdata.pack import _as_table, write_packed_shard

    def take(indices: np.ndarray) -> pa.Table:
        return _as_table(take_rows(columns, members[indices]))

    return write_packed_shard(plan, take, job.directory, job.split, job.index, job.start, job.stop, job.chunk_rows)


def take_rows(table: pa.Table, indices: np.ndarray) -> pa.Table:
    """``table.take(indices)`` (one chunk, rows in the order of ``indices``) reading only the record batches the
    indices fall in: Arrow's take on a table of many chunks (the staging file has one per merged batch) concatenates
    them all first, so each shard, or each chunk of a shard, would read the whole staging file."""
    indices = np.asarray(indices, dtype=np.int64)
    batches = table.to_batches()
    starts = np.concatenate(([0], np.cumsum([b.num_rows for b in batches], dtype=np.int64)))
    which = np.searchsorted(starts, indices, side="right") - 1
    order = np.argsort(which, kind="stable")
    used, first = np.unique(which[order], return_index=True)
    bounds = np.append(first, indices.size)
    parts = [batches[b].take(pa.array(indices[order[lo:hi]] - starts[b]))
             for b, lo, hi in zip(used, bounds[:-1], bounds[1:])]
    grouped = pa.Table.from_batches(parts, schema=table.schema).combine_chunks()
    return grouped.take(pa.array(np.argsort(order)))  # row j of `grouped` is indices[order[j]]


def _split_stats(columns: pa.Table, members: np.ndarray, source: np.ndarray) -> dict[str, Any]:
    tokens = columns["num_tokens"].to_numpy()[members]
    trained = columns["num_trained"].to_numpy()[members]
    per_source: dict[str, Counter] = defaultdict(Counter)
    if members.size:
        names, inverse = np.unique(source[members].astype(str), return_inverse=True)
        for i, name in enumerate(names):
            mine = inverse == i
            per_source[str(name)].update(rows=int(mine.sum()), tokens=int(tokens[mine].sum()),
                                         trained=int(trained[mine].sum()))
    return {"examples": int(members.size), "tokens": int(tokens.sum()), "trained": int(trained.sum()),
            "truncated": int(columns["truncated"].to_numpy(zero_copy_only=False)[members].sum()),
            "per_source": {k: dict(v) for k, v in per_source.items()}}


# -- engines ----------------------------------------------------------------------------------------------------------

def run_pipeline(pipeline: RowPipeline, batches: Iterable[tuple[int, list[Record]]], *, workers: int = 1
                 ) -> Iterator[tuple[int, list[Record], BatchOutput]]:
    """The local engine: yield ``(origin, records, output)`` per batch, in input order, in-process or in a process
    pool of ``workers``. Rendering is Python (Jinja) and holds the GIL, so parallelism needs processes; each worker
    rebuilds the pipeline from its pickled spec. (The Ray engine also reads on the cluster: :mod:`sftdata.engine_ray`.)"""
    if workers <= 1:
        for origin, batch in batches:
            yield origin, batch, pipeline.process(batch, origin)
        return
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(pipeline,)) as pool:
        pending: deque = deque()
        for origin, batch in batches:
            pending.append((origin, batch, pool.submit(_process_in_worker, batch, origin)))
            if len(pending) > 2 * workers:
                o, b, future = pending.popleft()
                yield o, b, future.result()
        while pending:
            o, b, future = pending.popleft()
            yield o, b, future.result()


_worker_pipeline: RowPipeline | None = None


def _init_worker(pipeline: RowPipeline) -> None:
    global _worker_pipeline
    _worker_pipeline = pipeline


def _process_in_worker(batch: list[Record], origin: int) -> BatchOutput:
    return _worker_pipeline.process(batch, origin)


# -- helpers ----------------------------------------------------------------------------------------------------------

class _Progress:
    """A rich progress bar over input bytes on a terminal; plain log lines (every 10 s) otherwise; nothing when off."""

    def __init__(self, enabled: bool, console: Any = None):
        self.enabled, self.console = enabled, console
        self._progress = None
        self._plain = enabled and (console is None or not getattr(console, "is_terminal", False))
        self._rows = 0
        self._last = time.monotonic()
        self._phase = ""
        self._t0 = time.monotonic()

    def __enter__(self):
        if self.enabled and not self._plain:
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                                      TextColumn("{task.fields[rows]} rows"), TimeElapsedColumn(), TimeRemainingColumn(),
                                      console=self.console, transient=False)
            self._progress.__enter__()
            self._task = self._progress.add_task("build", total=None, rows=0)
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def start(self, description: str, total: int) -> None:
        self._phase, self._rows, self._t0 = description, 0, time.monotonic()
        if self._progress is not None:
            self._progress.reset(self._task, total=total or None, description=description, rows=0)
        elif self._plain:
            self._log(f"{description}: started")

    def advance(self, nbytes: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, nbytes)

    def rows(self, n: int) -> None:
        self._rows += n
        if self._progress is not None:
            self._progress.update(self._task, rows=self._rows)
        elif self._plain and time.monotonic() - self._last >= 10:
            elapsed = time.monotonic() - self._t0
            self._log(f"{self._phase}: {self._rows:,} rows read ({self._rows / elapsed:,.0f} rows/s)")

    def done(self) -> None:
        if self._plain:
            self._log(f"{self._phase}: done in {time.monotonic() - self._t0:.1f} s" +
                      (f" ({self._rows:,} rows)" if self._rows else ""))

    def _log(self, text: str) -> None:
        self._last = time.monotonic()
        if self.console is not None:
            self.console.print(text, soft_wrap=True, highlight=False, markup=False)
        else:
            print(text, flush=True)


def _input_format(path: str, format: str | None, columns: dict[str, str]) -> str | None:
    """The format of an input's first readable rows (cheap: reads one batch)."""
    if format is not None:
        return format
    stats: list[ReadStats] = []
    for _ in read_records([path], columns=columns, problems=ProblemLog(), batch_size=1, stats=stats):
        break
    return stats[0].format if stats else None


def _dir_hash(path: Path) -> str:
    """Hash of a dataset directory's files (names and contents), or of the (revision-pinned) hub id itself."""
    import xxhash

    if not path.is_dir():
        return "hub:" + str(path)
    h = xxhash.xxh128()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(file.relative_to(path)).encode())
        h.update(file_sha256(file).encode())
    return h.hexdigest()
