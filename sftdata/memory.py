"""Memory calculator for full fine-tuning, LoRA and QLoRA (weights + gradients + optimizer states).

The per-parameter costs follow the fine-tuning literature:

* **full fine-tuning, AdamW, mixed precision** — 16 bytes/param (ZeRO, Rajbhandari et al. 2020, §3.1): fp16/bf16
  weights (2) + fp16/bf16 gradients (2) + fp32 master weights, momentum and variance (4 + 4 + 4).
* **LoRA** — the frozen base in 16-bit (2 bytes/param); the adapters are trained like full fine-tuning
  (16 bytes per *trainable* parameter with AdamW: 2 weight + 2 gradient + 4 master + 8 states; 10 with 8-bit
  AdamW, whose two states take 1 byte each).
* **QLoRA** — the base's linear layers in NF4 (Dettmers et al. 2023, §3): 4 bits per weight plus the block
  constants: one fp32 absmax per 64 weights = 0.5 bit (4.5 bits/param) without double quantization; with double
  quantization the absmax values are themselves 8-bit with one fp32 constant per 256 blocks:
  8/64 + 32/(64·256) = 0.127 bit, i.e. **4.127 bits/param**. Embeddings, the LM head and norms stay in 16-bit
  (bitsandbytes / transformers do not quantize them).

A LoRA adapter of rank ``r`` on a ``d_in -> d_out`` linear layer has ``r·(d_in + d_out)`` parameters.

Activations, the CUDA context and allocator fragmentation are *not* included: they depend on batch size,
sequence length and activation checkpointing, and come on top of these figures.

No torch needed: a model is described by its ``config.json`` (a path, a dict or a transformers config).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NF4_BITS = 4.0
NF4_CONST_BITS = 32 / 64  # one fp32 absmax per 64-weight block
NF4_DQ_CONST_BITS = 8 / 64 + 32 / (64 * 256)  # 8-bit absmax per block + one fp32 per 256 blocks
OPTIMIZER_BYTES = {  # per trainable parameter: gradient + optimizer state + master weight copy
    "adamw": {"grad": 2, "state": 8, "master": 4},  # bf16 grad, fp32 m and v, fp32 master
    "adamw_8bit": {"grad": 2, "state": 2, "master": 4},  # 8-bit m and v
}

# Reference configurations for the table printed with no arguments (Meta's published configs).
PRESETS: dict[str, dict[str, Any]] = {
    "1B": {"name": "Llama-3.2-1B", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True},
    "7B": {"name": "Llama-2-7B", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False},
    "13B": {"name": "Llama-2-13B", "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
            "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000, "tie_word_embeddings": False},
    "70B": {"name": "Llama-2-70B", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
            "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False},
}


def nf4_bits_per_param(double_quant: bool = True, blocksize: int = 64) -> float:
    """Bits per quantized weight, block constants included (4.127 with double quantization, 4.5 without)."""
    if double_quant:
        return NF4_BITS + 8 / blocksize + 32 / (blocksize * 256)
    return NF4_BITS + 32 / blocksize


@dataclass(frozen=True)
class Architecture:
    """The shapes that decide parameter counts of a Llama-style decoder."""

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

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``(d_in, d_out)`` of each linear layer in one decoder block."""
        d, q, kv, i = self.hidden_size, self.num_attention_heads * self.head_dim, \
            self.num_key_value_heads * self.head_dim, self.intermediate_size
        return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
                "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}

    def linear_params(self) -> int:
        """Parameters in the decoder blocks' linear layers (what QLoRA quantizes), biases excluded."""
        return self.num_hidden_layers * sum(a * b for a, b in self.linear_shapes().values())

    def total_params(self) -> int:
        shapes = self.linear_shapes()
        bias = 0
        if self.attention_bias:
            bias += sum(shapes[m][1] for m in ("q_proj", "k_proj", "v_proj", "o_proj"))
        if self.mlp_bias:
            bias += sum(shapes[m][1] for m in ("gate_proj", "up_proj", "down_proj"))
        norms = 2 * self.hidden_size
        per_layer_rest = bias + norms
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return self.linear_params() + self.num_hidden_layers * per_layer_rest + embed + head + self.hidden_size

    def lora_params(self, r: int, target_modules: Iterable[str] | str = "all-linear") -> int:
        """``r·(d_in + d_out)`` summed over the targeted linear layers of every block."""
        shapes = self.linear_shapes()
        targets = list(shapes) if target_modules in ("all-linear", None) else (
            [t.strip() for t in target_modules.split(",")] if isinstance(target_modules, str) else list(target_modules))
        unknown = [t for t in targets if t not in shapes]
        if unknown:
            raise ValueError(f"unknown target modules {unknown}; choose from {', '.join(shapes)} or all-linear")
        return self.num_hidden_layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


@dataclass
class Estimate:
    method: str
    params: int
    trainable_params: int
    weights_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    total_bytes: float
    bytes_per_param: float  # total / params

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _estimate(method: str, params: int, trainable: int, weights: float, optim: str) -> Estimate:
    cost = OPTIMIZER_BYTES[optim]
    if method != "full":
        weights += trainable * 2.0  # the adapters' 16-bit working copy (full FT: the weights themselves)
    grads = trainable * cost["grad"]
    opt = trainable * (cost["state"] + cost["master"])
    total = weights + grads + opt
    return Estimate(method, params, trainable, weights, grads, opt, total, total / params)


def memory(
    params: int | float | None = None,
    *,
    config: Any = None,
    lora_r: int = 16,
    target_modules: Iterable[str] | str = "all-linear",
    optim: str = "adamw",
    double_quant: bool = True,
) -> list[Estimate]:
    """Estimate weights + gradients + optimizer memory for full fine-tuning, LoRA and QLoRA.

    Give ``config`` (a model directory / config.json / dict / transformers config) for exact parameter and LoRA
    counts, or ``params`` alone: then the LoRA count is scaled from the preset nearest in size, every parameter
    counts as quantizable for QLoRA except an estimated embedding/head share, and the estimate is approximate.
    """
    if optim not in OPTIMIZER_BYTES:
        raise ValueError(f"optim must be one of {', '.join(OPTIMIZER_BYTES)}")
    if config is not None:
        arch = Architecture.from_config(config)
        total = arch.total_params()
        quantized = arch.linear_params()
        lora = arch.lora_params(lora_r, target_modules)
    elif params is not None:
        total = int(params)
        ref = min((Architecture.from_config(c) for c in PRESETS.values()),
                  key=lambda a: abs(a.total_params() - total))
        share = total / ref.total_params()
        quantized = int(round(ref.linear_params() * share))
        lora = int(round(ref.lora_params(lora_r, target_modules) * share ** 0.5))  # LoRA grows with width, ~sqrt
    else:
        raise ValueError("give a parameter count or a model config")
    full = _estimate("full", total, total, 2.0 * total, optim)
    lora_est = _estimate("lora", total, lora, 2.0 * total, optim)
    nf4 = quantized * nf4_bits_per_param(double_quant) / 8 + (total - quantized) * 2.0
    qlora = _estimate("qlora", total, lora, nf4, optim)
    return [full, lora_est, qlora]


def parse_params(text: str) -> int:
    """``"7B"``, ``"1.5b"``, ``"350M"``, ``"7e9"`` or ``"7000000000"`` -> int."""
    t = text.strip().upper().replace("_", "").replace(",", "")
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}.get(t[-1:], None)
    try:
        return int(round(float(t[:-1]) * scale)) if scale else int(float(t))
    except ValueError:
        raise ValueError(f"cannot read a parameter count from {text!r} (try 7B, 350M, 7e9)") from None


def default_table(lora_r: int = 16, target_modules: Iterable[str] | str = "all-linear", optim: str = "adamw",
                  double_quant: bool = True) -> list[tuple[str, list[Estimate]]]:
    """Estimates for the 1B/7B/13B/70B reference configurations."""
    return [(str(cfg["name"]), memory(config=cfg, lora_r=lora_r, target_modules=target_modules,
                                                optim=optim, double_quant=double_quant))
            for size, cfg in PRESETS.items()]


def gb(n: float) -> str:
    return f"{n / 1e9:,.1f}"
