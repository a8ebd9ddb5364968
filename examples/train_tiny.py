"""End to end on a laptop CPU: build → train (QLoRA) → generate with the saved template → merge.

    python examples/train_tiny.py [--workdir /tmp/sftdata-tiny] [--steps 10]

1. `sftdata build` packs the shipped example data (examples/data/*.jsonl) with the Llama-2 `[INST]` template and
   its bundled Mistral-7B tokenizer.
2. A tiny Llama-architecture model (2 layers, hidden size 64, random weights) is created from a config next to
   a copy of that tokenizer — a stand-in for a real checkpoint, so this runs offline in about a minute.
3. `sftdata train` fine-tunes it with QLoRA (NF4 base + LoRA adapters) for a few steps.
4. The saved adapter directory is loaded the way a server would load it: its tokenizer's chat template is the
   build's template, so the prompt is rendered exactly as in training; greedy generation stops at the
   template's end-of-turn token (generation_config.json).
5. `sftdata merge` exports a plain merged model; its greedy output equals the adapter model's.

A random 2-layer model produces gibberish: the point is the pipeline, not the text.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def sftdata(*args: str) -> None:
    cmd = [sys.executable, "-m", "sftdata.cli", *args]
    print("$ sftdata", " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/sftdata-tiny")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data, model_dir, adapter, merged = work / "data", work / "model", work / "adapter", work / "merged"

    # 1. build
    sftdata("build", str(HERE / "data" / "chat.jsonl"), str(HERE / "data" / "alpaca.jsonl"), "--template", "llama2",
            "--max-length", "512", "--pack", "--eval-fraction", "0.1", "-o", str(data), "-q")

    # 2. a tiny model next to the exact tokenizer the data was built with
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sftdata.tokenizer import bundled_tokenizer_path

    tok_dir = bundled_tokenizer_path("mistral-7b-v0.1")
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(str(model_dir))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tok_dir / name, model_dir / name)

    # 3. train (QLoRA; bitsandbytes runs NF4 and the 8-bit optimizer on CPU too)
    sftdata("train", str(data), "--model", str(model_dir), "-o", str(adapter), "--max-steps", str(args.steps),
            "--batch-size", "2", "--grad-accum", "1", "--lr", "5e-3", "--eval-steps", str(max(args.steps // 2, 1)))

    # 4. generate with the saved template, as a server would
    from sftdata.train import load_adapter_model

    served_tok = AutoTokenizer.from_pretrained(str(adapter))
    messages = [{"role": "user", "content": "Write a Python function that reverses a string."}]
    prompt = served_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    print(f"prompt rendered with the build's template: {prompt!r}")
    ids = served_tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    model = load_adapter_model(adapter).eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=24, do_sample=False)
    print("adapter model says:", repr(served_tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))

    # 5. merge (dequantize first, then merge) and check the merged model generates the same tokens
    sftdata("merge", str(adapter), "-o", str(merged))
    from transformers import AutoModelForCausalLM

    merged_model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    with torch.no_grad():
        out2 = merged_model.generate(input_ids=ids, max_new_tokens=24, do_sample=False)
        gap = (model(input_ids=ids).logits - merged_model(input_ids=ids).logits).abs().max().item()
    same = torch.equal(out, out2)
    print(f"merged model: same greedy tokens = {same}, max |logit difference| = {gap:.2e}")
    if not same or gap > 1e-4:
        sys.exit("the merged model does not match the adapter model")


if __name__ == "__main__":
    main()
