"""`sftdata memory` against the trainer's measured peak on CPU, side by side in one run.

    python bench/bench_memory.py            # QLoRA / LoRA / full, with and without gradient checkpointing
    python bench/bench_memory.py --quick    # the two QLoRA rows only (what tests/test_memory.py runs)

A small random Llama (hidden 256, 4 layers, MLP 688, the Mistral-7B tokenizer's 32,000-token vocabulary; ``--tiny``:
the test fixtures' 306-token tokenizer with an 8,000-entry embedding, what tests/test_memory.py runs) trains for
three steps through ``sftdata.train.prepare_trainer`` on packed rows of random tokens. The measured peak is
the bytes of the parameters and optimizer states (counted from the tensors) plus the growth of the process's
resident memory over steps 2-3 (``VmHWM`` after ``/proc/self/clear_refs`` reset at the end of step 1, minus the
resident memory then). Each measurement runs in a fresh process with ``MALLOC_MMAP_THRESHOLD_=65536``, so glibc
serves tensors from ``mmap`` and gives freed ones back at once: resident memory then tracks live tensors instead
of the allocator's high-water mark. The estimate is ``sftdata.memory.estimate`` for the same architecture and
micro-batch (fp32 compute, CPU). Linux only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

ARCH = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
CASES = {  # name: TrainConfig overrides
    "qlora": dict(method="qlora", gradient_checkpointing=False),
    "qlora+ckpt": dict(method="qlora", gradient_checkpointing=True),
    "lora": dict(method="lora", gradient_checkpointing=False),
    "lora+ckpt": dict(method="lora", gradient_checkpointing=True),
    "full": dict(method="full", gradient_checkpointing=False, optim="adamw_torch"),
}
QUICK = ("qlora", "qlora+ckpt")


def _status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def prepare_inputs(work: Path, rows: int, seq_len: int, tiny: bool = False) -> tuple[Path, Path]:
    """A small random model and packed rows of two random examples each."""
    import numpy as np
    import torch
    import train_fixtures as tf
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if tiny:
        tok = AutoTokenizer.from_pretrained(str(REPO / "fixtures" / "tiny-tokenizer"))
        vocab = 8000
    else:
        tok = tf.load_tokenizer("mistral-7b-v0.1")
        vocab = len(tok)
    model_dir = work / f"model-{vocab}"
    if not (model_dir / "config.json").is_file():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**ARCH, vocab_size=vocab, max_position_embeddings=4096)) \
            .save_pretrained(str(model_dir))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (model_dir / name).write_bytes((Path(tok.name_or_path) / name).read_bytes())
    rng = np.random.default_rng(0)
    half = seq_len // 2
    examples = []
    for _ in range(rows * 4 * 2):
        ids = rng.integers(10, len(tok), half).tolist()
        examples.append((ids, [-100] * (half // 4) + ids[half // 4:]))
    data = tf.write_output_dir(work / f"data-{rows}x{seq_len}", tok, examples, pack=2)
    return model_dir, data


def measure(case: str, work: Path, rows: int, seq_len: int, tiny: bool = False) -> dict:
    """Train three steps of ``case`` in this process and return the measured and estimated peaks (bytes)."""
    import ctypes

    import torch
    from transformers import TrainerCallback

    from sftdata.memory import Architecture, Workload, estimate
    from sftdata.train import prepare_trainer

    model_dir, data = prepare_inputs(work, rows, seq_len, tiny)
    overrides = dict(CASES[case])
    p = prepare_trainer(data, model_dir, work / f"out-{case}", progress=False, max_steps=3, batch_size=rows,
                        grad_accum=1, save_steps=10**6, **overrides)
    marks: dict[str, int] = {}

    class Mark(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            if state.global_step != 1:
                return
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            marks["params"] = sum(t.numel() * t.element_size() for t in model.parameters())
            marks["optimizer"] = sum(v.numel() * v.element_size() for s in optimizer.state.values()
                                     for v in s.values() if torch.is_tensor(v))
            marks["rss"] = _status("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS

    p.trainer.add_callback(Mark())
    p.trainer.train()
    growth = _status("VmHWM") - marks["rss"]
    measured = marks["params"] + marks["optimizer"] + growth
    cfg = p.config
    arch = Architecture.from_config(model_dir)
    est = estimate(arch, cfg.method, Workload(batch_size=rows, seq_len=seq_len, compute="fp32", device="cpu",
                                              gradient_checkpointing=cfg.gradient_checkpointing, packed=True),
                   lora_r=cfg.lora_r, target_modules=cfg.target_modules, lora_dropout=cfg.lora_dropout,
                   optim=cfg.optim, double_quant=cfg.double_quant)
    result = {"case": case, "rows": rows, "seq_len": seq_len, "vocab": arch.vocab_size,
              "measured_MiB": round(measured / 2**20, 1),
            "estimated_MiB": round(est.peak_bytes / 2**20, 1), "ratio": round(est.peak_bytes / measured, 3),
            "measured_static_MiB": round((marks["params"] + marks["optimizer"]) / 2**20, 1),
            "estimated_static_MiB": round((est.weights_bytes + est.adapter_bytes + est.optimizer_bytes) / 2**20, 1),
            "peak_phase": est.peak_phase}
    del p  # the next case in this process starts from freed memory
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return result


def run_all(cases, rows: int, seq_len: int, work: Path, *, tiny: bool = False, one_process: bool = False) -> list[dict]:
    """Each case in its own process (a fresh allocator), or all in one (``one_process``: faster, for the test)."""
    # one thread: the peak does not depend on it, and on a shared 2-core machine OpenMP's spinning threads
    # make tiny matrix products 10-20x slower
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    results = []
    for group in ([list(cases)] if one_process else [[c] for c in cases]):
        cmd = [sys.executable, __file__, "--child", ",".join(group), "--rows", str(rows), "--seq-len", str(seq_len),
               "--workdir", str(work)] + (["--tiny"] if tiny else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or len(lines) != len(group):
            raise RuntimeError(f"{group} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        results += [json.loads(line[7:]) for line in lines]
    return results


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2, help="rows per micro-batch")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--tiny", action="store_true", help="306-token tokenizer, 8,000-entry embedding (faster)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        import warnings

        warnings.filterwarnings("ignore")
        for case in args.child.split(","):
            print("RESULT " + json.dumps(measure(case, Path(args.workdir), args.rows, args.seq_len, args.tiny)),
                  flush=True)
        return []
    with tempfile.TemporaryDirectory(prefix="sftdata-bench-memory-") as tmp:
        work = Path(args.workdir or tmp)
        results = run_all(QUICK if args.quick else list(CASES), args.rows, args.seq_len, work, tiny=args.tiny)
    if args.json:
        print(json.dumps(results, indent=2))
        return results
    print(f"{'case':12}{'measured MiB':>14}{'sftdata memory':>16}{'ratio':>8}   peak at")
    for r in results:
        print(f"{r['case']:12}{r['measured_MiB']:>14}{r['estimated_MiB']:>16}{r['ratio']:>8.3f}   {r['peak_phase']}")
    return results


if __name__ == "__main__":
    main()
