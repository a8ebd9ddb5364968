"""QLoRA on a real-size architecture: sftdata's padding-free packed trainer vs HF Trainer + peft on padded batches.

    python bench/bench_qlora_gpu.py                      # both modes, Llama-3.2-1B shape, prints a table
    python bench/bench_qlora_gpu.py --preset 8b --steps 20
    python bench/bench_qlora_gpu.py --check              # CPU: plan, parameter/memory estimate, packing fill

The model has random weights built from a config (no download): speed and memory do not depend on the values.
Both modes load it the same way (NF4 + double quantization, bf16 compute), put LoRA r=16 on every linear layer,
use gradient checkpointing, paged 8-bit AdamW and a cosine schedule, and see the *same* examples:

* ``sftdata``  — the examples packed (best-fit decreasing) into rows of ``--seq-len`` tokens and fed padding-free
  through ``sftdata.train.prepare_trainer`` (one flattened sequence per micro-batch, per-example position_ids,
  no attention_mask);
* ``hf-padded`` — plain ``transformers.Trainer`` + peft, one example per row, right-padded to the longest in the
  batch with an ``attention_mask`` (``DataCollatorForSeq2Seq``), the batch size chosen so that a step holds
  about as many real tokens as the packed micro-batch.

Reported per mode: peak GPU memory (``torch.cuda.max_memory_allocated``), real (non-pad) tokens/s and trained
tokens/s over the timed steps (the first ``--warmup-steps`` are not timed), padding share. Each mode runs in its
own process so that peak memory is not shared. Ratios from one run are the figures to quote.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRESETS = {  # Meta's published shapes; vocab_size is replaced by the tokenizer's
    "1b": dict(name="Llama-3.2-1B", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0),
    "3b": dict(name="Llama-3.2-3B", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
               num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0),
    "7b": dict(name="Llama-2-7B", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False),
    "8b": dict(name="Llama-3.1-8B", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False, rope_theta=500000.0),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    ap.add_argument("--tokenizer", default="mistral-7b-v0.1", help="bundled name or tokenizer directory")
    ap.add_argument("--seq-len", type=int, default=2048, help="packed row length")
    ap.add_argument("--rows", type=int, default=2, help="packed rows per micro-batch (sftdata mode)")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup-steps", type=int, default=3, help="steps not timed")
    ap.add_argument("--median-len", type=int, default=350, help="median example length (log-normal)")
    ap.add_argument("--prompt-share", type=float, default=0.4, help="share of each example masked with -100")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--attn-implementation", default="sdpa")
    ap.add_argument("--mode", choices=["both", "sftdata", "hf-padded"], default="both")
    ap.add_argument("--workdir", default=None, help="where the random model and data go (default: a temp dir)")
    ap.add_argument("--json-out", default=None, help="write the results as JSON here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="CPU-only dry run: plan and estimates, no model")
    return ap.parse_args(argv)


def load_tok(spec: str):
    from transformers import AutoTokenizer

    from sftdata.tokenizer import BUNDLED, bundled_tokenizer_path

    path = bundled_tokenizer_path(spec) if spec in BUNDLED and not Path(spec).exists() else Path(spec)
    return AutoTokenizer.from_pretrained(str(path)), path


def make_examples(n_tokens: int, vocab: int, args) -> list[tuple[list[int], list[int]]]:
    """Synthetic SFT examples with log-normal lengths; the first ``prompt_share`` of each is masked."""
    import numpy as np

    rng = np.random.default_rng(args.seed)
    out, total = [], 0
    while total < n_tokens:
        n = int(np.clip(rng.lognormal(np.log(args.median_len), 0.8), 16, args.seq_len))
        ids = rng.integers(3, vocab, size=n).tolist()
        cut = max(1, int(n * args.prompt_share))
        out.append((ids, [-100] * cut + ids[cut:]))
        total += n
    return out


def pack(examples, seq_len):
    try:
        from sftdata.pack import best_fit_decreasing

        groups = best_fit_decreasing([len(i) for i, _ in examples], seq_len)
    except ImportError:  # pragma: no cover - first-fit fallback
        groups, room = [], []
        for k, (ids, _) in enumerate(sorted(examples, key=lambda e: -len(e[0]))):
            for g, r in enumerate(room):
                if len(ids) <= r:
                    groups[g].append(k)
                    room[g] -= len(ids)
                    break
            else:
                groups.append([k])
                room.append(seq_len - len(ids))
    return [[examples[k] for k in g] for g in groups]


def model_config(args, vocab: int):
    from transformers import LlamaConfig

    preset = {k: v for k, v in PRESETS[args.preset].items() if k != "name"}
    return LlamaConfig(**preset, vocab_size=vocab, max_position_embeddings=max(args.seq_len, 4096))


def plan(args) -> dict:
    from sftdata.memory import Architecture, gb, memory

    tok, _ = load_tok(args.tokenizer)
    cfg = model_config(args, len(tok))
    arch = Architecture.from_config(cfg.to_dict())
    tokens_needed = args.rows * args.seq_len * args.grad_accum * (args.steps + 1)
    examples = make_examples(int(tokens_needed * 1.1), len(tok), args)
    rows = pack(examples, args.seq_len)
    fill = sum(len(i) for r in rows for i, _ in r) / (len(rows) * args.seq_len)
    mean_len = sum(len(i) for i, _ in examples) / len(examples)
    pad_batch = max(1, round(args.rows * args.seq_len * fill / mean_len))
    est = {e.method: e for e in memory(config=cfg.to_dict(), lora_r=args.lora_r, optim="adamw_8bit")}
    info = {
        "preset": PRESETS[args.preset]["name"], "params": arch.total_params(),
        "lora_params": arch.lora_params(args.lora_r), "vocab": len(tok), "examples": len(examples),
        "mean_example_len": round(mean_len, 1), "packed_rows": len(rows), "pack_fill": round(fill, 4),
        "hf_padded_batch": pad_batch,
        "qlora_weights_optimizer_GB": gb(est["qlora"].total_bytes),
    }
    return {"info": info, "examples": examples, "rows": rows, "tok": tok, "config": cfg}


class StepTimer:
    """A TrainerCallback timing each optimizer step (CUDA-synchronized) and counting the tokens it saw."""

    def __init__(self, warmup: int):
        self.warmup, self.times, self.t0 = warmup, [], None

    def callback(self):
        import torch
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                torch.cuda.synchronize()
                timer.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                torch.cuda.synchronize()
                timer.times.append(time.perf_counter() - timer.t0)

        return _CB()


class CountingCollator:
    def __init__(self, inner):
        self.inner, self.real, self.trained, self.slots = inner, [], [], []

    def __call__(self, features):
        batch = self.inner(features)
        labels = batch["labels"]
        mask = batch.get("attention_mask")
        self.real.append(int(mask.sum()) if mask is not None else labels.numel())
        self.slots.append(labels.numel())
        self.trained.append(int((labels[..., 1:] != -100).sum()))
        return batch


def run_mode(args, mode: str, work: Path) -> dict:
    import torch

    p = plan(args)
    tok, cfg = p["tok"], p["config"]
    model_dir = work / "model"
    if not (model_dir / "config.json").is_file():
        from transformers import LlamaForCausalLM

        torch.manual_seed(args.seed)
        with torch.device("cuda"):
            LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(str(model_dir))
        _, tok_path = load_tok(args.tokenizer)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (model_dir / name).write_bytes((Path(tok_path) / name).read_bytes())
        torch.cuda.empty_cache()
    timer = StepTimer(args.warmup_steps)
    torch.cuda.reset_peak_memory_stats()
    if mode == "sftdata":
        data = work / "data"
        if not (data / "manifest.json").is_file():
            write_packed_dir(data, p["rows"], tok)
        from sftdata.train import prepare_trainer

        prep = prepare_trainer(data, model_dir, work / "out-sftdata", progress=False, max_steps=args.steps,
                               batch_size=args.rows, grad_accum=args.grad_accum, lora_r=args.lora_r,
                               lora_alpha=2 * args.lora_r, lora_dropout=0.0, warmup=0.1,
                               attn_implementation=args.attn_implementation, save_steps=10**9,
                               save_total_limit=None)
        trainer = prep.trainer
        trainer.data_collator = counting = CountingCollator(trainer.data_collator)
    else:
        counting, trainer = hf_padded_trainer(args, p, model_dir, work)
    trainer.add_callback(timer.callback())
    trainer.train()
    peak = torch.cuda.max_memory_allocated()
    timed = timer.times[args.warmup_steps:]
    steps_tokens = _per_step(counting, args.grad_accum)[args.warmup_steps:len(timer.times)]
    secs = sum(timed)
    real = sum(s[0] for s in steps_tokens)
    trained = sum(s[1] for s in steps_tokens)
    slots = sum(s[2] for s in steps_tokens)
    return {"mode": mode, "peak_gpu_GiB": round(peak / 2**30, 3), "timed_steps": len(timed),
            "seconds": round(secs, 3), "tokens_per_s": round(real / secs, 1) if secs else None,
            "trained_tokens_per_s": round(trained / secs, 1) if secs else None,
            "padding_share": round(1 - real / slots, 4) if slots else None, "device": torch.cuda.get_device_name(),
            **p["info"]}


def _per_step(counting, grad_accum):
    out = []
    for i in range(0, len(counting.real) - grad_accum + 1, grad_accum):
        out.append((sum(counting.real[i:i + grad_accum]), sum(counting.trained[i:i + grad_accum]),
                    sum(counting.slots[i:i + grad_accum])))
    return out


def write_packed_dir(path: Path, rows, tok) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sftdata.train import tokenizer_fingerprint

    path.mkdir(parents=True, exist_ok=True)
    cols = {
        "input_ids": [[t for ids, _ in r for t in ids] for r in rows],
        "labels": [[t for _, lab in r for t in lab] for r in rows],
        "position_ids": [[p for ids, _ in r for p in range(len(ids))] for r in rows],
        "seq_lengths": [[len(ids) for ids, _ in r] for r in rows],
    }
    pq.write_table(pa.table({k: pa.array(v, pa.list_(pa.int32())) for k, v in cols.items()}),
                   path / "train-00000.parquet")
    manifest = {"format": "sftdata/1", "template": {"name": "bench", "text": None},
                "tokenizer": {"name_or_path": tok.name_or_path, "sha256": tokenizer_fingerprint(tok),
                              "vocab_size": len(tok)},
                "splits": {"train": {"rows": len(rows), "files": ["train-00000.parquet"]}}}
    (path / "manifest.json").write_text(json.dumps(manifest))


def hf_padded_trainer(args, p, model_dir: Path, work: Path):
    """The baseline most users write: Trainer + peft, one example per row, padded batches with attention_mask."""
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, DataCollatorForSeq2Seq, Trainer, \
        TrainingArguments

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=q, dtype=torch.bfloat16,
                                                 device_map={"": 0}, attn_implementation=args.attn_implementation)
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    model.enable_input_require_grads()
    examples = [e for r in p["rows"] for e in r]  # the same examples, in packing order
    ds = datasets.Dataset.from_dict({"input_ids": [i for i, _ in examples], "labels": [lab for _, lab in examples]})
    tok = p["tok"]
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    counting = CountingCollator(DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    targs = TrainingArguments(output_dir=str(work / "out-hf"), per_device_train_batch_size=p["info"]["hf_padded_batch"],
                              gradient_accumulation_steps=args.grad_accum, max_steps=args.steps, learning_rate=2e-4,
                              lr_scheduler_type="cosine", warmup_steps=0.1, optim="paged_adamw_8bit", bf16=True,
                              activation_checkpointing=True,
                              activation_checkpointing_kwargs={"use_reentrant": False}, logging_steps=1,
                              save_strategy="no", report_to="none", remove_unused_columns=False, disable_tqdm=True)
    return counting, Trainer(model=model, args=targs, train_dataset=ds, data_collator=counting)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.check:
        p = plan(args)
        print(json.dumps(p["info"], indent=2))
        print("check only: no GPU work done")
        return
    import torch

    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU (use --check for a CPU dry run)")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sftdata-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.mode != "both":
        result = run_mode(args, args.mode, work)
        print("RESULT " + json.dumps(result), flush=True)
        return
    results = []
    for mode in ("sftdata", "hf-padded"):
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--mode", mode,
               "--workdir", str(work)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
            sys.exit(f"mode {mode} failed")
        results.append(json.loads(line[-1][7:]))
    a, b = results
    print(f"\n{a['preset']} ({a['params'] / 1e9:.2f}B params), QLoRA r={args.lora_r}, seq {args.seq_len}, "
          f"{a['device']}")
    print(f"{'':26}{'sftdata packed':>18}{'HF padded':>14}{'ratio':>9}")
    for key, label in (("peak_gpu_GiB", "peak GPU memory (GiB)"), ("tokens_per_s", "real tokens/s"),
                       ("trained_tokens_per_s", "trained tokens/s"), ("padding_share", "padding share")):
        ratio = f"{a[key] / b[key]:.2f}x" if b[key] else "-"
        print(f"{label:26}{a[key]:>18}{b[key]:>14}{ratio:>9}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
