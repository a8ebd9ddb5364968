"""Row formats: detect a row's layout and normalize it into messages or raw text.

Formats: Alpaca (``instruction``/``input``/``output`` or ``response``), OpenAI ``messages``, ShareGPT
``conversations``, ``prompt``/``completion`` and raw ``text``. A row that cannot be normalized raises
:class:`RowError` with a stable ``kind`` (counted in the manifest) and a human ``detail``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sftdata.record import ROLES, DataError, Message

FORMATS = ("alpaca", "messages", "sharegpt", "prompt-completion", "text")

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
    "function_call": "assistant",
}

_CANONICAL_FIELDS = ("instruction", "input", "output", "system", "prompt", "completion", "text", "messages", "conversations")



@dataclass
class IngestOptions:
    """How rows are interpreted.

    ``columns`` maps canonical field names to this corpus's names, e.g. ``{"instruction": "question",
    "output": "answer"}`` for GSM8K. ``strip`` trims whitespace around every message (off by default:
    whitespace is kept exactly as written).
    """

    format: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    strip: bool = False


def parse_columns(spec: str | dict[str, str] | None) -> dict[str, str]:
    """Parse ``"instruction=question,output=answer"`` into ``{"instruction": "question", "output": "answer"}``."""
    if not spec:
        return {}
    if isinstance(spec, dict):
        return dict(spec)
    mapping: dict[str, str] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise DataError(f"bad column mapping {part!r}: expected CANONICAL=FIELD, e.g. instruction=question")
        canonical, source = (s.strip() for s in part.split("=", 1))
        if canonical not in _CANONICAL_FIELDS:
            raise DataError(
                f"bad column mapping {part!r}: {canonical!r} is not one of {', '.join(_CANONICAL_FIELDS)}"
            )
        mapping[canonical] = source
    return mapping


# --------------------------------------------------------------------------------------------------------------
# Row normalization


class RowError(Exception):
    """A row that cannot be normalized; ``kind`` is the stable key counted in the manifest."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def detect_format(row: dict[str, Any], columns: dict[str, str] | None = None) -> str | None:
    """Name the format a row is in, or None when no known layout fits."""
    columns = columns or {}
    keys = set(row)

    def has(canonical: str) -> bool:
        return columns.get(canonical) in keys or canonical in keys

    if has("messages"):
        return "messages"
    if has("conversations"):
        return "sharegpt"
    if has("instruction") and (has("output") or "response" in keys):
        return "alpaca"
    if has("prompt") and has("completion"):
        return "prompt-completion"
    if has("text"):
        return "text"
    return None


# The field that marks each format in a single row, in the order formats are tried (as in detect_format).
_MARKING_FIELD = {"messages": "messages", "sharegpt": "conversations", "alpaca": "instruction",
                  "prompt-completion": "prompt", "text": "text"}


def marking_fields(fmt: str, columns: dict[str, str] | None = None) -> tuple[str, str]:
    """The input field names (canonical, mapped) whose presence says a row is in ``fmt``."""
    canonical = _MARKING_FIELD[fmt]
    return canonical, (columns or {}).get(canonical, canonical)


def row_format(row: dict[str, Any], columns: dict[str, str] | None = None) -> str | None:
    """The format of one row of a mixed file, judged by its marking field alone (``instruction`` without ``output``
    is still Alpaca, so the row is reported as missing ``output`` rather than as of no known format)."""
    for fmt in _MARKING_FIELD:
        canonical, mapped = marking_fields(fmt, columns)
        if canonical in row or mapped in row:
            return fmt
    return None


def detect_file_format(sample: list[Any], columns: dict[str, str] | None = None) -> str | None:
    """The format most rows of ``sample`` are in (ties: the first seen); None when no row has a known format."""
    counts: dict[str, int] = {}
    for row in sample:
        if isinstance(row, dict) and (fmt := detect_format(row, columns)) is not None:
            counts[fmt] = counts.get(fmt, 0) + 1
    return max(counts, key=counts.__getitem__) if counts else None


def _string_field(row: dict[str, Any], name: str, *, required: bool) -> str | None:
    value = row.get(name)
    if value is None:
        if required:
            raise RowError("missing-field", f"missing field {name!r}")
        return None
    if not isinstance(value, str):
        raise RowError("wrong-type", f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def _message(role: Any, content: Any, index: int, *, role_map: dict[str, str] | None = None) -> Message:
    if not isinstance(role, str):
        raise RowError("wrong-type", f"message {index}: role must be a string, got {type(role).__name__}")
    mapped = (role_map or {}).get(role.lower(), role) if role_map is not None else role
    if mapped not in ROLES:
        raise RowError("unknown-role", f"message {index}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
    if content is None:
        content = ""
    if isinstance(content, list):
        # OpenAI content parts: keep only text parts, refuse anything else (images, audio) explicitly.
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise RowError("wrong-type", f"message {index}: non-text content part {part!r:.60}")
        content = "".join(texts)
    if not isinstance(content, str):
        raise RowError("wrong-type", f"message {index}: content must be a string, got {type(content).__name__}")
    return Message(mapped, content)


def validate_conversation(messages: list[Message]) -> None:
    """Raise :class:`RowError` unless the conversation is trainable as written.

    Rules: at least one assistant turn; ``system`` only first; no two consecutive user or assistant turns
    (tool results may follow an assistant turn or each other); no empty assistant turn.
    """
    if not messages:
        raise RowError("empty-conversation", "conversation has no messages")
    if not any(m.role == "assistant" for m in messages):
        raise RowError("no-assistant", "conversation has no assistant turn to train on")
    previous = None
    for i, m in enumerate(messages):
        if m.role == "system" and i != 0:
            raise RowError("misplaced-system", f"message {i}: system message must come first")
        if m.role in ("user", "assistant") and m.role == previous:
            raise RowError("consecutive-role", f"messages {i - 1} and {i} are both {m.role!r}")
        if m.role == "assistant" and m.content.strip() == "":
            raise RowError("empty-assistant", f"message {i}: assistant content is empty")
        previous = m.role


def normalize_row(row: Any, fmt: str, options: IngestOptions) -> tuple[list[Message] | None, str | None, dict[str, Any]]:
    """Turn one raw row into ``(messages, text, extra)``; raises :class:`RowError` with the reason."""
    if not isinstance(row, dict):
        raise RowError("wrong-type", f"row must be an object, got {type(row).__name__}")
    col = options.columns
    # A mapping applies where the mapped field exists, so one --columns works across mixed inputs.
    name = lambda canonical: col[canonical] if col.get(canonical) in row else canonical  # noqa: E731
    used: set[str] = set()
    messages: list[Message] | None = None
    text: str | None = None

    if fmt == "alpaca":
        instruction = _string_field(row, name("instruction"), required=True)
        output_name = name("output")
        if output_name not in row and "output" not in col and "response" in row:
            output_name = "response"
        output = _string_field(row, output_name, required=True)
        extra_input = _string_field(row, name("input"), required=False) or ""
        system = _string_field(row, name("system"), required=False)
        used |= {name("instruction"), output_name, name("input"), name("system")}
        if output_name == "output" and "response" in row:
            used.add("response")  # CodeAlpaca carries both keys with the same text
        user = instruction if not extra_input else f"{instruction}\n\n{extra_input}"
        messages = ([Message("system", system)] if system else []) + [Message("user", user), Message("assistant", output)]
        # Keep the Alpaca split (instruction vs input) so the Alpaca template can render "### Input:".
        row_extra = {"alpaca_input": extra_input, "alpaca_instruction": instruction}
    elif fmt == "messages":
        raw = row.get(name("messages"))
        used.add(name("messages"))
        if not isinstance(raw, list):
            raise RowError("wrong-type", f"field {name('messages')!r} must be a list of messages")
        messages = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict):
                raise RowError("wrong-type", f"message {i} must be an object")
            if "role" not in m:
                raise RowError("missing-field", f"message {i}: missing 'role'")
            messages.append(_message(m.get("role"), m.get("content"), i))
        row_extra = {}
    elif fmt == "sharegpt":
        raw = row.get(name("conversations"))
        used.add(name("conversations"))
        if not isinstance(raw, list):
            raise RowError("wrong-type", f"field {name('conversations')!r} must be a list of turns")
        messages = []
        system = row.get("system")
        if isinstance(system, str) and system:
            messages.append(Message("system", system))
            used.add("system")
        for i, m in enumerate(raw):
            if not isinstance(m, dict):
                raise RowError("wrong-type", f"turn {i} must be an object")
            role = m.get("from", m.get("role"))
            if role is None:
                raise RowError("missing-field", f"turn {i}: missing 'from'")
            messages.append(_message(role, m.get("value", m.get("content")), i, role_map=SHAREGPT_ROLES))
        row_extra = {}
    elif fmt == "prompt-completion":
        prompt = row.get(name("prompt"))
        completion = row.get(name("completion"))
        used |= {name("prompt"), name("completion")}
        if prompt is None or completion is None:
            raise RowError("missing-field", "missing field 'prompt' or 'completion'")
        if isinstance(prompt, list):  # conversational prompt/completion (TRL style)
            messages = [_message(m.get("role"), m.get("content"), i) for i, m in enumerate(prompt) if isinstance(m, dict)]
        elif isinstance(prompt, str):
            messages = [Message("user", prompt)]
        else:
            raise RowError("wrong-type", "field 'prompt' must be a string or a list of messages")
        if isinstance(completion, list):
            messages += [_message(m.get("role"), m.get("content"), len(messages) + i) for i, m in enumerate(completion) if isinstance(m, dict)]
        elif isinstance(completion, str):
            messages.append(Message("assistant", completion))
        else:
            raise RowError("wrong-type", "field 'completion' must be a string or a list of messages")
        row_extra = {}
    elif fmt == "text":
        text = _string_field(row, name("text"), required=True)
        used.add(name("text"))
        if text == "":
            raise RowError("empty-text", "text is empty")
        row_extra = {}
    else:
        raise DataError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")

    if messages is not None:
        if options.strip:
            messages = [Message(m.role, m.content.strip()) for m in messages]
        validate_conversation(messages)
    extra = {k: v for k, v in row.items() if k not in used}
    extra.update(row_extra)
    return messages, text, extra
