"""``sftdata train``, ``sftdata merge`` and ``sftdata memory``: thin click layers over sftdata.train / sftdata.memory.

torch, peft and bitsandbytes are imported only when a command runs (the core install has no torch).
"""

from __future__ import annotations


import click

from sftdata.cli_output import fail


def _console():
    from rich.console import Console

    return Console(stderr=False)


@click.command("train")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--model", required=True, help="Base model: a local directory (config.json + weights) or hub id.")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--method", type=click.Choice(["qlora", "lora", "full"]), default="qlora", show_default=True,
              help="qlora: 4-bit NF4 base + LoRA; lora: 16-bit base + LoRA; full: every weight.")
@click.option("--tokenizer", default=None, help="Tokenizer to use instead of the model directory's own.")
@click.option("--lora-r", type=int, default=16, show_default=True, help="LoRA rank.")
@click.option("--lora-alpha", type=int, default=32, show_default=True, help="LoRA alpha (scale = alpha / r).")
@click.option("--lora-dropout", type=float, default=0.05, show_default=True)
@click.option("--target-modules", default="all-linear", show_default=True,
              help="Comma-separated module names to adapt, or all-linear (every linear layer but the LM head).")
@click.option("--lr", "learning_rate", type=float, default=None,
              help="Peak learning rate [default: 2e-4 for (Q)LoRA, 2e-5 for full].")
@click.option("--epochs", type=float, default=1.0, show_default=True)
@click.option("--max-steps", type=int, default=-1, help="Optimizer steps; overrides --epochs when > 0.")
@click.option("--batch-size", type=int, default=4, show_default=True, help="Rows per micro-batch.")
@click.option("--grad-accum", type=int, default=4, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--warmup", type=float, default=0.03, show_default=True,
              help="Warmup: a ratio of the total steps if < 1, else a number of steps.")
@click.option("--scheduler", "lr_scheduler", default="cosine", show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--optim", default="paged_adamw_8bit", show_default=True,
              help="transformers optimizer name (bitsandbytes runs paged optimizers unpaged on CPU).")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True,
              help="Compute precision; auto = bf16 where the GPU supports it, fp16 on older GPUs, fp32 on CPU.")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=True, show_default=True)
@click.option("--padding-free/--no-padding-free", default=True, show_default=True,
              help="Concatenate each micro-batch with per-example position_ids and no attention_mask (required "
                   "for packed data); --no-padding-free pads unpacked rows with an attention_mask.")
@click.option("--eval-steps", type=int, default=None, help="Evaluate every N steps (always at the end).")
@click.option("--save-steps", type=int, default=None, help="Checkpoint every N steps [default: every epoch].")
@click.option("--save-total-limit", type=int, default=2, show_default=True)
@click.option("--logging-steps", type=int, default=1, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--resume", is_flag=False, flag_value="last", default=None,
              help="Continue from the last checkpoint in --output (bare --resume) or from a checkpoint directory.")
@click.option("--attn-implementation", default="sdpa", show_default=True,
              help="sdpa, eager or flash_attention_2 (varlen on the same position_ids).")
@click.option("--allow-tokenizer-mismatch", is_flag=True,
              help="Train even if the model's tokenizer differs from the dataset's (the ids would mean other text).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def train_command(data_dir, model, output, tokenizer, resume, quiet, **options):
    """Fine-tune MODEL on the sftdata output DATA_DIR (QLoRA by default) and save the adapter to OUTPUT.

    OUTPUT gets the adapter (or the full model), the tokenizer with the chat template the data was built with,
    generation_config.json (EOS + the template's end-of-turn token), trainer_state.json (log_history),
    checkpoint-* directories and sftdata_train.json.
    """
    from sftdata.train import TrainConfig, TrainError, main_summary, require_train_deps

    try:
        require_train_deps(options["method"])
    except TrainError as e:
        fail(e, exit_code=2)
    from sftdata.train import train

    console = _console()
    try:
        result = train(data_dir, model, output, tokenizer=tokenizer, config=TrainConfig(**options),
                       resume=resume, progress=not quiet, console=console)
    except TrainError as e:
        fail(e, exit_code=2)
    from rich.table import Table

    table = Table(title="sftdata train — summary", show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in main_summary(result):
        table.add_row(key, value)
    console.print(table)
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {note}")


@click.command("merge")
@click.argument("adapter_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False))
@click.option("--base-model", default=None, help="Base model [default: the one recorded in sftdata_train.json].")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="dtype of the saved weights; auto keeps the base checkpoint's.")
def merge_command(adapter_dir, output, base_model, dtype):
    """Export base + adapter from ADAPTER_DIR as one merged model (QLoRA: dequantize first, then merge)."""
    from sftdata.train import TrainError, require_train_deps

    try:
        require_train_deps("lora")
        from sftdata.train import merge

        path = merge(adapter_dir, output, base_model=base_model, dtype=dtype)
    except TrainError as e:
        fail(e, exit_code=2)
    click.echo(f"merged model written to {path}")


@click.command("memory")
@click.argument("params", required=False)
@click.option("--model", "model_config", default=None, type=click.Path(exists=True),
              help="A model directory or config.json: exact parameter and LoRA counts.")
@click.option("--lora-r", type=int, default=16, show_default=True)
@click.option("--target-modules", default="all-linear", show_default=True)
@click.option("--optim", type=click.Choice(["adamw", "adamw_8bit"]), default="adamw", show_default=True,
              help="Optimizer for the trained parameters (adamw: 16 bytes/param with mixed precision).")
@click.option("--no-double-quant", is_flag=True, help="NF4 without double quantization (4.5 bits/param).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def memory_command(params, model_config, lora_r, target_modules, optim, no_double_quant, as_json):
    """Memory for full fine-tuning, LoRA and QLoRA: for PARAMS (e.g. 7B), a --model config, or (no arguments)
    the 1B/7B/13B/70B reference models. Weights + gradients + optimizer states; activations not included."""
    import json

    from sftdata.memory import default_table, gb, memory, nf4_bits_per_param, parse_params

    kw = dict(lora_r=lora_r, target_modules=target_modules, optim=optim, double_quant=not no_double_quant)
    try:
        if model_config:
            rows = [(str(model_config), memory(config=model_config, **kw))]
        elif params:
            rows = [(f"{params} (≈, no config)", memory(parse_params(params), **kw))]
        else:
            rows = default_table(**kw)
    except ValueError as e:
        fail(e, exit_code=2)
    if as_json:
        click.echo(json.dumps([{"model": name, "estimates": [e.to_dict() for e in est]} for name, est in rows],
                              indent=2))
        return
    from rich.table import Table

    table = Table(title=f"fine-tuning memory, GB (1e9 bytes): weights + gradients + optimizer; LoRA r={lora_r} "
                        f"{target_modules}; {optim}; NF4 {nf4_bits_per_param(not no_double_quant):.3f} bits/param")
    for col in ("model", "params", "full FT", "LoRA", "QLoRA", "LoRA trainable", "QLoRA weights"):
        table.add_column(col, justify="left" if col == "model" else "right", no_wrap=col == "model")
    for name, (full, lora, qlora) in rows:
        table.add_row(name, f"{full.params / 1e9:,.2f}B", gb(full.total_bytes), gb(lora.total_bytes),
                      gb(qlora.total_bytes), f"{lora.trainable_params / 1e6:,.1f}M "
                      f"({100 * lora.trainable_params / lora.params:.2f}%)", gb(qlora.weights_bytes))
    _console().print(table)
    click.echo("Activations, CUDA context and fragmentation come on top (they grow with batch × sequence length).")
