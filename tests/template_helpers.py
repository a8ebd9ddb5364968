"""Shared helpers for the template-fidelity tests: the real tokenizers in ../shared/tokenizers and stand-ins."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from conftest import REPO, SHARED, shared_path

TOKENIZERS = SHARED / "tokenizers"
OFFICIAL = REPO / "fixtures" / "official_templates"
NEW_TEMPLATES = ("llama3", "mistral", "gemma", "phi3", "zephyr", "qwen3")


def require_shared(name: str) -> Path:
    """The shared tokenizer directory; FAILS under CI when it is missing, skips elsewhere (conftest.shared_path)."""
    return shared_path("tokenizers", name, "tokenizer.json").parent


@lru_cache(maxsize=None)
def _load(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZERS / name))


def shared_tokenizer(name: str):
    require_shared(name)
    return _load(name)


@lru_cache(maxsize=None)
def gemma_standin():
    """mistral-7b-v0.1's vocabulary plus Gemma's turn markers as special tokens (eos stays </s>).

    NOT the Gemma tokenizer (no Gemma tokenizer is available offline): it lets the Gemma template be checked end to
    end on a vocabulary where <start_of_turn>/<end_of_turn> are single control tokens and the end-of-turn token is not
    eos_token — the situation of GUIDE §3.7.
    """
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    require_shared("mistral-7b-v0.1")
    tok = AutoTokenizer.from_pretrained(str(TOKENIZERS / "mistral-7b-v0.1"))
    tok.add_special_tokens({"additional_special_tokens": [
        AddedToken(t, special=True, normalized=False) for t in ("<start_of_turn>", "<end_of_turn>")]})
    tok.sftdata_name = "mistral-7b-v0.1 + Gemma turn markers (stand-in)"
    return tok


@lru_cache(maxsize=None)
def phi3_standin(rstrip: bool = True):
    """mistral-7b-v0.1's vocabulary plus Phi-3's added tokens with Phi-3's flags (rstrip=True on <|end|>,
    <|user|>, <|assistant|>, <|system|>; eos <|endoftext|>), as in microsoft/Phi-3-mini-4k-instruct's
    tokenizer_config.json. NOT the Phi-3 tokenizer (Phi-3 uses Llama-2's vocabulary)."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    require_shared("mistral-7b-v0.1")
    tok = AutoTokenizer.from_pretrained(str(TOKENIZERS / "mistral-7b-v0.1"))
    tok.add_special_tokens({
        "eos_token": AddedToken("<|endoftext|>", special=True, normalized=False),
        "additional_special_tokens": [AddedToken(t, special=True, normalized=False, rstrip=rstrip)
                                      for t in ("<|assistant|>", "<|system|>", "<|end|>", "<|user|>")]})
    tok.sftdata_name = f"mistral-7b-v0.1 + Phi-3 added tokens, rstrip={rstrip} (stand-in)"
    return tok


def strip_description(source: str) -> str:
    """The template text after its leading ``{#- description -#}`` comment and the newline that follows it."""
    if source.startswith("{#-"):
        end = source.index("-#}") + 3
        source = source[end:]
        if source.startswith("\n"):
            source = source[1:]
    return source
