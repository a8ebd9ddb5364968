"""``sftdata dedup`` and ``sftdata decontaminate``: thin click layers over :mod:`sftdata.clean`."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from sftdata.cli_output import err_console, fail
from sftdata.record import DataError

_err = err_console


def _progress(total: int, label: str) -> Progress:
    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                    console=_err, transient=True, disable=not _err.is_terminal)


def _print_summary(result: dict, title: str) -> None:
    table = Table(title=title, show_header=True)
    table.add_column("")
    table.add_column("rows", justify="right")
    table.add_row("read", str(result["rows_read"]))
    for reason, n in result["removed"].items():
        table.add_row(f"removed: {reason}", str(n))
    for kind, n in result["skipped"].items():
        table.add_row(f"skipped: {kind}", str(n))
    table.add_row("[bold]kept", f"[bold]{result['rows_kept']}")
    _err.print(table)
    for kind, examples in result.get("problems", {}).items():
        for p in examples[:3]:
            tag = f"[{p['stage']}/{p['kind']}]"
            _err.print(f"[yellow]{escape(p['source'])}:{p['row']}: {escape(tag)} {escape(p['detail'])}")
    removed = f"; removed rows -> {result['report']}" if result["report"] else ""
    _err.print(escape(f"kept rows (unchanged input rows) -> {result['output']}; their source and row -> "
                      f"{result['provenance']}{removed}"))


def _sizes(paths) -> int:
    return sum(Path(p).stat().st_size for p in paths if Path(p).is_file())


_OUTPUT_HELP = "Kept rows, each the input row as read: JSONL, or Parquet if the path ends in .parquet."
_PROVENANCE_HELP = ("JSONL giving the source file and row of each output row, line for line "
                    "[default: OUTPUT-STEM.provenance.jsonl].")


@click.command("dedup")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--output", "-o", required=True, help=_OUTPUT_HELP)
@click.option("--provenance", type=click.Path(dir_okay=False), help=_PROVENANCE_HELP)
@click.option("--report", type=click.Path(dir_okay=False),
              help="JSONL of removed rows: reason, cluster, representative and the input row.")
@click.option("--threshold", default=0.8, show_default=True, help="Jaccard threshold for near duplicates.")
@click.option("--num-perm", default=128, show_default=True, help="MinHash permutations.")
@click.option("--ngram", default=5, show_default=True, help="Shingle size in words.")
@click.option("--no-near", is_flag=True, help="Exact duplicates only.")
@click.option("--no-exact", is_flag=True, help="Near duplicates only.")
@click.option("--normalize", "normalize", default=None,
              help="Normalization, e.g. 'lowercase=1,punctuation=space,whitespace=1,unicode=NFKC,digits=0' (the default; "
                   "punctuation: space|delete|keep).")
@click.option("--seed", default=1, show_default=True)
@click.option("--format", "fmt", default=None, help="Input row format (default: detected per file).")
@click.option("--columns", default=None, help="Field mapping, e.g. instruction=question,output=answer.")
@click.option("--on-error", type=click.Choice(["skip", "fail"]), default="skip", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def dedup(inputs, output, provenance, report, threshold, num_perm, ngram, no_near, no_exact, normalize, seed, fmt,
          columns, on_error, as_json):
    """Remove exact and near-duplicate rows (MinHash LSH, verified with exact Jaccard; earliest row kept)."""
    from sftdata.clean import dedup as run

    try:
        with _progress(2 * _sizes(inputs), "dedup") as bar:
            task = bar.add_task("dedup", total=2 * _sizes(inputs) or None)
            result = run(list(inputs), output, report=report, provenance=provenance, format=fmt, columns=columns,
                         exact=not no_exact, near=not no_near, threshold=threshold, num_perm=num_perm, ngram=ngram,
                         normalize=normalize, seed=seed, on_error=on_error, progress=lambda n: bar.advance(task, n))
    except (DataError, ValueError, OSError) as e:
        fail(e)
    _print_summary(result, "sftdata dedup")
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))


@click.command("decontaminate")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--eval", "eval_paths", multiple=True, required=True,
              help="Eval file (JSONL/JSON/Parquet/CSV, .gz ok); repeat for several.")
@click.option("--field", "fields", multiple=True,
              help="Eval field(s) to read (default: question, prompt, turns, messages, problem, instruction, input, text).")
@click.option("--output", "-o", required=True, help=_OUTPUT_HELP)
@click.option("--provenance", type=click.Path(dir_okay=False), help=_PROVENANCE_HELP)
@click.option("--report", type=click.Path(dir_okay=False),
              help="JSONL of removed rows: the eval item each matched and the input row.")
@click.option("--ngram", default=8, show_default=True, help="Word n-gram size of the copy detector.")
@click.option("--min-overlap", default=0.5, show_default=True, help="Fraction of an eval item's n-grams that flags a row.")
@click.option("--no-rephrase", is_flag=True, help="Disable the rephrased-leak detector.")
@click.option("--rephrase-threshold", default=0.75, show_default=True, help="Weighted content-term score that flags a row.")
@click.option("--normalize", "normalize", default=None,
              help="Normalization options as for dedup; here punctuation=delete is the default.")
@click.option("--format", "fmt", default=None, help="Input row format (default: detected per file).")
@click.option("--columns", default=None, help="Field mapping, e.g. instruction=question,output=answer.")
@click.option("--on-error", type=click.Choice(["skip", "fail"]), default="skip", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def decontaminate(inputs, eval_paths, fields, output, provenance, report, ngram, min_overlap, no_rephrase,
                  rephrase_threshold, normalize, fmt, columns, on_error, as_json):
    """Remove rows that copy, embed or restate an eval item (n-gram overlap + rephrase detector)."""
    from sftdata.clean import decontaminate as run

    fields_list = [f.strip() for spec in fields for f in spec.split(",") if f.strip()] or None
    try:
        with _progress(_sizes(inputs), "decontaminate") as bar:
            task = bar.add_task("decontaminate", total=_sizes(inputs) or None)
            result = run(list(inputs), output, eval_paths=list(eval_paths), fields=fields_list, report=report,
                         provenance=provenance, format=fmt, columns=columns, ngram=ngram, min_overlap=min_overlap,
                         rephrase=not no_rephrase, rephrase_threshold=rephrase_threshold, normalize=normalize,
                         on_error=on_error, progress=lambda n: bar.advance(task, n))
    except (DataError, ValueError, OSError) as e:
        fail(e)
    _print_summary(result, "sftdata decontaminate")
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
