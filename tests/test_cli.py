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
    assert "rows kept" in result.output and "50" in result.output
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
    assert "1 of 1 rows (100%) were skipped or removed" in result.output and "missing-field (1)" in result.output
    result = CliRunner().invoke(main, ["build", str(src), "--format", "alpaca", "-o", str(tmp_path / "o"),
                                       "--max-skipped-fraction", "1"])
    assert result.exit_code == 1
    assert "no example was kept" in result.output
    assert "missing field 'output'" in result.output


def test_missing_input_and_unknown_template(tmp_path):
    result = CliRunner().invoke(main, ["build", str(tmp_path / "nope.jsonl"), "-q"])
    assert result.exit_code == 1 and "no such file or directory" in result.output
    result = CliRunner().invoke(main, ["build", CHAT, "--template", "nosuch", "-q", "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "unknown template 'nosuch'" in result.output


def test_error_message_is_one_line_however_long_the_path(tmp_path):
    # Regression: rich wrapped "error: ..." at 80 columns, so a long CI checkout path split the message mid-phrase.
    deep = tmp_path / ("a-directory-name-long-enough-to-push-the-message-past-eighty-columns" * 2)
    missing = deep / "nope.jsonl"
    result = CliRunner().invoke(main, ["build", str(missing), "-q"])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0]


def test_help_lists_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("build", "show", "templates"):
        assert command in result.output


def test_python_api_has_the_command_names(tmp_path):
    import sftdata

    result = sftdata.build([CHAT], shuffle=False, output=tmp_path / "o")
    assert result.manifest["counts"]["rows_kept"] == 50
    assert callable(sftdata.show) and callable(sftdata.verify) and callable(sftdata.dedup) and callable(sftdata.decontaminate)


def test_build_with_dedup_and_decontamination(tmp_path):
    rows = [{"instruction": "What is 2+2?", "output": "4"}, {"instruction": "What is 2+2?", "output": "4"},
            {"instruction": "Name a colour.", "output": "Blue"},
            {"instruction": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
                            "in May. How many clips did Natalia sell altogether in April and May?", "output": "72"}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    evals = tmp_path / "eval.jsonl"
    evals.write_text(json.dumps({"question": rows[3]["instruction"], "answer": "72"}) + "\n")
    report = tmp_path / "removed.jsonl"
    result = CliRunner().invoke(main, ["build", str(src), "-o", str(tmp_path / "o"), "--dedup", "--decontaminate",
                                       str(evals), "--report", str(report)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["counts"]["rows_kept"] == 2
    assert manifest["counts"]["removed"] == {"contaminated": 1, "exact-duplicate": 1}
    removed = sorted((r["row"], r["reason"]) for r in map(json.loads, report.read_text().splitlines()))
    assert removed == [(2, "exact-duplicate"), (4, "contaminated")]


def test_show_defaults_to_sftdata_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    missing = runner.invoke(main, ["show"])
    assert missing.exit_code == 1
    assert missing.output.splitlines() == ["error: sftdata-out does not exist: build it first (`sftdata build FILE "
                                           "--output sftdata-out`)"]
    assert runner.invoke(main, ["build", CHAT, "-q", "--no-shuffle"]).exit_code == 0
    shown = runner.invoke(main, ["show", "--no-color", "--where", "chat.jsonl:2"])
    assert shown.exit_code == 0, shown.output
    assert f"── row 1 · {CHAT}:2 · " in shown.output


def test_report_pointing_at_an_input_is_one_line_and_the_input_survives(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    result = CliRunner().invoke(main, ["build", str(src), "-o", str(tmp_path / "o"), "--report", str(src), "-q"])
    assert result.exit_code == 1
    assert result.output.splitlines() == [f"error: --report {src} is the input {src}; it would be overwritten: choose "
                                          "another file"]
    assert src.read_text() == json.dumps({"instruction": "a", "output": "b"}) + "\n"


def test_up_to_date_build_still_writes_the_report_and_says_so(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"instruction": "same", "output": "4"}) + "\n" for _ in range(2)))
    report = tmp_path / "removed.jsonl"
    args = ["build", str(src), "-o", str(tmp_path / "o"), "--dedup", "--report", str(report)]
    assert CliRunner().invoke(main, args).exit_code == 0
    first = report.read_text()
    report.unlink()
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0
    lines = again.output.splitlines()
    assert f"{tmp_path / 'o'} is up to date (same inputs, template, tokenizer, options and sftdata version; every " \
           "file as written); --force rebuilds" in lines
    assert f"wrote {report} (the rows removed in that build, from its removed.jsonl)" in lines
    assert report.read_text() == first and [json.loads(x)["row"] for x in first.splitlines()] == [2]


def test_build_summary_counts_tokens_cut_off(tmp_path):
    result = CliRunner().invoke(main, ["build", CHAT, "-o", str(tmp_path / "o"), "--max-length", "40"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    lost = manifest["tokens"]["lost_to_truncation"]
    assert lost["tokens"] > lost["trained"] > 0
    row = next(line for line in result.output.splitlines() if "│ truncated" in line)
    assert f"{manifest['counts']['truncated']:,} ({lost['tokens']:,} tokens cut off, {lost['trained']:,} of them " \
           "trained)" in row
