"""Shared helpers for the template-fidelity tests: the real tokenizers in ../shared/tokenizers and stand-ins."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from conftest import REPO, SHARED, shared_path

TOKENIZERS = SHARED / "tokenizers"
OFFICIAL = REPO / "fixtures" / "official_templates"
# built-in template name -> the official fixture it reproduces byte for byte
BUILTIN_OFFICIAL = {"llama3": "llama3_1", "llama3_0": "llama3_0", "mistral": "mistral", "mistral_v3": "mistral_v3",
                    "gemma": "gemma", "phi3": "phi3", "zephyr": "zephyr", "qwen3": "qwen3", "qwen3_5": "qwen3_5",
                    "qwq": "qwq", "deepseek_r1": "deepseek_r1", "deepseek_v3": "deepseek_v3", "gpt_oss": "gpt_oss"}
NEW_TEMPLATES = tuple(BUILTIN_OFFICIAL)


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
    eos_token — the situation of failure mode 7 in docs/invariants.md.
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


@lru_cache(maxsize=None)
def llama31_standin():
    """The llama3_1 tokenizer in ../shared is Llama-3.0's (ids 128004/128008/128010 are reserved tokens there). Llama-3.1
    changed only those names: <|finetune_right_pad_id|>, <|eom_id|>, <|python_tag|>. This renames them, which makes it
    Llama-3.1's tokenizer for every id the templates use."""
    import json
    import tempfile

    from transformers import AutoTokenizer

    source = require_shared("llama3_1")
    names = {128004: "<|finetune_right_pad_id|>", 128008: "<|eom_id|>", 128010: "<|python_tag|>"}
    target = Path(tempfile.mkdtemp(prefix="llama31-standin-"))
    data = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    for token in data["added_tokens"]:
        token["content"] = names.get(token["id"], token["content"])
    (target / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    for key, token in config.get("added_tokens_decoder", {}).items():
        token["content"] = names.get(int(key), token["content"])
    config.pop("chat_template", None)
    (target / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(str(target))
    tok.sftdata_name = "llama3_1 with Llama-3.1's <|eom_id|>/<|python_tag|> names (stand-in)"
    return tok


@lru_cache(maxsize=None)
def mistral_v3_standin():
    """mistral-7b-v0.1's vocabulary plus v0.3's control tokens ([INST], [TOOL_CALLS] ...) as special tokens. NOT the v0.3
    tokenizer (it numbers them 3-9 and adds 768 more): the ids of the control tokens differ, their role does not."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    require_shared("mistral-7b-v0.1")
    tok = AutoTokenizer.from_pretrained(str(TOKENIZERS / "mistral-7b-v0.1"))
    tok.add_special_tokens({"additional_special_tokens": [
        AddedToken(t, special=True, normalized=False) for t in ("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                                                                  "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]")]})
    tok.sftdata_name = "mistral-7b-v0.1 + v0.3 control tokens (stand-in)"
    return tok


@lru_cache(maxsize=None)
def deepseek_standin():
    """Qwen3's vocabulary plus DeepSeek-V3/R1's special tokens (bos <｜begin▁of▁sentence｜>, eos <｜end▁of▁sentence｜>, the
    tool-call markers). NOT the DeepSeek tokenizer (not available offline): the markers are single control tokens, as
    there."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    require_shared("qwen3")
    tok = AutoTokenizer.from_pretrained(str(TOKENIZERS / "qwen3"))
    markers = ("<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
               "<｜tool▁call▁end｜>", "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>",
               "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>")
    tok.add_special_tokens({
        "bos_token": AddedToken("<｜begin▁of▁sentence｜>", special=True, normalized=False),
        "eos_token": AddedToken("<｜end▁of▁sentence｜>", special=True, normalized=False),
        "additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in markers]})
    tok.chat_template = None
    tok.sftdata_name = "qwen3 + DeepSeek special tokens (stand-in)"
    return tok
