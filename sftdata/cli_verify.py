"""``sftdata verify``: check a template/tokenizer pair on the built-in suite (thin layer over :func:`sftdata.verify.verify`)."""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sftdata.policy import HISTORY_POLICIES
from sftdata.cli_output import fail
from sftdata.record import DataError

_STYLE = {"pass": "[green]pass[/]", "fail": "[bold red]FAIL[/]", "skip": "[dim]skip[/]"}


@click.command("verify")
@click.option("--tokenizer", default=None,
              help="Local tokenizer directory, hub id or bundled name (default: the bundled tokenizer for the template).")
@click.option("--template", "-t", default="tokenizer", show_default=True,
              help="Built-in template name, a .jinja file, or 'tokenizer' for the tokenizer's own chat_template.")
@click.option("--history-policy", type=click.Choice(HISTORY_POLICIES), default="auto", show_default=True,
              help="For templates that render earlier assistant turns differently (Qwen3 thinking, Phi-3): split each "
                   "turn into its own example, train only the last turn, or fail.")
@click.option("--special-text", type=click.Choice(["reject", "escape"]), default="reject", show_default=True,
              help="As in `sftdata build`: how content containing special-token strings is handled.")
@click.option("--tokenization", type=click.Choice(["auto", "context"]), default="auto", show_default=True,
              help="As in `sftdata build`: a turn whose prompt merges with the reply in context.")
@click.option("--template-kwargs", default=None, metavar="JSON", help="As in `sftdata build`: template variables.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--verbose", "-v", is_flag=True, help="Also list the notes (edge cases refused with a reason, policies).")
def verify_command(tokenizer, template, history_policy, special_text, tokenization, template_kwargs, as_json, verbose):
    """Check TEMPLATE on TOKENIZER: byte-identity with the tokenizer's chat_template, serving prefix (I2), exact masks
    (I3/I4), round trip and special tokens, on a built-in suite of conversations. Exit status 0 only when all pass.
    The invariants are defined in docs/invariants.md.

    \b
    sftdata verify --tokenizer ./Qwen3-8B --template qwen3
    sftdata verify --tokenizer ./Meta-Llama-3-8B-Instruct            # its own chat_template
    sftdata verify --tokenizer ./Qwen3-8B-Base --template chatml --json
    """
    from sftdata.render import EncodeOptions
    from sftdata.tokenizer import load_tokenizer
    from sftdata.verify import verify

    try:
        options = EncodeOptions(special_text=special_text, history_policy=history_policy, tokenization=tokenization,
                                template_kwargs=_mapping(template_kwargs))
        tok = load_tokenizer(tokenizer, template=template)
        report = verify(tok, template, options=options)
    except DataError as e:
        fail(e, exit_code=2)
    if as_json:
        click.echo(json.dumps(report.to_dict(), ensure_ascii=False, indent=2))
        sys.exit(0 if report.ok else 1)
    out = Console(highlight=False)
    table = Table(title=f"sftdata verify: {report.template} ({report.template_origin}) on {report.tokenizer}",
                  title_justify="left")
    table.add_column("check", style="bold")
    table.add_column("subject")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    for c in report.checks:
        table.add_row(c.name + (" *" if c.invariant else ""), c.subject, _STYLE.get(c.status, c.status), escape(c.detail))
    out.print(table)
    out.print("[dim]* invariant check: `sftdata build` refuses the pair when it fails (override: --allow-unverified)[/]")
    for c in report.checks:
        shown = c.failures if verbose else c.failures[:5]
        for f in shown:
            out.print(f"[red]{c.name}[/] ({c.subject}): {escape(f)}", soft_wrap=True)
        if len(shown) < len(c.failures):
            out.print(f"[red]{c.name}[/] ({c.subject}): ... and {len(c.failures) - len(shown)} more (--verbose or --json)")
        if verbose:
            for n in c.notes:
                out.print(f"[dim]{c.name} note:[/] {escape(n)}", soft_wrap=True)
    if report.ok:
        out.print("[green]all checks passed[/]")
    elif report.invariant_ok:
        out.print("[yellow]invariants hold; the template differs from the tokenizer's own chat_template or does not "
                  "round-trip (see above)[/]")
    else:
        out.print("[bold red]invariant checks failed: `sftdata build` would refuse this pair[/]")
    sys.exit(0 if report.ok else 1)


def _mapping(text: str | None) -> dict:
    """``--template-kwargs`` (JSON or KEY=VALUE pairs) as a dict; one error line otherwise."""
    from sftdata.config import parse_mapping

    if not text:
        return {}
    try:
        return parse_mapping(text)
    except TypeError as e:
        fail(f"bad --template-kwargs value: {e}", exit_code=2)
