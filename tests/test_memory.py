"""Memory calculator: exact counts for known configurations, the trainer's real dtypes, and a measured CPU peak."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from sftdata.cli_train import memory_command
from sftdata.memory import PRESETS, Architecture, Workload, estimate, memory, nf4_bits_per_param, optimizer_bytes, \
    resolve_model

REPO = Path(__file__).resolve().parents[1]
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


def test_llama2_7b_counts_and_static_memory_in_the_trainers_dtypes():
    arch = resolve_model("7B")
    assert arch.total_params() == 6_738_415_616  # Llama-2-7B
    assert arch.lora_params(16) == 39_976_960  # what peft reports for r=16 on all linear layers
    assert arch.lora_params(8, ["q_proj", "v_proj"]) == 4_194_304  # the classic LoRA setting
    linear = arch.linear_params()
    assert linear == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    q = estimate(arch, "qlora")
    # NF4 linear layers; embeddings, LM head and norms in fp32 after prepare_model_for_kbit_training
    assert q.weights_bytes == pytest.approx(linear * nf4_bits_per_param() / 8 + (6_738_415_616 - linear) * 4)
    assert q.adapter_bytes == q.grads_bytes == 4 * 39_976_960  # fp32 adapters and gradients
    # paged_adamw_8bit: two 8-bit states + one fp32 absmax per 256 values each; every LoRA tensor has >= 4096 values
    assert q.optimizer_bytes == pytest.approx(39_976_960 * (2 + 8 / 256))
    assert 100 * q.trainable_params / q.params == pytest.approx(0.593, abs=5e-4)  # not 1.13%
    full = estimate(arch, "full", optim="adamw_torch")
    assert full.weights_bytes == full.grads_bytes == 4 * 6_738_415_616
    assert full.optimizer_bytes == 8 * 6_738_415_616
    lora = estimate(arch, "lora", Workload(compute="bf16"))
    assert lora.weights_bytes == 2 * 6_738_415_616


def test_8bit_optimizer_keeps_small_tensors_in_32_bits():
    assert optimizer_bytes([4095], "paged_adamw_8bit") == 4095 * 8
    assert optimizer_bytes([4096], "paged_adamw_8bit") == pytest.approx(4096 * 2 + 2 * 16 * 4)
    assert optimizer_bytes([10, 20], "adamw_torch") == 240
    with pytest.raises(ValueError, match="not modelled"):
        optimizer_bytes([1], "shampoo")


def test_logits_and_activations_terms():
    arch = resolve_model("8B")
    work = Workload(batch_size=4, seq_len=2048, compute="bf16")
    q = estimate(arch, "qlora", work)
    assert q.logits_bytes == 12 * 8192 * 128256  # 12.6 GB for 8k tokens × 128k vocabulary
    assert q.peak_phase == "loss backward"
    no_ckpt = estimate(arch, "qlora", Workload(batch_size=4, seq_len=2048, gradient_checkpointing=False))
    assert no_ckpt.activations_bytes > 8 * q.activations_bytes
    # checkpointing keeps only each layer's fp32 input (+ the mask, rotary tables, final norm input)
    assert q.activations_bytes == pytest.approx(32 * 8192 * 4096 * 4 + 4 * 2048**2 + 2 * 8192 * 128 * 2
                                                + 8192 * 4096 * 4)
    no_dropout = estimate(arch, "qlora", Workload(gradient_checkpointing=False), lora_dropout=0.0)
    assert no_dropout.activations_bytes < no_ckpt.activations_bytes
    flat = estimate(arch, "qlora", Workload(batch_size=4, seq_len=2048, flatten=True))
    assert flat.activations_bytes - q.activations_bytes == 8192**2 - 4 * 2048**2  # (B·L)² vs B·L² mask


def test_tiny_config_matches_real_model_and_peft():
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**TINY)
    model = LlamaForCausalLM(config)
    arch = Architecture.from_config(config)
    assert arch.total_params() == sum(p.numel() for p in model.parameters())
    assert sorted(arch.param_tensors()) == sorted(p.numel() for p in model.parameters())
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules="all-linear"))
    trainable = sorted(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert sorted(arch.lora_tensors(8)) == trainable
    tied = Architecture.from_config({**TINY, "tie_word_embeddings": True})
    tied_model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=True))
    assert tied.total_params() == sum(p.numel() for p in tied_model.parameters())


def test_config_from_directory_and_named_sizes(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "model_type": "llama"}))
    full, lora, qlora = memory(config=tmp_path, lora_r=8)
    assert full.params == Architecture.from_config(TINY).total_params()
    assert lora.trainable_params == qlora.trainable_params == 16384
    assert [e.method for e in memory("8b")] == ["full", "lora", "qlora"]
    with pytest.raises(ValueError, match="neither a named size"):
        memory("34B")


def test_estimate_within_15_percent_of_the_measured_cpu_peak(tmp_path):
    """The trainer's peak on CPU (parameters + optimizer states + resident-memory growth over training steps)
    against `sftdata memory` for the same model and micro-batch, with and without gradient checkpointing."""
    pytest.importorskip("torch")
    pytest.importorskip("bitsandbytes")
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to reset the peak resident memory")
    sys.path.insert(0, str(REPO / "bench"))
    import bench_memory

    results = bench_memory.run_all(["qlora", "qlora+ckpt"], rows=2, seq_len=256, work=tmp_path, tiny=True,
                                   one_process=True)
    for r in results:
        print(r)
        assert 0.85 <= r["ratio"] <= 1.15, r
        assert r["estimated_static_MiB"] == pytest.approx(r["measured_static_MiB"], rel=0.02), r
    assert results[0]["measured_MiB"] > 1.5 * results[1]["measured_MiB"]  # checkpointing saves a lot here


def test_cli_default_table_one_model_and_json():
    result = CliRunner().invoke(memory_command, [], terminal_width=200)
    assert result.exit_code == 0, result.output
    for preset in PRESETS.values():
        assert preset["name"] in result.output
    result = CliRunner().invoke(memory_command, ["8B", "--batch-size", "2", "--seq-len", "4096"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "Llama-3.1-8B" in result.output and "logits (peak)" in result.output
    assert f"{12 * 8192 * 128256 / 2**30:,.2f}" in result.output  # 11.74 GiB of logits
    data = json.loads(CliRunner().invoke(memory_command, ["7B", "--json", "--compute", "fp32"]).output)
    assert [e["method"] for e in data[0]["estimates"]] == ["full", "lora", "qlora"]
    assert data[0]["estimates"][2]["workload"]["compute"] == "fp32"
    bad = CliRunner().invoke(memory_command, ["lots"])
    assert bad.exit_code == 2 and "named size" in bad.output
