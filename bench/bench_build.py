"""Build throughput as a fraction of the physical ceiling, side by side in one run.

* ceiling  — the same rendered texts batch-tokenized in one call by the same fast tokenizer (no masks, no checks);
* sftdata  — `Encoder.encode_batch`: render every prefix, tokenize, exact masks, the I2 token-prefix check and the
             I4 decode check, for the same records;
* build    — `sftdata.build()` end to end (read files, hash inputs, encode, write Parquet + manifest);
* TRL      — `SFTTrainer._prepare_dataset` on the same conversations (chat template + tokenize, no masks).

Peak RSS of a streaming build is measured in a child process for growing inputs.

    python bench/bench_build.py                   # qwen3 + chatml on the real corpora in ../shared/data
    python bench/bench_build.py --tokenizer ../shared/tokenizers/mistral-7b-v0.1 --template llama2
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
SHARED = REPO.parent / "shared"
CORPORA = [("codealpaca.json", None), ("gpteacher_codegen.json", None), ("gpteacher_roleplay.json", None),
           ("gpteacher_toolformer.json", None), ("sharegpt_dummy.json", None),
           ("gsm8k_train.jsonl", "instruction=question,output=answer")]


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def trl_prepare(records, tok) -> float | None:
    """Seconds for TRL's own preparation of the same conversations, or None if this TRL cannot be driven so."""
    try:
        import datasets
        from trl import SFTConfig, SFTTrainer
        from types import SimpleNamespace
    except ImportError:
        return None
    ds = datasets.Dataset.from_list([{"messages": r.messages_as_dicts()} for r in records])
    try:
        args = SFTConfig(output_dir=tempfile.mkdtemp(), dataset_num_proc=None, report_to=[], use_cpu=True, bf16=False)
    except Exception as e:
        print(f"  TRL config could not be made: {type(e).__name__}: {e}")
        return None
    fake = SimpleNamespace(_tokenizer=tok, chat_template=None, completion_only_loss=False)
    datasets.disable_caching()
    datasets.disable_progress_bars()
    try:
        return best_of(lambda: SFTTrainer._prepare_dataset(fake, ds, tok, args, False, None, "train"), 1)
    except Exception as e:  # private API: report instead of failing the whole benchmark
        print(f"  TRL preparation could not be run: {type(e).__name__}: {e}")
        return None


def peak_rss_of_build(inputs: list[str], template: str, tokenizer: str | None) -> float:
    """Peak RSS (MiB) of a fresh process that runs one build."""
    code = (
        "import resource, sys, tempfile\n"
        "from sftdata.build import build\n"
        f"build({inputs!r}, template={template!r}, tokenizer={tokenizer!r}, output=tempfile.mkdtemp() + '/o', "
        "columns='instruction=question,output=answer')\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "qwen3"))
    parser.add_argument("--template", default="chatml")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-trl", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()

    from sftdata.build import build
    from sftdata.ingest import read_records
    from sftdata.render import Encoder
    from sftdata.templates import load_template
    from sftdata.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    template = load_template(args.template, tok)
    encoder = Encoder(template, tok)
    paths = [str(SHARED / "data" / name) for name, _ in CORPORA]
    records = [r for p, (_, cols) in zip(paths, CORPORA) for b in read_records([p], columns=cols) for r in b]
    texts = [template.render(r.messages_as_dicts()) for r in records]
    backend = tok.backend_tokenizer
    n_tokens = sum(len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False))
    print(f"{len(records):,} conversations, {n_tokens:,} tokens ({args.template} on {Path(args.tokenizer).name}), "
          f"{os.cpu_count()} cores")

    ceiling = best_of(lambda: backend.encode_batch(texts, add_special_tokens=False), args.repeat)

    def encode_all():
        for i in range(0, len(records), 1000):
            encoder.encode_batch(records[i:i + 1000])

    encode = best_of(encode_all, args.repeat)
    def build_with(workers: int) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            return best_of(lambda: build(paths, template=args.template, tokenizer=args.tokenizer, output=f"{tmp}/o",
                                         columns="instruction=question,output=answer", force=True, workers=workers), 1)

    end_to_end = build_with(1)
    end_to_end_pool = build_with(os.cpu_count() or 2)
    trl = None if args.no_trl else trl_prepare(records, tok)

    rows = [("ceiling: batch tokenizer on rendered texts", ceiling),
            ("sftdata encoder (render + tokenize + exact masks + I2 + I4)", encode),
            ("sftdata build end to end, in-process", end_to_end),
            (f"sftdata build end to end, --workers {os.cpu_count()}", end_to_end_pool)]
    if trl is not None:
        rows.append(("TRL SFTTrainer._prepare_dataset (no masks)", trl))
    print(f"{'':62} {'seconds':>8} {'tokens/s':>11} {'x ceiling':>9}")
    for name, seconds in rows:
        print(f"{name:62} {seconds:8.2f} {n_tokens / seconds:11,.0f} {ceiling / seconds:9.2f}")

    if not args.no_memory:
        print("\npeak RSS of a streaming build (fresh process each):")
        base = [p for p in paths if p.endswith("gsm8k_train.jsonl")]
        with tempfile.TemporaryDirectory() as tmp:
            big = Path(tmp) / "gsm8k_x.jsonl"
            lines = Path(base[0]).read_bytes()
            for copies in (1, 4, 16):
                big.write_bytes(lines * copies)
                rss = peak_rss_of_build([str(big)], args.template, args.tokenizer)
                print(f"  input {big.stat().st_size / 2**20:7.1f} MiB ({7473 * copies:,} rows): peak RSS {rss:7.1f} MiB")
    print(json.dumps({"ceiling_s": ceiling, "encode_s": encode, "build_s": end_to_end, "trl_s": trl,
                      "encode_x_ceiling": ceiling / encode, "build_x_ceiling": ceiling / end_to_end,
                      "build_pool_x_ceiling": ceiling / end_to_end_pool,
                      "trl_x_ceiling": (ceiling / trl) if trl else None}))


if __name__ == "__main__":
    main()
