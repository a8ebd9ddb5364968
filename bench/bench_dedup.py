"""Near-dedup benchmark: sftdata vs a straightforward datasketch pipeline vs rensa, side by side in one run.

Corpus: the real corpora in ../shared/data (GSM8K train, CodeAlpaca, GPTeacher x3, ShareGPT) plus planted
duplicate families built from them (substitutions, insertions, deletions, truncation at several strengths, and
case/punctuation/whitespace noise). Every pipeline runs the same stages end to end on one core: normalize (the
same rules), shingle (word 5-grams), sketch (128 permutations), index (LSH), verify candidates with exact
Jaccard, cluster with union-find. Ground truth: exact Jaccard of every pair sharing a shingle (sparse product).

    python bench/bench_dedup.py            # about a minute on a 2-core machine
    python bench/bench_dedup.py --quick    # a third of the corpus

Throughput is CPU seconds of this process (``time.process_time``), i.e. docs/s per core; ratios are what to quote.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"

from sftdata.clean import Deduplicator, Normalizer, record_text  # noqa: E402
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


def ground_truth(texts: list[str], norm: Normalizer):
    """All pairs with exact Jaccard >= T among documents sharing at least one shingle."""
    import scipy.sparse as sp

    docs = [norm.normalize_bytes(t) for t in texts]
    tok, off = token_hashes(docs)
    sh, soff = shingle_hashes(tok, off, N)
    doc = np.repeat(np.arange(len(texts)), np.diff(soff))
    keys, col = np.unique(sh, return_inverse=True)
    x = sp.csr_matrix((np.ones(len(sh), dtype=np.float32), (doc, col)), shape=(len(texts), len(keys)))
    x.data[:] = 1
    x.sum_duplicates()
    x.data[:] = 1
    sizes = np.asarray(x.sum(axis=1)).ravel()
    # restrict the product to columns (shingles) shared by at most 2000 documents, then the exact intersection
    # of every resulting candidate is computed from the sets (no pair with J >= 0.8 can share only very common
    # shingles unless its sets are tiny; those are covered by checking exact equality of small sets below)
    inter = (x @ x.T).tocoo()
    m = inter.row < inter.col
    a, b, i = inter.row[m], inter.col[m], inter.data[m]
    j = i / (sizes[a] + sizes[b] - i)
    keep = j >= T - 1e-9
    return {(int(p), int(q)) for p, q in zip(a[keep], b[keep])}, sizes


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


def run_baseline(texts: list[str], norm: Normalizer, lib: str, params=None):
    """The straightforward pipeline: tokens -> shingle strings -> one MinHash per doc -> LSH insert/query ->
    exact Jaccard on Python sets -> union-find."""
    if lib == "datasketch":
        from datasketch import MinHash, MinHashLSH

        lsh = MinHashLSH(threshold=T, num_perm=K, params=params) if params else MinHashLSH(threshold=T, num_perm=K)
    else:
        from rensa import RMinHash, RMinHashLSH

        lsh = RMinHashLSH(threshold=T, num_perm=K, num_bands=16)
    sets, sketches = [], []
    t0 = time.process_time()
    for i, t in enumerate(texts):
        toks = norm.normalize(t).split()
        sh = {" ".join(toks[k:k + N]) for k in range(len(toks) - N + 1)} if len(toks) >= N else ({" ".join(toks)} if toks else set())
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
    uf = UF(len(texts))
    cand = ver = 0
    for i, m in enumerate(sketches):
        if not sets[i]:
            continue
        for j in lsh.query(m):
            if j <= i:
                continue
            cand += 1
            if uf.find(i) == uf.find(j):
                continue
            a, b = sets[i], sets[j]
            inter = len(a & b)
            if inter / (len(a) + len(b) - inter) >= T:
                uf.union(i, j)
                ver += 1
    dt = time.process_time() - t0
    return [uf.find(i) for i in range(len(texts))], dt, cand


def run_ours(records: list[Record]):
    t0 = time.process_time()
    dd = Deduplicator(threshold=T, num_perm=K, ngram=N)
    for i in range(0, len(records), 1000):
        dd.add_batch(records[i:i + 1000])
    dd.finalize()
    for i in range(0, len(records), 1000):
        dd.filter_batch(records[i:i + 1000])
    dt = time.process_time() - t0
    rep = [dd.representative(i) for i in range(len(records))]
    return rep, dt, dd.summary()


def pair_metrics(rep: list[int], truth: set[tuple[int, int]]):
    found = sum(1 for a, b in truth if rep[a] == rep[b])
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(rep):
        groups.setdefault(r, []).append(i)
    same = [(a, b) for g in groups.values() if len(g) > 1 for x, a in enumerate(g) for b in g[x + 1:]]
    removed = [i for i, r in enumerate(rep) if r != i]
    return found / max(len(truth), 1), len(same), removed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--families", type=int, default=600)
    args = ap.parse_args()
    clean = load_corpus()
    if args.quick:
        clean = clean[::3]
    planted = plant(clean, args.families // (3 if args.quick else 1))
    records = clean + [p[0] for p in planted]
    texts = [record_text(r) for r in records]
    norm = Normalizer()
    print(f"corpus: {len(clean)} real rows + {len(planted)} planted variants = {len(records)} docs, "
          f"{sum(map(len, texts)) / len(texts):.0f} chars/doc; threshold {T}, {K} permutations, {N}-gram shingles")
    t = time.perf_counter()
    truth, _ = ground_truth(texts, norm)
    print(f"ground truth: {len(truth)} pairs with exact Jaccard >= {T} ({time.perf_counter() - t:.1f}s)")
    has_partner = {x for p in truth for x in p}

    rows = []
    rep, dt, summary = run_ours(records)
    rows.append(("sftdata (21x6 bands, exact verify)", rep, dt, summary["candidate_pairs"]))
    for label, lib, params in [("datasketch MinHash+MinHashLSH, bands 21x6", "datasketch", (21, 6)),
                               ("datasketch MinHash+MinHashLSH, auto bands", "datasketch", None),
                               ("rensa RMinHash+RMinHashLSH, 16x8 bands", "rensa", None)]:
        r, d, c = run_baseline(texts, norm, lib, params)
        rows.append((label, r, d, c))
    base_dt = rows[1][2]
    print(f"\n{'pipeline':46} {'docs/s':>9} {'vs datasketch':>14} {'pair recall':>12} {'candidates':>11} {'removed':>8} {'removed w/o partner':>20}")
    for label, r, d, c in rows:
        rec, _, removed = pair_metrics(r, truth)
        bad = sum(1 for i in removed if i not in has_partner)
        print(f"{label:46} {len(records) / d:9.0f} {base_dt / d:13.1f}x {rec:12.4f} {c:11d} {len(removed):8d} {bad:20d}")
    print(f"\nsftdata LSH: {summary['bands']} bands x {summary['rows']} rows, miss rate at J={T}: "
          f"{summary['miss_rate_at_threshold']:.4f} (datasketch auto for 0.8/128 = 9x13: {(1 - (1 - T ** 13) ** 9):.3f} "
          f"catch, i.e. {(1 - T ** 13) ** 9:.2f} miss)")
    print(f"sftdata: candidates {summary['candidate_pairs']}, verified {summary['verified_pairs']}, rejected "
          f"{summary['rejected_pairs'] + summary['rejected_by_size']}, skipped (already clustered) {summary['skipped_same_cluster']}")

    # per edit kind (ours): truth = the variant's exact Jaccard with its base >= T
    rep = rows[0][1]
    base_of = {len(clean) + k: p[1] for k, p in enumerate(planted)}
    print(f"\nper edit kind (sftdata): recall = removed / variants with J(variant, base) >= {T}; "
          "precision = removed that truly have a partner with J >= T")
    print(f"{'kind':11} {'level':>6} {'variants':>9} {'J>=T':>6} {'removed':>8} {'recall':>7} {'precision':>10}")
    sets_cache = {}

    def jac(a, b):
        for x in (a, b):
            if x not in sets_cache:
                d = [norm.normalize_bytes(texts[x])]
                tk, of = token_hashes(d)
                s, _ = shingle_hashes(tk, of, N)
                sets_cache[x] = set(s.tolist())
        A, B = sets_cache[a], sets_cache[b]
        return len(A & B) / max(len(A | B), 1)

    for kind in KINDS:
        for level in (LEVELS if kind != "noise" else [0.0]):
            idx = [len(clean) + k for k, p in enumerate(planted) if p[2] == kind and p[3] == level]
            true = [i for i in idx if jac(i, base_of[i]) >= T]
            removed = [i for i in idx if rep[i] != i]
            hit = sum(1 for i in true if rep[i] == rep[base_of[i]])
            prec = f"{sum(1 for i in removed if i in has_partner) / len(removed):10.3f}" if removed else f"{'-':>10}"
            rec = f"{hit / len(true):7.3f}" if true else f"{'-':>7}"
            print(f"{kind:11} {level:6.2f} {len(idx):9d} {len(true):6d} {len(removed):8d} {rec} {prec}")

    # clean data alone: what is removed, and is every removal a true near duplicate?
    rep_clean, _, s_clean = run_ours(clean)
    removed = [i for i, r in enumerate(rep_clean) if r != i]
    ok = sum(1 for i in removed if i in has_partner)
    print(f"\nclean real data only ({len(clean)} rows): removed {len(removed)} "
          f"({s_clean['removed']}); {ok}/{len(removed)} have a partner with exact J >= {T} (false positives: {len(removed) - ok})")

    # memory: state held between the passes (tracemalloc, sketch state only: inputs already in memory)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    dd = Deduplicator()
    for i in range(0, len(records), 1000):
        dd.add_batch(records[i:i + 1000])
    held = tracemalloc.get_traced_memory()[0] - before
    peak = tracemalloc.get_traced_memory()[1] - before
    tracemalloc.stop()
    text_bytes = sum(len(t.encode()) for t in texts)
    print(f"memory after pass 1: {held / len(records):.0f} bytes/row held (band keys, row ids, exact-hash table), "
          f"peak {peak / 2**20:.1f} MiB; input text is {text_bytes / len(records):.0f} bytes/row; shingle sets "
          "are on disk (temp file), not in memory")


if __name__ == "__main__":
    main()
