"""`sftdata export`: the merged HF directory reproduces the adapter; GGUF files carry the template and end-of-turn ids
and run in llama.cpp (llama-cpp-python) like transformers; quantized sizes and logit errors stay within the bounds
docs/export.md states; the Ollama Modelfile stops at every end marker. CPU, tiny Llama models from a config."""

from __future__ import annotations

import json
import os
import shutil
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
    modelfile,
    ollama_shape,
    ollama_template,
    quantize_gguf,
    read_source,
    render_turns,
    validate_gguf,
    vllm_adapter_check,
    write_gguf,
)
from sftdata.templates import load_template  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

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
    assert (out / "Modelfile").read_text() == (
        'FROM ./adapter-q4_k_m.gguf\n'
        'TEMPLATE """{{- range .Messages }}{{ if eq .Role "user" }}[INST] {{ .Content }} [/INST]'
        '{{ else if eq .Role "assistant" }}{{ .Content }}</s>{{ end }}{{ end }}"""\n'
        'PARAMETER stop "</s>"\n')


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


@pytest.mark.parametrize("name,shape", [("chatml", "chatml"), ("zephyr", "zephyr"), ("phi3", "phi3"),
                                        ("mistral", "mistral-inst"), ("llama3_1 tokenizer", "llama3-header"),
                                        ("alpaca", None), ("llama2", None)])
def test_ollama_template_only_where_it_renders_like_the_training_template(name, shape):
    llama3 = name.startswith("llama3")
    tok = tf.load_tokenizer("llama3_1" if llama3 else "mistral-7b-v0.1")
    template = load_template("tokenizer" if llama3 else name, tok)  # the llama3_1 tokenizer's own (Llama-3.0) text
    assert ollama_shape(template.source, tok) == shape
    if shape is None:
        assert ollama_template(shape) is None
        return
    convs = [[{"role": "user", "content": "Hi"}],
             [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "Bye\nnow"}]]
    if shape != "mistral-inst":
        convs.append([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}])
    for conv in convs:
        jinja = template.render(conv, add_generation_prompt=True)
        bos = tok.bos_token if jinja.startswith(tok.bos_token) else ""  # llama.cpp adds BOS (add_bos_token)
        assert render_turns(shape, conv) == jinja[len(bos):]
    go = ollama_template(shape)
    assert go.startswith("{{- range .Messages }}") and go.count("{{ .Content }}") == (2 if shape == "mistral-inst" else 3)
