"""``show``: print built rows token by token, so a person can see exactly what is trained.

Every token is printed with its whitespace made visible (``·`` space, ``↵`` newline, ``→`` tab). Trained tokens
are green and wrapped in ``⟦ ⟧`` runs (the brackets make it readable without colour); masked tokens are dim red;
special tokens are bold. Packed rows show a rule where one example ends and the next begins.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from sftdata.record import DataError
from sftdata.render import IGNORE_INDEX
from sftdata.write import read_manifest, split_files

VISIBLE = str.maketrans({" ": "·", "\n": "↵\n", "\t": "→", "\r": "␍"})
TRAINED_STYLE = "bold green"
MASKED_STYLE = "red dim"
OPEN, CLOSE = "⟦", "⟧"


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


def _tokenizer_for(manifest: dict[str, Any]) -> Any | None:
    from sftdata.tokenizer import load_tokenizer

    spec = manifest["tokenizer"].get("load") or manifest["tokenizer"].get("name_or_path")
    try:
        return load_tokenizer(spec)
    except Exception:
        return None


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


def render_row(row: dict[str, Any], tokenizer: Any, *, color: bool = True, separator: str = "") -> Text:
    """The token stream of one row as rich Text (trained runs in ⟦ ⟧; ``separator`` between tokens)."""
    ids, labels = row["input_ids"], row["labels"]
    pieces = token_pieces(tokenizer, ids)
    specials = set(tokenizer.all_special_ids) if tokenizer is not None else set()
    boundaries = _example_starts(row)
    text = Text()
    trained_open = False
    for i, (token_id, label, piece) in enumerate(zip(ids, labels, pieces)):
        if i in boundaries and i > 0:
            if trained_open:
                text.append(CLOSE, style=TRAINED_STYLE)
                trained_open = False
            n = boundaries[i]
            where = f" · {row['source'][n]}:{row['row'][n]}" if isinstance(row.get("source"), list) else ""
            text.append(f"\n──── example {n + 1}{where} starts (position_ids restart) ────\n", style="bold yellow")
        trained = label != IGNORE_INDEX
        if not trained and trained_open:
            text.append(CLOSE, style=TRAINED_STYLE)
            trained_open = False
        if separator and i > 0 and i not in boundaries:
            text.append(separator, style="dim" if color else None)
        if trained and not trained_open:
            text.append(OPEN, style=TRAINED_STYLE)
            trained_open = True
        style = TRAINED_STYLE if trained else MASKED_STYLE
        if token_id in specials:
            style += " bold reverse" if color else ""
        shown = piece.translate(VISIBLE)
        if label not in (IGNORE_INDEX, token_id):
            shown += f"[label={label}]"  # never expected for sftdata output; make it loud if it happens
        text.append(shown, style=style if color else None)
    if trained_open:
        text.append(CLOSE, style=TRAINED_STYLE)
    return text


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
    where = (f"{source}:{row.get('row')}" if isinstance(source, str)
             else f"{len(row.get('seq_lengths') or [])} packed examples")
    return (f"row {row['_index']} · {where} · {len(ids)} tokens · {trained} trained · "
            f"truncated: {_truncated(row.get('truncated'))}")


def _truncated(value: Any) -> str:
    if isinstance(value, list):  # packed row: one flag per example
        return f"{sum(value)} of {len(value)} examples" if any(value) else "no"
    return "yes" if value else "no"


def ids_table(row: dict[str, Any], tokenizer: Any) -> Table:
    """Token-by-token table: index, id, token, label (and position id for packed rows)."""
    table = Table(show_lines=False)
    for name in ("i", "id", "token", "label") + (("pos",) if row.get("position_ids") else ()):
        table.add_column(name, justify="right" if name != "token" else "left")
    pieces = token_pieces(tokenizer, row["input_ids"])
    positions = row.get("position_ids") or []
    for i, (token_id, label, piece) in enumerate(zip(row["input_ids"], row["labels"], pieces)):
        style = TRAINED_STYLE if label != IGNORE_INDEX else MASKED_STYLE
        cells = [str(i), str(token_id), repr(piece)[1:-1], str(label)] + ([str(positions[i])] if positions else [])
        table.add_row(*cells, style=style)
    return table


def show(
    directory: str | Path,
    *,
    row: int = 0,
    count: int = 1,
    split: str = "train",
    ids: bool = False,
    separator: str = "",
    color: bool | None = None,
    console: Console | None = None,
) -> list[dict[str, Any]]:
    """Print ``count`` rows starting at ``row``; returns the rows shown. ``separator`` (e.g. ``"|"``) is printed
    between tokens so token boundaries are visible without colour."""
    manifest = read_manifest(directory)
    console = console or Console(no_color=(color is False), highlight=False)
    use_color = color if color is not None else console.color_system is not None
    tokenizer = _tokenizer_for(manifest)
    if tokenizer is None:
        console.print(f"[yellow]tokenizer {manifest['tokenizer'].get('name_or_path')!r} not found; showing ids only[/]")
    rows = load_rows(directory, split, row, count)
    console.print(f"{OPEN}trained{CLOSE} tokens are the loss targets (green); the rest are -100 (red). "
                  "· space  ↵ newline  → tab", style="dim", soft_wrap=True)
    for r in rows:
        parts: list[Any] = [Text(f"── {header(r)} ──", style="cyan")]
        parts.append(ids_table(r, tokenizer) if ids else render_row(r, tokenizer, color=use_color, separator=separator))
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
