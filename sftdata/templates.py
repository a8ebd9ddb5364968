"""Chat templates: Jinja data files under ``templates/``, a path to any ``.jinja`` file, or the tokenizer's own.

Templates are compiled by the same sandboxed Jinja environment transformers uses for ``apply_chat_template``
(``ImmutableSandboxedEnvironment`` with ``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``tojson``,
``{% generation %}``), so a template renders here byte-for-byte as it renders at serving time.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property, lru_cache
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


class TemplateBudgetError(Exception):
    """A render went past its time or size budget (a template that loops or grows strings without bound)."""


@dataclass
class RenderBudget:
    """Limits for one render: wall-clock seconds, and characters of any string the template builds or outputs."""

    seconds: float = 10.0
    chars: int = 16 * 1024 * 1024


class _BudgetState:
    def __init__(self) -> None:
        self.deadline = float("inf")
        self.budget = RenderBudget()
        self.chars = self.budget.chars
        self.iterations = 0

    def tick(self) -> None:
        self.iterations += 1
        if self.iterations & 1023 == 0 and time.monotonic() > self.deadline:
            raise TemplateBudgetError(f"rendering took more than {self.budget.seconds:g} s")

    def check_size(self, value: Any) -> Any:
        if isinstance(value, (str, list)) and len(value) > self.budget.chars:
            raise TemplateBudgetError(f"the template built a value of {len(value):,} items (budget {self.budget.chars:,})")
        return value


class _CountingRange(Sequence):
    """The sandbox's ``range`` (at most 100,000 items each), counting iterations against the render's time budget."""

    def __init__(self, state: _BudgetState, rng: range):
        self._state, self._range = state, rng

    def __len__(self) -> int:
        return len(self._range)

    def __getitem__(self, i):
        return self._range[i]

    def __iter__(self):
        for x in self._range:
            self._state.tick()
            yield x


def _compile(source: str, state: _BudgetState):
    # transformers' compiler is the reference servers use (vLLM and TGI call it too): the same sandboxed environment,
    # filters and globals make "renders byte-identically to apply_chat_template" true by construction. Its environment
    # is made per template, so sftdata adds a budget to this one and recompiles: `range` counts iterations against a
    # deadline, and `+`/`*` refuse to build strings or lists over the size budget (unbounded templates would otherwise
    # hang a build or exhaust memory).
    from jinja2.sandbox import safe_range
    from transformers.utils.chat_template_utils import _cached_compile_jinja_template

    environment = _cached_compile_jinja_template(source).environment
    environment.intercepted_binops = frozenset({"+", "*"})
    sized = (str, list)

    def call_binop(context: Any, op: str, left: Any, right: Any) -> Any:
        # the sandbox's binop_table maps exactly these two operators to operator.add and operator.mul
        value = left + right if op == "+" else left * right
        if isinstance(value, sized) and len(value) > state.chars:
            state.check_size(value)  # raises
        return value

    environment.call_binop = call_binop
    environment.globals["range"] = lambda *args: _CountingRange(state, safe_range(*args))
    # environment.from_string(source), with the Jinja compile (parse, codegen, Python compile) done once per source
    template = environment.template_class.from_code(environment, _jinja_code(source, environment),
                                                   environment.make_globals(None), None)
    # Jinja hands every render a ChainMap of template and environment globals, copied key by key through Python-level
    # ChainMap methods twice per render; one flat dict of the same globals (fixed from here on) renders the same, faster.
    template.globals = dict(template.globals)
    return template


@lru_cache(maxsize=64)
def _jinja_code(source: str, environment: Any) -> Any:
    # Every ChatTemplate of one source shares transformers' cached environment, already set to intercept + and *
    # (which the generated code depends on), so the compiled code is the same for all of them.
    return environment.compile(source)


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
    budget: RenderBudget = field(default_factory=RenderBudget)
    pinned: dict[str, Any] = field(default_factory=dict)  # variables every render receives (see with_variables)

    def with_variables(self, **variables: Any) -> "ChatTemplate":
        """This template with ``variables`` passed to every render (a row's own keywords still win): how a build's
        pinned date and ``--template-kwargs`` reach checks that render the template themselves."""
        return replace(self, pinned={**self.pinned, **variables})

    @cached_property
    def _state(self) -> _BudgetState:
        return _BudgetState()

    @cached_property
    def _compiled(self):
        try:
            return _compile(self.source, self._state)
        except Exception as e:  # jinja2.TemplateSyntaxError and friends
            raise DataError(f"template {self.name!r} does not compile: {e}") from None

    @cached_property
    def variables(self) -> frozenset[str]:
        """The variables the template reads besides the ones every server passes (``enable_thinking``, ``date_string``
        ...): a row field or ``--template-kwargs`` key of that name is handed to it."""
        import jinja2.meta
        from jinja2 import nodes

        ast = self._compiled.environment.parse(self.source)
        assigned = {n.name for n in ast.find_all(nodes.Name) if n.ctx in ("store", "param")}
        names = jinja2.meta.find_undeclared_variables(ast) - assigned
        standard = {"messages", "tools", "documents", "add_generation_prompt", "raise_exception", "strftime_now",
                    "namespace", "dict", "range", "loop", "true", "false", "none", "True", "False", "None"}
        return frozenset(n for n in names if n not in standard and n not in self.special_tokens
                         and not n.endswith("_token"))

    def __getstate__(self) -> dict[str, Any]:
        # Compiled Jinja templates hold local functions and cannot be pickled; a worker recompiles from the source.
        return {k: v for k, v in self.__dict__.items() if k not in ("_compiled", "_state")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.source.encode("utf-8")).hexdigest()

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
               tools: list[dict[str, Any]] | None = None, **kwargs: Any) -> str:
        """Render ``messages`` exactly as ``tokenizer.apply_chat_template`` does (same variables: the special tokens,
        ``tools``, ``documents=None``, ``add_generation_prompt`` and the template keywords in ``kwargs``).

        Raises ``jinja2.TemplateError`` for conversations the template refuses and :class:`TemplateBudgetError` when the
        render goes past the template's :class:`RenderBudget`.
        """
        compiled = self._compiled
        state = self._state
        state.budget, state.chars, state.iterations = self.budget, self.budget.chars, 0
        state.deadline = time.monotonic() + self.budget.seconds
        variables = {**self.special_tokens, **self.pinned, **kwargs}
        text = compiled.render(messages=messages, tools=tools, documents=None,
                               add_generation_prompt=add_generation_prompt, **variables)
        return state.check_size(text)

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
