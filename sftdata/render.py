"""Render and tokenize: records → ``input_ids`` + exact assistant-only ``labels``.

How the mask is placed (no searching the token stream for marker ids, which is what breaks on SentencePiece and
trailing-space markers; see docs/invariants.md). For a conversation ``conv`` and each trained assistant turn ``k``:

1. ``P_k = T(conv[:k], add_generation_prompt=True)`` is what a server sends before turn ``k``, and
   ``Q_k = T(conv[:k+1])`` renders the turn as the last message. The turn's **target** is ``Q_k`` from the end of
   ``P_k`` to its end-of-turn marker: reasoning and tool-call markup included, trailing whitespace and a next-turn
   header that some templates write after every message excluded. It must end with an end-of-turn marker.
2. The example is ``T(conv)``, tokenized exactly as a server tokenizes a rendered prompt (no added special tokens).
   Turn ``k`` is trained inside it when ``P_k`` is a prefix of it and the target follows ``P_k`` there unchanged.
   A turn that renders differently in history (reasoning dropped from earlier turns, ``<think>`` opened by the
   generation prompt, another end marker) becomes its own example ``Q_k`` (history policy ``auto``/``split``), is left
   as context (``last``), or makes the row a Problem (``fail``).
3. ``tok(P_k)`` must be a token prefix of the example's ``input_ids``; training starts right after it and stops after
   the end-of-turn marker, whose token boundary is read from the tokenizer's offsets. When ``P_k``'s last token merges
   with the completion in context (a generation prompt ending in ``\\n`` before a completion starting with ``\\n``),
   tokenization ``auto`` makes the turn its own example ``tok(P_k) + tok(target)``: the sequence a server feeds and
   the model emits (marked ``tokenized_apart``); ``context`` refuses such rows.
4. Each trained run is decoded and compared with the rendered target; the assistant content must appear in it modulo
   the template's own whitespace rule (``strip``/``trim``).

Content that would become a control token (any added token, or a marker the template writes such as ``[INST]`` or
``### Response:``) is refused or escaped (``special_text``); inside assistant turns the markup the template itself
writes there (``<think>``, ``<tool_call>``) is what the model emits and stays allowed. Any turn where a check fails
makes the row a :class:`Problem` with the reason; it is never trained silently.
"""

from __future__ import annotations

import copy
import datetime
import json
import re
import unicodedata
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from sftdata.record import DataError, Problem, Record
from sftdata.templates import ChatTemplate, TemplateBudgetError

IGNORE_INDEX = -100
# What each token of an example is, for `show` and `stats` (column `kinds`): never used to place labels.
KINDS = ("markup", "system", "user", "content", "reasoning", "tool_call", "tool_result")
KIND_CODE = {name: code for code, name in enumerate(KINDS)}
_ROLE_KIND = {"system": 1, "developer": 1, "user": 2, "assistant": 3, "tool": 6}
TRAIN_TURNS = ("all", "last")
SPECIAL_TEXT_POLICIES = ("reject", "escape")
HISTORY_POLICIES = ("auto", "split", "last", "fail")
TOKENIZATION_POLICIES = ("auto", "context")
ESCAPE_CHAR = "\u200b"  # zero-width space, inserted after the first character of a control-token string

# Markup-like substrings of the text a template writes around messages: a user typing one of these forges structure.
_TEXT_MARKER = re.compile(r"<\|[^|<>\s]{1,40}\|>|<{1,2}/?[A-Za-z_][A-Za-z0-9_▁|]{0,30}>{1,2}|\[/?[A-Z_]{2,20}\]"
                          r"|#{2,}[ \t]?[A-Z][A-Za-z ]{0,30}:")
_SENT = "SFTDATA0PROBE{}0X"


@dataclass
class EncodeOptions:
    """What to train and how strictly.

    ``train_turns``: ``all`` trained assistant turns (default) or only the ``last``. ``train_on_prompt``: train every
    token (labels == input_ids). ``special_text``: content holding a control-token string such as ``<|im_end|>`` is
    ``reject``ed (default) or ``escape``d (U+200B after its first character, so it stays text). ``history_policy``:
    what happens to a turn that renders differently in history than as the last turn (see module docstring).
    ``tokenization``: ``auto`` or ``context`` (see module docstring). ``template_kwargs``: template variables for every
    row (``enable_thinking`` ...); a row's own ``chat_template_kwargs`` override them. ``template_date``: the date
    (``YYYY-MM-DD``) templates that print today's date (gpt-oss, Llama-3.2 via ``strftime_now``) render, so a build
    renders the same text whenever it runs; None renders the real date. ``max_length``: the length examples are cut to from the right
    (turns that would be cut entirely are not planned, and are counted); None when nothing is truncated.
    ``check_decode``: run the decode check on every trained run.
    """

    train_turns: str = "all"
    train_on_prompt: bool = False
    special_text: str = "reject"
    history_policy: str = "auto"
    tokenization: str = "auto"
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    template_date: str | None = None
    max_length: int | None = None
    check_decode: bool = True

    def __post_init__(self) -> None:
        for name, allowed in (("train_turns", TRAIN_TURNS), ("special_text", SPECIAL_TEXT_POLICIES),
                              ("history_policy", HISTORY_POLICIES), ("tokenization", TOKENIZATION_POLICIES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, not {getattr(self, name)!r}")


@dataclass(slots=True)
class Encoded:
    """One tokenized example. ``spans`` are the trained token runs ``[start, end)`` and ``turns`` the message index of
    each; ``counts`` what it holds (turns by kind, turns left untrained by the history policy) for the manifest."""

    source: str
    row: int
    input_ids: list[int]
    labels: list[int]
    spans: list[tuple[int, int]] = field(default_factory=list)
    truncated: bool = False
    is_text: bool = False  # a raw-text document (every token trained)
    tokenized_apart: bool = False  # tok(prompt) + tok(completion), the serving-exact sequence (see EncodeOptions)
    counts: Counter = field(default_factory=Counter)
    turns: list[int] = field(default_factory=list)  # message index of each trained span's assistant turn
    messages: int = 0  # how many of the conversation's messages the example renders (fewer for a split turn)
    kinds: list[int] = field(default_factory=list)  # per token, an index into KINDS

    @property
    def num_trained(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE_INDEX)


@dataclass(slots=True)
class _Turn:
    """One trained assistant turn inside an example text: its serving prompt and where its target ends."""

    message: int
    prompt_end: int  # the serving prompt P_k is the example text up to here
    end: int  # character offset in the example text right after the end-of-turn marker
    marker: str  # the end-of-turn marker the target ends with
    content: str
    cut: int = 0  # end of the prompt's last control token: only prompt[cut:] is tokenized again
    composed: bool = False  # the target was assembled after the prompt (see Encoder._composed_target)


@dataclass(slots=True)
class _Plan:
    """An example waiting for tokenization: its text (a render of the first ``messages`` messages) and trained turns."""

    record: Record
    text: str
    turns: list[_Turn]
    counts: Counter
    messages: int
    segments: list[tuple[int, int, int]] = field(default_factory=list)  # (start char, end char, kind code)


class Refused(Exception):
    """A row that cannot be encoded exactly: ``kind`` is counted in the manifest, ``detail`` is the reason."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind, self.detail = kind, detail


class Encoder:
    """Turns batches of records into :class:`Encoded` examples with exact labels.

    ``encode_batch`` is a pure function of its input batch (the encoder holds only the template, tokenizer and
    options), so batches can be encoded in any order, in a process pool or on a cluster.
    """

    def __init__(self, template: ChatTemplate, tokenizer: Any, options: EncodeOptions | None = None):
        self.template = template
        self.tokenizer = tokenizer
        self.options = options or EncodeOptions()
        self.backend = tokenizer.backend_tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.added = {t.content for t in tokenizer.added_tokens_decoder.values() if t.content and not t.content.isspace()}
        self._added_re = _alternation(self.added)
        # Added tokens with lstrip/rstrip (Phi-3's <|end|>, <|assistant|>) swallow the whitespace beside them: their
        # offsets cover it but decoding does not give it back, so the boundary and decode checks treat it as theirs.
        self._absorbing = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()
                           if getattr(t, "lstrip", False) or getattr(t, "rstrip", False)}
        self.tool_call_form = tool_call_form(template)
        self._fixed_kwargs = self._date_kwargs()
        self.header = trailing_header(template, self.added)
        self.end_of_turn = _strip_suffix(template.end_of_turn, self.header.strip()).rstrip() if self.header else template.end_of_turn
        control = self.added | text_markers(template)
        self.assistant_markup = assistant_markup(template, self.added, self.header)
        self._control_re = _alternation(control)
        self._assistant_control_re = _alternation(control - self.assistant_markup)

    def _date_kwargs(self) -> dict[str, Any]:
        if self.options.template_date and "strftime_now" in self.template.source:
            day = datetime.date.fromisoformat(self.options.template_date)
            return {"strftime_now": day.strftime}  # shadows the global: the render no longer depends on today
        return {}

    def with_options(self, **changes: Any) -> Encoder:
        """This encoder with some options changed; what it read from the template's probe renders (markers, header,
        tool-call form), which depends only on the template and tokenizer, is shared instead of probed again."""
        other = copy.copy(self)
        other.options = replace(self.options, **changes)
        other._fixed_kwargs = other._date_kwargs()
        return other

    @property
    def pinned_variables(self) -> dict[str, Any]:
        """The template variables every row of this encoder renders with: the pinned date and ``template_kwargs``."""
        return {**self._fixed_kwargs, **self.options.template_kwargs}

    # -- content policy -----------------------------------------------------------------------------------------

    def _clean(self, value: Any, pattern: re.Pattern | None, what: str) -> Any:
        """``value`` (a string, or a list/dict of them) with control-token text escaped; raises :class:`Refused`
        under ``special_text="reject"``."""
        if pattern is None:
            return value
        if isinstance(value, str):
            found = pattern.search(value)
            if found is None:
                return value
            if self.options.special_text == "reject":
                raise Refused("special-token-text",
                               f"{what} contains {found.group(0)!r}, which the tokenizer or template would read as a "
                               "control marker; use --special-text escape to keep it as text")
            return pattern.sub(lambda s: s.group(0)[0] + ESCAPE_CHAR + s.group(0)[1:], value)
        if isinstance(value, dict):
            return {k: self._clean(v, pattern, what) for k, v in value.items()}
        if isinstance(value, list):
            return [self._clean(v, pattern, what) for v in value]
        return value

    def template_input(self, record: Record) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, dict[str, Any]]:
        """What the template is given for ``record``: messages, tools and keywords, with control-token text escaped
        (``special_text="escape"``); raises :class:`Refused` under ``"reject"``."""
        messages = []
        arguments_as_string, empty_as_none = self.tool_call_form
        for i, m in enumerate(record.messages_as_dicts()):
            if m.get("tool_calls") and (arguments_as_string or empty_as_none):
                m = _tool_call_message(m, arguments_as_string, empty_as_none)
            pattern = self._assistant_control_re if m["role"] == "assistant" else self._control_re
            messages.append({k: (v if k in ("role", "tool_call_id") else self._clean(v, pattern, f"message {i} ({m['role']}) {k}"))
                             for k, v in m.items()})
        tools = self._clean(record.tools, self._control_re, "the tools") if record.tools is not None else None
        kwargs = {**self._fixed_kwargs, **self.options.template_kwargs, **record.template_kwargs}
        return messages, tools, kwargs

    # -- planning -------------------------------------------------------------------------------------------------

    def _target(self, prompt: str, through: str) -> tuple[str, str] | None:
        """The turn's target (text after ``prompt`` in ``through`` up to its end marker) and that marker; None when
        ``prompt`` is not a prefix of ``through``."""
        if not through.startswith(prompt):
            return None
        text = through[len(prompt):]
        if self.header and text.endswith(self.header) and len(text) > len(self.header):
            text = text[:-len(self.header)]
        text = text.rstrip()
        found = self._added_re.search(text, max(0, len(text) - 64)) if self._added_re is not None else None
        last = None
        while found is not None:
            last = found
            found = self._added_re.search(text, found.start() + 1)
        if last is not None and last.end() == len(text):
            return text, last.group(0)
        if self.end_of_turn and text.endswith(self.end_of_turn):
            return text, self.end_of_turn
        raise Refused("no-end-of-turn", f"the turn ends with {text[-30:]!r}, not with an end-of-turn marker")

    def _plan(self, record: Record) -> list[_Plan]:
        messages, tools, kwargs = self.template_input(record)

        def render(msgs: list[dict[str, Any]], generation: bool = False) -> str:
            try:
                return self.template.render(msgs, add_generation_prompt=generation, tools=tools, **kwargs)
            except TemplateBudgetError as e:
                raise Refused("template-budget", f"template {self.template.name!r}: {e}") from None
            except Exception as e:  # the template refused the conversation (raise_exception) or failed
                if "tool" not in self.template.source and any(m["role"] == "tool" or m.get("tool_calls") for m in msgs):
                    raise Refused("tool-calls-not-rendered",
                                  f"template {self.template.name!r} has no tool calls or tool results and refuses this "
                                  f"conversation ({e}); use a template with tools (qwen3, llama3, mistral_v3, gpt_oss, "
                                  "or the tokenizer's own)") from None
                raise Refused("template-error", f"template {self.template.name!r} cannot render "
                                                 f"{len(msgs)} message(s) of this conversation: {e}") from None

        full = render(messages)
        trained = [k for k, m in enumerate(record.messages) if m.role == "assistant" and m.is_trained]
        if self.options.train_turns == "last":
            trained = trained[-1:]
        main: list[_Turn] = []
        separate: list[tuple[str, _Turn]] = []
        counts: Counter = Counter()
        if self.options.max_length and len(trained) > 8:
            beyond = self._beyond_max_length(messages, full, trained)
            if beyond:
                counts["turns_beyond_max_length"] += len(beyond)
                trained = [k for k in trained if k not in beyond]
                if not trained:
                    raise Refused("too-long", f"every trained turn starts after --max-length {self.options.max_length} "
                                              "tokens: truncation would leave no trained token")
        for k in trained:
            prompt = render(messages[:k], True)
            last = k + 1 == len(messages)
            through = full if last else render(messages[: k + 1])
            target = self._target(prompt, through)
            if target is None:
                text, marker = self._composed_target(messages, record.messages[k], k, prompt, through, render)
                turn = _Turn(k, len(prompt), len(prompt) + len(text), marker, messages[k]["content"] or "", composed=True)
                separate.append((prompt + text, turn))
                continue
            text, marker = target
            turn = _Turn(k, len(prompt), len(prompt) + len(text), marker, messages[k]["content"] or "")
            if last or (full.startswith(prompt) and full.startswith(text, len(prompt))):
                main.append(turn)
                continue
            policy = self.options.history_policy
            if policy == "fail":
                raise Refused("history-mismatch",
                               f"assistant message {k} renders differently inside the history than as the final turn "
                               f"({_excerpt(prompt + text, full)}); the model would be trained on a turn it is never asked "
                               "to produce (use --history-policy split or last)")
            if policy == "last":
                counts["turns_untrained_history"] += 1
                continue
            separate.append((through, turn))
        self._check_rendered(record, messages, tools, full, [(t, full) for t in main] + [(t, q) for q, t in separate])
        plans = [_Plan(record, through, [turn], Counter({"turns_composed" if turn.composed else "examples_split": 1}),
                       turn.message + 1) for through, turn in separate]
        if main:
            plans.append(_Plan(record, full, main, Counter(), len(messages)))
        if not plans:
            raise Refused("no-trained-turn", "no assistant turn is left to train after the history policy "
                                              f"{self.options.history_policy!r}")
        plans[-1].counts.update(counts)
        for plan in plans:
            plan.segments = self._segments(plan, messages, render)
            for turn in plan.turns:
                turn.cut = self._last_control_end(plan.text, turn.prompt_end)
        return plans

    def _beyond_max_length(self, messages: list[dict[str, Any]], full: str, trained: list[int]) -> set[int]:
        """Trained turns that right-truncation to ``max_length`` would cut entirely: the message before the turn ends at
        or after the first token past the limit, so its serving prompt, and everything trained after it, do too.

        Rendering a serving prompt per turn costs a render of the whole history: a conversation of n turns costs n².
        With a length limit only the turns inside it are rendered, which bounds the cost of very long conversations."""
        enc = self.backend.encode(full, add_special_tokens=False)
        if len(enc.ids) <= self.options.max_length:
            return set()
        cutoff = enc.offsets[self.options.max_length][0]
        beyond, cursor, trained_at = set(), 0, set(trained)
        for i, message in enumerate(messages):
            content = (message.get("content") or "").strip()
            at = full.find(content, cursor) if content else -1
            if content and at < 0:
                break  # the template rewrites this content: stop locating, keep the remaining turns (exact, slower)
            if at >= 0:
                cursor = at + len(content)
            if i + 1 in trained_at and cursor >= cutoff and at >= 0:
                beyond.add(i + 1)
        return beyond

    def _composed_target(self, messages: list[dict[str, Any]], message: Any, k: int, prompt: str, through: str,
                         render: Any) -> tuple[str, str]:
        """The target of turn ``k`` when the serving prompt ``P_k`` is not a prefix of the turn's own render ``Q_k``.

        Both renders are cut right after the message the turn answers (the last user or tool message, located in
        ``Q_k`` through a sentinel render); what each writes after it must agree:

        * the rest of ``Q_k`` continues the rest of ``P_k`` (the template renders the *context* differently once the
          turn exists: gpt-oss drops a tool call's reasoning when a final answer follows, Mistral v0.3 moves the system
          prompt): the target is that continuation, and the example is ``P_k`` + target, as served;
        * ``P_k`` opens a reasoning block the render does not show (QwQ, DeepSeek-R1 ``<think>\n``, DeepSeek-V3.1
          ``<think>``): the target is the reasoning and the answer as the model writes them after that prompt: an inline
          ``<think>...</think>`` content is used as written; a separate reasoning field is closed with ``</think>``,
          laid out as the family does (``\n</think>\n\n`` after ``<think>\n``, the template's own text where it
          renders the closing tag, as DeepSeek-V3.1 does).

        Anything else is refused (``serving-prefix``), and a reasoning prompt without reasoning is ``missing-reasoning``.
        """
        refuse = Refused("serving-prefix",
                         f"assistant message {k}: the serving prompt T(conv[:{k}], add_generation_prompt=True) is not a prefix "
                         f"of the turn rendered as the last message ({_excerpt(prompt, through)}), and the difference is "
                         "neither a context the template renders differently nor a reasoning block the prompt opens")
        j = next((i for i in range(k - 1, -1, -1) if messages[i]["role"] != "assistant"), None)
        content = (messages[j].get("content") or "").strip() if j is not None else ""
        opened_at = prompt.rfind("<think>")
        if content:
            sentinel = render(messages[:k] + [{"role": "assistant", "content": _SENT.format("C")}])
            for anchor in (content, json.dumps(content, ensure_ascii=False)[1:-1]):  # as written, or JSON-encoded
                at = sentinel.rfind(anchor, 0, sentinel.find(_SENT.format("C")))
                p_at = prompt.rfind(anchor)
                if at >= 0 and p_at >= 0 and through[:at + len(anchor)] == sentinel[:at + len(anchor)]:
                    break
            else:
                raise refuse
            p_after, q_after = prompt[p_at + len(anchor):], through[at + len(anchor):]
        elif opened_at >= 0 and through.startswith(prompt[:opened_at]):
            # nothing to anchor on (an empty user message), but the prompt only adds an opened reasoning block
            p_after, q_after = prompt[opened_at:], through[opened_at:]
        else:
            raise refuse
        if q_after.startswith(p_after):
            target = self._target("", q_after[len(p_after):])
            if target is None:
                raise refuse
            return target
        inline_reasoning = re.match(r"\s*<think>(.*?)</think>", messages[k].get("content") or "", re.S)
        if re.search(r"<think>\s*</think>\s*$", p_after) and ((message.reasoning or "").strip()
                                                                or (inline_reasoning and inline_reasoning[1].strip())):
            raise Refused("reasoning-off",
                          f"assistant message {k}: the generation prompt closes an empty reasoning block (thinking is "
                          "off, e.g. enable_thinking=false), so the model is never asked for this turn's reasoning; drop "
                          "the reasoning from such rows or turn thinking on")
        shared = p_after.rfind("<think>")
        opened = p_after[shared:]
        if shared < 0 or q_after[:shared] != p_after[:shared] or not re.fullmatch(r"<think>\s*", opened):
            raise refuse
        rest = self._target("", q_after[shared:])
        if rest is None:
            raise refuse
        rest_text, marker = rest
        content = messages[k].get("content") or ""
        inline = content.lstrip()
        if message.reasoning is None and inline.startswith("<think>") and "</think>" in inline:
            body = inline[len("<think>"):]
            body = body[len(opened) - len("<think>"):] if body.startswith(opened[len("<think>"):]) else body.lstrip()
            answer = inline.split("</think>")[-1].strip()
            # the template's text after the answer (the end marker, tool calls) follows the content as written
            after = rest_text[rest_text.rfind(answer) + len(answer):] if answer else rest_text[rest_text.rfind(marker):]
            return body.rstrip() + after, marker
        if not (message.reasoning or "").strip():
            raise Refused("missing-reasoning",
                          f"assistant message {k}: the template's generation prompt opens {opened.strip()!r}, so the "
                          "model writes reasoning first, but this turn has none (add reasoning_content, or put "
                          "<think>...</think> at the start of the content)")
        if rest_text.startswith("</think>"):
            return message.reasoning + rest_text, marker
        close = "\n</think>\n\n" if opened.endswith("\n") else "</think>"
        return message.reasoning + close + rest_text, marker

    def _check_rendered(self, record: Record, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                        full: str, turns: list[tuple[_Turn, str]]) -> None:
        """Refuse a row whose tool calls, reasoning, tools or tool results the template does not render: training it
        would teach answers without the calls or thoughts that produced them."""
        for turn, text in turns:
            target = text[turn.prompt_end:turn.end]
            message = messages[turn.message]
            for call in message.get("tool_calls") or ():
                function = call["function"]
                missing = [str(x) for x in [function["name"], *function["arguments"]] if str(x) not in target]
                if missing:
                    raise Refused("tool-calls-not-rendered",
                                  f"assistant message {turn.message}: template {self.template.name!r} does not render its tool "
                                  f"call {function['name']!r} (missing {missing[0]!r} in the trained text); use a template "
                                  "with tool calls (qwen3, llama3, mistral_v3, or the tokenizer's own)")
            content = (message.get("content") or "").strip()
            if message.get("tool_calls") and content and _nfc(content) not in _nfc(target):
                # Llama-3.1's official template writes only the call of such a message: its text would vanish unseen
                raise Refused("content-not-rendered",
                              f"assistant message {turn.message}: template {self.template.name!r} renders only the tool "
                              "call of a message that also has text, so the text would be dropped; move the text to a "
                              "message of its own, or use a template that renders both (qwen3, mistral_v3, gpt_oss)")
            reasoning = (message.get("reasoning_content") or "").strip()
            if reasoning and reasoning not in target:
                raise Refused("reasoning-not-rendered",
                              f"assistant message {turn.message}: template {self.template.name!r} does not render its "
                              "reasoning; use a template with reasoning (qwen3, ...) or put it inline in the content")
        if tools:
            names = [t.get("function", t).get("name") for t in tools]
            missing = [n for n in names if isinstance(n, str) and n not in full]
            if missing:
                raise Refused("tools-not-rendered", f"template {self.template.name!r} does not render the tools "
                                                    f"({missing[0]!r} is missing): the model would be trained to call "
                                                    "functions it was never shown")
        for i, message in enumerate(messages):
            result = (message.get("content") or "").strip() if message["role"] == "tool" else ""
            # some templates JSON-encode results (gpt-oss, Llama-3.1): the escaped text counts as rendered
            if result and result not in full and json.dumps(result, ensure_ascii=False)[1:-1] not in full:
                raise Refused("tool-result-not-rendered",
                              f"message {i}: template {self.template.name!r} does not render this tool result")

    def _segments(self, plan: _Plan, messages: list[dict[str, Any]], render: Any) -> list[tuple[int, int, int]]:
        """Character spans of the example text by kind (system, user, content, reasoning, tool call, tool result), for
        display and statistics. A trained turn's reasoning and tool calls are located exactly, by rendering the turn
        once more without them and diffing; the other messages by finding their content in order."""
        text, segments, cursor = plan.text, [], 0
        targets = {t.message: t for t in plan.turns}
        for i, message in enumerate(messages[:plan.messages]):
            turn = targets.get(i)
            if turn is None:
                content = message.get("content") or ""
                at = text.find(content.strip(), cursor) if content.strip() else -1
                if at >= 0:
                    end = at + len(content.strip())
                    segments.append((at, end, _ROLE_KIND.get(message["role"], 0)))
                    cursor = end
                continue
            start, end = turn.prompt_end, turn.end
            target = text[start:end]
            parts = []
            if turn.composed and message.get("reasoning_content"):
                at = target.find(message["reasoning_content"].strip())
                if at >= 0:
                    parts.append((start + at, start + at + len(message["reasoning_content"].strip()), 4))
            for key, kind in (("tool_calls", 5), ("reasoning_content", 4)):
                if not message.get(key) or turn.composed:
                    continue
                without = {k: v for k, v in message.items() if k != key and not (key == "reasoning_content" and k in ("reasoning", "thinking"))}
                try:
                    other = render(messages[:i] + [without])[turn.prompt_end:]
                except Refused:
                    continue
                other = _strip_suffix(other, self.header).rstrip()
                a = self._token_start(target, _common_prefix(target, other))
                b = len(target) - self._token_end(target, len(target) - _common_prefix(target[::-1], other[::-1]))
                if a < len(target) - b:
                    parts.append((start + a, start + len(target) - b, kind))
            for piece in _content_pieces(message.get("content") or ""):
                at = target.find(piece)
                while at >= 0 and any(s <= start + at < e for s, e, _ in parts):
                    at = target.find(piece, at + 1)
                if at >= 0:
                    parts.append((start + at, start + at + len(piece), 3))
            segments.extend(sorted(parts))
            cursor = end
        return segments

    def _token_start(self, text: str, at: int) -> int:
        """``at`` moved back to the start of the added token it falls inside (``<tool_call>`` vs ``<|im_end|>`` share a
        ``<``), so a kind span never starts in the middle of a marker."""
        if self._added_re is not None:
            for m in self._added_re.finditer(text, max(0, at - 64), min(len(text), at + 64)):
                if m.start() < at < m.end():
                    return m.start()
        return at

    def _token_end(self, text: str, at: int) -> int:
        if self._added_re is not None:
            for m in self._added_re.finditer(text, max(0, at - 64), min(len(text), at + 64)):
                if m.start() < at < m.end():
                    return m.end()
        return at

    def _token_kinds(self, segments: list[tuple[int, int, int]], starts: list[int], n: int, offset: int = 0) -> list[int]:
        kinds = [0] * n
        for a, b, kind in segments:
            i, j = bisect_left(starts, a - offset), bisect_left(starts, b - offset)
            kinds[i:j] = [kind] * (j - i)
        return kinds

    def _last_control_end(self, text: str, end: int) -> int:
        """End of the last added token in ``text[:end]`` (0 if none)."""
        if self._added_re is None:
            return 0
        last = 0
        for start in (max(0, end - 256), 0):
            for m in self._added_re.finditer(text, start, end):
                last = m.end()
            if last:
                break
        return last

    # -- tokenization ---------------------------------------------------------------------------------------------

    def _prompt_length(self, text: str, turn: _Turn, ids: list[int], offsets: list[tuple[int, int]], starts: list[int],
                       tail_ids: list[int]) -> tuple[int, list[int] | None]:
        """Number of tokens of ``tok(P_k)`` when it is a token prefix of ``ids``; else ``(-1, tok(P_k))``.

        Fast path: HF tokenizers split text at added tokens first and tokenize the pieces independently, so when
        ``ids`` has a token boundary right after ``P_k``'s last added token (at ``cut``), ``tok(P_k)`` is ``ids[:j]``
        followed by ``tok(P_k[cut:])``; only that tail is tokenized again. Anything else (no boundary at ``cut``, a tail
        mismatch such as an added token that strips whitespace) falls back to tokenizing the whole prompt.
        """
        cut = turn.cut
        j = bisect_left(starts, cut)
        if (cut == 0 or (j > 0 and offsets[j - 1][1] == cut)) and ids[j:j + len(tail_ids)] == tail_ids:
            return j + len(tail_ids), None
        prompt_ids = self.backend.encode(text[:turn.prompt_end], add_special_tokens=False).ids
        if ids[:len(prompt_ids)] == prompt_ids:
            return len(prompt_ids), None
        return -1, prompt_ids

    def _finish(self, plan: _Plan, full_enc: Any, tail_encs: list[Any]) -> list[Encoded]:
        ids, offsets = full_enc.ids, full_enc.offsets
        starts = [o[0] for o in offsets]
        spans: list[tuple[int, int]] = []
        kept: list[_Turn] = []
        apart: list[Encoded] = []
        for turn, tail_enc in zip(plan.turns, tail_encs):
            start, prompt_ids = self._prompt_length(plan.text, turn, ids, offsets, starts, tail_enc.ids)
            if prompt_ids is not None:
                at = next((i for i, (a, b) in enumerate(zip(ids, prompt_ids)) if a != b), min(len(ids), len(prompt_ids)))
                if self.options.tokenization == "context":
                    raise Refused("serving-prefix-tokens",
                                   f"assistant message {turn.message}: tok(serving prompt) is not a token prefix of input_ids: "
                                   f"at token {at} the prompt alone gives {self._pieces(prompt_ids[at:at + 3])} but in context "
                                   f"{self._pieces(ids[at:at + 3])} (the prompt's last token merges with the completion; "
                                   "--tokenization auto trains tok(prompt) + tok(completion), the sequence a server feeds)")
                apart.append(self._encode_apart(plan, turn, prompt_ids))
                continue
            end = bisect_left(starts, turn.end, lo=start)
            if end <= start:
                raise Refused("empty-turn", f"assistant message {turn.message} has no tokens")
            if offsets[end - 1][1] != turn.end and not self._absorbs(ids[end - 1], offsets[end - 1], plan.text, turn.end):
                raise Refused("boundary-inside-token",
                               f"assistant message {turn.message}: the end-of-turn boundary at character {turn.end} falls "
                               f"inside the token {self._pieces(ids[end - 1:end])}; no exact mask exists for this "
                               "template/tokenizer pair")
            spans.append((start, end))
            kept.append(turn)
        out = []
        if kept:
            if self.options.check_decode:
                self._check_decode(plan, ids, offsets, spans, kept)
            if self.options.train_on_prompt:
                labels = list(ids)
            else:
                labels = [IGNORE_INDEX] * len(ids)
                for s, e in spans:
                    labels[s:e] = ids[s:e]
            counts = plan.counts + self._turn_counts(plan.record, kept)
            kinds = self._token_kinds(plan.segments, starts, len(ids))
            for s, e in spans:
                for kind, n in Counter(kinds[s:e]).items():
                    counts[f"trained_tokens_{KINDS[kind]}"] += n
            out.append(Encoded(plan.record.source, plan.record.row, list(ids), labels, spans, counts=counts,
                               turns=[t.message for t in kept], messages=plan.messages, kinds=kinds))
        return out + apart

    def _encode_apart(self, plan: _Plan, turn: _Turn, prompt_ids: list[int]) -> Encoded:
        """The turn as its own example: ``tok(P_k) + tok(target)``, what a server feeds and the model emits."""
        completion = plan.text[turn.prompt_end:turn.end]
        completion_ids = self.backend.encode(completion, add_special_tokens=False).ids
        decoded = self.backend.decode(completion_ids, skip_special_tokens=False)
        if _nfc(decoded) != _nfc(completion):
            raise Refused("decode-mismatch", f"assistant message {turn.message}: the completion decodes to "
                                              f"{decoded[:60]!r}, not {completion[:60]!r}")
        ids = list(prompt_ids) + completion_ids
        labels = list(ids) if self.options.train_on_prompt else [IGNORE_INDEX] * len(prompt_ids) + completion_ids
        counts = Counter({"tokenized_apart": 1}) + self._turn_counts(plan.record, [turn])
        prompt_enc = self.backend.encode(plan.text[:turn.prompt_end], add_special_tokens=False)
        completion_enc = self.backend.encode(completion, add_special_tokens=False)
        kinds = (self._token_kinds(plan.segments, [o[0] for o in prompt_enc.offsets], len(prompt_ids))
                 + self._token_kinds(plan.segments, [o[0] for o in completion_enc.offsets], len(completion_ids),
                                     offset=turn.prompt_end))
        for kind, n in Counter(kinds[len(prompt_ids):]).items():
            counts[f"trained_tokens_{KINDS[kind]}"] += n
        return Encoded(plan.record.source, plan.record.row, ids, labels, [(len(prompt_ids), len(ids))],
                       tokenized_apart=True, counts=counts, turns=[turn.message], messages=turn.message + 1, kinds=kinds)

    @staticmethod
    def _turn_counts(record: Record, turns: list[_Turn]) -> Counter:
        counts: Counter = Counter(turns_trained=len(turns))
        for turn in turns:
            message = record.messages[turn.message]
            counts["turns_trained_tool_call"] += bool(message.tool_calls)
            counts["turns_trained_reasoning"] += bool(message.reasoning)
        return counts

    def _check_decode(self, plan: _Plan, ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]],
                      turns: list[_Turn]) -> None:
        decoded = self.backend.decode_batch([ids[s:e] for s, e in spans], skip_special_tokens=False)
        for (s, e), text, turn in zip(spans, decoded, turns):
            rendered = plan.text[offsets[s][0]:offsets[e - 1][1]]
            target = plan.text[turn.prompt_end:turn.end]
            expected = self._without_absorbed_whitespace(plan.text, ids, offsets, s, e) if self._absorbing else rendered
            # SentencePiece decoders drop the "▁" of a run's first token; compare modulo whitespace at the run's edges.
            if text.strip() != expected.strip() and _nfc(text).strip() != _nfc(expected).strip():
                raise Refused("decode-mismatch", f"assistant message {turn.message}: decoded tokens {text[:60]!r} differ "
                                                  f"from the rendered text {expected[:60]!r}")
            if rendered.strip() != target.strip() and not self._absorbing:
                raise Refused("decode-mismatch", f"assistant message {turn.message}: the trained tokens cover "
                                                  f"{rendered[:60]!r}, not the turn's target {target[:60]!r}")
            if not all(piece in rendered for piece in _content_pieces(turn.content)):
                raise Refused("content-mismatch",
                               f"assistant message {turn.message}: the trained text does not contain the assistant content "
                               f"(the template rewrites it beyond whitespace trimming): {rendered[:60]!r}")
            if not rendered.rstrip().endswith(turn.marker.strip()):
                raise Refused("no-end-of-turn", f"assistant message {turn.message} does not end with {turn.marker!r}")

    def _absorbs(self, token_id: int, offset: tuple[int, int], text: str, char_end: int) -> bool:
        """True when the token ending past ``char_end`` is an added token whose overhang is whitespace it swallowed."""
        content = self._absorbing.get(token_id)
        return (content is not None and offset[0] < char_end < offset[1]
                and text[offset[0]:char_end].strip() == content and text[char_end:offset[1]].isspace())

    def _without_absorbed_whitespace(self, text: str, ids: list[int], offsets: list[tuple[int, int]], s: int, e: int) -> str:
        """The rendered text of tokens ``[s, e)`` with the whitespace swallowed by lstrip/rstrip added tokens removed
        (only whitespace: any other text under such a token's offsets is kept, so the decode check still fails)."""
        pieces, at = [], offsets[s][0]
        for i in range(s, e):
            content = self._absorbing.get(ids[i])
            if content is None:
                continue
            a, b = offsets[i]
            covered = text[a:b]
            if covered.strip() == content:
                pieces.append(text[at:a])
                pieces.append(content)
                at = b
        pieces.append(text[at:offsets[e - 1][1]])
        return "".join(pieces)

    def _pieces(self, ids: list[int]) -> str:
        return "[" + ", ".join(f"{self.backend.id_to_token(i)!r}={i}" for i in ids) + "]"

    # -- raw text -------------------------------------------------------------------------------------------------

    def _check_text(self, record: Record) -> str:
        return self._clean(record.text, self._added_re, "the text")

    def _finish_text(self, record: Record, enc: Any) -> Encoded:
        ids = list(enc.ids)
        if not record.continued and self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids.append(self.eos_id)  # documents are separated by EOS (continued-pretraining convention)
        return Encoded(record.source, record.row, ids, list(ids), [(0, len(ids))], is_text=True, kinds=[3] * len(ids))

    # -- batch ------------------------------------------------------------------------------------------------

    def encode_batch(self, records: list[Record]) -> tuple[list[Encoded], list[Problem]]:
        """Encode a batch; returns the examples (input order; a record may give several) and the problems of the rows
        that could not be encoded (all or nothing per row)."""
        problems: dict[int, Problem] = {}
        plans: list[tuple[int, _Plan]] = []
        texts: list[tuple[int, Record, str]] = []
        results: dict[int, list[Encoded]] = {}

        def refuse(position: int, record: Record, e: Refused) -> None:
            problems[position] = Problem(record.source, record.row, "render", e.kind, e.detail)
            results.pop(position, None)

        for position, record in enumerate(records):
            try:
                if record.is_chat:
                    plans.extend((position, plan) for plan in self._plan(record))
                else:
                    texts.append((position, record, self._check_text(record)))
            except Refused as e:
                refuse(position, record, e)
        chat_inputs: list[str] = []
        for _, plan in plans:
            chat_inputs.append(plan.text)
            chat_inputs.extend(plan.text[turn.cut:turn.prompt_end] for turn in plan.turns)
        encodings = self.backend.encode_batch(chat_inputs, add_special_tokens=False) if chat_inputs else []
        i = 0
        for position, plan in plans:
            n = len(plan.turns)
            full_enc, tail_encs = encodings[i], encodings[i + 1:i + 1 + n]
            i += 1 + n
            if position in problems:
                continue
            try:
                results.setdefault(position, []).extend(self._finish(plan, full_enc, tail_encs))
            except Refused as e:
                refuse(position, plan.record, e)
        if texts:
            text_encodings = self.backend.encode_batch([text for _, _, text in texts], add_special_tokens=True)
            for (position, record, _), enc in zip(texts, text_encodings):
                results[position] = [self._finish_text(record, enc)]
        ordered = [e for position in sorted(results) for e in results[position]]
        return ordered, [problems[p] for p in sorted(problems)]


def truncate(example: Encoded, max_length: int) -> Encoded | None:
    """Cut ``example`` to ``max_length`` tokens from the right; None when no trained token would remain."""
    if len(example.input_ids) <= max_length:
        return example
    labels = example.labels[:max_length]
    if all(x == IGNORE_INDEX for x in labels):
        return None
    kept = [(span, turn) for span, turn in zip(example.spans, example.turns or [None] * len(example.spans)) if span[0] < max_length]
    spans = [(s, min(e, max_length)) for (s, e), _ in kept]
    turns = [t for _, t in kept] if example.turns else []
    return Encoded(example.source, example.row, example.input_ids[:max_length], labels, spans, truncated=True,
                   is_text=example.is_text, tokenized_apart=example.tokenized_apart, counts=example.counts, turns=turns,
                   messages=example.messages, kinds=example.kinds[:max_length])


# -- what a template writes ---------------------------------------------------------------------------------------

def _alternation(strings: set[str]) -> re.Pattern | None:
    return re.compile("|".join(re.escape(s) for s in sorted(strings, key=len, reverse=True))) if strings else None


def _strip_suffix(text: str, suffix: str) -> str:
    return text[:-len(suffix)] if suffix and text.endswith(suffix) else text


def _probe_render(template: ChatTemplate, messages: list[dict[str, Any]], generation: bool = False, **kwargs: Any) -> str | None:
    """A render of a probe conversation, or None when the template refuses it; a template that goes past its render
    budget on a two-message probe cannot be used at all (a clear error now rather than every row timing out)."""
    try:
        return template.render(messages, add_generation_prompt=generation, **kwargs)
    except TemplateBudgetError as e:
        raise DataError(f"template {template.name!r} cannot be used: {e} on a two-message conversation") from None
    except Exception:
        return None


def _tool_call_message(message: dict[str, Any], arguments_as_string: bool, empty_as_none: bool) -> dict[str, Any]:
    message = dict(message)
    if arguments_as_string:
        message["tool_calls"] = [{**call, "function": {**call["function"],
                                                       "arguments": json.dumps(call["function"]["arguments"], ensure_ascii=False)}}
                                 for call in message["tool_calls"]]
    if empty_as_none and not message["content"]:
        message["content"] = None
    return message


def tool_call_form(template: ChatTemplate) -> tuple[bool, bool]:
    """How this template wants tool calls: (arguments as a JSON string, empty content as None).

    Servers hand templates the arguments as an object and an empty content as it came; most templates render that. The
    DeepSeek templates concatenate the arguments as a string and skip a tool call whose content is ``""`` rather than
    ``None``, which would make every tool-call row a refusal: the first form that renders the call is used.
    """
    call = {"type": "function", "function": {"name": "sftdata_probe", "arguments": {"probe_key": "probe_value"}}}
    user = {"role": "user", "content": _SENT.format("U")}
    for as_string in (False, True):
        for as_none in (False, True):
            message = _tool_call_message({"role": "assistant", "content": "", "tool_calls": [call]}, as_string, as_none)
            text = _probe_render(template, [user, message])
            if text and "sftdata_probe" in text and "probe_value" in text and "'probe_key'" not in text:
                return as_string, as_none
    return False, False


def trailing_header(template: ChatTemplate, added: set[str]) -> str:
    """The next-turn header a template writes after the final message, whatever it is (early Llama-3-Instruct writes
    ``<|start_header_id|>assistant<|end_header_id|>\\n\\n`` after every conversation); "" for most templates.

    It is the longest proper suffix of the text after a final assistant reply that starts at an added token and is also
    the end of the text the template writes between a user message and the assistant reply: that is, the assistant
    header. The model stops at the end-of-turn token before it and never generates it, so it is never trained.
    """
    user, reply = _SENT.format("U"), _SENT.format("A")
    text = _probe_render(template, [{"role": "user", "content": user}, {"role": "assistant", "content": reply}])
    if text is None or user not in text or reply not in text:
        return ""
    between = text[text.index(user) + len(user):text.index(reply)]
    after = text[text.rindex(reply) + len(reply):]
    pattern = _alternation(added)
    if pattern is None:
        return ""
    for m in pattern.finditer(after):
        if m.start() > 0 and between.endswith(after[m.start():]) and after[:m.start()].strip():
            return after[m.start():]
    return ""


def text_markers(template: ChatTemplate) -> set[str]:
    """Markup the template writes around messages (``[INST]``, ``<<SYS>>``, ``### Response:``, ``<|im_start|>`` ...),
    read from sentinel renders: content that contains one would forge the conversation's structure."""
    shapes = (("user", "assistant"), ("system", "user", "assistant"), ("user", "assistant", "user", "assistant"),
              ("user", "assistant", "tool", "assistant"))
    markers: set[str] = set()
    for shape in shapes:
        messages = [{"role": r, "content": _SENT.format(i)} for i, r in enumerate(shape)]
        for generation in (False, True):
            text = _probe_render(template, messages if not generation else messages[:-1], generation)
            if text is None:
                continue
            for piece in re.split(r"SFTDATA0PROBE\d+0X", text):
                markers.update(_TEXT_MARKER.findall(piece))
    return markers


def assistant_markup(template: ChatTemplate, added: set[str], header: str) -> set[str]:
    """Added tokens the template writes inside an assistant turn for reasoning and tool calls (``<think>``,
    ``<tool_call>``, gpt-oss ``<|channel|>``): the model emits them, so assistant content may hold them. Tokens of the
    generation prompt and end-of-turn markers are never in this set."""
    pattern = _alternation(added)
    if pattern is None:
        return set()
    user = {"role": "user", "content": _SENT.format("U")}
    call = {"id": "call00001", "type": "function", "function": {"name": "probe", "arguments": {"x": 1}}}
    tools = [{"type": "function", "function": {"name": "probe", "description": "d", "parameters": {"type": "object"}}}]
    replies = ({"role": "assistant", "content": _SENT.format("A"), "reasoning_content": _SENT.format("R"),
                "reasoning": _SENT.format("R"), "thinking": _SENT.format("R")},
               {"role": "assistant", "content": "", "tool_calls": [call]},
               {"role": "assistant", "content": _SENT.format("A"), "tool_calls": [call]})
    inside: set[str] = set()
    excluded = set(pattern.findall(header))
    for reply in replies:
        for kwargs in ({}, {"tools": tools}):
            prompt = _probe_render(template, [user], True, **kwargs)
            full = _probe_render(template, [user, reply], False, **kwargs)
            history = _probe_render(template, [user, reply, user, {"role": "assistant", "content": "x"}], False, **kwargs)
            before = _probe_render(template, [user], False, **kwargs)
            if prompt is not None and before is not None and prompt.startswith(before):
                for token in pattern.findall(prompt[len(before):]):  # what the generation prompt itself writes
                    if re.fullmatch(r"<[a-z_]+>", token):
                        # a block the prompt opens (<think>): the model writes its content and closing tag, and data
                        # holds it inline (<think>...</think> at the start of the content)
                        inside.update(t for t in (token, "</" + token[1:]) if t in added)
                    else:
                        excluded.add(token)
            if prompt is None or full is None or not full.startswith(prompt):
                continue
            tail = _strip_suffix(full[len(prompt):], header).rstrip()
            found = pattern.findall(tail)
            if found:
                excluded.add(found[-1] if tail.endswith(found[-1]) else "")
            inside.update(found)
            if history is not None:
                at = history.find(_SENT.format("A"))
                if at >= 0:
                    after = pattern.match(history, at + len(_SENT.format("A")))
                    if after is not None:
                        excluded.add(after.group(0))
    return inside - excluded


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _content_pieces(content: str) -> list[str]:
    """The parts of an assistant content that must appear in its trained text: the whole content, or, when it holds an
    inline reasoning block (``<think>...</think>``) that the template lays out itself, the reasoning and the answer."""
    if "think>" not in content:  # the common case, without the regex
        stripped = content.strip()
        return [stripped] if stripped else []
    return [p.strip() for p in re.split(r"</?think>", content) if p.strip()]


def _nfc(text: str) -> str:
    # Tokenizers with an NFC normalizer (Qwen) decode composed characters; the rendered text may hold decomposed ones.
    return unicodedata.normalize("NFC", text)


def _first_difference(a: str, b: str) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def _excerpt(a: str, b: str) -> str:
    i = _first_difference(a, b)
    return f"differ at character {i}: {a[max(0, i - 20):i + 20]!r} vs {b[max(0, i - 20):i + 20]!r}"
