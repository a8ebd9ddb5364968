"""Ingest: every reader and format, field mapping, and bad input reported with file, row and reason."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sftdata.ingest import detect_format, parse_columns, read_records
from sftdata.record import DataError, Message, ProblemLog

from conftest import shared_path

ALPACA = [{"instruction": "Add", "input": "2 3", "output": "5"}, {"instruction": "Hi", "input": "", "output": "Hello"}]


def read_all(paths, **kwargs):
    problems = kwargs.pop("problems", None) or ProblemLog()
    records = [r for batch in read_records(paths, problems=problems, **kwargs) for r in batch]
    return records, problems


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "json", "json-object", "csv", "csv.gz", "parquet", "hf-dir"])
def test_every_reader_gives_the_same_records(tmp_path, kind):
    if kind == "jsonl":
        path = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    elif kind == "jsonl.gz":
        path = tmp_path / "a.jsonl.gz"
        path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in ALPACA).encode()))
    elif kind == "json":
        path = tmp_path / "a.json"
        path.write_text(json.dumps(ALPACA))
    elif kind == "json-object":
        path = tmp_path / "a.json"
        path.write_text(json.dumps({"data": ALPACA}))
    elif kind.startswith("csv"):
        text = "instruction,input,output\nAdd,2 3,5\nHi,,Hello\n"
        path = tmp_path / f"a.{kind}"
        path.write_bytes(gzip.compress(text.encode()) if kind.endswith(".gz") else text.encode())
    elif kind == "parquet":
        path = tmp_path / "a.parquet"
        pq.write_table(pa.Table.from_pylist(ALPACA), path)
    else:
        import datasets

        path = tmp_path / "ds"
        datasets.Dataset.from_list(ALPACA).save_to_disk(str(path))
    records, problems = read_all([str(path)])
    assert problems.total == 0
    assert [r.messages for r in records] == [
        [Message("user", "Add\n\n2 3", fields={"instruction": "Add", "input": "2 3"}), Message("assistant", "5")],
        [Message("user", "Hi", fields={"instruction": "Hi", "input": ""}), Message("assistant", "Hello")],
    ]


def test_formats_are_detected():
    assert detect_format({"messages": []}) == "messages"
    assert detect_format({"conversations": []}) == "sharegpt"
    assert detect_format({"instruction": "", "response": ""}) == "alpaca"
    assert detect_format({"prompt": "", "completion": ""}) == "prompt-completion"
    assert detect_format({"text": ""}) == "text"
    assert detect_format({"question": "", "answer": ""}) is None
    assert detect_format({"question": "", "answer": ""}, {"instruction": "question", "output": "answer"}) == "alpaca"


def test_messages_sharegpt_prompt_completion_and_text(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}], "id": 7},
    ])
    (record,), _ = read_all([str(path)])
    assert record.messages == [Message("system", "S"), Message("user", "U"), Message("assistant", "A")]
    assert record.extra == {"id": 7} and (record.source, record.row) == (str(path), 1)

    path = write_jsonl(tmp_path / "sg.jsonl", [{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "U"},
                                                                   {"from": "gpt", "value": "A"}]}])
    (record,), _ = read_all([str(path)])
    assert record.messages == [Message("system", "S"), Message("user", "U"), Message("assistant", "A")]

    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "P", "completion": "C"}])
    (record,), _ = read_all([str(path)])
    assert record.messages == [Message("user", "P"), Message("assistant", "C")]

    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "raw  text\n"}])
    (record,), _ = read_all([str(path)])
    assert record.text == "raw  text\n" and record.messages is None

    txt = tmp_path / "doc.txt"
    txt.write_text("a whole document\n\nwith paragraphs")
    (record,), _ = read_all([str(txt)])
    assert record.text == "a whole document\n\nwith paragraphs"


def test_whitespace_is_kept_unless_strip(tmp_path):
    path = write_jsonl(tmp_path / "w.jsonl", [{"instruction": "  Hi \n", "output": " Hello  "}])
    (record,), _ = read_all([str(path)])
    assert record.messages == [Message("user", "  Hi \n", fields={"instruction": "  Hi \n", "input": ""}),
                               Message("assistant", " Hello  ")]
    (record,), _ = read_all([str(path)], strip=True)
    assert record.messages == [Message("user", "Hi", fields={"instruction": "Hi", "input": ""}), Message("assistant", "Hello")]


def test_gsm8k_field_mapping():
    path = shared_path("data", "gsm8k_train.jsonl")
    batch = next(read_records([str(path)], columns="instruction=question,output=answer", batch_size=2))
    assert batch[0].messages[0].content.startswith("Natalia sold clips to 48 of her friends")
    assert batch[0].messages[1].content.endswith("#### 72")
    with pytest.raises(DataError, match="cannot tell the format"):
        next(read_records([str(path)]))


def test_column_mapping_errors():
    assert parse_columns("instruction=question, output=answer") == {"instruction": "question", "output": "answer"}
    with pytest.raises(DataError, match="expected CANONICAL=FIELD"):
        parse_columns("question")
    with pytest.raises(DataError, match="is not one of"):
        parse_columns("question=instruction")


def test_bad_rows_are_reported_with_line_and_reason_and_the_rest_is_read(tmp_path):
    lines = [
        json.dumps({"instruction": "ok 1", "output": "fine"}),
        '{"instruction": "broken", "output": ',                           # 2 malformed JSON
        json.dumps({"instruction": "no output"}),                          # 3 missing field
        json.dumps({"instruction": 5, "output": "x"}),                     # 4 wrong type
        json.dumps({"messages": [{"role": "wizard", "content": "x"}]}),   # 5 unknown role (the row is re-detected)
        "",                                                                # 6 blank line: ignored
        json.dumps({"instruction": "ok 2", "output": "fine"}),
    ]
    path = tmp_path / "bad.jsonl"
    data = ("\n".join(lines) + "\n").encode()
    data += b'{"instruction": "bad \xff utf8", "output": "x"}\n'             # 8 bad UTF-8
    data += json.dumps({"instruction": "ok 3", "output": ""}).encode() + b"\n"  # 9 empty assistant
    path.write_bytes(data)
    records, problems = read_all([str(path)])
    assert [r.row for r in records] == [1, 7]
    found = {(p.row, p.kind) for kind in problems.examples.values() for p in kind}
    assert found == {(2, "malformed-json"), (3, "missing-field"), (4, "wrong-type"), (5, "unknown-role"),
                     (8, "bad-utf8"), (9, "empty-assistant")}
    detail = {p.row: p.detail for kind in problems.examples.values() for p in kind}
    assert detail[3] == "missing field 'output'"
    assert detail[4] == "field 'instruction' must be a string, got int"


def test_conversation_problems(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]},
        {"messages": [{"role": "user", "content": "a"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "c"}]},
        {"messages": "not a list"},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    ]
    records, problems = read_all([str(write_jsonl(tmp_path / "c.jsonl", rows))])
    assert [r.row for r in records] == [7]
    found = sorted((p.row, p.kind) for kind in problems.examples.values() for p in kind)
    assert found == [(1, "unknown-role"), (2, "consecutive-role"), (3, "empty-assistant"), (4, "no-assistant"),
                     (5, "misplaced-system"), (6, "wrong-type")]


def test_on_error_fail_stops_at_the_first_bad_row(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "a"}])
    with pytest.raises(DataError, match=r"x.jsonl:2: \[ingest/missing-field\] missing field 'output'"):
        read_all([str(path)], problems=ProblemLog(on_error="fail"))


def test_bad_files_are_clear_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    records, problems = read_all([str(empty)])
    assert records == [] and dict(problems.counts) == {"empty-file": 1}
    with pytest.raises(DataError, match="no such file"):
        read_all([str(tmp_path / "missing.jsonl")])
    with pytest.raises(DataError, match="unsupported file type"):
        (tmp_path / "a.xml").write_text("<x/>")
        read_all([str(tmp_path / "a.xml")])
    # Damaged data is a problem with its row (the file is read up to the damage), not a stop.
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'[{"instruction": "\xff", "output": "x"}, {"instruction": "a", "output": "b"}]')
    records, problems = read_all([str(bad)])
    assert [r.row for r in records] == [2]
    assert [(p.row, p.kind, p.detail) for p in problems.examples["bad-utf8"]] == [
        (1, "bad-utf8", "invalid UTF-8 in the row at line 1 column 2")]
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "a", "output": "b"}, {"instruction": "a", ')
    records, problems = read_all([str(broken)])
    assert [r.row for r in records] == [1]
    assert [(p.row, p.detail) for p in problems.examples["malformed-json"]] == [
        (2, "malformed JSON: Expecting property name enclosed in double quotes at line 1 column 60; "
            "the rest of the file was not read")]
    corrupt = tmp_path / "c.parquet"
    corrupt.write_bytes(b"PAR1 not really")
    records, problems = read_all([str(corrupt)])
    assert records == [] and [p.row for p in problems.examples["unreadable-file"]] == [0]
    assert problems.examples["unreadable-file"][0].detail.startswith("not a readable Parquet file: ")


def test_several_inputs_keep_their_sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "doc"}])
    records, _ = read_all([str(a), str(b)])
    assert [(r.source, r.row) for r in records] == [(str(a), 1), (str(a), 2), (str(b), 1)]


def test_a_batch_never_spans_two_files(tmp_path):
    """So that reading one file at a time (the Ray engine's read tasks) gives the batches of reading them all."""
    a = write_jsonl(tmp_path / "a.jsonl", ALPACA * 3)
    b = write_jsonl(tmp_path / "b.jsonl", ALPACA * 3)
    batches = [[(r.source, r.row) for r in batch] for batch in read_records([str(a), str(b)], batch_size=4)]
    per_file = [[(r.source, r.row) for r in batch] for path in (a, b)
                for batch in read_records([str(path)], batch_size=4)]
    assert batches == per_file and [len(x) for x in batches] == [4, 2, 4, 2]  # not [4, 4, 4]
    assert [{source for source, _ in x} for x in batches] == [{str(a)}, {str(a)}, {str(b)}, {str(b)}]


# -- tool calls, reasoning, training flags, agent layouts -------------------------------------------------------------

def test_openai_messages_with_tool_calls_reasoning_and_flags(tmp_path):
    row = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "2+3?"},
            {"role": "assistant", "content": None, "reasoning_content": "Use add.",
             "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 3}"}}]},
            {"role": "tool", "content": "5", "tool_call_id": "c1", "name": "add", "timestamp": 3},
            {"role": "assistant", "content": "5.", "weight": 0},
            {"role": "user", "content": "thanks"},
            {"role": "assistant", "content": "Welcome.", "train": True},
        ],
        "tools": json.dumps([{"name": "add", "parameters": {"type": "object"}}]),
        "chat_template_kwargs": {"enable_thinking": True},
        "enable_thinking": False,
        "id": "x1",
    }
    path = write_jsonl(tmp_path / "agent.jsonl", [row])
    stats = []
    records, problems = read_all([str(path)], stats=stats, template_variables={"enable_thinking"})
    assert problems.total == 0
    (record,) = records
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
    assert record.messages == [
        Message("system", "S"), Message("user", "2+3?"),
        Message("assistant", "", tool_calls=[call], reasoning="Use add."),
        Message("tool", "5", tool_call_id="c1", name="add"),
        Message("assistant", "5.", train=False), Message("user", "thanks"), Message("assistant", "Welcome.", train=True)]
    assert record.tools == [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    # chat_template_kwargs is read first; a top-level field named like a template variable is passed too
    assert record.template_kwargs == {"enable_thinking": False}
    assert record.extra == {"id": "x1"}
    assert dict(stats[0].ignored_fields) == {"messages[].timestamp": 1, "id": 1}
    assert record.messages[2].to_dict() == {"role": "assistant", "content": "", "tool_calls": [call],
                                            "reasoning_content": "Use add.", "reasoning": "Use add.", "thinking": "Use add."}


def test_sharegpt_function_call_and_observation_turns(tmp_path):
    """LLaMA-Factory's ShareGPT layout: function_call turns are tool calls (not bare JSON trained as text)."""
    row = {"conversations": [{"from": "human", "value": "Weather in Paris?"},
                             {"from": "function_call", "value": "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}"},
                             {"from": "observation", "value": "{\"temp\": 21}"},
                             {"from": "gpt", "value": "21 degrees."}],
           "tools": "[{\"name\": \"get_weather\", \"description\": \"w\", \"parameters\": {}}]", "system": "Be brief."}
    path = write_jsonl(tmp_path / "lf.jsonl", [row])
    (record,), problems = read_all([str(path)])
    assert problems.total == 0
    assert record.messages == [
        Message("system", "Be brief."), Message("user", "Weather in Paris?"),
        Message("assistant", "", tool_calls=[{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]),
        Message("tool", "{\"temp\": 21}"), Message("assistant", "21 degrees.")]
    assert record.tools[0]["function"]["name"] == "get_weather"


def test_xlam_rows():
    row = {"query": "Add 2 and 3", "answers": "[{\"name\": \"add\", \"arguments\": {\"a\": 2, \"b\": 3}}]",
           "tools": "[{\"name\": \"add\", \"parameters\": {}}]", "id": 4}
    assert detect_format(row) == "xlam"
    from sftdata.ingest import IngestOptions, normalize_row

    out = normalize_row(row, "xlam", IngestOptions())
    assert out.messages == [Message("user", "Add 2 and 3"), Message("assistant", "", tool_calls=[
        {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}])]
    assert out.tools == [{"type": "function", "function": {"name": "add", "parameters": {}}}] and out.extra == {"id": 4}


@pytest.mark.parametrize("row, kind", [
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, "preference-pair"),
    ({"chosen": [{"role": "user", "content": "q"}], "rejected": [{"role": "user", "content": "q"}]}, "preference-pair"),
    ({"prompt": "p", "completion": "c", "label": False}, "kto-label"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "url": "x.png"}]}, {"role": "assistant", "content": "a"}]}, "multimodal"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "images": ["x.png"]}, "multimodal"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning": "x", "thinking": "y"}]}, "bad-reasoning"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}]}, "bad-train-flag"),
    ({"messages": [{"role": "user", "content": "q", "train": True}, {"role": "assistant", "content": "a"}]}, "unsupported-train-flag"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "train": False}]}, "no-trained-turn"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": "{not json"}}]}]}, "bad-tool-call"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "train_detail": [{"begin_offset": 0}]}]}, "unsupported-field"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}, "empty-assistant"),
])
def test_rows_that_cannot_be_honoured_are_precise_problems(tmp_path, row, kind):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "fine"}]}, row])
    records, problems = read_all([str(path)])
    assert len(records) == 1 and dict(problems.counts) == {kind: 1}
    assert problems.examples[kind][0].row == 2


def test_empty_assistant_with_a_tool_call_is_kept(tmp_path):
    row = {"messages": [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}]}
    (record,), problems = read_all([str(write_jsonl(tmp_path / "a.jsonl", [row]))])
    assert problems.total == 0 and record.messages[1].tool_calls[0]["function"] == {"name": "f", "arguments": {}}


def test_system_prompt_is_added_where_missing(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "system", "content": "Own."}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    records, _ = read_all([str(path)], system_prompt="Be helpful.")
    assert [r.messages[0] for r in records] == [Message("system", "Be helpful."), Message("system", "Own.")]


def test_one_column_map_serves_mixed_inputs(tmp_path):
    """Mapping output=answer must not switch off the response fallback in files without an answer field."""
    gsm = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "1+1?", "answer": "2"}])
    teacher = tmp_path / "teacher.json"
    teacher.write_text(json.dumps([{"instruction": "Say hi", "input": "", "response": "hi"}]))
    records, problems = read_all([str(gsm), str(teacher)], columns="instruction=question,output=answer")
    assert problems.total == 0
    assert [[m.content for m in r.messages] for r in records] == [["1+1?", "2"], ["Say hi", "hi"]]
