"""Exact input_ids and labels for small conversations, and regressions for failure modes 1-6, 9, 10, 12, 13 of docs/invariants.md.

The expected lists were produced once, read token by token (see the piece names in the comments), and frozen:
a change in any id or label is a change in what a model trains on, and must show up here.
"""

from __future__ import annotations

import copy

import pytest

from sftdata.record import Message, Record
from sftdata.render import IGNORE_INDEX, EncodeOptions, Encoder, truncate
from sftdata.templates import load_template

M = IGNORE_INDEX
SINGLE = [Message("user", "Hi there"), Message("assistant", "Hello!")]
MULTI = [Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello!"),
         Message("user", "Capital of France?"), Message("assistant", "Paris.")]
CONVERSATIONS = {"single": SINGLE, "multi": MULTI}

EXPECTED = {
    ('chatml', 'tiny', 'single'): (
        [3, 90, 88, 74, 87, 204, 45, 78, 275, 87, 74, 4, 204, 3, 70, 88, 88, 264, 89, 265, 89, 204, 45, 285, 81, 84, 6, 4, 204],
        [-100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, 45, 285, 81, 84, 6, 4, -100],
    ),
    ('chatml', 'tiny', 'multi'): (
        [3, 88, 94, 88, 89, 74, 82, 204, 39, 74, 294, 291, 74, 75, 19, 4, 204, 3, 90, 88, 74, 87, 204, 45, 78, 4, 204, 3, 70, 88, 88, 264, 89, 265, 89, 204, 45, 285, 81, 84, 6, 4, 204, 3, 90, 88, 74, 87, 204, 40, 282, 299, 226, 84, 75, 226, 43, 87, 265, 72, 74, 36, 4, 204, 3, 70, 88, 88, 264, 89, 265, 89, 204, 53, 70, 87, 264, 19, 4, 204],
        [-100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, 45, 285, 81, 84, 6, 4, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, 53, 70, 87, 264, 19, 4, -100],
    ),
    ('llama2', 'tiny', 'single'): (
        [1, 64, 278, 279, 66, 226, 45, 78, 275, 87, 74, 226, 64, 20, 278, 279, 66, 226, 45, 285, 81, 84, 6, 226, 2],
        [-100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, 226, 45, 285, 81, 84, 6, 226, 2],
    ),
    ('llama2', 'tiny', 'multi'): (
        [1, 64, 278, 279, 66, 296, 280, 56, 277, 204, 39, 74, 294, 291, 74, 75, 19, 204, 276, 20, 280, 56, 277, 204, 204, 45, 78, 226, 64, 20, 278, 279, 66, 226, 45, 285, 81, 84, 6, 226, 2, 1, 64, 278, 279, 66, 226, 40, 282, 299, 226, 84, 75, 226, 43, 87, 265, 72, 74, 36, 226, 64, 20, 278, 279, 66, 226, 53, 70, 87, 264, 19, 226, 2],
        [-100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, 226, 45, 285, 81, 84, 6, 226, 2, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, 226, 53, 70, 87, 264, 19, 226, 2],
    ),
    ('alpaca', 'tiny', 'single'): (
        [1, 39, 285, 288, 273, 226, 265, 226, 78, 298, 284, 287, 83, 263, 286, 226, 73, 266, 72, 291, 71, 266, 271, 263, 70, 88, 80, 19, 226, 60, 87, 269, 74, 271, 226, 87, 297, 74, 263, 286, 271, 85, 85, 87, 84, 85, 291, 283, 285, 94, 272, 84, 82, 85, 81, 74, 89, 266, 275, 226, 87, 74, 86, 90, 266, 89, 19, 204, 204, 274, 270, 298, 284, 287, 83, 31, 204, 45, 78, 275, 87, 74, 204, 204, 274, 226, 55, 297, 74, 31, 204, 45, 285, 81, 84, 6, 2],
        [-100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, 45, 285, 81, 84, 6, 2],
    ),
    ('alpaca', 'tiny', 'multi'): (
        [1, 39, 74, 294, 291, 74, 75, 19, 204, 204, 274, 270, 298, 284, 287, 83, 31, 204, 45, 78, 204, 204, 274, 226, 55, 297, 74, 31, 204, 45, 285, 81, 84, 6, 2, 204, 204, 274, 270, 298, 284, 287, 83, 31, 204, 40, 282, 299, 226, 84, 75, 226, 43, 87, 265, 72, 74, 36, 204, 204, 274, 226, 55, 297, 74, 31, 204, 53, 70, 87, 264, 19, 2],
        [-100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, 45, 285, 81, 84, 6, 2, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, 53, 70, 87, 264, 19, 2],
    ),
    ('chatml', 'qwen3', 'single'): (
        [151644, 872, 198, 13048, 1052, 151645, 198, 151644, 77091, 198, 9707, 0, 151645, 198],
        [-100, -100, -100, -100, -100, -100, -100, -100, -100, -100, 9707, 0, 151645, -100],
    ),
    ('chatml', 'qwen3', 'multi'): (
        [151644, 8948, 198, 3430, 9814, 13, 151645, 198, 151644, 872, 198, 13048, 151645, 198, 151644, 77091, 198, 9707, 0, 151645, 198, 151644, 872, 198, 63593, 315, 9625, 30, 151645, 198, 151644, 77091, 198, 59604, 13, 151645, 198],
        [-100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, 9707, 0, 151645, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, 59604, 13, 151645, -100],
    ),
    ('llama2', 'mistral-7b-v0.1', 'single'): (
        [1, 733, 16289, 28793, 15359, 736, 733, 28748, 16289, 28793, 22557, 28808, 28705, 2],
        [-100, -100, -100, -100, -100, -100, -100, -100, -100, -100, 22557, 28808, 28705, 2],
    ),
    ('llama2', 'mistral-7b-v0.1', 'multi'): (
        [1, 733, 16289, 28793, 2087, 18741, 4060, 13, 3574, 6817, 28723, 13, 28789, 700, 18741, 4060, 13, 13, 23809, 733, 28748, 16289, 28793, 22557, 28808, 28705, 2, 1, 733, 16289, 28793, 17053, 302, 4843, 28804, 733, 28748, 16289, 28793, 5465, 28723, 28705, 2],
        [-100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, 22557, 28808, 28705, 2, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, 5465, 28723, 28705, 2],
    ),
    ('alpaca', 'mistral-7b-v0.1', 'single'): (
        [1, 20811, 349, 396, 13126, 369, 13966, 264, 3638, 28723, 12018, 264, 2899, 369, 6582, 1999, 2691, 274, 272, 2159, 28723, 13, 13, 27332, 3133, 3112, 28747, 13, 23809, 736, 13, 13, 27332, 12107, 28747, 13, 16230, 28808, 2],
        [-100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, 16230, 28808, 2],
    ),
    ('alpaca', 'mistral-7b-v0.1', 'multi'): (
        [1, 1739, 6817, 28723, 13, 13, 27332, 3133, 3112, 28747, 13, 23809, 13, 13, 27332, 12107, 28747, 13, 16230, 28808, 2, 28705, 13, 13, 27332, 3133, 3112, 28747, 13, 9953, 1803, 302, 4843, 28804, 13, 13, 27332, 12107, 28747, 13, 3916, 278, 28723, 2],
        [-100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, 16230, 28808, 2, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, 3916, 278, 28723, 2],
    ),
    ('alpaca', 'qwen3', 'single'): (
        [38214, 374, 458, 7600, 429, 16555, 264, 3383, 13, 9645, 264, 2033, 429, 34901, 44595, 279, 1681, 382, 14374, 29051, 510, 13048, 1052, 271, 14374, 5949, 510, 9707, 0, 151645],
        [-100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, 9707, 0, 151645],
    ),
    ('alpaca', 'qwen3', 'multi'): (
        [3430, 9814, 382, 14374, 29051, 510, 13048, 271, 14374, 5949, 510, 9707, 0, 151645, 271, 14374, 29051, 510, 63593, 315, 9625, 1939, 14374, 5949, 510, 59604, 13, 151645],
        [-100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, 9707, 0, 151645, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, 59604, 13, 151645],
    ),
}


def encode(tok, template: str, messages, options: EncodeOptions | None = None, extra=None):
    encoder = Encoder(load_template(template, tok), tok, options)
    examples, problems = encoder.encode_batch([Record("mem", 1, messages=list(messages), extra=extra or {})])
    return examples, problems


def runs(labels):
    out, start = [], None
    for i, x in enumerate(labels + [M]):
        if x != M and start is None:
            start = i
        elif x == M and start is not None:
            out.append((start, i))
            start = None
    return out


@pytest.mark.parametrize("key", sorted(EXPECTED), ids=lambda k: "-".join(k))
def test_exact_ids_and_labels(load_tok, key):
    template, tokenizer, conversation = key
    tok = load_tok(tokenizer)
    examples, problems = encode(tok, template, CONVERSATIONS[conversation])
    assert problems == []
    expected_ids, expected_labels = EXPECTED[key]
    assert examples[0].input_ids == expected_ids
    assert examples[0].labels == expected_labels


@pytest.mark.parametrize("key", sorted(EXPECTED), ids=lambda k: "-".join(k))
def test_trained_runs_are_content_plus_end_marker(load_tok, key):
    """I3/I4 against an independent reference: each trained run decodes to the reply and the end-of-turn marker."""
    template, tokenizer, conversation = key
    tok = load_tok(tokenizer)
    ids, labels = EXPECTED[key]
    replies = [m.content for m in CONVERSATIONS[conversation] if m.role == "assistant"]
    marker = load_template(template, tok).end_of_turn
    spans = runs(labels)
    assert len(spans) == len(replies)
    for (s, e), reply in zip(spans, replies):
        assert labels[s:e] == ids[s:e]
        assert tok.decode(ids[s:e]).strip() == (reply + marker).strip()


def test_i1_input_ids_equal_server_tokenization(load_tok):
    """I1: input_ids == tok(apply-chat-template text) with add_special_tokens=False, as a server does it."""
    tok = load_tok("qwen3")
    template = load_template("chatml", tok)
    text = template.render([m.to_dict() for m in MULTI])
    served = tok(text, add_special_tokens=False)["input_ids"]
    assert EXPECTED[("chatml", "qwen3", "multi")][0] == served


def test_i2_serving_prompt_is_token_prefix(load_tok):
    tok = load_tok("mistral-7b-v0.1")
    template = load_template("llama2", tok)
    ids, labels = EXPECTED[("llama2", "mistral-7b-v0.1", "multi")]
    for k, (start, _) in zip((2, 4), runs(labels)):
        prompt = template.render([m.to_dict() for m in MULTI[:k]], add_generation_prompt=True)
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        assert ids[: len(prompt_ids)] == prompt_ids
        assert start == len(prompt_ids)


def test_whitespace_and_unicode_kept_exactly(load_tok):
    tok = load_tok("qwen3")
    messages = [Message("user", "  ¿Qué tal? 你好 🙂\n"), Message("assistant", " 4 \n")]
    (ex,), problems = encode(tok, "chatml", messages)
    assert problems == []
    (s, e), = runs(ex.labels)
    assert tok.decode(ex.input_ids[s:e]) == " 4 \n<|im_end|>"
    assert tok.decode(ex.input_ids) == "<|im_start|>user\n  ¿Qué tal? 你好 🙂\n<|im_end|>\n<|im_start|>assistant\n 4 \n<|im_end|>\n"


def test_alpaca_with_and_without_input(load_tok):
    tok = load_tok("qwen3")
    messages = [Message("user", "Add.\n\n2 and 3", fields={"instruction": "Add.", "input": "2 and 3"}),
                Message("assistant", "5")]
    (ex,), _ = encode(tok, "alpaca", messages)
    assert tok.decode(ex.input_ids) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n"
        "### Response:\n5<|im_end|>")
    (ex,), _ = encode(tok, "alpaca", [Message("user", "Add.", fields={"instruction": "Add.", "input": ""}),
                                      Message("assistant", "5")])
    assert tok.decode(ex.input_ids) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd.\n\n### Response:\n5<|im_end|>")
    assert [x for x in ex.labels if x != M] == tok("5<|im_end|>", add_special_tokens=False)["input_ids"]


# --- failure modes (docs/invariants.md) -----------------------------------------------------------------------------------


def test_fm1_marker_tokenizes_differently_alone_than_in_context(load_tok):
    """"### Response:" alone is ['▁###', ...] but in context ['###', ...]: marker search would find nothing."""
    tok = load_tok("mistral-7b-v0.1")
    ids, labels = EXPECTED[("alpaca", "mistral-7b-v0.1", "single")]
    marker_alone = tok("### Response:", add_special_tokens=False)["input_ids"]
    assert marker_alone == [774, 12107, 28747]
    assert not any(ids[i:i + 3] == marker_alone for i in range(len(ids)))  # the trap is real here ...
    assert [x for x in labels if x != M] == [16230, 28808, 2]  # ... and the mask is still exact: "Hello", "!", "</s>"


def test_fm2_next_user_turn_after_bos_never_leaks(load_tok):
    """After '</s><s>', '[INST]' tokenizes as '▁[' here; the second user turn must stay fully masked."""
    tok = load_tok("mistral-7b-v0.1")
    ids, labels = EXPECTED[("llama2", "mistral-7b-v0.1", "multi")]
    first, second = runs(labels)
    between = labels[first[1]:second[0]]
    assert between and all(x == M for x in between)
    # <s> ▁[ INST ] ▁Capital ▁of ▁France ? ▁[ / INST ]
    assert ids[first[1]:second[0]] == [1, 733, 16289, 28793, 17053, 302, 4843, 28804, 733, 28748, 16289, 28793]


def test_fm3_trailing_space_marker_is_trained_as_served_or_reported(load_tok, tmp_path):
    """A generation prompt ending in "Answer: " is not a token prefix when the space merges with the reply: the turn is
    trained as tok(prompt) + tok(completion), the sequence a server feeds, or refused under --tokenization context."""
    tok = load_tok("qwen3")
    path = tmp_path / "qa.jinja"
    path.write_text("{% for m in messages %}{% if m.role == 'user' %}Question: {{ m.content }}\n"
                    "{% else %}Answer: {{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
                    "{% if add_generation_prompt %}Answer: {% endif %}")
    conversation = [Message("user", "Capital?"), Message("assistant", "Paris")]
    # In context "Answer: Paris" gives [..., 'Answer', ':', 'ĠParis']; a server sends [..., 'Answer', ':', 'Ġ'] and the
    # model must emit 'Paris', '<|im_end|>'.
    (ex,), problems = encode(tok, str(path), conversation)
    assert problems == [] and ex.tokenized_apart
    assert ex.input_ids == [14582, 25, 18374, 5267, 16141, 25, 220, 59604, 151645]
    assert ex.labels == [M] * 7 + [59604, 151645]
    examples, problems = encode(tok, str(path), conversation, EncodeOptions(tokenization="context"))
    assert examples == []
    assert [p.kind for p in problems] == ["serving-prefix-tokens"]
    # Digits are split one by one in Qwen3's vocabulary, so " 42" does not merge: that pair is exact and is kept.
    (ex,), problems = encode(tok, str(path), [Message("user", "6*7?"), Message("assistant", "42")])
    assert problems == []
    assert ex.input_ids == [14582, 25, 220, 21, 9, 22, 5267, 16141, 25, 220, 19, 17, 151645, 198]
    assert ex.labels == [M] * 10 + [19, 17, 151645, M]


def test_fm4_pad_equal_to_eos_still_trains_eos(load_tok):
    tok = copy.deepcopy(load_tok("mistral-7b-v0.1"))
    tok.pad_token = tok.eos_token
    (ex,), problems = encode(tok, "llama2", SINGLE)
    assert problems == []
    assert ex.labels[-1] == tok.eos_token_id == 2


def test_fm5_one_end_marker_per_turn_and_template_eot_not_model_eos(load_tok):
    tok = copy.deepcopy(load_tok("qwen3"))
    tok.eos_token = "<|endoftext|>"  # a base model's EOS differs from ChatML's end of turn
    (ex,), problems = encode(tok, "chatml", MULTI)
    assert problems == []
    assert ex.input_ids.count(151645) == 5  # one <|im_end|> per message, none appended
    assert 151643 not in ex.input_ids
    assert [ex.labels[e - 1] for _, e in runs(ex.labels)] == [151645, 151645]


def test_fm6_no_double_bos(load_tok):
    tok = load_tok("llama3_1")
    (ex,), problems = encode(tok, "tokenizer", MULTI)
    assert problems == []
    assert ex.input_ids[0] == tok.bos_token_id == 128000
    assert ex.input_ids.count(128000) == 1
    ids, _ = EXPECTED[("llama2", "mistral-7b-v0.1", "single")]
    assert ids[:2] == [1, 733]


def test_fm9_assistant_header_is_never_trained(load_tok):
    tok = load_tok("qwen3")
    ids, labels = EXPECTED[("chatml", "qwen3", "multi")]
    header = [151644, 77091, 198]  # <|im_start|> assistant \n
    positions = [i for i in range(len(ids)) if ids[i:i + 3] == header]
    assert len(positions) == 2
    for p in positions:
        assert labels[p:p + 3] == [M, M, M]
        assert labels[p + 3] != M  # training starts right after the generation prompt


def test_fm10_truncation_never_keeps_a_row_without_trained_tokens(load_tok):
    tok = load_tok("qwen3")
    (ex,), _ = encode(tok, "chatml", MULTI)
    first_trained = runs(ex.labels)[0][0]
    assert truncate(ex, first_trained) is None
    cut = truncate(ex, first_trained + 1)
    assert cut.truncated and cut.input_ids == ex.input_ids[:first_trained + 1]
    assert [x for x in cut.labels if x != M] == [ex.input_ids[first_trained]]
    assert truncate(ex, len(ex.input_ids)) is ex


def test_fm12_llama3_trim_aligns_trained_span(load_tok):
    tok = load_tok("llama3_1")
    messages = [Message("user", "  Hi  "), Message("assistant", "\n  Hello!  \n")]
    (ex,), problems = encode(tok, "tokenizer", messages)
    assert problems == []
    (s, e), = runs(ex.labels)
    assert tok.decode(ex.input_ids[s:e]) == "Hello!<|eot_id|>"
    assert ex.labels[s:e] == tok("Hello!<|eot_id|>", add_special_tokens=False)["input_ids"]


def test_fm13_special_token_text_in_content_rejected_or_escaped(load_tok):
    tok = load_tok("qwen3")
    messages = [Message("user", "say <|im_end|> please"), Message("assistant", "ok")]
    examples, problems = encode(tok, "chatml", messages)
    assert examples == [] and [p.kind for p in problems] == ["special-token-text"]
    assert "'<|im_end|>'" in problems[0].detail
    (ex,), problems = encode(tok, "chatml", messages, EncodeOptions(special_text="escape"))
    assert problems == []
    assert ex.input_ids.count(151645) == 2  # only the template's own end markers are control tokens
    assert "say <\u200b|im_end|> please" in tok.decode(ex.input_ids)


def test_train_turns_last_and_train_on_prompt(load_tok):
    tok = load_tok("qwen3")
    ids, labels = EXPECTED[("chatml", "qwen3", "multi")]
    (last,), _ = encode(tok, "chatml", MULTI, EncodeOptions(train_turns="last"))
    assert last.input_ids == ids
    assert runs(last.labels) == runs(labels)[1:]
    (everything,), _ = encode(tok, "chatml", MULTI, EncodeOptions(train_on_prompt=True))
    assert everything.labels == ids


def test_raw_text_trains_every_token_and_ends_with_eos(load_tok):
    tok = load_tok("mistral-7b-v0.1")
    encoder = Encoder(load_template("llama2", tok), tok)
    (ex,), problems = encoder.encode_batch([Record("doc.txt", 1, text="Hello world")])
    assert problems == []
    assert ex.input_ids == [1, 22557, 1526, 2]  # <s> ▁Hello ▁world </s> (the tokenizer adds BOS for raw text)
    assert ex.labels == ex.input_ids


def test_history_mismatch_is_reported_under_fail(load_tok):
    """Qwen3's own template renders earlier assistant turns without <think>: with --history-policy fail the row is
    reported, never trained silently; by default each such turn is its own example (tests/test_policy.py)."""
    tok = load_tok("qwen3")
    examples, problems = encode(tok, "tokenizer", MULTI, EncodeOptions(history_policy="fail"))
    assert examples == [] and [p.kind for p in problems] == ["history-mismatch"]


def test_boundary_inside_token_is_reported(load_tok):
    """ChatML on Llama-3's vocabulary: '<|im_end|>' is plain text and '>\\n' is one token, so no exact mask exists."""
    tok = load_tok("llama3_1")
    examples, problems = encode(tok, "chatml", SINGLE)
    assert examples == [] and [p.kind for p in problems] == ["boundary-inside-token"]
    assert "'>Ċ'=397" in problems[0].detail


def test_template_error_is_a_row_problem(load_tok):
    tok = load_tok("mistral-7b-v0.1")
    messages = [Message("assistant", "I speak first"), Message("user", "ok")]
    examples, problems = encode(tok, "llama2", messages + [Message("assistant", "fine")])
    assert examples == []
    assert [p.kind for p in problems] == ["template-error"]
    assert "alternate" in problems[0].detail
