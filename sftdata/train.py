"""Train: QLoRA / LoRA / full fine-tuning over an ``sftdata build`` output directory.

A thin layer over ``transformers.Trainer`` + peft + bitsandbytes; what it adds is what keeps the train/serve
promise, guards the traps the field keeps hitting, and makes a long run observable:

* **padding-free batches** (:class:`SFTDataCollator`): rows stay ``[B, L]`` with per-row ``position_ids`` that
  restart at 0 for every packed example and *no* ``attention_mask``; transformers 5.x then builds a per-row
  block-diagonal causal mask from the ``position_ids`` (only when ``attention_mask is None`` and no cache is used,
  hence ``use_cache=False``), so no example attends to another and attention costs ``B·L²``, not ``(B·L)²``.
  With flash-attention the micro-batch is flattened to ``[1, N]`` instead, which its varlen kernel reads from the
  same ``position_ids``. The first label of every example is ``-100``: the last token of one example is never
  trained to predict the first token of the next, so the loss of a packed row is exactly the token-weighted mean
  of its examples' losses.
* **bitsandbytes CPU repacking** (:func:`disable_cpu_4bit_repacking`), **all-masked batches** (dropped at load
  time; a micro-batch without a target adds an exact zero), **tokenizer identity** against the manifest, and the
  **serving template** saved with the adapter.
* **an output directory that belongs to one run**: a fresh run refuses a non-empty directory, and ``resume``
  refuses checkpoints written for other data or another model (``sftdata_run.json``).
* **a run you can watch**: a start-up line, plain log lines (step, loss, lr, grad norm, tokens/s, ETA) when the
  output is not a terminal, TensorBoard / MLflow / W&B through transformers' integrations, early stopping with
  the best checkpoint kept, peak memory in the summary.

torch, peft and bitsandbytes are imported inside functions: the core install (build, show, ...) has no torch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from sftdata.train_config import METHODS, PRECISIONS, TrainConfig  # noqa: F401  (re-exported)

TRAIN_INFO = "sftdata_train.json"
RUN_INFO = "sftdata_run.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "added_tokens.json")
NUM_TOKENS_KEY = "sftdata_num_tokens"  # collated batch entry the trainer pops: real (non-pad) tokens
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
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


def quiet_library_loggers() -> None:
    """Silence library log lines that are not the user's business (idempotent; call before importing bitsandbytes).

    bitsandbytes logs at import, on CPUs with AVX512-BF16, that an optional CPU kernel package is missing; that
    kernel only serves the repacked inference layout, which :func:`disable_cpu_4bit_repacking` turns off anyway.
    """
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # checkpoint rotation on filesystems with coarse timestamps: transformers falls back to step order, which is
    # what the run wants anyway
    rotation = logging.getLogger("transformers.trainer_utils")
    if not any(isinstance(f, _DropMessages) for f in rotation.filters):
        rotation.addFilter(_DropMessages("mtime may not be reliable"))


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


@contextlib.contextmanager
def quiet_library_warnings() -> Iterator[None]:
    """Hide the deprecation and platform notices transformers, peft and bitsandbytes print during a run.

    Kept: everything else (a warning about the user's data, model or settings still shows).
    """
    with warnings.catch_warnings():
        # peft asks transformers for `is_gradient_checkpointing`, which transformers 5 deprecates in its own favour
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated",
                                category=FutureWarning)
        # bitsandbytes runs the paged optimizers unpaged on CPU, and says so once per parameter
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        # torch.utils.checkpoint's notice about a default the trainer sets explicitly
        warnings.filterwarnings("ignore", message=r".*use_reentrant parameter should be passed explicitly")
        # transformers' TensorBoard callback on a torch build without tensorboard's own writer
        warnings.filterwarnings("ignore", message=r".*TensorFlow installation is not found")
        yield


def require_train_deps(method: str = "qlora") -> None:
    """Raise :class:`TrainError` with install instructions when the training extra is missing."""
    quiet_library_loggers()
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


class TokenRows:
    """The rows of a split in memory as flat numpy arrays plus offsets; ``rows[i]`` is a dict of numpy arrays.

    A map-style dataset for ``torch.utils.data.DataLoader`` (``len`` + indexing). Flat arrays instead of a
    ``datasets.Dataset``: indexing is a slice, with no per-row Arrow conversion and no extra dependency.
    """

    def __init__(self, table):
        import numpy as np
        import pyarrow.compute as pc

        self.columns = [c for c in ("input_ids", "labels", "position_ids", "seq_lengths") if c in table.column_names]
        self.values: dict[str, Any] = {}
        self.offsets: dict[str, Any] = {}
        for name in self.columns:
            column = table.column(name).combine_chunks()
            self.values[name] = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.int64)
            lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
            self.offsets[name] = np.concatenate([[0], np.cumsum(lengths)])
        self.lengths = np.diff(self.offsets["input_ids"])

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return {name: self.values[name][self.offsets[name][index]:self.offsets[name][index + 1]]
                for name in self.columns}


@dataclass
class SplitData:
    dataset: TokenRows
    rows: int
    dropped_no_target: int
    tokens: int
    targets: int
    max_token_id: int
    max_row_tokens: int
    packed: bool


def load_split(data_dir: str | Path, split: str) -> SplitData | None:
    """Read one split (its files located through the manifest) into memory, keeping the columns training needs.

    Rows without a single trained target are dropped here (an all-``-100`` batch gives ``0/0 = NaN``).
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from sftdata.write import split_files

    paths = split_files(data_dir, split).get(split) or []
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
    lengths = pc.list_value_length(table.column("input_ids"))
    return SplitData(
        dataset=TokenRows(table),
        rows=table.num_rows,
        dropped_no_target=int(n_rows - table.num_rows),
        tokens=len(ids),
        targets=int(targets.sum()),
        max_token_id=int(pc.max(ids).as_py()) if len(ids) else -1,
        max_row_tokens=int(pc.max(lengths).as_py()) if len(lengths) else 0,
        packed="position_ids" in keep or "seq_lengths" in keep,
    )


class SFTDataCollator:
    """Collate sftdata rows (packed or not) for a causal LM.

    ``padding_free=True`` (default): no ``attention_mask``; every row carries ``position_ids`` (kept from packed
    rows, ``0..n-1`` for unpacked ones) and transformers 5.x derives the block-diagonal causal mask from them
    (only when ``attention_mask is None`` and no cache is used), so no example attends to another. The label at
    the first position of every example is ``-100``: it would otherwise be predicted from the previous example's
    last token.

    * ``flatten=False``: rows stay ``[B, L]`` (``L`` = the longest row, rounded up to ``pad_to_multiple_of``).
      A shorter row is filled with ``pad_token_id`` as a separate segment (its own ``position_ids`` from 0, labels
      ``-100``), which nothing real can attend to. SDPA/eager attention then costs ``B·L²``.
    * ``flatten=True``: the rows are concatenated into one ``[1, N]`` sequence, for flash-attention's varlen
      kernel (which reads packing from ``position_ids`` only at batch size 1). With SDPA this costs ``N²``.

    ``padding_free=False``: unpacked rows only; right-padded ``[B, L]`` batches with an ``attention_mask`` and
    ``-100`` labels on padding (a packed row cannot be padded this way: the mask would let its examples see each
    other).

    ``count_tokens=True`` adds ``sftdata_num_tokens`` (real, non-pad tokens) for :class:`SFTDataTrainer`, which
    removes it before the forward pass; leave it off when handing batches to a model directly.
    """

    def __init__(self, padding_free: bool = True, pad_token_id: int = 0, pad_to_multiple_of: int | None = None,
                 *, flatten: bool = False, count_tokens: bool = False):
        self.padding_free = padding_free
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.flatten = flatten
        self.count_tokens = count_tokens

    @staticmethod
    def _positions(feature: dict[str, Any]):
        import numpy as np

        n = len(feature["input_ids"])
        pos = feature.get("position_ids")
        if pos is not None:
            pos = np.asarray(pos, dtype=np.int64)
            if len(pos) != n:
                raise ValueError(f"position_ids has {len(pos)} entries for {n} tokens")
            return pos
        lengths = feature.get("seq_lengths")
        if lengths is not None and len(lengths):
            lengths = np.asarray(lengths, dtype=np.int64)
            if int(lengths.sum()) != n:
                raise ValueError(f"seq_lengths sum to {int(lengths.sum())} for {n} tokens")
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            return np.arange(n, dtype=np.int64) - np.repeat(starts, lengths)
        return np.arange(n, dtype=np.int64)

    def _width(self, n: int) -> int:
        if self.pad_to_multiple_of:
            return -(-n // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return n

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import numpy as np
        import torch

        ids = [np.asarray(f["input_ids"], dtype=np.int64) for f in features]
        labels = [np.asarray(f["labels"], dtype=np.int64) for f in features]
        real = sum(len(x) for x in ids)
        if self.padding_free:
            positions = [self._positions(f) for f in features]
            labels = [np.where(p == 0, -100, lab) for p, lab in zip(positions, labels)]
            if self.flatten:
                batch = {"input_ids": np.concatenate(ids)[None], "labels": np.concatenate(labels)[None],
                         "position_ids": np.concatenate(positions)[None]}
            else:
                width = self._width(max(len(x) for x in ids))
                batch = {"input_ids": np.full((len(ids), width), self.pad_token_id, dtype=np.int64),
                         "labels": np.full((len(ids), width), -100, dtype=np.int64),
                         "position_ids": np.empty((len(ids), width), dtype=np.int64)}
                for i, (x, lab, pos) in enumerate(zip(ids, labels, positions)):
                    n = len(x)
                    batch["input_ids"][i, :n] = x
                    batch["labels"][i, :n] = lab
                    batch["position_ids"][i, :n] = pos
                    batch["position_ids"][i, n:] = np.arange(width - n)  # padding: a segment of its own
        else:
            for f in features:
                lengths = f.get("seq_lengths")
                if lengths is not None and len(lengths) > 1:
                    raise ValueError(
                        "packed rows need padding_free=True: an attention_mask cannot keep packed examples apart"
                    )
            width = self._width(max(len(x) for x in ids))
            batch = {"input_ids": np.full((len(ids), width), self.pad_token_id, dtype=np.int64),
                     "labels": np.full((len(ids), width), -100, dtype=np.int64),
                     "attention_mask": np.zeros((len(ids), width), dtype=np.int64)}
            for i, (x, lab) in enumerate(zip(ids, labels)):
                batch["input_ids"][i, :len(x)] = x
                batch["labels"][i, :len(x)] = lab
                batch["attention_mask"][i, :len(x)] = 1
        out = {k: torch.from_numpy(v) for k, v in batch.items()}
        if self.count_tokens:
            out[NUM_TOKENS_KEY] = torch.tensor(real)
        return out


def count_targets(labels) -> int:
    """Trained targets in a collated batch (labels are unshifted: position 0 of a row is never a target)."""
    return int((labels[..., 1:] != -100).sum().item())


def count_parameters(model) -> tuple[int, int]:
    """``(trainable, total)`` parameters, counting a 4-bit weight by its logical size.

    bitsandbytes stores two 4-bit values per byte, so ``numel()`` of a ``Params4bit`` is half (per byte of its
    storage dtype) of the weights it holds; counted naively, a QLoRA model looks half its size and the trainable
    share doubles. Same rule as peft's ``get_nb_trainable_parameters``, for any model.
    """
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            n *= 2 * param.element_size()
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def peak_memory() -> dict[str, Any]:
    """Peak memory of this process so far: CUDA allocated and reserved (GiB), or the CPU's peak RSS (GiB)."""
    import torch

    if torch.cuda.is_available():
        return {"device": torch.cuda.get_device_name(),
                "allocated_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                "reserved_GiB": round(torch.cuda.max_memory_reserved() / 2**30, 3)}
    import resource

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"device": "cpu", "rss_GiB": round(kib / 2**20, 3)}


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
    from sftdata.tokenizer import tokenizer_fingerprint as fingerprint

    return fingerprint(tokenizer)


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
# Model loading
# --------------------------------------------------------------------------------------------------------------


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
    quiet_library_loggers()
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
        # full fine-tuning keeps fp32 master weights; bf16/fp16 only as autocast
        kwargs["dtype"] = torch.float32
    try:
        with quiet_library_warnings():
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


def generation_eos_ids(manifest: dict[str, Any], tokenizer: Any) -> list[int]:
    """Token ids that must stop generation: every id that ends a trained turn, then the tokenizer's EOS.

    From ``manifest["template"]["end_of_turn_ids"]`` when the build recorded it (e.g. ``<|eot_id|>`` and
    ``<|eom_id|>``, or gpt-oss ``<|return|>`` and ``<|call|>``), template ids first, de-duplicated. Older manifests:
    the tokenizer's EOS plus the template's ``end_of_turn`` string when it is a single token.
    """
    template = manifest.get("template") or {}
    ids: list[int] = []
    if template.get("end_of_turn_ids") is not None:
        ids.extend(int(i) for i in template["end_of_turn_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(int(tokenizer.eos_token_id))
    else:
        if tokenizer.eos_token_id is not None:
            ids.append(int(tokenizer.eos_token_id))
        eot = template.get("end_of_turn")
        if eot:
            eot_ids = tokenizer.encode(eot, add_special_tokens=False)
            if len(eot_ids) == 1:
                ids.append(int(eot_ids[0]))
    return list(dict.fromkeys(ids))


def save_generation_config(output: str | Path, base_model: str, tokenizer: Any, manifest: dict[str, Any]) -> None:
    """Write ``generation_config.json``: the base model's, with ``eos_token_id`` = :func:`generation_eos_ids`."""
    from transformers import GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(base_model)
    except OSError:
        gen = GenerationConfig()
    eos = generation_eos_ids(manifest, tokenizer)
    if eos:
        gen.eos_token_id = eos if len(eos) > 1 else eos[0]
    if tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    gen.save_pretrained(str(output))


# --------------------------------------------------------------------------------------------------------------
# Trainer pieces
# --------------------------------------------------------------------------------------------------------------


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


def _trainer_classes():
    """Build the Trainer subclass and callbacks lazily (transformers/torch are optional at import time)."""
    import torch
    from transformers import Trainer, TrainerCallback

    class SFTDataTrainer(Trainer):
        """``Trainer`` with the all-masked-batch guard, token counters and a token-weighted eval loss."""

        skipped_empty_batches = 0
        targets_seen = 0
        tokens_seen = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            real = inputs.pop(NUM_TOKENS_KEY, None)
            labels = inputs.get("labels")
            if labels is not None and model.training:
                self.tokens_seen += int(real) if real is not None else int(labels.numel())
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
                    batch.pop(NUM_TOKENS_KEY, None)
                    batch = self._prepare_inputs(batch)
                    labels = batch.pop("labels")
                    if count_targets(labels) == 0:
                        continue
                    with self.compute_loss_context_manager():
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

    class PlainLogCallback(TrainerCallback):
        """One plain line per logging step and per evaluation, flushed at once (for log files, nohup, Slurm)."""

        def __init__(self, trainer, write):
            self.trainer, self.write = trainer, write
            self.start_time = self.start_step = None
            self.last_time, self.last_tokens = None, 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.start_time = self.last_time = time.time()
            self.start_step = state.global_step
            self.last_tokens = self.trainer.tokens_seen

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or not state.is_world_process_zero:
                return
            if "loss" in logs:
                now = time.time()
                tokens = self.trainer.tokens_seen
                rate = (tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
                self.last_time, self.last_tokens = now, tokens
                done = state.global_step - self.start_step
                eta = (now - self.start_time) / done * (state.max_steps - state.global_step) if done else 0.0
                parts = [f"step {state.global_step}/{state.max_steps}", f"loss {logs['loss']:.4f}"]
                if logs.get("learning_rate") is not None:
                    parts.append(f"lr {logs['learning_rate']:.3e}")
                if logs.get("grad_norm") is not None:
                    parts.append(f"grad_norm {logs['grad_norm']:.4f}")
                parts += [f"tokens/s {rate:,.0f}", f"eta {_fmt_duration(eta)}"]
                self.write("  ".join(parts))
            if "eval_loss" in logs:
                self.write(f"eval step {state.global_step}: loss {logs['eval_loss']:.4f}  "
                           f"perplexity {logs.get('eval_perplexity', float('nan')):.3f}  "
                           f"({logs.get('eval_tokens', 0):,} tokens)")

    class RichProgressCallback(TrainerCallback):
        """A rich progress bar with the running loss / learning rate, and eval results as they come."""

        def __init__(self, console=None):
            self.console = console
            self.progress = None
            self.task = None

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
                lr = logs.get("learning_rate")
                info = f"loss {logs['loss']:.4f}" + (f"  lr {lr:.2e}" if lr is not None else "")
                self.progress.update(self.task, info=info)
            if "eval_loss" in logs:
                self.progress.console.print(
                    f"eval step {state.global_step}: loss {logs['eval_loss']:.4f}  "
                    f"perplexity {logs.get('eval_perplexity', float('nan')):.3f}  "
                    f"({logs.get('eval_tokens', 0):,} tokens)"
                )

        def on_train_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.update(self.task, completed=state.global_step)
                self.progress.stop()
                self.progress = None

    return SFTDataTrainer, RichProgressCallback, PlainLogCallback


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
    tokens_seen: int = 0
    tokens_per_s: float = 0.0
    best_step: int | None = None
    best_eval_loss: float | None = None
    stopped_early: bool = False
    peak_memory: dict[str, Any] = field(default_factory=dict)
    memory_estimate_GiB: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _training_arguments(cfg: TrainConfig, output: Path, precision: str, has_eval: bool, learning_rate: float):
    import dataclasses

    import torch
    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    early = cfg.early_stopping_patience is not None
    save_steps = cfg.save_steps or (cfg.eval_steps if early else None)
    trackers = cfg.trackers()
    kwargs: dict[str, Any] = dict(
        output_dir=str(output),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size or cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps and cfg.max_steps > 0 else -1,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.resolved_max_grad_norm(),
        optim=cfg.optim,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if save_steps else "epoch",
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if (has_eval and cfg.eval_steps) else "no",
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        report_to=trackers or "none",
        run_name=cfg.run_name or output.name,
        disable_tqdm=True,
        dataloader_num_workers=0,
        label_names=["labels"],
    )
    if save_steps:
        kwargs["save_steps"] = save_steps
    if has_eval and cfg.eval_steps:
        kwargs["eval_steps"] = cfg.eval_steps
    if early:
        kwargs.update(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False)
    # transformers renamed gradient_checkpointing to activation_checkpointing (both exist in recent 5.x)
    ckpt = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    kwargs[ckpt] = cfg.gradient_checkpointing
    kwargs[ckpt + "_kwargs"] = {"use_reentrant": False} if cfg.gradient_checkpointing else None
    if "use_cache" in fields:
        kwargs["use_cache"] = False
    return TrainingArguments(**{k: v for k, v in kwargs.items() if k in fields})


def _check_trackers(cfg: TrainConfig) -> None:
    import importlib.util

    for name in cfg.trackers():
        modules = ("tensorboard", "tensorboardX") if name == "tensorboard" else (name,)
        if not any(importlib.util.find_spec(m) for m in modules):
            raise TrainError(f"--report-to {name}: the {TRACKER_PACKAGES[name]} package is not installed; "
                             f"pip install 'sftdata[{name}]'")


# --------------------------------------------------------------------------------------------------------------
# The output directory belongs to one run
# --------------------------------------------------------------------------------------------------------------


def run_identity(cfg: TrainConfig, manifest: dict[str, Any], model_path: str) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it: the data, the base model, the adapter's shape."""
    base = Path(model_path)
    identity = {
        "dataset_fingerprint": manifest.get("fingerprint"),
        "base_model": str(base.resolve()) if base.exists() else model_path,
        "method": cfg.method,
    }
    if cfg.method != "full":
        identity.update(lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=cfg.target_modules,
                        use_dora=cfg.use_dora, use_rslora=cfg.use_rslora)
    if cfg.method == "qlora":
        identity.update(quant_type=cfg.quant_type, double_quant=cfg.double_quant)
    return identity


def _checkpoints(output: Path) -> list[Path]:
    if not output.is_dir():
        return []
    found = [p for p in output.iterdir() if p.is_dir() and p.name.startswith("checkpoint-")
             and p.name.removeprefix("checkpoint-").isdigit()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("checkpoint-")))


def _is_train_output(output: Path) -> bool:
    markers = (RUN_INFO, TRAIN_INFO, "trainer_state.json", "adapter_config.json")
    return bool(_checkpoints(output)) or any((output / m).exists() for m in markers)


def prepare_output_dir(output: Path, identity: dict[str, Any], *, resume: bool | str | None,
                       overwrite: bool) -> str | None:
    """Check that ``output`` may receive this run; return the checkpoint to resume from (or ``None``).

    A fresh run needs an empty or missing directory (``overwrite`` first deletes an earlier ``sftdata train``
    output, never other files). ``resume=True`` continues from the last ``checkpoint-*`` in ``output`` only when
    ``sftdata_run.json`` there records the same data, base model and adapter shape; a checkpoint path given
    explicitly is used as named.
    """
    named = isinstance(resume, str) and resume not in ("true", "last", "latest")
    if resume and overwrite:
        raise TrainError("--resume and --overwrite contradict each other: resume keeps the checkpoints, "
                         "overwrite deletes them")
    if named:
        path = Path(resume)
        if not (path / "trainer_state.json").is_file():
            raise TrainError(f"--resume {resume}: not a checkpoint directory (no trainer_state.json)")
        return str(path)
    if resume:
        checkpoints = _checkpoints(output)
        if not checkpoints:
            raise TrainError(f"--resume: no checkpoint-* directory in {output}")
        recorded = _read_json(output / RUN_INFO)
        if recorded != identity:
            if recorded is None:
                why = f"it has no {RUN_INFO} (written by an older sftdata or another tool)"
            else:
                diff = [f"{k}: {recorded.get(k)!r} there, {v!r} now" for k, v in identity.items()
                        if recorded.get(k) != v]
                why = "; ".join(diff)
            raise TrainError(
                f"--resume: the checkpoints in {output} belong to another run ({why}). Resume with that run's data "
                f"and model, name a checkpoint to continue from it anyway (--resume {checkpoints[-1]}), or start "
                "over with --overwrite"
            )
        return str(checkpoints[-1])
    if output.exists() and not output.is_dir():
        raise TrainError(f"--output {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            held = [p.name for p in _checkpoints(output)][-3:]
            what = f"checkpoints {', '.join(held)} of an earlier run" if held else "files"
            raise TrainError(f"--output {output} is not empty (it holds {what}); pass --resume to continue that "
                             "run, --overwrite to replace it, or choose another --output")
        if not _is_train_output(output):
            raise TrainError(f"--overwrite: {output} is not an sftdata train output; refusing to delete its files")
        shutil.rmtree(output)
    return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


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
    learning_rate: float
    notes: list[str]
    memory_estimate_bytes: float | None = None  # sftdata.memory's peak for this run (None: not a Llama-style model)


def _as_config(config: TrainConfig | None, overrides: dict[str, Any]) -> TrainConfig:
    cfg = config or TrainConfig()
    if overrides:
        unknown = sorted(set(overrides) - set(asdict(cfg)))
        if unknown:
            raise TrainError(f"unknown training option(s) {', '.join(unknown)}")
        cfg = TrainConfig(**{**asdict(cfg), **overrides})
    try:
        cfg.validate()
    except ValueError as e:
        raise TrainError(str(e)) from None
    return cfg


def prepare_trainer(
    data_dir: str | Path,
    model: str | Path,
    output: str | Path,
    *,
    tokenizer: str | None = None,
    config: TrainConfig | None = None,
    progress: bool | str = True,
    console: Any = None,
    **overrides: Any,
) -> Prepared:
    """Check the data against the model, load the model as ``config.method`` trains it, build the ``Trainer``.

    ``progress``: ``"bar"`` (a rich progress bar), ``"plain"`` (one flushed line per logging step), ``"none"``,
    or ``"auto"``/``True`` (the bar on a terminal, plain lines otherwise); ``False`` is ``"none"``.
    """
    cfg = _as_config(config, overrides)
    require_train_deps(cfg.method)
    _check_trackers(cfg)

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

    train_split = load_split(data_dir, "train")
    if train_split is None or train_split.rows == 0:
        raise TrainError(f"{data_dir} has no train rows with a trained token")
    eval_split = load_split(data_dir, "validation")
    if train_split.dropped_no_target:
        notes.append(f"dropped {train_split.dropped_no_target} train rows without a trained token")
    if train_split.packed and not cfg.padding_free:
        raise TrainError("packed data needs padding-free batches (an attention_mask would let packed examples "
                         "attend to each other); drop --no-padding-free or rebuild without --pack")
    if cfg.early_stopping_patience is not None:
        if eval_split is None or not cfg.eval_steps:
            raise TrainError("--early-stopping-patience needs a validation split (sftdata build --eval-fraction) "
                             "and --eval-steps N")
        if cfg.save_steps and cfg.save_steps % cfg.eval_steps:
            raise TrainError(f"--early-stopping-patience keeps the best checkpoint, so --save-steps "
                             f"({cfg.save_steps}) must be a multiple of --eval-steps ({cfg.eval_steps})")

    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        raise TrainError(f"cannot load model {model_path!r}: {str(e).splitlines()[0]}") from None
    vocab = getattr(model_config, "vocab_size", None) or getattr(model_config.get_text_config(), "vocab_size", None)
    max_id = max(train_split.max_token_id, eval_split.max_token_id if eval_split else -1)
    if vocab is not None and max_id >= vocab:
        raise TrainError(f"the data uses token id {max_id} but {model_path} has only {vocab} embeddings")

    import torch

    mode = _progress_mode(progress, console)
    precision = resolve_precision(cfg.precision)
    if mode != "none":  # loading a large model takes minutes: say so before it starts
        _writer(mode, console)(f"sftdata train: loading {model_path} for {cfg.method} ({precision}); "
                               f"{train_split.rows:,} train rows")
    torch.manual_seed(cfg.seed)
    with _quiet_progress_bars(mode != "bar"):
        net = load_base_model(model_path, cfg.method, precision, attn_implementation=cfg.attn_implementation,
                              double_quant=cfg.double_quant, quant_type=cfg.quant_type)
    with quiet_library_warnings():
        if cfg.method in ("qlora", "lora"):
            from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

            if cfg.method == "qlora":
                # fp32 norms/embeddings, frozen base; the Trainer turns activation checkpointing on itself
                net = prepare_model_for_kbit_training(net, use_gradient_checkpointing=False)
            lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              target_modules=_target_modules(cfg.target_modules), bias="none",
                              task_type="CAUSAL_LM", use_dora=cfg.use_dora, use_rslora=cfg.use_rslora)
            net = get_peft_model(net, lora)
            if cfg.gradient_checkpointing:
                net.enable_input_require_grads()
    trainable, total = count_parameters(net)
    learning_rate = cfg.resolved_learning_rate(total - trainable if cfg.method != "full" else total)

    args = _training_arguments(cfg, output, precision, eval_split is not None, learning_rate)
    SFTDataTrainer, RichProgressCallback, PlainLogCallback = _trainer_classes()
    flatten = (cfg.attn_implementation or "").startswith("flash_attention")
    collator = SFTDataCollator(padding_free=cfg.padding_free, flatten=flatten, count_tokens=True,
                               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
    with quiet_library_warnings():
        trainer = SFTDataTrainer(model=net, args=args, train_dataset=train_split.dataset,
                                 eval_dataset=eval_split.dataset if eval_split else None,
                                 data_collator=collator, processing_class=tok)
    from transformers.trainer_callback import EarlyStoppingCallback, PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if mode == "bar":
        trainer.add_callback(RichProgressCallback(console=console))
    elif mode == "plain":
        trainer.add_callback(PlainLogCallback(trainer, _plain_writer(console)))
    if cfg.early_stopping_patience is not None:
        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience,
                                                   early_stopping_threshold=cfg.early_stopping_threshold))
    return Prepared(trainer=trainer, tokenizer=tok, tokenizer_source=tok_source, manifest=manifest, config=cfg,
                    precision=precision, model_path=model_path, output=output, data_dir=data_dir,
                    train_split=train_split, eval_split=eval_split, trainable_params=trainable, total_params=total,
                    learning_rate=learning_rate, notes=notes,
                    memory_estimate_bytes=_memory_estimate(model_config, cfg, precision, train_split, flatten))


def _memory_estimate(model_config, cfg: TrainConfig, precision: str, split: SplitData, flatten: bool):
    """``sftdata memory``'s peak for this run (the longest row as the row length), or None where it does not apply."""
    import torch

    from sftdata.memory import Architecture, Workload, estimate

    try:
        arch = Architecture.from_config(model_config)
        work = Workload(batch_size=cfg.batch_size, seq_len=split.max_row_tokens, compute=precision,
                        device="cuda" if torch.cuda.is_available() else "cpu",
                        gradient_checkpointing=cfg.gradient_checkpointing, packed=split.packed, flatten=flatten)
        return estimate(arch, cfg.method, work, lora_r=cfg.lora_r, target_modules=_target_modules(cfg.target_modules),
                        lora_dropout=cfg.lora_dropout, optim=cfg.optim, double_quant=cfg.double_quant).peak_bytes
    except (ValueError, KeyError, TypeError):  # not a Llama-style decoder, or an optimizer the model leaves out
        return None


def _progress_mode(progress: bool | str, console: Any) -> str:
    if progress is False or progress == "none":
        return "none"
    if progress in ("bar", "plain"):
        return progress
    if progress not in (True, "auto"):
        raise TrainError(f"progress must be auto, bar, plain or none, not {progress!r}")
    if console is not None:
        return "bar" if console.is_terminal else "plain"
    return "bar" if sys.stdout.isatty() else "plain"


def _writer(mode: str, console: Any):
    """Where start-up lines go: flushed plain lines, or the rich console next to the progress bar."""
    if mode == "plain":
        return _plain_writer(console)
    return console.print if console is not None else print


def _plain_writer(console: Any):
    if console is not None and not console.is_terminal:
        file = console.file

        def write(line: str) -> None:
            file.write(line + "\n")
            file.flush()

        return write

    def write_stdout(line: str) -> None:
        print(line, flush=True)

    return write_stdout


@contextlib.contextmanager
def _quiet_progress_bars(quiet: bool) -> Iterator[None]:
    """transformers' "Loading weights" bars are useful on a terminal, noise (carriage returns) in a log file."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def startup_line(p: Prepared) -> str:
    """One line saying what the run will do: rows, trained tokens, steps, trainable parameters, effective batch."""
    cfg, args = p.config, p.trainer.args
    world = max(getattr(args, "world_size", 1), 1)
    effective = cfg.batch_size * cfg.grad_accum * world
    split = p.train_split
    steps = args.max_steps if args.max_steps > 0 else None
    if steps is None:
        per_epoch = math.ceil(math.ceil(split.rows / (cfg.batch_size * world)) / cfg.grad_accum)
        steps = math.ceil(per_epoch * cfg.epochs)
    device = "cuda" if _cuda() else "cpu"
    parts = [
        f"sftdata train: {split.rows:,} rows ({split.tokens:,} tokens, {split.targets:,} trained)"
        + (f", {split.dropped_no_target:,} dropped without a trained token" if split.dropped_no_target else ""),
        f"{steps:,} steps × {effective} rows ({cfg.batch_size} per micro-batch × {cfg.grad_accum} accumulation"
        + (f" × {world} devices" if world > 1 else "") + ")",
        f"trainable {p.trainable_params:,} of {p.total_params:,} parameters "
        f"({100 * p.trainable_params / max(p.total_params, 1):.3f}%)",
        f"{cfg.method} on {device} {p.precision}, lr {p.learning_rate:g}",
    ]
    if p.eval_split is not None:
        parts.append(f"validation {p.eval_split.rows:,} rows")
    if p.memory_estimate_bytes:
        parts.append(f"estimated peak memory {p.memory_estimate_bytes / 2**30:.2f} GiB (sftdata memory)")
    return "; ".join(parts)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def train(
    data_dir: str | Path,
    model: str | Path,
    output: str | Path,
    *,
    tokenizer: str | None = None,
    config: TrainConfig | None = None,
    resume: bool | str | None = None,
    overwrite: bool = False,
    progress: bool | str = True,
    console: Any = None,
    **overrides: Any,
) -> TrainResult:
    """Fine-tune ``model`` on the sftdata output in ``data_dir`` and save the result to ``output``.

    ``config`` (or keyword ``overrides`` of :class:`TrainConfig` fields) chooses QLoRA (default), LoRA on a
    16-bit base, or full fine-tuning. ``output`` receives the adapter (or full model), the tokenizer with the
    build's chat template, ``trainer_state.json`` (``log_history``), ``checkpoint-*`` directories,
    ``sftdata_run.json`` (what a resume must match) and ``sftdata_train.json`` (what was trained on what, and
    the final metrics). ``output`` must be empty or missing unless ``overwrite`` (replace an earlier train
    output) or ``resume`` (``True``: the last ``checkpoint-*`` of the same run in ``output``; or a checkpoint
    directory). ``progress``: see :func:`prepare_trainer`.
    """
    cfg = _as_config(config, overrides)
    output = Path(output)
    # refuse a reused output directory before loading anything
    manifest = read_manifest(data_dir)
    identity = run_identity(cfg, manifest, str(model))
    resume_from = prepare_output_dir(output, identity, resume=resume, overwrite=overwrite)

    p = prepare_trainer(data_dir, model, output, tokenizer=tokenizer, config=cfg, progress=progress,
                        console=console)
    trainer, tok, cfg = p.trainer, p.tokenizer, p.config
    output, data_dir, model_path, notes = p.output, p.data_dir, p.model_path, p.notes
    mode = _progress_mode(progress, console)
    write = _writer(mode, console)
    output.mkdir(parents=True, exist_ok=True)
    (output / RUN_INFO).write_text(json.dumps(identity, indent=2) + "\n", encoding="utf-8")
    if mode != "none":
        write(startup_line(p) + (f"; resuming from {resume_from}" if resume_from else ""))
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    with quiet_library_warnings():
        result = trainer.train(resume_from_checkpoint=resume_from)
        runtime = time.time() - start
        eval_metrics = _final_eval(trainer, cfg) if p.eval_split is not None else {}
        trainer.save_model(str(output))
    notes += save_tokenizer(tok, output, source=p.tokenizer_source)
    trainer.save_state()  # output/trainer_state.json with log_history
    save_generation_config(output, model_path, tok, p.manifest)

    state = trainer.state
    history = state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    max_steps = state.max_steps
    stopped_early = cfg.early_stopping_patience is not None and state.global_step < max_steps
    best_step = getattr(state, "best_global_step", None) if cfg.early_stopping_patience is not None else None
    if stopped_early:
        notes.append(f"early stopping at step {state.global_step} of {max_steps}: validation loss did not improve "
                     f"for {cfg.early_stopping_patience} evaluations; kept the best, step {best_step} "
                     f"(eval loss {state.best_metric:.4f})")
    res = TrainResult(
        output=str(output),
        method=cfg.method,
        global_step=state.global_step,
        epochs=float(state.epoch or 0.0),
        train_loss=float(result.training_loss) if result.training_loss is not None else None,
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        eval_loss=eval_metrics.get("eval_loss"),
        eval_perplexity=eval_metrics.get("eval_perplexity"),
        trainable_params=p.trainable_params,
        total_params=p.total_params,
        train_rows=p.train_split.rows,
        dropped_rows=p.train_split.dropped_no_target,
        targets_seen=trainer.targets_seen,
        skipped_empty_batches=trainer.skipped_empty_batches,
        runtime_s=round(runtime, 3),
        targets_per_s=round(trainer.targets_seen / runtime, 2) if runtime > 0 else 0.0,
        log_history=str(output / "trainer_state.json"),
        resumed_from=resume_from,
        tokens_seen=trainer.tokens_seen,
        tokens_per_s=round(trainer.tokens_seen / runtime, 2) if runtime > 0 else 0.0,
        best_step=best_step,
        best_eval_loss=state.best_metric if cfg.early_stopping_patience is not None else None,
        stopped_early=stopped_early,
        peak_memory=peak_memory(),
        memory_estimate_GiB=round(p.memory_estimate_bytes / 2**30, 3) if p.memory_estimate_bytes else None,
        notes=notes,
    )
    info = {
        "format": "sftdata-train/1",
        "base_model": identity["base_model"],
        "method": cfg.method,
        "precision": p.precision,
        "config": asdict(cfg),
        "learning_rate": p.learning_rate,
        "data_dir": str(data_dir.resolve()),
        "dataset_fingerprint": p.manifest.get("fingerprint"),
        "template": {k: (p.manifest.get("template") or {}).get(k)
                     for k in ("name", "sha256", "end_of_turn", "end_of_turn_ids")},
        "tokenizer": {"name_or_path": (p.manifest.get("tokenizer") or {}).get("name_or_path"),
                      "sha256": tokenizer_fingerprint(tok)},
        "result": res.to_dict(),
    }
    (output / TRAIN_INFO).write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")
    return res


def _final_eval(trainer, cfg: TrainConfig) -> dict[str, Any]:
    """Validation metrics of the model being saved: those of an evaluation at the last step when there was one
    (and no earlier best checkpoint was loaded back), else a new evaluation."""
    last = [h for h in trainer.state.log_history if "eval_loss" in h]
    if last and last[-1].get("step") == trainer.state.global_step and cfg.early_stopping_patience is None:
        return last[-1]
    return trainer.evaluate()


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
    with quiet_library_warnings():
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
    with quiet_library_warnings():
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
    with quiet_library_warnings():
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

    resumed = f" (resumed from {Path(result.resumed_from).name})" if result.resumed_from else ""
    rows = [
        ("method", result.method),
        ("steps", str(result.global_step) + resumed + (" (stopped early)" if result.stopped_early else "")),
        ("epochs", f(result.epochs, ".2f")),
        ("train loss (first → last logged)", f"{f(result.first_loss)} → {f(result.last_loss)}"),
        ("train loss (mean over run)", f(result.train_loss)),
        ("eval loss", f(result.eval_loss)),
        ("eval perplexity", f(result.eval_perplexity, ".3f")),
    ]
    if result.best_step is not None:
        rows.append(("best checkpoint (kept)", f"step {result.best_step}, eval loss {f(result.best_eval_loss)}"))
    rows += [
        ("trainable params", f"{result.trainable_params:,} of {result.total_params:,} "
                             f"({100 * result.trainable_params / max(result.total_params, 1):.3f}%)"),
        ("train rows", f"{result.train_rows:,}" + (f" ({result.dropped_rows} dropped: no trained token)"
                                                   if result.dropped_rows else "")),
        ("tokens (this run)", f"{result.tokens_seen:,} ({result.targets_seen:,} trained)"),
        ("throughput", f"{result.tokens_per_s:,.1f} tokens/s ({result.targets_per_s:,.1f} trained tokens/s)"),
        ("peak memory", _peak_text(result.peak_memory) + (f"; estimated {result.memory_estimate_GiB:.2f} GiB"
                                                            if result.memory_estimate_GiB else "")),
        ("runtime", f"{result.runtime_s:.1f} s"),
        ("saved to", result.output),
        ("loss history", result.log_history),
    ]
    if result.skipped_empty_batches:
        rows.append(("all-masked micro-batches skipped", str(result.skipped_empty_batches)))
    return rows


def _peak_text(peak: dict[str, Any]) -> str:
    if not peak:
        return "-"
    if "allocated_GiB" in peak:
        return (f"{peak['allocated_GiB']:.2f} GiB allocated, {peak['reserved_GiB']:.2f} GiB reserved "
                f"({peak['device']})")
    return f"{peak['rss_GiB']:.2f} GiB peak RSS (cpu, whole process)"
