"""Trainer tests: CPU, tiny Llama-architecture models built from a config, sftdata output dirs written by hand."""

from __future__ import annotations

import json
import math
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

import train_fixtures as tf  # noqa: E402

from sftdata.train import (  # noqa: E402
    SFTDataCollator,
    TokenizerMismatchError,
    TrainError,
    count_parameters,
    count_targets,
    disable_cpu_4bit_repacking,
    generation_eos_ids,
    load_adapter_model,
    merge,
    prepare_output_dir,
    prepare_trainer,
    require_train_deps,
    targets_per_row,
    train,
)

FAST = dict(batch_size=2, grad_accum=1, lora_dropout=0.0, progress=False, warmup=0, logging_steps=1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is faster, and on a shared 2-core machine OpenMP's spinning threads make the
    small matrix products 10-20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return tf.load_tokenizer("mistral-7b-v0.1")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    return tf.tiny_model_dir(tmp_path_factory.mktemp("model"), tok)


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory, tok):
    train_ex = tf.gsm8k_examples(tok, 24)
    eval_ex = tf.gsm8k_examples(tok, 4, offset=500)
    return tf.write_output_dir(tmp_path_factory.mktemp("packed"), tok, train_ex, eval_ex, pack=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, packed_dir, model_dir):
    """A QLoRA run of 2 steps with a checkpoint, then resumed to 4 steps (shared by several tests)."""
    out = tmp_path_factory.mktemp("out") / "adapter"
    first = train(packed_dir, model_dir, out, max_steps=2, save_steps=2, learning_rate=5e-3, **FAST)
    second = train(packed_dir, model_dir, out, max_steps=4, save_steps=2, learning_rate=5e-3, resume=True, **FAST)
    return out, first, second


def _examples(tok, n=3):
    convs = [
        [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
        [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue, like the sky."},
         {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Green."}],
        [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi there, how are you today?"}],
    ]
    return [tf.encode_conversation(tok, c) for c in convs[:n]]


# ----------------------------------------------------------------------------------------------- collator


def test_collator_packed_rows_stay_rows_with_per_row_positions(tok):
    rows = tf.pack_rows(_examples(tok), per_row=2)  # two rows: [ex0 + ex1], [ex2]
    batch = SFTDataCollator(pad_token_id=0, count_tokens=True)(rows)
    assert set(batch) == {"input_ids", "labels", "position_ids", "sftdata_num_tokens"}  # no attention_mask
    lengths = [len(r["input_ids"]) for r in rows]
    width = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (2, width)
    assert batch["sftdata_num_tokens"].item() == sum(lengths)
    for i, row in enumerate(rows):
        n = lengths[i]
        assert batch["position_ids"][i, :n].tolist() == row["position_ids"]
        # padding is a segment of its own: positions restart at 0, labels -100, the pad id
        assert batch["position_ids"][i, n:].tolist() == list(range(width - n))
        assert batch["labels"][i, n:].tolist() == [-100] * (width - n)
        assert batch["input_ids"][i, n:].tolist() == [0] * (width - n)
        starts = [j for j, p in enumerate(row["position_ids"]) if p == 0]
        labels = batch["labels"][i, :n].tolist()
        assert [labels[j] for j in starts] == [-100] * len(starts)
        assert [x for j, x in enumerate(labels) if j not in starts] == \
            [x for j, x in enumerate(row["labels"]) if j not in starts]
    flat = SFTDataCollator(flatten=True)(rows)  # for flash-attention's varlen kernel
    assert flat["input_ids"].shape == (1, sum(lengths)) and "sftdata_num_tokens" not in flat
    assert flat["position_ids"][0].tolist() == [p for r in rows for p in r["position_ids"]]
    assert flat["labels"][0].tolist() == [x for i, n in enumerate(lengths) for x in batch["labels"][i, :n].tolist()]
    assert SFTDataCollator(pad_to_multiple_of=8)(rows)["input_ids"].shape == (2, -(-width // 8) * 8)


def test_collator_unpacked_rows_padding_free_and_padded(tok):
    exs = _examples(tok)
    rows = [{"input_ids": i, "labels": lab} for i, lab in exs]
    flat = SFTDataCollator(flatten=True)(rows)
    assert flat["position_ids"][0].tolist() == [p for i, _ in exs for p in range(len(i))]
    padded = SFTDataCollator(padding_free=False, pad_token_id=0)(rows)
    width = max(len(i) for i, _ in exs)
    assert padded["input_ids"].shape == (3, width) and "position_ids" not in padded
    assert padded["attention_mask"].sum().item() == sum(len(i) for i, _ in exs)
    assert (padded["labels"][padded["attention_mask"] == 0] == -100).all()
    with pytest.raises(ValueError, match="padding_free"):
        SFTDataCollator(padding_free=False)(tf.pack_rows(exs, per_row=2))


def test_targets_per_row_ignores_each_examples_first_label(tok):
    import pyarrow as pa

    exs = _examples(tok)
    raw = [list(range(1, 6)), list(range(1, 4))]  # raw-text style: every label trained, incl. position 0
    rows = tf.pack_rows([(r, r) for r in raw], per_row=2)
    table = pa.table({k: [r[k] for r in rows] for k in ("input_ids", "labels", "position_ids", "seq_lengths")})
    assert targets_per_row(table).tolist() == [4 + 2]
    table = pa.table({"input_ids": [i for i, _ in exs], "labels": [lab for _, lab in exs]})
    assert targets_per_row(table).tolist() == [sum(x != -100 for x in lab[1:]) for _, lab in exs]


# ------------------------------------------------------------------------------ packing / masks / loss


def _plain_model(tok, seed=0, attn_implementation="sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=len(tok), attn_implementation=attn_implementation)
    model = LlamaForCausalLM(cfg).eval()
    model.config.use_cache = False
    return model


def test_packed_loss_is_token_weighted_mean_of_example_losses(tok):
    """Padding-free packed rows: no cross-example attention, and loss == sum of example losses / targets."""
    model = _plain_model(tok)
    exs = _examples(tok)
    batch = SFTDataCollator()(tf.pack_rows(exs, per_row=3))
    n_targets = count_targets(batch["labels"])
    with torch.no_grad():
        packed = model(**batch, num_items_in_batch=torch.tensor(n_targets))
        total, count, offset = 0.0, 0, 0
        for ids, lab in exs:
            x = torch.tensor([ids])
            y = torch.tensor([lab])
            out = model(input_ids=x, labels=y)
            k = int((y[0, 1:] != -100).sum())
            total += out.loss.item() * k
            count += k
            # the packed logits of this example equal its logits alone: it attended to nothing else
            torch.testing.assert_close(packed.logits[0, offset:offset + len(ids)], out.logits[0], atol=1e-5, rtol=0)
            offset += len(ids)
    assert count == n_targets
    assert packed.loss.item() == pytest.approx(total / count, abs=1e-5)
    # the trap the collator avoids: an attention_mask turns the block-diagonal mask off
    with torch.no_grad():
        leaky = model(**batch, attention_mask=torch.ones_like(batch["input_ids"]))
    second = len(exs[0][0])
    assert not torch.allclose(leaky.logits[0, second:], packed.logits[0, second:], atol=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_rows_batches_equal_unpacked_and_flattened_logits(tok, attn):
    """[B, L] padding-free rows (per-row position_ids, a padded tail as its own segment) give each example the
    logits it has alone, and the same logits and loss as the flattened [1, N] form."""
    model = _plain_model(tok, attn_implementation=attn)
    exs = _examples(tok)
    rows = tf.pack_rows(exs, per_row=2)  # rows of different lengths: the shorter one is padded
    as_rows = SFTDataCollator()(rows)
    flat = SFTDataCollator(flatten=True)(rows)
    assert as_rows["input_ids"].shape[0] == 2 and flat["input_ids"].shape[0] == 1
    n_targets = count_targets(as_rows["labels"])
    assert n_targets == count_targets(flat["labels"])
    with torch.no_grad():
        r = model(**as_rows, num_items_in_batch=torch.tensor(n_targets))
        f = model(**flat, num_items_in_batch=torch.tensor(n_targets))
        flat_offset = 0
        for i, row in enumerate(rows):
            offset = 0
            for length in row["seq_lengths"]:
                ids = row["input_ids"][offset:offset + length]
                alone = model(input_ids=torch.tensor([ids])).logits[0]
                torch.testing.assert_close(r.logits[i, offset:offset + length], alone, atol=1e-5, rtol=0)
                torch.testing.assert_close(f.logits[0, flat_offset:flat_offset + length], alone, atol=1e-5, rtol=0)
                offset += length
                flat_offset += length
    assert r.loss.item() == pytest.approx(f.loss.item(), abs=1e-6)


def test_masked_positions_get_exactly_zero_gradient(tok):
    model = _plain_model(tok).train()
    batch = SFTDataCollator()(tf.pack_rows(_examples(tok), per_row=3))
    captured = {}

    def keep(module, args, output):
        output.logits.retain_grad()
        captured["logits"] = output.logits

    model.register_forward_hook(keep)
    out = model(**batch)
    out.loss.backward()
    grad = captured["logits"].grad[0]  # [N, V]; logits[i] predicts labels[i + 1]
    target = torch.cat([batch["labels"][0, 1:], torch.tensor([-100])])
    masked = target == -100
    assert masked.any() and (~masked).any()
    assert torch.count_nonzero(grad[masked]) == 0
    assert (grad[~masked].abs().sum(-1) > 0).all()


def test_all_masked_rows_dropped_and_batch_guard(tmp_path, tok, model_dir):
    exs = _examples(tok)
    no_target = (exs[0][0], [-100] * len(exs[0][0]))
    data = tf.write_output_dir(tmp_path / "d", tok, [no_target] + exs)
    p = prepare_trainer(data, model_dir, tmp_path / "o", max_steps=1, **FAST)
    assert p.train_split.dropped_no_target == 1 and p.train_split.rows == 3
    trainer = p.trainer
    trainer.model.train()
    batch = trainer._prepare_inputs(SFTDataCollator()([{"input_ids": no_target[0], "labels": no_target[1]}]))
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(0))
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()  # the guard's zero keeps the step valid
    assert all(p.grad is None for p in trainer.model.parameters())
    assert trainer.skipped_empty_batches == 1
    # without the guard the model itself returns NaN for the same batch
    with torch.no_grad():
        raw = trainer.model(**batch, num_items_in_batch=torch.tensor(0))
    assert math.isnan(raw.loss.item())


# ------------------------------------------------------------------------------------ QLoRA mechanics


def _grads(trainer, batch):
    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(count_targets(batch["labels"]))).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _with_nonzero_lora_b(model):
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_only_lora_parameters_get_gradients(tmp_path, packed_dir, model_dir):
    p = prepare_trainer(packed_dir, model_dir, tmp_path / "o", max_steps=1, **FAST)
    model = p.trainer.model
    _with_nonzero_lora_b(model)
    batch = p.trainer._prepare_inputs(SFTDataCollator()([p.train_split.dataset[0], p.train_split.dataset[1]]))
    grads = _grads(p.trainer, batch)
    lora = {n for n, q in model.named_parameters() if "lora_" in n}
    assert lora and set(grads) == lora
    assert all(g.abs().sum() > 0 for g in grads.values())
    assert not any(q.requires_grad for n, q in model.named_parameters() if "lora_" not in n)
    assert p.trainable_params == sum(q.numel() for n, q in model.named_parameters() if n in lora)


def test_trainable_and_total_counts_equal_pefts_on_a_4bit_model(tmp_path, packed_dir, model_dir):
    from transformers import AutoModelForCausalLM

    p = prepare_trainer(packed_dir, model_dir, tmp_path / "o", max_steps=1, **FAST)
    model = p.trainer.model
    assert (p.trainable_params, p.total_params) == model.get_nb_trainable_parameters()
    unquantized = sum(q.numel() for q in AutoModelForCausalLM.from_pretrained(str(model_dir)).parameters())
    assert p.total_params == unquantized + p.trainable_params  # 4-bit weights at their logical size
    naive = sum(q.numel() for q in model.parameters())
    assert naive < p.total_params  # what the summary used to divide by: packed 4-bit weights at half size
    assert count_parameters(model) == (p.trainable_params, p.total_params)
    # the literature's defaults: QLoRA lr 2e-4 (model < 30B) and max grad norm 0.3
    assert p.learning_rate == 2e-4 and p.trainer.args.learning_rate == 2e-4
    assert p.trainer.args.max_grad_norm == 0.3 and p.trainer.args.report_to in ([], "none", ["none"])


def test_dora_and_rslora_switches(tmp_path, packed_dir, model_dir):
    p = prepare_trainer(packed_dir, model_dir, tmp_path / "o", max_steps=1, use_dora=True, use_rslora=True,
                        lora_r=4, lora_alpha=8, **FAST)
    model = p.trainer.model
    lora_config = model.peft_config["default"]
    assert lora_config.use_dora and lora_config.use_rslora
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == pytest.approx(8 / math.sqrt(4))  # rsLoRA: alpha / sqrt(r), not alpha / r
    magnitudes = [n for n, q in model.named_parameters() if "lora_magnitude_vector" in n and q.requires_grad]
    assert len(magnitudes) == 2 * 7  # DoRA: one trained magnitude vector per adapted layer
    _with_nonzero_lora_b(model)
    batch = p.trainer._prepare_inputs(SFTDataCollator()([p.train_split.dataset[0]]))
    grads = _grads(p.trainer, batch)
    assert set(magnitudes) <= set(grads) and all(torch.isfinite(g).all() for g in grads.values())


def test_gradients_after_eval_equal_fresh_model(tmp_path, packed_dir, model_dir):
    """bitsandbytes' CPU repacking during a no_grad eval must not change the LoRA gradients that follow."""
    import bitsandbytes as bnb
    from bitsandbytes.nn.modules import has_avx512bf16

    p = prepare_trainer(packed_dir, model_dir, tmp_path / "o", max_steps=1, **FAST)
    trainer, model = p.trainer, p.trainer.model
    _with_nonzero_lora_b(model)
    linear4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linear4 and not any(m.support_avx512bf16_for_cpu for m in linear4)  # the guard is on

    def packed_any():
        return any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in linear4)

    def eval_forward():
        model.eval()
        with torch.no_grad():
            model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])

    batch = trainer._prepare_inputs(SFTDataCollator()([p.train_split.dataset[0]]))
    fresh = _grads(trainer, batch)
    eval_forward()  # a raw no_grad eval pass: the attribute guard alone keeps the layout
    assert not packed_any()
    metrics = trainer.evaluate()  # the Trainer's eval pass
    assert math.isfinite(metrics["eval_loss"]) and not packed_any()
    after = _grads(trainer, batch)
    assert fresh.keys() == after.keys()
    for name in fresh:
        assert torch.equal(fresh[name], after[name]), name

    if not has_avx512bf16():  # the trap exists only on CPUs with AVX512-BF16
        return
    for m in linear4:  # unguarded: the eval pass repacks and the next gradients are wrong
        m.support_avx512bf16_for_cpu = True
    eval_forward()
    assert packed_any()
    broken = _grads(trainer, batch)
    assert any(not torch.allclose(fresh[n], broken[n]) for n in fresh)
    assert disable_cpu_4bit_repacking(model) == len(linear4)  # undoes the repacking too
    assert not packed_any()
    repaired = _grads(trainer, batch)

    def rel(g):
        return max(((g[n] - fresh[n]).norm() / fresh[n].norm()).item() for n in fresh)

    # the undo is lossy (the repacked absmax is bf16, re-quantized on the way back): close, not identical,
    # which is why the guard must be (and is) applied before any eval pass
    print(f"relative gradient error: unguarded {rel(broken):.3g}, after undo {rel(repaired):.3g}")
    assert rel(repaired) < 0.05 and rel(broken) > 10 * rel(repaired)


def test_loss_decreases_on_real_subset(tmp_path, packed_dir, model_dir):
    out = tmp_path / "run"
    res = train(packed_dir, model_dir, out, max_steps=16, learning_rate=1e-2, eval_steps=8, **FAST)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert len(losses) == 16 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-4:]) / 4 < losses[0] - 0.2
    assert len(evals) >= 2 and evals[-1] < evals[0]
    assert res.eval_perplexity == pytest.approx(math.exp(res.eval_loss))
    assert res.global_step == 16 and res.targets_seen > 0


def test_checkpoint_then_resume_continues_step_count(trained):
    out, first, second = trained
    assert first.global_step == 2 and second.global_step == 4
    assert second.resumed_from and second.resumed_from.endswith("checkpoint-2")
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-4").is_dir()
    steps = [h["step"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert steps[-2:] == [3, 4] and 2 in steps


def test_saved_tokenizer_uses_the_build_template(trained, packed_dir):
    from transformers import AutoTokenizer, GenerationConfig

    from sftdata.train import tokenizer_fingerprint

    out, _, _ = trained
    manifest = json.loads((packed_dir / "manifest.json").read_text())
    saved = AutoTokenizer.from_pretrained(str(out))
    assert saved.chat_template == manifest["template"]["text"]
    assert tokenizer_fingerprint(saved) == manifest["tokenizer"]["sha256"]  # serving tokenizes as training did
    msgs = [{"role": "user", "content": "hi"}]
    assert saved.apply_chat_template(msgs, tokenize=False) == "<s>[INST] hi [/INST]"
    gen = GenerationConfig.from_pretrained(str(out))
    assert saved.eos_token_id in ([gen.eos_token_id] if isinstance(gen.eos_token_id, int) else gen.eos_token_id)
    info = json.loads((out / "sftdata_train.json").read_text())
    assert info["method"] == "qlora" and info["template"]["name"] == manifest["template"]["name"]


def test_merged_logits_match_adapter_model(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    out, _, _ = trained
    merged_dir = merge(out, tmp_path / "merged")
    adapter = load_adapter_model(out).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    assert not hasattr(merged.config, "quantization_config")
    x = torch.tensor([[1, 733, 16289, 28793, 22557, 733, 28748, 16289, 28793, 415, 4372, 349]])
    with torch.no_grad():
        a = adapter(input_ids=x).logits
        m = merged(input_ids=x).logits
        with adapter.disable_adapter():
            plain = adapter(input_ids=x).logits
    assert (a - m).abs().max().item() < 1e-5
    assert (plain - a).abs().max().item() > 1e-4  # the adapter changed the model: the match means something


def test_tokenizer_mismatch_is_refused(tmp_path, packed_dir, tok):
    import shutil

    other = tf.tiny_model_dir(tmp_path / "m", tok, save_tokenizer=False)
    src = tf.shared_path("tokenizers", "llama3_1")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(src / name, other / name)
    with pytest.raises(TokenizerMismatchError, match="built with tokenizer") as err:
        train(packed_dir, other, tmp_path / "o", max_steps=1, **FAST)
    assert "vocab_size: dataset 32000, model 128256" in str(err.value)


def test_unpacked_data_with_lora_and_full_methods(tmp_path, tok, model_dir):
    exs = tf.gsm8k_examples(tok, 6, max_chars=150)
    data = tf.write_output_dir(tmp_path / "d", tok, exs, exs[:2])
    lora = train(data, model_dir, tmp_path / "lora", method="lora", max_steps=2, padding_free=False, **FAST)
    assert lora.global_step == 2 and math.isfinite(lora.eval_loss)
    full = train(data, model_dir, tmp_path / "full", method="full", max_steps=2, optim="adamw_torch", **FAST)
    assert full.trainable_params == full.total_params and math.isfinite(full.last_loss)
    assert (tmp_path / "full" / "model.safetensors").is_file()
    with pytest.raises(TrainError, match="full fine-tune"):
        merge(tmp_path / "full", tmp_path / "nomerge")
    packed = tf.write_output_dir(tmp_path / "p", tok, exs, pack=2)
    with pytest.raises(TrainError, match="padding-free"):
        train(packed, model_dir, tmp_path / "x", max_steps=1, padding_free=False, **FAST)


def test_missing_train_extra_explains_install(monkeypatch):
    from click.testing import CliRunner

    from sftdata.cli_train import train_command

    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(TrainError, match=r"sftdata\[train\]"):
        require_train_deps("qlora")
    result = CliRunner().invoke(train_command, [".", "--model", "m", "-o", "o"])
    assert result.exit_code == 2 and "pip install 'sftdata[train]'" in result.output


def test_cli_logs_plain_lines_when_stdout_is_not_a_terminal_and_reports_to_tensorboard(tmp_path, packed_dir,
                                                                                        model_dir):
    import re

    from click.testing import CliRunner

    from sftdata.cli_train import train_command

    pytest.importorskip("tensorboardX")
    out = tmp_path / "cli"
    result = CliRunner().invoke(train_command, [str(packed_dir), "--model", str(model_dir), "-o", str(out),
                                                "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1",
                                                "--logging-steps", "1", "--warmup", "0", "--lr", "1e-3",
                                                "--report-to", "tensorboard"], terminal_width=200)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"sftdata train: loading {model_dir} for qlora (fp32); 12 train rows"  # before the load
    assert lines[1].startswith("sftdata train: 12 rows (") and "2 steps × 2 rows (2 per micro-batch × 1 " \
        "accumulation); trainable 32,768 of 4,202,816 parameters (0.780%); qlora on cpu fp32, lr 0.001; " \
        "validation 2 rows; estimated peak memory 0." in lines[1]
    step = re.compile(r"^step (\d)/2  loss \d+\.\d{4}  lr \S+  grad_norm \d+\.\d{4}  tokens/s [\d,]+  eta \d:\d\d:\d\d$")
    assert [step.match(ln).group(1) for ln in lines if step.match(ln)] == ["1", "2"]
    assert any(ln.startswith("eval step 2: loss ") for ln in lines)
    assert "\r" not in result.output and "━" not in result.output  # no progress bar in a log file
    assert "peak memory" in result.output and "GiB peak RSS" in result.output
    assert (out / "adapter_model.safetensors").is_file()
    events = list((out / "runs").glob("*/events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)


def test_gpu_bench_plans_and_runs_its_modes_on_cpu(tmp_path, capsys):
    """bench/bench_qlora_gpu.py on a CPU: the 8B plan with the real Llama-3.1 vocabulary, and two of its modes
    on a tiny model: the loss on identical examples before the first update agrees across modes."""
    import importlib.util

    path = __import__("pathlib").Path(__file__).resolve().parents[1] / "bench" / "bench_qlora_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_qlora_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--check", "--preset", "8b", "--tokenizer", str(tf.shared_path("tokenizers", "llama3_1"))])
    out = capsys.readouterr().out
    info = json.loads(out[: out.index("check only")])
    assert (info["preset"], info["vocab"], info["params"]) == ("Llama-3.1-8B", 128256, 8_030_261_248)
    assert info["lora_params"] == 41_943_040 and 0.9 < info["pack_fill"] <= 1.0 and info["estimate_peak_GiB"] > 0

    argv = ["--preset", "tiny", "--device", "cpu", "--tokenizer", str(tf.shared_path("tokenizers", "mistral-7b-v0.1")),
            "--seq-len", "128", "--rows", "2", "--steps", "2", "--warmup-steps", "1", "--workdir", str(tmp_path)]
    args = bench.parse_args(argv)
    bench.build_model(bench.plan(args), tmp_path / "model", "cpu", 0)
    results = {m: bench.main(argv + ["--mode", m])[0] for m in ("sftdata", "hf-flattening")}
    assert results["sftdata"]["probe_loss"] == pytest.approx(results["hf-flattening"]["probe_loss"], abs=1e-4)
    assert results["hf-flattening"]["padding_share"] == 0.0
    assert all(r["steps"] == 2 and r["tokens_per_s"] > 0 and r["trained_tokens_per_s"] > 0 for r in results.values())


def test_trains_on_real_sftdata_build_output(tmp_path):
    """Hand-off: a packed `sftdata build` of the shipped example data trains as is; a model directory without
    tokenizer files falls back to the tokenizer the manifest names (here the bundled Mistral-7B one)."""
    from transformers import AutoTokenizer

    from sftdata.build import build

    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    data = tmp_path / "data"
    build([str(repo / "examples" / "data" / "chat.jsonl")], template="llama2", output=data, max_length=256,
          pack=True, eval_fraction=0.1)
    manifest = json.loads((data / "manifest.json").read_text())
    model = tf.tiny_model_dir(tmp_path / "model", vocab_size=manifest["tokenizer"]["vocab_size"])
    res = train(data, model, tmp_path / "out", max_steps=2, **FAST)
    assert res.global_step == 2 and math.isfinite(res.eval_loss)
    assert any("has no tokenizer" in n for n in res.notes)
    saved = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert saved.chat_template == manifest["template"]["text"]


# ------------------------------------------------------------------------------- runs: guards, early stop


def test_output_directory_belongs_to_one_run(trained, tmp_path, packed_dir, model_dir, tok):
    out, _, _ = trained
    # a fresh run into an earlier run's directory is refused before anything is loaded
    with pytest.raises(TrainError, match=r"is not empty \(it holds checkpoints checkpoint-2, checkpoint-4 of an "
                                         r"earlier run\); pass --resume to continue that run, --overwrite"):
        train(packed_dir, model_dir, out, max_steps=1, **FAST)
    # --resume into checkpoints of another run (other adapter shape, other data) is refused with the fix
    with pytest.raises(TrainError, match=r"belong to another run \(lora_r: 16 there, 8 now\).*--resume .*checkpoint-4"):
        train(packed_dir, model_dir, out, max_steps=6, resume=True, lora_r=8, **FAST)
    other_data = tf.write_output_dir(tmp_path / "other", tok, tf.gsm8k_examples(tok, 4, offset=700), pack=2)
    with pytest.raises(TrainError, match=r"belong to another run \(dataset_fingerprint: "):
        train(other_data, model_dir, out, max_steps=6, resume=True, **FAST)
    from sftdata.train import RUN_INFO, run_identity

    identity = json.loads((out / RUN_INFO).read_text())
    assert identity == run_identity(__import__("sftdata.train_config").train_config.TrainConfig(), json.loads(
        (packed_dir / "manifest.json").read_text()), str(model_dir))
    # naming a checkpoint resumes from it as named; resume and overwrite together make no sense
    assert prepare_output_dir(out, {"other": 1}, resume=str(out / "checkpoint-2"), overwrite=False) == \
        str(out / "checkpoint-2")
    with pytest.raises(TrainError, match="contradict"):
        prepare_output_dir(out, identity, resume=True, overwrite=True)
    # --overwrite replaces an earlier train output, never a directory of other files
    copy = tmp_path / "copy"
    __import__("shutil").copytree(out, copy)
    assert prepare_output_dir(copy, identity, resume=None, overwrite=True) is None and not copy.exists()
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(TrainError, match="is not empty \\(it holds files\\)"):
        prepare_output_dir(stranger, identity, resume=None, overwrite=False)
    with pytest.raises(TrainError, match="not an sftdata train output; refusing to delete"):
        prepare_output_dir(stranger, identity, resume=None, overwrite=True)
    assert (stranger / "notes.txt").read_text() == "mine"


def test_early_stopping_stops_and_keeps_the_best(tmp_path, tok, model_dir):
    """Validation answers contradict the training answers, so every update makes the validation loss worse: the
    run stops after `patience` evaluations without improvement and the saved adapter is the best (step 1)."""
    from safetensors.torch import load_file

    questions = [f"What is the capital of country number {i}?" for i in range(8)]
    train_ex = [tf.encode_conversation(tok, [{"role": "user", "content": q},
                                             {"role": "assistant", "content": "Paris Paris Paris Paris"}]) for q in questions]
    eval_ex = [tf.encode_conversation(tok, [{"role": "user", "content": q},
                                            {"role": "assistant", "content": "Nobody knows that anymore, sorry friend, truly."}])
               for q in questions[:4]]
    data = tf.write_output_dir(tmp_path / "d", tok, train_ex, eval_ex)
    out = tmp_path / "run"
    res = train(data, model_dir, out, max_steps=12, eval_steps=1, early_stopping_patience=2, learning_rate=5e-2,
                save_total_limit=1, **FAST)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    assert [s for s, _ in evals[:3]] == [1, 2, 3] and evals[1][1] > evals[0][1] and evals[2][1] > evals[0][1]
    assert res.stopped_early and res.global_step == 3 and res.best_step == 1
    assert res.best_eval_loss == pytest.approx(evals[0][1])
    assert res.eval_loss == pytest.approx(evals[0][1], abs=1e-6)  # the final evaluation is of the best adapter
    saved = load_file(str(out / "adapter_model.safetensors"))
    best = load_file(str(out / "checkpoint-1" / "adapter_model.safetensors"))
    assert saved.keys() == best.keys() and all(torch.equal(saved[k], best[k]) for k in saved)
    assert any("early stopping at step 3 of 12" in n for n in res.notes)
    with pytest.raises(TrainError, match="needs a validation split"):
        train(tf.write_output_dir(tmp_path / "noeval", tok, train_ex), model_dir, tmp_path / "x", max_steps=2,
              eval_steps=1, early_stopping_patience=1, **FAST)


def test_generation_eos_ids_from_the_manifest(tmp_path, tok, model_dir):
    from transformers import GenerationConfig

    from sftdata.train import save_generation_config

    eot = {"end_of_turn": "</s>"}
    assert generation_eos_ids({"template": eot}, tok) == [tok.eos_token_id]  # older manifests: EOS + single-token eot
    manifest = {"template": {**eot, "end_of_turn_ids": [32000, 32001, tok.eos_token_id]}}
    assert generation_eos_ids(manifest, tok) == [32000, 32001, tok.eos_token_id]  # template ids first, no repeats
    assert generation_eos_ids({"template": {"end_of_turn_ids": [7]}}, tok) == [7, tok.eos_token_id]
    save_generation_config(tmp_path, str(model_dir), tok, manifest)
    assert GenerationConfig.from_pretrained(str(tmp_path)).eos_token_id == [32000, 32001, tok.eos_token_id]


def test_report_to_an_uninstalled_tracker_says_how_to_install(tmp_path, packed_dir, model_dir):
    import importlib.util

    if importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    with pytest.raises(TrainError, match=r"--report-to wandb: the wandb package is not installed; "
                                         r"pip install 'sftdata\[wandb\]'"):
        prepare_trainer(packed_dir, model_dir, tmp_path / "o", report_to="wandb", **FAST)
