"""Export: a trained adapter (or a merged / fully fine-tuned model) as something a server loads, with the training
template, stopping at every end-of-turn id, and checked by loading it back.

* ``hf``: a merged safetensors directory for vLLM / TGI / transformers. An adapter is merged into the **original
  16-bit base** (what a server that applies the adapter at run time computes); only when the base itself is a
  pre-quantized 4-bit checkpoint is it dequantized first (``sftdata.train.merge``). The directory carries the exact
  training template (``chat_template.jinja``), ``generation_config.json`` whose ``eos_token_id`` lists every
  end-of-turn id, the adapter itself under ``adapter/`` with an absolute ``base_model_name_or_path``, and a
  ``README.md`` with the vLLM command lines (merged, and multi-LoRA after checking that vLLM accepts the adapter).
* ``gguf``: one GGUF file for llama.cpp and Ollama (``f16``, ``q8_0``, ``q4_0``, ``q4_k_m``) with the template as
  ``tokenizer.chat_template`` and the end-of-turn ids, plus an Ollama ``Modelfile`` whose ``TEMPLATE`` renders what the
  training template renders (:mod:`sftdata.ollama`).

Validation loads what was written and generates greedily from a prompt rendered with the training template: the
merged model must give the adapter's greedy tokens; the GGUF, run by llama.cpp (llama-cpp-python), is compared with
transformers on the merged model (greedy tokens, top-1 agreement and logit error per position).
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

FORMATS = ("hf", "gguf")
QUANTS = ("f16", "q8_0", "q4_0", "q4_k_m")
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks
VLLM_LORA_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
GGUF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json")
SAMPLE_MESSAGES = [{"role": "user", "content": "Write one sentence about the sea."}]
GGUF_INSTALL_HINT = "pip install 'sftdata[export]'  (the gguf package and llama-cpp-python, which builds llama.cpp)"


class ExportError(Exception):
    """A problem that stops the export, with a message meant for the user."""


from sftdata.train import generation_eos_ids  # noqa: E402  (torch: export needs the train extra anyway)


# --------------------------------------------------------------------------------------------------------------
# What is being exported
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Source:
    path: Path
    kind: str  # adapter | model
    base: str | None
    method: str | None
    manifest: dict[str, Any]
    template: str | None
    tokenizer: Any
    notes: list[str] = field(default_factory=list)


def read_source(path: str | Path, base: str | None = None) -> Source:
    """Classify ``path`` (adapter or full model), find its base, the training manifest and the training template."""
    from transformers import AutoTokenizer

    from sftdata.templates import ChatTemplate, special_token_variables

    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"{path} is not a directory (give an `sftdata train` output or a model directory)")
    kind = "adapter" if (path / "adapter_config.json").is_file() else "model"
    if kind == "model" and not (path / "config.json").is_file():
        raise ExportError(f"{path} has neither adapter_config.json nor config.json")
    info = json.loads((path / "sftdata_train.json").read_text(encoding="utf-8")) \
        if (path / "sftdata_train.json").is_file() else {}
    notes: list[str] = []
    if kind == "adapter":
        adapter_cfg = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        base = base or info.get("base_model") or adapter_cfg.get("base_model_name_or_path")
        if not base:
            raise ExportError(f"{path}: no base model recorded; pass --base")
    manifest: dict[str, Any] = {}
    data_dir = info.get("data_dir")
    if data_dir and (Path(data_dir) / "manifest.json").is_file():
        manifest = json.loads((Path(data_dir) / "manifest.json").read_text(encoding="utf-8"))
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ExportError(f"{path} has no loadable tokenizer: {str(e).splitlines()[0]}") from None
    saved = tok.chat_template if isinstance(tok.chat_template, str) else None
    template = (manifest.get("template") or {}).get("text") or saved
    if saved and template != saved:
        notes.append("the directory's chat_template differs from the build's template; the build's is exported")
    if not manifest:
        notes.append("the training manifest was not found (sftdata_train.json data_dir); end-of-turn ids come from "
                     "the saved template")
        manifest = {"template": {"text": template}}
        if template:
            try:
                manifest["template"]["end_of_turn"] = ChatTemplate("saved", template,
                                                                   special_token_variables(tok)).end_of_turn
            except Exception:
                pass
    if not template:
        notes.append("no chat template (raw-text training): the export carries none")
    return Source(path, kind, base, info.get("method"), manifest, template, tok, notes)


def end_markers(source: Source) -> list[str]:
    """The text of every end-of-turn token (Ollama stop strings, README)."""
    return [source.tokenizer.convert_ids_to_tokens(i) for i in generation_eos_ids(source.manifest, source.tokenizer)]


# --------------------------------------------------------------------------------------------------------------
# HF
# --------------------------------------------------------------------------------------------------------------


def _torch_dtype(name: str | None):
    import torch

    if isinstance(name, torch.dtype):
        return name
    return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
            "fp16": torch.float16, "float16": torch.float16}.get(name or "float32", torch.float32)


def is_prequantized(base: str) -> bool:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot load the base model {base!r}: {str(e).splitlines()[0]}; pass --base") from None
    return getattr(config, "quantization_config", None) is not None


def merge_into_base(adapter_dir: Path, base: str, dtype: str = "auto"):
    """``base`` (its original weights, in fp32) + the adapter, merged; returned in the base checkpoint's dtype."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    except OSError as e:
        raise ExportError(f"cannot load the base model {base!r}: {str(e).splitlines()[0]}; pass --base") from None
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    target = _torch_dtype(getattr(AutoConfig.from_pretrained(base), "dtype", None) if dtype == "auto" else dtype)
    return merged.to(target)


def write_tokenizer(source: Source, output: Path) -> None:
    """The source's tokenizer files, copied (a save/load round trip can change a tokenizer), and the training
    template as ``chat_template.jinja`` (and nowhere else, so nothing overrides it)."""
    for name in TOKENIZER_FILES:
        if (source.path / name).is_file():
            shutil.copyfile(source.path / name, output / name)
    cfg_path = output / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        if cfg.pop("chat_template", None) is not None:
            cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (output / "chat_template.json").unlink(missing_ok=True)
    if source.template:
        (output / "chat_template.jinja").write_text(source.template, encoding="utf-8")


def write_generation_config(source: Source, output: Path) -> list[int]:
    from transformers import GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(str(output))
    except OSError:
        try:
            gen = GenerationConfig.from_pretrained(str(source.path))
        except OSError:
            gen = GenerationConfig()
    eos = generation_eos_ids(source.manifest, source.tokenizer)
    if eos:
        gen.eos_token_id = eos if len(eos) > 1 else eos[0]
    if source.tokenizer.pad_token_id is not None:
        gen.pad_token_id = source.tokenizer.pad_token_id
    if source.tokenizer.bos_token_id is not None:
        gen.bos_token_id = source.tokenizer.bos_token_id
    gen.save_pretrained(str(output))
    return eos


def vllm_adapter_check(adapter_dir: Path) -> dict[str, Any]:
    """Whether vLLM's multi-LoRA serving accepts this adapter, and the ``--max-lora-rank`` it needs."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    problems = []
    rank = int(cfg.get("r", 0))
    ranks = [r for r in VLLM_MAX_LORA_RANKS if r >= rank]
    if not ranks:
        problems.append(f"rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})")
    modules = cfg.get("target_modules") or []
    # vLLM matches each adapted module by its last name component (peft may record full paths)
    modules = sorted({m.split(".")[-1] for m in ([] if isinstance(modules, str) else modules)})
    unsupported = sorted(set(modules) - VLLM_LORA_MODULES)
    if unsupported:
        problems.append(f"target modules {unsupported} are not LoRA layers vLLM serves "
                        f"(it serves {', '.join(sorted(VLLM_LORA_MODULES))})")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save {cfg['modules_to_save']} (vLLM requires none)")
    if cfg.get("use_dora"):
        problems.append("DoRA (vLLM does not serve DoRA adapters)")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias={cfg['bias']!r} (vLLM serves bias-free adapters)")
    return {"rank": rank, "max_lora_rank": ranks[0] if ranks else None, "target_modules": modules,
            "accepted": not problems, "problems": problems}


def vllm_readme(output: Path, source: Source, eos: list[int], check: dict[str, Any] | None, name: str) -> str:
    out = output.resolve()
    markers = ", ".join(f"`{m}` ({i})" for m, i in zip(end_markers(source), eos))
    lines = [f"# {name} — exported by `sftdata export --format hf`", "",
             "This directory is a merged model: load it like any Hugging Face checkpoint. Its `chat_template.jinja` is "
             "the exact template the training data was rendered with, and `generation_config.json` stops generation "
             f"at every end-of-turn token: {markers or 'none recorded'}.", "", "## Serve the merged model with vLLM",
             "", "```bash", f"vllm serve {out} --served-model-name {name}", "```", "",
             "vLLM reads `chat_template.jinja` and the stop ids of `generation_config.json` from the directory "
             "(`--generation-config auto`, the default).", ""]
    if check is not None:
        adapter = out / "adapter"
        lines += ["## Serve the adapter on a shared base (multi-LoRA)", ""]
        if check["accepted"]:
            lines += ["```bash", f"vllm serve {source.base} --enable-lora --max-lora-rank {check['max_lora_rank']} "
                      f"--lora-modules {name}={adapter} --chat-template {out / 'chat_template.jinja'} "
                      f"--generation-config {out}", "```", "",
                      f"Requests name the adapter as the model (`\"model\": \"{name}\"`). `--chat-template` and "
                      "`--generation-config` matter here: the base's own template and stop ids are not the training "
                      f"ones. The adapter has rank {check['rank']} on {', '.join(check['target_modules']) or '—'}.", ""]
        else:
            lines += ["vLLM would refuse this adapter: " + "; ".join(check["problems"]) + ". Serve the merged model "
                      "above instead.", ""]
    return "\n".join(lines)


def export_hf(source: Source, output: Path, *, dtype: str = "auto", readme: bool = True,
              name: str | None = None) -> dict[str, Any]:
    """Write the merged HF directory; return what was done (merge path, eos ids, vLLM check)."""
    output.mkdir(parents=True, exist_ok=True)
    name = name or source.path.resolve().name
    result: dict[str, Any] = {"format": "hf", "output": str(output)}
    check = None
    if source.kind == "adapter":
        if is_prequantized(source.base):
            from sftdata.train import merge

            merge(source.path, output, base_model=source.base, dtype="fp32" if dtype == "auto" else dtype)
            result["merged_into"] = "dequantized 4-bit base (the base checkpoint is pre-quantized)"
        else:
            merged = merge_into_base(source.path, source.base, dtype)
            merged.save_pretrained(str(output))
            result["merged_into"] = "original 16-bit base"
        result["base"] = source.base
        adapter_out = output / "adapter"
        adapter_out.mkdir(exist_ok=True)
        for f in source.path.iterdir():
            if f.is_file() and (f.name.startswith("adapter_") or f.name in TOKENIZER_FILES):
                shutil.copyfile(f, adapter_out / f.name)
        cfg = json.loads((adapter_out / "adapter_config.json").read_text(encoding="utf-8"))
        base_path = Path(source.base)
        cfg["base_model_name_or_path"] = str(base_path.resolve()) if base_path.exists() else source.base
        (adapter_out / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        if source.template:
            (adapter_out / "chat_template.jinja").write_text(source.template, encoding="utf-8")
        check = vllm_adapter_check(adapter_out)
        result["vllm_adapter"] = check
    else:
        for f in source.path.iterdir():
            if f.is_file() and (f.name in MODEL_FILES or (f.name.startswith("model-") and f.suffix == ".safetensors")):
                shutil.copyfile(f, output / f.name)
        result["merged_into"] = None
    write_tokenizer(source, output)
    result["eos_token_ids"] = write_generation_config(source, output)
    if readme:
        text = vllm_readme(output, source, result["eos_token_ids"], check, name)
        (output / "README.md").write_text(text, encoding="utf-8")
    return result


# --------------------------------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------------------------------

# Why a small re-implementation: llama.cpp's convert_hf_to_gguf.py (the maintained converter) is not published as
# an importable package. What follows is its Llama path only — hyper-parameters, the Q/K row permutation, llama3
# rope factors, the vocabulary (Llama-2/Mistral SentencePiece-style and Llama-3 byte-level BPE) and tensor types —
# written on top of the `gguf` package (llama.cpp's own gguf-py: writer, tensor-name map, vocab readers, Q8_0).
# Other architectures are refused with the llama.cpp command to run on the merged directory. q4_0 / q4_k_m are made
# by llama.cpp's own quantizer (llama_model_quantize) from the f16 file, as `llama-quantize` does.

# sha256 of the ids of llama.cpp's pre-tokenizer probe text, for the byte-level BPE vocabularies of the Llama
# architecture (convert_hf_to_gguf.py get_vocab_base_pre): Meta-Llama-3 → "llama-bpe".
_BPE_PRE = {"0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe"}
_PRE_PROBE = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
              '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
              '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
              '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
_LLAMA_FTYPE = {"q4_0": 2, "q4_k_m": 15}  # llama.h LLAMA_FTYPE_MOSTLY_Q4_0, LLAMA_FTYPE_MOSTLY_Q4_K_M


def require_gguf():
    try:
        import gguf
    except ImportError:
        raise ExportError(f"--format gguf needs the gguf package: {GGUF_INSTALL_HINT}") from None
    return gguf


def require_llama_cpp(why: str):
    try:
        import llama_cpp
    except ImportError:
        raise ExportError(f"{why} needs llama.cpp through llama-cpp-python: {GGUF_INSTALL_HINT}") from None
    return llama_cpp


def _permute_qk(w, n_head: int):
    """HF stores q/k rows for rotate-half RoPE; llama.cpp expects them interleaved per head (convert_hf_to_gguf)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_factors(params: dict[str, Any], head_dim: int, theta: float):
    import numpy as np

    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old = params.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _write_vocab(gguf, writer, model_dir: Path, vocab_size: int) -> bool:
    """Tokens, scores/types and merges; returns True for byte-level BPE (merges written)."""
    from transformers import AutoTokenizer

    model = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    if model.get("type") == "BPE" and model.get("byte_fallback"):  # Llama-2 / Mistral SentencePiece-style
        tokens, scores, types = zip(*gguf.LlamaHfVocab(model_dir).all_tokens())
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(list(tokens))
        writer.add_token_scores(list(scores))
        writer.add_token_types(list(types))
        return False
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    digest = sha256(str(tok.encode(_PRE_PROBE)).encode()).hexdigest()
    if model.get("type") != "BPE" or digest not in _BPE_PRE:
        raise ExportError("this tokenizer is not one sftdata converts to GGUF (Llama-2/Mistral SentencePiece-style, "
                          "Llama-3 BPE); run llama.cpp's convert_hf_to_gguf.py on the `--format hf` export")
    reverse = {i: t for t, i in tok.vocab.items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_BPE_PRE[digest])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    return True


def gguf_tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type a GGUF file holds."""
    gguf = require_gguf()
    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))


def tokenizer_pieces(model_dir: Path, ids: list[int]) -> list[str]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir)).convert_ids_to_tokens(ids) if ids else []


def write_gguf(model_dir: Path, path: Path, quant: str, *, template: str | None, eos_ids: list[int],
               name: str) -> None:
    """Convert a Llama-architecture HF directory to GGUF (``f16`` or ``q8_0``)."""
    import numpy as np
    from safetensors import safe_open

    gguf = require_gguf()
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in GGUF_ARCHITECTURES:
        raise ExportError(f"{arch}: sftdata writes GGUF for {', '.join(GGUF_ARCHITECTURES)}; for this architecture "
                          f"run llama.cpp's `python convert_hf_to_gguf.py {model_dir} --outtype {quant}` on the "
                          "`--format hf` export")
    n_layer, n_head = config["num_hidden_layers"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    hidden, vocab_size = config["hidden_size"], config["vocab_size"]
    head_dim = config.get("head_dim") or hidden // n_head
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise ExportError(f"rope type {rope_type!r} is not converted here; run llama.cpp's convert_hf_to_gguf.py")
    if config.get("sliding_window"):
        raise ExportError("sliding-window attention is not converted here; run llama.cpp's convert_hf_to_gguf.py")

    qtype = gguf.GGMLQuantizationType.Q8_0 if quant == "q8_0" else gguf.GGMLQuantizationType.F16
    ftype = gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else gguf.LlamaFileType.MOSTLY_F16
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA], use_temp_file=True)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(n_layer)
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-5))
    writer.add_vocab_size(vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if config.get("head_dim"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    bpe = _write_vocab(gguf, writer, model_dir, vocab_size)
    special = gguf.SpecialVocab(model_dir, load_merges=bpe, n_vocab=vocab_size)
    special.chat_template = template
    special.add_to_gguf(writer, quiet=True)
    # llama.cpp stops at eos, eot and eom (and at tokens it recognizes by text): <|eom_id|> is the eom token, the
    # first other end-of-turn id that is not the eos is the eot token.
    pieces = {i: t for i, t in zip(eos_ids, tokenizer_pieces(model_dir, eos_ids))}
    others = [i for i in eos_ids if i != special.special_token_ids.get("eos")]
    eom = [i for i in others if pieces.get(i) == "<|eom_id|>"]
    eot = [i for i in others if i not in eom]
    if eot:
        writer.add_eot_token_id(eot[0])
    if eom:
        writer.add_eom_token_id(eom[0])

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)

    def add(new_name: str, data) -> None:
        t = gguf.GGMLQuantizationType.F32 if data.ndim <= 1 or new_name.endswith("_norm.weight") else qtype
        if t == gguf.GGMLQuantizationType.F32:
            out = data.astype(np.float32)
        elif t == gguf.GGMLQuantizationType.F16:
            out = data.astype(np.float16)
        else:
            try:
                out = gguf.quants.quantize(data.astype(np.float32), t)
            except gguf.QuantError:  # a row length the block size does not divide: keep it f16, as llama.cpp does
                t, out = gguf.GGMLQuantizationType.F16, data.astype(np.float16)
        writer.add_tensor(new_name, out, raw_dtype=t if out.dtype == np.uint8 else None)

    if rope_type == "llama3":
        add(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", _llama3_rope_factors(rope, head_dim, theta))
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{model_dir} has no .safetensors weights")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key.endswith(".rotary_emb.inv_freq"):
                    continue
                data = f.get_tensor(key).float()
                if key.endswith("q_proj.weight"):
                    data = _permute_qk(data, n_head)
                elif key.endswith("k_proj.weight"):
                    data = _permute_qk(data, n_kv)
                new_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if new_name is None:
                    raise ExportError(f"{file.name}: tensor {key} has no GGUF name for the Llama architecture")
                add(new_name, data.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize_gguf(src: Path, dst: Path, quant: str) -> None:
    """``llama-quantize src dst Q4_0|Q4_K_M`` through llama.cpp's library."""
    llama_cpp = require_llama_cpp(f"--quant {quant}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _LLAMA_FTYPE[quant]
    params.nthread = os.cpu_count() or 1
    # llama.cpp logs every tensor to stderr (fd 2, from C): keep it for the error message instead of the terminal
    with tempfile.TemporaryFile() as log:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        tail = log.read().decode("utf-8", "replace").strip().splitlines()[-3:]
    if rc != 0 or not dst.is_file():
        raise ExportError(f"llama.cpp could not quantize {src.name} to {quant} (return code {rc}): {' | '.join(tail)}")


def export_gguf(source: Source, output: Path, quant: str, *, hf_dir: Path, eos_ids: list[int],
                name: str) -> dict[str, Any]:
    """Write ``OUTPUT/<name>-<quant>.gguf`` from the merged ``hf_dir`` and ``OUTPUT/Modelfile``."""
    gguf_path = output / f"{name}-{quant}.gguf"
    result: dict[str, Any] = {"format": "gguf", "quant": quant, "output": str(output), "gguf": str(gguf_path)}
    if quant in _LLAMA_FTYPE:
        f16 = hf_dir.parent / "f16.gguf"
        write_gguf(hf_dir, f16, "f16", template=source.template, eos_ids=eos_ids, name=name)
        quantize_gguf(f16, gguf_path, quant)
        result["f16_bytes"] = f16.stat().st_size
        f16.unlink()
    else:
        write_gguf(hf_dir, gguf_path, quant, template=source.template, eos_ids=eos_ids, name=name)
    result["tensor_types"] = gguf_tensor_types(gguf_path)
    result["bytes"] = gguf_path.stat().st_size
    result["eos_token_ids"] = eos_ids
    result["stop"] = end_markers(source)
    result["modelfile"] = str(write_modelfile(source, output, gguf_path.name, result))
    return result


def write_modelfile(source: Source, output: Path, gguf_name: str, result: dict[str, Any]) -> Path:
    """``OUTPUT/Modelfile`` with the Ollama TEMPLATE that renders like the training template (sftdata.ollama)."""
    from sftdata.ollama import choose_template, modelfile
    from sftdata.templates import special_token_variables

    tok = source.tokenizer
    template = source.manifest.get("template") or {}
    # the GGUF's add_bos_token comes from the same tokenizer files: llama.cpp adds BOS exactly when transformers does
    adds_bos = tok.bos_token_id is not None and tok("x")["input_ids"][:1] == [tok.bos_token_id]
    choice = choose_template(source.template, special_token_variables(tok), prefer=template.get("name"),
                             adds_bos=adds_bos)
    result["ollama_template"] = choice.to_dict() if choice else None
    kwargs = (source.manifest.get("options") or {}).get("template_kwargs")
    path = output / "Modelfile"
    path.write_text(modelfile(gguf_name, choice, result["stop"], template.get("name"), kwargs), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------


def sample_prompt(source: Source) -> tuple[str, list[int]]:
    """A prompt rendered with the training template and its generation prompt (ids as a server tokenizes it)."""
    from sftdata.templates import ChatTemplate, special_token_variables

    tok = source.tokenizer
    if source.template:
        text = ChatTemplate("training", source.template, special_token_variables(tok)).render(
            SAMPLE_MESSAGES, add_generation_prompt=True)
    else:
        text = (tok.bos_token or "") + SAMPLE_MESSAGES[0]["content"]
    return text, tok(text, add_special_tokens=False)["input_ids"]


def greedy(model: Any, ids: list[int], eos: list[int], n: int) -> tuple[list[int], Any]:
    """Greedy continuation (stops at an end-of-turn id) and the fp32 logits over the prompt positions."""
    import torch

    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=x, use_cache=False).logits[0].float()
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                             eos_token_id=eos or None, pad_token_id=eos[0] if eos else 0)
    return out[0, len(ids):].tolist(), logits


def validate_hf(source: Source, output: Path, max_new_tokens: int = 16) -> dict[str, Any]:
    """The merged directory, reloaded, must generate the adapter's greedy tokens (adapter on the same base)."""
    import torch
    from transformers import AutoModelForCausalLM

    text, ids = sample_prompt(source)
    eos = generation_eos_ids(source.manifest, source.tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(str(output), dtype=torch.float32).eval()
    got, got_logits = greedy(merged, ids, eos, max_new_tokens)
    del merged
    res: dict[str, Any] = {"prompt": text, "tokens": got}
    if source.kind == "adapter":
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(source.base, dtype=torch.float32)
        ref = PeftModel.from_pretrained(base, str(source.path)).eval()
        res["reference"] = "the adapter applied at run time to the same base"
    else:
        ref = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=torch.float32).eval()
        res["reference"] = "the source model"
    want, want_logits = greedy(ref, ids, eos, max_new_tokens)
    del ref  # one model in memory at a time
    res["reference_tokens"] = want
    res["same_greedy_tokens"] = got == want
    res["max_abs_logit_diff"] = float((got_logits - want_logits).abs().max())
    if source.kind == "adapter" and source.method == "qlora":
        from sftdata.train import load_adapter_model

        trained = load_adapter_model(source.path, base_model=source.base).eval()
        with torch.no_grad():
            nf4 = trained(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
        res["nf4_training_model_max_abs_logit_diff"] = float((got_logits - nf4).abs().max())
    res["ok"] = res["same_greedy_tokens"]
    return res


def validate_gguf(gguf_path: Path, hf_dir: Path, source: Source, max_new_tokens: int = 16) -> dict[str, Any]:
    """Run the GGUF in llama.cpp and compare with transformers on the merged model: prompt tokenization, greedy
    tokens, top-1 agreement over the prompt positions and the logit error relative to the logits' RMS."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    llama_cpp = require_llama_cpp("GGUF validation")
    text, ids = sample_prompt(source)
    eos = generation_eos_ids(source.manifest, source.tokenizer)
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    want, hf_logits = greedy(hf, ids, eos, max_new_tokens)
    del hf
    hf_logits = hf_logits.numpy()
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=max(64, len(ids) + max_new_tokens + 8), logits_all=True,
                          verbose=False, n_threads=os.cpu_count() or 1, seed=0)
    tokenized = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    llm.eval(ids)
    cpp_logits = np.array(llm.scores[:len(ids)], dtype=np.float32)
    got: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        got.append(nxt)
        if nxt in eos:
            break
        llm.eval([nxt])
    del llm
    diff = cpp_logits - hf_logits
    rms = float(np.sqrt(np.mean(hf_logits.astype(np.float64) ** 2)))
    res = {"prompt": text, "runtime": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})",
           "same_prompt_tokens": list(tokenized) == list(ids), "tokens": got, "transformers_tokens": want,
           "same_greedy_tokens": got == want,
           "top1_agreement": float(np.mean(cpp_logits.argmax(-1) == hf_logits.argmax(-1))),
           "max_abs_logit_diff": float(np.abs(diff).max()),
           "relative_logit_rmse": float(np.sqrt(np.mean(diff.astype(np.float64) ** 2)) / rms) if rms else 0.0}
    return res


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------


def export(source: str | Path, output: str | Path, *, format: str = "hf", quant: str = "f16",
           base: str | None = None, dtype: str = "auto", validate: bool = True,
           name: str | None = None) -> dict[str, Any]:
    """Export ``source`` (an ``sftdata train`` output or a model directory) to ``output``; see the module docstring.

    Returns a summary dict (also written to ``OUTPUT/sftdata_export.json``) with ``validation`` when ``validate``.
    """
    from sftdata.train import require_train_deps

    if format not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, not {format!r}")
    if format == "gguf" and quant not in QUANTS:
        raise ExportError(f"--quant must be one of {', '.join(QUANTS)}, not {quant!r}")
    require_train_deps("lora")
    src = read_source(source, base)
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        if not (output / "sftdata_export.json").is_file():
            raise ExportError(f"{output} exists and is not an sftdata export; choose an empty or new directory")
        shutil.rmtree(output)  # an earlier export of ours: start clean so no stale file is served
    name = name or src.path.resolve().name
    if format == "hf":
        result = export_hf(src, output, dtype=dtype, name=name)
        if validate:
            result["validation"] = validate_hf(src, output)
    else:
        require_gguf()
        if quant in _LLAMA_FTYPE or validate:
            require_llama_cpp(f"--quant {quant}" if quant in _LLAMA_FTYPE else "GGUF validation (--no-validate skips it)")
        output.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".sftdata-export-", dir=output) as tmp:
            hf_dir = Path(tmp) / "hf"
            merged = export_hf(src, hf_dir, dtype=dtype, readme=False, name=name)
            result = export_gguf(src, output, quant, hf_dir=hf_dir, eos_ids=merged["eos_token_ids"], name=name)
            result["merged_into"] = merged.get("merged_into")
            if validate:
                result["validation"] = validate_gguf(Path(result["gguf"]), hf_dir, src)
                result["validation"]["ok"] = result["validation"]["same_prompt_tokens"] and (
                    quant not in ("f16",) or result["validation"]["same_greedy_tokens"])
    result["notes"] = src.notes
    result["source"] = str(src.path)
    (output / "sftdata_export.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n",
                                                encoding="utf-8")
    return result
