"""`sftdata export`: the merged HF directory reproduces the adapter; GGUF files carry the template and end-of-turn ids
and run in llama.cpp (llama-cpp-python) like transformers; quantized sizes and logit errors stay within the bounds
docs/export.md states; the Ollama Modelfile stops at every end marker. CPU, tiny Llama models from a config."""

from __future__ import annotations

import json
import os
import shutil
from datetime import date
from functools import lru_cache
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
if os.environ.get("CI"):  # CI installs the test extra, which has both: a missing one is a failure, not a skip
    import gguf
    import llama_cpp
else:
    gguf = pytest.importorskip("gguf")
    llama_cpp = pytest.importorskip("llama_cpp")

import train_fixtures as tf  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from sftdata.cli import main  # noqa: E402
from sftdata.export import (  # noqa: E402
    export,
    generation_eos_ids,
    gguf_tensor_types,
    quantize_gguf,
    read_source,
    validate_gguf,
    vllm_adapter_check,
    write_gguf,
)
from sftdata.gotemplate import GoTemplate, GoTemplateError  # noqa: E402
from sftdata.ollama import (  # noqa: E402
    OllamaChoice,
    choose_template,
    compare,
    library,
    modelfile,
    ollama_message,
    probes,
    render,
)
from sftdata.render import _tool_call_message, tool_call_form  # noqa: E402
from sftdata.templates import ChatTemplate, builtin_template_names, load_template, special_token_variables  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OLLAMA_FIXTURES = REPO / "fixtures" / "ollama"

# Bounds documented in docs/export.md (relative logit RMSE = RMS(llama.cpp − transformers) / RMS(transformers logits)
# over the prompt positions; measured on this test model: f16 0.0005, q8_0 0.011, q4_0 0.12, q4_k_m 0.09).
BOUNDS = {"f16": 0.002, "q8_0": 0.03, "q4_0": 0.25, "q4_k_m": 0.25}


def tiny_llama(path: Path, tok_dir: Path, *, hidden: int = 256, tie: bool = False) -> Path:
    """A 2-layer Llama with rows of 256 (the q4_K block size)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=2 * hidden, vocab_size=len(tok), max_position_embeddings=512,
                      initializer_range=0.02, tie_word_embeddings=tie, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tok_dir / name, path / name)
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def adapter(work):
    """build (examples/data, the built-in mistral template) → QLoRA for 2 steps."""
    from sftdata.build import build
    from sftdata.train import train

    tok_dir = tf.shared_path("tokenizers", "mistral-7b-v0.1")
    build([str(REPO / "examples" / "data" / "chat.jsonl")], template="mistral", tokenizer=str(tok_dir),
          output=work / "data", max_length=128)
    base = tiny_llama(work / "base", tok_dir)
    train(work / "data", base, work / "adapter", max_steps=2, batch_size=4, grad_accum=1, lora_dropout=0.0,
          progress=False, warmup=0, learning_rate=1e-2, lora_r=8, lora_alpha=16)
    return work / "adapter"


@pytest.fixture(scope="module")
def hf(work, adapter):
    return export(adapter, work / "hf", format="hf")


@pytest.fixture(scope="module")
def f16(work, hf, adapter):
    src = read_source(adapter)
    path = work / "m-f16.gguf"
    write_gguf(Path(hf["output"]), path, "f16", template=src.template, eos_ids=hf["eos_token_ids"], name="m")
    return path


def test_hf_export_reproduces_the_adapter(work, hf, adapter):
    out = Path(hf["output"])
    manifest = json.loads((work / "data" / "manifest.json").read_text())
    assert hf["merged_into"] == "original 16-bit base"
    v = hf["validation"]
    assert v["same_greedy_tokens"] and v["ok"] and v["tokens"] == v["reference_tokens"] != []
    assert v["max_abs_logit_diff"] < 1e-4
    assert v["nf4_training_model_max_abs_logit_diff"] > v["max_abs_logit_diff"]  # QLoRA trained against NF4 weights
    assert (out / "chat_template.jinja").read_text() == manifest["template"]["text"]
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2 == hf["eos_token_ids"][0]
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str((work / "base").resolve())
    assert hf["vllm_adapter"] == {"rank": 8, "max_lora_rank": 8, "accepted": True, "problems": [],
                                  "target_modules": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                     "up_proj", "v_proj"]}
    readme = (out / "README.md").read_text()
    assert f"vllm serve {out.resolve()} --served-model-name adapter" in readme
    assert (f"--enable-lora --max-lora-rank 8 --lora-modules adapter={out.resolve() / 'adapter'} "
            f"--chat-template {out.resolve() / 'chat_template.jinja'} --generation-config {out.resolve()}") in readme
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(out)).chat_template == manifest["template"]["text"]


def test_hf_export_of_a_prequantized_base_dequantizes_it(work, adapter):
    """The documented fallback: a base that is itself a 4-bit checkpoint is dequantized, then merged."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.uint8)
    AutoModelForCausalLM.from_pretrained(str(work / "base"), quantization_config=q,
                                         device_map={"": "cpu"}).save_pretrained(str(work / "base-4bit"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(work / "base" / name, work / "base-4bit" / name)
    res = export(adapter, work / "hf-4bit", format="hf", base=str(work / "base-4bit"))
    assert res["merged_into"] == "dequantized 4-bit base (the base checkpoint is pre-quantized)"
    assert res["validation"]["ok"] and res["validation"]["nf4_training_model_max_abs_logit_diff"] < 1e-4
    assert "quantization_config" not in json.loads((work / "hf-4bit" / "config.json").read_text())


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_gguf_runs_in_llama_cpp_like_transformers(work, hf, f16, adapter, quant):
    src = read_source(adapter)
    path = f16
    if quant == "q8_0":
        path = work / "m-q8_0.gguf"
        write_gguf(Path(hf["output"]), path, "q8_0", template=src.template, eos_ids=hf["eos_token_ids"], name="m")
    v = validate_gguf(path, Path(hf["output"]), src)
    assert v["same_prompt_tokens"]  # the GGUF vocabulary tokenizes the rendered prompt as transformers does
    assert v["relative_logit_rmse"] < BOUNDS[quant]
    if quant == "f16":
        assert v["same_greedy_tokens"] and v["top1_agreement"] == 1.0
    else:
        assert v["top1_agreement"] >= 0.9
    assert gguf_tensor_types(path) == {"F32": 5, quant.upper(): 16}  # norms stay f32 (2 per layer + output_norm)
    fields = gguf.GGUFReader(str(path)).fields

    def value(key):
        f = fields[key]
        return f.contents()

    assert value("general.architecture") == "llama"
    assert value("tokenizer.chat_template") == src.template
    assert value("tokenizer.ggml.model") == "llama"
    assert (value("tokenizer.ggml.bos_token_id"), value("tokenizer.ggml.eos_token_id")) == (1, 2)
    assert value("tokenizer.ggml.add_bos_token") is True
    assert "tokenizer.ggml.eot_token_id" not in fields  # the template's end of turn (</s>) is the EOS itself


def test_gguf_int4_sizes_and_logit_error(work, hf, f16, adapter):
    src = read_source(adapter)
    f16_bytes = f16.stat().st_size
    # llama.cpp keeps output.weight at q6_K in both mixes; q4_k_m also puts some attn_v / ffn_down at q6_K
    for quant, want in (("q4_0", {"Q4_0": 15, "Q6_K": 1, "F32": 5}), ("q4_k_m", {"Q4_K": 13, "Q6_K": 3, "F32": 5})):
        path = work / f"m-{quant}.gguf"
        quantize_gguf(f16, path, quant)
        assert gguf_tensor_types(path) == want
        assert path.stat().st_size < 0.40 * f16_bytes  # 0.35: the 32000-token embeddings dominate this model
        v = validate_gguf(path, Path(hf["output"]), src)
        assert v["same_prompt_tokens"] and v["relative_logit_rmse"] < BOUNDS[quant]
        assert v["top1_agreement"] >= 0.6


def test_export_cli_gguf_q4_k_m_with_modelfile(work, adapter):
    out = work / "cli-gguf"
    r = CliRunner().invoke(main, ["export", str(adapter), "--format", "gguf", "--quant", "q4_k_m", "-o", str(out)])
    assert r.exit_code == 0, r.output
    info = json.loads((out / "sftdata_export.json").read_text())
    assert info["validation"]["ok"] and Path(info["gguf"]).name == "adapter-q4_k_m.gguf"
    assert not [p for p in out.iterdir() if p.name.startswith(".sftdata-export-")]
    r = CliRunner().invoke(main, ["export", str(adapter), "--format", "hf", "-o", str(work / "data")])
    assert r.exit_code == 2 and "exists and is not an sftdata export" in r.output  # never overwrites other data
    text = (out / "Modelfile").read_text()
    assert text.startswith("FROM ./adapter-q4_k_m.gguf\n# TEMPLATE: the Go template for the built-in `mistral` template")
    assert "on 19 serving prompts of sftdata's verify suite (14 plain, 4 from tool-call conversations, 1 from " \
           "reasoning conversations)" in modelfile_comments(text)
    assert text.endswith(
        'TEMPLATE """{{- range .Messages }}\n'
        '{{- if eq .Role "user" }}[INST] {{ .Content }} [/INST]\n'
        '{{- else if eq .Role "assistant" }}{{ .Content }}</s>\n'
        '{{- end }}\n'
        '{{- end }}"""\n'
        'PARAMETER stop "</s>"\n')
    assert info["ollama_template"] == {"name": "mistral", "equivalent": True, "refused_by_training_template": 9,
                                       "equal": {"plain": 14, "tools": 4, "reasoning": 1},
                                       "differ": {"plain": 0, "tools": 0, "reasoning": 0}}


def test_llama3_vocab_and_end_of_turn_ids_in_gguf(work):
    """Llama-3 byte-level BPE (llama-bpe pre-tokenizer); end_of_turn_ids <|eot_id|> (the EOS) and <|end_of_text|>
    become the GGUF eos and eot ids."""
    from transformers import AutoTokenizer

    tok_dir = tf.shared_path("tokenizers", "llama3_1")
    model = tiny_llama(work / "llama3", tok_dir, hidden=64, tie=True)
    tok = AutoTokenizer.from_pretrained(str(model))
    template = load_template("tokenizer", tok)  # the tokenizer's own Llama-3 template
    eos = generation_eos_ids({"template": {"end_of_turn_ids": [128009, 128001]}}, tok)
    assert eos == [128009, 128001]
    path = work / "llama3.gguf"
    write_gguf(model, path, "f16", template=template.source, eos_ids=eos, name="llama3")
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["tokenizer.ggml.pre"].contents() == "llama-bpe"
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 128009
    assert fields["tokenizer.ggml.eot_token_id"].contents() == 128001
    assert "tokenizer.ggml.eom_token_id" not in fields
    assert fields["tokenizer.chat_template"].contents() == template.source
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo 123  wörld?\n\tok"}]
    text = template.render(conv, add_generation_prompt=True)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text, add_special_tokens=False)["input_ids"]
    assert modelfile("llama3.gguf", None, tok.convert_ids_to_tokens(eos)).splitlines()[-2:] == [
        'PARAMETER stop "<|eot_id|>"', 'PARAMETER stop "<|end_of_text|>"']


def test_generation_eos_ids_from_the_manifest():
    llama3 = tf.load_tokenizer("llama3_1")
    mistral = tf.load_tokenizer("mistral-7b-v0.1")
    assert generation_eos_ids({"template": {"end_of_turn": "<|eot_id|>"}}, llama3) == [128009]
    assert generation_eos_ids({"template": {"end_of_turn_ids": [128001, 128009]}}, llama3) == [128001, 128009]
    assert generation_eos_ids({"template": {"end_of_turn_ids": [128008]}}, llama3) == [128008, 128009]  # + EOS
    assert generation_eos_ids({"template": {"end_of_turn": "</s>"}}, mistral) == [2]
    assert generation_eos_ids({"template": {"end_of_turn": "### End"}}, mistral) == [2]  # text marker: no id


def test_vllm_adapter_check(tmp_path):
    def check(**cfg):
        (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 16, "target_modules": ["q_proj"], **cfg}))
        return vllm_adapter_check(tmp_path)

    assert check(r=20)["max_lora_rank"] == 32 and check(r=20)["accepted"]
    bad = check(r=600, target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"], use_dora=True)
    assert not bad["accepted"] and bad["max_lora_rank"] is None
    assert [p.split(" ")[0] for p in bad["problems"]] == ["rank", "target", "modules_to_save", "DoRA"]


# --------------------------------------------------------------------------------------------------------------
# Ollama: the Modelfile TEMPLATE (sftdata/ollama.py, sftdata/gotemplate.py, templates/ollama/)
# --------------------------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def ollama_fixture(name: str) -> dict:
    return json.loads((OLLAMA_FIXTURES / name).read_text(encoding="utf-8"))


def reference() -> dict:
    """Renders by Ollama's own template package (fixtures/ollama/make_reference.py)."""
    return ollama_fixture("reference_renders.json")


def modelfile_comments(text: str) -> str:
    """The Modelfile's comment lines as one paragraph (they are wrapped)."""
    return " ".join(line[2:] for line in text.splitlines() if line.startswith("# "))


def fixture_date() -> date:
    return date.fromisoformat(reference()["date"])


def test_evaluator_reproduces_ollamas_own_template_tests():
    """The expected renders of Ollama's TestTemplate: its 20 library templates on its three conversations."""
    tests = ollama_fixture("ollama_template_tests.json")
    assert len(tests["templates"]) == 20
    for name, t in tests["templates"].items():
        for case, want in t["expected"].items():
            got = render(t["template"], tests["conversations"][case])
            if name in tests["trailing_space_removed"] and got.endswith(" "):
                got = got[:-1]  # as Ollama's test does for these templates
            assert got == want, (name, case)


def test_evaluator_matches_ollamas_template_package():
    """Every render Ollama's template package made of sftdata's TEMPLATEs (suite and edge conversations, each think
    setting) and of the Go-semantics templates (printing, json, printf, bytes, ranges, variables, errors)."""
    ref = reference()
    renders = errors = 0
    for name, t in ref["templates"].items():
        for c in t["cases"]:
            conv = ref["conversations"][c["conversation"]]
            assert [ollama_message(m) for m in conv["messages"]] == conv["ollama_messages"]
            assert c["error"] == ""
            got = render(t["template"], conv["ollama_messages"], conv["tools"], c["think"], today=fixture_date())
            assert got == c["output"], (name, c["conversation"], c["think"])
            renders += 1
    for s in ref["go_semantics"]:
        for c in s["cases"]:
            if c["error"]:
                errors += 1
                with pytest.raises(GoTemplateError):
                    render(s["template"], c["messages"], c.get("tools"), c["think"], today=fixture_date())
            else:
                assert render(s["template"], c["messages"], c.get("tools"), c["think"], today=fixture_date()) == \
                    c["output"], s["template"]
                renders += 1
    assert (renders, errors) == (816 + 13, 9)


def test_reference_renders_are_current():
    """The fixture holds today's TEMPLATE of every built-in template and today's probe conversations (if this fails,
    run fixtures/ollama/make_reference.py as its docstring says)."""
    ref = reference()
    assert sorted(ref["templates"]) == sorted(library()) == builtin_template_names()
    for name, t in ref["templates"].items():
        assert library()[name].text(t["special_tokens"]) == t["template"], f"templates/ollama/{name}.gotmpl changed"
        want = [(p.name.split(" think=")[0], p.think) for p in probes(load_template(name).source)]
        got = [(c["conversation"], c["think"]) for c in t["cases"] if not c["conversation"].startswith("edge:")]
        assert got == want, name


# (plain, from tool-call conversations, from reasoning conversations) serving prompts rendered identically, and the
# prompts the training template itself refuses (a system message for Mistral, roles that do not alternate ...).
OLLAMA_EQUAL = {
    "alpaca": (17, 4, 3, 4), "chatml": (17, 8, 3, 0), "deepseek_r1": (17, 8, 3, 0), "deepseek_v3": (17, 8, 3, 0),
    "gemma": (17, 4, 3, 4), "gpt_oss": (51, 24, 9, 0), "llama2": (17, 4, 3, 4), "llama3": (17, 7, 3, 1),
    "llama3_0": (17, 8, 3, 0), "mistral": (14, 4, 1, 9), "mistral_v3": (17, 8, 3, 0), "phi3": (17, 8, 3, 0),
    "qwen3": (68, 32, 12, 0), "qwen3_5": (68, 32, 12, 0), "qwq": (17, 8, 3, 0), "zephyr": (17, 8, 3, 0),
}


@pytest.mark.parametrize("name", sorted(OLLAMA_EQUAL))
def test_ollama_template_renders_like_the_training_template(name):
    """Every serving prompt of the verify suite (think settings included where the template reads them): the Jinja
    template with the generation prompt (BOS aside) == sftdata's evaluator on the TEMPLATE == Ollama's own render."""
    t = reference()["templates"][name]
    jinja = ChatTemplate(name, load_template(name).source, t["special_tokens"])
    results = compare(library()[name].text(t["special_tokens"]), jinja, probes(jinja.source), today=fixture_date())
    ollama = {(c["conversation"], c["think"]): c["output"] for c in t["cases"]}
    counts = {"plain": 0, "tools": 0, "reasoning": 0}
    refused = 0
    for r in results:
        if r.jinja is None:
            refused += 1
            continue
        assert r.ollama == r.jinja, r.probe.name
        assert ollama[(r.probe.name.split(" think=")[0], r.probe.think)] == r.jinja, r.probe.name
        counts[r.probe.feature] += 1
    assert (*counts.values(), refused) == OLLAMA_EQUAL[name]


# Edge conversations Ollama serves differently from the training render, and why (none other differs):
# Ollama merges consecutive messages of one role before the template runs; Go's JSON encoder writes <, >, & as
# \u003c...; Go templates trim ASCII whitespace only; Ollama hands tool-call arguments over as a Go map (sorted keys).
OLLAMA_DIFFERS = {
    "consecutive-user-messages": {"alpaca", "chatml", "deepseek_r1", "deepseek_v3", "gpt_oss", "llama3", "llama3_0",
                                  "phi3", "qwen3", "qwen3_5", "qwq", "zephyr"},
    "html-characters": {"deepseek_r1", "deepseek_v3", "gpt_oss", "llama3", "mistral_v3", "qwen3", "qwq"},
    "unicode-whitespace": {"gemma", "llama2", "llama3", "llama3_0", "qwen3_5"},
    "unsorted-arguments": {"deepseek_r1", "deepseek_v3", "gpt_oss", "llama3", "mistral_v3", "qwen3", "qwen3_5", "qwq"},
}


def test_where_ollama_serves_a_conversation_differently():
    ref = reference()
    differs: dict[str, set[str]] = {}
    equal = 0
    for name, t in ref["templates"].items():
        jinja = ChatTemplate(name, load_template(name).source, t["special_tokens"])
        as_string, as_none = tool_call_form(jinja)
        bos = t["special_tokens"].get("bos_token", "")
        for c in t["cases"]:
            if not c["conversation"].startswith("edge:"):
                continue
            conv = ref["conversations"][c["conversation"]]
            messages = [_tool_call_message(m, as_string, as_none) if m.get("tool_calls") else m
                        for m in conv["messages"]]
            try:
                want = jinja.render(messages, add_generation_prompt=True, tools=conv["tools"],
                                    strftime_now=fixture_date().strftime)
            except Exception:
                continue  # the training template refuses it
            if want.removeprefix(bos) == c["output"]:
                equal += 1
            else:
                differs.setdefault(c["conversation"].removeprefix("edge:"), set()).add(name)
    assert differs == OLLAMA_DIFFERS
    assert equal == 86  # whitespace trimmed, newlines stripped, nested arguments, a second system message ...


def test_what_ollama_infers_from_the_templates():
    """Thinking tags (Ollama accepts `think` and returns the reasoning apart), the tool-call tag its parser looks for,
    and the tools capability, as Ollama's own code infers them from each TEMPLATE."""
    t = reference()["templates"]
    think = ["<think>", "</think>"]
    assert {n: v["thinking_tags"] for n, v in t.items() if v["thinking_tags"] != ["", ""]} == {
        "deepseek_r1": think, "qwen3": think, "qwen3_5": think, "qwq": think,
        "gpt_oss": ["<|start|>assistant<|channel|>analysis<|message|>", "<|end|>"]}
    assert {n for n, v in t.items() if "tools" in v["vars"]} == {"gpt_oss", "llama3", "mistral_v3", "qwen3", "qwen3_5",
                                                                  "qwq"}
    assert {n: v["tool_call_tag"] for n, v in t.items() if v["tool_call_tag"] != "{"} == {
        "mistral_v3": "[TOOL_CALLS] [", "qwen3": "<tool_call>", "qwen3_5": "<tool_call>\n<function=", "qwq": "<tool_call>"}


@pytest.mark.parametrize("name", sorted(OLLAMA_EQUAL))
def test_choose_template_picks_the_builtins_own_go_template(name):
    special = reference()["templates"][name]["special_tokens"]
    choice = choose_template(load_template(name).source, special)
    assert (choice.name, choice.equivalent, tuple(choice.equal.values())) == (name, True, OLLAMA_EQUAL[name][:3])
    assert choice.text == reference()["templates"][name]["template"]


def test_choose_template_follows_what_the_template_renders():
    """A tokenizer's own template (no sftdata comment) gets the Go template of what it renders; a ChatML variant that
    renders tool calls its own way gets the ChatML TEMPLATE with a warning; a template nothing renders like gets
    none."""
    llama3 = tf.load_tokenizer("llama3_1")  # its chat_template is the Llama-3.0 text
    assert choose_template(llama3.chat_template, special_token_variables(llama3)).name == "llama3_0"
    variant = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}{% if m.tool_calls %}CALL{% endif %}"
               "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    choice = choose_template(variant, {"eos_token": "<|im_end|>"})
    assert (choice.name, choice.equivalent, choice.equal, choice.differ) == (
        "chatml", False, {"plain": 17, "tools": 4, "reasoning": 3}, {"plain": 0, "tools": 4, "reasoning": 0})
    assert "it DIFFERS on 4 from tool-call conversations: such conversations are not served as they were trained" in \
        modelfile_comments(modelfile("m.gguf", choice, ["<|im_end|>"]))
    assert choose_template("{{ messages[0]['content'] }}{{ '###' }}", {}) is None
    # a template that writes BOS for a tokenizer (so a GGUF) that does not add one: the Go templates leave it out
    llama3_tokens = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    assert choose_template(load_template("llama3_0").source, llama3_tokens, adds_bos=False) is None
    assert choose_template(load_template("llama3_0").source, llama3_tokens).name == "llama3_0"
    assert choose_template(None, {}) is None
    with pytest.raises(KeyError, match="needs eos_token"):
        library()["zephyr"].text({"bos_token": "<s>"})


def test_modelfile_text():
    choice = choose_template(load_template("chatml").source, {"eos_token": "<|im_end|>"})
    lines = modelfile("m-q4_k_m.gguf", choice, ["<|im_end|>", "<|endoftext|>"], "chatml").splitlines()
    assert lines[0] == "FROM ./m-q4_k_m.gguf"
    at = lines.index('TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}')
    assert all(line.startswith("# ") for line in lines[1:at])
    assert " ".join(line[2:] for line in lines[1:at]).startswith(
        "TEMPLATE: the Go template for the built-in `chatml` template (templates/ollama/chatml.gotmpl), rendered by "
        "sftdata's Go-template evaluator as Ollama renders it: identical to the training template (BOS aside) on 28 "
        "serving prompts of sftdata's verify suite (17 plain, 8 from tool-call conversations, 3 from reasoning "
        "conversations). ChatML:")
    assert lines[at:] == ['TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}', "{{ .Content }}<|im_end|>",
                          '{{ end }}{{ "<|im_start|>assistant\\n" }}"""', 'PARAMETER stop "<|im_end|>"',
                          'PARAMETER stop "<|endoftext|>"']
    kwargs = modelfile("m.gguf", choice, [], "chatml", {"enable_thinking": False, "date_string": "1 Jan 2025"})
    assert 'The build passed the template keywords {"date_string": "1 Jan 2025"}: an Ollama request cannot pass ' \
           "them, so this TEMPLATE renders the template's defaults." in modelfile_comments(kwargs)
    quoted = modelfile("m.gguf", OllamaChoice("chatml", 'x"""y', "", True), [])
    assert 'TEMPLATE """' not in quoted and "which a Modelfile cannot quote" in modelfile_comments(quoted)


@pytest.mark.parametrize("tokenizer,template,stops", [
    ("qwen3", "qwen3", ["<|im_end|>"]), ("llama3_1", "llama3", ["<|eot_id|>"]), ("gpt-oss", "gpt_oss", ["<|return|>"]),
    ("mistral-7b-v0.1", "mistral", ["</s>"])])
def test_modelfile_stop_lines_are_the_end_of_turn_markers(tokenizer, template, stops):
    """With a real tokenizer: one PARAMETER stop per end-of-turn token, and the TEMPLATE chosen for its template."""
    tok = tf.load_tokenizer(tokenizer)
    tpl = load_template(template, tok)
    markers = tok.convert_ids_to_tokens(generation_eos_ids({"template": {"end_of_turn": tpl.end_of_turn}}, tok))
    choice = choose_template(tpl.source, special_token_variables(tok), prefer=template)
    text = modelfile("m.gguf", choice, markers, template)
    assert markers == stops and tpl.end_of_turn == stops[0]
    assert [line for line in text.splitlines() if line.startswith("PARAMETER")] == [f'PARAMETER stop "{s}"'
                                                                                    for s in stops]
    assert choice.name == template and choice.equivalent


def test_go_template_errors():
    with pytest.raises(GoTemplateError, match="unclosed action"):
        GoTemplate("{{ .Messages ")
    with pytest.raises(GoTemplateError, match='function "upper" not defined'):
        GoTemplate("{{ upper .Content }}")
    with pytest.raises(GoTemplateError, match='no such template "trim"'):
        GoTemplate('{{ template "trim" . }}')
    with pytest.raises(GoTemplateError, match="legacy path"):
        render("{{ .Prompt }}", [{"role": "user", "content": "Hi"}])
    with pytest.raises(GoTemplateError, match="step budget"):
        GoTemplate("{{ range $i := 100 }}{{ range $j := 100 }}x{{ end }}{{ end }}", max_steps=1000).execute({})
