"""QLoRA on a real-size model: sftdata's trainer against the four set-ups people use, side by side on one GPU.

    bash bench/prepare_gpu_bench.sh        # once, on a machine with PyPI: wheels + tokenizer into bench/offline/
    python bench/bench_qlora_gpu.py --preset 8b --out results/      # on the GPU (see docs/training.md)
    python bench/bench_qlora_gpu.py --check                         # CPU: the plan and the memory estimate only
    python bench/bench_qlora_gpu.py --preset tiny --device cpu      # CPU smoke run of every mode (tiny model)

The model has random weights built from a Llama config (``--preset 8b``: Llama-3.1-8B's shapes with the real
128,256-token vocabulary of ``--tokenizer``; no download): speed and memory do not depend on the values. Every mode
loads it the same way (NF4 + double quantization, bf16 compute, ``prepare_model_for_kbit_training``), puts LoRA
r=16, alpha 32, dropout 0.05 on every linear layer, uses non-reentrant gradient checkpointing, paged 8-bit AdamW,
lr 2e-4, max grad norm 0.3, SDPA attention, and trains on the *same* synthetic examples (log-normal lengths, the
first 40% of each masked):

* ``hf-padded``        — ``transformers.Trainer`` + peft, one example per row, right-padded per batch with an
  ``attention_mask`` (``DataCollatorForSeq2Seq``), random order;
* ``hf-grouped``       — the same with ``group_by_length`` (batches of similar lengths, less padding);
* ``hf-flattening``    — ``Trainer`` + ``DataCollatorWithFlattening``: each micro-batch concatenated into one row
  with ``position_ids`` (padding-free, ``[1, N]``);
* ``trl-padding-free`` — TRL ``SFTTrainer`` with ``padding_free=True`` (also ``[1, N]``);
* ``sftdata``          — the examples packed (best-fit decreasing) into rows of ``--seq-len`` and trained through
  ``sftdata.train.prepare_trainer`` (``[B, L]`` rows, per-row ``position_ids``).

The baselines get as many examples per micro-batch as a packed micro-batch holds on average, so every mode sees
about the same number of real tokens per step. Each mode runs in its own process (peak memory is per process)
and its JSON is written to ``--out`` as soon as it finishes: peak allocated and reserved GPU memory
(``torch.cuda.max_memory_*``; paged optimizer states live in CUDA unified memory outside these), real tokens/s and
trained tokens/s between the end of the last untimed step and the end of the last step, the padding share, and
the loss on identical examples before the first update (the probe: the examples of the first packed
micro-batch, collated by each mode's own collator; the model is the base model then, LoRA B = 0, so every mode
must give the same value). ``--budget-s`` bounds the whole run: a mode that cannot finish in the time left is
stopped and reported as such, and the others still report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# run order: the quick modes first, so that the time they leave unused rolls over to the padded baselines
MODES = ("sftdata", "hf-flattening", "trl-padding-free", "hf-grouped", "hf-padded")
PRESETS = {  # Meta's published shapes; vocab_size comes from the tokenizer
    "tiny": dict(name="tiny-llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "1b": dict(name="Llama-3.2-1B", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0),
    "3b": dict(name="Llama-3.2-3B", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
               num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0),
    "8b": dict(name="Llama-3.1-8B", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False, rope_theta=500000.0),
}
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05)
LR, MAX_GRAD_NORM, OPTIM = 2e-4, 0.3, "paged_adamw_8bit"


def default_tokenizer() -> str:
    for candidate in (REPO / "bench" / "offline" / "llama3_1", REPO.parent / "shared" / "tokenizers" / "llama3_1"):
        if (candidate / "tokenizer.json").is_file():
            return str(candidate)
    return str(REPO.parent / "shared" / "tokenizers" / "llama3_1")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="8b")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory [default: bench/offline/llama3_1, else "
                                                      "../shared/tokenizers/llama3_1]")
    ap.add_argument("--seq-len", type=int, default=2048, help="packed row length")
    ap.add_argument("--rows", type=int, default=4, help="packed rows per micro-batch (sftdata mode)")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per mode")
    ap.add_argument("--warmup-steps", type=int, default=2, help="steps before the timed window")
    ap.add_argument("--median-len", type=int, default=350, help="median example length (log-normal)")
    ap.add_argument("--prompt-share", type=float, default=0.4, help="share of each example masked with -100")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ", ".join(MODES))
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--budget-s", type=float, default=450, help="wall-clock budget for the whole run")
    ap.add_argument("--workdir", default=None, help="where the random model and data go (default: a temp dir)")
    ap.add_argument("--out", default=None, help="directory for <mode>.json and summary.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="CPU-only: the plan and the memory estimate, no model")
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)  # internal: run one mode in this process
    return ap.parse_args(argv)


# ---------------------------------------------------------------------------------------------------- plan


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


def plan(args) -> dict:
    """Tokenizer, examples, packed rows and the per-mode batch sizes (identical in every process: seeded)."""
    from transformers import AutoTokenizer, LlamaConfig

    from sftdata.pack import best_fit_decreasing

    tok_path = args.tokenizer or default_tokenizer()
    tok = AutoTokenizer.from_pretrained(tok_path)
    vocab = len(tok)
    preset = {k: v for k, v in PRESETS[args.preset].items() if k != "name"}
    config = LlamaConfig(**preset, vocab_size=vocab, max_position_embeddings=max(args.seq_len, 8192),
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    per_step = args.rows * args.seq_len * args.grad_accum
    examples = make_examples(int(per_step * (args.steps + 2) * 1.15), vocab, args)
    groups = best_fit_decreasing([len(i) for i, _ in examples], args.seq_len)
    rows = [[examples[k] for k in g] for g in groups]
    fill = sum(len(i) for r in rows for i, _ in r) / (len(rows) * args.seq_len)
    examples_per_batch = max(1, round(sum(len(r) for r in rows) / len(rows) * args.rows))
    ordered = [e for r in rows for e in r]  # the same examples, in packing order
    probe = [e for r in rows[:args.rows] for e in r]
    info = {
        "preset": PRESETS[args.preset]["name"], "vocab": vocab, "seq_len": args.seq_len, "rows": args.rows,
        "grad_accum": args.grad_accum, "steps": args.steps, "warmup_steps": args.warmup_steps,
        "examples": len(examples), "mean_example_len": round(sum(len(i) for i, _ in examples) / len(examples), 1),
        "packed_rows": len(rows), "pack_fill": round(fill, 4), "examples_per_batch_baselines": examples_per_batch,
        "probe_examples": len(probe),
    }
    return {"info": info, "tok": tok, "tok_path": tok_path, "config": config, "rows": rows, "examples": ordered,
            "probe": probe}


def memory_estimate(p: dict, args, device: str) -> dict:
    from sftdata.memory import Architecture, Workload, estimate

    arch = Architecture.from_config(p["config"].to_dict())
    est = estimate(arch, "qlora", Workload(batch_size=args.rows, seq_len=args.seq_len,
                                           compute="bf16" if device == "cuda" else "fp32", device=device),
                   lora_r=LORA["r"], lora_dropout=LORA["lora_dropout"], optim=OPTIM)
    return {"params": arch.total_params(), "lora_params": arch.lora_params(LORA["r"]),
            "estimate_peak_GiB": round(est.peak_bytes / 2**30, 3),
            "estimate_static_GiB": round(est.static_bytes / 2**30, 3), "estimate_phase": est.peak_phase}


# ---------------------------------------------------------------------------------------------------- model


def build_model(p: dict, model_dir: Path, device: str, seed: int) -> None:
    """Random-init weights from the config, saved in bf16 (fp32 on CPU) with the tokenizer files."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):  # random init on the GPU: seconds for 8B (fp32 there first, 32 GB)
        model = LlamaForCausalLM(p["config"])
    model.to(torch.bfloat16 if device == "cuda" else torch.float32).save_pretrained(str(model_dir))
    del model
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        src = Path(p["tok_path"]) / name
        if src.is_file():
            (model_dir / name).write_bytes(src.read_bytes())
    if device == "cuda":
        torch.cuda.empty_cache()


def load_qlora_model(model_dir: Path, device: str):
    """What every baseline does: NF4 + double quant, k-bit preparation, LoRA on every linear layer."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=torch.uint8)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=q, dtype=dtype,
                                                 device_map={"": 0 if device == "cuda" else "cpu"},
                                                 attn_implementation="sdpa")
    model.config.use_cache = False
    if device == "cpu":  # CPU smoke runs only: keep bitsandbytes from repacking weights into a no-autograd layout
        from sftdata.train import disable_cpu_4bit_repacking

        disable_cpu_4bit_repacking(model)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(**LORA, target_modules="all-linear", bias="none", task_type="CAUSAL_LM"))
    model.enable_input_require_grads()
    return model


def training_arguments(args, out_dir: Path, device: str, batch_size: int, *, cls=None, **extra):
    """``TrainingArguments`` (or ``cls``, e.g. TRL's ``SFTConfig``) for the baselines, keeping only the fields this
    transformers version has."""
    if cls is None:
        from transformers import TrainingArguments as cls

    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = dict(output_dir=str(out_dir), per_device_train_batch_size=batch_size,
                  gradient_accumulation_steps=args.grad_accum, max_steps=args.steps, learning_rate=LR,
                  lr_scheduler_type="cosine", warmup_steps=0.03, max_grad_norm=MAX_GRAD_NORM, optim=OPTIM,
                  bf16=device == "cuda", use_cpu=device == "cpu", logging_steps=1, save_strategy="no",
                  report_to="none", remove_unused_columns=False, disable_tqdm=True, seed=args.seed,
                  dataloader_num_workers=0)
    # transformers 5 renamed gradient_checkpointing (older 5.x releases have only the old name)
    ckpt = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    kwargs[ckpt], kwargs[ckpt + "_kwargs"] = True, {"use_reentrant": False}
    if extra.pop("group_by_length", False):
        if "group_by_length" in fields:
            kwargs["group_by_length"] = True
        else:
            kwargs["train_sampling_strategy"] = "group_by_length"
    kwargs.update(extra)
    return cls(**{k: v for k, v in kwargs.items() if k in fields})


# ---------------------------------------------------------------------------------------------------- modes


class Meter:
    """Counts real/trained tokens in each training micro-batch and takes a (synchronized) time at step ends."""

    def __init__(self, device: str):
        self.device = device
        self.real = self.trained = self.slots = 0
        self.marks: list[tuple[float, int, int, int]] = []  # (time, real, trained, slots) at each step end

    def count(self, inputs) -> None:
        labels = inputs["labels"]
        self.slots += labels.numel()
        if "sftdata_num_tokens" in inputs:
            self.real += int(inputs["sftdata_num_tokens"])
        elif "attention_mask" in inputs:
            self.real += int(inputs["attention_mask"].sum())
        else:
            self.real += labels.numel()
        self.trained += int((labels[..., 1:] != -100).sum())

    def callback(self):
        import torch
        from transformers import TrainerCallback

        meter = self

        class StepEnd(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if meter.device == "cuda":
                    torch.cuda.synchronize()
                meter.marks.append((time.perf_counter(), meter.real, meter.trained, meter.slots))

        return StepEnd()


def instrument(trainer, meter: Meter) -> None:
    """Make ``trainer`` count the tokens of every training micro-batch it computes a loss on."""
    base = type(trainer)

    class Counting(base):
        def compute_loss(self, model, inputs, *a, **kw):
            if model.training:
                meter.count(inputs)
            return super().compute_loss(model, inputs, *a, **kw)

    trainer.__class__ = Counting
    trainer.add_callback(meter.callback())


def probe_loss(model, batches, device: str) -> float:
    """Token-weighted loss of the model on collated batches (no update)."""
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        for batch in batches:
            batch = {k: v.to(model.device) for k, v in batch.items()
                     if k in ("input_ids", "labels", "attention_mask", "position_ids")}
            labels = batch.pop("labels")
            logits = model(**batch, use_cache=False).logits.float()
            shifted = labels[..., 1:].reshape(-1)
            total += torch.nn.functional.cross_entropy(logits[..., :-1, :].reshape(-1, logits.shape[-1]), shifted,
                                                       ignore_index=-100, reduction="sum").item()
            count += int((shifted != -100).sum())
    model.train()
    return total / count


def _chunks(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


def write_sftdata_dir(path: Path, rows, tok) -> None:
    """An sftdata output directory (manifest + one packed Parquet shard) holding ``rows``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sftdata.train import tokenizer_fingerprint

    path.mkdir(parents=True, exist_ok=True)
    cols = {
        "input_ids": [[t for ids, _ in r for t in ids] for r in rows],
        "labels": [[t for _, lab in r for t in lab] for r in rows],
        "position_ids": [[q for ids, _ in r for q in range(len(ids))] for r in rows],
        "seq_lengths": [[len(ids) for ids, _ in r] for r in rows],
    }
    pq.write_table(pa.table({k: pa.array(v, pa.list_(pa.int32())) for k, v in cols.items()}),
                   path / "train-00000.parquet")
    manifest = {"format": "sftdata/1", "fingerprint": "bench", "template": {"name": "bench", "text": None},
                "tokenizer": {"name_or_path": tok.name_or_path, "sha256": tokenizer_fingerprint(tok),
                              "vocab_size": len(tok)},
                "splits": {"train": {"rows": len(rows), "files": ["train-00000.parquet"]}}}
    (path / "manifest.json").write_text(json.dumps(manifest))


def run_mode(args, mode: str, work: Path, device: str) -> dict:
    import torch

    p = plan(args)
    tok = p["tok"]
    per_batch = p["info"]["examples_per_batch_baselines"]
    feats = [{"input_ids": i, "labels": lab} for i, lab in p["examples"]]
    probe = [{"input_ids": i, "labels": lab} for i, lab in p["probe"]]
    model_dir = work / "model"
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    meter = Meter(device)
    out_dir = work / f"out-{mode}"
    if mode == "sftdata":
        from sftdata.train import prepare_trainer

        data = work / "data-sftdata"
        if not (data / "manifest.json").is_file():
            write_sftdata_dir(data, p["rows"], tok)
        prep = prepare_trainer(data, model_dir, out_dir, progress=False, max_steps=args.steps, batch_size=args.rows,
                               grad_accum=args.grad_accum, lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"],
                               lora_dropout=LORA["lora_dropout"], learning_rate=LR, max_grad_norm=MAX_GRAD_NORM,
                               optim=OPTIM, attn_implementation="sdpa", save_steps=10**9, save_total_limit=None,
                               logging_steps=1, seed=args.seed)
        trainer = prep.trainer
        collator = trainer.data_collator
        probe_batches = [collator(b) for b in _chunks([{"input_ids": r["input_ids"], "labels": r["labels"],
                                                        "position_ids": r["position_ids"]}
                                                       for r in _packed_probe(p)], args.rows)]
        model = trainer.model
    else:
        from transformers import Trainer

        if tok.pad_token_id is None:  # the baselines need one to pad (sftdata's [B, L] rows pad with 0)
            tok.pad_token = tok.eos_token
        model = load_qlora_model(model_dir, device)
        if mode in ("hf-padded", "hf-grouped"):
            from transformers import DataCollatorForSeq2Seq

            collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
            targs = training_arguments(args, out_dir, device, per_batch, group_by_length=mode == "hf-grouped")
            trainer = Trainer(model=model, args=targs, train_dataset=feats, data_collator=collator)
        elif mode == "hf-flattening":
            from transformers import DataCollatorWithFlattening

            collator = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
            targs = training_arguments(args, out_dir, device, per_batch)
            trainer = Trainer(model=model, args=targs, train_dataset=feats, data_collator=collator)
        elif mode == "trl-padding-free":
            import datasets
            from trl import SFTConfig, SFTTrainer

            cfg = training_arguments(args, out_dir, device, per_batch, cls=SFTConfig, padding_free=True,
                                     max_length=None, packing=False, dataset_kwargs={"skip_prepare_dataset": True})
            ds = datasets.Dataset.from_list(feats)
            trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
            collator = trainer.data_collator
            model = trainer.model
        else:
            raise SystemExit(f"unknown mode {mode}")
        probe_batches = [collator(b) for b in _chunks(probe, per_batch)]
    loss0 = probe_loss(model, probe_batches, device)
    instrument(trainer, meter)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    history = [h for h in trainer.state.log_history if "loss" in h]
    marks = meter.marks
    w = min(args.warmup_steps, len(marks) - 1)
    (t0, r0, tr0, s0), (t1, r1, tr1, s1) = marks[w - 1] if w > 0 else (start, 0, 0, 0), marks[-1]
    secs = t1 - t0
    result = {
        "mode": mode, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__, "steps": len(marks), "timed_steps": len(marks) - w, "timed_s": round(secs, 3),
        "tokens_per_s": round((r1 - r0) / secs, 1), "trained_tokens_per_s": round((tr1 - tr0) / secs, 1),
        "padding_share": round(1 - (r1 - r0) / max(s1 - s0, 1), 4), "train_wall_s": round(wall, 1),
        "probe_loss": round(loss0, 5), "step1_logged_loss": history[0]["loss"] if history else None,
        "batch": args.rows if mode == "sftdata" else per_batch,
    }
    if device == "cuda":
        result["peak_allocated_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        result["peak_reserved_GiB"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    else:
        import resource

        result["peak_rss_GiB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    return {**p["info"], **result}


def _packed_probe(p: dict) -> list[dict]:
    rows = p["rows"][:p["info"]["rows"]]
    return [{"input_ids": [t for ids, _ in r for t in ids], "labels": [t for _, lab in r for t in lab],
             "position_ids": [q for ids, _ in r for q in range(len(ids))]} for r in rows]


# ---------------------------------------------------------------------------------------------------- driver


def _device(args) -> str:
    import torch

    if args.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU here (use --check for a CPU dry run, or --preset tiny --device cpu)")
    return args.device


def _child_env() -> dict:
    path = os.pathsep.join(p for p in [os.environ.get("PYTHONPATH", ""), str(REPO)] if p)
    return {**os.environ, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.check:
        p = plan(args)
        print(json.dumps({**p["info"], **memory_estimate(p, args, "cuda")}, indent=2))
        print("check only: no model built, nothing trained")
        return []
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    from sftdata.train import quiet_library_loggers

    quiet_library_loggers()
    device = _device(args)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sftdata-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.mode:  # one mode, in this process
        result = run_mode(args, args.mode, work, device)
        print("RESULT " + json.dumps(result), flush=True)
        return [result]

    deadline = time.time() + args.budget_s
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    p = plan(args)
    header = {**p["info"], **memory_estimate(p, args, device)}
    print(json.dumps(header), flush=True)
    t = time.time()
    if not (work / "model" / "config.json").is_file():
        build_model(p, work / "model", device, args.seed)
    print(f"model built and saved in {time.time() - t:.0f} s", flush=True)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    results = []
    for i, mode in enumerate(modes):
        left = deadline - time.time()
        share = left / (len(modes) - i)  # an even share of what is left; unused time rolls over
        if share < 30:
            result = {"mode": mode, "error": f"skipped: {left:.0f} s of the budget left"}
        else:
            cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--mode", mode,
                   "--workdir", str(work), "--device", device]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(), timeout=share)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode or not lines:
                    tail = (proc.stderr or proc.stdout).strip().splitlines()[-12:]
                    result = {"mode": mode, "error": f"exit {proc.returncode}", "log_tail": tail}
                else:
                    result = json.loads(lines[-1][7:])
            except subprocess.TimeoutExpired:
                result = {"mode": mode, "error": f"stopped after {share:.0f} s (its share of --budget-s)"}
        results.append(result)
        print(json.dumps(result), flush=True)
        if out:
            (out / f"{mode}.json").write_text(json.dumps(result, indent=2))
    if out:
        (out / "summary.json").write_text(json.dumps({"plan": header, "results": results}, indent=2))
    print_table(header, results)
    return results


def print_table(header: dict, results: list[dict]) -> None:
    ok = [r for r in results if "error" not in r]
    print(f"\n{header['preset']} ({header['params'] / 1e9:.2f}B params, vocab {header['vocab']:,}), QLoRA r=16, "
          f"rows of {header['seq_len']}, {ok[0]['device'] if ok else '?'}; sftdata memory estimate "
          f"{header['estimate_peak_GiB']} GiB")
    base = next((r for r in ok if r["mode"] == "hf-padded"), None)
    memory_cols = ("peak_allocated_GiB", "peak_reserved_GiB") if any("peak_allocated_GiB" in r for r in ok) \
        else ("peak_rss_GiB",)
    cols = memory_cols + ("tokens_per_s", "trained_tokens_per_s", "padding_share", "probe_loss")
    print(f"{'mode':18}" + "".join(f"{c:>22}" for c in cols) + f"{'tokens/s vs hf-padded':>24}")
    for r in results:
        if "error" in r:
            print(f"{r['mode']:18}  {r['error']}")
            continue
        speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        print(f"{r['mode']:18}" + "".join(f"{str(r.get(c, '-')):>22}" for c in cols) + f"{speed:>24}")


if __name__ == "__main__":
    main()
