"""The canonical record every pipeline stage reads and writes, and the problem report they share.

A :class:`Record` is either a conversation (``messages``) or a raw-text document (``text``). Every stage is a
function over ``list[Record]`` batches, so the same code runs in-process, in a process pool or on a
distributed engine; stages never drop a record without returning a :class:`Problem` that says why.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

ROLES = ("system", "developer", "user", "assistant", "tool")


REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")  # the names templates in the wild read


@dataclass(slots=True)
class Message:
    """One message, carrying everything a chat template can read.

    ``tool_calls`` are in the OpenAI shape (``{"id", "type": "function", "function": {"name", "arguments"}}``) with
    ``arguments`` already parsed into an object, as servers such as vLLM hand them to templates. ``reasoning`` is the
    reasoning trace (read from ``reasoning_content``, ``reasoning`` or ``thinking``; handed to templates under all
    three names). ``train`` is the per-message training flag: ``None`` means the role's default (assistant turns are
    trained, everything else is context). ``fields`` are other template-readable keys (Alpaca's ``instruction`` and
    ``input`` on the user message).
    """

    role: str
    content: str
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    reasoning: str | None = None
    train: bool | None = None
    fields: dict[str, Any] | None = None

    @property
    def trained_by_default(self) -> bool:
        return self.role == "assistant"

    @property
    def is_trained(self) -> bool:
        return self.trained_by_default if self.train is None else self.train

    def to_dict(self) -> dict[str, Any]:
        """The message as a chat template receives it (only the keys that are set, as a server passes them)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.fields:
            out.update(self.fields)
        if self.tool_calls is not None:
            out["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        if self.reasoning is not None:
            for key in REASONING_KEYS:
                out[key] = self.reasoning
        return out

    def to_json(self) -> dict[str, Any]:
        """The message in sftdata's own JSON form (OpenAI ``messages`` plus ``reasoning``/``train``), for reports."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        for key in ("tool_calls", "tool_call_id", "name", "reasoning", "train"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.fields:
            out.update(self.fields)
        return out


@dataclass(slots=True)
class Record:
    """One training example, normalized from any input format.

    ``source`` and ``row`` (1-based line or row number in that file) identify it in every report. A conversation has
    ``messages`` (and optionally ``tools``, OpenAI function schemas, and ``template_kwargs``, per-row template
    variables such as ``enable_thinking``); a raw-text document has ``text`` (``continued``: the document goes on in
    the next record, so no EOS is written after this part). ``extra`` keeps the input row's other fields (named in
    the manifest as ignored); ``raw`` is the input row as read, kept only where a writer needs it.
    """

    source: str
    row: int
    messages: list[Message] | None = None
    text: str | None = None
    tools: list[dict[str, Any]] | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    continued: bool = False
    raw: Any = None

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    @property
    def where(self) -> str:
        return f"{self.source}:{self.row}"

    def messages_as_dicts(self) -> list[dict[str, Any]]:
        """Messages as a chat template receives them."""
        return [m.to_dict() for m in self.messages or ()]


@dataclass(slots=True, frozen=True)
class Problem:
    """Why one input row was not used as it is: where it is, which stage refused it, and the reason.

    ``kind`` is a short stable key used for counting (``"malformed-json"``, ``"no-trained-tokens"`` ...);
    ``detail`` is the human sentence.
    """

    source: str
    row: int
    stage: str
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.source}:{self.row}: [{self.stage}/{self.kind}] {self.detail}"

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "row": self.row, "stage": self.stage, "kind": self.kind, "detail": self.detail}


class DataError(Exception):
    """A problem that stops the run (``--on-error fail``, an unreadable file, a bad option)."""

    def __init__(self, message: str, problem: Problem | None = None):
        super().__init__(message)
        self.problem = problem

    def __reduce__(self) -> tuple[Any, ...]:  # pickles with its problem (raised on a worker, re-raised by the driver)
        return DataError, (str(self), self.problem)


class ProblemLog:
    """Counts problems by kind and keeps the first few of each for the report.

    With ``on_error="fail"`` the first problem raises :class:`DataError` naming its file, row and reason.
    """

    def __init__(self, on_error: str = "skip", keep_per_kind: int = 20, sink: Any = None):
        if on_error not in ("skip", "fail"):
            raise ValueError(f"on_error must be 'skip' or 'fail', not {on_error!r}")
        self.on_error = on_error
        self.sink = sink  # a text file: every problem is appended to it as one JSON line
        self.keep_per_kind = keep_per_kind
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[Problem]] = {}

    def add(self, problem: Problem) -> None:
        self.counts[problem.kind] += 1
        kept = self.examples.setdefault(problem.kind, [])
        if len(kept) < self.keep_per_kind:
            kept.append(problem)
        if self.sink is not None:
            self.sink.write(json.dumps(problem.to_dict(), ensure_ascii=False) + "\n")
        if self.on_error == "fail":
            raise DataError(str(problem), problem)

    def extend(self, problems: Iterable[Problem]) -> None:
        for problem in problems:
            self.add(problem)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "by_kind": dict(sorted(self.counts.items())),
            "examples": {k: [p.to_dict() for p in v] for k, v in sorted(self.examples.items())},
        }


@dataclass(slots=True)
class Removal:
    """A record a cleaning stage removed on purpose (duplicate, contaminated): counted and auditable, not an error.

    ``matched`` says what it matched: the kept row of its duplicate cluster, or the eval item it overlaps.
    """

    record: Record
    stage: str
    reason: str
    detail: str
    matched: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "source": self.record.source,
            "row": self.record.row,
            "stage": self.stage,
            "reason": self.reason,
            "detail": self.detail,
            "matched": self.matched,
        }
        if self.record.is_chat:
            row["messages"] = [m.to_json() for m in self.record.messages]
            if self.record.tools is not None:
                row["tools"] = self.record.tools
        else:
            row["text"] = self.record.text
        return row
