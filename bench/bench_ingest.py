"""Ingest: read speed and peak memory of this tree's readers against a baseline git ref, side by side in one run.

* speed — ``read_records`` over real corpora (default: ../shared/data/gsm8k_train.jsonl, JSON Lines, and
          codealpaca.json, a JSON array), baseline and current in alternating child processes, best of ``--repeat``
          each; the ratio is the figure to quote;
* memory — peak RSS of a child process that reads every record of a generated 50 MB ``.txt`` and a generated large
           ``.json`` array, and of a whole ``sftdata.build`` of the ``.txt`` with the tiny fixture tokenizer.

    python bench/bench_ingest.py                      # baseline: main
    python bench/bench_ingest.py --baseline HEAD~5 --repeat 7 --skip-build
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

CHILD = r"""
import resource, sys, time
from sftdata.ingest import read_records
mode, path, columns, repeat = sys.argv[1], sys.argv[2], sys.argv[3] or None, int(sys.argv[4])
if mode == "speed":
    best = float("inf")
    for _ in range(repeat):
        t = time.process_time()  # CPU time: less disturbed than wall time by other work on a shared machine
        rows = sum(len(b) for b in read_records([path], columns=columns))
        best = min(best, time.process_time() - t)
    print(best, rows)
elif mode == "read":
    rows = sum(len(b) for b in read_records([path], columns=columns))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rows)
else:
    import tempfile
    from sftdata import build
    out = tempfile.mkdtemp()
    build([path], template="chatml", tokenizer=columns, output=out)
    print(0, 0)
"""


def run_child(tree: Path, *args: str) -> tuple[float, int]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    # cwd=tree: with -c the working directory comes first on sys.path
    out = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, cwd=tree, check=True, capture_output=True,
                         text=True)
    value, rows = out.stdout.split()[-2:]
    return float(value), int(rows)


def build_peak(tree: Path, path: Path, tokenizer: str, limit_gib: float) -> str:
    """Peak RSS of a whole build in a child limited to ``limit_gib`` of address space (the baseline can exceed any
    shared machine's memory), from the child's own rusage, so it is known even when the child fails."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    limit = int(limit_gib * 2**30)
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", CHILD, "build", str(path), tokenizer, "1"], env=env, cwd=tree,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    peak = f"{usage.ru_maxrss / 1024:8,.0f} MiB"
    if child.returncode != 0:
        return f"{peak}, then failed after {seconds:.0f} s at the {limit_gib:g} GiB address-space limit"
    return f"{peak} in {seconds:.0f} s"


def make_inputs(directory: Path) -> tuple[Path, Path]:
    rng = random.Random(0)
    words = [w for w in "the of and to in is was for on that with as by at from this be it an are or".split()]
    txt = directory / "big.txt"
    with open(txt, "w") as f:
        while f.tell() < 50 << 20:
            f.write(" ".join(rng.choices(words, k=rng.randint(3, 40))) + ("\n\n" if rng.random() < 0.1 else "\n"))
    array = directory / "big.json"
    with open(array, "w") as f:
        f.write("[")
        for i in range(150_000):
            row = {"instruction": " ".join(rng.choices(words, k=60)), "input": "", "output": " ".join(rng.choices(words, k=120))}
            f.write(("," if i else "") + json.dumps(row))
        f.write("]")
    return txt, array


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="main", help="git ref to compare against (default: main)")
    parser.add_argument("--corpus", action="append", metavar="PATH[::COLUMNS]",
                        help="corpus to time (repeatable); default: gsm8k_train.jsonl and codealpaca.json")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="alternating baseline/current child runs for speed")
    parser.add_argument("--skip-build", action="store_true", help="skip the peak RSS of a whole build of the .txt")
    parser.add_argument("--build-limit-gib", type=float, default=12, help="address-space limit of each build child")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        baseline = tmp / "baseline"
        baseline.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.baseline, "sftdata"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive, check=True)
        trees = {"baseline": baseline, "current": REPO}

        corpora = args.corpus or [f"{SHARED / 'data' / 'gsm8k_train.jsonl'}::instruction=question,output=answer",
                                  str(SHARED / "data" / "codealpaca.json")]
        for corpus in corpora:
            path, _, columns = corpus.partition("::")
            print(f"read speed: {path}, CPU time, best of {args.repeat} x {args.rounds} alternating rounds")
            best = {name: float("inf") for name in trees}
            rows = {}
            for _ in range(args.rounds):
                for name, tree in trees.items():
                    seconds, rows[name] = run_child(tree, "speed", path, columns, str(args.repeat))
                    best[name] = min(best[name], seconds)
            for name in trees:
                print(f"  {name:9s} {best[name]:.3f} s  {rows[name] / best[name]:>9,.0f} rows/s  ({rows[name]:,} rows)")
            print(f"  current / baseline time: {best['current'] / best['baseline']:.3f}")

        txt, array = make_inputs(tmp)
        print(f"peak RSS (MiB) reading every record: {txt.name} {txt.stat().st_size / 2**20:.0f} MiB, "
              f"{array.name} {array.stat().st_size / 2**20:.0f} MiB")
        for path in (txt, array):
            for name, tree in trees.items():
                rss, n = run_child(tree, "read", str(path), "", "1")
                print(f"  {path.name:9s} {name:9s} {rss:8,.0f} MiB  ({n:,} records)")
        if not args.skip_build:
            tokenizer = str(REPO / "fixtures" / "tiny-tokenizer")
            print(f"peak RSS of sftdata.build({txt.name}) with the tiny fixture tokenizer")
            for name in ("baseline", "current"):
                print(f"  {name:9s} {build_peak(trees[name], txt, tokenizer, args.build_limit_gib)}")


if __name__ == "__main__":
    main()
