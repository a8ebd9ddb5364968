"""Tokenizer loading (local directory, hub id, or a bundled default) and tokenizer identity.

The bundled defaults let ``sftdata build raw.jsonl --template chatml`` work offline on a fresh install:

* ``qwen3`` (Qwen3's 151,669-token byte-level BPE, Apache-2.0) — the default for ChatML and other templates;
* ``mistral-7b-v0.1`` (Mistral-7B v0.1's 32,000-token Llama-family SentencePiece BPE, Apache-2.0) — the default
  for ``llama2`` and ``alpaca``.

They ship gzip-compressed inside the package and are unpacked once into ``~/.cache/sftdata/tokenizers``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

from sftdata.record import DataError

BUNDLED = ("qwen3", "mistral-7b-v0.1")
DEFAULT_FOR_TEMPLATE = {"llama2": "mistral-7b-v0.1", "alpaca": "mistral-7b-v0.1"}
DEFAULT_TOKENIZER = "qwen3"


def default_tokenizer_for(template: str) -> str:
    """The bundled tokenizer used when ``--tokenizer`` is not given."""
    return DEFAULT_FOR_TEMPLATE.get(template, DEFAULT_TOKENIZER)


def _cache_dir() -> Path:
    root = os.environ.get("SFTDATA_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "sftdata")
    return Path(root) / "tokenizers"


def bundled_tokenizer_path(name: str) -> Path:
    """Unpack bundled tokenizer ``name`` (once) and return its directory."""
    assets = resources.files("sftdata") / "assets" / "tokenizers" / name
    packed = assets / "tokenizer.json.gz"
    if not packed.is_file():
        raise DataError(f"no bundled tokenizer {name!r}; bundled: {', '.join(BUNDLED)}")
    data = packed.read_bytes()
    digest = hashlib.sha256(data).hexdigest()[:16]
    target = _cache_dir() / f"{name}-{digest}"
    if not (target / "tokenizer.json").is_file():
        tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "tokenizer.json").write_bytes(gzip.decompress(data))
        (tmp / "tokenizer_config.json").write_bytes((assets / "tokenizer_config.json").read_bytes())
        try:
            tmp.rename(target)
        except OSError:  # another process unpacked it first
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_tokenizer(spec: str | None, *, template: str = "chatml") -> Any:
    """Load a fast tokenizer from a local directory, a hub id, or a bundled name (``None`` = the default).

    Only fast (Rust) tokenizers are accepted: sftdata needs character offsets to place label boundaries.
    """
    from transformers import AutoTokenizer

    name = spec or default_tokenizer_for(template)
    if name in BUNDLED and not Path(name).exists():
        path = bundled_tokenizer_path(name)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        tokenizer.sftdata_name = f"{name} (bundled)"
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
        except OSError as e:
            raise DataError(
                f"cannot load tokenizer {name!r}: {str(e).splitlines()[0]} — pass a local directory holding "
                f"tokenizer.json, a hub id (needs network), or a bundled name ({', '.join(BUNDLED)})"
            ) from None
        tokenizer.sftdata_name = name
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"tokenizer {name!r} is not a fast tokenizer (no tokenizer.json); sftdata needs offsets")
    return tokenizer


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over the serialized vocabulary/merges/normalizer/pre-tokenizer and the special tokens.

    Two tokenizers with the same fingerprint turn every text into the same ids; the trainer compares it with the
    manifest to refuse a dataset built for another tokenizer.
    """
    h = hashlib.sha256()
    h.update(tokenizer.backend_tokenizer.to_str().encode("utf-8"))
    h.update(repr(sorted(dict(tokenizer.special_tokens_map).items())).encode("utf-8"))
    return h.hexdigest()


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """What the manifest records about the tokenizer."""
    chat_template = getattr(tokenizer, "chat_template", None)
    if isinstance(chat_template, dict):
        chat_template = chat_template.get("default")
    return {
        "name_or_path": getattr(tokenizer, "sftdata_name", None) or tokenizer.name_or_path,
        "sha256": tokenizer_fingerprint(tokenizer),
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "chat_template_sha256": hashlib.sha256(chat_template.encode()).hexdigest() if chat_template else None,
    }


def special_token_strings(tokenizer: Any) -> list[str]:
    """Strings that the tokenizer turns into control tokens wherever they appear in text (added, special)."""
    return sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content})
