"""Packing benchmark: fill ratio of sftdata's whole-split BFD vs TRL's BFD on the same lengths, and packing speed.

    python bench/bench_pack.py [--shared /work/shared] [--tokenizer qwen3] [--synthetic 1000000]

Lengths come from the real corpora in ``shared/data`` (CodeAlpaca, GPTeacher codegen/roleplay/toolformer, GSM8K,
ShareGPT), rendered as ChatML and tokenized with the real tokenizer (the simple rendering is enough for lengths).
TRL's ``pack_dataset(..., strategy="bfd")`` runs on a ``datasets.Dataset`` of the same lengths with its default
``map`` batches (1000 rows). Both sides run in this one process; the ratios are the figures to quote.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sftdata.pack import bfd_arrays, pack_examples  # noqa: E402

DEFAULT_SHARED = ROOT.parent / "shared"


def chatml(turns: list[tuple[str, str]]) -> str:
    return "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in turns)


def alpaca_turns(item: dict) -> list[tuple[str, str]]:
    user = item["instruction"] + ("\n\n" + item["input"] if item.get("input") else "")
    return [("user", user), ("assistant", item.get("output") or item.get("response") or "")]


def corpus_texts(shared: Path) -> dict[str, list[str]]:
    data = shared / "data"
    out: dict[str, list[str]] = {}
    for name in ("codealpaca", "gpteacher_codegen", "gpteacher_roleplay", "gpteacher_toolformer"):
        out[name] = [chatml(alpaca_turns(x)) for x in json.loads((data / f"{name}.json").read_text())]
    out["gsm8k"] = [chatml([("user", x["question"]), ("assistant", x["answer"])])
                    for x in map(json.loads, (data / "gsm8k_train.jsonl").read_text().splitlines())]
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    out["sharegpt"] = [chatml([(roles.get(t["from"], t["from"]), t["value"]) for t in conv["conversations"]])
                       for conv in json.loads((data / "sharegpt_dummy.json").read_text())]
    return out


def corpus_lengths(shared: Path, tokenizer: str = "qwen3") -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(shared / "tokenizers" / tokenizer / "tokenizer.json"))
    return {name: np.array([len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)], dtype=np.int64)
            for name, texts in corpus_texts(shared).items()}


def sftdata_fill(lengths: np.ndarray, n: int) -> tuple[float, int, float]:
    t = time.perf_counter()
    _, offsets = bfd_arrays(lengths, n)
    seconds = time.perf_counter() - t
    rows = offsets.size - 1
    return float(lengths.sum() / (rows * n)), rows, seconds


def trl_fill(lengths: np.ndarray, n: int) -> tuple[float, int, float]:
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar
    from trl.data_utils import pack_dataset

    disable_progress_bar()
    ds = Dataset.from_dict({"input_ids": [[0] * int(x) for x in lengths]})
    t = time.perf_counter()
    packed = pack_dataset(ds, n, strategy="bfd")
    seconds = time.perf_counter() - t
    rows = len(packed)
    return float(lengths.sum() / (rows * n)), rows, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    parser.add_argument("--tokenizer", default="qwen3")
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048])
    parser.add_argument("--synthetic", type=int, default=1_000_000, help="synthetic example lengths to time packing")
    args = parser.parse_args()

    per_corpus = corpus_lengths(args.shared, args.tokenizer)
    print(f"corpora ({args.tokenizer} ChatML token lengths):")
    for name, x in per_corpus.items():
        print(f"  {name:22s} {x.size:6d} examples  median {int(np.median(x)):5d}  p99 {int(np.percentile(x, 99)):5d}"
              f"  max {int(x.max()):5d}")
    everything = np.concatenate(list(per_corpus.values()))
    cases = {"all corpora": everything, **per_corpus}

    print("\nfill ratio = real tokens / (rows x N); examples longer than N truncated to N on both sides")
    print("lower bound = ceil(tokens / N) rows; 'time x' = TRL pack_dataset seconds / sftdata best_fit_decreasing seconds")
    print(f"{'corpus':22s} {'N':>5s} {'sftdata':>8s} {'TRL bfd':>8s} {'rows':>7s} {'TRL rows':>8s} {'bound':>7s}"
          f" {'time x':>7s}")
    for n in args.lengths:
        for name, x in cases.items():
            x = np.minimum(x, n)
            ours, rows, t_ours = sftdata_fill(x, n)
            theirs, trl_rows, t_trl = trl_fill(x, n)
            bound = -(-int(x.sum()) // n)
            print(f"{name:22s} {n:5d} {ours:8.4f} {theirs:8.4f} {rows:7d} {trl_rows:8d} {bound:7d}"
                  f" {t_trl / max(t_ours, 1e-9):7.1f}")

    if args.synthetic:
        rng = np.random.default_rng(0)
        # resample the real distribution to the requested size
        synthetic = rng.choice(everything, size=args.synthetic, replace=True)
        for n in args.lengths:
            x = np.minimum(synthetic, n)
            ours, rows, seconds = sftdata_fill(x, n)
            print(f"\n{args.synthetic:,} lengths resampled from the corpora, N={n}: best_fit_decreasing "
                  f"{seconds:.2f} s, fill {ours:.5f}, {rows:,} rows (lower bound {-(-int(x.sum()) // n):,})")
        # the whole packing path as build runs it (Arrow columns in, packed Arrow rows out) on 200k examples
        import pyarrow as pa

        sub = np.minimum(synthetic[:200_000], 2048)
        offsets = np.concatenate(([0], np.cumsum(sub))).astype(np.int32)
        tokens = pa.array(np.full(int(sub.sum()), 7, np.int32))
        table = pa.table({"input_ids": pa.ListArray.from_arrays(pa.array(offsets), tokens),
                          "labels": pa.ListArray.from_arrays(pa.array(offsets), tokens)})
        t = time.perf_counter()
        _, stats = pack_examples(table, 2048, seed=0)
        print(f"pack_examples on {sub.size:,} examples / {int(sub.sum()):,} tokens (N=2048, Arrow in/out): "
              f"{time.perf_counter() - t:.2f} s, {stats['rows']:,} rows, fill {stats['fill_ratio']:.5f}")

if __name__ == "__main__":
    main()
