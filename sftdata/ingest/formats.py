"""Row formats: detect a row's layout and normalize it into messages or raw text.

Formats: Alpaca (``instruction``/``input``/``output`` or ``response``), OpenAI ``messages``, ShareGPT
``conversations``, ``prompt``/``completion`` and raw ``text``. A row that cannot be normalized raises
:class:`RowError` with a stable ``kind`` (counted in the manifest) and a human ``detail``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from sftdata.record import REASONING_KEYS, ROLES, DataError, Message

FORMATS = ("alpaca", "messages", "sharegpt", "prompt-completion", "xlam", "text")

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
    "ipython": "tool",
    "developer": "developer",
}
SHAREGPT_FUNCTION_CALL_ROLES = ("function_call",)
# OpenAI-style role names that are another name for one of ours.
ROLE_ALIASES = {"ipython": "tool", "function": "tool"}

_CANONICAL_FIELDS = ("instruction", "input", "output", "system", "reasoning", "prompt", "completion", "text", "messages",
                     "conversations")



@dataclass
class IngestOptions:
    """How rows are interpreted.

    ``columns`` maps canonical field names to this corpus's names, e.g. ``{"instruction": "question",
    "output": "answer"}`` for GSM8K. ``strip`` trims whitespace around every message (off by default:
    whitespace is kept exactly as written). ``system_prompt`` is added as the first message of conversations that
    have no system message. ``template_variables`` are the chat template's own variables (``enable_thinking`` ...):
    a top-level row field of that name is passed to the template for that row.
    """

    format: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    strip: bool = False
    system_prompt: str | None = None
    template_variables: frozenset[str] = frozenset()


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
    if "chosen" in keys and "rejected" in keys:
        return "preference"  # refused row by row with a precise reason
    if {"query", "answers"} <= keys:
        return "xlam"
    if has("text"):
        return "text"
    return None


# The field that marks each format in a single row, in the order formats are tried (as in detect_format).
_MARKING_FIELD = {"messages": "messages", "sharegpt": "conversations", "alpaca": "instruction",
                  "prompt-completion": "prompt", "preference": "chosen", "xlam": "answers", "text": "text"}


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


# Message keys sftdata understands (everything else is counted as ignored, by name, in the manifest).
_MESSAGE_KEYS = {"role", "from", "content", "value", "tool_calls", "function_call", "tool_call_id", "name",
                 "reasoning_content", "reasoning", "thinking", "train", "training", "weight"}
# Keys that change what a conversation trains on or shows the model, which sftdata cannot honour: the row becomes a
# Problem instead of an example trained without them.
_MODALITY_KEYS = ("images", "image", "audio", "audios", "video", "videos")
_UNSUPPORTED_MESSAGE_KEYS = {"train_detail": "character-level training spans (axolotl train_detail)",
                             "loss_mask": "a token-level loss mask"}
# Every key parse_message reads besides the role and content keys it is given.
_READ_KEYS = frozenset(_MESSAGE_KEYS | set(_MODALITY_KEYS) | set(_UNSUPPORTED_MESSAGE_KEYS)) - {"role", "from", "content", "value"}


def _json_value(value: Any, what: str, index: int) -> Any:
    """Parse a JSON string (tool-call arguments, a ShareGPT function_call) or return an already-parsed value."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError as e:
        raise RowError("bad-tool-call", f"message {index}: {what} is not valid JSON ({e})") from None


def _tool_calls(raw: Any, index: int) -> list[dict[str, Any]]:
    """Normalize tool calls to the OpenAI shape with ``arguments`` as an object (what servers hand to templates)."""
    raw = _json_value(raw, "tool_calls", index)
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise RowError("bad-tool-call", f"message {index}: tool_calls must be a non-empty list of calls")
    calls = []
    for j, call in enumerate(raw):
        if not isinstance(call, dict):
            raise RowError("bad-tool-call", f"message {index}: tool call {j} must be an object")
        function = call.get("function", call)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise RowError("bad-tool-call", f"message {index}: tool call {j} has no function name")
        arguments = function.get("arguments", function.get("parameters", {}))
        arguments = _json_value(arguments, f"the arguments of tool call {j}", index)
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise RowError("bad-tool-call", f"message {index}: the arguments of tool call {j} must be a JSON object, "
                                            f"got {type(arguments).__name__}")
        normalized: dict[str, Any] = {}
        if call.get("id") is not None:
            normalized["id"] = str(call["id"])
        normalized["type"] = "function"
        normalized["function"] = {"name": function["name"], "arguments": arguments}
        calls.append(normalized)
    return calls


def parse_tools(raw: Any) -> list[dict[str, Any]] | None:
    """A ``tools`` field (a list, or a JSON string as in ShareGPT/LLaMA-Factory data) as OpenAI function schemas.

    Bare function schemas (``{"name", "description", "parameters"}``) are wrapped as ``{"type": "function",
    "function": ...}``: that is the shape a server receives in a request and hands to the template.
    """
    if raw is None or raw == "" or raw == []:
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError as e:
            raise RowError("bad-tools", f"field 'tools' is not valid JSON ({e})") from None
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise RowError("bad-tools", "field 'tools' must be a list of function schemas")
    tools = []
    for i, tool in enumerate(raw):
        if "function" in tool or tool.get("type") not in (None, "function"):
            tools.append(tool)
        elif isinstance(tool.get("name"), str):
            tools.append({"type": "function", "function": tool})
        else:
            raise RowError("bad-tools", f"tool {i} has no function name")
    return tools


def _content(content: Any, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, list):
        # OpenAI content parts: text parts are joined; any other part (image, audio) is refused explicitly.
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif isinstance(part, dict) and isinstance(part.get("type"), str):
                raise RowError("multimodal", f"message {index}: a {part['type']!r} content part; sftdata trains text only")
            else:
                raise RowError("wrong-type", f"message {index}: non-text content part {part!r:.60}")
        return "".join(texts)
    if not isinstance(content, str):
        raise RowError("wrong-type", f"message {index}: content must be a string, got {type(content).__name__}")
    return content


def _train_flag(m: dict[str, Any], index: int) -> bool | None:
    """The per-message training flag (axolotl semantics): ``train``/``training`` true|false, or ``weight`` 0|1."""
    flags = []
    for key in ("train", "training"):
        if m.get(key) is not None:
            if not isinstance(m[key], bool):
                raise RowError("bad-train-flag", f"message {index}: {key!r} must be true or false, got {m[key]!r}")
            flags.append(m[key])
    if m.get("weight") is not None:
        weight = m["weight"]
        if isinstance(weight, bool) or weight not in (0, 1):
            raise RowError("bad-train-flag", f"message {index}: weight {weight!r} is not 0 or 1; per-token loss weights "
                                             "are not supported (0 = context, 1 = trained)")
        flags.append(bool(weight))
    if len(set(flags)) > 1:
        raise RowError("bad-train-flag", f"message {index}: train/weight flags disagree")
    return flags[0] if flags else None


def _reasoning(m: dict[str, Any], index: int) -> str | None:
    values = {m[k] for k in REASONING_KEYS if m.get(k) is not None}
    if not values:
        return None
    if len(values) > 1:
        raise RowError("bad-reasoning", f"message {index}: {', '.join(k for k in REASONING_KEYS if m.get(k) is not None)} "
                                        "hold different texts")
    value = values.pop()
    if not isinstance(value, str):
        raise RowError("wrong-type", f"message {index}: reasoning must be a string, got {type(value).__name__}")
    return value


def parse_message(m: Any, index: int, *, role_key: str = "role", content_key: str = "content",
                  role_map: dict[str, str] | None = None, ignored: list[str] | None = None) -> Message:
    """One message (OpenAI shape, or a ShareGPT turn with ``role_key="from"``) as a :class:`Message`.

    Understands ``tool_calls`` (or a ShareGPT ``function_call`` turn), ``tool_call_id``, ``name``, reasoning under
    ``reasoning_content``/``reasoning``/``thinking``, and the training flag ``train``/``training``/``weight``. Other keys
    are appended to ``ignored`` (as ``messages[].key``); keys that would change what is trained and cannot be honoured
    raise :class:`RowError`.
    """
    if not isinstance(m, dict):
        raise RowError("wrong-type", f"message {index} must be an object, got {type(m).__name__}")
    role = m.get(role_key, m.get("role"))
    if role is None:
        raise RowError("missing-field", f"message {index}: missing {role_key!r}")
    if not isinstance(role, str):
        raise RowError("wrong-type", f"message {index}: role must be a string, got {type(role).__name__}")
    mapped = role_map.get(role.lower(), role) if role_map is not None else ROLE_ALIASES.get(role, role)
    if mapped not in ROLES:
        raise RowError("unknown-role", f"message {index}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
    raw_content = m.get(content_key, m.get("content")) if content_key != "content" else m.get("content")
    if (len(m) == 2 and role_key != content_key and role_key in m and content_key in m and role_key not in _READ_KEYS
            and content_key not in _READ_KEYS and not (role_map is not None and role.lower() in SHAREGPT_FUNCTION_CALL_ROLES)):
        # only a role and a content (most messages): none of the checks below can apply
        return Message(mapped, _content(raw_content, index))
    for key in _MODALITY_KEYS:
        if m.get(key):
            raise RowError("multimodal", f"message {index}: has {key!r}; sftdata trains text only")
    for key, what in _UNSUPPORTED_MESSAGE_KEYS.items():
        if m.get(key) is not None:
            raise RowError("unsupported-field", f"message {index}: {key!r} ({what}) cannot be honoured")
    tool_calls = None
    if role_map is not None and role.lower() in SHAREGPT_FUNCTION_CALL_ROLES:
        # LLaMA-Factory ShareGPT: a function_call turn's value is the call (or a list of calls) as JSON.
        tool_calls = _tool_calls(raw_content, index)
        raw_content = ""
    if m.get("tool_calls"):
        if tool_calls is not None:
            raise RowError("bad-tool-call", f"message {index}: both a function_call value and tool_calls")
        tool_calls = _tool_calls(m["tool_calls"], index)
    if m.get("function_call"):  # the legacy OpenAI field
        if tool_calls is not None:
            raise RowError("bad-tool-call", f"message {index}: both function_call and tool_calls")
        tool_calls = _tool_calls([m["function_call"]], index)
    if tool_calls is not None and mapped != "assistant":
        raise RowError("bad-tool-call", f"message {index}: a {mapped} message cannot carry tool calls")
    content = _content(raw_content, index)
    reasoning = _reasoning(m, index)
    if reasoning is not None and mapped != "assistant":
        raise RowError("bad-reasoning", f"message {index}: a {mapped} message cannot carry reasoning")
    train = _train_flag(m, index)
    if train and mapped != "assistant":
        raise RowError("unsupported-train-flag",
                       f"message {index}: a {mapped} message is flagged for training; sftdata trains only what the model "
                       "emits (assistant turns)")
    tool_call_id = m.get("tool_call_id")
    name = m.get("name")
    for key, value in (("tool_call_id", tool_call_id), ("name", name)):
        if value is not None and not isinstance(value, str):
            raise RowError("wrong-type", f"message {index}: {key} must be a string, got {type(value).__name__}")
    if ignored is not None:
        known = _MESSAGE_KEYS | {role_key, content_key}
        ignored.extend(f"messages[].{k}" for k in m if k not in known)
    return Message(mapped, content, tool_calls=tool_calls, tool_call_id=tool_call_id, name=name, reasoning=reasoning,
                   train=train)


def validate_conversation(messages: list[Message]) -> None:
    """Raise :class:`RowError` unless the conversation is trainable as written.

    Rules: at least one assistant turn, and at least one that is trained; ``system``/``developer`` only first; no two
    consecutive user or assistant turns (tool results may follow an assistant turn or each other); no trained assistant
    turn that is empty (no content, no tool call, no reasoning).
    """
    if not messages:
        raise RowError("empty-conversation", "conversation has no messages")
    if not any(m.role == "assistant" for m in messages):
        raise RowError("no-assistant", "conversation has no assistant turn to train on")
    if not any(m.is_trained for m in messages):
        raise RowError("no-trained-turn", "every assistant turn is flagged train: false / weight: 0")
    previous = None
    for i, m in enumerate(messages):
        if m.role in ("system", "developer") and i != 0:
            raise RowError("misplaced-system", f"message {i}: {m.role} message must come first")
        if m.role in ("user", "assistant") and m.role == previous:
            raise RowError("consecutive-role", f"messages {i - 1} and {i} are both {m.role!r}")
        if m.role == "assistant" and m.is_trained and m.content.strip() == "" and not m.tool_calls and not (m.reasoning or "").strip():
            raise RowError("empty-assistant", f"message {i}: assistant turn is empty (no content, tool call or reasoning)")
        previous = m.role


def _strip(message: Message) -> Message:
    fields = {k: v.strip() if isinstance(v, str) else v for k, v in message.fields.items()} if message.fields else None
    return replace(message, content=message.content.strip(), fields=fields,
                   reasoning=message.reasoning.strip() if message.reasoning is not None else None)


@dataclass
class Normalized:
    """One row as a conversation (``messages``, ``tools``, ``template_kwargs``) or a raw-text document (``text``).

    ``extra`` holds the top-level fields that were not used (kept with the record, named in the manifest as ignored);
    ``ignored`` the names of ignored fields, message-level ones as ``messages[].key``.
    """

    messages: list[Message] | None = None
    text: str | None = None
    tools: list[dict[str, Any]] | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)


def _messages(raw: Any, field_name: str, ignored: list[str], **kwargs: Any) -> list[Message]:
    if not isinstance(raw, list):
        raise RowError("wrong-type", f"field {field_name!r} must be a list of messages")
    return [parse_message(m, i, ignored=ignored, **kwargs) for i, m in enumerate(raw)]


def normalize_row(row: Any, fmt: str, options: IngestOptions) -> Normalized:
    """Turn one raw row into a :class:`Normalized` conversation or document; raises :class:`RowError` with the reason."""
    if not isinstance(row, dict):
        raise RowError("wrong-type", f"row must be an object, got {type(row).__name__}")
    col = options.columns
    # A mapping applies where the mapped field exists; elsewhere the canonical name (and its usual alternatives)
    # still work, so one --columns serves mixed inputs.
    name = lambda canonical: col[canonical] if col.get(canonical) in row else canonical  # noqa: E731
    used: set[str] = set()
    out = Normalized()
    _refuse_untrainable(row, fmt)

    if fmt == "alpaca":
        instruction = _string_field(row, name("instruction"), required=True)
        output_name = name("output")
        if output_name not in row and "response" in row:
            output_name = "response"
        output = _string_field(row, output_name, required=True)
        extra_input = _string_field(row, name("input"), required=False) or ""
        system = _string_field(row, name("system"), required=False)
        reasoning = _string_field(row, name("reasoning"), required=False)
        used |= {name("instruction"), output_name, name("input"), name("system"), name("reasoning")}
        if output_name == "output" and "response" in row and row["response"] == row["output"]:
            used.add("response")  # CodeAlpaca carries both keys with the same text
        user = instruction if not extra_input else f"{instruction}\n\n{extra_input}"
        # The Alpaca template renders "### Input:" from the user message's instruction/input fields.
        out.messages = ([Message("system", system)] if system else []) + [
            Message("user", user, fields={"instruction": instruction, "input": extra_input}),
            Message("assistant", output, reasoning=reasoning)]
    elif fmt == "messages":
        used.add(name("messages"))
        out.messages = _messages(row.get(name("messages")), name("messages"), out.ignored)
    elif fmt == "sharegpt":
        used.add(name("conversations"))
        messages = []
        system = row.get(name("system"))
        if isinstance(system, str) and system:
            messages.append(Message("system", system))
            used.add(name("system"))
        out.messages = messages + _messages(row.get(name("conversations")), name("conversations"), out.ignored,
                                            role_key="from", content_key="value", role_map=SHAREGPT_ROLES)
    elif fmt == "prompt-completion":
        prompt, completion = row.get(name("prompt")), row.get(name("completion"))
        used |= {name("prompt"), name("completion")}
        if prompt is None or completion is None:
            raise RowError("missing-field", "missing field 'prompt' or 'completion'")
        if isinstance(prompt, list):  # conversational prompt/completion (TRL style)
            messages = _messages(prompt, name("prompt"), out.ignored)
        elif isinstance(prompt, str):
            messages = [Message("user", prompt)]
        else:
            raise RowError("wrong-type", "field 'prompt' must be a string or a list of messages")
        if isinstance(completion, list):
            messages += _messages(completion, name("completion"), out.ignored)
        elif isinstance(completion, str):
            messages.append(Message("assistant", completion))
        else:
            raise RowError("wrong-type", "field 'completion' must be a string or a list of messages")
        out.messages = messages
    elif fmt == "xlam":
        # Salesforce xLAM function calling: a query, its tools and the calls that answer it, all as JSON strings.
        query = _string_field(row, "query", required=True)
        used |= {"query", "answers"}
        out.messages = [Message("user", query), Message("assistant", "", tool_calls=_tool_calls(row.get("answers"), 1))]
    elif fmt == "text":
        out.text = _string_field(row, name("text"), required=True)
        used.add(name("text"))
        if out.text == "":
            raise RowError("empty-text", "text is empty")
    else:
        raise DataError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")

    if out.messages is not None:
        if "tools" in row:
            out.tools = parse_tools(row["tools"])
            used.add("tools")
        kwargs = row.get("chat_template_kwargs")
        if kwargs is not None:
            if not isinstance(kwargs, dict):
                raise RowError("wrong-type", "field 'chat_template_kwargs' must be an object")
            out.template_kwargs.update(kwargs)
            used.add("chat_template_kwargs")
        for key in options.template_variables:
            if key in row and key not in used:
                out.template_kwargs[key] = row[key]
                used.add(key)
        if options.system_prompt is not None and out.messages and out.messages[0].role not in ("system", "developer"):
            out.messages.insert(0, Message("system", options.system_prompt))
        if options.strip:
            out.messages = [_strip(m) for m in out.messages]
        validate_conversation(out.messages)
    out.extra = {k: v for k, v in row.items() if k not in used}
    out.ignored.extend(out.extra)
    return out


def _refuse_untrainable(row: dict[str, Any], fmt: str) -> None:
    """Rows whose fields say they are not supervised examples (preference pairs, KTO labels, images) are Problems."""
    if "chosen" in row and "rejected" in row:
        raise RowError("preference-pair", "a preference pair (chosen/rejected) is DPO data, not a supervised example; "
                                          "map one side explicitly if you want to train on it (--columns completion=chosen)")
    if "completion" in row and isinstance(row.get("label"), bool):
        raise RowError("kto-label", f"a KTO row (label: {str(row['label']).lower()}) is preference data, not a "
                                    "supervised example")
    for key in _MODALITY_KEYS:
        if row.get(key):
            raise RowError("multimodal", f"the row has {key!r}; sftdata trains text only")
