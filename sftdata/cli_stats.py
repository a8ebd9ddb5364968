"""``sftdata stats DIR``: the click command over :func:`sftdata.stats.stats` (registered in ``sftdata/cli.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from sftdata.cli_output import fail


@click.command("stats")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--html", "html_file", type=click.Path(dir_okay=False), default=None,
              help="Also write a self-contained HTML page (inline SVG charts) to this file.")
@click.option("--png", "png_file", type=click.Path(dir_okay=False), default=None,
              help="Also write the length histograms (against N) as a PNG picture.")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON instead of tables.")
@click.option("--color/--no-color", default=None, help="Force colour on or off (default: when the terminal has it).")
def stats_command(directory, html_file, png_file, as_json, color):
    """Length histogram against --max-length, trained-token share per source, truncation and packing figures."""
    from rich.console import Console

    from sftdata.stats import render_html, render_png, render_terminal, stats

    try:
        report = stats(directory)
    except (FileNotFoundError, ValueError) as e:
        fail(e)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        render_terminal(report, Console(highlight=False, force_terminal=color, no_color=color is False))
    if html_file:
        Path(html_file).write_text(render_html(report), encoding="utf-8")
        click.echo(f"wrote {html_file}", err=True)
    if png_file:
        Path(png_file).write_bytes(render_png(report))
        click.echo(f"wrote {png_file}", err=True)
