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


# -- tool calls, tool results, reasoning, training flags --------------------------------------------------------------

TOOL_PAIRS = [("qwen3", "qwen3"), ("llama3", "llama3_1"), ("gpt_oss", "gpt-oss"), ("qwen3_5", "qwen3"), ("qwq", "qwen3")]
TOOLS = [{"type": "function", "function": {"name": name, "description": "A tool.", "parameters": {
    "type": "object", "properties": {"q": {"type": "string"}, "n": {"type": "integer"}}}}} for name in ("lookup", "count")]
TOOL_ALLOWED = ALLOWED | {"reasoning-not-rendered", "missing-reasoning", "tool-calls-not-rendered", "template-error",
                            "content-not-rendered"}


@st.composite
def agent_conversations(draw):
    """user → [assistant with 1-2 tool calls → tool results]* → assistant answer, repeated 1-2 times; random reasoning,
    content beside calls, and train flags."""
    messages = [Message("system", draw(ORDINARY))] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 2))):
        messages.append(Message("user", draw(ORDINARY)))
        for _ in range(draw(st.integers(0, 2))):
            calls = [{"id": f"call{draw(st.integers(10000, 99999))}", "type": "function",
                      "function": {"name": draw(st.sampled_from(["lookup", "count"])),
                                   "arguments": {"q": draw(WORD), "n": draw(st.integers(0, 99))}}}
                     for _ in range(draw(st.integers(1, 2)))]
            messages.append(Message("assistant", draw(st.sampled_from(["", draw(ORDINARY)])), tool_calls=calls,
                                    reasoning=draw(st.one_of(st.none(), ORDINARY)),
                                    train=draw(st.sampled_from([None, None, False]))))
            messages += [Message("tool", draw(ORDINARY), tool_call_id=c["id"], name=c["function"]["name"]) for c in calls]
        messages.append(Message("assistant", draw(ORDINARY), reasoning=draw(st.one_of(st.none(), ORDINARY))))
    return messages


def _check_agent(name, tokname, messages):
    tok = shared_tokenizer(tokname)
    encoder = Encoder(load_template(name, tok), tok, EncodeOptions(template_date="2026-12-02"))
    record = Record("p.jsonl", 1, messages, tools=TOOLS)
    out, problems = encoder.encode_batch([record])
    if problems:
        assert problems[0].kind in TOOL_ALLOWED, problems[0]
        return
    trained = [k for k, m in enumerate(messages) if m.role == "assistant" and m.is_trained]
    assert sorted(k for ex in out for k in ex.turns) == trained  # every trained turn exactly once, no other
    template, backend = encoder.template, tok.backend_tokenizer
    msgs, tools, kwargs = encoder.template_input(record)
    for ex in out:
        if not ex.tokenized_apart and not ex.counts["turns_composed"]:
            full = template.render(msgs[:ex.messages], tools=tools, **kwargs)
            assert ex.input_ids == backend.encode(full, add_special_tokens=False).ids  # I1
        inside = set()
        for (s, e), k in zip(ex.spans, ex.turns, strict=True):
            prompt = template.render(msgs[:k], add_generation_prompt=True, tools=tools, **kwargs)
            assert ex.input_ids[:s] == backend.encode(prompt, add_special_tokens=False).ids  # I2
            decoded = backend.decode(ex.input_ids[s:e], skip_special_tokens=False)
            assert backend.id_to_token(ex.input_ids[e - 1]) in encoder.added  # I3: ends with an end-of-turn token
            message = messages[k]
            expected = [message.content.strip(), (message.reasoning or "").strip()]
            expected += [c["function"]["name"] for c in message.tool_calls or ()]
            assert all(unicodedata.normalize("NFC", x) in unicodedata.normalize("NFC", decoded) for x in expected if x)  # I4
            inside.update(range(s, e))
        assert all((lab == t) if i in inside else (lab == IGNORE_INDEX)
                   for i, (t, lab) in enumerate(zip(ex.input_ids, ex.labels)))  # I3


@pytest.mark.parametrize("name, tokname", TOOL_PAIRS)
@settings(max_examples=10, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(messages=agent_conversations())
def test_tool_call_conversations_keep_the_invariants(name, tokname, messages):
    _check_agent(name, tokname, messages)
