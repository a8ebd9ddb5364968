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
from template_helpers import OFFICIAL, deepseek_standin, llama31_standin, mistral_v3_standin, shared_tokenizer

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
                                     Message("tool", "5"), Message("assistant", "5.")]), "tool-calls-not-rendered"),
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


# -- other families: Llama-3.1, gpt-oss, Mistral v0.3, DeepSeek, QwQ, Qwen3.5 ------------------------------------------

WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Weather.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def weather_call(call_id="call12345"):
    return [call("get_weather", call_id, city="Paris")]


def weather_trip(call_id="call12345", **reasoning):
    first, last = reasoning.get("first"), reasoning.get("last")
    return [Message("user", "Weather in Paris?"), Message("assistant", "", reasoning=first, tool_calls=weather_call(call_id)),
            Message("tool", "22C", tool_call_id=call_id, name="get_weather"), Message("assistant", "It is 22C.", reasoning=last)]


def test_llama3_1_tool_call_and_eom_under_builtin_tools():
    """Llama-3.1 ends a tool-call turn with <|eom_id|> when builtin_tools is set: each turn trains its own marker."""
    record = Record("t.jsonl", 1, weather_trip(), tools=WEATHER)
    call_ids = [5018, 609, 794, 330, 456, 70464, 498, 330, 14105, 794, 5324, 9103, 794, 330, 60704, 32075]  # {"name": ...}}
    tok = shared_tokenizer("llama3_1")
    encoder, (ex,), problems = encode(tok, "llama3", record)
    assert problems == [] and layout(ex.labels) == [("M", 172), call_ids + [128009], ("M", 14),
                                                    [2181, 374, 220, 1313, 34, 13, 128009]]  # "It is 22C." <|eot_id|>
    check_served(tok, encoder.template, record, [ex])
    tok = llama31_standin()
    encoder, (ex,), problems = encode(tok, "llama3", record, template_kwargs={"builtin_tools": ["brave_search"]})
    assert problems == [] and layout(ex.labels) == [("M", 177), call_ids + [128008], ("M", 14),
                                                    [2181, 374, 220, 1313, 34, 13, 128009]]
    assert tok.convert_ids_to_tokens([128008]) == ["<|eom_id|>"]


def test_gpt_oss_reasoning_tool_call_and_final_answer():
    """Harmony: the tool-call turn ends <|call|>, the final answer <|return|>; a turn's analysis is trained with it. Once
    the final answer exists the template drops the tool call's analysis from history, but the server sent it when it
    asked for the answer: the answer's example is composed after the served prompt (P_k + target)."""
    tok = shared_tokenizer("gpt-oss")
    record = Record("t.jsonl", 1, weather_trip(first="Need the weather.", last="Got it."), tools=WEATHER)
    encoder, examples, problems = encode(tok, "gpt_oss", record, template_date="2026-12-02")
    assert problems == [] and [(ex.messages, ex.turns) for ex in examples] == [(2, [1]), (4, [3])]
    # <|channel|> analysis <|message|> Need the weather . <|end|> <|start|> assistant  to = functions.get_weather ...
    assert layout(examples[0].labels) == [("M", 119), [200005, 35644, 200008, 23483, 290, 11122, 13, 200007, 200006,
                                                       173781, 316, 28, 44580, 775, 170154, 200005, 12606, 815, 5701,
                                                       200008, 10848, 17500, 1243, 392, 72782, 18583, 200012]]
    assert layout(examples[1].labels) == [("M", 164), [200005, 35644, 200008, 52301, 480, 13, 200007, 200006, 173781,
                                                       200005, 17196, 200008, 3206, 382, 220, 1709, 34, 13, 200002]]
    served_prompt = encoder.template.render(record.messages_as_dicts()[:3], add_generation_prompt=True, tools=WEATHER,
                                            strftime_now=lambda fmt: "2026-12-02")
    assert "Need the weather." in served_prompt  # the served prompt of the answer keeps the call's analysis
    assert examples[1].input_ids[:164] == tok.backend_tokenizer.encode(served_prompt, add_special_tokens=False).ids
    assert examples[1].counts["turns_composed"] == 1
    assert [tok.convert_ids_to_tokens(ex.input_ids[-1]) for ex in examples] == ["<|call|>", "<|return|>"]


def test_mistral_v3_tool_calls_and_the_system_prompt_it_moves():
    """Mistral v0.3 writes the system prompt on the last user turn only when the conversation ends there, so a
    conversation ending with a reply renders none: each turn is trained after the prompt a server sends (which holds it
    when the turn answers the user, and not when it answers a tool result)."""
    tok = mistral_v3_standin()
    record = Record("t.jsonl", 1, [Message("system", "Be brief."), *weather_trip("abc123XYZ")], tools=WEATHER)
    encoder, examples, problems = encode(tok, "mistral_v3", record)
    assert problems == [] and [ex.turns for ex in examples] == [[2], [4]]
    assert [tok.decode(ex.input_ids[s:e]) for ex in examples for s, e in ex.spans] == [
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abc123XYZ"}]</s>', "It is 22C.</s>"]
    for ex, has_system in zip(examples, (True, False)):
        k = ex.turns[0]
        prompt = encoder.template.render(record.messages_as_dicts()[:k], add_generation_prompt=True, tools=WEATHER)
        assert ("Be brief." in prompt) is has_system
        assert ex.input_ids[:ex.spans[0][0]] == tok.backend_tokenizer.encode(prompt, add_special_tokens=False).ids


def test_reasoning_templates_whose_prompt_opens_think():
    """QwQ and DeepSeek-R1 open <think> in the generation prompt and never render reasoning: the target is the
    reasoning, </think> and the answer as the model writes them after that prompt; inline <think> content is used as
    written, a reasoning field is closed the family's way."""
    conversation = [Message("user", "Hi"), Message("assistant", "Hello!", reasoning="I should greet."),
                    Message("user", "Bye"), Message("assistant", "<think>\nSay bye.\n</think>\n\nBye!")]
    record = Record("t.jsonl", 1, conversation)
    for tok, template, eos in ((shared_tokenizer("qwen3"), "qwq", "<|im_end|>"),
                               (deepseek_standin(), "deepseek_r1", "<｜end▁of▁sentence｜>")):
        encoder, examples, problems = encode(tok, template, record)
        assert problems == [] and [ex.turns for ex in examples] == [[1], [3]], template
        assert [tok.decode(ex.input_ids[s:e]) for ex in examples for s, e in ex.spans] == [
            f"I should greet.\n</think>\n\nHello!{eos}", f"Say bye.\n</think>\n\nBye!{eos}"]
        for ex in examples:
            prompt = encoder.template.render(record.messages_as_dicts()[:ex.turns[0]], add_generation_prompt=True)
            assert prompt.endswith("<think>\n") and ex.input_ids[:ex.spans[0][0]] == tok.backend_tokenizer.encode(
                prompt, add_special_tokens=False).ids
    _, _, problems = encode(shared_tokenizer("qwen3"), "qwq", Record("t.jsonl", 1, [Message("user", "Hi"),
                                                                                   Message("assistant", "Hello!")]))
    assert [p.kind for p in problems] == ["missing-reasoning"]


def test_deepseek_v3_1_thinking_and_string_arguments():
    tok = deepseek_standin()
    record = Record("t.jsonl", 1, [Message("user", "Hi"), Message("assistant", "Hello!", reasoning="I should greet.")])
    _, (ex,), problems = encode(tok, str(OFFICIAL / "deepseek_v3_1.jinja"), record, template_kwargs={"thinking": True})
    assert problems == [] and tok.decode(ex.input_ids[ex.spans[0][0]:]) == "I should greet.</think>Hello!<｜end▁of▁sentence｜>"
    encoder, (ex,), problems = encode(tok, "deepseek_v3", Record("t.jsonl", 2, weather_trip()[:2]))
    assert problems == [] and encoder.tool_call_form == (True, False)  # DeepSeek concatenates arguments as a string
    assert tok.decode(ex.input_ids[ex.spans[0][0]:]) == (
        '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{"city": "Paris"}\n```'
        '<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>')


def test_qwen3_5_empty_think_merges_and_is_tokenized_as_served():
    """Qwen3.5's prompt ends "<think>\n" and the reply without reasoning starts "\n</think>": in one piece the two
    newlines merge into one token, which the model never emits; the turn is tok(prompt) + tok(reply)."""
    tok = shared_tokenizer("qwen3")
    record = Record("t.jsonl", 1, [Message("user", "Hi"), Message("assistant", "Hello!")])
    _, (ex,), problems = encode(tok, "qwen3_5", record)
    assert problems == [] and ex.tokenized_apart
    # <|im_start|> user \n Hi <|im_end|> \n <|im_start|> assistant \n <think> \n | \n </think> \n\n Hello ! <|im_end|>
    assert ex.input_ids == [151644, 872, 198, 13048, 151645, 198, 151644, 77091, 198, 151667, 198, 198, 151668, 271, 9707,
                            0, 151645]
    assert layout(ex.labels) == [("M", 11), [198, 151668, 271, 9707, 0, 151645]]
    _, _, problems = encode(tok, "qwen3_5", record, tokenization="context")
    assert [p.kind for p in problems] == ["serving-prefix-tokens"]


# -- templates without limits -----------------------------------------------------------------------------------------

def test_a_template_past_its_budget_fails_fast_with_a_reason():
    """Nested range() loops (minutes) and string doubling (gigabytes) stop at the render budget: a template that cannot
    render a probe conversation within it is refused when the encoder is made, before any row is read."""
    import time

    from sftdata.record import DataError
    from sftdata.templates import ChatTemplate, RenderBudget

    tok = shared_tokenizer("qwen3")
    slow = ChatTemplate("slow", "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
                                "{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}", {}, budget=RenderBudget(seconds=0.5))
    started = time.monotonic()
    with pytest.raises(DataError, match="cannot be used: rendering took more than 0.5 s"):
        Encoder(slow, tok)
    assert time.monotonic() - started < 10
    doubling = ChatTemplate("doubling", "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}"
                                        "{% endfor %}{{ ns.s }}", {}, budget=RenderBudget(chars=1 << 20))
    with pytest.raises(DataError, match="built a value of 2,097,152 items"):
        Encoder(doubling, tok)
    # a row that alone goes past the budget is a problem with the reason; the other rows encode
    per_row = ChatTemplate("per-row", "{% for m in messages %}{% if m.content == 'loop' %}{% for i in range(100000) %}"
                                      "{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}"
                                      "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                                      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", {},
                           budget=RenderBudget(seconds=0.5))
    examples, problems = Encoder(per_row, tok).encode_batch([
        Record("t.jsonl", 1, [Message("user", "loop"), Message("assistant", "ok")]),
        Record("t.jsonl", 2, [Message("user", "fine"), Message("assistant", "ok")])])
    assert [(p.row, p.kind) for p in problems] == [(1, "template-budget")] and [ex.row for ex in examples] == [2]


def test_long_conversations_plan_only_the_turns_inside_max_length():
    """A serving prompt per turn costs a render of the whole history (n² for n turns). With right-truncation, turns the
    cut would remove entirely are not planned: the truncated examples are identical, and the skipped turns are counted."""
    from sftdata.render import truncate

    tok = shared_tokenizer("qwen3")
    messages = []
    for i in range(300):
        messages += [Message("user", f"question {i} " * 3), Message("assistant", f"answer {i}")]
    record = Record("t.jsonl", 1, messages)
    _, bounded, problems = encode(tok, "qwen3", record, max_length=2000)
    _, full, _ = encode(tok, "qwen3", record)
    assert problems == [] and (len(bounded), len(full)) == (75, 300)
    cut = lambda examples: [(x.input_ids, x.labels) for x in (truncate(e, 2000) for e in examples) if x]  # noqa: E731
    assert cut(bounded) == cut(full)
    assert sum(ex.counts["turns_beyond_max_length"] for ex in bounded) == 225


def oslo_weather(text):
    """A one-call agent conversation whose calling message has ``text`` beside the call."""
    return Record("t", 1, [Message("user", "Weather in Oslo?"),
                           Message("assistant", text, tool_calls=[call("get_weather", "c1", city="Oslo")]),
                           Message("tool", '{"temperature": 5}', tool_call_id="c1"),
                           Message("assistant", "It is 5 degrees in Oslo.")], tools=WEATHER)


def test_llama31_text_beside_a_tool_call_is_refused_not_dropped():
    """Llama-3.1's official template writes only the call of an assistant message that also has text: training the
    row would drop "Let me check." without a word, so the row is refused with the reason."""
    tok = shared_tokenizer("llama3_1")
    record = oslo_weather("Let me check.")
    _, examples, problems = encode(tok, "llama3", record)
    assert examples == [] and [p.kind for p in problems] == ["content-not-rendered"]
    assert "assistant message 1" in problems[0].detail
    _, examples, problems = encode(tok, "llama3", oslo_weather(""))
    assert problems == [] and [ex.turns for ex in examples] == [[1, 3]]


def test_qwq_turn_after_an_empty_user_message():
    """The prompt opens <think> and there is no user text to anchor on: the example is still tok(P_k) + the reasoning,
    </think> and the answer, as the model writes them."""
    tok = shared_tokenizer("qwen3")
    template = load_template("qwq", tok)
    record = Record("t", 1, [Message("user", ""), Message("assistant", "You sent nothing.", reasoning="Empty input.")])
    _, examples, problems = encode(tok, template, record)
    assert problems == []
    [ex] = examples
    prompt = template.render([{"role": "user", "content": ""}], add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    prompt_ids = tok.backend_tokenizer.encode(prompt, add_special_tokens=False).ids
    target_ids = tok.backend_tokenizer.encode("Empty input.\n</think>\n\nYou sent nothing.<|im_end|>",
                                              add_special_tokens=False).ids
    assert ex.input_ids == prompt_ids + target_ids
    assert ex.labels == [IGNORE_INDEX] * len(prompt_ids) + target_ids


def test_reasoning_with_thinking_off_is_refused():
    """enable_thinking=false: Qwen3's serving prompt closes an empty think block, so the model is never asked for
    reasoning; a turn that carries some (as a field or inline) is refused, not trained against that prompt."""
    tok = shared_tokenizer("qwen3")
    rows = [Record("t", 1, [Message("user", "2+2?"), Message("assistant", "4", reasoning="Add them.")]),
            Record("t", 2, [Message("user", "2+2?"), Message("assistant", "<think>\nAdd them.\n</think>\n\n4")]),
            Record("t", 3, [Message("user", "2+2?"), Message("assistant", "4")])]
    encoder = Encoder(load_template("qwen3", tok), tok, EncodeOptions(template_kwargs={"enable_thinking": False}))
    examples, problems = encoder.encode_batch(rows)
    assert [(p.row, p.kind) for p in problems] == [(1, "reasoning-off"), (2, "reasoning-off")]
    [ex] = examples
    prompt_ids = tok.backend_tokenizer.encode(
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", add_special_tokens=False).ids
    target = tok.backend_tokenizer.encode("4<|im_end|>", add_special_tokens=False).ids
    assert ex.row == 3 and ex.input_ids[:len(prompt_ids)] == prompt_ids
    assert ex.labels == [IGNORE_INDEX] * len(prompt_ids) + target + [IGNORE_INDEX] * (len(ex.input_ids) - len(prompt_ids) - len(target))


def test_a_template_without_tools_that_refuses_tool_roles_says_so():
    """Mistral v0.1's template raises on any role but user/assistant: for a tool conversation the problem says the
    template has no tool calls and names templates that do, instead of a bare alternation error."""
    tok = shared_tokenizer("mistral-7b-v0.1")
    record = oslo_weather("")
    _, examples, problems = encode(tok, "mistral", record)
    assert examples == [] and [p.kind for p in problems] == ["tool-calls-not-rendered"]
    assert problems[0].detail.startswith("template 'mistral' has no tool calls or tool results and refuses this "
                                         "conversation (Conversation roles must alternate")
    assert "mistral_v3" in problems[0].detail
