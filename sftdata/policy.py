"""History policy: what to do with templates that render an assistant turn differently in history than as the last turn.

Some official templates render an earlier assistant turn differently once the conversation goes on: Qwen3's hybrid
thinking template writes ``<think>\\n\\n</think>\\n\\n`` before the final assistant reply only, and Phi-3's appends
``eos_token`` after the final message only. For such a template, ``T(conv[:k+1])`` (the text the model produces when it
answers turn ``k`` as served) is not a prefix of ``T(conv)``, so training turn ``k`` inside the full conversation
would teach the model a turn it is never asked to produce (trl#5213, GUIDE §3.8); the encoder reports every such row
as ``history-mismatch``.

Policies (``--history-policy``):

``auto`` (default)
    ``split`` when the template is detected to render history differently (:func:`history_mismatch`), otherwise nothing
    changes (all turns of a conversation are trained in one example).
``split``
    One example per assistant turn ``k``: the conversation ``conv[:k+1]``, training only its last turn. Every trained
    turn is then rendered exactly as it is served. Costs more tokens (a conversation of ``n`` turns is encoded ``n``
    times, with a growing prefix) and is applied only to records with two or more assistant turns.
``last``
    Train only the final assistant turn of each conversation (earlier turns stay ``-100`` context, rendered as history).
``fail``
    Change nothing: every multi-turn row of such a template is reported as ``history-mismatch`` and skipped.

Everything here is a pure function of its input batch, like the other stages.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from sftdata.record import Record
from sftdata.templates import ChatTemplate

HISTORY_POLICIES = ("auto", "split", "last", "fail")

_PROBES = (
    [{"role": "user", "content": "SFTDATA0U1"}, {"role": "assistant", "content": "SFTDATA0A1"},
     {"role": "user", "content": "SFTDATA0U2"}, {"role": "assistant", "content": "SFTDATA0A2"}],
    [{"role": "system", "content": "SFTDATA0S"}, {"role": "user", "content": "SFTDATA0U1"},
     {"role": "assistant", "content": "SFTDATA0A1"}, {"role": "user", "content": "SFTDATA0U2"},
     {"role": "assistant", "content": "SFTDATA0A2"}],
)


def history_mismatch(template: ChatTemplate) -> str | None:
    """A sentence describing how ``template`` renders an earlier assistant turn differently, or None if it does not.

    Probes two-turn conversations (with and without a system message) with sentinel contents: the template is
    history-consistent when ``T(conv[:2])`` is a prefix of ``T(conv)``. Conversations the template refuses are ignored.
    """
    for conv in _PROBES:
        try:
            full = template.render(conv)
            first = template.render(conv[:-2])  # through the first assistant turn
        except Exception:
            continue
        if not full.startswith(first):
            at = next((i for i, (a, b) in enumerate(zip(first, full)) if a != b), min(len(first), len(full)))
            return (f"template {template.name!r} renders an earlier assistant turn differently in history than as the "
                    f"final turn: as the final turn {first[max(0, at - 25):at + 25]!r}, in history "
                    f"{full[max(0, at - 25):at + 25]!r}")
    return None


@dataclass(frozen=True)
class HistoryDecision:
    """What ``build`` does for a template: the policy applied (``none``, ``split``, ``last`` or ``fail``), the
    ``train_turns`` to encode with, and the detected mismatch (None when the template renders history consistently)."""

    requested: str
    applied: str
    train_turns: str
    mismatch: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"requested": self.requested, "applied": self.applied, "train_turns": self.train_turns,
                "mismatch": self.mismatch}

    def describe(self) -> str:
        if self.mismatch is None:
            return "template renders history exactly as the final turn; all assistant turns are trained in one example"
        return {
            "split": "split: one example per assistant turn (conv[:k+1], last turn trained), each rendered as served",
            "last": "last: only the final assistant turn of each conversation is trained",
            "fail": "fail: multi-turn rows are reported as history-mismatch and skipped",
            "none": "no policy",
        }[self.applied]


def plan_history_policy(template: ChatTemplate, policy: str = "auto", train_turns: str = "all") -> HistoryDecision:
    """Decide once per build. ``train_turns`` is the user's ``--train-turns`` (``all``/``last``)."""
    if policy not in HISTORY_POLICIES:
        raise ValueError(f"history policy must be one of {HISTORY_POLICIES}, not {policy!r}")
    mismatch = history_mismatch(template)
    if mismatch is None:
        return HistoryDecision(policy, "none", train_turns, None)
    applied = "split" if policy == "auto" else policy
    if applied == "split" and train_turns == "last":
        applied = "last"  # only the final turn is wanted: no need to split
    if applied in ("split", "last"):
        return HistoryDecision(policy, applied, "last", mismatch)
    return HistoryDecision(policy, "fail", train_turns, mismatch)


def expand_for_history_policy(records: list[Record], template: ChatTemplate | None, policy: str) -> list[Record]:
    """Apply ``policy`` (``split`` / ``last`` / ``fail`` / ``none``, i.e. ``HistoryDecision.applied``) to a batch.

    ``split`` returns, for each chat record with two or more assistant turns, one record per assistant turn ``k``
    holding ``messages[:k+1]`` (same ``source``/``row``; ``extra["history_turn"]`` = ``k``, the message index of the
    trained turn); other records are returned unchanged and in order. Encode the result with ``train_turns="last"``.
    Every other policy returns the batch unchanged (``last`` is carried by ``train_turns``). ``template`` is unused
    today and kept so that per-record decisions can be added without changing callers.
    """
    if policy != "split":
        return list(records)
    out: list[Record] = []
    for record in records:
        if not record.is_chat:
            out.append(record)
            continue
        turns = [i for i, m in enumerate(record.messages) if m.role == "assistant"]
        if len(turns) < 2:
            out.append(record)
            continue
        for k in turns:
            out.append(replace(record, messages=list(record.messages[: k + 1]),
                               extra={**record.extra, "history_turn": k}))
    return out
