"""Regression tests for failure modes 7, 8, 11 and 12 of docs/invariants.md (1-6, 9, 10, 13 are in tests/test_render.py)."""

from __future__ import annotations

from sftdata.policy import history_mismatch, plan_history_policy
from sftdata.record import Message, Record
from sftdata.render import IGNORE_INDEX, EncodeOptions, Encoder
from sftdata.templates import ChatTemplate, load_template, special_token_variables
from template_helpers import gemma_standin, shared_tokenizer


def _record(*turns, row=1):
    return Record("t.jsonl", row, [Message(r, c) for r, c in turns])


CONV = (("user", "Hi"), ("assistant", "Hello there."), ("user", "2+2?"), ("assistant", "4"))


def test_7_end_of_turn_token_that_is_not_eos_is_trained():
    """Gemma's <end_of_turn> is not eos_token (axolotl#3754): it must still be trained after every reply."""
    tok = gemma_standin()
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    assert eot != tok.eos_token_id
    ex, problems = Encoder(load_template("gemma", tok), tok).encode_batch([_record(*CONV)])
    assert not problems
    ex = ex[0]
    assert len(ex.spans) == 2
    for s, e in ex.spans:
        assert ex.input_ids[e - 1] == eot and ex.labels[e - 1] == eot
    assert sum(1 for i in ex.labels if i == eot) == 2
    # the "\n" after <end_of_turn> and the next <start_of_turn> stay -100
    s, e = ex.spans[0]
    assert ex.labels[e] == IGNORE_INDEX


def test_8_qwen3_generation_prompt_not_prefix_of_full_render():
    """trl#5213: Qwen3 renders history turns without <think>: detected, and each policy behaves as documented."""
    tok = shared_tokenizer("qwen3")
    template = load_template("qwen3", tok)
    assert history_mismatch(Encoder(template, tok)) is not None
    record = _record(*CONV)
    # fail: the row is reported with the reason, never trained silently
    _, problems = Encoder(template, tok, EncodeOptions(history_policy="fail")).encode_batch([record])
    assert problems[0].kind == "history-mismatch"
    # auto (split): the first turn becomes its own example conv[:2]; the last turn trains inside the full conversation
    encoder = Encoder(template, tok)
    assert plan_history_policy(encoder).applied == "split"
    out, problems = encoder.encode_batch([record])
    assert not problems and [(ex.messages, ex.turns) for ex in out] == [(2, [1]), (4, [3])]
    msgs = record.messages_as_dicts()
    for ex in out:
        k = ex.turns[0]
        served = template.render(msgs[:k], add_generation_prompt=True)
        full = template.render(msgs[:ex.messages])
        assert ex.input_ids == tok.backend_tokenizer.encode(full, add_special_tokens=False).ids
        (s, e), = ex.spans
        assert ex.input_ids[:s] == tok.backend_tokenizer.encode(served, add_special_tokens=False).ids
        assert tok.decode(ex.input_ids[s:e]) == full[len(served):].rstrip()
        assert tok.decode(ex.input_ids[s:e]).startswith("<think>\n\n</think>\n\n")
    # last: only the final turn is trained, the earlier one is -100 context and counted
    out, problems = Encoder(template, tok, EncodeOptions(history_policy="last")).encode_batch([record])
    assert not problems and len(out) == 1 and out[0].turns == [3] and out[0].counts["turns_untrained_history"] == 1


def test_8_consistent_templates_are_left_alone():
    for name, tok in [("chatml", "qwen3"), ("llama3", "llama3_1")]:
        encoder = Encoder(load_template(name, shared_tokenizer(tok)), shared_tokenizer(tok))
        assert history_mismatch(encoder) is None
        assert plan_history_policy(encoder).applied == "none"
        out, problems = encoder.encode_batch([_record(*CONV)])
        assert not problems and [(ex.messages, ex.turns) for ex in out] == [(4, [1, 3])]


GENERATION_CHATML = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ m['content'] + '<|im_end|>\\n' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_11_generation_span_ending_inside_a_token():
    """The {% generation %} span ends after "\\n", inside the "\\n\\n" token: sftdata does not use the tags; it places
    the boundary after <|im_end|> from offsets and trains exactly content + <|im_end|>."""
    tok = shared_tokenizer("qwen3")
    template = ChatTemplate("gen", GENERATION_CHATML, special_token_variables(tok))
    text = template.render([m.to_dict() for m in _record(*CONV).messages])
    enc = tok.backend_tokenizer.encode(text, add_special_tokens=False)
    assert "ĊĊ" in enc.tokens  # the "\n" the generation span ends with merged with the "\n" outside it
    ex, problems = Encoder(template, tok).encode_batch([_record(*CONV)])
    assert not problems
    decoded = [tok.decode(ex[0].input_ids[s:e]) for s, e in ex[0].spans]
    assert decoded == ["Hello there.<|im_end|>", "4<|im_end|>"]
    assert all(tok.convert_ids_to_tokens(ex[0].input_ids[e]) == "ĊĊ" and ex[0].labels[e] == IGNORE_INDEX
               for s, e in ex[0].spans)


def test_12_llama3_trim_does_not_misalign():
    """Llama-3 trims content: the raw content is not in the rendered text, yet the mask is exact."""
    tok = shared_tokenizer("llama3_1")
    template = load_template("llama3", tok)
    record = _record(("system", "  be terse \n"), ("user", "\n\nHi  "), ("assistant", "  Hello there.\n\n"),
                     ("user", "again"), ("assistant", "\tOK \n"))
    text = template.render(record.messages_as_dicts())
    assert "  Hello there.\n\n" not in text
    ex, problems = Encoder(template, tok).encode_batch([record])
    assert not problems
    ex = ex[0]
    assert ex.input_ids[0] == tok.bos_token_id and ex.input_ids[1] != tok.bos_token_id
    assert [tok.decode(ex.input_ids[s:e]) for s, e in ex.spans] == ["Hello there.<|eot_id|>", "OK<|eot_id|>"]
    trained = {i for s, e in ex.spans for i in range(s, e)}
    assert all((lab == tid) == (i in trained) for i, (tid, lab) in enumerate(zip(ex.input_ids, ex.labels)))
