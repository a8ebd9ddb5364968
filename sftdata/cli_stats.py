"""``sftdata stats DIR``: the click command over :func:`sftdata.stats.stats` (registered in ``sftdata/cli.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from sftdata.cli_output import fail
from sftdata.record import DataError


@click.command("stats")
@click.argument("directory", default="sftdata-out", type=click.Path(file_okay=False))
@click.option("--html", "html_file", type=click.Path(dir_okay=False), default=None,
              help="Also write a self-contained HTML page (labelled inline SVG charts, no scripts) to this file.")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON instead of tables.")
@click.option("--color/--no-color", default=None, help="Force colour on or off (default: when the terminal has it).")
def stats_command(directory, html_file, as_json, color):
    """What the built DIRECTORY (default sftdata-out) holds: rows kept, skipped and removed by reason; example
    lengths against the N it was built with (build --max-length); trained tokens per source; examples truncated and
    tokens cut off; assistant turns per conversation; packing fill."""
    from rich.console import Console

    from sftdata.stats import render_html, render_terminal, stats

    try:
        report = stats(directory)
    except (FileNotFoundError, ValueError, DataError) as e:
        fail(e)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        render_terminal(report, Console(highlight=False, force_terminal=color, no_color=color is False))
    if html_file:
        try:
            Path(html_file).write_text(render_html(report), encoding="utf-8")
        except OSError as e:
            fail(f"cannot write {html_file}: {e.strerror or e}")
        click.echo(f"wrote {html_file}", err=True)
