"""Near-dedup benchmark, end to end on files: sftdata vs a plain datasketch loop vs rensa, side by side in one run.

Two corpus kinds, both built from the real corpora in ../shared/data (GSM8K train, CodeAlpaca, GPTeacher x3,
ShareGPT) and written to a JSONL file:

  lightly duplicated   the real rows plus planted variants of 600 base rows (substitutions, insertions, deletions,
                       truncation at several strengths, case/punctuation/whitespace noise)
  heavily duplicated   the real rows plus planted families of 9,190 base rows: most rows have near duplicates

Every pipeline runs end to end on one core: read the JSONL file, normalize (the same rules), shingle (word
5-grams), sketch (128 permutations), index (LSH), verify candidates with exact Jaccard, cluster, write the kept rows.

  sftdata      ``sftdata.clean.dedup(file, output)``: the ``sftdata dedup`` command without its progress bar
  datasketch   json.loads per line -> text -> shingle strings -> ``MinHash.update_batch`` -> ``MinHashLSH`` with
               bands 21 x 6 (and, lightly duplicated only, its automatic bands) insert + query -> exact Jaccard on
               Python sets -> union-find -> kept lines written
  rensa        the same loop with ``RMinHash`` + ``RMinHashLSH`` (16 x 8 bands)

Ground truth: every pair with exact Jaccard >= 0.8, from an exact all-pairs join (prefix filtering on rarest-first
shingle order, then the exact intersection of every pair sharing a prefix shingle). Pair recall = truth pairs
that end in one cluster; "removed w/o partner" = removed rows with no truth partner (false positives).

    python bench/bench_dedup.py            # about 4 minutes on a 2-core machine (datasketch takes most of it)
    python bench/bench_dedup.py --quick    # a third of each corpus
    python bench/bench_dedup.py --memory   # peak RSS of `dedup` and `build --dedup` at 16 and 128 MiB of input

Each pipeline runs in a fresh Python process (as ``sftdata dedup`` or a user's script would; in one long-lived
process every pipeline would pay garbage collection over the benchmark's own objects). Throughput is that process's
CPU seconds for the run (``time.process_time``, imports excluded), i.e. docs/s per core; ratios are what to quote.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import random
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"

from sftdata.clean import Deduplicator, Normalizer, dedup, record_text  # noqa: E402
from sftdata.clean.normalize import shingle_hashes, token_hashes  # noqa: E402
from sftdata.ingest import read_records  # noqa: E402
from sftdata.record import Record  # noqa: E402

T, K, N = 0.8, 128, 5
KINDS = ["substitute", "insert", "delete", "truncate", "noise"]
LEVELS = [0.02, 0.05, 0.10, 0.25]


def load_corpus() -> list[Record]:
    spec = [("gsm8k_train.jsonl", "instruction=question,output=answer"), ("codealpaca.json", None),
            ("gpteacher_codegen.json", None), ("gpteacher_roleplay.json", None),
            ("gpteacher_toolformer.json", None), ("sharegpt_dummy.json", None)]
    recs: list[Record] = []
    for name, cols in spec:
        for batch in read_records([str(DATA / name)], columns=cols):
            recs.extend(batch)
    return recs


def edit(words: list[str], kind: str, level: float, rng: random.Random, vocab: list[str]) -> list[str]:
    w = list(words)
    k = max(1, round(level * len(w)))
    if kind == "substitute":
        for p in rng.sample(range(len(w)), min(k, len(w))):
            w[p] = rng.choice(vocab)
    elif kind == "insert":
        for _ in range(k):
            w.insert(rng.randrange(len(w) + 1), rng.choice(vocab))
    elif kind == "delete":
        for p in sorted(rng.sample(range(len(w)), min(k, len(w) - 1)), reverse=True):
            del w[p]
    elif kind == "truncate":
        w = w[: max(1, len(w) - k)]
    elif kind == "noise":  # case, punctuation, whitespace, line wrapping: identical after normalization
        out = []
        for i, x in enumerate(w):
            x = x.upper() if rng.random() < 0.3 else x
            x = x + rng.choice([",", "", "", "!", ";"])
            out.append(x + ("\n" if i % 9 == 8 else rng.choice([" ", "  ", "\t"])))
        return ["".join(out)]
    return w


def plant(clean: list[Record], n_families: int, seed: int = 0):
    """Variants of ``n_families`` base rows (user turn of 40+ words): each edit kind and level with probability 1/2."""
    rng = random.Random(seed)
    vocab = sorted({w for r in clean[:3000] for w in record_text(r).split()[:50]})
    bases = [i for i in range(len(clean)) if 40 <= len((clean[i].messages or [])[0].content.split()) if clean[i].messages]
    bases = rng.sample(bases, min(n_families, len(bases)))
    planted: list[tuple[Record, int, str, float]] = []
    for b in bases:
        rec = clean[b]
        user = rec.messages[0].content
        for kind in KINDS:
            for level in (LEVELS if kind != "noise" else [0.0]):
                if rng.random() < 0.5:
                    continue
                new_user = " ".join(edit(user.split(), kind, level, rng, vocab))
                msgs = [type(m)(m.role, new_user if i == 0 else m.content) for i, m in enumerate(rec.messages)]
                planted.append((Record("planted", len(planted) + 1, msgs), b, kind, level))
    return planted


def write_corpus(records: list[Record], path: Path) -> list[str]:
    """The records as JSONL rows (``messages`` or ``text``); returns each row's text as ``record_text`` gives it."""
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            row = {"messages": [{"role": m.role, "content": m.content} for m in r.messages]} if r.messages else \
                {"text": r.text}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return [record_text(r) for r in records]


def shingle_sets(texts: list[str], norm: Normalizer):
    """(values, offsets) of each text's 5-gram shingle hashes, sorted and distinct per text."""
    docs = [norm.normalize_bytes(t) for t in texts]
    tok, off = token_hashes(docs)
    sh, soff = shingle_hashes(tok, off, N)
    doc = np.repeat(np.arange(len(texts)), np.diff(soff))
    order = np.lexsort((sh, doc))
    sh, doc = sh[order], doc[order]
    keep = np.ones(len(sh), dtype=bool)
    keep[1:] = (sh[1:] != sh[:-1]) | (doc[1:] != doc[:-1])
    sh, doc = sh[keep], doc[keep]
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(np.bincount(doc, minlength=len(texts)), out=offsets[1:])
    return sh, offsets


def ground_truth(texts: list[str], norm: Normalizer) -> set[tuple[int, int]]:
    """Every pair with exact Jaccard >= T (AllPairs): with shingles ordered rarest first, two sets with J >= T share
    an element of their prefixes of length |A| - ceil(T |A|) + 1; candidates are the pairs sharing a prefix element,
    and each is checked exactly."""
    import scipy.sparse as sp

    sh, off = shingle_sets(texts, norm)
    n = len(texts)
    doc = np.repeat(np.arange(n), np.diff(off))
    keys, col = np.unique(sh, return_inverse=True)
    df = np.bincount(col, minlength=len(keys))
    order = np.lexsort((col, df[col], doc))  # per document: rarest shingles first
    size = np.diff(off)
    prefix = size - np.ceil(T * size - 1e-9).astype(np.int64) + 1
    pos_in_doc = np.arange(len(sh)) - np.repeat(off[:-1], size)
    in_prefix = pos_in_doc < np.repeat(prefix, size)
    p_doc, p_col = doc[order][in_prefix], col[order][in_prefix]
    x = sp.csr_matrix((np.ones(len(sh), np.int32), (doc, col)), shape=(n, len(keys)))
    p = sp.csr_matrix((np.ones(len(p_doc), np.int32), (p_doc, p_col)), shape=(n, len(keys)))
    cand = sp.triu(p @ p.T, k=1).tocoo()
    a, b = cand.row.astype(np.int64), cand.col.astype(np.int64)
    inter = np.zeros(len(a), dtype=np.int64)
    step = 1 << 16
    for i in range(0, len(a), step):
        inter[i:i + step] = np.asarray(x[a[i:i + step]].multiply(x[b[i:i + step]]).sum(axis=1)).ravel()
    j = inter / (size[a] + size[b] - inter)
    ok = j >= T - 1e-9
    return set(zip(a[ok].tolist(), b[ok].tolist()))


class UF:
    def __init__(self, n):
        self.p = list(range(n))

    def find(self, x):
        while self.p[x] != x:
            self.p[x] = self.p[self.p[x]]
            x = self.p[x]
        return x

    def union(self, a, b):
        a, b = self.find(a), self.find(b)
        if a != b:
            self.p[max(a, b)] = min(a, b)


def run_baseline(path: Path, out: Path, lib: str, params=None):
    """The plain loop, end to end: read lines -> text -> shingle strings -> one MinHash per row -> LSH insert and
    query -> exact Jaccard on Python sets -> union-find -> kept lines written. Returns (representatives, seconds,
    None)."""
    norm = Normalizer()
    t0 = time.process_time()
    if lib == "datasketch":
        from datasketch import MinHash, MinHashLSH

        lsh = MinHashLSH(threshold=T, num_perm=K, params=params) if params else MinHashLSH(threshold=T, num_perm=K)
    else:
        from rensa import RMinHash, RMinHashLSH

        lsh = RMinHashLSH(threshold=T, num_perm=K, num_bands=16)
    lines, sets, sketches = [], [], []
    with open(path, "rb") as f:
        for i, line in enumerate(f):
            lines.append(line)
            row = json.loads(line)
            t = "\n".join(f"{m['role']}: {m['content']}" for m in row["messages"]) if "messages" in row else row["text"]
            toks = norm.normalize(t).split()
            sh = {" ".join(toks[k:k + N]) for k in range(len(toks) - N + 1)} if len(toks) >= N else (
                {" ".join(toks)} if toks else set())
            sets.append(sh)
            if lib == "datasketch":
                m = MinHash(num_perm=K)
                m.update_batch([s.encode("utf-8") for s in sh])
            else:
                m = RMinHash(num_perm=K, seed=42)
                m.update(list(sh))
            if sh:
                lsh.insert(i, m)
            sketches.append(m)
    uf = UF(len(sets))
    for i, m in enumerate(sketches):
        if not sets[i]:
            continue
        for j in lsh.query(m):
            if j <= i or uf.find(i) == uf.find(j):
                continue
            a, b = sets[i], sets[j]
            inter = len(a & b)
            if inter / (len(a) + len(b) - inter) >= T:
                uf.union(i, j)
    rep = [uf.find(i) for i in range(len(sets))]
    with open(out, "wb") as f:
        f.writelines(line for i, line in enumerate(lines) if rep[i] == i)
    return rep, time.process_time() - t0, None


def run_sftdata(path: Path, out: Path):
    """``sftdata.clean.dedup`` end to end (timed); the clusters for the recall come from an untimed in-memory run
    whose kept set must equal the file run's. Returns (representatives, seconds, summary)."""
    t0 = time.process_time()
    summary = dedup([str(path)], out)
    seconds = time.process_time() - t0
    dd = Deduplicator(threshold=T, num_perm=K, ngram=N)
    for batch in read_records([str(path)]):
        dd.add_batch(batch)
    dd.finalize()
    rep = [dd.representative(i) for i in range(len(dd.keep_mask()))]
    kept_rows = [json.loads(line)["row"] for line in open(summary["provenance"])]
    assert kept_rows == [i + 1 for i, r in enumerate(rep) if r == i], "file run and in-memory run disagree"
    return rep, seconds, summary["cleaning"]


def run_in_child(pipeline: str, path: Path, out: Path):
    """Run one pipeline in a fresh process; returns (representatives, CPU seconds of the run, sftdata's summary)."""
    result_file = out.with_suffix(".result.json")
    if pipeline == "sftdata":
        call = f"b.run_sftdata(Path({str(path)!r}), Path({str(out)!r}))"
    else:
        lib, _, bands = pipeline.partition(":")
        params = tuple(map(int, bands.split("x"))) if bands else None
        call = f"b.run_baseline(Path({str(path)!r}), Path({str(out)!r}), {lib!r}, {params!r})"
    code = (f"import sys, json; sys.path.insert(0, {str(ROOT / 'bench')!r}); import bench_dedup as b\n"
            f"from pathlib import Path\n"
            f"rep, seconds, summary = {call}\n"
            f"json.dump({{'rep': rep, 'seconds': seconds, 'summary': summary}}, open({str(result_file)!r}, 'w'))\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    result = json.loads(result_file.read_text())
    return result["rep"], result["seconds"], result["summary"]


def pair_metrics(rep: list[int], truth: set[tuple[int, int]]):
    found = sum(1 for a, b in truth if rep[a] == rep[b])
    removed = [i for i, r in enumerate(rep) if r != i]
    return found / max(len(truth), 1), removed


def compare(label: str, records: list[Record], tmp: Path, baselines, *, per_kind=None) -> dict:
    path = tmp / f"{label.split()[0]}.jsonl"
    texts = write_corpus(records, path)
    norm = Normalizer()
    print(f"\n== {label}: {len(records):,} rows, {sum(map(len, texts)) / len(texts):.0f} chars/row, "
          f"{path.stat().st_size / 2**20:.1f} MiB of JSONL; threshold {T}, {K} permutations, {N}-gram shingles")
    t = time.perf_counter()
    truth = ground_truth(texts, norm)
    has_partner = {x for p in truth for x in p}
    print(f"ground truth: {len(truth):,} pairs with exact Jaccard >= {T}, {len(has_partner):,} rows have one "
          f"({time.perf_counter() - t:.1f}s)")
    rows = []
    rep, seconds, summary = run_in_child("sftdata", path, tmp / "kept-sftdata.jsonl")
    rows.append((f"sftdata dedup ({summary['bands']}x{summary['rows']} bands, exact verify)", rep, seconds))
    for name, pipeline in baselines:
        r, s, _ = run_in_child(pipeline, path, tmp / "kept-baseline.jsonl")
        rows.append((name, r, s))
    times = {name: s for name, _, s in rows}
    ds = next(s for name, s in times.items() if name.startswith("datasketch"))
    rensa = next(s for name, s in times.items() if name.startswith("rensa"))
    print(f"{'pipeline (end to end, one core)':46} {'CPU s':>7} {'rows/s':>8} {'vs datasketch':>14} {'vs rensa':>9} "
          f"{'pair recall':>12} {'removed':>8} {'w/o partner':>12}")
    for name, r, s in rows:
        recall, removed = pair_metrics(r, truth)
        bad = sum(1 for i in removed if i not in has_partner)
        print(f"{name:46} {s:7.2f} {len(records) / s:8.0f} {ds / s:13.1f}x {rensa / s:8.1f}x {recall:12.4f} "
              f"{len(removed):8d} {bad:12d}")
    print(f"sftdata: {summary['band_collisions']:,} band collisions, {summary['screened_out']:,} screened out by the "
          f"MinHash estimate, {summary['candidate_pairs']:,} candidates verified exactly: {summary['verified_pairs']:,} "
          f"with J >= {T}, {summary['rejected_pairs']:,} below; LSH miss rate at J={T}: "
          f"{summary['miss_rate_at_threshold']:.4f} (datasketch's automatic 9x13 bands: {(1 - T ** 13) ** 9:.2f})")
    if per_kind:
        per_kind(rows[0][1], texts, has_partner)
    return {"rows": len(records), "sftdata_s": rows[0][2], "x_datasketch": ds / rows[0][2], "x_rensa": rensa / rows[0][2],
            "sftdata_recall": pair_metrics(rows[0][1], truth)[0]}


def peak_rss(call: str) -> float:
    """Peak RSS (MiB) of a fresh process that runs ``call``: its VmHWM (``ru_maxrss`` would include the RSS of this
    large parent process, which Linux carries into the child across fork and exec)."""
    code = (f"import sys, tempfile; sys.path.insert(0, {str(ROOT)!r})\n"
            "from sftdata.clean import dedup\nfrom sftdata.build import build\n"
            f"{call}\n"
            "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def memory(clean: list[Record]) -> None:
    """Peak RSS of standalone dedup and of build --dedup (chatml, bundled Qwen3 tokenizer) as the input grows, for
    exact repeats (GSM8K train copied 4 and 32 times) and for near duplicates (the real rows plus planted families
    of three seeds, shuffled, cut at 16 and 128 MiB)."""
    def row(r: Record) -> str:
        return json.dumps({"messages": [{"role": m.role, "content": m.content} for m in r.messages]} if r.messages
                          else {"text": r.text}, ensure_ascii=False) + "\n"

    rng = random.Random(0)
    first = [row(r) for r in clean] + [row(p[0]) for p in plant(clean, 9190, seed=0)]
    more = [row(p[0]) for seed in (1, 2) for p in plant(clean, 9190, seed=seed)]
    rng.shuffle(first)
    rng.shuffle(more)
    near = first + more
    gsm = (DATA / "gsm8k_train.jsonl").read_bytes()
    print("\npeak RSS (MiB), fresh process each")
    print(f"{'input':52} {'rows':>8} {'dedup':>7} {'build --dedup':>14}")
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        corpora = []
        for copies in (4, 32):
            path = tmp / f"gsm8k_x{copies}.jsonl"
            path.write_bytes(gsm * copies)
            corpora.append((f"GSM8K train x{copies} (exact repeats)", path, "'instruction=question,output=answer'"))
        for mib in (16, 128):
            path = tmp / f"near_{mib}.jsonl"
            size, chosen = 0, []
            for line in near:
                chosen.append(line)
                size += len(line.encode())
                if size >= mib << 20:
                    break
            path.write_text("".join(chosen))
            corpora.append(("real rows + planted near-duplicate families", path, "None"))
        for label, path, columns in corpora:
            rows = sum(1 for _ in open(path))
            dedup_rss = peak_rss(f"dedup([{str(path)!r}], tempfile.mkdtemp() + '/kept.jsonl', columns={columns})")
            build_rss = peak_rss(f"build([{str(path)!r}], template='chatml', output=tempfile.mkdtemp() + '/o', "
                                 f"columns={columns}, dedup=True)")
            print(f"{label + f' ({path.stat().st_size / 2**20:.0f} MiB)':52} {rows:8,} {dedup_rss:7.0f} {build_rss:14.0f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a third of each corpus")
    ap.add_argument("--memory", action="store_true", help="only the peak-RSS table (takes a few minutes: builds)")
    args = ap.parse_args()
    clean = load_corpus()
    if args.memory:
        memory(clean)
        return
    if args.quick:
        clean = clean[::3]
    scale = 3 if args.quick else 1
    light = plant(clean, 600 // scale)
    heavy = plant(clean, 9190 // scale, seed=1)
    results = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        light_records = clean + [p[0] for p in light]
        norm = Normalizer()

        def per_kind(rep, texts, has_partner):
            """Recall per edit kind (removed / variants whose exact Jaccard with their base is >= T)."""
            base_of = {len(clean) + k: p[1] for k, p in enumerate(light)}
            sets = {}

            def jac(a, b):
                for x in (a, b):
                    if x not in sets:
                        sh, _ = shingle_hashes(*token_hashes([norm.normalize_bytes(texts[x])]), N)
                        sets[x] = set(sh.tolist())
                return len(sets[a] & sets[b]) / max(len(sets[a] | sets[b]), 1)

            print(f"per edit kind (sftdata): recall = removed / variants with J(variant, base) >= {T}; "
                  "precision = removed that truly have a partner with J >= T")
            print(f"{'kind':11} {'level':>6} {'variants':>9} {'J>=T':>6} {'removed':>8} {'recall':>7} {'precision':>10}")
            for kind in KINDS:
                for level in (LEVELS if kind != "noise" else [0.0]):
                    idx = [len(clean) + k for k, p in enumerate(light) if p[2] == kind and p[3] == level]
                    true = [i for i in idx if jac(i, base_of[i]) >= T]
                    removed = [i for i in idx if rep[i] != i]
                    hit = sum(1 for i in true if rep[i] == rep[base_of[i]])
                    prec = f"{sum(1 for i in removed if i in has_partner) / len(removed):10.3f}" if removed else f"{'-':>10}"
                    rec = f"{hit / len(true):7.3f}" if true else f"{'-':>7}"
                    print(f"{kind:11} {level:6.2f} {len(idx):9d} {len(true):6d} {len(removed):8d} {rec} {prec}")

        results["light"] = compare("lightly duplicated", light_records, tmp, [
            ("datasketch MinHash+MinHashLSH, bands 21x6", "datasketch:21x6"),
            ("datasketch MinHash+MinHashLSH, auto bands", "datasketch"),
            ("rensa RMinHash+RMinHashLSH, 16x8 bands", "rensa")], per_kind=per_kind)
        results["heavy"] = compare("heavily duplicated", clean + [p[0] for p in heavy], tmp, [
            ("datasketch MinHash+MinHashLSH, bands 21x6", "datasketch:21x6"),
            ("rensa RMinHash+RMinHashLSH, 16x8 bands", "rensa")])

        # the real rows alone: every removal must have a partner with exact J >= T
        dd = Deduplicator(threshold=T, num_perm=K, ngram=N)
        for i in range(0, len(clean), 1000):
            dd.add_batch(clean[i:i + 1000])
        dd.finalize()
        texts = [record_text(r) for r in clean]
        partners = {x for p in ground_truth(texts, norm) for x in p}
        removed = np.flatnonzero(~dd.keep_mask())
        ok = sum(1 for i in removed.tolist() if i in partners)
        print(f"\nreal rows only ({len(clean):,}): removed {len(removed):,} {dd.summary()['removed']}; {ok} have a "
              f"partner with exact J >= {T} (false positives: {len(removed) - ok})")

    # memory: what the deduplicator holds per row after pass 1 (numpy arrays; shingle hashes are in a temp file)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    dd = Deduplicator()
    for i in range(0, len(light_records), 1000):
        dd.add_batch(light_records[i:i + 1000])
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    print(f"held after pass 1: {held / len(light_records):.0f} bytes/row (exact keys, band keys, screen bytes, "
          "positions); shingle hashes are in a temporary file")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
