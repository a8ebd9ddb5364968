"""Train: QLoRA / LoRA / full fine-tuning over an ``sftdata build`` output directory.

A thin layer over ``transformers.Trainer`` + peft + bitsandbytes; what it adds is what keeps the train/serve
promise and guards the traps the field keeps hitting:

* **padding-free batches** (:class:`SFTDataCollator`): the rows of a micro-batch are concatenated into one
  sequence with ``position_ids`` restarting at 0 per example and *no* ``attention_mask``. transformers 5.x then
  builds the block-diagonal causal mask from ``position_ids`` (it does so only when ``attention_mask is None`` and
  there is no cache, so the model runs with ``use_cache=False``): packed examples never attend to each other
  (GUIDE §3.14). The first label of every example is set to ``-100`` so that the last token of one example is
  never trained to predict the first token of the next: the loss of a packed row is exactly the token-weighted
  mean of its examples' losses.
* **bitsandbytes CPU repacking** (:func:`disable_cpu_4bit_repacking`): bitsandbytes >= 0.49 on CPUs with
  AVX512-BF16 repacks ``Linear4bit`` weights into a CPU-only layout during a ``no_grad`` eval forward; the
  kernel used on that layout has no autograd formula, so LoRA gradients after the first eval are silently wrong.
  The guard turns the repacking off on every ``Linear4bit`` and undoes it if it already happened.
* **all-masked batches**: rows with no trained target are dropped when the data is loaded, and a micro-batch
  without one contributes a zero loss instead of ``0/0 = NaN``.
* **tokenizer identity**: the model's tokenizer must have the fingerprint the manifest recorded.
* **serving template**: the saved tokenizer's ``chat_template`` is the exact template the data was built with.

torch, peft and bitsandbytes are imported inside functions: the core install (build, show, ...) has no torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

METHODS = ("qlora", "lora", "full")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
TRAIN_INFO = "sftdata_train.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "added_tokens.json")
INSTALL_HINT = (
    "training needs the `train` extra (torch, peft, bitsandbytes, accelerate). Install torch first so pip does "
    "not pull a multi-GB CUDA build you do not need:\n"
    "    pip install torch            # or the CUDA wheel for your GPU, see https://pytorch.org\n"
    "    pip install 'sftdata[train]'"
)


class TrainError(Exception):
    """A problem that stops training, with a message meant for the user."""


class TokenizerMismatchError(TrainError):
    """The dataset was tokenized with a different tokenizer than the model's."""


def require_train_deps(method: str = "qlora") -> None:
    """Raise :class:`TrainError` with install instructions when the training extra is missing."""
    missing = []
    mods = ["torch", "transformers", "peft", "accelerate"] + (["bitsandbytes"] if method == "qlora" else [])
    if method == "full":
        mods.remove("peft")
    for mod in mods:
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise TrainError(f"missing {', '.join(missing)}: {INSTALL_HINT}")


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise TrainError(f"{data_dir} is not an sftdata output directory (no manifest.json); run `sftdata build` first")
    return json.loads(path.read_text(encoding="utf-8"))


def split_paths(data_dir: str | Path, manifest: dict[str, Any], split: str) -> list[Path]:
    """Parquet files of ``split`` as the manifest lists them (falling back to ``{split}-*.parquet``)."""
    info = (manifest.get("splits") or {}).get(split)
    if info and info.get("files"):
        return [Path(data_dir) / f for f in info["files"]]
    return sorted(Path(data_dir).glob(f"{split}-*.parquet"))


def _row_positions(table) -> Any:
    """Flattened ``position_ids`` of a table (derived as 0..n-1 per row for unpacked rows), as numpy int64."""
    import numpy as np
    import pyarrow.compute as pc

    if "position_ids" in table.column_names:
        return pc.list_flatten(table.column("position_ids")).to_numpy(zero_copy_only=False).astype(np.int64)
    lengths = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(starts, lengths)


def targets_per_row(table) -> Any:
    """Number of tokens each row actually trains: ``labels != -100`` at positions that have a predecessor in
    the same example (the label at an example's first position is never a target once labels are shifted)."""
    import numpy as np
    import pyarrow.compute as pc

    labels = pc.list_flatten(table.column("labels")).to_numpy(zero_copy_only=False)
    positions = _row_positions(table)
    if len(positions) != len(labels):
        raise TrainError("position_ids and labels have different lengths in the data; rebuild the dataset")
    hit = ((labels != -100) & (positions != 0)).astype(np.int64)
    lengths = pc.list_value_length(table.column("labels")).to_numpy(zero_copy_only=False).astype(np.int64)
    ends = np.cumsum(lengths)
    csum = np.concatenate([[0], np.cumsum(hit)])
    return csum[ends] - csum[ends - lengths]


@dataclass
class SplitData:
    dataset: Any  # datasets.Dataset
    rows: int
    dropped_no_target: int
    tokens: int
    targets: int
    max_token_id: int
    packed: bool


def load_split(data_dir: str | Path, manifest: dict[str, Any], split: str) -> SplitData | None:
    """Read one split into an in-memory ``datasets.Dataset`` of the columns training needs.

    Rows without a single trained target are dropped here (an all-``-100`` batch gives ``0/0 = NaN``).
    """
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    paths = split_paths(data_dir, manifest, split)
    if not paths:
        return None
    tables = [pq.read_table(p) for p in paths]
    table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    for col in ("input_ids", "labels"):
        if col not in table.column_names:
            raise TrainError(f"{paths[0]} has no {col!r} column; not an sftdata output")
    keep = [c for c in ("input_ids", "labels", "position_ids", "seq_lengths") if c in table.column_names]
    table = table.select(keep)
    n_rows = table.num_rows
    if n_rows == 0:
        return None
    targets = targets_per_row(table)
    table = table.filter(pa.array(targets > 0))
    ids = pc.list_flatten(table.column("input_ids"))
    max_id = int(pc.max(ids).as_py()) if len(ids) else -1
    return SplitData(
        dataset=datasets.Dataset(table),
        rows=table.num_rows,
        dropped_no_target=int(n_rows - table.num_rows),
        tokens=len(ids),
        targets=int(targets.sum()),
        max_token_id=max_id,
        packed="position_ids" in keep or "seq_lengths" in keep,
    )


class SFTDataCollator:
    """Collate sftdata rows (packed or not) for a causal LM.

    ``padding_free=True`` (default): the rows are concatenated into a single ``[1, N]`` sequence with
    ``position_ids`` (kept from packed rows, ``0..n-1`` per unpacked row), no ``attention_mask`` and no padding.
    transformers 5.x derives the block-diagonal causal mask from those ``position_ids`` (only when
    ``attention_mask is None`` and no cache is used), so no example attends to another. With flash-attention 2
    the same ``position_ids`` drive the varlen kernel. The label at the first position of every example is set to
    ``-100``: it would otherwise be predicted from the previous example's last token.

    ``padding_free=False``: unpacked rows only; right-padded ``[B, L]`` batches with an ``attention_mask`` and
    ``-100`` labels on padding (a packed row cannot be padded this way: the mask would let its examples see each
    other).
    """

    def __init__(self, padding_free: bool = True, pad_token_id: int = 0, pad_to_multiple_of: int | None = None):
        self.padding_free = padding_free
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    @staticmethod
    def _positions(feature: dict[str, Any]) -> list[int]:
        n = len(feature["input_ids"])
        pos = feature.get("position_ids")
        if pos is not None:
            pos = list(pos)
            if len(pos) != n:
                raise ValueError(f"position_ids has {len(pos)} entries for {n} tokens")
            return pos
        lengths = feature.get("seq_lengths")
        if lengths:
            if sum(lengths) != n:
                raise ValueError(f"seq_lengths sum to {sum(lengths)} for {n} tokens")
            return [i for length in lengths for i in range(length)]
        return list(range(n))

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        if self.padding_free:
            ids: list[int] = []
            labels: list[int] = []
            positions: list[int] = []
            for f in features:
                pos = self._positions(f)
                lab = [-100 if p == 0 else int(x) for x, p in zip(f["labels"], pos)]
                ids.extend(int(x) for x in f["input_ids"])
                labels.extend(lab)
                positions.extend(int(p) for p in pos)
            return {
                "input_ids": torch.tensor([ids], dtype=torch.long),
                "labels": torch.tensor([labels], dtype=torch.long),
                "position_ids": torch.tensor([positions], dtype=torch.long),
            }
        for f in features:
            lengths = f.get("seq_lengths")
            if lengths is not None and len(lengths) > 1:
                raise ValueError(
                    "packed rows need padding_free=True: an attention_mask cannot keep packed examples apart"
                )
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[i, :n] = torch.tensor(list(f["input_ids"]), dtype=torch.long)
            labels[i, :n] = torch.tensor(list(f["labels"]), dtype=torch.long)
            mask[i, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def count_targets(labels) -> int:
    """Trained targets in a collated batch (labels are unshifted: position 0 of a row is never a target)."""
    return int((labels[..., 1:] != -100).sum().item())


# --------------------------------------------------------------------------------------------------------------
# Guards
# --------------------------------------------------------------------------------------------------------------


def disable_cpu_4bit_repacking(model) -> int:
    """Turn off (and undo) bitsandbytes' CPU repacking of ``Linear4bit`` weights; return how many were found.

    bitsandbytes >= 0.49, on a CPU with AVX512-BF16, repacks a ``Linear4bit`` weight into a CPU-only layout the
    first time the layer runs in eval mode on an input without grad (``Linear4bit.forward`` checks
    ``support_avx512bf16_for_cpu``). ``matmul_4bit`` then calls ``gemv_4bit``, which has no autograd formula, so
    after an eval pass the gradients of everything upstream of a 4-bit layer are silently wrong. Setting
    ``support_avx512bf16_for_cpu = False`` keeps the autograd-capable path. A weight that was already repacked is
    converted back, but that inverse is lossy (the repacked block constants are bf16), so call this right after
    loading, before any eval pass — as :func:`load_base_model` does.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    found = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        found += 1
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            module.quant_state = weight.quant_state
    return found


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """The fingerprint ``sftdata build`` records in the manifest (``sftdata.tokenizer.tokenizer_fingerprint``)."""
    try:
        from sftdata.tokenizer import tokenizer_fingerprint as fp
    except ImportError:  # pragma: no cover - older trees without sftdata.tokenizer
        h = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8"))
        h.update(repr(sorted(dict(tokenizer.special_tokens_map).items())).encode("utf-8"))
        return h.hexdigest()
    return fp(tokenizer)


def check_tokenizer(manifest: dict[str, Any], tokenizer: Any, *, model_name: str = "the model") -> None:
    """Refuse a dataset whose manifest names a different tokenizer than the model's."""
    want = manifest.get("tokenizer") or {}
    want_sha = want.get("sha256")
    if not want_sha:
        raise TokenizerMismatchError(
            "the dataset's manifest records no tokenizer fingerprint (tokenizer.sha256); rebuild it with sftdata build"
        )
    got_sha = tokenizer_fingerprint(tokenizer)
    if got_sha == want_sha:
        return
    details = []
    for key, got in (
        ("vocab_size", len(tokenizer)),
        ("bos_token", tokenizer.bos_token),
        ("eos_token", tokenizer.eos_token),
        ("pad_token", tokenizer.pad_token),
        ("class", type(tokenizer).__name__),
    ):
        if key in want and want[key] != got:
            details.append(f"{key}: dataset {want[key]!r}, model {got!r}")
    if not details:
        details.append("same vocabulary size and special tokens, but a different vocabulary/merges/normalizer")
    raise TokenizerMismatchError(
        f"the dataset was built with tokenizer {want.get('name_or_path')!r} (sha256 {want_sha[:12]}…) but "
        f"{model_name} uses {getattr(tokenizer, 'name_or_path', '?')!r} (sha256 {got_sha[:12]}…): "
        + "; ".join(details)
        + ". The token ids would mean different text to this model. Rebuild the data with "
        "`sftdata build --tokenizer <model dir>`, or pass the matching model."
    )


# --------------------------------------------------------------------------------------------------------------
# Configuration and model loading
# --------------------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Every knob of :func:`train` (the CLI options map one to one)."""

    method: str = "qlora"  # qlora | lora | full
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    learning_rate: float | None = None  # None: 2e-4 for (Q)LoRA, 2e-5 for full fine-tuning
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 4  # rows per micro-batch
    eval_batch_size: int | None = None
    grad_accum: int = 4
    warmup: float = 0.03  # ratio of total steps if < 1, else a step count
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "paged_adamw_8bit"  # bitsandbytes runs the paged optimizers unpaged on CPU
    precision: str = "auto"  # bf16 where supported, fp16 on older GPUs, fp32 on CPU
    gradient_checkpointing: bool = True
    padding_free: bool = True
    eval_steps: int | None = None  # None: evaluate at the end only
    save_steps: int | None = None  # None: save at the end of each epoch (and at the end)
    save_total_limit: int | None = 2
    logging_steps: int = 1
    seed: int = 42
    attn_implementation: str | None = "sdpa"
    allow_tokenizer_mismatch: bool = False
    double_quant: bool = True
    quant_type: str = "nf4"

    def validate(self) -> None:
        if self.method not in METHODS:
            raise TrainError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.precision not in PRECISIONS:
            raise TrainError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.lora_r <= 0 and self.method != "full":
            raise TrainError("--lora-r must be positive")
        if self.batch_size <= 0 or self.grad_accum <= 0:
            raise TrainError("--batch-size and --grad-accum must be positive")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise TrainError("give --epochs > 0 or --max-steps > 0")


def resolve_precision(precision: str) -> str:
    import torch

    if precision != "auto":
        if precision == "fp16" and not torch.cuda.is_available():
            raise TrainError("fp16 needs a GPU; use bf16 or fp32 on CPU")
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def _dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def _target_modules(target_modules: list[str] | str) -> list[str] | str:
    if isinstance(target_modules, str):
        parts = [p.strip() for p in target_modules.split(",") if p.strip()]
        if parts == ["all-linear"] or not parts:
            return "all-linear"
        return parts
    return list(target_modules)


def load_base_model(model_path: str, method: str, precision: str, *, attn_implementation: str | None = "sdpa",
                    double_quant: bool = True, quant_type: str = "nf4"):
    """Load the base model as ``method`` trains it: NF4 4-bit (``qlora``), 16-bit or fp32 (``lora``, ``full``)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = _dtype(precision)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    device_map = {"": 0} if torch.cuda.is_available() else {"": "cpu"}
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=torch.uint8,
        )
        kwargs["device_map"] = device_map
    elif method == "lora":
        kwargs["device_map"] = device_map
    else:
        # full fine-tuning keeps fp32 master weights; bf16/fp16 only as autocast (the 16 bytes/param recipe)
        kwargs["dtype"] = torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    except OSError as e:
        raise TrainError(f"cannot load model {model_path!r}: {str(e).splitlines()[0]}") from None
    model.config.use_cache = False  # a cache disables the position_ids block-diagonal mask
    if method == "qlora":
        disable_cpu_4bit_repacking(model)
    return model


def load_model_tokenizer(model_path: str, tokenizer_path: str | None, manifest: dict[str, Any]):
    """The model's own tokenizer (its directory, or ``tokenizer_path``); falls back to the manifest's tokenizer
    when the model directory has none (e.g. a config-only checkpoint)."""
    from transformers import AutoTokenizer

    for candidate in [tokenizer_path] if tokenizer_path else [model_path]:
        try:
            return AutoTokenizer.from_pretrained(candidate), candidate
        except (OSError, ValueError, TypeError):
            if tokenizer_path:
                raise TrainError(f"cannot load tokenizer {tokenizer_path!r}") from None
    info = manifest.get("tokenizer") or {}
    name = info.get("load") or (info.get("name_or_path") or "").removesuffix(" (bundled)")
    if not name:
        raise TrainError(f"{model_path} has no tokenizer and the manifest names none; pass --tokenizer")
    try:
        from sftdata.tokenizer import load_tokenizer

        tok = load_tokenizer(name)
    except Exception:
        try:
            tok = AutoTokenizer.from_pretrained(name)
        except OSError:
            raise TrainError(f"{model_path} has no tokenizer and {name!r} cannot be loaded; pass --tokenizer") from None
    return tok, tok.name_or_path  # the directory it was loaded from (bundled ones are unpacked to a cache dir)


def apply_build_template(tokenizer: Any, manifest: dict[str, Any]) -> str | None:
    """Set the tokenizer's ``chat_template`` to the exact template the data was built with; return it."""
    template = (manifest.get("template") or {}).get("text")
    if template:
        tokenizer.chat_template = template
    return template


def end_of_turn_ids(tokenizer: Any, manifest: dict[str, Any]) -> list[int]:
    """EOS ids for generation: the tokenizer's EOS plus the template's end-of-turn token (GUIDE §3.5)."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    eot = (manifest.get("template") or {}).get("end_of_turn")
    if eot:
        eot_ids = tokenizer.encode(eot, add_special_tokens=False)
        if len(eot_ids) == 1 and eot_ids[0] not in ids:
            ids.append(int(eot_ids[0]))
    return ids


# --------------------------------------------------------------------------------------------------------------
# Trainer pieces
# --------------------------------------------------------------------------------------------------------------


def _trainer_classes():
    """Build the Trainer subclass and callbacks lazily (transformers/torch are optional at import time)."""
    import torch
    from transformers import Trainer, TrainerCallback

    class SFTDataTrainer(Trainer):
        """``Trainer`` with the all-masked-batch guard and a token-weighted eval loss / perplexity."""

        skipped_empty_batches = 0
        targets_seen = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.get("labels")
            if labels is not None and model.training:
                n = count_targets(labels)
                if n == 0:
                    # every label is -100: the model's loss would be 0/0 = NaN. Contribute exactly nothing.
                    self.skipped_empty_batches += 1
                    zero = torch.zeros((), device=labels.device, requires_grad=True)
                    return (zero, None) if return_outputs else zero
                self.targets_seen += n
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            """Token-weighted loss over every trained target of the eval split, and its perplexity."""
            dataloader = self.get_eval_dataloader(eval_dataset)
            model = self.model
            was_training = model.training
            model.eval()
            total, count, start = 0.0, 0, time.time()
            with torch.no_grad():
                for batch in dataloader:
                    batch = self._prepare_inputs(batch)
                    labels = batch.pop("labels")
                    if count_targets(labels) == 0:
                        continue
                    logits = model(**batch, use_cache=False).logits.float()
                    shifted = labels[..., 1:].reshape(-1).to(logits.device)
                    total += torch.nn.functional.cross_entropy(
                        logits[..., :-1, :].reshape(-1, logits.shape[-1]), shifted, ignore_index=-100, reduction="sum"
                    ).item()
                    count += int((shifted != -100).sum().item())
            if was_training:
                model.train()
            disable_cpu_4bit_repacking(model)  # belt and braces: the eval pass must leave no repacked weight
            loss = total / count if count else float("nan")
            metrics = {
                f"{metric_key_prefix}_loss": loss,
                f"{metric_key_prefix}_perplexity": math.exp(loss) if count and loss < 700 else float("inf"),
                f"{metric_key_prefix}_tokens": count,
                f"{metric_key_prefix}_runtime": round(time.time() - start, 4),
            }
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    class RichProgressCallback(TrainerCallback):
        """A rich progress bar with the running loss / learning rate, and eval results as they come."""

        def __init__(self, console=None):
            self.console = console
            self.progress = None
            self.task = None
            self.last: dict[str, float] = {}

        def on_train_begin(self, args, state, control, **kwargs):
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn

            if not state.is_world_process_zero:
                return
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, info="")

        def on_step_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.update(self.task, completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.progress is None or not logs:
                return
            if "loss" in logs:
                self.last = logs
                lr = logs.get("learning_rate")
                info = f"loss {logs['loss']:.4f}" + (f"  lr {lr:.2e}" if lr is not None else "")
                self.progress.update(self.task, info=info)
            if "eval_loss" in logs:
                self.progress.console.print(
                    f"step {state.global_step}: eval loss {logs['eval_loss']:.4f}  "
                    f"perplexity {logs.get('eval_perplexity', float('nan')):.2f}  ({logs.get('eval_tokens', 0)} tokens)"
                )

        def on_train_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.update(self.task, completed=state.global_step)
                self.progress.stop()
                self.progress = None

    return SFTDataTrainer, RichProgressCallback


@dataclass
class TrainResult:
    output: str
    method: str
    global_step: int
    epochs: float
    train_loss: float | None
    first_loss: float | None
    last_loss: float | None
    eval_loss: float | None
    eval_perplexity: float | None
    trainable_params: int
    total_params: int
    train_rows: int
    dropped_rows: int
    targets_seen: int
    skipped_empty_batches: int
    runtime_s: float
    targets_per_s: float
    log_history: str
    resumed_from: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _training_arguments(cfg: TrainConfig, output: Path, precision: str, has_eval: bool, progress: bool):
    import dataclasses

    import torch
    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    kwargs: dict[str, Any] = dict(
        output_dir=str(output),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size or cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate if cfg.learning_rate is not None else (2e-5 if cfg.method == "full" else 2e-4),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps and cfg.max_steps > 0 else -1,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if cfg.save_steps else "epoch",
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if (has_eval and cfg.eval_steps) else "no",
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        label_names=["labels"],
    )
    if cfg.save_steps:
        kwargs["save_steps"] = cfg.save_steps
    if has_eval and cfg.eval_steps:
        kwargs["eval_steps"] = cfg.eval_steps
    ckpt = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    kwargs[ckpt] = cfg.gradient_checkpointing
    kwargs[ckpt + "_kwargs"] = {"use_reentrant": False} if cfg.gradient_checkpointing else None
    if "use_cache" in fields:
        kwargs["use_cache"] = False
    return TrainingArguments(**{k: v for k, v in kwargs.items() if k in fields})


def _find_resume(output: Path, resume: bool | str | None) -> str | None:
    if not resume:
        return None
    if isinstance(resume, str) and resume not in ("true", "last", "latest"):
        if not Path(resume).is_dir():
            raise TrainError(f"--resume {resume}: no such checkpoint directory")
        return resume
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(output)) if output.is_dir() else None
    if last is None:
        raise TrainError(f"--resume: no checkpoint-* directory in {output}")
    return last


@dataclass
class Prepared:
    """Everything :func:`train` sets up before ``trainer.train()`` (tests and notebooks use it directly)."""

    trainer: Any
    tokenizer: Any
    tokenizer_source: str
    manifest: dict[str, Any]
    config: TrainConfig
    precision: str
    model_path: str
    output: Path
    data_dir: Path
    train_split: SplitData
    eval_split: SplitData | None
    trainable_params: int
    total_params: int
    notes: list[str]


def prepare_trainer(
    data_dir: str | Path,
    model: str | Path,
    output: str | Path,
    *,
    tokenizer: str | None = None,
    config: TrainConfig | None = None,
    progress: bool = True,
    console: Any = None,
    **overrides: Any,
) -> Prepared:
    """Check the data against the model, load the model as ``config.method`` trains it, build the ``Trainer``."""
    cfg = config or TrainConfig()
    if overrides:
        cfg = TrainConfig(**{**asdict(cfg), **overrides})
    cfg.validate()
    require_train_deps(cfg.method)

    import torch

    data_dir, output, model_path = Path(data_dir), Path(output), str(model)
    manifest = read_manifest(data_dir)
    notes: list[str] = []

    # tokenizer identity first: refuse before spending time on the model
    tok, tok_source = load_model_tokenizer(model_path, tokenizer, manifest)
    if tok_source != model_path and not tokenizer:
        notes.append(f"{model_path} has no tokenizer; using the dataset's tokenizer {tok_source!r}")
    try:
        check_tokenizer(manifest, tok, model_name=f"model {model_path}")
    except TokenizerMismatchError as e:
        if not cfg.allow_tokenizer_mismatch:
            raise
        notes.append(f"tokenizer mismatch ignored (--allow-tokenizer-mismatch): {e}")
    template = apply_build_template(tok, manifest)
    if not template:
        notes.append("the manifest has no chat template (raw-text data); the tokenizer's own template is kept")

    train_split = load_split(data_dir, manifest, "train")
    if train_split is None or train_split.rows == 0:
        raise TrainError(f"{data_dir} has no train rows with a trained token")
    eval_split = load_split(data_dir, manifest, "validation")
    if train_split.dropped_no_target:
        notes.append(f"dropped {train_split.dropped_no_target} train rows without a trained token")
    if train_split.packed and not cfg.padding_free:
        raise TrainError("packed data needs padding-free batches (an attention_mask would let packed examples "
                         "attend to each other); drop --no-padding-free or rebuild without --pack")

    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        raise TrainError(f"cannot load model {model_path!r}: {str(e).splitlines()[0]}") from None
    vocab = getattr(model_config, "vocab_size", None) or getattr(model_config.get_text_config(), "vocab_size", None)
    max_id = max(train_split.max_token_id, eval_split.max_token_id if eval_split else -1)
    if vocab is not None and max_id >= vocab:
        raise TrainError(f"the data uses token id {max_id} but {model_path} has only {vocab} embeddings")

    precision = resolve_precision(cfg.precision)
    torch.manual_seed(cfg.seed)
    net = load_base_model(model_path, cfg.method, precision, attn_implementation=cfg.attn_implementation,
                          double_quant=cfg.double_quant, quant_type=cfg.quant_type)
    if cfg.method in ("qlora", "lora"):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if cfg.method == "qlora":
            # fp32 norms/embeddings, frozen base; the Trainer turns activation checkpointing on itself
            net = prepare_model_for_kbit_training(net, use_gradient_checkpointing=False)
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=_target_modules(cfg.target_modules), bias="none", task_type="CAUSAL_LM")
        net = get_peft_model(net, lora)
        if cfg.gradient_checkpointing:
            net.enable_input_require_grads()
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    total = sum(p.numel() for p in net.parameters())

    args = _training_arguments(cfg, output, precision, eval_split is not None, progress)
    SFTDataTrainer, RichProgressCallback = _trainer_classes()
    collator = SFTDataCollator(padding_free=cfg.padding_free,
                               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
    trainer = SFTDataTrainer(model=net, args=args, train_dataset=train_split.dataset,
                             eval_dataset=eval_split.dataset if eval_split else None,
                             data_collator=collator, processing_class=tok)
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if progress:
        trainer.add_callback(RichProgressCallback(console=console))
    return Prepared(trainer=trainer, tokenizer=tok, tokenizer_source=tok_source, manifest=manifest, config=cfg,
                    precision=precision, model_path=model_path, output=output, data_dir=data_dir,
                    train_split=train_split, eval_split=eval_split, trainable_params=trainable, total_params=total,
                    notes=notes)


def train(
    data_dir: str | Path,
    model: str | Path,
    output: str | Path,
    *,
    tokenizer: str | None = None,
    config: TrainConfig | None = None,
    resume: bool | str | None = None,
    progress: bool = True,
    console: Any = None,
    **overrides: Any,
) -> TrainResult:
    """Fine-tune ``model`` on the sftdata output in ``data_dir`` and save the result to ``output``.

    ``config`` (or keyword ``overrides`` of :class:`TrainConfig` fields) chooses QLoRA (default), LoRA on a
    16-bit base, or full fine-tuning. ``output`` receives the adapter (or full model), the tokenizer with the
    build's chat template, ``trainer_state.json`` (``log_history``), ``checkpoint-*`` directories, and
    ``sftdata_train.json`` (what was trained on what, and the final metrics). ``resume``: ``True`` continues
    from the last ``checkpoint-*`` in ``output``, or give a checkpoint directory.
    """
    import warnings

    p = prepare_trainer(data_dir, model, output, tokenizer=tokenizer, config=config, progress=progress,
                        console=console, **overrides)
    trainer, tok, manifest, cfg = p.trainer, p.tokenizer, p.manifest, p.config
    output, data_dir, model_path, notes = p.output, p.data_dir, p.model_path, p.notes
    tok_source, train_split, eval_split, precision = p.tokenizer_source, p.train_split, p.eval_split, p.precision
    trainable, total = p.trainable_params, p.total_params
    resume_from = _find_resume(output, resume)
    output.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with warnings.catch_warnings():
        # bitsandbytes runs the paged optimizers unpaged on CPU, and says so once per parameter
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        result = trainer.train(resume_from_checkpoint=resume_from)
    runtime = time.time() - start
    eval_metrics = trainer.evaluate() if eval_split is not None else {}

    trainer.save_model(str(output))
    notes += save_tokenizer(tok, output, source=tok_source)
    trainer.save_state()  # output/trainer_state.json with log_history
    _save_generation_config(output, model_path, tok, manifest)

    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    res = TrainResult(
        output=str(output),
        method=cfg.method,
        global_step=trainer.state.global_step,
        epochs=float(trainer.state.epoch or 0.0),
        train_loss=float(result.training_loss) if result.training_loss is not None else None,
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        eval_loss=eval_metrics.get("eval_loss"),
        eval_perplexity=eval_metrics.get("eval_perplexity"),
        trainable_params=trainable,
        total_params=total,
        train_rows=train_split.rows,
        dropped_rows=train_split.dropped_no_target,
        targets_seen=trainer.targets_seen,
        skipped_empty_batches=trainer.skipped_empty_batches,
        runtime_s=round(runtime, 3),
        targets_per_s=round(trainer.targets_seen / runtime, 2) if runtime > 0 else 0.0,
        log_history=str(output / "trainer_state.json"),
        resumed_from=resume_from,
        notes=notes,
    )
    info = {
        "format": "sftdata-train/1",
        "base_model": str(Path(model_path).resolve()) if Path(model_path).exists() else model_path,
        "method": cfg.method,
        "precision": precision,
        "config": asdict(cfg),
        "data_dir": str(data_dir.resolve()),
        "dataset_fingerprint": manifest.get("fingerprint"),
        "template": {k: (manifest.get("template") or {}).get(k) for k in ("name", "sha256", "end_of_turn")},
        "tokenizer": {"name_or_path": (manifest.get("tokenizer") or {}).get("name_or_path"),
                      "sha256": tokenizer_fingerprint(tok)},
        "result": res.to_dict(),
    }
    (output / TRAIN_INFO).write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")
    return res


def save_tokenizer(tokenizer: Any, output: Path, *, source: str | None = None) -> list[str]:
    """Save the tokenizer (with its chat template) and check that it reloads to the *same* tokenizer.

    transformers 5 does not write every loading flag back (e.g. the Llama/Mistral SentencePiece ``legacy`` flag:
    a Mistral-7B tokenizer saved and reloaded tokenizes ``<s>[INST]`` differently). When the reloaded fingerprint
    differs, the source's ``tokenizer_config.json`` keys missing from the saved one are restored; if that is not
    enough, the source's tokenizer files are copied verbatim with the chat template written next to them.
    """
    import shutil

    from transformers import AutoTokenizer

    want = tokenizer_fingerprint(tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    tokenizer.save_pretrained(str(output))

    def same() -> bool:
        again = AutoTokenizer.from_pretrained(str(output))
        return tokenizer_fingerprint(again) == want and getattr(again, "chat_template", None) == template

    if same():
        return []
    src = Path(source) if source else None
    cfg_path = output / "tokenizer_config.json"
    if src is not None and (src / "tokenizer_config.json").is_file() and cfg_path.is_file():
        original = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
        saved = json.loads(cfg_path.read_text(encoding="utf-8"))
        restored = {k: v for k, v in original.items() if k not in saved and k != "chat_template"}
        saved.update(restored)
        cfg_path.write_text(json.dumps(saved, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if same():
            return [f"restored tokenizer_config keys {sorted(restored)} that save_pretrained dropped"]
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (src / name).is_file():
                shutil.copyfile(src / name, output / name)
        if template:
            (output / "chat_template.jinja").write_text(template, encoding="utf-8")
            saved = json.loads(cfg_path.read_text(encoding="utf-8"))
            saved.pop("chat_template", None)
            cfg_path.write_text(json.dumps(saved, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if same():
            return ["copied the model's tokenizer files verbatim (save_pretrained changed the tokenizer)"]
    raise TrainError(
        f"the tokenizer saved to {output} does not reload to the tokenizer the data was built with; "
        "serving it would tokenize differently. Copy the model's tokenizer files there by hand."
    )


def _save_generation_config(output: Path, model_path: str, tok: Any, manifest: dict[str, Any]) -> None:
    from transformers import GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(model_path)
    except OSError:
        gen = GenerationConfig()
    eos = end_of_turn_ids(tok, manifest)
    if eos:
        gen.eos_token_id = eos if len(eos) > 1 else eos[0]
    if tok.pad_token_id is not None:
        gen.pad_token_id = tok.pad_token_id
    gen.save_pretrained(str(output))


# --------------------------------------------------------------------------------------------------------------
# Merge
# --------------------------------------------------------------------------------------------------------------


def load_adapter_model(adapter_dir: str | Path, *, base_model: str | None = None):
    """The trained model as training saw it: the base loaded the same way (4-bit for QLoRA) plus the adapter."""
    require_train_deps("lora")
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    info = _train_info(adapter_dir)
    base = base_model or info["base_model"]
    model = load_base_model(base, info["method"], info.get("precision", "fp32"),
                            double_quant=info["config"].get("double_quant", True),
                            quant_type=info["config"].get("quant_type", "nf4"))
    return PeftModel.from_pretrained(model, str(adapter_dir))


def _train_info(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / TRAIN_INFO
    if not path.is_file():
        raise TrainError(f"{adapter_dir} has no {TRAIN_INFO}; it is not an `sftdata train` output")
    return json.loads(path.read_text(encoding="utf-8"))


def merge(adapter_dir: str | Path, output: str | Path, *, base_model: str | None = None,
          dtype: str = "auto") -> Path:
    """Export ``base + adapter`` as one plain model in ``output`` (with the tokenizer and generation config).

    For QLoRA the 4-bit base is loaded exactly as in training and *dequantized first*, then the adapter is merged
    in floating point: the merged weights are ``dequant(W_nf4) + B·A·alpha/r``, which is what the adapter model
    computes, so the merged logits match it. (peft's in-place merge into a ``Linear4bit`` re-quantizes the sum
    to NF4 and drifts.) ``dtype``: ``auto`` keeps the base checkpoint's dtype; or ``fp32``/``bf16``/``fp16``.
    """
    require_train_deps("lora")
    import shutil

    import torch
    from peft import PeftModel
    from transformers import AutoConfig, GenerationConfig

    adapter_dir, output = Path(adapter_dir), Path(output)
    info = _train_info(adapter_dir)
    if info["method"] == "full":
        raise TrainError(f"{adapter_dir} is a full fine-tune: it already is a complete model, nothing to merge")
    base = base_model or info["base_model"]
    if info["method"] == "qlora":
        model = load_base_model(base, "qlora", "fp32", double_quant=info["config"].get("double_quant", True),
                                quant_type=info["config"].get("quant_type", "nf4"))
        model = model.dequantize(dtype=torch.float32)
    else:
        model = load_base_model(base, "lora", "fp32")
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    if dtype == "auto":
        base_dtype = getattr(AutoConfig.from_pretrained(base), "dtype", None)
        target = base_dtype if isinstance(base_dtype, torch.dtype) else (
            getattr(torch, base_dtype) if isinstance(base_dtype, str) else torch.float32)
    else:
        target = _dtype(dtype)
    merged = merged.to(target)
    if hasattr(merged.config, "quantization_config"):
        del merged.config.quantization_config
    merged.config.use_cache = True
    output.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(output))
    # copy, do not re-save: a save/load round trip can change a tokenizer (see save_tokenizer)
    for name in TOKENIZER_FILES:
        if (adapter_dir / name).is_file():
            shutil.copyfile(adapter_dir / name, output / name)
    try:
        GenerationConfig.from_pretrained(str(adapter_dir)).save_pretrained(str(output))
    except OSError:
        pass
    return output


def main_summary(result: TrainResult) -> list[tuple[str, str]]:
    """Rows of the final summary table (the CLI prints them)."""

    def f(x, spec=".4f"):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    rows = [
        ("method", result.method),
        ("steps", str(result.global_step) + (f" (resumed from {Path(result.resumed_from).name})" if result.resumed_from else "")),
        ("epochs", f(result.epochs, ".2f")),
        ("train loss (first → last logged)", f"{f(result.first_loss)} → {f(result.last_loss)}"),
        ("train loss (mean over run)", f(result.train_loss)),
        ("eval loss", f(result.eval_loss)),
        ("eval perplexity", f(result.eval_perplexity, ".3f")),
        ("trainable params", f"{result.trainable_params:,} of {result.total_params:,} "
                             f"({100 * result.trainable_params / max(result.total_params, 1):.3f}%)"),
        ("train rows", f"{result.train_rows:,}" + (f" ({result.dropped_rows} dropped: no trained token)" if result.dropped_rows else "")),
        ("trained tokens (this run)", f"{result.targets_seen:,}"),
        ("throughput", f"{result.targets_per_s:,.1f} trained tokens/s"),
        ("runtime", f"{result.runtime_s:.1f} s"),
        ("saved to", result.output),
        ("loss history", result.log_history),
    ]
    if result.skipped_empty_batches:
        rows.append(("all-masked micro-batches skipped", str(result.skipped_empty_batches)))
    return rows

