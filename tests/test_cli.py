"""The CLI is a thin layer: exit codes, messages naming file/row/reason, and `show` output."""

from __future__ import annotations

import json

from click.testing import CliRunner

from sftdata.cli import main

from conftest import REPO

CHAT = str(REPO / "examples" / "data" / "chat.jsonl")


def test_build_then_show(tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(main, ["build", CHAT, "--template", "chatml", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "tokenizer: qwen3 (bundled default for --template chatml" in result.output
    assert "examples kept" in result.output and "50" in result.output
    shown = runner.invoke(main, ["show", str(out), "--row", "0", "--no-color"])
    assert shown.exit_code == 0, shown.output
    text = shown.output
    assert "row 0 · " in text and "chat.jsonl:1" in text
    # Trained runs are bracketed; the user turn and the assistant header stay outside them.
    assert "<|im_start|>assistant↵\n⟦I·am·Vicuna," in text
    assert "(LMSYS).<|im_end|>⟧↵" in text
    assert "⟦Who" not in text
    table = runner.invoke(main, ["show", str(out), "--ids", "--no-color"])
    assert "151644" in table.output and "-100" in table.output


def test_on_error_fail_names_file_row_and_reason(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "x"}) + "\n")
    result = CliRunner().invoke(main, ["build", str(src), "-o", str(tmp_path / "o"), "--on-error", "fail", "-q"])
    assert result.exit_code == 1
    assert f"{src}:2: [ingest/missing-field] missing field 'output'" in " ".join(result.output.split())


def test_nothing_kept_is_an_error(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"instruction": "x"}) + "\n")
    result = CliRunner().invoke(main, ["build", str(src), "--format", "alpaca", "-o", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "no example was kept" in result.output
    assert "missing field 'output'" in result.output


def test_missing_input_and_unknown_template(tmp_path):
    result = CliRunner().invoke(main, ["build", str(tmp_path / "nope.jsonl"), "-q"])
    assert result.exit_code == 1 and "no such file or directory" in result.output
    result = CliRunner().invoke(main, ["build", CHAT, "--template", "nosuch", "-q", "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "unknown template 'nosuch'" in result.output


def test_help_lists_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("build", "show", "templates"):
        assert command in result.output
