"""Padding-free micro-batches: ``[B, L]`` rows with per-row position_ids vs the same rows flattened to ``[1, B·L]``.

    python bench/bench_padding_free.py                     # 4 × 1024 vs 1 × 4096, CPU, SDPA
    python bench/bench_padding_free.py --rows 2 --seq-len 512 --repeats 3

Both forms hold the same packed examples and are exactly as leak-free (each example attends only to itself), so
the logits must be equal; the bench checks that, then times forward + backward of each form, interleaved, on a
small random Llama (SDPA attention). The flattened form is what ``DataCollatorWithFlattening`` and TRL's
padding-free mode build: with SDPA its attention mask and work grow with ``(B·L)²`` instead of ``B·L²``.
Ratios from one run are the figures to quote (absolute times on a shared machine are noise).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def packed_rows(rows: int, seq_len: int, vocab: int, seed: int = 0) -> list[dict]:
    """``rows`` rows of exactly ``seq_len`` tokens, each holding random examples of 64..512 tokens."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(rows):
        lengths = []
        while sum(lengths) < seq_len:
            lengths.append(int(min(rng.integers(64, 513), seq_len - sum(lengths))))
        ids = rng.integers(3, vocab, seq_len).tolist()
        out.append({"input_ids": ids, "labels": ids, "seq_lengths": lengths,
                    "position_ids": [p for n in lengths for p in range(n)]})
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads [default: torch's]")
    args = ap.parse_args(argv)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftdata.train import SFTDataCollator

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3, num_hidden_layers=args.layers,
                         num_attention_heads=max(args.hidden // 64, 1), num_key_value_heads=max(args.hidden // 128, 1),
                         vocab_size=args.vocab, max_position_embeddings=args.seq_len * args.rows,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).train()
    model.config.use_cache = False
    rows = packed_rows(args.rows, args.seq_len, args.vocab)
    batches = {"rows [B, L]": SFTDataCollator()(rows), "flattened [1, B·L]": SFTDataCollator(flatten=True)(rows)}

    with torch.no_grad():
        a = model(**{k: v for k, v in batches["rows [B, L]"].items() if k != "labels"}).logits
        b = model(**{k: v for k, v in batches["flattened [1, B·L]"].items() if k != "labels"}).logits
    max_diff = (a.reshape(-1, a.shape[-1]) - b.reshape(-1, b.shape[-1])).abs().max().item()
    assert max_diff < 1e-4, f"logits differ by {max_diff}"

    def step(batch):
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        model(**batch).loss.backward()
        return time.perf_counter() - t

    for batch in batches.values():  # warm-up
        step(batch)
    times: dict[str, list[float]] = {name: [] for name in batches}
    for _ in range(args.repeats):
        for name, batch in batches.items():
            times[name].append(step(batch))
    medians = {name: statistics.median(t) for name, t in times.items()}
    ratio = medians["flattened [1, B·L]"] / medians["rows [B, L]"]
    print(f"{args.rows} × {args.seq_len} tokens, hidden {args.hidden}, {args.layers} layers, SDPA, "
          f"{torch.get_num_threads()} threads; logits equal (max |diff| {max_diff:.1e})")
    for name, median in medians.items():
        print(f"  {name:20} forward+backward median {median * 1000:8.1f} ms over {args.repeats}")
    print(f"  flattened / rows: {ratio:.2f}x")
    return {"medians_s": medians, "ratio": ratio, "max_logit_diff": max_diff}


if __name__ == "__main__":
    main()
