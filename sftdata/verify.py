"""Template fidelity: check a template/tokenizer pair on a built-in suite of conversations before building with it.

``verify(tokenizer, template)`` renders :data:`SUITE` (single and multi-turn, with and without a system prompt,
empty / whitespace / unicode content, content containing template markers) and runs these checks, each reported as
pass, fail (with a precise diff) or skip:

``fidelity``        ``T`` renders byte-identically to the tokenizer's own ``chat_template`` (as
                    ``tokenizer.apply_chat_template`` renders it), full conversations and every serving prompt.
``serving-prefix``  I2 for every trained assistant turn: ``P_k`` is a text prefix of the rendered example and
                    ``tok(P_k)`` a token prefix of its ``input_ids`` — for ``T`` and (informational) for the
                    tokenizer's own template.
``history``         whether ``T`` renders earlier assistant turns as they render as the final turn, and the history
                    policy applied when it does not (:mod:`sftdata.policy`).
``exact-masks``     I3/I4 through :class:`sftdata.render.Encoder`: labels equal ``input_ids`` exactly on the trained
                    spans and ``-100`` elsewhere, one span per trained turn, and each span decodes to the text the
                    template generates for the turn (content, modulo the template's whitespace rule, plus end marker).
``round-trip``      the rendered text parses back into the original messages (:func:`parse_rendered`).
``special-tokens``  BOS/EOS/end-of-turn markers exist in the vocabulary and are single tokens, the end-of-turn token
                    is trained, no double BOS.

Ordinary conversations ("core" cases) must pass. Edge cases (leading newlines, whitespace-only content ...) may be
refused by the encoder — what counts is that a refused row is reported with its reason and never trained silently,
so a refusal there is a note, not a failure.

``serving-prefix``, ``history``, ``exact-masks`` and ``special-tokens`` are invariant checks: ``build`` refuses a
pair that fails one of them unless told otherwise. ``fidelity`` and ``round-trip`` are fidelity checks: a template
that differs from the tokenizer's own (plain ChatML on a Qwen3 tokenizer, a legitimate choice for a base model) is
reported, warned about and recorded, not refused.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field, replace
from typing import Any

from sftdata.policy import HistoryDecision, plan_history_policy
from sftdata.record import Message, Record
from sftdata.render import IGNORE_INDEX, EncodeOptions, Encoder, Refused
from sftdata.templates import ChatTemplate, load_template

PASS, FAIL, SKIP = "pass", "fail", "skip"
INVARIANT_CHECKS = ("serving-prefix", "history", "exact-masks", "special-tokens")


# -- the suite ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One suite conversation. ``core`` cases are ordinary data that must encode; edge cases may be refused.

    ``feature`` cases (``tools``, ``reasoning``) need a template that renders tool calls or reasoning: a template
    without the feature refuses such rows with a precise reason (a note), one with it must encode them exactly.
    """

    name: str
    messages: tuple[tuple[str, str] | Message, ...]
    core: bool = True
    tools: tuple[dict[str, Any], ...] | None = None
    feature: str | None = None

    def message_objects(self) -> list[Message]:
        return [m if isinstance(m, Message) else Message(*m) for m in self.messages]

    def record(self, row: int = 1) -> Record:
        return Record("verify-suite", row, self.message_objects(), tools=list(self.tools) if self.tools else None)

    def dicts(self) -> list[dict[str, Any]]:
        return [m.to_dict() for m in self.message_objects()]


def _call(name: str, call_id: str, **arguments: Any) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


_WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
_TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


SUITE: tuple[Case, ...] = (
    Case("single-turn", (("user", "What is the capital of France?"), ("assistant", "The capital of France is Paris."))),
    Case("system-prompt", (("system", "You are a concise assistant."), ("user", "Name a prime number."),
                           ("assistant", "7 is a prime number."))),
    Case("multi-turn", (("user", "Hi!"), ("assistant", "Hello! How can I help?"), ("user", "What is 2 + 2?"),
                        ("assistant", "2 + 2 = 4."), ("user", "And times 3?"), ("assistant", "12."))),
    Case("multi-turn-system", (("system", "Answer in one word."), ("user", "Color of the sky?"), ("assistant", "Blue."),
                               ("user", "And grass?"), ("assistant", "Green."))),
    Case("unicode", (("user", "Traduis « bonjour » en 日本語 et en العربية, s'il te plaît 🙏"),
                     ("assistant", "こんにちは — مرحبا — Grüße aus Köln 👩\u200d💻 ∑ x² ≤ ∞"))),
    Case("unicode-decomposed", (("user", "Cafe\u0301 or café?"), ("assistant", "Cafe\u0301 (NFD) and café (NFC).")),
         core=False),
    Case("multiline", (("user", "Write a Python function that adds two numbers."),
                       ("assistant", "```python\ndef add(a, b):\n    return a + b\n```\n\n- handles ints\n- and floats"))),
    Case("empty-assistant", (("user", "Say nothing."), ("assistant", "")), core=False),
    Case("empty-user", (("user", ""), ("assistant", "You sent an empty message."))),
    Case("surrounding-whitespace", (("user", "  padded question  "), ("assistant", "  padded answer \n")), core=False),
    Case("leading-newline", (("user", "Start with a newline."), ("assistant", "\nA reply that starts on a new line.")),
         core=False),
    Case("whitespace-only", (("user", "Reply with spaces."), ("assistant", "   ")), core=False),
    Case("leading-punctuation", (("user", "Continue: one, two"), ("assistant", ", three, four.")), core=False),
    Case("template-markers", (("user", "What do <|im_end|>, <|eot_id|>, [INST] and </s> mean in a prompt?"),
                              ("assistant", "They are control markers such as <|im_start|>, <end_of_turn> and [/INST].")),
         core=False),
    Case("tool-call", (Message("user", "What is the weather in Paris?"),
                       Message("assistant", "", tool_calls=[_call("get_weather", "call12345", city="Paris")]),
                       Message("tool", '{"temperature": 21, "unit": "celsius"}', tool_call_id="call12345", name="get_weather"),
                       Message("assistant", "It is 21 °C in Paris.")), tools=(_WEATHER,), feature="tools"),
    Case("tool-call-with-text", (Message("user", "Weather in Oslo, in fahrenheit?"),
                                 Message("assistant", "Let me check.",
                                         tool_calls=[_call("get_weather", "call23456", city="Oslo", unit="fahrenheit")]),
                                 Message("tool", '{"temperature": 41}', tool_call_id="call23456", name="get_weather"),
                                 Message("assistant", "It is 41 °F in Oslo.")), tools=(_WEATHER,), feature="tools"),
    Case("parallel-calls", (Message("user", "Weather and time in Tokyo?"),
                            Message("assistant", "", tool_calls=[_call("get_weather", "call34567", city="Tokyo"),
                                                                 _call("get_time", "call45678", city="Tokyo")]),
                            Message("tool", '{"temperature": 18}', tool_call_id="call34567", name="get_weather"),
                            Message("tool", '{"time": "09:30"}', tool_call_id="call45678", name="get_time"),
                            Message("assistant", "18 °C, and it is 09:30 in Tokyo.")), tools=(_WEATHER, _TIME),
         feature="tools"),
    Case("reasoning", (Message("user", "Is 91 prime?"),
                       Message("assistant", "No: 91 = 7 × 13.",
                               reasoning="91 is odd. 91 / 7 = 13, so 7 divides it.")), feature="reasoning"),
    Case("reasoning-multi-turn", (Message("system", "Think before answering."), Message("user", "2 + 3?"),
                                  Message("assistant", "5.", reasoning="Add them: 5."), Message("user", "Times 4?"),
                                  Message("assistant", "20.", reasoning="5 × 4 = 20.")), feature="reasoning"),
    Case("reasoning-and-tools", (Message("user", "Should I take an umbrella in London?"),
                                 Message("assistant", "", reasoning="I need the weather first.",
                                         tool_calls=[_call("get_weather", "call56789", city="London")]),
                                 Message("tool", '{"temperature": 12, "rain": true}', tool_call_id="call56789",
                                         name="get_weather"),
                                 Message("assistant", "Yes, it is raining in London.", reasoning="Rain is forecast.")),
         tools=(_WEATHER,), feature="tools"),
)

# Refusals that mean "this template cannot render the feature": rows like it are reported, never trained.
_UNSUPPORTED = ("template-error", "tool-calls-not-rendered", "reasoning-not-rendered", "tools-not-rendered",
                "tool-result-not-rendered", "content-not-rendered", "reasoning-off")



# -- results --------------------------------------------------------------------------------------------------------

@dataclass
class CheckResult:
    """One check: ``status`` pass/fail/skip, a one-line ``detail``, ``failures`` (per case, precise diffs) and
    ``notes`` (edge cases refused with their reason, policy decisions)."""

    name: str
    subject: str
    status: str
    detail: str
    invariant: bool
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.name, "subject": self.subject, "status": self.status, "invariant": self.invariant,
                "detail": self.detail, "failures": self.failures, "notes": self.notes}


@dataclass
class VerifyReport:
    template: str
    template_origin: str
    template_sha256: str
    tokenizer: str
    tokenizer_has_template: bool
    history: HistoryDecision
    checks: list[CheckResult]

    @property
    def ok(self) -> bool:
        """True when no check failed (``sftdata verify`` exits 0)."""
        return all(c.status != FAIL for c in self.checks)

    @property
    def invariant_ok(self) -> bool:
        """True when every invariant check (serving prefix, history, exact masks, special tokens) passed."""
        return all(c.status != FAIL for c in self.checks if c.invariant)

    @property
    def invariant_failures(self) -> list[CheckResult]:
        return [c for c in self.checks if c.invariant and c.status == FAIL]

    @property
    def differs_from_tokenizer(self) -> bool | None:
        """True when ``T`` renders differently from the tokenizer's own chat_template; None when it has none."""
        for c in self.checks:
            if c.name == "fidelity":
                return None if c.status == SKIP else c.status == FAIL
        return None

    def check(self, name: str, subject: str = "template") -> CheckResult | None:
        return next((c for c in self.checks if c.name == name and c.subject == subject), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "template": {"name": self.template, "origin": self.template_origin, "sha256": self.template_sha256},
            "tokenizer": self.tokenizer,
            "tokenizer_has_chat_template": self.tokenizer_has_template,
            "ok": self.ok,
            "invariant_ok": self.invariant_ok,
            "differs_from_tokenizer_template": self.differs_from_tokenizer,
            "history_policy": self.history.to_dict(),
            "checks": [c.to_dict() for c in self.checks],
        }

    def manifest_entry(self) -> dict[str, Any]:
        """What ``build`` records under ``manifest["verify"]``."""
        return {
            "ok": self.ok,
            "invariant_ok": self.invariant_ok,
            "differs_from_tokenizer_template": self.differs_from_tokenizer,
            "history_policy": self.history.to_dict(),
            "checks": {f"{c.name}:{c.subject}": c.status for c in self.checks},
            "failures": {f"{c.name}:{c.subject}": c.failures[:5] for c in self.checks if c.status == FAIL},
        }

    def format_text(self, max_lines: int = 6) -> str:
        """Plain-text report (the diff ``build`` prints when it refuses)."""
        lines = [f"verify {self.template} ({self.template_origin}) on {self.tokenizer}:"]
        for c in self.checks:
            lines.append(f"  [{c.status.upper():4}] {c.name} ({c.subject}): {c.detail}")
            for f in c.failures[:max_lines]:
                lines.append(f"         - {f}")
            if len(c.failures) > max_lines:
                lines.append(f"         ... and {len(c.failures) - max_lines} more")
        return "\n".join(lines)


# -- helpers --------------------------------------------------------------------------------------------------------

def _first_difference(a: str, b: str) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def text_diff(a: str, b: str, label_a: str = "expected", label_b: str = "got", context: int = 30) -> str:
    """Where two strings first differ, with an excerpt of each."""
    i = _first_difference(a, b)
    return (f"differ at character {i} (lengths {len(a)} vs {len(b)}): {label_a} "
            f"{a[max(0, i - context):i + context]!r} vs {label_b} {b[max(0, i - context):i + context]!r}")


_SUITE_REASONING = "Work it out step by step before answering."


def _suite_for(encoder: Encoder, suite: tuple[Case, ...]) -> tuple[tuple[Case, ...], str | None]:
    """The suite the encoding checks run: ``suite`` itself, or, for a template whose generation prompt opens a
    reasoning block (QwQ, DeepSeek-R1), the suite with a reasoning trace on every assistant turn that has none: such a
    template refuses turns without reasoning (``missing-reasoning``, a row problem), and checking only refusals would
    check nothing."""
    probe = next(case for case in suite if case.core and case.feature is None)
    _, refused = _encode_case(encoder, probe)
    if refused is None or refused.kind != "missing-reasoning":
        return suite, None

    def with_reasoning(case: Case) -> Case:
        messages = tuple(replace(m, reasoning=_SUITE_REASONING)
                         if m.role == "assistant" and not m.reasoning and not m.content.lstrip().startswith("<think>")
                         else m for m in case.message_objects())
        return replace(case, messages=messages, feature=case.feature or "reasoning")

    return (tuple(with_reasoning(case) for case in suite),
            "the generation prompt opens a reasoning block: turns without reasoning are refused (missing-reasoning, "
            f"a row problem); the suite was encoded with the reasoning {_SUITE_REASONING!r} on every assistant turn")


def _escaped(encoder: Encoder, case: Case) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The case's messages and tools as the template receives them under ``--special-text escape``."""
    escaping = encoder.with_options(special_text="escape")
    messages, tools, _ = escaping.template_input(case.record())
    return messages, tools


def _render(template: ChatTemplate, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
            tools: list[dict[str, Any]] | None = None) -> tuple[str | None, str | None]:
    try:
        return template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools), None
    except Exception as e:  # raise_exception in the template, or an error
        return None, f"{type(e).__name__}: {e}"


def _tokenizer_template(tokenizer: Any) -> str | None:
    source = getattr(tokenizer, "chat_template", None)
    if isinstance(source, dict):
        source = source.get("default")
    return source or None


def _tokenizer_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "sftdata_name", None) or getattr(tokenizer, "name_or_path", "?")


def _pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    return [tokenizer.backend_tokenizer.id_to_token(i) for i in ids]


# -- parsing back (round trip) ----------------------------------------------------------------------------------------

_SENT = "SFTDATA0PARSE{}0X"
_LPAD, _RPAD = "\n\t\u3000 ", " \u3000\t\n"


@dataclass(frozen=True)
class Skeleton:
    """The literal text a template writes around each message of a conversation shape (a tuple of roles), learned
    by rendering sentinel contents, plus the whitespace rule it applies to each message's content."""

    roles: tuple[str, ...]
    separators: tuple[str, ...]  # len(roles) + 1
    rules: tuple[tuple[str | None, str | None], ...]  # per message: (lstrip chars, rstrip chars); "" = untouched

    def normalize(self, i: int, content: str) -> str:
        left, right = self.rules[i]
        if left != "":
            content = content.lstrip(left)
        if right != "":
            content = content.rstrip(right)
        return content

    @property
    def pattern(self) -> re.Pattern:
        body = "(.*?)".join(re.escape(s) for s in self.separators)
        return re.compile(body, re.S)

    @property
    def loose_pattern(self) -> re.Pattern:
        """The pattern with the whitespace at each separator's edges made optional: templates that strip a whole
        block (Llama-2 strips system + user together, so an empty user message takes the ``\n\n`` after
        ``<</SYS>>`` with it) write a separator with less whitespace than the skeleton learned."""
        body = "(.*?)".join(r"\s*" + re.escape(s.strip()) + r"\s*" for s in self.separators)
        return re.compile(body, re.S)


_SKELETONS: dict[tuple, Skeleton | None] = {}


def skeleton(template: ChatTemplate, roles: tuple[str, ...]) -> Skeleton | None:
    """The skeleton of ``template`` for a conversation with these roles; None when the template refuses the shape or
    does not write each content verbatim (modulo whitespace)."""
    key = (template.sha256, tuple(sorted(template.special_tokens.items())), roles)
    if key in _SKELETONS:
        return _SKELETONS[key]
    result = None
    plain, _ = _render(template, [{"role": r, "content": _SENT.format(i)} for i, r in enumerate(roles)])
    padded, _ = _render(template, [{"role": r, "content": _LPAD + _SENT.format(i) + _RPAD} for i, r in enumerate(roles)])
    if plain is not None and padded is not None:
        seps, at = [], 0
        for i in range(len(roles)):
            j = plain.find(_SENT.format(i), at)
            if j < 0 or plain.count(_SENT.format(i)) != 1:
                break
            seps.append(plain[at:j])
            at = j + len(_SENT.format(i))
        else:
            seps.append(plain[at:])
            rules = _learn_rules(padded, seps, len(roles))
            if rules is not None:
                result = Skeleton(roles, tuple(seps), tuple(rules))
    _SKELETONS[key] = result
    return result


def _learn_rules(padded: str, seps: list[str], n: int) -> list[tuple[str | None, str | None]] | None:
    """Which part of the whitespace padding around each sentinel survived the template: its whitespace rule."""
    positions = []
    for i in range(n):
        j = padded.find(_SENT.format(i))
        if j < 0:
            return None
        positions.append((j, j + len(_SENT.format(i))))
    kept_left, kept_right = [""] * n, [""] * n
    bounds = [0] + [p for pair in positions for p in pair] + [len(padded)]
    for i in range(n + 1):
        segment = padded[bounds[2 * i]:bounds[2 * i + 1]]
        sep = seps[i]
        for j in range(len(segment) - len(sep) + 1):
            right, left = segment[:j], segment[j + len(sep):]
            if segment[j:j + len(sep)] == sep and (i == 0 or _RPAD.startswith(right)) and (i == n or _LPAD.endswith(left)) \
                    and (i > 0 or not right) and (i < n or not left):
                if i > 0:
                    kept_right[i - 1] = right
                if i < n:
                    kept_left[i] = left
                break
        else:
            return None
    rules = []
    for i in range(n):
        lremoved = _LPAD[:len(_LPAD) - len(kept_left[i])]
        rremoved = _RPAD[len(kept_right[i]):]
        rules.append((None if lremoved == _LPAD else "".join(sorted(set(lremoved))),
                      None if rremoved == _RPAD else "".join(sorted(set(rremoved)))))
    return rules


def _candidate_shapes(template: ChatTemplate, text: str, max_pairs: int = 64):
    """Shapes ``[system] + (user, assistant) * n``, most messages first: a shorter shape can always absorb later turns
    into one message's content, so the longest shape that matches is the natural parse."""
    seps = {s for shape in (("user", "assistant"), ("user", "assistant") * 2)
            for sk in [skeleton(template, shape)] if sk is not None for s in sk.separators[1:] if s}
    most = min(max_pairs, max((text.count(s) for s in seps), default=max_pairs - 1) + 1)
    for pairs in range(most, 0, -1):
        base = ("user", "assistant") * pairs
        yield ("system",) + base
        yield base


def parse_rendered(template: ChatTemplate, text: str, roles: list[str] | tuple[str, ...] | None = None) -> list[dict[str, str]] | None:
    """Parse a rendered conversation back into messages, or None when no shape fits.

    With ``roles`` the shape is known and only contents are recovered; without, shapes ``[system] + (user,
    assistant) * n`` are tried (most messages first, system first) and the first whose skeleton matches is returned. Contents come back
    as the template wrote them (after its whitespace rule, e.g. Llama-3/Gemma ``trim``).
    """
    shapes = [tuple(roles)] if roles is not None else _candidate_shapes(template, text)
    skeletons = [sk for sk in (skeleton(template, shape) for shape in shapes) if sk is not None]
    for sk in skeletons:
        if text.startswith(sk.separators[0]) and text.endswith(sk.separators[-1]):
            match = sk.pattern.fullmatch(text)
            if match is not None:
                return [{"role": r, "content": c} for r, c in zip(sk.roles, match.groups())]
    # Second chance, whitespace-tolerant: accepted only when the parse renders back to exactly ``text``.
    for sk in skeletons:
        match = sk.loose_pattern.fullmatch(text)
        if match is not None:
            parsed = [{"role": r, "content": c} for r, c in zip(sk.roles, match.groups())]
            rendered, _ = _render(template, parsed)
            if rendered == text:
                return parsed
    return None


# -- the checks -----------------------------------------------------------------------------------------------------

def _fidelity(template: ChatTemplate, tokenizer: Any, suite: tuple[Case, ...]) -> CheckResult:
    own = _tokenizer_template(tokenizer)
    subject = "template vs tokenizer.chat_template"
    if own is None:
        return CheckResult("fidelity", subject, SKIP, "the tokenizer has no chat_template to compare with", False)
    failures: list[str] = []
    renders = 0
    for case in suite:
        msgs = case.dicts()
        tools = list(case.tools) if case.tools else None
        variants = [(msgs, False)] + [(msgs[:k], True) for k, m in enumerate(msgs) if m["role"] == "assistant"]
        for conv, gen in variants:
            ours, our_err = _render(template, conv, gen, tools)
            try:
                theirs, their_err = tokenizer.apply_chat_template(conv, tools=tools, tokenize=False,
                                                                  add_generation_prompt=gen), None
            except Exception as e:
                theirs, their_err = None, f"{type(e).__name__}: {e}"
            renders += 1
            what = f"{case.name} ({len(conv)} messages{', generation prompt' if gen else ''})"
            if ours is None and theirs is None:
                continue  # both refuse the conversation
            if ours is None or theirs is None:
                failures.append(f"{what}: {'template' if ours is None else 'tokenizer template'} refuses it "
                                f"({our_err or their_err}) but the other renders it")
            elif ours != theirs:
                failures.append(f"{what}: " + text_diff(theirs, ours, "tokenizer.chat_template", "template"))
    same_source = template.source == own
    if failures:
        return CheckResult("fidelity", subject, FAIL,
                           f"renders differently from the tokenizer's own chat_template in {len(failures)} of {renders} renders",
                           False, failures)
    return CheckResult("fidelity", subject, PASS,
                       f"byte-identical to tokenizer.apply_chat_template on {renders} renders"
                       + (" (same source)" if same_source else ""), False)


def _encode_case(encoder: Encoder, case: Case) -> tuple[list[Any], Refused | None]:
    """Encode one suite case (control-token text escaped); the examples, or the reason it was refused."""
    escaping = encoder.with_options(special_text="escape")
    examples, problems = escaping.encode_batch([case.record()])
    if problems:
        return [], Refused(problems[0].kind, problems[0].detail)
    return examples, None


def _refusal_note(case: Case, refused: Refused) -> tuple[bool, str]:
    """(is a failure, text) for a suite case the encoder refused."""
    if case.feature and refused.kind in _UNSUPPORTED:
        return False, f"{case.name}: the template does not support {case.feature} ([{refused.kind}]); such rows are refused"
    if refused.kind == "template-error":
        return False, f"{case.name}: the template refuses this conversation"
    if case.core:
        return True, f"{case.name}: refused [{refused.kind}] {refused.detail}"
    return False, f"{case.name} (edge case, refused with a reason, never trained): [{refused.kind}] {refused.detail}"


def _serving_prefix(encoder: Encoder, suite: tuple[Case, ...], subject: str, invariant: bool) -> CheckResult:
    """Re-check I2 on the encoder's output: for every trained turn, ``P_k`` is a text prefix of the example's render
    and ``tok(P_k)`` a token prefix of its ``input_ids``, tokenized here independently of the encoder."""
    template, backend = encoder.template, encoder.backend
    failures, notes = [], []
    checked = 0
    for case in suite:
        examples, refused = _encode_case(encoder, case)
        if refused is not None:
            failure, text = _refusal_note(case, refused)
            (failures if failure and refused.kind.startswith("serving-prefix") else notes).append(text)
            continue
        msgs, tools = _escaped(encoder, case)
        for ex in examples:
            text, _ = _render(template, msgs[:ex.messages], False, tools)
            for k in ex.turns:
                checked += 1
                prompt, _ = _render(template, msgs[:k], True, tools)
                pids = backend.encode(prompt, add_special_tokens=False).ids
                # a composed example is P_k + what the model writes, not a render: only its token prefix is checked
                if not ex.tokenized_apart and not ex.counts["turns_composed"] and not text.startswith(prompt):
                    failures.append(f"{case.name}: turn {k}: the serving prompt is not a text prefix of the example: "
                                    + text_diff(prompt, text, "prompt", "example"))
                elif ex.input_ids[:len(pids)] != pids:
                    ids = ex.input_ids
                    at = next((i for i, (a, b) in enumerate(zip(ids, pids)) if a != b), min(len(ids), len(pids)))
                    failures.append(f"{case.name}: turn {k}: tok(prompt) is not a token prefix of input_ids: at token {at} "
                                    f"the prompt alone gives {_pieces(encoder.tokenizer, pids[at:at + 3])}, the example "
                                    f"{_pieces(encoder.tokenizer, ids[at:at + 3])}")
                elif ex.tokenized_apart:
                    notes.append(f"{case.name}: turn {k} is tokenized as tok(prompt) + tok(completion) (the prompt's last "
                                 "token merges with the completion in context)")
    if checked == 0:
        return CheckResult("serving-prefix", subject, FAIL if invariant else SKIP,
                           "the template renders none of the suite's conversations", invariant, failures, notes)
    if failures:
        return CheckResult("serving-prefix", subject, FAIL,
                           f"I2 broken for {len(failures)} ordinary conversation turns (of {checked} checked)", invariant,
                           failures, notes)
    return CheckResult("serving-prefix", subject, PASS,
                       f"tok(P_k) is a token prefix for all {checked} trained turns checked"
                       + (f"; {len(notes)} note(s)" if notes else ""), invariant, failures, notes)


def _history(template: ChatTemplate, decision: HistoryDecision) -> CheckResult:
    if decision.mismatch is None:
        return CheckResult("history", "template", PASS, decision.describe(), True)
    if decision.applied == "fail":
        return CheckResult("history", "template", FAIL,
                           "the template renders history differently from the final turn and the policy is 'fail': every "
                           "multi-turn row would be skipped as history-mismatch (use --history-policy split or last)",
                           True, [decision.mismatch])
    return CheckResult("history", "template", PASS, f"renders history differently; policy {decision.describe()}", True,
                       notes=[decision.mismatch])


def _generated_scaffold(template: ChatTemplate, prompt_messages: list[dict[str, str]], role: str = "assistant") -> str | None:
    """Text the template writes between the serving prompt and the assistant content (Qwen3's empty think block)."""
    probe = "SFTDATA0SCAFFOLD0X"
    prompt, _ = _render(template, prompt_messages, True)
    full, _ = _render(template, prompt_messages + [{"role": role, "content": probe}])
    if prompt is None or full is None or not full.startswith(prompt) or probe not in full:
        return None
    return full[len(prompt):full.index(probe)]


def _exact_masks(encoder: Encoder, suite: tuple[Case, ...]) -> tuple[CheckResult, list[tuple[Case, Any]]]:
    failures, notes = [], []
    encoded_cases: list[tuple[Case, Any]] = []
    for case in suite:
        if encoder.options.special_text == "reject":
            try:
                encoder.template_input(case.record())
            except Refused as e:
                notes.append(f"{case.name}: refused under --special-text reject ({e.detail[:90]}...); checked with escape")
        examples, refused = _encode_case(encoder, case)
        if refused is not None:
            failure, text = _refusal_note(case, refused)
            (failures if failure else notes).append(text)
            continue
        msgs, tools = _escaped(encoder, case)
        for ex in examples:
            encoded_cases.append((case, ex))
            problem = _check_example(encoder, ex, msgs, tools, plain=case.feature is None)
            if problem:
                failures.append(f"{case.name}: {problem}")
    status = FAIL if failures or not encoded_cases else PASS
    detail = (f"{len(encoded_cases)} examples encoded with exact labels and decode check"
              if status == PASS else f"{len(failures)} problem(s)" if failures else "no suite conversation could be encoded")
    return CheckResult("exact-masks", "template", status, detail, True, failures, notes), encoded_cases


def _check_example(encoder: Encoder, ex: Any, msgs: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                   plain: bool) -> str | None:
    """Labels equal input_ids exactly on one span per trained turn and -100 elsewhere, and each span decodes to what the
    template generates for the turn. For plain conversations the expected text is built independently of the encoder
    from the template's skeleton (scaffold + content under the template's whitespace rule + end marker); for tool-call
    and reasoning turns it is the turn rendered as the last message, after the serving prompt."""
    template, tokenizer = encoder.template, encoder.tokenizer
    ids, labels = ex.input_ids, ex.labels
    if len(ids) != len(labels):
        return "labels and input_ids differ in length"
    if len(ex.spans) != len(ex.turns):
        return f"{len(ex.spans)} trained spans for {len(ex.turns)} trained turns"
    inside = set()
    for s, e in ex.spans:
        inside.update(range(s, e))
    for i, (t, l) in enumerate(zip(ids, labels)):
        if (i in inside and l != t) or (i not in inside and l != IGNORE_INDEX):
            return f"label {l} at token {i} ({_pieces(tokenizer, [t])[0]!r}) breaks I3"
    example = msgs[:ex.messages]
    for (s, e), k in zip(ex.spans, ex.turns):
        decoded = encoder.backend.decode(ids[s:e], skip_special_tokens=False)
        if plain:
            scaffold = _generated_scaffold(template, example[:k]) or ""
            sk = skeleton(template, tuple(m["role"] for m in example))
            content = example[k]["content"]
            if sk is not None:
                content = sk.normalize(k, content)
            expected = scaffold + content + encoder.end_of_turn
        else:
            prompt, _ = _render(template, example[:k], True, tools)
            through, _ = _render(template, example[:k + 1], False, tools)
            if not through.startswith(prompt):
                problem = _check_composed(encoder, ex, (s, e), example[k], prompt, through, decoded)
                if problem:
                    return f"turn {k}: {problem}"
                continue
            expected = through[len(prompt):]
            if encoder.header and expected.endswith(encoder.header):
                expected = expected[:-len(encoder.header)]
        expected = strip_beside_absorbing_tokens(expected, tokenizer)
        # modulo NFC: tokenizers with an NFC normalizer (Qwen, Llama-3) decode composed characters
        if unicodedata.normalize("NFC", decoded.strip()) != unicodedata.normalize("NFC", expected.strip()):
            return (f"turn {k}: decoded trained tokens != template-generated text + end marker: "
                    + text_diff(expected.strip(), decoded.strip(), "expected", "decoded"))
    return None


def _check_composed(encoder: Encoder, ex: Any, span: tuple[int, int], message: dict[str, Any], prompt: str,
                    through: str, decoded: str) -> str | None:
    """A turn whose serving prompt ``P_k`` is not a prefix of its own render ``Q_k`` (the template renders the context
    differently once the turn exists, or the prompt opens a reasoning block): its example must be ``tok(P_k)`` followed
    by the trained target and nothing else, and the target must hold the message's reasoning and content and end the
    way ``Q_k`` ends after the content."""
    pids = encoder.backend.encode(prompt, add_special_tokens=False).ids
    if ex.input_ids[:len(pids)] != pids or span != (len(pids), len(ex.input_ids)):
        return (f"a composed example is not tok(serving prompt) followed by one trained target: prompt of {len(pids)} "
                f"tokens, trained span {span}, {len(ex.input_ids)} tokens")
    text = unicodedata.normalize("NFC", decoded)
    for part in ((message.get("reasoning_content") or "").strip(), (message.get("content") or "").strip()):
        if part and unicodedata.normalize("NFC", part) not in text:
            return f"the trained target lacks {part[:40]!r}: " + text_diff(part, text, "message", "decoded")
    answer = (message.get("content") or "").strip()
    at = through.rfind(answer) if answer else -1
    if at >= 0:
        tail = through[at:]
        if encoder.header and tail.endswith(encoder.header):
            tail = tail[:-len(encoder.header)]
        tail = unicodedata.normalize("NFC", strip_beside_absorbing_tokens(tail, encoder.tokenizer).strip())
        if not text.strip().endswith(tail):
            return "the trained target does not end as the turn's own render does: " + text_diff(tail, text.strip(),
                                                                                              "render", "decoded")
    return None


def strip_beside_absorbing_tokens(text: str, tokenizer: Any) -> str:
    """``text`` as an added token with ``rstrip``/``lstrip`` (Phi-3's ``<|end|>``) decodes it: the whitespace on that
    side of each occurrence is swallowed at tokenization and never comes back. Written from the AddedToken flags, not
    from token offsets, so this check stays independent of the encoder's."""
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        marker = re.escape(token.content)
        if getattr(token, "rstrip", False):
            text = re.sub(marker + r"\s+", lambda m: token.content, text)
        if getattr(token, "lstrip", False):
            text = re.sub(r"\s+" + marker, lambda m: token.content, text)
    return text


_MARKER = re.compile(r"<[^<>\s]{1,40}>|\[/?[A-Z_]{2,12}\]")


def _special_tokens(encoder: Encoder, encoded: list[tuple[Case, Any]]) -> CheckResult:
    tokenizer = encoder.tokenizer
    backend = tokenizer.backend_tokenizer
    failures, notes = [], []
    vocab_size = len(tokenizer)

    def single(text: str) -> list[int]:
        return backend.encode(text, add_special_tokens=False).ids

    for kind in ("bos", "eos"):
        token, tid = getattr(tokenizer, f"{kind}_token"), getattr(tokenizer, f"{kind}_token_id")
        if token is None:
            (notes if kind == "bos" else failures).append(
                f"no {kind.upper()} token" + ("" if kind == "bos" else ": raw-text documents cannot be separated by EOS"))
            continue
        if tid is None or not (0 <= tid < vocab_size):
            failures.append(f"{kind.upper()} {token!r} has no id in the vocabulary")
        elif single(token) != [tid]:
            failures.append(f"{kind.upper()} {token!r} is not a single token: {_pieces(tokenizer, single(token))}")
    eot = encoder.end_of_turn.strip()
    markers = _MARKER.findall(eot) or [eot]
    eot_ids: list[int] = []
    for m in markers:
        ids = single(m)
        if len(ids) != 1:
            failures.append(f"end-of-turn marker {m!r} is not a single token in this vocabulary (it tokenizes as "
                            f"{_pieces(tokenizer, ids)[:8]}): this is not a tokenizer of the template's family, and the model "
                            "would have to spell its stop marker")
        else:
            eot_ids.append(ids[0])
    if eot_ids and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eot_ids:
        names = [backend.id_to_token(i) for i in eot_ids]
        notes.append(f"end-of-turn token {names[0]!r} (id {eot_ids[0]}) is not eos_token {tokenizer.eos_token!r} "
                     f"(id {tokenizer.eos_token_id}): it is trained explicitly here (failure mode 7, docs/invariants.md); make sure generation "
                     "stops on it (generation_config.eos_token_id)")
    trained_checked = 0
    bos = tokenizer.bos_token_id
    for case, ex in encoded:
        if bos is not None and ex.input_ids[:2] == [bos, bos]:
            failures.append(f"{case.name}: input_ids start with a double BOS")
        for s, e in ex.spans:
            last = backend.id_to_token(ex.input_ids[e - 1])
            if case.feature is None and eot_ids and eot_ids[-1] not in ex.input_ids[s:e]:
                failures.append(f"{case.name}: the end-of-turn token {backend.id_to_token(eot_ids[-1])!r} is not trained in span {s}:{e}")
            elif last not in encoder.added and not (encoder.end_of_turn and backend.decode(ex.input_ids[s:e]).rstrip().endswith(eot)):
                failures.append(f"{case.name}: trained span {s}:{e} ends with {last!r}, not an end-of-turn marker")
            trained_checked += 1
    if encoded:
        first = encoded[0][1].input_ids
        rendered_bos = bos is not None and first[:1] == [bos]
        plain = tokenizer("x", add_special_tokens=True).input_ids
        adds_bos = bos is not None and plain[:1] == [bos]
        if rendered_bos and adds_bos:
            notes.append("the template writes BOS and the tokenizer adds one with add_special_tokens=True: tokenize rendered "
                         "text with add_special_tokens=False (sftdata does), or it starts with a double BOS (trl#1400)")
        elif not rendered_bos and adds_bos:
            notes.append(f"the template writes no BOS although the tokenizer normally adds {tokenizer.bos_token!r}: "
                         "input_ids start without it, exactly as a server that renders this template sends them")
    status = FAIL if failures else PASS
    detail = (f"BOS/EOS/end-of-turn {markers} are single tokens; end-of-turn trained in {trained_checked} spans; no double BOS"
              if status == PASS else f"{len(failures)} problem(s)")
    return CheckResult("special-tokens", "tokenizer + template", status, detail, True, failures, notes)


def _round_trip(encoder: Encoder, suite: tuple[Case, ...]) -> CheckResult:
    template = encoder.template
    failures, notes = [], []
    checked = 0
    for case in suite:
        if case.feature is not None:
            continue  # the skeleton parser recovers plain contents only
        try:
            msgs, _ = _escaped(encoder, case)
        except Refused:
            continue
        text, err = _render(template, msgs)
        if text is None:
            notes.append(f"{case.name}: the template refuses this conversation")
            continue
        roles = tuple(m["role"] for m in msgs)
        sk = skeleton(template, roles)
        if sk is None:
            failures.append(f"{case.name}: cannot learn the template's skeleton for roles {list(roles)} "
                            "(it does not write message contents verbatim)")
            continue
        checked += 1
        expected = [{"role": m["role"], "content": sk.normalize(i, m["content"])} for i, m in enumerate(msgs)]
        parsed = parse_rendered(template, text)
        if parsed == expected:
            continue
        hinted = parse_rendered(template, text, roles)
        if hinted == expected:
            notes.append(f"{case.name}: recovered only with the roles given: without them the text parses as "
                         f"{[m['role'] for m in parsed] if parsed else 'nothing'} (the rendering is ambiguous)")
            continue
        got = hinted or parsed
        if got is None:
            failures.append(f"{case.name}: the rendered text does not parse with the template's skeleton")
        else:
            diffs = [f"message {i} ({e['role']}): " + text_diff(e["content"], g["content"])
                     for i, (e, g) in enumerate(zip(expected, got)) if e != g]
            where = "; ".join(diffs) or f"{len(got)} messages instead of {len(expected)}"
            if case.core:
                failures.append(f"{case.name}: {where}")
            else:
                notes.append(f"{case.name} (edge case: content that contains the template's own text is ambiguous once "
                             f"rendered): {where}")
    status = FAIL if failures or checked == 0 else PASS
    detail = (f"{checked} rendered conversations parse back into their messages"
              + (" (modulo the template's whitespace rule)" if any(r != ("", "") for r in _rules_seen(template)) else "")
              if status == PASS else f"{len(failures)} problem(s)" if failures else "nothing to check")
    return CheckResult("round-trip", "template", status, detail, False, failures, notes)


def _rules_seen(template: ChatTemplate):
    for key, sk in _SKELETONS.items():
        if key[0] == template.sha256 and sk is not None:
            yield from sk.rules


# -- entry points ---------------------------------------------------------------------------------------------------

def verify(tokenizer: Any, template: ChatTemplate | str = "tokenizer", *, history_policy: str | None = None,
           options: EncodeOptions | None = None, suite: tuple[Case, ...] = SUITE,
           encoder: Encoder | None = None) -> VerifyReport:
    """Run every check for ``template`` (a :class:`ChatTemplate`, a built-in name, a ``.jinja`` path or
    ``"tokenizer"``) on ``tokenizer``. ``options`` are the build's encode options (``special_text``, ``train_turns``,
    ``history_policy``, ``tokenization``); ``history_policy`` overrides the one in ``options``. ``encoder``: an encoder
    of this template, tokenizer and options to check with (instead of making one)."""
    if isinstance(template, str):
        template = load_template(template, tokenizer)
    options = options or EncodeOptions()
    if history_policy is not None:
        options = replace(options, history_policy=history_policy)
    if encoder is None or (encoder.template, encoder.tokenizer, encoder.options) != (template, tokenizer, options):
        encoder = Encoder(template, tokenizer, options)
    fidelity = _fidelity(template, tokenizer, suite)
    if encoder.pinned_variables:  # the checks render the template themselves: as the encoder does (date, kwargs)
        template = template.with_variables(**encoder.pinned_variables)
        encoder = Encoder(template, tokenizer, options)
    decision = plan_history_policy(encoder)
    encoding_suite, reasoning_note = _suite_for(encoder, suite)
    checks = [fidelity, _serving_prefix(encoder, encoding_suite, "template", True)]
    own = _tokenizer_template(tokenizer)
    if own is not None and own != template.source:
        own_template = load_template("tokenizer", tokenizer)
        own_encoder = Encoder(own_template, tokenizer, options)
        if own_encoder.pinned_variables:
            own_encoder = Encoder(own_template.with_variables(**own_encoder.pinned_variables), tokenizer, options)
        checks.append(_serving_prefix(own_encoder, suite, "tokenizer.chat_template", False))
    checks.append(_history(template, decision))
    masks, encoded = _exact_masks(encoder, encoding_suite)
    if reasoning_note:
        masks.notes.insert(0, reasoning_note)
    checks.append(masks)
    checks.append(_round_trip(encoder, suite))
    checks.append(_special_tokens(encoder, encoded))
    return VerifyReport(template.name, template.origin, template.sha256, _tokenizer_name(tokenizer), own is not None,
                        decision, checks)


def preflight(encoder: Encoder) -> VerifyReport:
    """The checks ``build`` runs once at start, with the build's encoder (its template, tokenizer and options). Refuse
    when ``not report.invariant_ok`` (print ``report.format_text()``) unless overridden; warn when
    ``report.differs_from_tokenizer``; record ``report.manifest_entry()`` in the manifest."""
    return verify(encoder.tokenizer, encoder.template, options=encoder.options, encoder=encoder)
