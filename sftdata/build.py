"""``build``: ingest → clean → render/tokenize → truncate → split → (pack) → write, streaming in batches."""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter, defaultdict
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from sftdata import __version__
from sftdata.ingest import ReadStats, input_size, parse_columns, read_records, resolve_inputs
from sftdata.record import DataError, ProblemLog, Record
from sftdata.render import EncodeOptions, Encoded, Encoder, truncate
from sftdata.policy import plan_history_policy
from sftdata.templates import load_template
from sftdata.verify import preflight
from sftdata.tokenizer import load_tokenizer, tokenizer_identity
from sftdata.write import (
    FORMAT,
    LABELS_NOTE,
    OutputClaim,
    SplitWriter,
    check_output_files,
    check_output_paths,
    file_sha256,
    fingerprint,
    is_sftdata_output,
    output_files,
    read_manifest,
    write_manifest,
)

DEFAULT_OUTPUT = "sftdata-out"
TRUNCATION = ("right", "drop")


@dataclass
class BuildResult:
    output: Path
    manifest: dict[str, Any]
    up_to_date: bool = False


def assign_split(key: str, row: int, eval_fraction: float, seed: int) -> str:
    """Deterministic train/validation assignment from the input file's hash, the row and the seed."""
    if eval_fraction <= 0:
        return "train"
    h = xxhash.xxh64_intdigest(f"{seed}:{key}:{row}".encode())
    return "validation" if h < eval_fraction * 2**64 else "train"


class _Progress:
    """A rich progress bar over input bytes (no-op when disabled)."""

    def __init__(self, enabled: bool, total: int, console: Any = None):
        self.enabled = enabled
        self._progress = None
        if enabled:
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                                      TextColumn("{task.fields[rows]} rows"), TimeElapsedColumn(), TimeRemainingColumn(),
                                      console=console, transient=False)
            self._task = self._progress.add_task("build", total=total or None, rows=0)

    def __enter__(self):
        if self._progress is not None:
            self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def phase(self, description: str, total: int) -> None:
        if self._progress is not None:
            self._progress.reset(self._task, total=total or None, description=description, rows=0)

    def advance(self, nbytes: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, nbytes)

    def rows(self, n: int) -> None:
        if self._progress is not None:
            task = self._progress.tasks[0]
            self._progress.update(self._task, rows=task.fields["rows"] + n)


def _columns(examples: list[Encoded]) -> dict[str, list[Any]]:
    return {
        "input_ids": [e.input_ids for e in examples],
        "labels": [e.labels for e in examples],
        "source": [e.source for e in examples],
        "row": [e.row for e in examples],
        "num_tokens": [len(e.input_ids) for e in examples],
        "num_trained": [e.num_trained for e in examples],
        "truncated": [e.truncated for e in examples],
        "kinds": [e.kinds for e in examples],
    }


def build(
    inputs: list[str] | str,
    *,
    template: str = "chatml",
    tokenizer: str | None = None,
    output: str | Path = DEFAULT_OUTPUT,
    format: str | None = None,
    columns: dict[str, str] | str | None = None,
    strip: bool = False,
    max_length: int | None = None,
    truncation: str = "right",
    train_turns: str = "all",
    train_on_prompt: bool = False,
    special_text: str = "reject",
    on_error: str = "skip",
    pack: bool = False,
    eval_fraction: float = 0.0,
    seed: int = 0,
    dedup: bool = False,
    dedup_options: dict[str, Any] | None = None,
    decontaminate: list[str] | tuple[str, ...] = (),
    decontaminate_options: dict[str, Any] | None = None,
    report: str | Path | None = None,
    history_policy: str = "auto",
    tokenization: str = "auto",
    template_kwargs: dict[str, Any] | None = None,
    template_date: str | None = None,
    system_prompt: str | None = None,
    allow_unverified: bool = False,
    batch_size: int = 1000,
    workers: int = 1,
    force: bool = False,
    progress: bool = False,
    console: Any = None,
) -> BuildResult:
    """Build training-ready token data from ``inputs`` into ``output`` (Parquet + ``manifest.json``).

    Every row either becomes an example whose labels satisfy the invariants I1–I5 (docs/invariants.md) or is counted
    in the manifest with its reason (``--on-error skip``), or stops the build (``on_error="fail"``). When ``output``
    already holds a build with the same fingerprint (input bytes, template, tokenizer, options, sftdata version) and
    every file it records is intact, nothing is redone unless ``force`` (``report`` is still written). The output is
    locked for the build, replaced as a whole, and never holds files sftdata did not write (O1–O6).
    ``history_policy`` (auto/split/last/fail) handles templates that render earlier turns differently from the final
    one (Qwen3 thinking); ``allow_unverified`` builds even when the template/tokenizer pair fails the preflight
    invariant checks. ``workers``: encoder processes (1 = in-process; on a 2-core machine a pool measured slower, see bench/).
    """
    started = time.perf_counter()
    inputs = [inputs] if isinstance(inputs, (str, Path)) else [str(p) for p in inputs]
    if not inputs:
        raise DataError("no input files given")
    if truncation not in TRUNCATION:
        raise DataError(f"truncation must be one of {TRUNCATION}, not {truncation!r}")
    if pack and not max_length:
        raise DataError("--pack needs --max-length N (the packed row length)")
    if not 0 <= eval_fraction < 1:
        raise DataError(f"--eval-fraction must be in [0, 1), not {eval_fraction}")
    inputs = [source.path for source in resolve_inputs(inputs)]  # checked and expanded before any tokenizer loads
    output = Path(output)
    check_output_paths(output, inputs=[*inputs, *decontaminate], report=report)
    # Held to the end: a second build of this output fails naming this one; puts back an output a killed build
    # left moved aside; refuses an output holding files sftdata did not write.
    claim = OutputClaim(output).acquire()
    tmp = None
    try:
        column_map = parse_columns(columns)
        encode_options = EncodeOptions(train_turns=train_turns, train_on_prompt=train_on_prompt, special_text=special_text,
                                       history_policy=history_policy, tokenization=tokenization,
                                       template_kwargs=dict(template_kwargs or {}),
                                       max_length=max_length if truncation == "right" else None)

        tok = load_tokenizer(tokenizer, template=template)
        tpl = load_template(template, tok)
        if "strftime_now" in tpl.source:
            # a template that prints today's date renders the build's date, recorded, so a replay renders the same text
            encode_options.template_date = template_date or time.strftime("%Y-%m-%d", time.gmtime())
        encoder = Encoder(tpl, tok, encode_options)
        history = plan_history_policy(encoder)
        # Verify the template/tokenizer pair once, before reading any data (I1-I4 of docs/invariants.md on a built-in suite).
        verified = preflight(encoder)
        if not verified.invariant_ok and not allow_unverified:
            raise DataError(f"template {tpl.name!r} with tokenizer {getattr(tok, 'sftdata_name', tok.name_or_path)!r} fails "
                            f"the invariant checks (pass --allow-unverified to build anyway):\n{verified.format_text()}")
        warnings: list[str] = []
        if verified.differs_from_tokenizer:
            warnings.append(f"template {tpl.name!r} differs from the tokenizer's own chat_template; the trainer saves "
                            "this training template with the adapter, so serve with it")
        if not verified.invariant_ok:
            warnings.append("built with --allow-unverified although the invariant checks failed")
        tok_identity = tokenizer_identity(tok)
        # What load_tokenizer() takes to get the same tokenizer back (show, train).
        tok_identity["load"] = (str(Path(tokenizer).resolve()) if tokenizer and Path(tokenizer).exists()
                                else tokenizer or tok.sftdata_name.split(" ")[0])

        input_hashes = {p: (file_sha256(p) if Path(p).is_file() else _dir_hash(Path(p))) for p in inputs}
        options = {
            "format": format, "columns": column_map, "strip": strip, "max_length": max_length, "truncation": truncation,
            "train_turns": train_turns, "train_on_prompt": train_on_prompt, "special_text": special_text,
            "on_error": on_error, "pack": pack, "history_policy": history_policy, "tokenization": tokenization,
            "template_kwargs": encode_options.template_kwargs, "template_date": encode_options.template_date,
            "system_prompt": system_prompt, "allow_unverified": allow_unverified, "eval_fraction": eval_fraction,
            "seed": seed,
            "dedup": dedup, "dedup_options": dedup_options or {}, "decontaminate": [file_sha256(p) for p in decontaminate],
            "decontaminate_options": decontaminate_options or {},
        }
        key = fingerprint([FORMAT, __version__, input_hashes, tpl.sha256, tok_identity["sha256"], options])
        if not force and is_sftdata_output(output):
            existing = read_manifest(output)
            # Up to date only when every file the manifest records is there with its size and sha256.
            if existing.get("fingerprint") == key and not check_output_files(output, existing):
                if report is not None:
                    shutil.copyfile(output / "removed.jsonl", report)
                return BuildResult(output, existing, up_to_date=True)

        data_started = time.perf_counter()  # setup (tokenizer load, template preflight, input hashes) ends here
        problems = ProblemLog(on_error=on_error)
        removed: Counter[str] = Counter()
        stats: list[ReadStats] = []
        per_source: dict[str, Counter[str]] = defaultdict(Counter)
        example_counts: Counter[str] = Counter()
        end_ids: Counter[int] = Counter()
        kept = truncated = 0
        read_options = dict(format=format, columns=column_map, strip=strip, system_prompt=system_prompt,
                            template_variables=tpl.variables, batch_size=batch_size)
        lost_to_truncation: Counter[str] = Counter()
        assistant_turns: Counter[int] = Counter()  # per conversation that reaches the encoder (after cleaning)
        total_bytes = sum(input_size(p) for p in inputs)
        # The staging dir is only the in-progress output: any failure removes it and leaves `output` as it was.
        tmp = claim.stage()
        # Raw-text corpora are packed as fixed blocks (the continued-pretraining convention): long documents are cut
        # across blocks, never truncated.
        raw_text_blocks = pack and all(_input_format(p, format, column_map) == "text" for p in inputs)
        cleaners = _make_cleaners(dedup, dedup_options, decontaminate, decontaminate_options)
        split_dir = tmp / "unpacked" if pack else tmp
        split_dir.mkdir(exist_ok=True)
        writers = {name: SplitWriter(split_dir, name) for name in (("train", "validation") if eval_fraction > 0 else ("train",))}
        with ExitStack() as stack:
            bar = stack.enter_context(_Progress(progress, total_bytes, console))
            problems.sink = stack.enter_context(open(tmp / "problems.jsonl", "w", encoding="utf-8"))
            removed_file = stack.enter_context(open(tmp / "removed.jsonl", "w", encoding="utf-8"))
            deduplicator = cleaners.get("dedup")
            if deduplicator is not None:  # pass 1: sketch everything, then cluster
                bar.phase("dedup: sketching", total_bytes)
                for batch in read_records(inputs, problems=ProblemLog(), on_progress=bar.advance, **read_options):
                    deduplicator.add_batch(batch)
                    bar.rows(len(batch))
                deduplicator.finalize()
                bar.phase("build", total_bytes)
            def cleaned_batches():
                for batch in read_records(inputs, problems=problems, on_progress=bar.advance, stats=stats, **read_options):
                    bar.rows(len(batch))
                    for stage in cleaners.values():
                        batch, removals = stage.filter_batch(batch)
                        for removal in removals:
                            removed[removal.reason] += 1
                            removed_file.write(json.dumps(removal.to_dict(), ensure_ascii=False) + "\n")
                    assistant_turns.update(sum(m.role == "assistant" for m in r.messages) for r in batch if r.is_chat)
                    yield batch

            n_workers = max(1, workers)
            for examples, batch_problems in encode_batches(cleaned_batches(), encoder, workers=n_workers,
                                                           template=template, tokenizer=tokenizer):
                problems.extend(batch_problems)
                outputs: dict[str, list[Encoded]] = defaultdict(list)
                for example in examples:
                    if max_length and len(example.input_ids) > max_length and not raw_text_blocks:
                        if truncation == "drop":
                            _too_long(problems, example, max_length, "dropped (--truncation drop)")
                            continue
                        cut = truncate(example, max_length)
                        if cut is None:
                            _too_long(problems, example, max_length, "truncation would leave no trained token")
                            continue
                        lost_to_truncation["tokens"] += len(example.input_ids) - len(cut.input_ids)
                        lost_to_truncation["trained"] += example.num_trained - cut.num_trained
                        example = cut
                        truncated += 1
                    split = assign_split(input_hashes[example.source], example.row, eval_fraction, seed)
                    outputs[split].append(example)
                    source_stats = per_source[example.source]
                    source_stats["rows"] += 1
                    source_stats["tokens"] += len(example.input_ids)
                    source_stats["trained"] += example.num_trained
                    example_counts.update(example.counts)
                    if not example.is_text:
                        end_ids.update(example.input_ids[e - 1] for _, e in example.spans if not example.truncated or e < max_length)
                    kept += 1
                for split, split_examples in outputs.items():
                    writers[split].write_rows(_columns(split_examples))
            for writer in writers.values():
                writer.close()
        problems.sink = None

        splits = {name: {"rows": w.rows, "files": w.files} for name, w in writers.items()}
        packing = None
        if pack:
            from sftdata.pack import pack_split

            packing = {}
            for name, writer in writers.items():
                packing[name] = pack_split([str(split_dir / f) for f in writer.files], str(tmp), name, max_length,
                                           seed=seed, raw_text=raw_text_blocks)
                splits[name] = {"rows": packing[name]["rows"], "files": packing[name]["files"], "examples": writer.rows}
            shutil.rmtree(split_dir)

        if report is not None:
            shutil.copyfile(tmp / "removed.jsonl", report)
        total_tokens = sum(s["tokens"] for s in per_source.values())
        trained_tokens = sum(s["trained"] for s in per_source.values())
        manifest = {
            "format": FORMAT,
            "sftdata_version": __version__,
            "labels": LABELS_NOTE,
            "fingerprint": key,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "inputs": [{"path": s.path, "sha256": input_hashes[s.path], "format": s.format, "rows": s.rows,
                        "ignored_fields": dict(s.ignored_fields.most_common())} for s in stats],
            "template": {"name": tpl.name, "origin": tpl.origin, "text": tpl.source, "sha256": tpl.sha256,
                         "end_of_turn": encoder.end_of_turn, "variables": sorted(tpl.variables),
                         "end_of_turn_ids": [i for i, _ in end_ids.most_common()],
                         "end_of_turn_tokens": {tok.convert_ids_to_tokens(i): n for i, n in end_ids.most_common()}},
            "tokenizer": tok_identity,
            "options": options,
            "counts": {
                "rows_read": sum(s.rows for s in stats),
                "rows_kept": kept,
                "skipped": dict(sorted(problems.counts.items())),
                "skipped_total": problems.total,
                "removed": dict(sorted(removed.items())),
                "truncated": truncated,
                **{k: example_counts[k] for k in sorted(example_counts)},
            },
            "tokens": {"total": total_tokens, "trained": trained_tokens,
                       "per_source": {k: dict(v) for k, v in per_source.items()},
                       "lost_to_truncation": {"tokens": lost_to_truncation["tokens"],
                                              "trained": lost_to_truncation["trained"]}},
            "conversations": {"assistant_turns": {str(k): v for k, v in sorted(assistant_turns.items())}},
            "splits": splits,
            "packing": packing,
            "cleaning": {name: stage.summary() for name, stage in cleaners.items()},
            "history_policy": history.to_dict(),
            "verify": verified.manifest_entry(),
            "warnings": warnings,
            "problems": problems.to_dict()["examples"],
            "seconds": round(time.perf_counter() - started, 3),
            "seconds_setup": round(data_started - started, 3),
        }
        manifest["files"] = output_files(tmp)
        write_manifest(tmp, manifest)
        claim.commit(tmp)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and (message := claim.describe_error(e, report=report)) is not None:
            raise DataError(message) from None
        raise
    finally:
        claim.release()
    return BuildResult(output, manifest)


_worker_encoder: Encoder | None = None


def _init_worker(template: str, tokenizer: str | None, options: EncodeOptions) -> None:
    global _worker_encoder
    tok = load_tokenizer(tokenizer, template=template)
    _worker_encoder = Encoder(load_template(template, tok), tok, options)


def _encode_in_worker(batch: list[Record]):
    return _worker_encoder.encode_batch(batch)


def encode_batches(batches, encoder: Encoder, *, workers: int, template: str, tokenizer: str | None):
    """Yield ``(examples, problems)`` per batch, in input order, in-process or in a pool of ``workers`` processes.

    Rendering is Python (Jinja) and holds the GIL, so parallelism needs processes; each worker builds its own
    encoder from the same template and tokenizer specs.
    """
    if workers <= 1:
        for batch in batches:
            yield encoder.encode_batch(batch)
        return
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(template, tokenizer, encoder.options)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.submit(_encode_in_worker, batch))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _too_long(problems: ProblemLog, example: Encoded, max_length: int, why: str) -> None:
    from sftdata.record import Problem

    problems.add(Problem(example.source, example.row, "truncate", "too-long",
                         f"{len(example.input_ids)} tokens > --max-length {max_length}: {why}"))


def _input_format(path: str, format: str | None, columns: dict[str, str]) -> str | None:
    """The format of an input's first readable row (cheap: reads one row)."""
    if format is not None:
        return format
    stats: list[ReadStats] = []
    for _ in read_records([path], columns=columns, problems=ProblemLog(), batch_size=1, stats=stats):
        break
    return stats[0].format if stats else None


def _make_cleaners(dedup: bool, dedup_options: dict[str, Any] | None, decontaminate, decontaminate_options) -> dict[str, Any]:
    cleaners: dict[str, Any] = {}
    if decontaminate:
        from sftdata.clean import Decontaminator

        cleaners["decontaminate"] = Decontaminator(list(decontaminate), **(decontaminate_options or {}))
    if dedup:
        from sftdata.clean import Deduplicator

        cleaners["dedup"] = Deduplicator(**(dedup_options or {}))
    return cleaners


def _dir_hash(path: Path) -> str:
    """Hash of a dataset directory's files (names and contents), or of the hub id itself."""
    if not path.is_dir():
        return "hub:" + str(path)
    h = xxhash.xxh128()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(file.relative_to(path)).encode())
        h.update(file_sha256(file).encode())
    return h.hexdigest()
