"""show: trained runs bracketed, whitespace visible, pack boundaries marked."""

from __future__ import annotations

from rich.console import Console

from sftdata.build import build
from sftdata.show import iter_runs, show

from conftest import REPO

CHAT = str(REPO / "examples" / "data" / "chat.jsonl")


def capture(directory, **kwargs) -> str:
    console = Console(record=True, width=100, color_system=None)
    show(directory, console=console, color=False, **kwargs)
    return console.export_text()


def test_show_single_row_marks_every_trained_run(tmp_path):
    build([CHAT], output=tmp_path / "o")
    text = capture(tmp_path / "o", row=0)
    assert "row 0 · " in text and "chat.jsonl:1 · " in text and "truncated: no" in text
    body = text.split("\n", 1)[1]  # after the legend line
    assert body.count("⟦") == body.count("⟧") == 2  # two assistant turns in the first conversation
    assert "<|im_start|>user↵\nWho·are·you?<|im_end|>↵" in text


def test_show_marks_pack_boundaries(tmp_path):
    build([CHAT], output=tmp_path / "p", pack=True, max_length=512)
    text = capture(tmp_path / "p", row=0)
    assert "packed examples" in text
    assert "──── example 2 · " in text and "starts (position_ids restart) ────" in text


def test_iter_runs():
    assert list(iter_runs([-100, 5, 6, -100, 7])) == [(1, 3), (4, 5)]
    assert list(iter_runs([-100, -100])) == []
