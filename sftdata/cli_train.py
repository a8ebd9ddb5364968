"""``sftdata train``, ``sftdata merge`` and ``sftdata memory``: thin click layers over sftdata.train / sftdata.memory.

The ``train`` options are generated from :class:`sftdata.train_config.TrainConfig` (one option per field), so the
CLI, the Python API and recipe files (``--config``) cannot drift apart. torch, peft and bitsandbytes are imported
only when a command runs (the core install has no torch).
"""

from __future__ import annotations

import dataclasses

import click

from sftdata.cli_output import fail
from sftdata.config import ConfigError, click_options, config_section, dataclass_from_dict, given_options, \
    read_config_file
from sftdata.train_config import TrainConfig

# Keys a recipe's train section may hold besides the TrainConfig fields: what the positional argument and the
# path options give on the command line.
RUN_KEYS = ("data", "model", "output", "tokenizer")


def _console():
    from rich.console import Console

    return Console(stderr=False)


def read_train_recipe(path: str) -> tuple[dict, dict]:
    """``(run keys, TrainConfig values)`` from a YAML/JSON file: its ``train:`` section, or the whole file."""
    section = config_section(read_config_file(path), "train", source=path)
    run = {k: section.pop(k) for k in RUN_KEYS if k in section}
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = [k for k in section if k not in fields]
    if unknown:
        raise ConfigError(f"{path}: unknown train key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(map(repr, unknown))}; valid keys: {', '.join(RUN_KEYS + tuple(fields))}")
    return run, section


@click.command("train")
@click.argument("data_dir", required=False, type=click.Path(file_okay=False))
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="YAML or JSON recipe: its train: section (or the whole file) gives any option below, plus "
                   "data, model, output and tokenizer; flags on the command line win.")
@click.option("--model", default=None, help="Base model: a local directory (config.json + weights) or hub id.")
@click.option("--output", "-o", default=None, type=click.Path(file_okay=False),
              help="Output directory: must be empty or missing, unless --resume or --overwrite.")
@click.option("--tokenizer", default=None, help="Tokenizer to use instead of the model directory's own.")
@click.option("--resume", is_flag=False, flag_value="last", default=None,
              help="Continue the run in --output from its last checkpoint (bare --resume; refused if the "
                   "checkpoints were written for other data or another model), or from a checkpoint directory.")
@click.option("--overwrite", is_flag=True, help="Delete an earlier `sftdata train` output in --output first.")
@click_options(TrainConfig)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or log lines (the summary still prints).")
def train_command(data_dir, config_file, model, output, tokenizer, resume, overwrite, quiet, **options):
    """Fine-tune MODEL on the sftdata output DATA_DIR (QLoRA by default) and save the adapter to OUTPUT.

    On a terminal a progress bar shows the run; otherwise (a log file, nohup, Slurm) one plain line per logging
    step: step, loss, learning rate, grad norm, tokens/s and ETA. OUTPUT gets the adapter (or the full model),
    the tokenizer with the chat template the data was built with, generation_config.json (every end-of-turn
    token as EOS), trainer_state.json (log_history), checkpoint-* directories, sftdata_run.json and
    sftdata_train.json.
    """
    try:
        run, values = read_train_recipe(config_file) if config_file else ({}, {})
        values.update(given_options(TrainConfig, options))
        config = dataclass_from_dict(TrainConfig, values, source=config_file or "command line")
        config.validate()
    except (ConfigError, ValueError) as e:
        fail(e, exit_code=2)
    data_dir = data_dir or run.get("data")
    model = model or run.get("model")
    output = output or run.get("output")
    tokenizer = tokenizer or run.get("tokenizer")
    missing = [name for name, value in (("DATA_DIR", data_dir), ("--model", model), ("--output", output))
               if not value]
    if missing:
        fail(f"missing {', '.join(missing)} (give them on the command line or in the --config file)", exit_code=2)

    from sftdata.train import TrainError, main_summary, require_train_deps

    try:
        require_train_deps(config.method)
    except TrainError as e:
        fail(e, exit_code=2)
    from sftdata.train import train

    console = _console()
    try:
        result = train(data_dir, model, output, tokenizer=tokenizer, config=config, resume=resume,
                       overwrite=overwrite, progress="none" if quiet else "auto", console=console)
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


_DEFAULTS = TrainConfig()


def _amount(n: float, unit: str) -> str:
    return f"{n / (2**30 if unit == 'GiB' else 2**20):,.2f}"


@click.command("memory")
@click.argument("model", required=False)
@click.option("--model", "model_option", default=None, type=click.Path(exists=True),
              help="A model directory or config.json (same as giving it as MODEL).")
@click.option("--batch-size", type=int, default=_DEFAULTS.batch_size, show_default=True, help="Rows per micro-batch.")
@click.option("--seq-len", type=int, default=2048, show_default=True, help="Tokens per row (the packed row length).")
@click.option("--compute", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True,
              help="Compute dtype (the trainer uses bf16 on recent GPUs, fp32 on CPU).")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True)
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=_DEFAULTS.gradient_checkpointing,
              show_default=True)
@click.option("--flatten", is_flag=True, help="Micro-batches flattened to one row (flash-attention varlen).")
@click.option("--lora-r", type=int, default=_DEFAULTS.lora_r, show_default=True)
@click.option("--lora-dropout", type=float, default=_DEFAULTS.lora_dropout, show_default=True)
@click.option("--target-modules", default=_DEFAULTS.target_modules, show_default=True)
@click.option("--optim", default=_DEFAULTS.optim, show_default=True,
              help="Optimizer (8-bit bitsandbytes ones, 32-bit AdamW, or sgd).")
@click.option("--no-double-quant", is_flag=True, help="NF4 without double quantization (4.5 bits/param).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def memory_command(model, model_option, batch_size, seq_len, compute, device, gradient_checkpointing, flatten,
                   lora_r, lora_dropout, target_modules, optim, no_double_quant, as_json):
    """Peak memory of `sftdata train` for full fine-tuning, LoRA and QLoRA, at a batch size and sequence length.

    MODEL is a named size (1B, 3B, 7B, 8B, 13B, 70B) or a model directory / config.json; without it, a table of
    every named size. Counts the weights in the dtypes the trainer really holds (QLoRA: NF4 linear layers, fp32
    embeddings, LM head and norms after k-bit preparation), adapters, gradients, the optimizer's states,
    activations (with or without gradient checkpointing) and the logits. The CUDA context (~0.5 GiB) and
    allocator fragmentation come on top.
    """
    import json

    from sftdata.memory import PRESETS, Workload, default_table, memory, nf4_bits_per_param

    work = Workload(batch_size=batch_size, seq_len=seq_len, compute=compute, device=device,
                    gradient_checkpointing=gradient_checkpointing, flatten=flatten)
    kw = dict(workload=work, lora_r=lora_r, target_modules=target_modules, lora_dropout=lora_dropout, optim=optim,
              double_quant=not no_double_quant)
    spec = model_option or model
    try:
        if spec:
            name = str(PRESETS[spec.upper()]["name"]) if spec.upper() in PRESETS else str(spec)
            rows = [(name, memory(spec, **kw))]
        else:
            rows = default_table(**kw)
    except ValueError as e:
        fail(e, exit_code=2)
    if as_json:
        click.echo(json.dumps([{"model": name, "estimates": [e.to_dict() for e in est]} for name, est in rows],
                              indent=2))
        return
    from rich.table import Table

    unit = "GiB" if max(e.peak_bytes for _, est in rows for e in est) >= 2**30 else "MiB"
    title = (f"sftdata train peak memory, {unit}: {batch_size} × {seq_len} tokens, {compute}, "
             f"{'gradient checkpointing' if gradient_checkpointing else 'no checkpointing'}, LoRA r={lora_r} "
             f"{target_modules} dropout {lora_dropout}, {optim}, NF4 {nf4_bits_per_param(not no_double_quant):.3f} "
             "bits/param")
    if len(rows) == 1:
        name, estimates = rows[0]
        table = Table(title=f"{name} — {title}")
        table.add_column("item", no_wrap=True)
        for e in estimates:
            table.add_column({"full": "full FT", "lora": "LoRA", "qlora": "QLoRA"}[e.method], justify="right")
        items = [("weights", "weights_bytes"), ("adapters", "adapter_bytes"), ("gradients", "grads_bytes"),
                 ("optimizer states", "optimizer_bytes"), ("activations (saved)", "activations_bytes"),
                 ("logits (peak)", "logits_bytes")]
        for label, key in items:
            table.add_row(label, *[_amount(getattr(e, key), unit) for e in estimates])
        table.add_row("[bold]peak[/bold]", *[f"[bold]{_amount(e.peak_bytes, unit)}[/bold]" for e in estimates])
        table.add_row("peak reached at", *[e.peak_phase for e in estimates])
        table.add_row("trainable params", *[f"{e.trainable_params / 1e6:,.1f}M "
                                            f"({100 * e.trainable_params / e.params:.2f}%)" for e in estimates])
    else:
        table = Table(title=title)
        for col in ("model", "params", "full FT", "LoRA", "QLoRA", "LoRA trainable", "QLoRA static"):
            table.add_column(col, justify="left" if col == "model" else "right", no_wrap=col == "model")
        for name, (full, lora, qlora) in rows:
            table.add_row(name, f"{full.params / 1e9:,.2f}B", _amount(full.peak_bytes, unit),
                          _amount(lora.peak_bytes, unit), _amount(qlora.peak_bytes, unit),
                          f"{lora.trainable_params / 1e6:,.1f}M ({100 * lora.trainable_params / lora.params:.2f}%)",
                          _amount(qlora.static_bytes, unit))
    _console().print(table)
