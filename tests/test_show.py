"""show: trained runs bracketed, whitespace visible (in the stream and the --ids table), pack boundaries with each
example's source row (the first one too), cut markers on truncated rows, rows picked by file:row and by filters."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from rich.console import Console

from sftdata.build import build
from sftdata.record import DataError
from sftdata.show import find_rows, iter_runs, show

from conftest import REPO

CHAT = str(REPO / "examples" / "data" / "chat.jsonl")


def capture(directory, width=100, **kwargs) -> str:
    console = Console(record=True, width=width, color_system=None)
    show(directory, console=console, color=False, **kwargs)
    return console.export_text()


def test_show_single_row_marks_every_trained_run(tmp_path):
    build([CHAT], shuffle=False, output=tmp_path / "o")
    text = capture(tmp_path / "o", row=0)
    assert "row 0 · " in text and "chat.jsonl:1 · " in text and "truncated: no" in text
    body = text.split("\n", 1)[1]  # after the legend line
    assert body.count("⟦") == body.count("⟧") == 2  # two assistant turns in the first conversation
    assert "<|im_start|>user↵\nWho·are·you?<|im_end|>↵" in text


def test_show_never_breaks_lines_at_the_console_width(tmp_path):
    # Regression: the row header (with the source path) and long token lines were wrapped at the console width,
    # so the same row printed differently in a deeper checkout.
    build([CHAT], shuffle=False, output=tmp_path / "o")
    lines = capture(tmp_path / "o", width=30, row=0).splitlines()
    assert lines[1] == f"── row 0 · {CHAT}:1 · 53 tokens · 26 trained · truncated: no ──"
    assert lines[5] == ("⟦I·am·Vicuna,·a·language·model·trained·by·researchers·from·Large·Model·Systems·Organization·"
                        "(LMSYS).<|im_end|>⟧↵")


def test_show_separator_marks_every_token_boundary(tmp_path):
    build([CHAT], shuffle=False, output=tmp_path / "o")
    lines = capture(tmp_path / "o", row=0, separator="|").splitlines()
    assert lines[2:6] == [
        "<|im_start|>|user|↵",
        "|Who|·are|·you|?|<|im_end|>|↵",
        "|<|im_start|>|assistant|↵",
        "|⟦I|·am|·Vic|una|,|·a|·language|·model|·trained|·by|·researchers|·from|·Large|·Model|·Systems|·Organization|·(|L|MS"
        "|YS|).|<|im_end|>⟧|↵",
    ]


def test_show_marks_pack_boundaries(tmp_path):
    build([CHAT], shuffle=False, output=tmp_path / "p", pack=True, max_length=512)
    text = capture(tmp_path / "p", row=0)
    assert "packed examples" in text
    assert "──── example 2 · " in text and "starts (position_ids restart) ────" in text


def test_iter_runs():
    assert list(iter_runs([-100, 5, 6, -100, 7])) == [(1, 3), (4, 5)]
    assert list(iter_runs([-100, -100])) == []


def test_the_first_packed_example_names_its_source_row(tmp_path):
    build([CHAT], shuffle=False, output=tmp_path / "p", pack=True, max_length=512)
    lines = capture(tmp_path / "p", row=0).splitlines()
    first = pq.read_table(tmp_path / "p" / "train" / "train-00000.parquet", columns=["row"]).to_pylist()[0]["row"][0]
    assert lines[2] == f"──── example 1 · {CHAT}:{first} starts ────"
    assert lines[3] == "<|im_start|>user↵"


def test_a_truncated_row_shows_where_it_was_cut(tmp_path):
    build([CHAT], shuffle=False, output=tmp_path / "o", max_length=40)
    lines = capture(tmp_path / "o", row=0).splitlines()
    assert lines[1] == f"── row 0 · {CHAT}:1 · 40 tokens · 22 trained · truncated: yes ──"
    assert lines[-2:] == ["<|im_start|>user↵", "Have·a ✂ cut here by --max-length 40"]
    table = capture(tmp_path / "o", row=0, ids=True).splitlines()
    assert table[-3].split("│")[3].strip() == "·a" and table[-2].split("│")[3].strip() == "✂ cut here by --max-length 40"


def test_a_truncated_example_in_a_packed_row_is_cut_where_it_ends(tmp_path):
    build([CHAT], shuffle=False, output=tmp_path / "p", pack=True, max_length=40)
    index = [i for i, r in enumerate(pq.read_table(tmp_path / "p" / "train" / "train-00000.parquet").to_pylist())
             if r["truncated"] == [True]][0]
    text = capture(tmp_path / "p", row=index)
    assert text.rstrip().endswith(" ✂ cut here by --max-length 40") and text.count("✂") == 2  # legend + marker


def test_ids_table_shows_whitespace_tokens(tmp_path):
    build([CHAT], shuffle=False, output=tmp_path / "o")
    rows = [line.split("│")[1:5] for line in capture(tmp_path / "o", row=0, ids=True).splitlines() if "│" in line]
    cells = [[c.strip() for c in r] for r in rows[:9]]
    assert cells == [["0", "151644", "<|im_start|>", "-100"], ["1", "872", "user", "-100"], ["2", "198", "↵", "-100"],
                     ["3", "15191", "Who", "-100"], ["4", "525", "·are", "-100"], ["5", "498", "·you", "-100"],
                     ["6", "30", "?", "-100"], ["7", "151645", "<|im_end|>", "-100"], ["8", "198", "↵", "-100"]]


def test_pick_rows_by_file_and_row_and_by_filters(tmp_path):
    alpaca = str(REPO / "examples" / "data" / "alpaca.jsonl")
    build([alpaca, CHAT], shuffle=False, output=tmp_path / "o", max_length=64)
    table = pq.read_table(tmp_path / "o" / "train" / "train-00000.parquet", columns=["source", "row", "truncated"]).to_pylist()
    truncated = [i for i, r in enumerate(table) if r["truncated"]]
    from_chat = [i for i, r in enumerate(table) if r["source"] == CHAT]
    assert len(truncated) == 145 and len(from_chat) == 50
    assert find_rows(tmp_path / "o", truncated=True) == truncated
    assert find_rows(tmp_path / "o", source="chat.jsonl") == from_chat  # by file name
    assert find_rows(tmp_path / "o", source=alpaca) == [i for i, r in enumerate(table) if r["source"] == alpaca]
    assert find_rows(tmp_path / "o", source="chat.jsonl", truncated=True) == [i for i in truncated if i in from_chat]
    assert find_rows(tmp_path / "o", source="chat.jsonl", row=17) == [from_chat[16]]
    # show: --where picks the row; with a filter, `row` skips matches.
    assert [r["_index"] for r in show(tmp_path / "o", where="chat.jsonl:17", console=Console(quiet=True))] == [from_chat[16]]
    text = capture(tmp_path / "o", truncated=True, row=1, count=2)
    assert [line.split(" · ")[0] for line in text.splitlines() if line.startswith("── row ")] == [
        f"── row {truncated[1]}", f"── row {truncated[2]}"]
    with pytest.raises(DataError, match=r"no row of split 'train' matches --where chat.jsonl:999: the output holds no "
                                        r"trace of it \(is the file and row right\? rows are 1-based\)$"):
        show(tmp_path / "o", where="chat.jsonl:999", console=Console(quiet=True))
    with pytest.raises(DataError, match="expected FILE:ROW"):
        show(tmp_path / "o", where="chat.jsonl", console=Console(quiet=True))


def test_where_finds_the_packed_row_holding_an_example(tmp_path):
    build([CHAT], shuffle=False, output=tmp_path / "p", pack=True, max_length=256)
    rows = pq.read_table(tmp_path / "p" / "train" / "train-00000.parquet", columns=["row"]).to_pylist()
    holder = next(i for i, r in enumerate(rows) if 5 in r["row"])
    text = capture(tmp_path / "p", where=f"{CHAT}:5")
    assert f"── row {holder} · " in text and f"· {CHAT}:5 starts" in text


AGENT_ROW = {"messages": [{"role": "user", "content": "2+3?"},
                          {"role": "assistant", "content": "", "reasoning_content": "Use add.",
                           "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
                          {"role": "tool", "content": "5"},
                          {"role": "assistant", "content": "5.", "reasoning_content": "Got 5."}],
             "tools": [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]}


def test_show_marks_reasoning_tool_calls_and_tool_results(tmp_path):
    import json

    src = tmp_path / "agent.jsonl"
    src.write_text(json.dumps(AGENT_ROW) + "\n")
    build([str(src)], template="qwen3", output=tmp_path / "o")
    text = capture(tmp_path / "o", row=0)
    tail = text[text.index("<|im_start|>user↵\n2+3?"):].rstrip("\n")
    assert tail.splitlines() == [
        "<|im_start|>user↵", "2+3?<|im_end|>↵", "<|im_start|>assistant↵", "⟦<think>↵", "‹reasoning›Use·add.↵", "</think>↵",
        "↵", "‹tool call›<tool_call>↵", '{"name":·"add",·"arguments":·{"a":·2,·"b":·3}}↵', "</tool_call><|im_end|>⟧↵",
        "<|im_start|>user↵", "<tool_response>↵", "‹tool result›5↵", "</tool_response><|im_end|>↵", "<|im_start|>assistant↵",
        "⟦<think>↵", "‹reasoning›Got·5.↵", "</think>↵", "↵", "5.<|im_end|>⟧↵"]
    table = Console(record=True, width=200, color_system=None)
    show(tmp_path / "o", console=table, color=False, ids=True)
    kinds = [line.split("│")[-2].strip() for line in table.export_text().splitlines()
             if line.startswith("│") and line.split("│")[1].strip().isdigit()]
    assert kinds.count("tool_result") == 1 and kinds.count("reasoning") == 7 and "tool_call" in kinds


def test_where_says_where_a_missing_row_went(tmp_path):
    """--where on a row that is not in the split names the split that holds it, or the stage and reason that removed
    or skipped it, from the output's own files."""
    build([CHAT], output=tmp_path / "o", filters={"drop_refusals": True}, splits={"train": 0.5, "test": 0.5})
    test_rows = pq.read_table(tmp_path / "o" / "test", columns=["row"]).column("row").to_pylist()
    with pytest.raises(DataError, match=rf"--where chat.jsonl:{test_rows[0]}: it is in split 'test' \(--split test\)$"):
        show(tmp_path / "o", where=f"chat.jsonl:{test_rows[0]}", console=Console(quiet=True))
    with pytest.raises(DataError, match=r"--where chat.jsonl:3: it was removed \(filter: refusal: message 3 contains the "
                                        r"refusal phrase 'as a language model'\), see removed.jsonl$"):
        show(tmp_path / "o", where="chat.jsonl:3", console=Console(quiet=True))
