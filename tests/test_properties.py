"""Property tests (hypothesis): random conversations with unicode / whitespace content, every built-in template on
the real tokenizers of its family (Gemma and Phi-3 on stand-in vocabularies with their markers), asserting I1-I4 and the round
trip. A row may be refused only with a reason from a known list, and ordinary rows (content that starts and ends with
a letter or digit, NFC) must always encode."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sftdata.record import Message, Record
from sftdata.render import IGNORE_INDEX, EncodeOptions, Encoder
from sftdata.templates import load_template
from sftdata.verify import parse_rendered, skeleton, strip_beside_absorbing_tokens
from template_helpers import gemma_standin, phi3_standin, shared_tokenizer

PAIRS = [("chatml", "qwen3"), ("qwen3", "qwen3"), ("llama3", "llama3_1"), ("tokenizer", "llama3_1"),
         ("mistral", "mistral-7b-v0.1"), ("zephyr", "mistral-7b-v0.1"), ("llama2", "mistral-7b-v0.1"),
         ("phi3", "mistral-7b-v0.1"), ("phi3", "phi3-standin"), ("gemma", "gemma-standin")]
ALLOWED = {"serving-prefix-tokens", "decode-mismatch", "boundary-inside-token", "empty-turn", "content-mismatch"}

WORD = st.text(alphabet=st.characters(categories=("L", "N"), exclude_characters="ªº"), min_size=1, max_size=8)
SEP = st.sampled_from([" ", " ", "\n", "\n\n", ", ", ". ", "\t", " — ", "🙂 ", "  "])
ORDINARY = st.builds(lambda ws, ss: "".join(w + s for w, s in zip(ws, ss)) + ws[-1],
                     st.lists(WORD, min_size=1, max_size=6), st.lists(SEP, min_size=6, max_size=6))
EDGE = st.one_of(ORDINARY, st.text(alphabet=st.characters(blacklist_categories=("Cs",),
                                                             blacklist_characters="<>[]|"), max_size=24))


def _tok(name):
    standins = {"gemma-standin": gemma_standin, "phi3-standin": phi3_standin}
    return standins[name]() if name in standins else shared_tokenizer(name)


@st.composite
def conversations(draw, content):
    turns = draw(st.integers(1, 3))
    messages = [("system", draw(content))] if draw(st.booleans()) else []
    for _ in range(turns):
        messages += [("user", draw(content)), ("assistant", draw(content))]
    return messages


def _check(name, tokname, messages, ordinary):
    tok = _tok(tokname)
    template = load_template(name, tok)
    encoder = Encoder(template, tok)
    record = Record("p.jsonl", 1, [Message(r, c) for r, c in messages])
    try:
        template.render(record.messages_as_dicts())
    except Exception:
        return  # the official template refuses it (mistral: system message)
    backend = tok.backend_tokenizer
    out, problems = encoder.encode_batch([record])
    if problems:
        assert not ordinary or unicodedata.normalize("NFC", str(messages)) != str(messages), problems[0]
        assert problems[0].kind in ALLOWED, problems[0]
    msgs = record.messages_as_dicts()
    assistant = [k for k, m in enumerate(msgs) if m["role"] == "assistant"]
    assert problems or sorted(k for ex in out for k in ex.turns) == assistant  # every turn trained exactly once
    for ex in out:
        example = msgs[:ex.messages]
        full = template.render(example)
        ids = backend.encode(full, add_special_tokens=False).ids
        if not ex.tokenized_apart:
            assert ex.input_ids == ids  # I1
        sk = skeleton(template, tuple(m["role"] for m in example))
        inside = set()
        for (s, e), k in zip(ex.spans, ex.turns, strict=True):
            prompt = template.render(msgs[:k], add_generation_prompt=True)
            assert ex.input_ids[:s] == backend.encode(prompt, add_special_tokens=False).ids  # I2 (tokens)
            if not ex.tokenized_apart:
                assert full.startswith(prompt)  # I2 (text)
            decoded = backend.decode(ex.input_ids[s:e], skip_special_tokens=False)
            content = strip_beside_absorbing_tokens(sk.normalize(k, msgs[k]["content"]).strip(), tok)
            end_of_turn = strip_beside_absorbing_tokens(encoder.end_of_turn.strip(), tok)
            assert decoded.rstrip().endswith(end_of_turn)  # I4: end marker trained
            assert unicodedata.normalize("NFC", content) in unicodedata.normalize("NFC", decoded)  # I4
            inside.update(range(s, e))
        assert all((lab == t) if i in inside else (lab == IGNORE_INDEX)
                   for i, (t, lab) in enumerate(zip(ex.input_ids, ex.labels)))  # I3
    # round trip (I6): the rendered conversation parses back into its messages, modulo the whitespace rule
    msgs = record.messages_as_dicts()
    roles = [m["role"] for m in msgs]
    sk = skeleton(template, tuple(roles))
    expected = [{"role": m["role"], "content": sk.normalize(i, m["content"])} for i, m in enumerate(msgs)]
    text = template.render(msgs)
    parsed = parse_rendered(template, text, roles)
    if parsed != expected:
        # only when a content contains the template's own separator text (Gemma: a system message with "\n\n",
        # merged into the first user turn) is the rendering ambiguous; the parse then still re-renders to the text
        assert any(sep and sep in m["content"] for sep in sk.separators[1:-1] for m in msgs), (parsed, expected)
        assert parsed is not None and template.render(parsed) == text


@pytest.mark.parametrize("name, tokname", PAIRS)
@settings(max_examples=12, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(messages=conversations(ORDINARY))
def test_ordinary_conversations_encode_exactly(name, tokname, messages):
    _check(name, tokname, messages, ordinary=True)


@pytest.mark.parametrize("name, tokname", PAIRS)
@settings(max_examples=12, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(messages=conversations(EDGE))
def test_any_content_is_exact_or_refused_with_a_reason(name, tokname, messages):
    _check(name, tokname, messages, ordinary=False)
