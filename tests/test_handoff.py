"""Verified hand-off: packed rows are what trainers need, on CPU with a tiny Llama built from a config (fp32).

- the logits of a packed row equal those of each example run alone (position_ids restart, attention_mask=None,
  use_cache=False: transformers builds the block-diagonal mask from position_ids -- failure mode 14 of docs/invariants.md), with negative
  controls (continuous position_ids; an all-ones attention_mask; packed rows fed to DataCollatorWithFlattening as is);
- the loss of a packed batch equals the loss of the same examples unpacked and padded;
- TRL SFTTrainer (pre-tokenized, padding-free) and transformers.Trainer + DataCollatorWithFlattening train a few
  steps on the packed Parquet output: loss finite and decreasing, parameters change.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from sftdata.pack import flattening_collator, pack_examples, pack_split, unpack_row  # noqa: E402

VOCAB = 96
PAD = 0


def tiny_llama(attn: str = "sdpa", seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, pad_token_id=PAD, bos_token_id=1,
                         eos_token_id=2, attn_implementation=attn)
    return LlamaForCausalLM(config).float().eval()


def synthetic_examples(n: int = 24, seed: int = 0, max_len: int = 40) -> dict[str, list]:
    """Learnable tokenized chat-like examples: a 'prompt' (-100) then an arithmetic 'answer' (trained)."""
    rng = np.random.default_rng(seed)
    input_ids, labels = [], []
    for _ in range(n):
        p = int(rng.integers(2, 10))
        a = int(rng.integers(3, max_len - p))
        start = int(rng.integers(3, VOCAB - 1))
        prompt = [1] + rng.integers(3, VOCAB, size=p - 1).tolist()
        answer = [3 + (start - 3 + i) % (VOCAB - 3) for i in range(a - 1)] + [2]
        input_ids.append(prompt + answer)
        labels.append([-100] * p + answer)
    return {"input_ids": input_ids, "labels": labels, "source": ["synthetic"] * n, "row": list(range(1, n + 1))}


def _segments(row):
    start = 0
    for n in row["seq_lengths"]:
        yield start, n
        start += n


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_each_example_alone(attn):
    model = tiny_llama(attn)
    table, _ = pack_examples(synthetic_examples(n=40), 64)
    rows = [r for r in table.to_pylist() if len(r["seq_lengths"]) >= 3][:3]
    assert len(rows) == 3, "need rows with several examples"
    checked = 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            pos = torch.tensor([row["position_ids"]])
            packed = model(input_ids=ids, position_ids=pos, attention_mask=None, use_cache=False).logits[0]
            continuous = model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None], attention_mask=None,
                               use_cache=False).logits[0]
            ones_mask = model(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids),
                              use_cache=False).logits[0]
            for k, (start, n) in enumerate(_segments(row)):
                alone = model(input_ids=ids[:, start:start + n], use_cache=False).logits[0]
                torch.testing.assert_close(packed[start:start + n], alone, atol=1e-5, rtol=0)
                checked += 1
                if k > 0:  # negative controls: boundaries ignored -> the example sees the ones before it
                    assert (continuous[start:start + n] - alone).abs().max() > 1e-3
                    assert (ones_mask[start:start + n] - alone).abs().max() > 1e-3
    assert checked >= 9


def test_flattening_collator_splits_rows_and_raw_collator_would_not():
    from transformers import DataCollatorWithFlattening

    model = tiny_llama()
    table, _ = pack_examples(synthetic_examples(seed=1), 64)
    rows = table.select(["input_ids", "labels", "seq_lengths"]).to_pylist()[:2]
    batch = flattening_collator()(rows)
    expected_pos = [p for r in rows for p in pack_positions(r["seq_lengths"])]
    assert batch["position_ids"][0].tolist() == expected_pos
    examples = [e for r in rows for e in unpack_row(r)]
    assert batch["input_ids"][0].tolist() == [t for e in examples for t in e["input_ids"]]
    # labels: -100 at each example start, the example's labels elsewhere
    assert batch["labels"][0].tolist() == [t for e in examples for t in [-100] + e["labels"][1:]]
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        for e in examples:
            alone = model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits[0]
            torch.testing.assert_close(out[start:start + len(e["input_ids"])], alone, atol=1e-5, rtol=0)
            start += len(e["input_ids"])
    # Negative control: a packed row handed to DataCollatorWithFlattening as is is ONE sequence to it.
    wrong = DataCollatorWithFlattening()([{"input_ids": rows[0]["input_ids"], "labels": rows[0]["labels"]}])
    assert wrong["position_ids"][0].tolist() == list(range(len(rows[0]["input_ids"])))


def pack_positions(seq_lengths):
    return [i for n in seq_lengths for i in range(n)]


def test_packed_loss_equals_unpacked_padded_loss():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = tiny_llama()
    examples = synthetic_examples(n=16, seed=2)
    table, _ = pack_examples(examples, 64, seed=0)
    rows = table.select(["input_ids", "labels", "seq_lengths"]).to_pylist()
    batch = DataCollatorForLanguageModeling(pad_token_id=PAD, padding_free=True)(rows)
    assert batch["position_ids"][0].tolist() == [p for r in rows for p in pack_positions(r["seq_lengths"])]
    # the order of examples in the packed batch, to build the same examples unpacked
    keep = {"input_ids", "labels", "position_ids"}
    with torch.no_grad():
        packed_loss = model(**{k: v for k, v in batch.items() if k in keep}, use_cache=False).loss
        longest = max(len(x) for x in examples["input_ids"])
        ids = torch.full((16, longest), PAD)
        lab = torch.full((16, longest), -100)
        mask = torch.zeros((16, longest), dtype=torch.long)
        for i, (x, y) in enumerate(zip(examples["input_ids"], examples["labels"])):
            ids[i, :len(x)] = torch.tensor(x)
            lab[i, :len(y)] = torch.tensor(y)
            mask[i, :len(x)] = 1
        unpacked_loss = model(input_ids=ids, labels=lab, attention_mask=mask, use_cache=False).loss
    torch.testing.assert_close(packed_loss, unpacked_loss, atol=1e-5, rtol=1e-5)


@pytest.fixture()
def packed_dir(tmp_path):
    """The packed output as build writes it: unpacked split -> pack_split -> train-00000.parquet (+ a manifest)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "unpacked.parquet"
    ex = synthetic_examples(n=48, seed=3)
    n = len(ex["input_ids"])
    pq.write_table(pa.table({**ex, "num_tokens": [len(x) for x in ex["input_ids"]],
                             "num_trained": [sum(t != -100 for t in y) for y in ex["labels"]],
                             "truncated": [False] * n}), src)
    out = tmp_path / "out"
    out.mkdir()
    stats = pack_split([str(src)], str(out), "train", 64, seed=0)
    (out / "manifest.json").write_text(json.dumps({"packing": {"train": stats}}))
    assert stats["examples"] == n and stats["fill_ratio"] > 0.8
    return out


def _load(packed_dir, tmp_path):
    from datasets import load_dataset

    return load_dataset("parquet", data_dir=str(packed_dir), cache_dir=str(tmp_path / "hf-cache"))["train"]


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _check_training(trainer, model, before):
    result = trainer.train()
    print("LOSSES", [round(h["loss"], 3) for h in trainer.state.log_history if "loss" in h])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) >= 8 and all(math.isfinite(x) for x in losses), losses
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    assert math.isfinite(result.training_loss)
    changed = [k for k, v in model.named_parameters() if not torch.equal(v.detach(), before[k])]
    assert len(changed) == len(before)


def test_trl_sft_trainer_padding_free_on_packed_output(packed_dir, tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models
    from trl import SFTConfig, SFTTrainer

    dataset = _load(packed_dir, tmp_path)
    assert {"input_ids", "labels", "position_ids", "seq_lengths"} <= set(dataset.column_names)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)},
                                                                              unk_token="t3")),
                                  pad_token="t0", bos_token="t1", eos_token="t2")
    model = tiny_llama()
    model.train()
    before = _params(model)
    args = SFTConfig(output_dir=str(tmp_path / "trl"), max_steps=10, per_device_train_batch_size=2,
                     learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                     padding_free=True, max_length=None, dataset_kwargs={"skip_prepare_dataset": True},
                     dataloader_num_workers=0, seed=0, lr_scheduler_type="constant", warmup_steps=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    # the collator rebuilt position_ids from seq_lengths: they restart, and no attention_mask is passed
    assert "attention_mask" not in batch
    assert int((batch["position_ids"][0] == 0).sum()) >= 4
    assert (batch["labels"][0][batch["position_ids"][0] == 0] == -100).all()
    _check_training(trainer, model, before)


def test_transformers_trainer_with_flattening_collator_on_packed_output(packed_dir, tmp_path):
    from transformers import Trainer, TrainingArguments

    dataset = _load(packed_dir, tmp_path).select_columns(["input_ids", "labels", "seq_lengths"])
    model = tiny_llama()
    model.train()
    before = _params(model)
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=10, per_device_train_batch_size=2,
                             learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             remove_unused_columns=False, dataloader_num_workers=0, seed=0,
                             lr_scheduler_type="constant", warmup_steps=0)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=flattening_collator())
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    assert int((batch["position_ids"][0] == 0).sum()) >= 4
    _check_training(trainer, model, before)
