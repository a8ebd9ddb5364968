"""Render and tokenize: records → ``input_ids`` + exact assistant-only ``labels``.

How the mask is placed (no searching the token stream for marker ids, which is what breaks on SentencePiece
and trailing-space markers — GUIDE §3.1–3.3). For a conversation ``conv`` and each trained assistant turn ``k``:

1. ``full = T(conv)`` is tokenized exactly as a server tokenizes a rendered prompt (``add_special_tokens=False``:
   the template writes BOS itself when the model wants one) → ``input_ids`` (I1).
2. ``P_k = T(conv[:k], add_generation_prompt=True)`` is what a server sends before turn ``k``. It must be a text
   prefix of ``full`` and ``tok(P_k)`` must be a token prefix of ``input_ids`` (I2); training starts right after it.
3. ``Q_k = T(conv[:k+1])`` must also be a prefix of ``full`` (the turn renders in history as it renders as the
   last turn). The turn's text is ``full[len(P_k):len(Q_k)]`` up to its last non-space character, which must end
   with the template's end-of-turn marker; training stops after that marker, whose token boundary is read from
   the tokenizer's offsets (I3). Separators after the marker stay ``-100``.
4. Each trained run is decoded and compared with the rendered text, and the assistant content must appear in it
   modulo the template's own whitespace rule (``strip``/``trim``) (I4).

Any turn where a check fails makes the example a :class:`Problem` with the reason; it is never trained silently.
"""

from __future__ import annotations

import re
import unicodedata
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from typing import Any

from sftdata.record import Problem, Record
from sftdata.templates import ChatTemplate
from sftdata.tokenizer import special_token_strings

IGNORE_INDEX = -100
TRAIN_TURNS = ("all", "last")
SPECIAL_TEXT_POLICIES = ("reject", "escape")
ESCAPE_CHAR = "\u200b"  # zero-width space, inserted after the first character of a special-token string


@dataclass
class EncodeOptions:
    """What to train and how strictly.

    ``train_turns``: ``all`` assistant turns (default) or only the ``last``. ``train_on_prompt``: train every
    token (labels == input_ids). ``special_text``: what to do when message content contains a literal special-token
    string such as ``<|im_end|>`` — ``reject`` the row (default) or ``escape`` it by inserting U+200B after its first
    character so it stays text. ``check_decode``: run the I4 decode check on every trained run.
    """

    train_turns: str = "all"
    train_on_prompt: bool = False
    special_text: str = "reject"
    check_decode: bool = True

    def __post_init__(self) -> None:
        if self.train_turns not in TRAIN_TURNS:
            raise ValueError(f"train_turns must be one of {TRAIN_TURNS}, not {self.train_turns!r}")
        if self.special_text not in SPECIAL_TEXT_POLICIES:
            raise ValueError(f"special_text must be one of {SPECIAL_TEXT_POLICIES}, not {self.special_text!r}")


@dataclass(slots=True)
class Encoded:
    """One tokenized example. ``spans`` are the trained token runs ``[start, end)``."""

    source: str
    row: int
    input_ids: list[int]
    labels: list[int]
    spans: list[tuple[int, int]] = field(default_factory=list)
    truncated: bool = False
    is_text: bool = False  # a raw-text document (every token trained)

    @property
    def num_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass(slots=True)
class _Plan:
    """A rendered conversation waiting for tokenization: full text and, per trained turn, its char span."""

    record: Record
    full: str
    prompts: list[str]
    char_ends: list[int]
    contents: list[str]
    cuts: list[int]  # per prompt: end of its last special token (0 if none); only prompt[cut:] is tokenized again


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
        self.end_of_turn = template.end_of_turn
        specials = special_token_strings(tokenizer)
        self._special_re = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))) if specials else None
        self.eos_id = tokenizer.eos_token_id
        # Added tokens with lstrip/rstrip (Phi-3's <|end|>, <|assistant|>) swallow the whitespace beside them: their
        # offsets cover it but decoding does not give it back, so the I3/I4 checks must treat it as part of the token.
        self._absorbing = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
                           if getattr(t, "lstrip", False) or getattr(t, "rstrip", False)}

    # -- chat ---------------------------------------------------------------------------------------------------

    def _messages(self, record: Record) -> tuple[list[dict[str, Any]] | None, Problem | None]:
        messages = record.messages_as_dicts()
        if self._special_re is not None:
            for i, m in enumerate(messages):
                found = self._special_re.search(m["content"])
                if found is None:
                    continue
                if self.options.special_text == "reject":
                    return None, Problem(record.source, record.row, "render", "special-token-text",
                                         f"message {i} ({m['role']}) contains the special-token string {found.group(0)!r}, "
                                         "which the tokenizer would turn into a control token; use --special-text escape to keep it as text")
                m["content"] = self._special_re.sub(lambda s: s.group(0)[0] + ESCAPE_CHAR + s.group(0)[1:], m["content"])
        if "alpaca_instruction" in record.extra:
            for m in messages:
                if m["role"] == "user":
                    instruction, extra_input = record.extra["alpaca_instruction"], record.extra.get("alpaca_input", "")
                    if self.options.special_text == "escape" and self._special_re is not None:
                        escape = lambda s: s.group(0)[0] + ESCAPE_CHAR + s.group(0)[1:]  # noqa: E731
                        instruction, extra_input = self._special_re.sub(escape, instruction), self._special_re.sub(escape, extra_input)
                    m["instruction"], m["input"] = instruction, extra_input
                    break
        return messages, None

    def _plan(self, record: Record) -> _Plan | Problem:
        where = (record.source, record.row, "render")
        messages, problem = self._messages(record)
        if problem is not None:
            return problem
        render = self.template.render
        try:
            full = render(messages)
        except Exception as e:  # the template refused the conversation (raise_exception) or failed
            return Problem(*where, "template-error", f"template {self.template.name!r} cannot render this conversation: {e}")
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if self.options.train_turns == "last":
            turns = turns[-1:]
        prompts, ends, contents, cuts = [], [], [], []
        special_ends = [m.end() for m in self._special_re.finditer(full)] if self._special_re is not None else []
        for k in turns:
            try:
                prompt = render(messages[:k], add_generation_prompt=True)
                through = full if k + 1 == len(messages) else render(messages[: k + 1])
            except Exception as e:
                return Problem(*where, "template-error", f"template cannot render the conversation up to message {k}: {e}")
            if not full.startswith(prompt):
                return Problem(*where, "serving-prefix",
                               f"assistant message {k}: the serving prompt T(conv[:{k}], add_generation_prompt=True) is not a prefix "
                               f"of the full render (they differ at character {_first_difference(prompt, full)}: "
                               f"{_excerpt(prompt, full)})")
            if not full.startswith(through):
                return Problem(*where, "history-mismatch",
                               f"assistant message {k} renders differently inside the history than as the final turn "
                               f"(differ at character {_first_difference(through, full)}: {_excerpt(through, full)}); "
                               "the model would be trained on a turn it is never asked to produce")
            turn_text = full[len(prompt):len(through)].rstrip()
            if not turn_text.endswith(self.end_of_turn):
                return Problem(*where, "no-end-of-turn",
                               f"assistant message {k} is not followed by the end-of-turn marker {self.end_of_turn!r}")
            prompts.append(prompt)
            ends.append(len(prompt) + len(turn_text))
            contents.append(messages[k]["content"])
            at = bisect_right(special_ends, len(prompt))
            cuts.append(special_ends[at - 1] if at else 0)
        return _Plan(record, full, prompts, ends, contents, cuts)

    def _prompt_length(self, plan: _Plan, turn: int, ids: list[int], offsets: list[tuple[int, int]],
                       starts: list[int], tail_ids: list[int]) -> tuple[int, list[int] | None]:
        """Number of tokens of ``tok(P_k)`` when it is a token prefix of ``ids``; else ``(-1, tok(P_k))``.

        Fast path: HF tokenizers split text at added special tokens first and tokenize the pieces independently,
        so when ``ids`` has a token boundary right after ``P_k``'s last special token (at ``cut``), ``tok(P_k)`` is
        ``ids[:j]`` followed by ``tok(P_k[cut:])`` — only that tail needs tokenizing. Anything else (no boundary at
        ``cut``, tail mismatch: e.g. an added token that strips whitespace) falls back to tokenizing the whole prompt.
        """
        cut = plan.cuts[turn]
        j = bisect_left(starts, cut)
        if (cut == 0 or (j > 0 and offsets[j - 1][1] == cut)) and ids[j:j + len(tail_ids)] == tail_ids:
            return j + len(tail_ids), None
        prompt_ids = self.backend.encode(plan.prompts[turn], add_special_tokens=False).ids
        if ids[:len(prompt_ids)] == prompt_ids:
            return len(prompt_ids), None
        return -1, prompt_ids

    def _finish(self, plan: _Plan, full_enc: Any, tail_encs: list[Any]) -> Encoded | Problem:
        record = plan.record
        where = (record.source, record.row, "render")
        ids = full_enc.ids
        offsets = full_enc.offsets
        starts = [o[0] for o in offsets]
        spans: list[tuple[int, int]] = []
        for turn, (tail_enc, char_end) in enumerate(zip(tail_encs, plan.char_ends)):
            start, prompt_ids = self._prompt_length(plan, turn, ids, offsets, starts, tail_enc.ids)
            if prompt_ids is not None:
                at = next((i for i, (a, b) in enumerate(zip(ids, prompt_ids)) if a != b), min(len(ids), len(prompt_ids)))
                return Problem(*where, "serving-prefix-tokens",
                               f"trained turn {turn + 1}: tok(serving prompt) is not a token prefix of input_ids: at token {at} the "
                               f"prompt alone gives {self._pieces(prompt_ids[at:at + 3])} but in context "
                               f"{self._pieces(ids[at:at + 3])} (a marker that merges with the text after it)")
            end = bisect_left(starts, char_end, lo=start)
            if end <= start:
                return Problem(*where, "empty-turn", f"trained turn {turn + 1} has no tokens")
            if offsets[end - 1][1] != char_end and not self._absorbs(ids[end - 1], offsets[end - 1], plan.full, char_end):
                return Problem(*where, "boundary-inside-token",
                               f"trained turn {turn + 1}: the end-of-turn boundary at character {char_end} falls inside the token "
                               f"{self._pieces(ids[end - 1:end])}; no exact mask exists for this template/tokenizer pair")
            spans.append((start, end))
        if self.options.check_decode and spans:
            problem = self._check_decode(plan, ids, offsets, spans)
            if problem is not None:
                return problem
        if self.options.train_on_prompt:
            labels = list(ids)
        else:
            labels = [IGNORE_INDEX] * len(ids)
            for s, e in spans:
                labels[s:e] = ids[s:e]
        return Encoded(record.source, record.row, list(ids), labels, spans)

    def _check_decode(self, plan: _Plan, ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> Problem | None:
        decoded = self.backend.decode_batch([ids[s:e] for s, e in spans], skip_special_tokens=False)
        for turn, ((s, e), text, content) in enumerate(zip(spans, decoded, plan.contents)):
            rendered = plan.full[offsets[s][0]:offsets[e - 1][1]]
            expected = self._without_absorbed_whitespace(plan.full, ids, offsets, s, e) if self._absorbing else rendered
            # SentencePiece decoders drop the "▁" of a run's first token; compare modulo whitespace at the run's edges.
            if text.strip() != expected.strip() and _nfc(text).strip() != _nfc(expected).strip():
                return Problem(plan.record.source, plan.record.row, "render", "decode-mismatch",
                               f"trained turn {turn + 1}: decoded tokens {text[:60]!r} differ from the rendered text {expected[:60]!r}")
            if content.strip() not in rendered:
                return Problem(plan.record.source, plan.record.row, "render", "content-mismatch",
                               f"trained turn {turn + 1}: the trained text does not contain the assistant content "
                               f"(the template rewrites it beyond whitespace trimming): {rendered[:60]!r}")
            if not rendered.rstrip().endswith(self.end_of_turn.strip()):
                return Problem(plan.record.source, plan.record.row, "render", "no-end-of-turn",
                               f"trained turn {turn + 1} does not end with {self.end_of_turn!r}")
        return None

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

    def _finish_text(self, record: Record, enc: Any) -> Encoded:
        ids = list(enc.ids)
        if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids.append(self.eos_id)  # documents are separated by EOS (continued-pretraining convention)
        return Encoded(record.source, record.row, ids, list(ids), [(0, len(ids))], is_text=True)

    # -- batch ------------------------------------------------------------------------------------------------

    def encode_batch(self, records: list[Record]) -> tuple[list[Encoded], list[Problem]]:
        """Encode a batch; returns examples (input order) and the problems of the rows that could not be encoded."""
        problems: list[Problem] = []
        plans: list[tuple[int, _Plan]] = []
        texts: list[tuple[int, Record]] = []
        # Results by position in the batch: split history records share their (source, row).
        results: list[Encoded | None] = [None] * len(records)
        for position, record in enumerate(records):
            if record.is_chat:
                planned = self._plan(record)
                if isinstance(planned, Problem):
                    problems.append(planned)
                else:
                    plans.append((position, planned))
            else:
                texts.append((position, record))
        chat_inputs: list[str] = []
        for _, plan in plans:
            chat_inputs.append(plan.full)
            chat_inputs.extend(prompt[cut:] for prompt, cut in zip(plan.prompts, plan.cuts))
        encodings = self.backend.encode_batch(chat_inputs, add_special_tokens=False) if chat_inputs else []
        i = 0
        for position, plan in plans:
            n = len(plan.prompts)
            result = self._finish(plan, encodings[i], encodings[i + 1:i + 1 + n])
            i += 1 + n
            if isinstance(result, Problem):
                problems.append(result)
            else:
                results[position] = result
        if texts:
            text_encodings = self.backend.encode_batch([r.text for _, r in texts], add_special_tokens=True)
            for (position, record), enc in zip(texts, text_encodings):
                results[position] = self._finish_text(record, enc)
        ordered = [r for r in results if r is not None]
        return ordered, problems


def truncate(example: Encoded, max_length: int) -> Encoded | None:
    """Cut ``example`` to ``max_length`` tokens from the right; None when no trained token would remain."""
    if len(example.input_ids) <= max_length:
        return example
    labels = example.labels[:max_length]
    if all(x == IGNORE_INDEX for x in labels):
        return None
    spans = [(s, min(e, max_length)) for s, e in example.spans if s < max_length]
    return Encoded(example.source, example.row, example.input_ids[:max_length], labels, spans, truncated=True,
                   is_text=example.is_text)


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
    return f"{a[max(0, i - 20):i + 20]!r} vs {b[max(0, i - 20):i + 20]!r}"
