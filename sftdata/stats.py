"""``stats``: what a built directory holds -- example lengths against the build's ``--max-length``, trained-token share
per source, rows skipped and removed by reason, truncation (examples cut and tokens lost), assistant turns per
conversation and packing figures -- as a dict, in the terminal (rich), and as a self-contained HTML page whose charts
are inline SVG (labelled axes, no plotting dependency; a browser saves or prints it as a picture).

Works on unpacked and packed output alike: for packed rows the example lengths come from ``seq_lengths`` and the
per-example trained tokens from ``labels`` split at those lengths.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

IGNORE_INDEX = -100
MANIFEST = "manifest.json"
HIST_BINS = 32


# ----------------------------------------------------------------------------------------------------------------
# Computing
# ----------------------------------------------------------------------------------------------------------------

def _split_files(directory: Path, manifest: dict[str, Any]) -> dict[str, list[Path]]:
    splits = manifest.get("splits") or {}
    if splits:
        return {name: [directory / f for f in info.get("files", [])] for name, info in splits.items()}
    found: dict[str, list[Path]] = {}
    for path in sorted(directory.glob("*-[0-9][0-9][0-9][0-9][0-9].parquet")):
        found.setdefault(path.name.rsplit("-", 1)[0], []).append(path)
    return found


def _nice_width(span: float, bins: int) -> int:
    raw = max(1.0, span / bins)
    scale = 10 ** math.floor(math.log10(raw))
    for step in (1, 2, 2.5, 5, 10):
        if step * scale >= raw and float(step * scale).is_integer():
            return int(step * scale)
    return int(math.ceil(raw))


def histogram(lengths: np.ndarray, max_length: int | None, bins: int = HIST_BINS) -> dict[str, Any]:
    """Right-closed bins ``(edges[i], edges[i+1]]`` over ``0..N`` (or ``0..max`` without N), plus the count above N."""
    longest = int(lengths.max()) if lengths.size else 0
    if max_length:
        width = max(1, -(-max_length // bins))
        edges = list(range(0, max_length, width)) + [max_length]
    else:
        width = _nice_width(longest or 1, bins)
        edges = list(range(0, (longest or 1) + width, width))
        if edges[-1] < longest:
            edges.append(edges[-1] + width)
    edges_arr = np.array(edges)
    inside = lengths[lengths <= edges_arr[-1]]
    idx = np.searchsorted(edges_arr, inside, side="left") - 1
    counts = np.bincount(np.maximum(idx, 0), minlength=len(edges) - 1)[: len(edges) - 1]
    return {"edges": edges, "counts": counts.astype(int).tolist(),
            "above_max_length": int((lengths > max_length).sum()) if max_length else 0}


def _length_summary(lengths: np.ndarray) -> dict[str, Any]:
    if not lengths.size:
        return {"min": 0, "median": 0, "mean": 0.0, "p95": 0, "p99": 0, "max": 0}
    p50, p95, p99 = np.percentile(lengths, [50, 95, 99])
    return {"min": int(lengths.min()), "median": int(p50), "mean": round(float(lengths.mean()), 1),
            "p95": int(p95), "p99": int(p99), "max": int(lengths.max())}


def _read_split(files: list[Path]) -> dict[str, Any]:
    """Per-example lengths, trained tokens, sources and truncated flags of one split, file by file."""
    lengths, trained, sources, truncated, row_tokens = [], [], [], [], []
    packed = False
    for path in files:
        if not path.exists():
            continue
        names = pq.read_schema(path).names
        if "seq_lengths" in names:
            packed = True
            t = pq.read_table(path, columns=["seq_lengths", "labels", "source", "truncated", "num_tokens"])
            seq = pc.list_flatten(t["seq_lengths"]).to_numpy(zero_copy_only=False).astype(np.int64)
            labels = pc.list_flatten(t["labels"]).to_numpy(zero_copy_only=False)
            cum = np.concatenate(([0], np.cumsum(labels != IGNORE_INDEX)))
            bounds = np.concatenate(([0], np.cumsum(seq)))
            lengths.append(seq)
            trained.append(cum[bounds[1:]] - cum[bounds[:-1]])
            sources.append(np.array(pc.list_flatten(t["source"]).to_pylist(), dtype=object))
            truncated.append(pc.list_flatten(t["truncated"]).to_numpy(zero_copy_only=False).astype(bool))
            row_tokens.append(t["num_tokens"].to_numpy().astype(np.int64))
        else:
            cols = [c for c in ("num_tokens", "num_trained", "source", "truncated") if c in names]
            t = pq.read_table(path, columns=cols + ([] if "num_tokens" in cols else ["input_ids", "labels"]))
            if "num_tokens" in cols:
                n = t["num_tokens"].to_numpy().astype(np.int64)
                k = t["num_trained"].to_numpy().astype(np.int64)
            else:
                n = pc.list_value_length(t["input_ids"]).to_numpy().astype(np.int64)
                k = np.array([sum(x != IGNORE_INDEX for x in y) for y in t["labels"].to_pylist()], dtype=np.int64)
            lengths.append(n)
            trained.append(k)
            sources.append(np.array(t["source"].to_pylist() if "source" in cols else [""] * len(n), dtype=object))
            truncated.append(t["truncated"].to_numpy(zero_copy_only=False).astype(bool) if "truncated" in cols
                             else np.zeros(len(n), bool))
            row_tokens.append(n)

    def cat(parts, dtype):
        return np.concatenate(parts) if parts else np.zeros(0, dtype)

    return {"packed": packed, "lengths": cat(lengths, np.int64), "trained": cat(trained, np.int64),
            "sources": cat(sources, object), "truncated": cat(truncated, bool), "row_tokens": cat(row_tokens, np.int64)}


def stats(directory: str | Path) -> dict[str, Any]:
    """Statistics of a built directory (``sftdata build`` output, packed or not) as a JSON-able dict."""
    from sftdata.write import restore_interrupted

    directory = Path(directory)
    if not directory.exists():
        restore_interrupted(directory)  # an output a killed build left moved aside
    manifest_path = directory / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    options = manifest.get("options") or {}
    packing = manifest.get("packing") or None
    max_length = options.get("max_length")
    if not max_length and packing:
        max_length = next((p.get("max_length") for p in packing.values() if isinstance(p, dict)), None)
    files = _split_files(directory, manifest)
    if not files:
        raise FileNotFoundError(f"{directory}: no sftdata output (no manifest.json and no SPLIT-NNNNN.parquet files)")

    out: dict[str, Any] = {"directory": str(directory), "max_length": max_length, "packed": False, "splits": {}}
    for name, paths in files.items():
        data = _read_split(paths)
        out["packed"] = out["packed"] or data["packed"]
        lengths, trained = data["lengths"], data["trained"]
        total_trained = int(trained.sum())
        per_source: dict[str, dict[str, Any]] = {}
        if lengths.size:
            keys, inverse = np.unique(data["sources"].astype(str), return_inverse=True)
            ex = np.bincount(inverse, minlength=keys.size)
            tok = np.bincount(inverse, weights=lengths, minlength=keys.size)
            tr = np.bincount(inverse, weights=trained, minlength=keys.size)
            for i in np.argsort(-tr, kind="stable"):
                per_source[str(keys[i])] = {
                    "examples": int(ex[i]), "tokens": int(tok[i]), "trained": int(tr[i]),
                    "trained_share": round(float(tr[i]) / total_trained, 6) if total_trained else 0.0,
                    "trained_fraction": round(float(tr[i]) / float(tok[i]), 6) if tok[i] else 0.0,
                }
        split = {
            "rows": int(data["row_tokens"].size), "examples": int(lengths.size), "tokens": int(lengths.sum()),
            "trained": total_trained, "length": _length_summary(lengths),
            "histogram": histogram(lengths, max_length),
            "at_max_length": int((lengths == max_length).sum()) if max_length else 0,
            "truncated": int(data["truncated"].sum()), "per_source": per_source,
        }
        if data["packed"]:
            rt = data["row_tokens"]
            split["row_fill"] = histogram(rt, max_length)
            split["fill_ratio"] = round(float(rt.sum()) / (rt.size * max_length), 6) if rt.size and max_length else 0.0
        out["splits"][name] = split

    counts = manifest.get("counts") or {}
    skipped = counts.get("skipped") or {}
    lost = (manifest.get("tokens") or {}).get("lost_to_truncation") or {}  # absent in outputs of older builds
    out["counts"] = {"rows_read": counts.get("rows_read"), "rows_kept": counts.get("rows_kept"),
                     "skipped": dict(skipped), "removed": dict(counts.get("removed") or {})}
    out["truncation"] = {
        "policy": options.get("truncation"),
        "truncated": counts.get("truncated", sum(s["truncated"] for s in out["splits"].values())),
        "truncated_per_split": {k: s["truncated"] for k, s in out["splits"].items()},
        "dropped_too_long": int(skipped.get("too-long", 0)),
        "tokens_lost": lost.get("tokens"),
        "trained_tokens_lost": lost.get("trained"),
    }
    turns = {int(k): int(v) for k, v in ((manifest.get("conversations") or {}).get("assistant_turns") or {}).items()}
    conversations = sum(turns.values())
    out["conversations"] = {
        "count": conversations, "assistant_turns": {str(k): v for k, v in sorted(turns.items())},
        "mean_assistant_turns": round(sum(k * v for k, v in turns.items()) / conversations, 2) if conversations else 0.0,
    }
    out["packing"] = packing
    return out


# ----------------------------------------------------------------------------------------------------------------
# Terminal
# ----------------------------------------------------------------------------------------------------------------

def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _table(title: str, columns: list[str], rows: list[list[str]], *, left: int = 1):
    """A rich table whose headers are never cut: every column is at least as wide as its header and numbers do not
    wrap; only the first ``left`` (text) columns fold when the terminal is narrow."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, col in enumerate(columns):
        text_column = i < left
        table.add_column(col, justify="left" if text_column else "right", min_width=len(col),
                         overflow="fold", no_wrap=not text_column)
    for row in rows:
        table.add_row(*row)
    return table


def _count(value: Any) -> str:
    return "—" if value is None else f"{value:,}"


def render_terminal(report: dict[str, Any], console: Any = None, width: int = 40) -> None:
    """Print ``report`` (from :func:`stats`) with rich: rows kept/skipped/removed by reason, the length histogram
    against N, sources, truncation, assistant turns per conversation, packing."""
    from rich.console import Console
    from rich.markup import escape

    console = console or Console(highlight=False)
    n = report["max_length"]
    console.print(f"[bold]{escape(report['directory'])}[/] · max_length {n or '—'} · "
                  f"{'packed' if report['packed'] else 'unpacked'}", soft_wrap=True)
    c = report.get("counts") or {}
    if c.get("rows_read") is not None:
        rows = [["rows read", _count(c["rows_read"])], ["examples kept", _count(c["rows_kept"])]]
        rows += [[f"skipped: {kind}", f"{v:,}"] for kind, v in c["skipped"].items()]
        rows += [[f"removed: {reason}", f"{v:,}"] for reason, v in c["removed"].items()]
        console.print(_table("rows", ["", "count"], rows))
    for name, s in report["splits"].items():
        lengths = s["length"]
        console.print(f"\n[bold underline]{name}[/]: {s['examples']:,} examples in {s['rows']:,} rows · "
                      f"{s['tokens']:,} tokens · {s['trained']:,} trained "
                      f"({_pct(s['trained'] / s['tokens']) if s['tokens'] else '—'})", soft_wrap=True)
        console.print(f"example length: min {lengths['min']} · median {lengths['median']} · mean {lengths['mean']} · "
                      f"p95 {lengths['p95']} · p99 {lengths['p99']} · max {lengths['max']}"
                      + (f" · {s['at_max_length']:,} at N" if n else ""), soft_wrap=True)
        console.print(_histogram_text(s["histogram"], n, width, "example length"))
        if "row_fill" in s:
            console.print(f"packed row fill: {s['fill_ratio']:.4f}")
            console.print(_histogram_text(s["row_fill"], n, width, "tokens per row"))
        if s["per_source"]:
            names = _short_names(list(s["per_source"]))
            console.print(_table(f"{name}: trained tokens per source",
                                 ["source", "examples", "tokens", "trained", "% of trained", "trained %"],
                                 [[escape(names[src]), f"{v['examples']:,}", f"{v['tokens']:,}", f"{v['trained']:,}",
                                   _pct(v["trained_share"]), _pct(v["trained_fraction"])]
                                  for src, v in s["per_source"].items()]))
    t = report["truncation"]
    lost = ("" if t.get("tokens_lost") is None else
            f" · {t['tokens_lost']:,} tokens cut off, {t['trained_tokens_lost']:,} of them trained")
    console.print(f"\n[bold]truncation[/] (policy {t['policy'] or '—'}): {t['truncated']:,} examples truncated to N"
                  f" ({', '.join(f'{k} {v:,}' for k, v in t['truncated_per_split'].items())}){lost} · "
                  f"{t['dropped_too_long']:,} dropped as too long", soft_wrap=True)
    conv = report.get("conversations") or {}
    if conv.get("count"):
        turns = {int(k): v for k, v in conv["assistant_turns"].items()}
        console.print(f"\n[bold]assistant turns per conversation[/]: {conv['count']:,} conversations, mean "
                      f"{conv['mean_assistant_turns']}", soft_wrap=True)
        top = max(turns.values())
        label_w = max(len(str(k)) for k in turns)
        for k, v in turns.items():
            console.print(f"{k:>{label_w}} [green]{'█' * max(1, round(width * v / top))}[/] {v:,}")
    if report["packing"]:
        splits = list(report["packing"])
        p = report["packing"]

        def row(label: str, fmt) -> list[str]:
            return [label] + [fmt(p[k]) for k in splits]

        epr = lambda x: x.get("examples_per_row", {})  # noqa: E731
        console.print(_table("packing", ["", *splits], [
            row("strategy", lambda x: str(x.get("strategy", ""))),
            row("examples", lambda x: f"{x.get('examples', 0):,}"),
            row("rows", lambda x: f"{x.get('rows', 0):,}"),
            row("fill ratio", lambda x: f"{x.get('fill_ratio', 0):.4f}"),
            row("examples per row, mean (min–max)",
                lambda x: f"{epr(x).get('mean', 0)} ({epr(x).get('min', 0)}–{epr(x).get('max', 0)})"),
            row("padding tokens", lambda x: f"{x.get('padding_tokens', 0):,}"),
            row("truncated examples", lambda x: f"{x.get('truncated_examples', 0):,}"),
            row("full rows", lambda x: f"{x.get('full_rows', 0):,}"),
        ]))


def _histogram_text(hist: dict[str, Any], max_length: int | None, width: int, what: str, lines_max: int = 16) -> str:
    """Text bars; adjacent bins are merged to at most ``lines_max`` lines and empty leading bins are skipped."""
    counts, edges = list(hist["counts"]), list(hist["edges"])
    merge = max(1, -(-len(counts) // lines_max))
    counts = [sum(counts[i:i + merge]) for i in range(0, len(counts), merge)]
    edges = edges[::merge] + ([edges[-1]] if (len(edges) - 1) % merge else [])
    first = next((i for i, c in enumerate(counts) if c), len(counts))
    top = max(counts + [hist["above_max_length"], 1])
    label_w = len(f"{edges[-1]:,}") * 2 + 4
    lines = [f"[dim]{what} (bin: lower, upper] · count[/]"]
    if first:
        lines.append(f"{f'≤ {edges[first]:,}':>{label_w}} [dim]·[/]")
    for i in range(first, len(counts)):
        c = counts[i]
        bar = "█" * max(1, round(width * c / top)) if c else ""
        label = f"({edges[i]:,}, {edges[i + 1]:,}]".rjust(label_w)
        lines.append(f"{label} [green]{bar}[/] {c:,}" if c else f"{label} [dim]·[/]")
    if max_length:
        lines.append(f"{'':>{label_w}} [yellow]── N = {max_length:,} ──[/]")
        above = hist["above_max_length"]
        bar = "█" * max(1, round(width * above / top)) if above else ""
        lines.append(f"{'> N':>{label_w}} [red]{bar}[/] {above:,}")
    return "\n".join(lines)


def _short_names(names: list[str]) -> dict[str, str]:
    """File names when they are unique, else the full paths."""
    short = {n: Path(n).name or n for n in names}
    return short if len(set(short.values())) == len(short) else {n: n for n in names}


# ----------------------------------------------------------------------------------------------------------------
# HTML (inline SVG)
# ----------------------------------------------------------------------------------------------------------------

def _svg_histogram(hist: dict[str, Any], max_length: int | None, title: str, w: int = 720, h: int = 260) -> str:
    counts = list(hist["counts"]) + ([hist["above_max_length"]] if max_length else [])
    edges = hist["edges"]
    left, right, top, bottom = 56, 16, 28, 40
    pw, ph = w - left - right, h - top - bottom
    top_count = max(counts + [1])
    bw = pw / len(counts)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" '
             f'aria-label="{html.escape(title)}" font-family="sans-serif" font-size="11">',
             f'<text x="{left}" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>']
    for frac in (0, 0.5, 1):
        y = top + ph - frac * ph
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{int(round(frac * top_count)):,}</text>')
    for i, c in enumerate(counts):
        over = max_length and i == len(counts) - 1
        bh = ph * c / top_count
        x = left + i * bw
        label = f"> {max_length:,}" if over else f"({edges[i]:,}, {edges[i + 1]:,}]"
        parts.append(f'<rect x="{x + 1:.1f}" y="{top + ph - bh:.1f}" width="{max(bw - 2, 1):.1f}" height="{bh:.1f}" '
                     f'fill="{"#d62728" if over else "#2ca02c"}"><title>{html.escape(label)}: {c:,}</title></rect>')
    step = max(1, len(edges) // 8)
    for i in range(0, len(edges), step):
        x = left + i * bw
        parts.append(f'<text x="{x:.1f}" y="{top + ph + 14}" text-anchor="middle">{edges[i]:,}</text>')
    if max_length:
        x = left + (len(edges) - 1) * bw
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top - 4}" y2="{top + ph}" stroke="#ff7f0e" '
                     f'stroke-width="2" stroke-dasharray="4 3"/>'
                     f'<text x="{x - 4:.1f}" y="{top + 8}" text-anchor="end" fill="#ff7f0e">N = {max_length:,}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{h - 6}" text-anchor="middle">tokens</text></svg>')
    return "".join(parts)


def _svg_sources(per_source: dict[str, Any], title: str, w: int = 720) -> str:
    rows = list(per_source.items())[:30]
    h = 34 + 22 * len(rows)
    label_w = 260
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
             f'font-size="11"><text x="0" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>']
    for i, (src, v) in enumerate(rows):
        y = 28 + 22 * i
        bw = (w - label_w - 70) * v["trained_share"]
        name = src if len(src) <= 40 else "…" + src[-39:]
        parts.append(f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end">{html.escape(name)}</text>'
                     f'<rect x="{label_w}" y="{y}" width="{bw:.1f}" height="16" fill="#1f77b4"/>'
                     f'<text x="{label_w + bw + 4:.1f}" y="{y + 13}">{_pct(v["trained_share"])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _svg_bars(counts: dict[str, int], title: str, x_label: str, w: int = 720, h: int = 220) -> str:
    """Vertical bars, one per key, labelled under the bar, count on top."""
    left, right, top, bottom = 56, 16, 28, 40
    pw, ph = w - left - right, h - top - bottom
    peak = max(list(counts.values()) + [1])
    bw = pw / max(1, len(counts))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" '
             f'aria-label="{html.escape(title)}" font-family="sans-serif" font-size="11">',
             f'<text x="{left}" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>']
    for i, (key, c) in enumerate(counts.items()):
        bh = ph * c / peak
        x = left + i * bw
        parts.append(f'<rect x="{x + 1:.1f}" y="{top + ph - bh:.1f}" width="{max(bw - 2, 1):.1f}" height="{bh:.1f}" '
                     f'fill="#2ca02c"><title>{html.escape(str(key))}: {c:,}</title></rect>'
                     f'<text x="{x + bw / 2:.1f}" y="{top + ph - bh - 3:.1f}" text-anchor="middle">{c:,}</text>'
                     f'<text x="{x + bw / 2:.1f}" y="{top + ph + 14}" text-anchor="middle">{html.escape(str(key))}</text>')
    parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{top + ph}" y2="{top + ph}" stroke="#999"/>'
                 f'<text x="{left + pw / 2}" y="{h - 6}" text-anchor="middle">{html.escape(x_label)}</text></svg>')
    return "".join(parts)


def _html_table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(report: dict[str, Any]) -> str:
    """A self-contained HTML page (inline SVG, no scripts, no external files)."""
    n = report["max_length"]
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>sftdata stats</title><style>"
           "body{font-family:sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:8px 0 20px}"
           "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
           "h2{margin-top:28px}</style></head><body>",
           f"<h1>sftdata stats</h1><p><code>{html.escape(report['directory'])}</code> · max_length "
           f"{n or '—'} · {'packed' if report['packed'] else 'unpacked'}</p>"]
    c = report.get("counts") or {}
    if c.get("rows_read") is not None:
        out.append("<h2>rows</h2>" + _html_table(
            ["", "count"], [["rows read", _count(c["rows_read"])], ["examples kept", _count(c["rows_kept"])]]
            + [[f"skipped: {k}", f"{v:,}"] for k, v in c["skipped"].items()]
            + [[f"removed: {k}", f"{v:,}"] for k, v in c["removed"].items()]))
    for name, s in report["splits"].items():
        L = s["length"]
        out.append(f"<h2>{html.escape(name)}</h2><p>{s['examples']:,} examples in {s['rows']:,} rows · "
                   f"{s['tokens']:,} tokens · {s['trained']:,} trained · length min {L['min']} / median {L['median']}"
                   f" / p99 {L['p99']} / max {L['max']}" + (f" · {s['at_max_length']:,} at N" if n else "")
                   + f" · {s['truncated']:,} truncated</p>")
        out.append(_svg_histogram(s["histogram"], n, f"{name}: example lengths vs N"))
        if "row_fill" in s:
            out.append(f"<p>packed row fill ratio {s['fill_ratio']:.4f}</p>")
            out.append(_svg_histogram(s["row_fill"], n, f"{name}: tokens per packed row"))
        if s["per_source"]:
            out.append(_svg_sources(s["per_source"], f"{name}: share of trained tokens per source"))
            out.append(_html_table(["source", "examples", "tokens", "trained", "share of trained", "trained / tokens"],
                                   [[k, f"{v['examples']:,}", f"{v['tokens']:,}", f"{v['trained']:,}",
                                     _pct(v["trained_share"]), _pct(v["trained_fraction"])]
                                    for k, v in s["per_source"].items()]))
    t = report["truncation"]
    out.append("<h2>truncation</h2>" + _html_table(
        ["policy", "truncated to N", "tokens cut off", "trained tokens cut off", "dropped as too long"]
        + [f"truncated in {k}" for k in t["truncated_per_split"]],
        [[t["policy"] or "—", f"{t['truncated']:,}", _count(t.get("tokens_lost")), _count(t.get("trained_tokens_lost")),
          f"{t['dropped_too_long']:,}"] + [f"{v:,}" for v in t["truncated_per_split"].values()]]))
    conv = report.get("conversations") or {}
    if conv.get("count"):
        out.append(f"<h2>assistant turns per conversation</h2><p>{conv['count']:,} conversations, mean "
                   f"{conv['mean_assistant_turns']}</p>" + _svg_bars(
                       {k: v for k, v in conv["assistant_turns"].items()}, "conversations by assistant turns",
                       "assistant turns"))
    if report["packing"]:
        out.append("<h2>packing</h2>" + _html_table(
            ["split", "strategy", "examples", "rows", "fill ratio", "examples/row mean (min–max)", "padding tokens",
             "truncated examples", "full rows"],
            [[k, p.get("strategy", ""), f"{p.get('examples', 0):,}", f"{p.get('rows', 0):,}",
              f"{p.get('fill_ratio', 0):.4f}",
              f"{p.get('examples_per_row', {}).get('mean', 0)} ({p.get('examples_per_row', {}).get('min', 0)}–"
              f"{p.get('examples_per_row', {}).get('max', 0)})", f"{p.get('padding_tokens', 0):,}",
              f"{p.get('truncated_examples', 0):,}", f"{p.get('full_rows', 0):,}"]
             for k, p in report["packing"].items()]))
    out.append("</body></html>")
    return "\n".join(out)
