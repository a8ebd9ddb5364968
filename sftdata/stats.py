"""``stats``: what a built directory holds -- example lengths against ``--max-length``, trained-token share per source,
truncation counts and packing figures -- as a dict, in the terminal (rich), and as a picture (HTML with inline SVG,
or a PNG written with nothing but zlib).

Works on unpacked and packed output alike: for packed rows the example lengths come from ``seq_lengths`` and the
per-example trained tokens from ``labels`` split at those lengths.
"""

from __future__ import annotations

import html
import json
import math
import struct
import zlib
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
    directory = Path(directory)
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
    out["truncation"] = {
        "policy": options.get("truncation"),
        "truncated": counts.get("truncated", sum(s["truncated"] for s in out["splits"].values())),
        "truncated_per_split": {k: s["truncated"] for k, s in out["splits"].items()},
        "dropped_too_long": int(skipped.get("too-long", 0)),
    }
    out["packing"] = packing
    return out


# ----------------------------------------------------------------------------------------------------------------
# Terminal
# ----------------------------------------------------------------------------------------------------------------

def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def render_terminal(report: dict[str, Any], console: Any = None, width: int = 40) -> None:
    """Print ``report`` (from :func:`stats`) with rich: length histogram against N, sources, truncation, packing."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False)
    n = report["max_length"]
    console.print(f"[bold]{report['directory']}[/] · max_length {n or '—'} · "
                  f"{'packed' if report['packed'] else 'unpacked'}")
    for name, s in report["splits"].items():
        lengths = s["length"]
        console.print(f"\n[bold underline]{name}[/]: {s['examples']:,} examples in {s['rows']:,} rows · "
                      f"{s['tokens']:,} tokens · {s['trained']:,} trained "
                      f"({_pct(s['trained'] / s['tokens']) if s['tokens'] else '—'})")
        console.print(f"example length: min {lengths['min']} · median {lengths['median']} · mean {lengths['mean']} · "
                      f"p95 {lengths['p95']} · p99 {lengths['p99']} · max {lengths['max']}"
                      + (f" · {s['at_max_length']:,} at N" if n else ""))
        console.print(_histogram_text(s["histogram"], n, width, "example length"))
        if "row_fill" in s:
            console.print(f"packed row fill: {s['fill_ratio']:.4f}")
            console.print(_histogram_text(s["row_fill"], n, width, "tokens per row"))
        if s["per_source"]:
            table = Table(title=f"{name}: trained tokens per source", title_justify="left")
            for col in ("source", "examples", "tokens", "trained", "share of trained", "trained / tokens"):
                table.add_column(col, justify="left" if col == "source" else "right")
            names = _short_names(list(s["per_source"]))
            for src, v in s["per_source"].items():
                table.add_row(names[src], f"{v['examples']:,}", f"{v['tokens']:,}", f"{v['trained']:,}",
                              _pct(v["trained_share"]), _pct(v["trained_fraction"]))
            console.print(table)
    t = report["truncation"]
    console.print(f"\n[bold]truncation[/] (policy {t['policy'] or '—'}): {t['truncated']:,} examples truncated to N"
                  f" ({', '.join(f'{k} {v:,}' for k, v in t['truncated_per_split'].items())}) · "
                  f"{t['dropped_too_long']:,} dropped as too long")
    if report["packing"]:
        table = Table(title="packing", title_justify="left")
        for col in ("split", "strategy", "examples", "rows", "fill", "examples/row (min–max)", "padding",
                    "truncated", "full rows"):
            table.add_column(col, justify="right")
        for name, p in report["packing"].items():
            epr = p.get("examples_per_row", {})
            table.add_row(name, str(p.get("strategy", "")), f"{p.get('examples', 0):,}", f"{p.get('rows', 0):,}",
                          f"{p.get('fill_ratio', 0):.4f}", f"{epr.get('mean', 0)} ({epr.get('min', 0)}–{epr.get('max', 0)})",
                          f"{p.get('padding_tokens', 0):,}", f"{p.get('truncated_examples', 0):,}",
                          f"{p.get('full_rows', 0):,}")
        console.print(table)


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
        ["policy", "truncated to N", "dropped as too long"] + [f"truncated in {k}" for k in t["truncated_per_split"]],
        [[t["policy"] or "—", f"{t['truncated']:,}", f"{t['dropped_too_long']:,}"]
         + [f"{v:,}" for v in t["truncated_per_split"].values()]]))
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


# ----------------------------------------------------------------------------------------------------------------
# PNG (zlib only): the length histogram of each split against N, stacked
# ----------------------------------------------------------------------------------------------------------------

_FONT = {  # 3x5 glyphs, rows top to bottom, 3 bits each
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", "N": "101111111111101", "=": "000111000111000",
    ">": "100010001010100", " ": "000000000000000", ",": "000000000010100", "k": "100101110101101",
}


def _text(img: np.ndarray, x: int, y: int, s: str, color, scale: int = 2) -> None:
    for ch in s:
        glyph = _FONT.get(ch)
        if glyph:
            for r in range(5):
                for c in range(3):
                    if glyph[r * 3 + c] == "1":
                        img[y + r * scale:y + (r + 1) * scale, x + c * scale:x + (c + 1) * scale] = color
        x += 4 * scale


def _png_bytes(img: np.ndarray) -> bytes:
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def render_png(report: dict[str, Any], w: int = 800, panel_h: int = 240) -> bytes:
    """One panel per split: green bars = example-length histogram, orange line = N, red bar = examples above N.
    Axis numbers are drawn with a tiny built-in font (no matplotlib/PIL needed)."""
    n = report["max_length"]
    splits = list(report["splits"].items()) or [("", {"histogram": {"counts": [], "edges": [0, 1],
                                                                     "above_max_length": 0}})]
    img = np.full((panel_h * len(splits), w, 3), 255, np.uint8)
    for p, (_, s) in enumerate(splits):
        hist = s["histogram"]
        counts = list(hist["counts"]) + ([hist["above_max_length"]] if n else [])
        top, left, right, bottom = p * panel_h + 20, 60, 16, 30
        ph, pw = panel_h - 20 - bottom, w - left - right
        peak = max(counts + [1])
        img[top + ph, left:left + pw] = (0, 0, 0)
        img[top:top + ph, left] = (0, 0, 0)
        bw = pw / max(1, len(counts))
        for i, c in enumerate(counts):
            bh = int(round(ph * c / peak))
            x0, x1 = int(left + i * bw) + 1, int(left + (i + 1) * bw) - 1
            color = (214, 39, 40) if n and i == len(counts) - 1 else (44, 160, 44)
            if bh and x1 > x0:
                img[top + ph - bh:top + ph, x0:x1] = color
        _text(img, 4, top, f"{peak:,}", (0, 0, 0))
        _text(img, 4, top + ph - 10, "0", (0, 0, 0))
        edges = hist["edges"]
        for i in range(0, len(edges), max(1, len(edges) // 6)):
            _text(img, int(left + i * bw) - 6, top + ph + 6, f"{edges[i]}", (0, 0, 0))
        if n:
            x = int(left + (len(edges) - 1) * bw)
            img[top:top + ph, max(0, x - 1):x + 1] = (255, 127, 14)
            _text(img, max(0, x - 90), top, f"N={n}", (255, 127, 14))
    return _png_bytes(img)
