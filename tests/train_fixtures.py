"""Helpers for the trainer tests: tiny Llama-architecture models and hand-written sftdata output directories.

The directories follow docs/ARCHITECTURE.md (Parquet shards + manifest.json) so that the trainer tests do not
depend on the build pipeline.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from conftest import shared_path as conftest_shared_path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

# The Llama-2 [INST] format as a chat template (system prompt omitted for brevity).
INST_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


shared_path = conftest_shared_path  # one definition: tests/conftest.py


def load_tokenizer(name: str = "mistral-7b-v0.1"):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(shared_path("tokenizers", name)))


def tiny_model_dir(path: Path, tokenizer=None, *, vocab_size: int | None = None, seed: int = 0,
                   save_tokenizer: bool = True) -> Path:
    """Save a tiny random Llama-architecture model (and the tokenizer) to ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = vocab_size or len(tokenizer)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=vocab, max_position_embeddings=2048,
                         bos_token_id=getattr(tokenizer, "bos_token_id", None),
                         eos_token_id=getattr(tokenizer, "eos_token_id", None))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(path))
    if tokenizer is not None and save_tokenizer:
        # copy the files as a real checkpoint ships them (a save_pretrained round trip can change a tokenizer)
        src = Path(tokenizer.name_or_path)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(src / name, path / name)
    return path


def encode_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Tokenize an [INST] conversation segment by segment; labels train the answers and their EOS."""
    ids = [tokenizer.bos_token_id]
    labels = [-100]
    for m in messages:
        if m["role"] == "user":
            part = tokenizer.encode(f"[INST] {m['content']} [/INST]", add_special_tokens=False)
            ids += part
            labels += [-100] * len(part)
        else:
            part = tokenizer.encode(f" {m['content']}", add_special_tokens=False) + [tokenizer.eos_token_id]
            ids += part
            labels += part
    return ids, labels


def tokenizer_block(tokenizer) -> dict:
    from sftdata.tokenizer import tokenizer_identity

    return tokenizer_identity(tokenizer)


def pack_rows(examples: list[tuple[list[int], list[int]]], per_row: int) -> list[dict]:
    rows = []
    for i in range(0, len(examples), per_row):
        chunk = examples[i:i + per_row]
        rows.append({
            "input_ids": [t for ids, _ in chunk for t in ids],
            "labels": [t for _, lab in chunk for t in lab],
            "position_ids": [p for ids, _ in chunk for p in range(len(ids))],
            "seq_lengths": [len(ids) for ids, _ in chunk],
        })
    return rows


def _table(rows: list[dict], packed: bool) -> pa.Table:
    cols = {
        "input_ids": pa.array([r["input_ids"] for r in rows], pa.list_(pa.int32())),
        "labels": pa.array([r["labels"] for r in rows], pa.list_(pa.int32())),
    }
    if packed:
        cols["position_ids"] = pa.array([r["position_ids"] for r in rows], pa.list_(pa.int32()))
        cols["seq_lengths"] = pa.array([r["seq_lengths"] for r in rows], pa.list_(pa.int32()))
    cols["num_tokens"] = pa.array([len(r["input_ids"]) for r in rows], pa.int32())
    cols["num_trained"] = pa.array([sum(x != -100 for x in r["labels"]) for r in rows], pa.int32())
    return pa.table(cols)


def write_output_dir(path: Path, tokenizer, train: list[tuple[list[int], list[int]]],
                     validation: list[tuple[list[int], list[int]]] | None = None, *, pack: int = 0,
                     template: str = INST_TEMPLATE, template_name: str = "llama2-test") -> Path:
    """Write an sftdata output directory: ``train-00000.parquet`` [+ ``validation-00000.parquet``] + manifest."""
    path.mkdir(parents=True, exist_ok=True)
    splits = {}
    for name, examples in (("train", train), ("validation", validation)):
        if not examples:
            continue
        rows = pack_rows(examples, pack) if pack else [{"input_ids": i, "labels": lab} for i, lab in examples]
        fname = f"{name}-00000.parquet"
        pq.write_table(_table(rows, bool(pack)), path / fname)
        splits[name] = {"rows": len(rows), "files": [fname]}
    manifest = {
        "format": "sftdata/1",
        "sftdata_version": "0.1.0",
        "labels": "unshifted: labels[i] is the target for input_ids[i]; the model shifts (Hugging Face convention)",
        "fingerprint": hashlib.sha256(repr((train, validation, template)).encode()).hexdigest(),
        "template": {"name": template_name, "text": template,
                     "sha256": hashlib.sha256(template.encode()).hexdigest(), "end_of_turn": tokenizer.eos_token},
        "tokenizer": tokenizer_block(tokenizer),
        "options": {"pack": bool(pack)},
        "splits": splits,
        "packing": {"rows_per_pack": pack} if pack else None,
    }
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return path


def gsm8k_examples(tokenizer, n: int, offset: int = 0, max_chars: int = 400) -> list[tuple[list[int], list[int]]]:
    """``n`` real GSM8K question/answer pairs as [INST] conversations."""
    out = []
    with open(shared_path("data", "gsm8k_train.jsonl"), encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i < offset:
                continue
            row = json.loads(line)
            msgs = [{"role": "user", "content": row["question"][:max_chars]},
                    {"role": "assistant", "content": row["answer"][:max_chars]}]
            out.append(encode_conversation(tokenizer, msgs))
            if len(out) == n:
                break
    return out
