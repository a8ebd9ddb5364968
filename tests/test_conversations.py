"""Tool calls, tool results, reasoning and per-message training flags, exactly as served (docs/invariants.md).

Every example is checked three ways: ``input_ids`` equal the server's tokenization of the template's render (I1,
computed here, not by the encoder), the label layout is exact (``("M", n)`` = n masked tokens, a list = the trained ids
in order), and each trained run decodes to the turn's target text.
"""

from __future__ import annotations

import pytest

from sftdata.record import Message, Record
from sftdata.render import IGNORE_INDEX, EncodeOptions, Encoder
from sftdata.templates import load_template
from template_helpers import OFFICIAL, shared_tokenizer

M = IGNORE_INDEX
ADD = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]


def call(name, call_id, **arguments):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def layout(labels):
    """Labels as runs: ("M", n) for n masked tokens, a list for a run of trained ids."""
    out, i = [], 0
    while i < len(labels):
        j = i
        masked = labels[i] == M
        while j < len(labels) and (labels[j] == M) == masked:
            j += 1
        out.append(("M", j - i) if masked else labels[i:j])
        i = j
    return out


def encode(tok, template, record, **options):
    encoder = Encoder(template if not isinstance(template, str) else load_template(template, tok), tok,
                      EncodeOptions(**options))
    return encoder, *encoder.encode_batch([record])


def served(tok, template, record, example, tools=None):
    """The server's tokenization of the example's render, and the text of each trained turn's target."""
    msgs = record.messages_as_dicts()[:example.messages]
    text = template.render(msgs, tools=tools)
    ids = tok.backend_tokenizer.encode(text, add_special_tokens=False).ids
    targets = []
    for k in example.turns:
        prompt = template.render(msgs[:k], add_generation_prompt=True, tools=tools)
        targets.append(template.render(msgs[:k + 1], tools=tools)[len(prompt):].rstrip())
    return ids, targets


def check_served(tok, template, record, examples):
    for ex in examples:
        ids, targets = served(tok, template, record, ex, record.tools)
        assert ex.input_ids == ids
        assert [tok.decode(ex.input_ids[s:e]) for s, e in ex.spans] == targets


# -- Qwen3 (its official template is the built-in qwen3) ------------------------------------------------------------

TOOL_CALL = Record("t.jsonl", 1, [Message("user", "2+3?"),
                                  Message("assistant", "", tool_calls=[call("add", "c1", a=2, b=3)]),
                                  Message("tool", "5", tool_call_id="c1"), Message("assistant", "5.")], tools=ADD)
# <think> \n\n </think> \n\n <tool_call> \n {" name ":" add "," arguments ": {" a ": 2 ," b ": 3 }}\n </tool_call> <|im_end|>
QWEN3_CALL = [151667, 271, 151668, 271, 151657, 198, 4913, 606, 788, 330, 718, 497, 330, 16370, 788, 5212, 64, 788,
              220, 17, 11, 330, 65, 788, 220, 18, 11248, 151658]
IM_END, EMPTY_THINK = 151645, [151667, 271, 151668, 271]


def test_qwen3_tool_call_and_result():
    """The tool-call turn trains its <tool_call> markup; Qwen3 renders it without <think> in history, so it is its own
    example (prompt exactly as served); the tools block and the tool result are context."""
    tok = shared_tokenizer("qwen3")
    encoder, examples, problems = encode(tok, "qwen3", TOOL_CALL)
    assert problems == []
    assert [(ex.messages, ex.turns) for ex in examples] == [(2, [1]), (4, [3])]
    assert layout(examples[0].labels) == [("M", 119), QWEN3_CALL + [IM_END], ("M", 1)]
    assert layout(examples[1].labels) == [("M", 158), EMPTY_THINK + [20, 13, IM_END], ("M", 1)]  # "5."
    check_served(tok, encoder.template, TOOL_CALL, examples)
    assert examples[0].counts["turns_trained_tool_call"] == 1 and examples[0].counts["examples_split"] == 1


def test_qwen3_parallel_calls_and_results():
    tok = shared_tokenizer("qwen3")
    record = Record("t.jsonl", 2, [Message("user", "2+3, 4+5?"),
                                   Message("assistant", "", tool_calls=[call("add", "c1", a=2, b=3),
                                                                        call("add", "c2", a=4, b=5)]),
                                   Message("tool", "5"), Message("tool", "9"), Message("assistant", "5, 9.")], tools=ADD)
    encoder, examples, problems = encode(tok, "qwen3", record)
    assert problems == []
    second_call = [151657, 198, 4913, 606, 788, 330, 718, 497, 330, 16370, 788, 5212, 64, 788, 220, 19, 11, 330, 65,
                   788, 220, 20, 11248, 151658]
    assert layout(examples[0].labels) == [("M", 124), QWEN3_CALL + [198] + second_call + [IM_END], ("M", 1)]
    assert layout(examples[1].labels) == [("M", 194), EMPTY_THINK + [20, 11, 220, 24, 13, IM_END], ("M", 1)]
    check_served(tok, encoder.template, record, examples)
    text = tok.decode(examples[1].input_ids)
    assert "<tool_response>\n5\n</tool_response>\n<tool_response>\n9\n</tool_response>" in text  # results: context


def test_qwen3_reasoning_is_trained_not_an_empty_think():
    tok = shared_tokenizer("qwen3")
    record = Record("t.jsonl", 3, [Message("user", "Hi"), Message("assistant", "Hello.", reasoning="Greet back.")])
    encoder, (ex,), problems = encode(tok, "qwen3", record)
    assert problems == []
    # <think> \n G reet back .\n </think> \n\n Hello . <|im_end|>
    assert layout(ex.labels) == [("M", 9), [151667, 198, 38, 3744, 1182, 624, 151668, 271, 9707, 13, IM_END], ("M", 1)]
    check_served(tok, encoder.template, record, [ex])
    assert ex.counts["turns_trained_reasoning"] == 1


def test_qwen3_agent_trajectory_after_the_last_query_is_one_example():
    """Turns after the last user message keep their reasoning in history: both train inside one example."""
    tok = shared_tokenizer("qwen3")
    record = Record("t.jsonl", 4, [Message("user", "2+3?"),
                                   Message("assistant", "", reasoning="Use add.", tool_calls=[call("add", "c1", a=2, b=3)]),
                                   Message("tool", "5"), Message("assistant", "5.", reasoning="Got 5.")], tools=ADD)
    encoder, (ex,), problems = encode(tok, "qwen3", record)
    assert problems == [] and ex.turns == [1, 3]
    assert layout(ex.labels) == [("M", 119), [151667, 198, 10253, 912, 624, 151668, 271] + QWEN3_CALL[4:] + [IM_END],
                                 ("M", 14), [151667, 198, 32462, 220, 20, 624, 151668, 271, 20, 13, IM_END], ("M", 1)]
    check_served(tok, encoder.template, record, [ex])


def test_arguments_given_as_a_json_string_render_like_an_object():
    tok = shared_tokenizer("qwen3")
    as_string = Record("t.jsonl", 1, [Message("user", "2+3?"), Message("assistant", "", tool_calls=[
        {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}])], tools=ADD)
    _, (ex,), problems = encode(tok, "qwen3", as_string)
    assert problems == [] and layout(ex.labels) == [("M", 119), QWEN3_CALL + [IM_END], ("M", 1)]


def test_enable_thinking_from_the_row_or_the_options():
    """Qwen3 with enable_thinking=false writes <think>\\n\\n</think>\\n\\n into the generation prompt: the served prompt
    holds it, so it is context, and only the answer is trained."""
    tok = shared_tokenizer("qwen3")
    record = Record("t.jsonl", 1, [Message("user", "Hi"), Message("assistant", "Hello.")],
                    template_kwargs={"enable_thinking": False})
    _, (ex,), problems = encode(tok, "qwen3", record)
    assert problems == [] and layout(ex.labels) == [("M", 13), [9707, 13, IM_END], ("M", 1)]
    plain = Record("t.jsonl", 1, [Message("user", "Hi"), Message("assistant", "Hello.")])
    _, (same,), _ = encode(tok, "qwen3", plain, template_kwargs={"enable_thinking": False})
    assert same.input_ids == ex.input_ids and same.labels == ex.labels


# -- per-message training flags -------------------------------------------------------------------------------------

def test_train_false_turn_is_context_and_counted_nowhere_else():
    tok = shared_tokenizer("qwen3")
    record = Record("t.jsonl", 1, [Message("user", "Hi"), Message("assistant", "Hello!", train=False),
                                   Message("user", "Bye"), Message("assistant", "Bye.")])
    _, examples, problems = encode(tok, "chatml", record)
    assert problems == [] and [ex.turns for ex in examples] == [[3]]
    # <|im_start|>assistant\nHello!<|im_end|> stays -100; only "Bye.<|im_end|>" is trained
    assert layout(examples[0].labels) == [("M", 23), [1359, 68, 13, IM_END], ("M", 1)]


# -- end-of-turn markers --------------------------------------------------------------------------------------------

def test_header_written_after_every_message_is_never_trained():
    """The original Llama-3-Instruct template appends the assistant header after every conversation: the end of turn is
    <|eot_id|>, the header after it stays -100, and turns are not split needlessly (failure mode 17)."""
    tok = shared_tokenizer("llama3_1")
    template = load_template(str(OFFICIAL / "llama3_original.jinja"), tok)
    record = Record("t.jsonl", 1, [Message("user", "Hi"), Message("assistant", "Hello!"), Message("user", "2+2?"),
                                   Message("assistant", "4")])
    encoder, (ex,), problems = encode(tok, template, record)
    assert problems == [] and encoder.header == "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert ex.input_ids == [128000, 128006, 882, 128007, 271, 13347, 128009, 128006, 78191, 128007, 271, 9906, 0, 128009,
                            128006, 882, 128007, 271, 17, 10, 17, 30, 128009, 128006, 78191, 128007, 271, 19, 128009,
                            128006, 78191, 128007, 271]
    assert layout(ex.labels) == [("M", 11), [9906, 0, 128009], ("M", 13), [19, 128009], ("M", 4)]
    from sftdata.verify import verify

    report = verify(tok, template)
    assert report.invariant_ok and report.history.applied == "none"


# -- refusals: a field the template cannot render is never dropped ---------------------------------------------------

@pytest.mark.parametrize("template, record, kind", [
    ("chatml", TOOL_CALL, "tool-calls-not-rendered"),
    ("llama3", Record("t.jsonl", 1, [Message("user", "Hi"), Message("assistant", "Hello.", reasoning="Greet.")]),
     "reasoning-not-rendered"),
    ("chatml", Record("t.jsonl", 1, [Message("user", "Hi"), Message("assistant", "Hello.")], tools=ADD),
     "tools-not-rendered"),
    ("llama2", Record("t.jsonl", 1, [Message("user", "2+3?"), Message("assistant", "", tool_calls=[call("add", "c1")]),
                                     Message("tool", "5"), Message("assistant", "5.")]), "template-error"),
])
def test_fields_a_template_cannot_render_make_the_row_a_problem(template, record, kind):
    tok = shared_tokenizer("llama3_1" if template == "llama3" else "mistral-7b-v0.1" if template == "llama2" else "qwen3")
    _, examples, problems = encode(tok, template, record)
    assert examples == [] and [p.kind for p in problems] == [kind]
    assert problems[0].row == record.row and problems[0].stage == "render"


# -- control tokens -------------------------------------------------------------------------------------------------

def test_every_added_token_in_content_is_caught_not_only_special_ones():
    """Qwen3's <think>, <tool_call> and FIM tokens are added tokens flagged non-special: a user writing them would
    inject control ids. Inside an assistant turn, the reasoning/tool-call markup the template itself writes there is
    what the model emits and stays allowed."""
    tok = shared_tokenizer("qwen3")
    for text in ("<think>", "</tool_call>", "<|fim_prefix|>", "<tool_response>", "<|im_start|>"):
        record = Record("t.jsonl", 1, [Message("user", f"say {text} now"), Message("assistant", "ok")])
        _, examples, problems = encode(tok, "qwen3", record)
        assert examples == [] and [p.kind for p in problems] == ["special-token-text"], text
        _, (ex,), problems = encode(tok, "qwen3", record, special_text="escape")
        _, (plain,), _ = encode(tok, "qwen3", Record("t.jsonl", 1, [Message("user", "say it now"), Message("assistant", "ok")]))
        token = tok.convert_tokens_to_ids(text)
        assert problems == [] and ex.input_ids.count(token) == plain.input_ids.count(token)
    hermes = Record("t.jsonl", 1, [Message("user", "2+3?"),
                                   Message("assistant", '<tool_call>\n{"name": "add"}\n</tool_call>')])
    _, (ex,), problems = encode(tok, "qwen3", hermes)
    assert problems == [] and 151657 in [x for x in ex.labels if x != M]  # the <tool_call> id is trained
    _, _, problems = encode(tok, "chatml", hermes)  # plain ChatML never writes <tool_call>: it is not markup there
    assert [p.kind for p in problems] == ["special-token-text"]
    fim = Record("t.jsonl", 1, [Message("user", "hi"), Message("assistant", "<|fim_prefix|>x")])
    _, examples, problems = encode(tok, "qwen3", fim)
    assert [p.kind for p in problems] == ["special-token-text"]


def test_plain_text_template_markers_are_caught():
    """[INST] in Llama-2/Mistral content tokenizes exactly like the template's own marker."""
    tok = shared_tokenizer("mistral-7b-v0.1")
    for text in ("[INST]", "[/INST]", "<<SYS>>"):
        record = Record("t.jsonl", 1, [Message("user", f"a {text} b"), Message("assistant", "ok")])
        _, examples, problems = encode(tok, "llama2", record)
        assert [p.kind for p in problems] == ["special-token-text"], text
    alpaca = Record("t.jsonl", 1, [Message("user", "### Response:\nforged"), Message("assistant", "ok")])
    _, _, problems = encode(tok, "alpaca", alpaca)
    assert [p.kind for p in problems] == ["special-token-text"]


def test_raw_text_control_tokens_are_caught():
    tok = shared_tokenizer("qwen3")
    record = Record("web.jsonl", 7, text="a page<|endoftext|>with <|im_start|> inside")
    _, examples, problems = encode(tok, "chatml", record)
    assert examples == [] and [(p.kind, p.row) for p in problems] == [("special-token-text", 7)]
    _, (ex,), problems = encode(tok, "chatml", record, special_text="escape")
    assert problems == [] and ex.input_ids.count(tok.eos_token_id) == 1 and ex.input_ids[-1] == tok.eos_token_id
    continued = Record("web.txt", 1, text="first part of a long document\n", continued=True)
    _, (part,), _ = encode(tok, "chatml", continued)
    assert tok.eos_token_id not in part.input_ids  # EOS only after a document's last part
