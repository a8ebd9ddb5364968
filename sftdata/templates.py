"""Chat templates: Jinja data files under ``templates/``, a path to any ``.jinja`` file, or the tokenizer's own.

Templates are compiled by the same sandboxed Jinja environment transformers uses for ``apply_chat_template``
(``ImmutableSandboxedEnvironment`` with ``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``tojson``,
``{% generation %}``), so a template renders here byte-for-byte as it renders at serving time.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

from sftdata.record import DataError

BUILTIN_DIR_NAME = "templates"
_SENTINEL = "SFTDATA0SENTINEL0REPLY"


def builtin_template_dir() -> Path:
    """The directory holding the built-in ``*.jinja`` files (inside the wheel, or the repo's ``templates/``)."""
    packaged = resources.files("sftdata") / BUILTIN_DIR_NAME
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / BUILTIN_DIR_NAME


def builtin_template_names() -> list[str]:
    return sorted(p.stem for p in builtin_template_dir().glob("*.jinja"))


def _compile(source: str):
    # transformers' compiler is the reference servers use (vLLM and TGI call it too); reusing it is what makes
    # "renders byte-identically to apply_chat_template" true by construction rather than by imitation.
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(source)


@dataclass
class ChatTemplate:
    """A compiled chat template plus what sftdata learned about it.

    ``special_tokens`` are the variables a template expects (``bos_token``, ``eos_token`` ...), taken from the
    tokenizer exactly as ``apply_chat_template`` passes them.
    """

    name: str
    source: str
    special_tokens: dict[str, Any]
    origin: str = ""

    @cached_property
    def _compiled(self):
        try:
            return _compile(self.source)
        except Exception as e:  # jinja2.TemplateSyntaxError and friends
            raise DataError(f"template {self.name!r} does not compile: {e}") from None

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.source.encode("utf-8")).hexdigest()

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False, **kwargs: Any) -> str:
        """Render ``messages``; raises ``jinja2.TemplateError`` for conversations the template refuses."""
        variables = {**self.special_tokens, **kwargs}
        return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)

    @cached_property
    def end_of_turn(self) -> str:
        """The text the template writes right after an assistant reply, up to its last non-space character.

        Found by rendering a sentinel reply (so it works for any template, including a tokenizer's own):
        ``<|im_end|>`` for ChatML, `` </s>`` for Llama-2, ``<|eot_id|>`` for Llama-3. Trailing whitespace after
        the marker is a separator, not something the model generates, so it is never trained.
        """
        conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}]
        try:
            full = self.render(conv)
        except Exception as e:
            raise DataError(f"template {self.name!r} cannot render a one-turn conversation: {e}") from None
        at = full.rfind(_SENTINEL)
        if at < 0:
            raise DataError(f"template {self.name!r} does not render assistant content")
        marker = full[at + len(_SENTINEL):].rstrip()
        if not marker:
            raise DataError(
                f"template {self.name!r} writes nothing after an assistant reply: a model trained on it never "
                "learns to stop (no end-of-turn marker such as <|im_end|> or </s>)"
            )
        return marker


def load_template(spec: str, tokenizer: Any | None = None) -> ChatTemplate:
    """Load a template by built-in name (``chatml``, ``llama2``, ``alpaca`` ...), ``.jinja`` path, or ``tokenizer``."""
    special = special_token_variables(tokenizer)
    if spec == "tokenizer":
        if tokenizer is None:
            raise DataError("--template tokenizer needs a tokenizer")
        source = getattr(tokenizer, "chat_template", None)
        if isinstance(source, dict):
            source = source.get("default")
        if not source:
            raise DataError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat_template; "
                f"choose one with --template ({', '.join(builtin_template_names())}) or a .jinja file"
            )
        return ChatTemplate(name="tokenizer", source=source, special_tokens=special, origin="tokenizer.chat_template")
    path = Path(spec)
    if spec.endswith(".jinja") or path.is_file():
        if not path.is_file():
            raise DataError(f"template file {spec} does not exist")
        return ChatTemplate(name=path.stem, source=path.read_text(encoding="utf-8"), special_tokens=special, origin=str(path))
    builtin = builtin_template_dir() / f"{spec}.jinja"
    if not builtin.is_file():
        raise DataError(f"unknown template {spec!r}; built-in templates: {', '.join(builtin_template_names())}, "
                        "or 'tokenizer', or a path to a .jinja file")
    return ChatTemplate(name=spec, source=builtin.read_text(encoding="utf-8"), special_tokens=special, origin=f"builtin:{spec}")


def special_token_variables(tokenizer: Any | None) -> dict[str, Any]:
    """The variables ``apply_chat_template`` passes to a template: exactly ``tokenizer.special_tokens_map``."""
    if tokenizer is None:
        return {}
    return {k: v for k, v in dict(tokenizer.special_tokens_map).items() if isinstance(v, str)}


def template_description(source: str) -> str:
    """First line of a template's leading ``{# ... #}`` comment, for ``sftdata templates``."""
    match = re.match(r"\s*\{#-?\s*(.*?)\s*-?#\}", source, re.S)
    return match.group(1).splitlines()[0] if match else ""
