"""Build throughput as a fraction of the physical ceiling, side by side in one run.

* ceiling  — the same rendered texts batch-tokenized in one call by the same fast tokenizer (no masks, no checks);
* sftdata  — `Encoder.encode_batch`: render every prefix, tokenize, exact masks, the I2 token-prefix check and the
             I4 decode check, for the same records;
* build    — `sftdata.build()` end to end (read files, hash inputs, encode, write Parquet + manifest);
* TRL      — `SFTTrainer._prepare_dataset` on the same conversations (chat template + tokenize, no masks).

Peak RSS of a streaming build is measured in a child process for growing inputs.

Build throughput per corpus (`build()` in a fresh process per run, timed around the call only: interpreter start-up and
imports excluded (transformers too), tokenizer loading and the preflight included), rounds alternating between trees, median of the rounds:

* plain chat — the real Alpaca-like corpora (CodeAlpaca, GPTeacher codegen/roleplay/toolformer), ShareGPT multi-turn
  (FastChat's dummy conversations, repeated 10x) and GSM8K (a column map), under chatml and qwen3; with
  ``--baseline-tree`` the same builds also run on another checkout of sftdata (e.g. a ``git worktree`` of an older
  commit), which must read the same rows and write the same examples and tokens, and the ratio new/old is printed;
* tool calls — a generated, seeded agent corpus (``bench/corpora.py``: tools, single and parallel tool calls, tool
  results, reasoning, multi-turn) under qwen3, this tree only.

    python bench/bench_build.py                   # qwen3 + chatml on the real corpora in ../shared/data
    python bench/bench_build.py --tokenizer ../shared/tokenizers/mistral-7b-v0.1 --template llama2
    git worktree add --detach /tmp/oldtree c92ba78
    python bench/bench_build.py --baseline-tree /tmp/oldtree --no-ceiling   # plain chat: this tree vs c92ba78
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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


# (label, files under ../shared/data, column map, copies of the files' rows)
PLAIN_CHAT = [("alpaca-like (CodeAlpaca + GPTeacher x3)", ["codealpaca.json", "gpteacher_codegen.json",
                                                           "gpteacher_roleplay.json", "gpteacher_toolformer.json"], None, 1),
              ("ShareGPT multi-turn (FastChat dummy x10)", ["sharegpt_dummy.json"], None, 10),
              ("GSM8K train (column map)", ["gsm8k_train.jsonl"], "instruction=question,output=answer", 1)]

# Runs in a fresh interpreter whose PYTHONPATH is the tree under test (`python -P`: neither the working directory nor
# a script directory shadows it). Prints one JSON line.
_CHILD = r"""
import json, sys, time
spec = json.loads(sys.argv[1])
import sftdata
from sftdata.build import build
import transformers  # library import, the same for every tree: not timed (load_tokenizer would import it lazily)
transformers.AutoTokenizer
assert sftdata.__file__.startswith(spec["tree"]), (sftdata.__file__, spec["tree"])
options = dict(spec["options"])
try:
    from sftdata.recipe import Recipe  # trees with recipes shuffle by default: keep input order, as older trees write
    options["shuffle"] = False
except ImportError:
    pass
started, cpu_started = time.perf_counter(), time.process_time()
build(spec["inputs"], output=spec["output"], force=True, **options)
seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
manifest = json.load(open(spec["output"] + "/manifest.json"))
counts = manifest["counts"]
# rows read; examples written (older trees counted those as rows_kept)
print(json.dumps({"seconds": seconds, "cpu": cpu, "setup": manifest.get("seconds_setup"), "rows": counts["rows_read"],
                  "examples": counts.get("examples", counts["rows_kept"]), "tokens": manifest["tokens"]["total"]}))
"""


def timed_build(tree: str, inputs: list[str], options: dict, workdir: str) -> dict:
    """One build of ``inputs`` by the sftdata at ``tree``, in a fresh process; seconds of the ``build()`` call only."""
    output = tempfile.mkdtemp(dir=workdir)
    spec = {"tree": str(Path(tree).resolve()), "inputs": inputs, "output": output, "options": options}
    env = {**os.environ, "PYTHONPATH": spec["tree"]}
    done = subprocess.run([sys.executable, "-P", "-c", _CHILD, json.dumps(spec)], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"build with {tree} failed:\n{done.stderr[-3000:]}")
    subprocess.run(["rm", "-rf", output], check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare_trees(trees: list[tuple[str, str]], corpora: list[tuple[str, list[str], dict]], rounds: int) -> list[dict]:
    """Median over ``rounds`` of each corpus built by each tree; within a round the trees alternate."""
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for label, inputs, options in corpora:
            runs: dict[str, list[dict]] = {name: [] for name, _ in trees}
            for r in range(rounds):
                for name, tree in (trees if r % 2 == 0 else trees[::-1]):
                    runs[name].append(timed_build(tree, inputs, options, workdir))
            row = {"corpus": label, "template": options["template"]}
            for name, _ in trees:
                first = runs[name][0]
                if any((x["rows"], x["examples"], x["tokens"]) != (first["rows"], first["examples"], first["tokens"])
                       for x in runs[name]):
                    raise RuntimeError(f"{name} built different data across rounds on {label}")
                row[name] = {**first, "seconds": statistics.median(x["seconds"] for x in runs[name]),
                             "cpu": statistics.median(x["cpu"] for x in runs[name]),
                             "setup": statistics.median(x["setup"] for x in runs[name]),
                             "all_seconds": [round(x["seconds"], 3) for x in runs[name]],
                             "all_cpu": [round(x["cpu"], 3) for x in runs[name]]}
            if len(trees) == 2:
                new, old = row[trees[0][0]], row[trees[1][0]]
                if (new["rows"], new["examples"], new["tokens"]) != (old["rows"], old["examples"], old["tokens"]):
                    raise RuntimeError(f"the trees did different work on {label}: {old} vs {new}")
            results.append(row)
    return results


def print_comparison(results: list[dict], names: list[str]) -> None:
    """rows/s and tokens/s of each tree (wall clock); with two trees, new/old of throughput by wall clock, by CPU
    seconds (all threads; steadier than wall clock when other work shares the machine) and by the wall clock of the
    data phase (the build minus the setup its manifest records: tokenizer load and preflight, a fixed cost)."""
    head = f"{'corpus':42} {'template':8} {'rows':>7} {'examples':>8} {'tokens':>10}"
    for name in names:
        head += f" {name + ' rows/s':>13} {name + ' tok/s':>13}"
    if len(names) == 2:
        head += f" {'new/old':>8} {'(CPU)':>6} {'(data)':>6}"
    print(head)
    for row in results:
        first = row[names[0]]
        line = f"{row['corpus']:42} {row['template']:8} {first['rows']:7,} {first['examples']:8,} {first['tokens']:10,}"
        for name in names:
            line += f" {row[name]['rows'] / row[name]['seconds']:13,.0f} {row[name]['tokens'] / row[name]['seconds']:13,.0f}"
        if len(names) == 2:
            new, old = row[names[0]], row[names[1]]
            data = (old["seconds"] - old["setup"]) / (new["seconds"] - new["setup"])  # the data phase, setup excluded
            line += f" {old['seconds'] / new['seconds']:8.2f} {old['cpu'] / new['cpu']:6.2f} {data:6.2f}"
        print(line, flush=True)


def throughput_per_corpus(args) -> dict:
    """Plain chat (this tree, and the baseline tree when given) and the generated tool-call corpus (this tree)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from corpora import tool_call_conversations, write_jsonl

    trees = [("new", str(REPO))] + ([("old", args.baseline_tree)] if args.baseline_tree else [])
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        corpora = []
        for label, files, columns, copies in PLAIN_CHAT:
            inputs = [str(SHARED / "data" / f) for f in files]
            if copies > 1:
                rows = [row for f in inputs for row in json.loads(Path(f).read_text(encoding="utf-8"))]
                repeated = Path(tmp) / f"{Path(files[0]).stem}_x{copies}.json"
                repeated.write_text(json.dumps(rows * copies, ensure_ascii=False), encoding="utf-8")
                inputs = [str(repeated)]
            for template in args.plain_templates:
                corpora.append((label, inputs, {"template": template, "tokenizer": args.tokenizer, "columns": columns}))
        print(f"\nplain chat, build() per corpus, median of {args.rounds} rounds (trees alternate), "
              f"tokenizer {Path(args.tokenizer).name}; 'new' = {REPO}" + (f", 'old' = {args.baseline_tree}" if
                                                                        args.baseline_tree else "") + ":")
        plain = compare_trees(trees, corpora, args.rounds)
        print_comparison(plain, [name for name, _ in trees])
        out["plain"] = plain
        if args.tool_rows:
            path = write_jsonl(Path(tmp) / "tool_calls.jsonl", tool_call_conversations(args.tool_rows, seed=0))
            print(f"\ntool calls (bench/corpora.py, {args.tool_rows:,} rows, seed 0), qwen3 template, this tree only "
                  f"(the baseline cannot build tool calls):")
            tools = compare_trees([("new", str(REPO))], [("agent: tools, parallel calls, reasoning", [str(path)],
                                                           {"template": "qwen3", "tokenizer": args.tokenizer})], args.rounds)
            print_comparison(tools, ["new"])
            print(f"  ({tools[0]['new']['examples']:,} examples: turns the qwen3 template renders differently in "
                  "history are split into their own example)")
            out["tool_calls"] = tools
    return out


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
    parser.add_argument("--no-ceiling", action="store_true",
                        help="skip the in-process section (ceiling, encoder, build, TRL, peak RSS)")
    parser.add_argument("--baseline-tree", metavar="DIR",
                        help="another sftdata checkout (repository root) to build the plain-chat corpora with, side by side")
    parser.add_argument("--rounds", type=int, default=3, help="per-corpus builds per tree (median) [3]")
    parser.add_argument("--plain-templates", nargs="+", default=["chatml", "qwen3"])
    parser.add_argument("--tool-rows", type=int, default=1000, help="rows of the tool-call corpus (0: skip it) [1000]")
    args = parser.parse_args()

    per_corpus = throughput_per_corpus(args)
    if args.no_ceiling:
        print(json.dumps(per_corpus))
        return

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
                      "trl_x_ceiling": (ceiling / trl) if trl else None, **per_corpus}))


if __name__ == "__main__":
    main()
