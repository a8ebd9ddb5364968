"""show: trained runs bracketed, whitespace visible, pack boundaries marked."""

from __future__ import annotations

from rich.console import Console

from sftdata.build import build
from sftdata.show import iter_runs, show

from conftest import REPO

CHAT = str(REPO / "examples" / "data" / "chat.jsonl")


def capture(directory, width=100, **kwargs) -> str:
    console = Console(record=True, width=width, color_system=None)
    show(directory, console=console, color=False, **kwargs)
    return console.export_text()


def test_show_single_row_marks_every_trained_run(tmp_path):
    build([CHAT], output=tmp_path / "o")
    text = capture(tmp_path / "o", row=0)
    assert "row 0 · " in text and "chat.jsonl:1 · " in text and "truncated: no" in text
    body = text.split("\n", 1)[1]  # after the legend line
    assert body.count("⟦") == body.count("⟧") == 2  # two assistant turns in the first conversation
    assert "<|im_start|>user↵\nWho·are·you?<|im_end|>↵" in text


def test_show_never_breaks_lines_at_the_console_width(tmp_path):
    # Regression: the row header (with the source path) and long token lines were wrapped at the console width,
    # so the same row printed differently in a deeper checkout.
    build([CHAT], output=tmp_path / "o")
    lines = capture(tmp_path / "o", width=30, row=0).splitlines()
    assert lines[1] == f"── row 0 · {CHAT}:1 · 53 tokens · 26 trained · truncated: no ──"
    assert lines[5] == ("⟦I·am·Vicuna,·a·language·model·trained·by·researchers·from·Large·Model·Systems·Organization·"
                        "(LMSYS).<|im_end|>⟧↵")


def test_show_separator_marks_every_token_boundary(tmp_path):
    build([CHAT], output=tmp_path / "o")
    lines = capture(tmp_path / "o", row=0, separator="|").splitlines()
    assert lines[2:6] == [
        "<|im_start|>|user|↵",
        "|Who|·are|·you|?|<|im_end|>|↵",
        "|<|im_start|>|assistant|↵",
        "|⟦I|·am|·Vic|una|,|·a|·language|·model|·trained|·by|·researchers|·from|·Large|·Model|·Systems|·Organization|·(|L|MS"
        "|YS|).|<|im_end|>⟧|↵",
    ]


def test_show_marks_pack_boundaries(tmp_path):
    build([CHAT], output=tmp_path / "p", pack=True, max_length=512)
    text = capture(tmp_path / "p", row=0)
    assert "packed examples" in text
    assert "──── example 2 · " in text and "starts (position_ids restart) ────" in text


def test_iter_runs():
    assert list(iter_runs([-100, 5, 6, -100, 7])) == [(1, 3), (4, 5)]
    assert list(iter_runs([-100, -100])) == []
