"""``TrainConfig``: every setting of ``sftdata train``, the single source of truth for the CLI flags and recipe files.

No torch here: the CLI builds its options from these fields (:func:`sftdata.config.click_options`), recipe files are
validated against them (:func:`sftdata.config.dataclass_from_dict`), and ``sftdata memory`` reads the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field

METHODS = ("qlora", "lora", "full")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
TRACKERS = ("tensorboard", "mlflow", "wandb", "none")

# The defaults of the fine-tuning literature, used when learning_rate / max_grad_norm are left unset:
# QLoRA (Dettmers et al. 2023, appendix B.2): LR 2e-4 for models up to 13B, 1e-4 for 33B and 65B; max grad norm 0.3
# for every QLoRA run. Full fine-tuning of 7B-70B chat models: 1e-5 is the usual ceiling (2e-5 already diverges on
# small data sets); gradient clipping at 1.0.
LORA_LR_SMALL, LORA_LR_LARGE, LORA_LR_SPLIT_PARAMS = 2e-4, 1e-4, 30e9
FULL_LR = 1e-5
LORA_MAX_GRAD_NORM, FULL_MAX_GRAD_NORM = 0.3, 1.0


def _f(default, help: str, **meta):
    """A dataclass field with the CLI help (and optional flags/choices/default_help) in its metadata."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    """Every knob of :func:`sftdata.train.train`; each field is a ``sftdata train`` flag and a recipe key."""

    method: str = _f("qlora", "qlora: 4-bit NF4 base + LoRA; lora: 16-bit base + LoRA; full: every weight.",
                     choices=METHODS)
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with --use-rslora).")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA input (0 saves activation memory).")
    target_modules: list[str] | str = _f(
        "all-linear", "Comma-separated module names to adapt, or all-linear (every linear layer but the LM head).")
    use_dora: bool = _f(False, "DoRA: weight-decomposed LoRA (peft use_dora; slower, often better at low rank).")
    use_rslora: bool = _f(False, "rsLoRA: scale adapters by alpha/sqrt(r), stable at high ranks (peft use_rslora).")
    learning_rate: float | None = _f(
        None, "Peak learning rate.", flags=["--lr", "--learning-rate"],
        default_help="2e-4 for (Q)LoRA up to 30B params, 1e-4 above, 1e-5 for full")
    epochs: float = _f(1.0, "Passes over the training split.")
    max_steps: int = _f(-1, "Optimizer steps; overrides --epochs when > 0.")
    batch_size: int = _f(4, "Rows per micro-batch.")
    eval_batch_size: int | None = _f(None, "Rows per evaluation batch.", default_help="--batch-size")
    grad_accum: int = _f(4, "Micro-batches per optimizer step.")
    warmup: float = _f(0.03, "Linear warmup: a ratio of the total steps if < 1, else a number of steps.")
    lr_scheduler: str = _f("cosine", "transformers scheduler name (cosine, linear, constant, ...).",
                           flags=["--scheduler", "--lr-scheduler"])
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float | None = _f(None, "Gradient clipping norm (0 disables it).",
                                     default_help="0.3 for (Q)LoRA, 1.0 for full")
    optim: str = _f("paged_adamw_8bit", "transformers optimizer name (bitsandbytes runs paged ones unpaged on CPU).")
    precision: str = _f("auto", "Compute precision; auto = bf16 where the GPU supports it, fp16 on older GPUs, "
                                "fp32 on CPU.", choices=PRECISIONS)
    gradient_checkpointing: bool = _f(True, "Recompute activations in the backward pass (less memory, ~30% slower).")
    padding_free: bool = _f(True, "Padding-free batches with per-example position_ids and no attention_mask "
                                  "(required for packed data); off: pad unpacked rows with an attention_mask.")
    eval_steps: int | None = _f(None, "Evaluate on the validation split every N steps.", default_help="at the end")
    save_steps: int | None = _f(None, "Checkpoint every N steps.", default_help="every epoch")
    save_total_limit: int | None = _f(2, "Checkpoints to keep (the best one is always kept); none keeps all.")
    logging_steps: int = _f(10, "Log loss, learning rate, grad norm and tokens/s every N steps.")
    seed: int = _f(42, "Random seed (data order, LoRA init, dropout).")
    attn_implementation: str | None = _f(
        "sdpa", "sdpa, eager or flash_attention_2 (then micro-batches are flattened for its varlen kernel).")
    allow_tokenizer_mismatch: bool = _f(
        False, "Train even if the model's tokenizer differs from the dataset's (the ids would mean other text).")
    double_quant: bool = _f(True, "QLoRA: quantize the NF4 block constants too (4.127 instead of 4.5 bits/param).")
    quant_type: str = _f("nf4", "QLoRA 4-bit data type.", choices=("nf4", "fp4"))
    report_to: str = _f("none", "Experiment tracking through transformers' integrations: tensorboard, mlflow, "
                                "wandb (comma-separated for several) or none.")
    run_name: str | None = _f(None, "Run name shown by the trackers.", default_help="the output directory name")
    early_stopping_patience: int | None = _f(
        None, "Stop after N evaluations without a better validation loss and keep the best checkpoint "
              "(needs a validation split and --eval-steps).")
    early_stopping_threshold: float = _f(0.0, "How much lower the validation loss must be to count as better.")

    def validate(self) -> None:
        """Raise ``ValueError`` (with the flag's name) for a setting that cannot work."""
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.method != "full" and self.lora_r <= 0:
            raise ValueError("--lora-r must be positive")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError("--lora-dropout must be in [0, 1)")
        if self.batch_size <= 0 or self.grad_accum <= 0:
            raise ValueError("--batch-size and --grad-accum must be positive")
        if self.eval_batch_size is not None and self.eval_batch_size <= 0:
            raise ValueError("--eval-batch-size must be positive")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ValueError("give --epochs > 0 or --max-steps > 0")
        if self.warmup < 0:
            raise ValueError("--warmup must be >= 0")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ValueError("--max-grad-norm must be >= 0 (0 disables clipping)")
        if self.logging_steps <= 0:
            raise ValueError("--logging-steps must be positive")
        for name in ("eval_steps", "save_steps"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if self.early_stopping_patience is not None and self.early_stopping_patience <= 0:
            raise ValueError("--early-stopping-patience must be positive")
        if self.method == "full" and (self.use_dora or self.use_rslora):
            raise ValueError("--use-dora and --use-rslora are LoRA options; --method full has no adapters")
        self.trackers()

    def trackers(self) -> list[str]:
        """``report_to`` as a list (empty for ``none``); unknown names raise ``ValueError``."""
        names = [t.strip().lower() for t in str(self.report_to).split(",") if t.strip()]
        unknown = [t for t in names if t not in TRACKERS]
        if unknown:
            raise ValueError(f"--report-to: unknown {', '.join(unknown)}; choose from {', '.join(TRACKERS)}")
        return [t for t in names if t != "none"]

    def resolved_learning_rate(self, total_params: int | None = None) -> float:
        """The learning rate to use: the configured one, else the literature's default for the method and size."""
        if self.learning_rate is not None:
            return self.learning_rate
        if self.method == "full":
            return FULL_LR
        if total_params is not None and total_params > LORA_LR_SPLIT_PARAMS:
            return LORA_LR_LARGE
        return LORA_LR_SMALL

    def resolved_max_grad_norm(self) -> float:
        if self.max_grad_norm is not None:
            return self.max_grad_norm
        return FULL_MAX_GRAD_NORM if self.method == "full" else LORA_MAX_GRAD_NORM
