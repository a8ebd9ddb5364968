"""Memory calculator: what ``sftdata train`` will allocate for full fine-tuning, LoRA and QLoRA.

Static memory (allocated once):

* **weights, as the trainer holds them** —
  QLoRA: the decoder's linear layers in NF4, 4 bits per weight plus block constants (Dettmers et al. 2023, §3):
  4.5 bits/param without double quantization (one fp32 absmax per 64 weights), **4.127** with it
  (8/64 + 32/(64·256)); every other parameter (embeddings, LM head, norms) in **fp32**, because
  ``peft.prepare_model_for_kbit_training`` casts every non-4-bit parameter to fp32 (+2.1 GB on Llama-3.1-8B
  against a 16-bit count). LoRA: the base in the compute dtype. Full: fp32 master weights.
* **adapters** in fp32 (peft keeps them in fp32 under 16-bit compute), **gradients** in the dtype of the trained
  parameters (fp32), and **optimizer states** for the trainer's default optimizer, ``paged_adamw_8bit``:
  bitsandbytes keeps the two Adam states in 8 bits with one fp32 absmax per 256-value block (2.03 bytes/param),
  but in 32 bits (8 bytes/param) for tensors under 4096 values. 32-bit AdamW: 8 bytes/param.

Dynamic memory (per micro-batch of ``N = batch_size × seq_len`` tokens), counted from what autograd saves in a
Hugging Face Llama decoder layer (transformers 5, SDPA attention):

* **activations** per layer and token — full fine-tuning: the layer input, two fp32 RMSNorm outputs, the two norm
  outputs the linears read, q/k/v/attention output (k and v at query width), the o_proj input, and four
  MLP-width tensors (gate, SiLU, up, product). (Q)LoRA on a frozen base: the layer input and the residual after
  attention, q/k/v/attention output, three MLP-width tensors, plus what the adapters read: the shared norm
  output (q/k/v, gate/up), the o_proj and down_proj inputs, and a rank-``r`` tensor per adapted module; with
  LoRA dropout each adapted module keeps its own dropped input and mask instead. The residual stream is fp32 when
  the embeddings are (QLoRA after k-bit preparation, full fine-tuning), else in the compute dtype. With gradient
  checkpointing only each layer's input is kept, and one layer is recomputed at a time in the backward pass.
  Packed micro-batches add the block-diagonal attention mask (``B·L²`` entries for ``[B, L]`` rows, ``(B·L)²`` when
  flattened).
* **logits**: ``N × vocab`` in the compute dtype, their fp32 copy in the loss and the fp32 log-softmax the loss
  saves; in the backward pass the log-softmax output, its gradient and the fp32 logits gradient live together:
  **12 bytes per logit** at the peak — for 8k tokens × 128k vocabulary that is 12.6 GB, often the largest item.

The peak is the static memory plus the largest of: the end of the forward pass (saved activations + logits +
autocast's 16-bit copies of the trained weights), the loss backward (saved activations + 12 bytes/logit), and,
with checkpointing, the recompute of one layer. Measured on CPU (fp32) against the trainer's peak RSS:
``bench/bench_memory.py``; the CUDA context (~0.5 GB) and allocator fragmentation come on top on a GPU, and
paged optimizer states live in CUDA unified memory outside ``torch.cuda.max_memory_allocated``.

No torch needed: a model is described by its ``config.json`` (a path, a dict or a transformers config), or by a
named size (:data:`PRESETS`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NF4_BITS = 4.0
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps 32-bit optimizer states for smaller tensors
BNB_BLOCK = 256  # 8-bit optimizer states: one fp32 absmax per 256 values and state
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
OPTIMIZERS_8BIT = ("paged_adamw_8bit", "adamw_8bit", "adamw_bnb_8bit", "paged_adam_8bit", "adam_8bit",
                   "paged_lion_8bit", "lion_8bit")
OPTIMIZERS_32BIT = ("adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_apex_fused", "paged_adamw_32bit",
                    "adamw_hf", "adamw")
OPTIMIZERS_NO_STATE = ("sgd",)

# Named sizes (Meta's published configurations).
PRESETS: dict[str, dict[str, Any]] = {
    "1B": {"name": "Llama-3.2-1B", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True},
    "3B": {"name": "Llama-3.2-3B", "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
           "num_attention_heads": 24, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True},
    "7B": {"name": "Llama-2-7B", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False},
    "8B": {"name": "Llama-3.1-8B", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False},
    "13B": {"name": "Llama-2-13B", "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
            "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000, "tie_word_embeddings": False},
    "70B": {"name": "Llama-3.1-70B", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
            "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False},
}


def nf4_bits_per_param(double_quant: bool = True, blocksize: int = 64) -> float:
    """Bits per quantized weight, block constants included (4.127 with double quantization, 4.5 without)."""
    if double_quant:
        return NF4_BITS + 8 / blocksize + 32 / (blocksize * 256)
    return NF4_BITS + 32 / blocksize


@dataclass(frozen=True)
class Architecture:
    """The shapes that decide parameter counts and activations of a Llama-style decoder."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    name: str = ""

    @classmethod
    def from_config(cls, config: Any) -> "Architecture":
        """From a ``config.json`` path / model directory, a dict, or a transformers ``PretrainedConfig``."""
        if isinstance(config, (str, Path)):
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise ValueError(f"{config}: no config.json (give a model directory or a config.json path)")
            config = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            config = config.to_dict()
        if "text_config" in config and "hidden_size" not in config:
            config = config["text_config"]
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "vocab_size") if k not in config]
        if missing:
            raise ValueError(f"not a Llama-style decoder config (missing {', '.join(missing)})")
        heads = int(config["num_attention_heads"])
        return cls(
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]),
            num_hidden_layers=int(config["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads") or heads),
            vocab_size=int(config["vocab_size"]),
            head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
            name=str(config.get("name") or config.get("_name_or_path") or ""),
        )

    @property
    def attention_width(self) -> int:
        return self.num_attention_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``(d_in, d_out)`` of each linear layer in one decoder block."""
        d, q, kv, i = self.hidden_size, self.attention_width, self.num_key_value_heads * self.head_dim, \
            self.intermediate_size
        return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
                "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}

    def linear_params(self) -> int:
        """Parameters in the decoder blocks' linear layers (what QLoRA quantizes), biases excluded."""
        return self.num_hidden_layers * sum(a * b for a, b in self.linear_shapes().values())

    def param_tensors(self) -> list[int]:
        """Sizes of every parameter tensor (for optimizers whose cost depends on the tensor size)."""
        shapes = self.linear_shapes()
        layer = [a * b for a, b in shapes.values()] + [self.hidden_size, self.hidden_size]
        if self.attention_bias:
            layer += [shapes[m][1] for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
        if self.mlp_bias:
            layer += [shapes[m][1] for m in ("gate_proj", "up_proj", "down_proj")]
        embed = self.vocab_size * self.hidden_size
        rest = [embed, self.hidden_size] + ([] if self.tie_word_embeddings else [embed])
        return layer * self.num_hidden_layers + rest

    def total_params(self) -> int:
        return sum(self.param_tensors())

    def targets(self, target_modules: Iterable[str] | str | None = "all-linear") -> list[str]:
        shapes = self.linear_shapes()
        if target_modules in ("all-linear", None):
            return list(shapes)
        targets = [t.strip() for t in target_modules.split(",")] if isinstance(target_modules, str) \
            else list(target_modules)
        unknown = [t for t in targets if t not in shapes]
        if unknown:
            raise ValueError(f"unknown target modules {unknown}; choose from {', '.join(shapes)} or all-linear")
        return targets

    def lora_tensors(self, r: int, target_modules: Iterable[str] | str = "all-linear") -> list[int]:
        """Sizes of the LoRA A (``r × d_in``) and B (``d_out × r``) matrices of every adapted layer."""
        shapes = self.linear_shapes()
        per_layer = [n for t in self.targets(target_modules) for n in (r * shapes[t][0], shapes[t][1] * r)]
        return per_layer * self.num_hidden_layers

    def lora_params(self, r: int, target_modules: Iterable[str] | str = "all-linear") -> int:
        """``r·(d_in + d_out)`` summed over the targeted linear layers of every block."""
        return sum(self.lora_tensors(r, target_modules))


@dataclass(frozen=True)
class Workload:
    """One micro-batch as the trainer runs it."""

    batch_size: int = 4  # rows per micro-batch
    seq_len: int = 2048  # tokens per row
    compute: str = "bf16"  # bf16 | fp16 | fp32
    device: str = "cuda"  # cuda (dropout masks are bool) | cpu (float masks)
    gradient_checkpointing: bool = True
    packed: bool = True  # rows hold several examples: a block-diagonal attention mask is built
    flatten: bool = False  # [1, B·L] (flash-attention varlen) instead of [B, L]

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len


@dataclass
class Estimate:
    """Bytes the trainer allocates, by item; ``peak_bytes`` = static items + the largest dynamic moment."""

    method: str
    params: int
    trainable_params: int
    weights_bytes: float
    adapter_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    activations_bytes: float  # saved for the backward pass at the end of the forward pass
    logits_bytes: float  # logits and loss tensors at their peak (12 bytes per logit, in the backward pass)
    peak_bytes: float
    peak_phase: str  # forward end | loss backward | layer recompute
    workload: dict[str, Any] = field(default_factory=dict)

    @property
    def static_bytes(self) -> float:
        return self.weights_bytes + self.adapter_bytes + self.grads_bytes + self.optimizer_bytes

    @property
    def total_bytes(self) -> float:
        return self.peak_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "static_bytes": self.static_bytes}


def optimizer_bytes(tensor_sizes: Iterable[int], optim: str) -> float:
    """Optimizer state bytes for trained tensors of the given sizes."""
    sizes = list(tensor_sizes)
    if optim in OPTIMIZERS_8BIT:
        small = sum(n for n in sizes if n < BNB_MIN_8BIT_SIZE)
        large = sum(n for n in sizes if n >= BNB_MIN_8BIT_SIZE)
        return small * 8.0 + large * (2.0 + 2 * 4.0 / BNB_BLOCK)
    if optim in OPTIMIZERS_32BIT:
        return sum(sizes) * 8.0
    if optim in OPTIMIZERS_NO_STATE:
        return 0.0
    known = OPTIMIZERS_8BIT + OPTIMIZERS_32BIT + OPTIMIZERS_NO_STATE
    raise ValueError(f"optimizer {optim!r} is not modelled; choose from {', '.join(known)}")


def _layer_activation_bytes(arch: Architecture, method: str, work: Workload, *, lora_r: int,
                            targets: list[str], lora_dropout: float) -> tuple[float, float]:
    """(bytes saved per token by one decoder layer, residual-stream bytes per element)."""
    a = DTYPE_BYTES[work.compute]
    resid = 4 if method in ("qlora", "full") else a
    mask = 1 if work.device == "cuda" else a  # dropout masks: bool on CUDA, the compute dtype on CPU
    h, q, i = arch.hidden_size, arch.attention_width, arch.intermediate_size
    lse = arch.num_attention_heads * 4  # SDPA's fp32 log-sum-exp
    if method == "full":
        return h * resid + 2 * h * 4 + 2 * h * a + 5 * q * a + 4 * i * a + lse, resid
    fixed = 2 * h * resid + 4 * q * a + 3 * i * a + lse
    inputs = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": q, "gate_proj": h, "up_proj": h, "down_proj": i}
    adapted = lora_r * a * len(targets)
    if lora_dropout > 0:
        adapted += sum(inputs[t] * (a + mask) for t in targets)
    else:  # the adapters read the tensors the layer already has; shared inputs count once
        groups = [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)]
        adapted += sum(inputs[g[0]] * a for g in groups if any(t in targets for t in g))
    return fixed + adapted, resid


def estimate(arch: Architecture, method: str, workload: Workload | None = None, *, lora_r: int = 16,
             target_modules: Iterable[str] | str = "all-linear", lora_dropout: float = 0.05,
             optim: str = "paged_adamw_8bit", double_quant: bool = True) -> Estimate:
    """What ``sftdata train --method METHOD`` allocates for ``arch`` on ``workload`` (see the module docstring)."""
    if method not in ("full", "lora", "qlora"):
        raise ValueError("method must be full, lora or qlora")
    work = workload or Workload()
    if work.compute not in DTYPE_BYTES:
        raise ValueError(f"compute must be one of {', '.join(DTYPE_BYTES)}")
    a = DTYPE_BYTES[work.compute]
    total = arch.total_params()
    targets = arch.targets(target_modules)
    lora_sizes = arch.lora_tensors(lora_r, targets) if method != "full" else []
    trainable = sum(lora_sizes) if method != "full" else total

    if method == "qlora":
        quantized = arch.linear_params()
        weights = quantized * nf4_bits_per_param(double_quant) / 8 + (total - quantized) * 4.0
    elif method == "lora":
        weights = total * float(a)
    else:
        weights = total * 4.0
    adapters = trainable * 4.0 if method != "full" else 0.0
    grads = trainable * 4.0
    opt = optimizer_bytes(lora_sizes if method != "full" else arch.param_tensors(), optim)

    n, v, h = work.tokens, arch.vocab_size, arch.hidden_size
    per_layer, resid = _layer_activation_bytes(arch, method, work, lora_r=lora_r, targets=targets,
                                               lora_dropout=lora_dropout)
    mask_entries = (n * n) if work.flatten else work.batch_size * work.seq_len ** 2
    shared = (mask_entries * (1 if work.device == "cuda" else a) if work.packed else 0) \
        + 2 * n * arch.head_dim * a  # the rotary cos/sin tables
    final_norm = n * h * (resid + (4 if method == "full" else 0))
    if work.gradient_checkpointing:
        saved = arch.num_hidden_layers * n * h * resid + shared + final_norm
    else:
        saved = arch.num_hidden_layers * n * per_layer + shared + final_norm
    logits_forward = n * v * (a + (4 if a < 4 else 0) + 4)  # logits, their fp32 copy, the saved log-softmax
    logits_backward = n * v * 12.0  # log-softmax output + its gradient + the fp32 logits gradient
    autocast_copies = trainable * a if a < 4 else 0  # 16-bit copies of the trained weights, alive in the forward
    phases = {
        "forward end": saved + logits_forward + autocast_copies,
        "loss backward": saved + logits_backward,
    }
    if work.gradient_checkpointing:
        phases["layer recompute"] = saved + n * per_layer + 3 * n * h * 4
    phase = max(phases, key=phases.get)
    static = weights + adapters + grads + opt
    return Estimate(method=method, params=total, trainable_params=trainable, weights_bytes=weights,
                    adapter_bytes=adapters, grads_bytes=grads, optimizer_bytes=opt, activations_bytes=saved,
                    logits_bytes=logits_backward, peak_bytes=static + phases[phase], peak_phase=phase,
                    workload=asdict(work))


def resolve_model(spec: Any) -> Architecture:
    """A named size (``8B``, see :data:`PRESETS`), a model directory / ``config.json``, a dict or a config."""
    if isinstance(spec, str) and spec.strip().upper() in PRESETS:
        return Architecture.from_config(PRESETS[spec.strip().upper()])
    if isinstance(spec, str) and not Path(spec).exists():
        raise ValueError(f"{spec!r} is neither a named size ({', '.join(PRESETS)}) nor a model directory or "
                         "config.json")
    return Architecture.from_config(spec)


def memory(model: Any = None, *, config: Any = None, workload: Workload | None = None, lora_r: int = 16,
           target_modules: Iterable[str] | str = "all-linear", lora_dropout: float = 0.05,
           optim: str = "paged_adamw_8bit", double_quant: bool = True) -> list[Estimate]:
    """Estimates for full fine-tuning, LoRA and QLoRA of ``model`` (a named size) or ``config`` (a model
    directory, config.json, dict or transformers config), in that order."""
    arch = resolve_model(config if config is not None else model)
    return [estimate(arch, method, workload, lora_r=lora_r, target_modules=target_modules,
                     lora_dropout=lora_dropout, optim=optim, double_quant=double_quant)
            for method in ("full", "lora", "qlora")]


def default_table(workload: Workload | None = None, **kwargs: Any) -> list[tuple[str, list[Estimate]]]:
    """Estimates for every named size."""
    return [(str(cfg["name"]), memory(config=cfg, workload=workload, **kwargs)) for cfg in PRESETS.values()]


def gb(n: float) -> str:
    return f"{n / 1e9:,.1f}"
