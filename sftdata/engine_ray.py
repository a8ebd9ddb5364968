"""The Ray engine: phase 1 of a build (read → per-row stages → dedup sketches) as a Ray Data pipeline, and the
output shards written by Ray tasks.

``sftdata build --engine ray [--ray-address ADDR]`` runs the same code as the local engine, placed differently:

* **Read** (Ray Data tasks, one per input file): each task runs :func:`~sftdata.ingest.read_records` on one file, so
  row provenance (file, row number), format detection, problems and batches are exactly those of the local engine
  (a batch never spans two files). Each batch travels with the ingest problems logged while it was read.
* **Per-row stages** (a Ray Data ``map_batches`` over an actor pool, one batch of records per call): each actor
  builds one :class:`~sftdata.pipeline.RowPipeline` from the recipe's picklable spec when it starts, with the loaded
  tokenizer and the eval index (decontamination) shipped once through the object store, and runs
  ``RowPipeline.process`` on every batch it is given; for dedup it also computes the batch's MinHash sketch
  (:func:`~sftdata.clean.dedup.sketch_batch`: exact keys, band keys, screen bytes, shingle sets) there and writes
  it for the distributed dedup (:mod:`sftdata.clean.dedup_ray`), or sends it back with the results
  (``ray_dedup: driver``).
* **Merge** (the driver): the results come back in input order (``preserve_order``) and go through the local
  engine's merge (``_Run._merge`` in :mod:`sftdata.build`): one problems file, one removals file, one set of counters,
  one manifest.
* **Phase 3**: the driver computes splits, mixing, shuffle and the packing plan as the local engine does; one Ray task
  per output shard writes it (:func:`write_shards_on_ray` runs :func:`sftdata.build.write_split_shard`, the local
  engine's own shard writer). See docs/scale.md for what runs where, what it costs and how far it goes.

Ray retries a read task, and restarts an actor and re-sends its batch, when a worker dies: every step is a pure
function of its input, so a retried batch gives the same result.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np

from sftdata.ingest import ReadStats, read_records
from sftdata.pipeline import BatchOutput, RowPipeline
from sftdata.record import DataError, Problem, ProblemLog, Record

__all__ = ["RAY_MISSING", "ReadShard", "ShardPart", "cluster_cpus", "connect", "read_shard", "run_on_ray"]

RAY_MISSING = "engine ray needs Ray: pip install 'sftdata[ray]'"


@dataclass(frozen=True)
class ReadShard:
    """One unit of reading: an input file (or dataset) of recipe source ``origin``, with the read options.
    ``label``: the source's name, given to its records (a Python-API data source, written to a file first)."""

    index: int
    origin: int
    path: str
    options: dict[str, Any]
    label: str | None = None


@dataclass
class ShardPart:
    """One batch of a shard on its way through the engine. ``problems``: the ingest problems logged while this batch
    was read (before it, in file order); the last part of a shard (``final``) has no records and carries the
    shard's :class:`~sftdata.ingest.ReadStats`, or the :class:`~sftdata.record.DataError` that stopped its read."""

    shard: int
    seq: int
    origin: int
    records: list[Record] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    bytes_read: int = 0
    final: bool = False
    stats: list[ReadStats] = field(default_factory=list)
    error: DataError | None = None
    rows: int = 0                                   # records in the batch (set when it is processed)
    output: BatchOutput | None = None               # the per-row stages' result (survivors dropped: see sketch)
    positions: list[tuple[str, int]] = field(default_factory=list)  # (source, row) of the survivors
    sketch: Any = None                              # BatchSketch of the survivors when dedup is on


class _PendingProblems(ProblemLog):
    """Collects the problems a read logs, in order, for the driver's log (which applies ``on_error``)."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[Problem] = []

    def add(self, problem: Problem) -> None:
        self.pending.append(problem)

    def take(self) -> list[Problem]:
        taken, self.pending = self.pending, []
        return taken


def read_shard(shard: ReadShard) -> Iterator[ShardPart]:
    """Read one shard with the local reader, batch by batch (see :class:`ShardPart`)."""
    problems = _PendingProblems()
    done = [0]

    def progress(n: int) -> None:
        done[0] += n

    def taken_bytes() -> int:
        n, done[0] = done[0], 0
        return n

    stats: list[ReadStats] = []
    seq = 0
    try:
        for batch in read_records([shard.path], problems=problems, stats=stats, on_progress=progress, **shard.options):
            if shard.label is not None:
                for record in batch:
                    record.source = shard.label
            yield ShardPart(shard.index, seq, shard.origin, batch, problems.take(), taken_bytes())
            seq += 1
    except DataError as e:
        yield ShardPart(shard.index, seq, shard.origin, problems=problems.take(), final=True, error=e)
        return
    for s in stats:
        if shard.label is not None:
            s.path = shard.label
    yield ShardPart(shard.index, seq, shard.origin, problems=problems.take(), bytes_read=taken_bytes(), final=True,
                    stats=stats)


def process_part(part: ShardPart, pipeline: RowPipeline, dedup: Any = None, sketch_dir: str | None = None
                 ) -> ShardPart:
    """Run a part's records through the per-row stages and, for dedup, sketch the survivors: the sketch is written to
    ``sketch_dir`` (:func:`~sftdata.clean.dedup_ray.write_sketch`) or, without one, travels back with the part.
    The records are dropped, so only the results travel back."""
    if part.records:
        out = pipeline.process(part.records, part.origin)
        if dedup is not None:
            from sftdata.clean.dedup import sketch_batch

            part.positions = [(r.source, r.row) for r in out.survivors]
            part.sketch = sketch_batch(out.survivors, dedup)
            if sketch_dir is not None and part.positions:
                from sftdata.clean.dedup_ray import sketch_file, write_sketch

                write_sketch(sketch_file(sketch_dir, part.shard, part.seq), part.sketch)
                part.sketch = None
        out.survivors = []
        part.rows, part.output, part.records = len(part.records), out, []
    return part


# -- Ray ------------------------------------------------------------------------------------------------------------

def _ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise DataError(RAY_MISSING) from None
    return ray


def cluster_cpus() -> int:
    return max(1, int(_ray().cluster_resources().get("CPU", 1)))


def connect(address: str | None) -> bool:
    """Connect to the cluster at ``address`` (``auto``: the one ``ray start`` runs on this machine), or start a
    local one; an already initialized Ray is used as it is. True when this call started it (the caller shuts it down)."""
    ray = _ray()
    # Ray Data logs every dataset's plan and progress at INFO: the build's own progress lines say what runs
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if ray.is_initialized():
        return False
    quiet = dict(log_to_driver=False, logging_level=logging.WARNING)
    if address:
        ray.init(address=address, **quiet)
    else:  # "local": a new Ray even when a `ray start` cluster runs here (that one is --ray-address auto)
        ray.init(address="local", include_dashboard=False, **quiet)
    return True


def _pack(part: ShardPart) -> dict[str, np.ndarray]:
    return {"part": np.array([pickle.dumps(part, protocol=5)], dtype=object)}


def _read_shards(batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data read step: a batch of pickled shards in, one row per :class:`ShardPart` out (streamed)."""
    for blob in batch["shard"]:
        for part in read_shard(pickle.loads(blob)):
            yield _pack(part)


class _PipelineWorker:
    """Ray Data actor: one :class:`RowPipeline` per worker process, built when the actor starts."""

    def __init__(self, shipped: list[Any]):
        import ray

        spec, tokenizer, decontaminator, self.dedup, self.sketch_dir = ray.get(shipped[0])
        self.pipeline = RowPipeline(spec, tokenizer=tokenizer, decontaminator=decontaminator)
        self.pipeline.encoder  # compile the template now, not on the first batch  # noqa: B018

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for blob in batch["part"]:
            yield _pack(process_part(pickle.loads(blob), self.pipeline, self.dedup, self.sketch_dir))


def run_on_ray(pipeline: RowPipeline, shards: Iterable[ReadShard], *, address: str | None = None,
               dedup: Any = None, sketch_dir: str | None = None, workers: int | None = None) -> Iterator[ShardPart]:
    """Run phase 1 on Ray: every shard read and processed by the cluster; the parts are yielded in input order
    (shard by shard, batch by batch), ready for the driver's merge. ``dedup``: a
    :class:`~sftdata.clean.dedup.DedupConfig` (the survivors are sketched on the workers, the sketches written to
    ``sketch_dir``, a directory every node can write, for :func:`~sftdata.clean.dedup_ray.dedup_on_ray`).
    ``workers``: size of the actor pool (default: the cluster's CPUs)."""
    ray = _ray()
    from ray.data import ActorPoolStrategy, DataContext

    shards = list(shards)
    started = connect(address)
    context = DataContext.get_current()
    saved = context.execution_options.preserve_order, context.enable_progress_bars
    try:
        context.execution_options.preserve_order = True  # the merge, hence every output file, is in input order
        context.enable_progress_bars = False
        tokenizer = pipeline.encoder.tokenizer
        # the loaded tokenizer and the decontamination index go to the object store once; each actor fetches them
        shipped = ray.put((pipeline.spec, tokenizer, pipeline.stages[1], dedup, sketch_dir))
        size = workers or cluster_cpus()
        ds = ray.data.from_items([{"shard": pickle.dumps(s, protocol=5)} for s in shards],
                                 override_num_blocks=max(1, len(shards)))
        # a read task whose worker dies is retried (Ray's default for tasks: 3 times); a pipeline actor that dies
        # is restarted and its batch re-sent (Ray Data's default for actors: max_restarts=-1, max_task_retries=-1)
        ds = ds.map_batches(_read_shards, batch_size=1)
        ds = ds.map_batches(_PipelineWorker, batch_size=1, fn_constructor_args=([shipped],),
                            compute=ActorPoolStrategy(min_size=1, max_size=size))
        for row in ds.iter_rows():
            yield pickle.loads(row["part"])
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = saved
        if started:
            ray.shutdown()


def write_shards_on_ray(jobs: list[Any], members: np.ndarray, plan: Any = None) -> list[Any]:
    """Phase 3 on Ray: one task per output shard of a split runs :func:`sftdata.build.write_split_shard` (it gathers its
    rows from the staging file, on the filesystem every node shares, and writes its Parquet file there); the split's
    members and packing plan go to the object store once. The shards' results, in shard order. A task whose worker dies
    is retried (Ray's default: 3 times) and rewrites its whole file."""
    ray = _ray()
    from sftdata.build import write_split_shard

    task = ray.remote(write_split_shard)
    shared_members, shared_plan = ray.put(members), ray.put(plan)
    return ray.get([task.remote(job, shared_members, shared_plan) for job in jobs])
