"""Memory calculator: exact numbers for known configurations (no torch needed except the cross-checks)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from sftdata.cli_train import memory_command
from sftdata.memory import Architecture, PRESETS, memory, nf4_bits_per_param, parse_params

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=1000)


def test_nf4_bits_per_param():
    assert nf4_bits_per_param(double_quant=False) == 4.5  # 4 bits + one fp32 absmax per 64 weights
    assert nf4_bits_per_param(double_quant=True) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))  # 4.127
    assert round(nf4_bits_per_param(), 3) == 4.127


def test_lora_params_is_r_times_din_plus_dout():
    arch = Architecture.from_config(TINY)
    # per layer, r=8: q 8·(64+64) + k,v 8·(64+32) each + o 8·(64+64) + gate,up 8·(64+128) each + down 8·(128+64)
    per_layer = 1024 + 768 + 768 + 1024 + 1536 + 1536 + 1536
    assert arch.lora_params(8) == 2 * per_layer == 16384
    assert arch.lora_params(8, ["q_proj", "v_proj"]) == 2 * (1024 + 768)
    assert arch.lora_params(4, "q_proj,k_proj") == 2 * (4 * 128 + 4 * 96)
    with pytest.raises(ValueError, match="unknown target"):
        arch.lora_params(8, ["lm_head"])


def test_known_llama2_7b_counts():
    arch = Architecture.from_config(PRESETS["7B"])
    assert arch.total_params() == 6_738_415_616  # Llama-2-7B
    assert arch.lora_params(16) == 39_976_960  # what peft reports for r=16 on all linear layers
    assert arch.lora_params(8, ["q_proj", "v_proj"]) == 4_194_304  # the classic LoRA setting
    full, lora, qlora = memory(config=PRESETS["7B"])
    assert full.total_bytes == 16 * 6_738_415_616  # ≈ 107.8 GB: 16 bytes/param
    assert lora.total_bytes == 2 * 6_738_415_616 + 16 * 39_976_960
    linear = arch.linear_params()
    assert linear == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    nf4 = linear * nf4_bits_per_param() / 8 + (6_738_415_616 - linear) * 2
    assert qlora.weights_bytes == pytest.approx(nf4 + 2 * 39_976_960)
    assert qlora.total_bytes == pytest.approx(nf4 + 16 * 39_976_960)
    _, _, q8 = memory(config=PRESETS["7B"], optim="adamw_8bit")
    assert q8.total_bytes == pytest.approx(nf4 + 10 * 39_976_960)
    assert round(qlora.total_bytes / 1e9, 2) == 4.51


def test_tiny_config_matches_real_model_and_peft():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**TINY)
    model = LlamaForCausalLM(config)
    arch = Architecture.from_config(config)
    assert arch.total_params() == sum(p.numel() for p in model.parameters())
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules="all-linear"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert arch.lora_params(8) == trainable
    tied = Architecture.from_config({**TINY, "tie_word_embeddings": True})
    tied_model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=True))
    assert tied.total_params() == sum(p.numel() for p in tied_model.parameters())
    del torch


def test_config_from_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "model_type": "llama"}))
    full, lora, qlora = memory(config=tmp_path, lora_r=8)
    assert full.params == Architecture.from_config(TINY).total_params()
    assert lora.trainable_params == qlora.trainable_params == 16384


def test_parameter_count_only_is_approximate_but_sane():
    full, lora, qlora = memory(parse_params("7B"))
    assert full.total_bytes == 112e9
    assert 0.003 < lora.trainable_params / 7e9 < 0.01
    assert qlora.total_bytes < lora.total_bytes < full.total_bytes
    assert parse_params("1.5b") == 1_500_000_000 and parse_params("350M") == 350_000_000
    assert parse_params("7e9") == 7_000_000_000
    with pytest.raises(ValueError):
        parse_params("seven")


def test_cli_default_table_and_json():
    result = CliRunner().invoke(memory_command, [], terminal_width=200)
    assert result.exit_code == 0, result.output
    for name in ("Llama-3.2-1B", "Llama-2-7B", "Llama-2-13B", "Llama-2-70B"):
        assert name in result.output
    assert "107.8" in result.output  # Llama-2-7B full fine-tuning, GB
    result = CliRunner().invoke(memory_command, ["7B", "--json"])
    data = json.loads(result.output)
    assert [e["method"] for e in data[0]["estimates"]] == ["full", "lora", "qlora"]
    bad = CliRunner().invoke(memory_command, ["lots"])
    assert bad.exit_code == 2 and "parameter count" in bad.output
