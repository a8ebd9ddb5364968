"""sftdata.verify: the checks, the report, preflight, and the `sftdata verify` command."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from sftdata.record import Message, Record
from sftdata.render import EncodeOptions, Encoder
from sftdata.templates import load_template
from sftdata.verify import SUITE, parse_rendered, preflight, verify
from template_helpers import (TOKENIZERS, deepseek_standin, gemma_standin, llama31_standin, mistral_v3_standin,
                              phi3_standin, require_shared, shared_tokenizer)


def test_official_pairs_pass_everything():
    for name, tok in [("llama3_0", "llama3_1"), ("tokenizer", "llama3_1")]:
        report = verify(shared_tokenizer(tok), name)
        assert report.ok, report.format_text()
        assert report.invariant_ok and report.differs_from_tokenizer is False


FAMILY_PAIRS = [("qwen3", lambda: shared_tokenizer("qwen3")), ("qwq", lambda: shared_tokenizer("qwen3")),
                ("qwen3_5", lambda: shared_tokenizer("qwen3")), ("llama3", lambda: shared_tokenizer("llama3_1")),
                ("llama3", llama31_standin), ("gpt_oss", lambda: shared_tokenizer("gpt-oss")),
                ("mistral_v3", mistral_v3_standin), ("deepseek_r1", deepseek_standin),
                ("deepseek_v3", deepseek_standin)]


@pytest.mark.parametrize("name, tokenizer", FAMILY_PAIRS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(FAMILY_PAIRS)])
def test_every_tool_and_reasoning_template_passes_the_preflight_on_its_family(name, tokenizer):
    """What `build` runs before any row: a built-in template with tools or reasoning must pass every invariant check on
    a tokenizer of its family, including the tool-call and reasoning cases (composed turns, text beside a call)."""
    tok = tokenizer()
    report = preflight(Encoder(load_template(name, tok), tok, EncodeOptions(template_date="2026-12-02")))
    assert report.invariant_ok, report.format_text()
    masks = report.check("exact-masks", "template")
    if name in ("qwq", "deepseek_r1"):  # the prompt opens <think>: the suite is encoded with reasoning added
        assert masks.notes[0].startswith("the generation prompt opens a reasoning block")
    else:
        assert not any(n.startswith("the generation prompt opens a reasoning block") for n in masks.notes)


def test_the_checks_render_with_the_build_s_template_keywords():
    """--template-kwargs enable_thinking=false reaches verify's own renders: the pair passes, and the reasoning cases are
    noted as rows refused (reasoning-off) rather than failing the preflight."""
    tok = shared_tokenizer("qwen3")
    options = EncodeOptions(template_kwargs={"enable_thinking": False})
    report = preflight(Encoder(load_template("qwen3", tok), tok, options))
    assert report.invariant_ok, report.format_text()
    notes = report.check("exact-masks", "template").notes
    assert sum("[reasoning-off]" in n for n in notes) == 3


def test_qwen3_template_on_qwen3_passes_with_split_policy():
    report = verify(shared_tokenizer("qwen3"), "qwen3")
    assert report.ok, report.format_text()
    assert report.history.applied == "split" and report.history.mismatch
    assert report.check("fidelity", "template vs tokenizer.chat_template").status == "pass"


def test_history_policy_fail_is_an_invariant_failure():
    report = verify(shared_tokenizer("qwen3"), "qwen3", history_policy="fail")
    assert not report.invariant_ok
    assert [c.name for c in report.invariant_failures] == ["history"] or "history" in [c.name for c in report.invariant_failures]


def test_chatml_on_qwen3_differs_but_invariants_hold():
    report = verify(shared_tokenizer("qwen3"), "chatml")
    assert report.invariant_ok, report.format_text()
    assert report.differs_from_tokenizer is True and not report.ok
    fidelity = report.check("fidelity", "template vs tokenizer.chat_template")
    assert fidelity.status == "fail" and "<think>" in fidelity.failures[0]
    assert report.manifest_entry()["differs_from_tokenizer_template"] is True


def test_no_chat_template_skips_fidelity():
    report = verify(shared_tokenizer("mistral-7b-v0.1"), "zephyr")
    assert report.check("fidelity", "template vs tokenizer.chat_template").status == "skip"
    assert report.ok, report.format_text()


def test_foreign_markers_are_reported_precisely():
    """Gemma's markers are plain text in the Mistral vocabulary: verify says so and refuses (invariant)."""
    report = verify(shared_tokenizer("mistral-7b-v0.1"), "gemma")
    special = report.check("special-tokens", "tokenizer + template")
    assert special.status == "fail" and not report.invariant_ok
    assert any("'<end_of_turn>' is not a single token" in f and "'end'" in f for f in special.failures)


def test_gemma_on_a_vocabulary_with_its_markers():
    report = verify(gemma_standin(), "gemma")
    assert report.invariant_ok, report.format_text()
    notes = report.check("special-tokens", "tokenizer + template").notes
    assert any("is not eos_token" in n for n in notes)  # failure mode 7: trained explicitly


def test_mistral_template_refuses_system_like_the_official_one():
    report = verify(shared_tokenizer("mistral-7b-v0.1"), "mistral")
    assert report.invariant_ok, report.format_text()
    masks = report.check("exact-masks")
    assert any("system-prompt" in n and "refuses" in n for n in masks.notes)
    # "[/INST]," merges into one token: the turn is trained as tok(prompt) + tok(completion), as a server feeds it
    prefix = report.check("serving-prefix")
    assert any(n.startswith("leading-punctuation") and "tok(prompt) + tok(completion)" in n for n in prefix.notes)


def test_edge_cases_are_refused_with_reasons_not_silently():
    report = verify(shared_tokenizer("qwen3"), "chatml")
    notes = report.check("exact-masks").notes
    assert any(n.startswith("template-markers") and "--special-text reject" in n for n in notes)
    prefix = report.check("serving-prefix").notes
    assert any(n.startswith("leading-newline") and "tok(prompt) + tok(completion)" in n for n in prefix)
    for kind in ("tool-call", "parallel-calls", "reasoning"):
        assert any(n.startswith(f"{kind}: the template does not support") for n in notes), kind


def test_phi3_with_rstrip_added_tokens():
    # Phi-3's <|end|>/<|assistant|>/... have rstrip=True: they swallow the newline after them, which decoding never
    # gives back. Both the encoder and verify's independent check must treat that whitespace as part of the token.
    tok = phi3_standin(rstrip=True)
    report = verify(tok, "phi3")
    assert report.check("exact-masks").status == "pass", report.format_text()
    encoder = Encoder(load_template("phi3", tok), tok)
    record = Record("x.jsonl", 1, [Message("system", "Be brief."), Message("user", "Hi"),
                                   Message("assistant", " Hello there\n")])
    (example,), problems = encoder.encode_batch([record])
    assert problems == []
    assert example.input_ids == [32002, 1739, 6817, 28723, 32003, 32004, 15359, 32003, 32001, 22557, 736, 13, 32003, 32000]
    assert example.labels == [-100] * 9 + [22557, 736, 13, 32003, 32000]


def test_round_trip_when_the_template_strips_a_separator_away():
    # Hypothesis counterexample: Llama-2 strips system block + user content together, so with an empty user message
    # the "\n\n" after <</SYS>> disappears and the learned separators no longer match literally.
    tok = shared_tokenizer("mistral-7b-v0.1")
    template = load_template("llama2", tok)
    messages = [{"role": "system", "content": "0 0"}, {"role": "user", "content": ""}, {"role": "assistant", "content": "0 0"}]
    text = template.render(messages)
    assert text == "<s>[INST] <<SYS>>\n0 0\n<</SYS>> [/INST] 0 0 </s>"
    assert parse_rendered(template, text, ["system", "user", "assistant"]) == messages
    # without the roles the text is truly ambiguous: a user message "<<SYS>>\n0 0\n<</SYS>>" renders the same
    assert template.render(parse_rendered(template, text)) == text
    # the loose parse is only accepted when it renders back to the same text
    assert parse_rendered(template, text.replace("<</SYS>> [/INST]", "<</SYS>>  [/INST]"), ["system", "user", "assistant"]) is None


def test_preflight_takes_the_build_encoder():
    tok = shared_tokenizer("qwen3")
    encoder = Encoder(load_template("chatml", tok), tok, EncodeOptions(special_text="escape"))
    report = preflight(encoder)
    assert report.invariant_ok and report.differs_from_tokenizer
    assert "template-markers" not in " ".join(report.check("exact-masks").notes)  # escape: encoded, not refused
    assert json.dumps(report.manifest_entry())


def test_report_json_shape():
    data = verify(shared_tokenizer("llama3_1"), "llama3_0").to_dict()
    assert data["ok"] is True and data["template"]["name"] == "llama3_0"
    assert {c["check"] for c in data["checks"]} == {"fidelity", "serving-prefix", "history", "exact-masks",
                                                     "round-trip", "special-tokens"}
    assert len(SUITE) >= 10


def test_cli_exit_status_and_json():
    from sftdata.cli import main

    require_shared("llama3_1")
    runner = CliRunner()
    ok = runner.invoke(main, ["verify", "--tokenizer", str(TOKENIZERS / "llama3_1"), "--template", "llama3_0", "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["ok"] is True
    bad = runner.invoke(main, ["verify", "--tokenizer", str(TOKENIZERS / "qwen3"), "--template", "chatml"])
    assert bad.exit_code == 1
    assert "fidelity" in bad.output and "FAIL" in bad.output
    missing = runner.invoke(main, ["verify", "--tokenizer", str(TOKENIZERS / "mistral-7b-v0.1")])
    assert missing.exit_code == 2 and "no chat_template" in missing.output
