"""History policy: what happens to assistant turns that a template renders differently in history than as the last turn.

Some official templates render an earlier assistant turn differently once the conversation goes on: Qwen3's hybrid
thinking template writes ``<think>\\n\\n</think>\\n\\n`` (or the reasoning) before the final assistant reply only, gpt-oss
ends the final reply with ``<|return|>`` but earlier ones with ``<|end|>`` and drops their reasoning, QwQ and
DeepSeek-R1 drop reasoning from history. Training such a turn inside the full conversation would teach the model a
turn it is never asked to produce (trl#5213), so the encoder checks every trained turn (:mod:`sftdata.render`) and
applies the policy (``--history-policy``) to the turns that differ:

``auto`` (default) / ``split``
    The turn becomes its own example ``conv[:k+1]`` whose last message it is; turns that render the same in history
    stay in the full conversation (so a Qwen3 agent trajectory after its last user message is one example).
``last``
    The turn is left as context (-100) and counted in the manifest (``turns_untrained_history``).
``fail``
    The row is a Problem (``history-mismatch``).

This module describes the template's behaviour once per build (for ``sftdata verify`` and the manifest) by encoding
probe conversations under ``fail``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sftdata.record import Message, Record
from sftdata.render import HISTORY_POLICIES, Encoder

_CALL = {"id": "call00001", "type": "function", "function": {"name": "lookup", "arguments": {"q": "SFTDATA0Q"}}}
PROBES: tuple[tuple[str, list[Message]], ...] = (
    ("two turns", [Message("user", "SFTDATA0U1"), Message("assistant", "SFTDATA0A1"),
                   Message("user", "SFTDATA0U2"), Message("assistant", "SFTDATA0A2")]),
    ("two turns with a system message", [Message("system", "SFTDATA0S"), Message("user", "SFTDATA0U1"),
                                         Message("assistant", "SFTDATA0A1"), Message("user", "SFTDATA0U2"),
                                         Message("assistant", "SFTDATA0A2")]),
    ("a tool call and its result", [Message("user", "SFTDATA0U1"), Message("assistant", "", tool_calls=[_CALL]),
                                    Message("tool", "SFTDATA0T", tool_call_id="call00001", name="lookup"),
                                    Message("assistant", "SFTDATA0A2")]),
    ("reasoning in an earlier turn", [Message("user", "SFTDATA0U1"), Message("assistant", "SFTDATA0A1", reasoning="SFTDATA0R1"),
                                      Message("user", "SFTDATA0U2"), Message("assistant", "SFTDATA0A2", reasoning="SFTDATA0R2")]),
)


def history_mismatch(encoder: Encoder) -> str | None:
    """A sentence describing how the encoder's template renders an earlier assistant turn differently, or None.

    Encodes the probe conversations under ``history_policy="fail"``; conversations the template refuses are ignored.
    """
    strict = encoder.with_options(history_policy="fail", special_text="escape")
    found = []
    for name, messages in PROBES:
        _, problems = strict.encode_batch([Record("history-probe", 1, list(messages))])
        if problems and problems[0].kind == "history-mismatch":
            found.append(f"{name}: {problems[0].detail}")
    return found[0] if found else None


@dataclass(frozen=True)
class HistoryDecision:
    """The policy asked for, the one that applies (``none`` when the template renders history as the last turn), and
    the detected difference."""

    requested: str
    applied: str
    mismatch: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"requested": self.requested, "applied": self.applied, "mismatch": self.mismatch}

    def describe(self) -> str:
        if self.mismatch is None:
            return "the template renders history exactly as the final turn; all assistant turns train in one example"
        return {
            "split": "split: a turn that renders differently in history becomes its own example conv[:k+1], as served",
            "last": "last: a turn that renders differently in history is left as context (counted in the manifest)",
            "fail": "fail: rows with a turn that renders differently in history are reported as history-mismatch",
        }[self.applied]


def plan_history_policy(encoder: Encoder, policy: str | None = None) -> HistoryDecision:
    """Describe, once per build, what the history policy does with this encoder's template."""
    policy = policy or encoder.options.history_policy
    if policy not in HISTORY_POLICIES:
        raise ValueError(f"history policy must be one of {HISTORY_POLICIES}, not {policy!r}")
    mismatch = history_mismatch(encoder)
    if mismatch is None:
        return HistoryDecision(policy, "none", None)
    return HistoryDecision(policy, "split" if policy == "auto" else policy, mismatch)
