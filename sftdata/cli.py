"""Command line: a thin click layer over the Python API of the same names."""

from __future__ import annotations

from functools import wraps

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sftdata import __version__
from sftdata.cli_output import err_console, fail
from sftdata.record import DataError

console = err_console


def reports_errors(func):
    """Turn DataError (bad file, bad row with --on-error fail, bad option) into a one-line message and exit 1."""

    @wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except DataError as e:
            fail(e)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="sftdata")
def main() -> None:
    """Prepare supervised fine-tuning data with exact assistant-only label masks.

    \b
    sftdata build data.jsonl --template chatml      # tokenize with exact -100 masks
    sftdata show sftdata-out --row 0                # see every token and whether it is trained
    """


def _build_options(command):
    """The ``build`` flags: one per recipe field (sftdata.recipe.Recipe), plus the shorthands of the common cases."""
    from sftdata.config import click_options
    from sftdata.recipe import Recipe

    command = click_options(Recipe, exclude=("sources", "dedup", "decontaminate", "train", "filters"))(command)
    shorthands = [
        click.option("--config", "-c", "config", type=click.Path(dir_okay=False), default=None,
                     help="A recipe file (YAML/JSON; its build: section or the whole file), or a build's "
                          "manifest.json to replay that build. Flags override its values."),
        click.option("--eval-fraction", type=click.FloatRange(0, 1, max_open=True), default=None,
                     help="Shorthand for --splits train=1-F,validation=F."),
        click.option("--dedup/--no-dedup", "dedup_flag", default=None,
                     help="Remove exact and near duplicates (MinHash LSH) after the per-row checks."),
        click.option("--dedup-threshold", type=float, default=None, help="Jaccard threshold of near-dedup [default: 0.8]."),
        click.option("--decontaminate", "evals", multiple=True, metavar="EVAL",
                     help="Remove rows that overlap this eval set file (repeatable)."),
        click.option("--filter", "filter_values", multiple=True, metavar="KEY=VALUE",
                     help="A quality filter (docs/filters.md), e.g. --filter min_response_chars=50 (repeatable)."),
        click.option("--force", is_flag=True, help="Rebuild even when the output is up to date."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary."),
    ]
    for option in reversed(shorthands):
        command = option(command)
    return click.argument("inputs", nargs=-1)(command)


@main.command("build")
@_build_options
@reports_errors
def build_command(inputs, config, eval_fraction, dedup_flag, dedup_threshold, evals, filter_values, force, quiet,
                  **fields):
    """Render and tokenize INPUTS (or a recipe's sources) into training-ready Parquet with exact -100 label masks.

    INPUTS are .jsonl/.json/.csv/.parquet/.txt files (optionally .gz), directories of such files (read file by
    file, sorted), saved Hugging Face dataset directories or hub dataset ids, in Alpaca, OpenAI messages, ShareGPT,
    prompt/completion, xLAM or raw-text format. All are checked before the tokenizer loads. Every flag is also a key
    of a recipe file (--config): sources with mixing weights, splits, filters, dedup and decontamination.

    \b
    sftdata build data.jsonl --template chatml
    sftdata build --config examples/recipe.yaml
    sftdata build --config sftdata-out/manifest.json --output replay      # the same build again, bit for bit
    """
    from sftdata.build import recipe_for, run_recipe
    from sftdata.config import ConfigError, given_options, parse_mapping
    from sftdata.recipe import Recipe
    from sftdata.tokenizer import default_tokenizer_for

    options = given_options(Recipe, fields)
    if eval_fraction is not None:
        options["eval_fraction"] = eval_fraction
    if dedup_flag is not None or dedup_threshold is not None:
        options["dedup"] = ({"threshold": dedup_threshold} if dedup_threshold is not None else {}) if dedup_flag is not False else None
    if evals:
        options["decontaminate"] = list(evals)
    try:
        if filter_values:
            options["filters"] = parse_mapping(",".join(filter_values))
        for key in ("columns", "template_kwargs", "splits"):
            if isinstance(options.get(key), str):
                options[key] = parse_mapping(options[key])
    except TypeError as e:
        raise DataError(f"bad --{key.replace('_', '-')} value: {e}") from None
    if not inputs and not config:
        raise DataError("give INPUTS or --config RECIPE (see `sftdata build --help`)")
    try:
        recipe = recipe_for(list(inputs) if inputs else None, config, options)
    except ConfigError as e:
        raise DataError(str(e)) from None
    if not quiet:
        used = recipe.tokenizer or f"{default_tokenizer_for(recipe.template)} (bundled default for --template {recipe.template}; set --tokenizer)"
        console.print(f"tokenizer: {used}")
    result = run_recipe(recipe, force=force, progress=not quiet, console=console)
    manifest = result.manifest
    for warning in manifest.get("warnings", []):
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    if result.up_to_date:
        console.print(f"{escape(str(result.output))} is up to date (same inputs, template, tokenizer, options and "
                      "sftdata version; every file as written); --force rebuilds")
        if recipe.report:
            console.print(f"wrote {escape(recipe.report)} (the rows removed in that build, from its removed.jsonl)")
    elif not quiet:
        print_summary(manifest, str(result.output))
    if manifest["counts"]["rows_kept"] == 0:
        fail("no example was kept; see the reasons above and problems.jsonl")


def print_summary(manifest: dict, output: str) -> None:
    counts, tokens = manifest["counts"], manifest["tokens"]
    table = Table(title=f"sftdata build → {output}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("template", f"{manifest['template']['name']} (end of turn {manifest['template']['end_of_turn']!r})")
    table.add_row("tokenizer", str(manifest["tokenizer"]["name_or_path"]))
    history = manifest.get("history_policy") or {}
    if history.get("applied") not in (None, "none"):
        table.add_row("history policy", f"{history['applied']} (the template renders earlier turns differently)")
    table.add_row("rows read", f"{counts['rows_read']:,}")
    table.add_row("rows kept", f"{counts['rows_kept']:,}" + (f" ({counts['examples']:,} examples)"
                                                              if counts.get("examples", counts["rows_kept"]) != counts["rows_kept"] else ""))
    for kind, n in counts["skipped"].items():
        table.add_row(f"  skipped: {kind}", f"[red]{n:,}[/]")
    for reason, n in counts["removed"].items():
        table.add_row(f"  removed: {reason}", f"[yellow]{n:,}[/]")
    lost = tokens.get("lost_to_truncation") or {}
    cut_off = f" ({lost['tokens']:,} tokens cut off, {lost['trained']:,} of them trained)" if lost.get("tokens") else ""
    table.add_row("truncated", f"{counts['truncated']:,}{cut_off}")
    for key, label in (("examples_split", "turns split into their own example (history policy)"),
                       ("turns_composed", "turns trained after the served prompt (composed)"),
                       ("turns_untrained_history", "turns left as context (history policy last)"),
                       ("tokenized_apart", "turns tokenized as tok(prompt) + tok(reply)"),
                       ("turns_trained_tool_call", "trained turns with tool calls"),
                       ("turns_trained_reasoning", "trained turns with reasoning")):
        if counts.get(key):
            table.add_row(f"  {label}", f"{counts[key]:,}")
    ignored = {}
    for entry in manifest.get("inputs", []):
        for name, n in (entry.get("ignored_fields") or {}).items():
            ignored[name] = ignored.get(name, 0) + n
    if ignored:
        table.add_row("ignored input fields", ", ".join(f"{k} ({v:,})" for k, v in sorted(ignored.items(), key=lambda kv: -kv[1])[:6]))
    share = tokens["trained"] / tokens["total"] if tokens["total"] else 0
    table.add_row("tokens", f"{tokens['total']:,}")
    table.add_row("trained tokens", f"{tokens['trained']:,} ({share:.1%})")
    for split, info in manifest["splits"].items():
        examples = info.get("examples", info["rows"])
        table.add_row(f"split {split}", f"{info['rows']:,} rows" + (f" ({examples:,} examples)" if examples != info["rows"] else ""))
    for entry in (manifest.get("mixing") or {}).get("sources", []):
        by = manifest["mixing"]["by"]
        target = f", weight {entry['weight']:g}" if "weight" in entry else ""
        table.add_row(f"  train share: {entry['source']}",
                      f"{entry['share_' + by]:.1%} of {by}{target} ({entry['rows']:,} of {entry['available_rows']:,} rows)")
    if manifest.get("packing"):
        for split, info in manifest["packing"].items():
            table.add_row(f"packing fill ({split})", f"{info.get('fill_ratio', 0):.4f}")
    seconds = manifest.get("seconds") or 0
    setup = manifest.get("seconds_setup") or 0
    data = seconds - setup
    rate = f" at {tokens['total'] / data:,.0f} tokens/s" if data > 0 else ""
    table.add_row("time", f"{seconds:.1f} s (setup {setup:.1f} s, data {data:.1f} s{rate})" if seconds else "-")
    console.print(table)
    shown = 0
    for kind, examples in manifest.get("problems", {}).items():
        for p in examples[:3]:
            if shown < 8:
                console.print(f"  [red]{escape(p['source'])}:{p['row']}[/] {escape(f'[{kind}]')} {escape(p['detail'])}")
                shown += 1
    if counts["skipped_total"]:
        console.print(f"  every skipped row: {output}/problems.jsonl")


@main.command("show")
@click.argument("directory", default="sftdata-out", type=click.Path(file_okay=False))
@click.option("--row", "-r", type=click.IntRange(min=0), default=0, show_default=True,
              help="First row to show (with --where/--source/--truncated: the first matching row to show).")
@click.option("--count", "-n", type=click.IntRange(min=1), default=1, show_default=True, help="How many rows.")
@click.option("--split", default="train", show_default=True)
@click.option("--where", metavar="FILE:ROW", default=None,
              help="The row built from row ROW (1-based) of input FILE, e.g. data.jsonl:17.")
@click.option("--source", metavar="FILE", default=None, help="Only rows built from input FILE (path or file name).")
@click.option("--truncated", is_flag=True, help="Only rows cut by --max-length.")
@click.option("--ids", is_flag=True, help="Show a table of token index, id, text and label instead of the stream.")
@click.option("--sep", default="", metavar="TEXT", help="Text printed between tokens, e.g. '|', to see token boundaries.")
@click.option("--color/--no-color", default=None, help="Force colour on or off (default: when the terminal has it).")
@reports_errors
def show_command(directory, row, count, split, where, source, truncated, ids, sep, color):
    """Show built rows of DIRECTORY (default sftdata-out) token by token: ⟦trained⟧ tokens in green, masked (-100)
    tokens in red, whitespace visible, ✂ where truncation cut an example."""
    from sftdata.show import show

    out = Console(highlight=False, no_color=(color is False), force_terminal=True if color else None)
    show(directory, row=row, count=count, split=split, ids=ids, separator=sep, where=where, source=source,
         truncated=truncated, color=color, console=out)


@main.command("templates")
def templates_command():
    """List the built-in chat templates."""
    from sftdata.templates import builtin_template_dir, template_description

    table = Table("name", "description")
    for path in sorted(builtin_template_dir().glob("*.jinja")):
        table.add_row(path.stem, escape(template_description(path.read_text(encoding="utf-8"))))
    Console().print(table)

from sftdata.cli_train import train_command, merge_command, memory_command; main.add_command(train_command); main.add_command(merge_command); main.add_command(memory_command)  # noqa: E402,E702
from sftdata.cli_stats import stats_command; main.add_command(stats_command)  # noqa: E402,E702
from sftdata.cli_verify import verify_command; main.add_command(verify_command)  # noqa: E402,E702
from sftdata.cli_clean import dedup, decontaminate; main.add_command(dedup); main.add_command(decontaminate)  # noqa: E402,E702
from sftdata.cli_eval import eval_command, export_command; main.add_command(eval_command); main.add_command(export_command)  # noqa: E402,E702


if __name__ == "__main__":  # pragma: no cover
    main()
