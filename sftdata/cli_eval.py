"""``sftdata eval`` and ``sftdata export``: thin click layers over sftdata.eval / sftdata.export.

torch, peft, gguf and llama-cpp-python are imported only when a command runs.
"""

from __future__ import annotations

from pathlib import Path

import click

from sftdata.cli_output import err_console, fail


@click.command("eval")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--model", "models", multiple=True, required=True,
              help="A model to evaluate: an `sftdata train` adapter directory, a merged or fully fine-tuned model, or "
                   "a base model (repeatable).")
@click.option("--base", default=None,
              help="The base model to compare with [default: the base recorded by the first adapter].")
@click.option("--split", default=None, help="Split to evaluate [default: test, else validation with a notice].")
@click.option("--general", type=click.Path(exists=True), default=None,
              help="General held-out text or chat (a file, or an sftdata output directory) for the forgetting delta.")
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False), default=None,
              help="More prompts to generate for: .txt (one per line) or .jsonl (messages / prompt / instruction, "
                   "optional answer).")
@click.option("--shots", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also run the base with K train examples before each test conversation.")
@click.option("--num-prompts", type=click.IntRange(min=0), default=8, show_default=True,
              help="Test prompts to generate for.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="0 = greedy; above 0, sampled with --seed.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for sampling and for choosing the shots.")
@click.option("--general-max-length", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Token cut for the general set's documents.")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False),
              help="Report directory (report.md, report.json, loss_curve.svg).")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
def eval_command(data_dir, models, base, split, general, prompts, shots, num_prompts, max_new_tokens, temperature,
                 seed, general_max_length, output, quiet):
    """Evaluate models on DATA_DIR's test split: loss and perplexity over trained tokens (per source), forgetting on
    a general set, and side-by-side generations (base, base with K shots, tuned), into a report.

    \b
    sftdata eval data --model adapter --shots 3 --general wiki.txt --output report
    """
    from sftdata.eval import EvalError, evaluate, summary_rows

    try:
        result = evaluate(data_dir, list(models), output, base=base, split=split, general=general, prompts=prompts,
                          shots=shots, num_prompts=num_prompts, max_new_tokens=max_new_tokens,
                          temperature=temperature, seed=seed, general_max_length=general_max_length,
                          progress=not quiet, console=err_console)
    except EvalError as e:
        fail(e, exit_code=2)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sftdata eval — {result.report['split']} split", title_justify="left")
    for col in ("model", "kind", "loss", "ppl", "trained tokens", "Δ loss vs base", "general ppl", "forgetting",
                "exact match", "contains answer"):
        table.add_column(col, justify="left" if col in ("model", "kind") else "right")
    for row in summary_rows(result.report):
        table.add_row(*row)
    out = Console()
    if not out.is_terminal:  # a log file or pipe: one line per row rather than columns squeezed to 80
        out = Console(width=200)
    out.print(table)
    click.echo(f"report: {result.output}/report.md and report.json")


@click.command("export")
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["hf", "gguf"]), required=True,
              help="hf: merged safetensors directory (vLLM / TGI / transformers); gguf: llama.cpp / Ollama file.")
@click.option("--quant", type=click.Choice(["f16", "q8_0", "q4_0", "q4_k_m"]), default="f16", show_default=True,
              help="GGUF weight type (q4_0 / q4_k_m = INT4, made by llama.cpp's quantizer).")
@click.option("--base", default=None, help="Base model of an adapter [default: the one recorded at training].")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="dtype of merged weights; auto keeps the base checkpoint's.")
@click.option("--name", default=None, help="Model name in file names and commands [default: SOURCE's name].")
@click.option("--validate/--no-validate", default=True, show_default=True,
              help="Load the export back and compare its greedy generation with the source model's.")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Output directory.")
def export_command(source, fmt, quant, base, dtype, name, validate, output):
    """Export SOURCE (an `sftdata train` adapter or a merged model) for serving, with the training template and
    every end-of-turn id, and check the result by loading it back.

    \b
    sftdata export adapter --format hf --output served        # merged + vLLM README (merged and multi-LoRA)
    sftdata export adapter --format gguf --quant q4_k_m --output gguf   # + Ollama Modelfile
    """
    from sftdata.export import ExportError, export
    from sftdata.train import TrainError

    try:
        result = export(source, output, format=fmt, quant=quant, base=base, dtype=dtype, validate=validate, name=name)
    except (ExportError, TrainError) as e:
        fail(e, exit_code=2)
    for note in result.get("notes", []):
        err_console.print(f"note: {note}")
    if fmt == "hf":
        click.echo(f"merged model written to {result['output']} (merged into the {result.get('merged_into') or 'source'})")
        check = result.get("vllm_adapter")
        if check is not None and not check["accepted"]:
            err_console.print("warning: vLLM multi-LoRA would refuse the adapter: " + "; ".join(check["problems"]))
        click.echo(Path(result["output"], "README.md").read_text(encoding="utf-8"))
    else:
        f16 = f" (f16 {result['f16_bytes']:,})" if "f16_bytes" in result else ""
        click.echo(f"GGUF written to {result['gguf']}: {result['bytes']:,} bytes{f16}; Modelfile {result['modelfile']}")
        click.echo(f"ollama create {result.get('gguf', '').rsplit('/', 1)[-1].removesuffix('.gguf')} "
                   f"-f {result['modelfile']}   |   llama-server -m {result['gguf']} --jinja")
    v = result.get("validation")
    if v is not None:
        if fmt == "hf":
            click.echo(f"validation: same greedy tokens as {v['reference']}: {v['same_greedy_tokens']}; "
                       f"max |logit difference| {v['max_abs_logit_diff']:.2e}")
        else:
            click.echo(f"validation ({v['runtime']}): prompt tokenized as by transformers: {v['same_prompt_tokens']}; "
                       f"same greedy tokens: {v['same_greedy_tokens']}; top-1 agreement {v['top1_agreement']:.3f}; "
                       f"relative logit RMSE {v['relative_logit_rmse']:.4f}")
        if not v.get("ok", True):
            fail("the exported model does not reproduce the source model (see sftdata_export.json)", exit_code=1)
