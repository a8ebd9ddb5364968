"""``show``: print built rows token by token, so a person can see exactly what is trained.

Every token is printed with its whitespace made visible (``·`` space, ``↵`` newline, ``→`` tab). Trained tokens
are green and wrapped in ``⟦ ⟧`` runs (the brackets make it readable without colour); masked tokens are dim red;
special tokens are bold. Reasoning, tool calls and tool results are marked where they start (``‹reasoning›``,
``‹tool call›``, ``‹tool result›``) and styled (italic, underlined, on a dark background). Packed rows show a rule where each example begins, with its source file and row; a
truncated example ends with a ``✂`` cut marker. Rows are picked by index, by ``file:row`` of the input, or by a
filter (truncated rows, rows from one source file).
"""

from __future__ import annotations

import json

from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from sftdata.record import DataError
from sftdata.render import IGNORE_INDEX, KIND_CODE, KINDS
from sftdata.write import read_manifest, split_files

VISIBLE = str.maketrans({" ": "·", "\n": "↵\n", "\t": "→", "\r": "␍"})
VISIBLE_CELL = str.maketrans({" ": "·", "\n": "↵", "\t": "→", "\r": "␍"})  # one line per table cell
TRAINED_STYLE = "bold green"
MASKED_STYLE = "red dim"
OPEN, CLOSE = "⟦", "⟧"
CUT = "✂"
# Spans a person reading a row wants to find: marked where they start, styled throughout (the kinds column).
MARKED_KINDS = {KIND_CODE["reasoning"]: ("‹reasoning›", "italic"), KIND_CODE["tool_call"]: ("‹tool call›", "underline"),
                KIND_CODE["tool_result"]: ("‹tool result›", "on grey11")}


def load_rows(directory: str | Path, split: str = "train", start: int = 0, count: int = 1) -> list[dict[str, Any]]:
    """Rows ``start .. start+count-1`` of ``split`` as dicts (reads only the shards it needs)."""
    files = split_files(directory, split).get(split)
    if not files:
        raise DataError(f"{directory} has no split {split!r}")
    rows: list[dict[str, Any]] = []
    offset = 0
    for file in files:
        n = pq.ParquetFile(file).metadata.num_rows
        if start < offset + n and len(rows) < count:
            table = pq.read_table(file)
            lo = max(0, start - offset)
            rows.extend(table.slice(lo, count - len(rows)).to_pylist())
        offset += n
        if len(rows) >= count:
            break
    if not rows:
        raise DataError(f"row {start} is out of range: split {split!r} has {offset} rows")
    for i, row in enumerate(rows):
        row["_index"] = start + i
    return rows


def load_rows_at(directory: str | Path, split: str, indices: list[int]) -> list[dict[str, Any]]:
    """The rows at ``indices`` (ascending) of ``split`` as dicts, reading only the shards that hold them."""
    files = split_files(directory, split).get(split) or []
    rows: list[dict[str, Any]] = []
    offset = 0
    for file in files:
        n = pq.ParquetFile(file).metadata.num_rows
        local = [i - offset for i in indices if offset <= i < offset + n]
        if local:
            rows.extend(pq.read_table(file).take(local).to_pylist())
        offset += n
    for row, index in zip(rows, indices):
        row["_index"] = index
    return rows


def parse_where(where: str) -> tuple[str, int]:
    """``"data.jsonl:17"`` → ``("data.jsonl", 17)``."""
    file, _, row = where.rpartition(":")
    if not file or not row.strip().isdigit():
        raise DataError(f"--where {where!r}: expected FILE:ROW, e.g. data.jsonl:17 (the input file and its 1-based row)")
    return file, int(row)


def _source_matches(value: str, wanted: str) -> bool:
    """An input path as the manifest records it matches ``wanted`` given in full, relative or by file name."""
    if value == wanted or Path(value).name == wanted or value.endswith("/" + wanted.removeprefix("./")):
        return True
    try:
        return Path(value).resolve() == Path(wanted).resolve()
    except OSError:
        return False


def _where_else(directory: str | Path, manifest: dict[str, Any], split: str, source: str, row: int) -> str:
    """Where input row ``source:row`` went when it is not in ``split``: another split, removed (by which stage and
    why) or skipped (the problem), from the output's own files."""
    for other in manifest.get("splits", {}):
        if other != split and find_rows(directory, other, source=source, row=row):
            return f": it is in split {other!r} (--split {other})"
    for name, verb in (("removed.jsonl", "removed"), ("problems.jsonl", "skipped")):
        path = Path(directory) / name
        if not path.exists():
            continue
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                entry = json.loads(line)
                if entry.get("row") == row and _source_matches(str(entry.get("source")), source):
                    why = entry.get("reason") or entry.get("kind")
                    stage = f"{entry['stage']}: " if entry.get("stage") else ""
                    return f": it was {verb} ({stage}{why}: {entry.get('detail', '')}), see {name}"
    return ": the output holds no trace of it (is the file and row right? rows are 1-based)"


def find_rows(directory: str | Path, split: str = "train", *, source: str | None = None, row: int | None = None,
              truncated: bool = False) -> list[int]:
    """Indices of the rows of ``split`` holding an example from input file ``source`` (full path, relative path or
    file name), at input row ``row``, and/or cut by truncation. A packed row matches when one of its examples does."""
    files = split_files(directory, split).get(split)
    if not files:
        raise DataError(f"{directory} has no split {split!r}")
    found: list[int] = []
    offset = 0
    for file in files:
        table = pq.read_table(file, columns=["source", "row", "truncated"])
        packed = pa.types.is_list(table.schema.field("source").type)
        columns = {name: pc.list_flatten(table[name]) if packed else table[name] for name in ("source", "row", "truncated")}
        mask = pa.array([True] * len(columns["row"]), pa.bool_())
        if source is not None:
            values = [v for v in pc.unique(columns["source"]).to_pylist() if v is not None and _source_matches(v, source)]
            mask = pc.and_(mask, pc.is_in(columns["source"], value_set=pa.array(values, pa.string())))
        if row is not None:
            mask = pc.and_(mask, pc.equal(columns["row"], row))
        if truncated:
            mask = pc.and_(mask, columns["truncated"])
        hits = pc.indices_nonzero(pc.fill_null(mask, False)).to_numpy()
        if packed:
            hits = sorted(set(pc.list_parent_indices(table["source"]).to_numpy()[hits].tolist()))
        found.extend(offset + int(i) for i in hits)
        offset += table.num_rows
    return found


def _tokenizer_for(manifest: dict[str, Any]) -> tuple[Any | None, str | None]:
    """The build's tokenizer, or None and the one-line reason it cannot be loaded."""
    from sftdata.tokenizer import load_tokenizer

    spec = manifest["tokenizer"].get("load") or manifest["tokenizer"].get("name_or_path")
    try:
        return load_tokenizer(spec), None
    except DataError as e:
        return None, str(e)


def token_pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """Text of each token; a multi-byte character split across tokens is shown on its last token."""
    if tokenizer is None:
        return [f"<{i}>" for i in ids]
    backend = tokenizer.backend_tokenizer
    pieces: list[str] = []
    pending: list[int] = []
    for token_id in ids:
        pending.append(token_id)
        text = backend.decode(pending, skip_special_tokens=False)
        if text.endswith("\ufffd") and len(pending) < 4:
            pieces.append("")
            continue
        # SentencePiece decoders drop a leading "▁"; restore it so a word-initial space stays visible.
        raw = backend.id_to_token(pending[0]) or ""
        if raw.startswith("▁") and not text.startswith(" "):
            text = " " + text
        pieces.append(text)
        pending = []
    return pieces


def _cut_note(max_length: int | None) -> str:
    return f"{CUT} cut here by --max-length {max_length}" if max_length else f"{CUT} cut here by truncation"


def render_row(row: dict[str, Any], tokenizer: Any, *, color: bool = True, separator: str = "",
               max_length: int | None = None) -> Text:
    """The token stream of one row as rich Text (trained runs in ⟦ ⟧; ``separator`` between tokens; a ``✂`` marker
    where truncation cut an example; in a packed row a rule with the source file and row where each example starts)."""
    ids, labels = row["input_ids"], row["labels"]
    pieces = token_pieces(tokenizer, ids)
    specials = set(tokenizer.all_special_ids) if tokenizer is not None else set()
    boundaries = _example_starts(row)
    cuts = _cut_positions(row)
    kinds = row.get("kinds")
    text = Text()
    trained_open = False
    for i, (token_id, label, piece) in enumerate(zip(ids, labels, pieces)):
        if i in cuts and i > 0:
            if trained_open:
                text.append(CLOSE, style=TRAINED_STYLE)
                trained_open = False
            text.append(f" {_cut_note(max_length)}", style="bold magenta")
        if i in boundaries:
            if trained_open:
                text.append(CLOSE, style=TRAINED_STYLE)
                trained_open = False
            n = boundaries[i]
            text.append(f"{chr(10) if i else ''}──── example {n + 1} · {row['source'][n]}:{row['row'][n]} starts"
                        f"{' (position_ids restart)' if i else ''} ────\n", style="bold yellow")
        trained = label != IGNORE_INDEX
        if not trained and trained_open:
            text.append(CLOSE, style=TRAINED_STYLE)
            trained_open = False
        if separator and i > 0 and i not in boundaries:
            text.append(separator, style="dim" if color else None)
        kind = kinds[i] if kinds else 0
        if kind in MARKED_KINDS and (i == 0 or kinds[i - 1] != kind or i in boundaries):
            text.append(MARKED_KINDS[kind][0], style="bold blue" if color else None)
        if trained and not trained_open:
            text.append(OPEN, style=TRAINED_STYLE)
            trained_open = True
        style = TRAINED_STYLE if trained else MASKED_STYLE
        if kind in MARKED_KINDS:
            style += " " + MARKED_KINDS[kind][1]
        if token_id in specials:
            style += " bold reverse" if color else ""
        shown = piece.translate(VISIBLE)
        if label not in (IGNORE_INDEX, token_id):
            shown += f"[label={label}]"  # never expected for sftdata output; make it loud if it happens
        text.append(shown, style=style if color else None)
    if trained_open:
        text.append(CLOSE, style=TRAINED_STYLE)
    if len(ids) in cuts:
        text.append(f" {_cut_note(max_length)}", style="bold magenta")
    return text


def _cut_positions(row: dict[str, Any]) -> set[int]:
    """Token positions where a truncated example was cut (the end of that example in the row)."""
    flags = row.get("truncated")
    if isinstance(flags, list):  # packed: one flag per example
        ends, at = [], 0
        for length in row.get("seq_lengths") or []:
            at += length
            ends.append(at)
        return {end for end, cut in zip(ends, flags) if cut}
    return {len(row["input_ids"])} if flags else set()


def _example_starts(row: dict[str, Any]) -> dict[int, int]:
    lengths = row.get("seq_lengths")
    if not lengths:
        return {}
    starts, at = {}, 0
    for n, length in enumerate(lengths):
        starts[at] = n
        at += length
    return starts


def header(row: dict[str, Any]) -> str:
    ids, labels = row["input_ids"], row["labels"]
    trained = sum(1 for x in labels if x != IGNORE_INDEX)
    source = row.get("source")
    packed = len(row.get("seq_lengths") or [])
    where = (f"{source}:{row.get('row')}" if isinstance(source, str)
             else f"{packed} packed example{'s' if packed != 1 else ''}")
    return (f"row {row['_index']} · {where} · {len(ids)} tokens · {trained} trained · "
            f"truncated: {_truncated(row.get('truncated'))}")


def _truncated(value: Any) -> str:
    if isinstance(value, list):  # packed row: one flag per example
        return f"{sum(value)} of {len(value)} examples" if any(value) else "no"
    return "yes" if value else "no"


def ids_table(row: dict[str, Any], tokenizer: Any, *, max_length: int | None = None) -> Table:
    """Token-by-token table: index, id, token (whitespace visible: ``·`` space, ``↵`` newline, ``→`` tab), label
    (and position id for packed rows); a rule row where a packed example starts and a ``✂`` row where one was cut."""
    table = Table(show_lines=False)
    positions = row.get("position_ids") or []
    kinds = row.get("kinds") or []
    names = ("i", "id", "token", "label") + (("pos",) if positions else ()) + (("kind",) if kinds else ())
    for name in names:
        table.add_column(name, justify="right" if name != "token" else "left")
    pieces = token_pieces(tokenizer, row["input_ids"])
    boundaries = _example_starts(row)
    cuts = _cut_positions(row)
    for i, (token_id, label, piece) in enumerate(zip(row["input_ids"], row["labels"], pieces)):
        if i in cuts and i > 0:
            table.add_row("", "", _cut_note(max_length), *[""] * (len(names) - 3), style="bold magenta")
        if i in boundaries:
            n = boundaries[i]
            table.add_row("", "", f"── example {n + 1} · {row['source'][n]}:{row['row'][n]} ──", *[""] * (len(names) - 3),
                          style="bold yellow")
        style = TRAINED_STYLE if label != IGNORE_INDEX else MASKED_STYLE
        shown = piece.translate(VISIBLE_CELL) if piece else "∅"  # ∅: a byte of a character completed by a later token
        cells = ([str(i), str(token_id), shown, str(label)] + ([str(positions[i])] if positions else [])
                 + ([KINDS[kinds[i]]] if kinds else []))
        table.add_row(*cells, style=style)
    if len(row["input_ids"]) in cuts:
        table.add_row("", "", _cut_note(max_length), *[""] * (len(names) - 3), style="bold magenta")
    return table


def show(
    directory: str | Path = "sftdata-out",
    *,
    row: int = 0,
    count: int = 1,
    split: str = "train",
    ids: bool = False,
    separator: str = "",
    where: str | None = None,
    source: str | None = None,
    truncated: bool = False,
    color: bool | None = None,
    console: Console | None = None,
) -> list[dict[str, Any]]:
    """Print ``count`` rows starting at ``row``; returns the rows shown. ``separator`` (e.g. ``"|"``) is printed
    between tokens so token boundaries are visible without colour.

    ``where="data.jsonl:17"`` shows the row built from row 17 of input data.jsonl; ``source`` keeps only rows from
    that input file and ``truncated`` only rows cut by truncation. With a filter, ``row`` and ``count`` apply to the
    matching rows (``row=2`` skips the first two matches).
    """
    manifest = read_manifest(directory)
    console = console or Console(no_color=(color is False), highlight=False)
    use_color = color if color is not None else console.color_system is not None
    max_length = (manifest.get("options") or {}).get("max_length")
    if where is not None or source is not None or truncated:
        wanted_source, wanted_row = parse_where(where) if where is not None else (None, None)
        if source is not None and wanted_source is not None and not _source_matches(wanted_source, source):
            raise DataError(f"--where {where} and --source {source} name different files")
        matches = find_rows(directory, split, source=source or wanted_source, row=wanted_row, truncated=truncated)
        if not matches:
            asked = " and ".join(x for x in (where and f"--where {where}", source and f"--source {source}",
                                             truncated and "--truncated") if x)
            hint = _where_else(directory, manifest, split, wanted_source, wanted_row) if where else ""
            raise DataError(f"no row of split {split!r} matches {asked}{hint}")
        if row >= len(matches):
            raise DataError(f"--row {row} is out of range: {len(matches)} rows match")
        rows = load_rows_at(directory, split, matches[row:row + count])
    else:
        rows = load_rows(directory, split, row, count)
    tokenizer, why = _tokenizer_for(manifest)
    if tokenizer is None:
        console.print(Text(f"showing token ids only: {why}", style="yellow"), soft_wrap=True)
    console.print(f"{OPEN}trained{CLOSE} tokens are the loss targets (green); the rest are -100 (red). "
                  f"· space  ↵ newline  → tab  {CUT} cut by truncation  "
                  + "  ".join(tag for tag, _ in MARKED_KINDS.values()), style="dim", soft_wrap=True)
    for r in rows:
        parts: list[Any] = [Text(f"── {header(r)} ──", style="cyan")]
        parts.append(ids_table(r, tokenizer, max_length=max_length) if ids
                     else render_row(r, tokenizer, color=use_color, separator=separator, max_length=max_length))
        # soft_wrap: rich never breaks a line (the terminal does), so the output is the same at any width
        console.print(Group(*parts), soft_wrap=True)
    return rows


def iter_runs(labels: list[int]) -> Iterator[tuple[int, int]]:
    """``[start, end)`` of each contiguous run of trained labels."""
    start = None
    for i, label in enumerate(labels):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            yield start, i
            start = None
    if start is not None:
        yield start, len(labels)
