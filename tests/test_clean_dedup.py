"""Exact and near-duplicate removal: exact expectations on small fixtures, edge cases, determinism, and
agreement of the vectorized MinHash with datasketch."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_path
from hypothesis import given, settings
from hypothesis import strategies as st

from sftdata.clean import Deduplicator, Normalizer, dedup, record_text
from sftdata.clean.dedup import DedupConfig, exact_first, sketch_batch
from sftdata.clean.minhash import MinHasher, Screen, band_collisions, choose_bands, fold32, miss_rate, screen_miss_rate
from sftdata.clean.pairs import connected_min_labels, pair_jaccard, set_matrix, set_values
from sftdata.clean.normalize import reference_shingle_set, shingle_hashes, token_hashes
from sftdata.record import DataError, Message, Record

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

BASE = ("The committee met on Tuesday to review the annual budget and decided after a long debate to move "
        "forty thousand dollars from the travel fund into the new library project which will open next spring "
        "with longer hours and a larger collection of science books for the children of the town while the mayor "
        "thanked the volunteers who had organized the fundraiser last autumn")


def chat(i: int, user: str, assistant: str = "ok", source: str = "a.jsonl", **extra) -> Record:
    return Record(source, i, [Message("user", user), Message("assistant", assistant)], extra=dict(extra))


def text(i: int, t: str, source: str = "t.jsonl") -> Record:
    return Record(source, i, text=t)


def run(records, batch=2, **kw):
    dd = Deduplicator(**kw)
    for i in range(0, len(records), batch):
        dd.add_batch(records[i:i + batch])
    dd.finalize()
    kept, removed = [], []
    for i in range(0, len(records), batch):
        k, r = dd.filter_batch(records[i:i + batch])
        kept += k
        removed += r
    return dd, kept, removed


def words_replaced(s: str, positions: list[int], word: str = "zebra") -> str:
    w = s.split()
    for p in positions:
        w[p] = word
    return " ".join(w)


def exact_j(a: str, b: str, n: int = 5) -> float:
    norm = Normalizer()
    x, y = reference_shingle_set(a, norm, n), reference_shingle_set(b, norm, n)
    return len(x & y) / len(x | y) if x and y else 0.0


# ---------------------------------------------------------------------------------------------------------------
# exact duplicates


def test_exact_duplicates_case_punctuation_whitespace_roles_included():
    recs = [
        chat(1, "What is the capital of France?", "Paris."),
        chat(2, "Name a prime number.", "7"),
        chat(3, "what is the CAPITAL of   france", "paris"),          # same after normalization -> exact dup of 1
        Record("a.jsonl", 4, [Message("assistant", "What is the capital of France?"), Message("user", "Paris.")]),
        chat(5, "Name a prime number.", "7"),                         # verbatim copy of 2
    ]
    dd, kept, removed = run(recs, near=False)
    assert [r.row for r in kept] == [1, 2, 4]  # row 4 has the roles swapped: a different example
    assert [(r.record.row, r.reason, r.matched["row"], r.matched["cluster"]) for r in removed] == [
        (3, "exact-duplicate", 1, 0), (5, "exact-duplicate", 2, 1)]
    assert dd.summary()["removed"] == {"exact-duplicate": 2, "near-duplicate": 0}


def test_digits_are_not_folded_by_default():
    a = chat(1, "Tom has 3 apples and buys 4 more. How many apples?", "7")
    b = chat(2, "Tom has 5 apples and buys 4 more. How many apples?", "9")
    _, kept, removed = run([a, b], near=False)
    assert len(kept) == 2 and not removed
    _, kept, removed = run([a, b], near=False, normalize={"digits": True})
    assert [r.record.row for r in removed] == [2]


def test_normalization_options_are_configurable():
    a, b = text(1, "Hello World"), text(2, "hello world")
    assert len(run([a, b], near=False)[2]) == 1
    assert len(run([a, b], near=False, normalize="lowercase=false")[2]) == 0
    c, d = text(3, "a  b\tc"), text(4, "a b c")
    assert len(run([c, d], near=False)[2]) == 1
    assert len(run([c, d], near=False, normalize={"whitespace": False})[2]) == 0
    assert Normalizer().normalize("Ｆｕｌｌ\u00a0width “quotes”—x") == "full width quotes x"
    assert Normalizer(punctuation="delete").normalize("Don't pay $1,000.50 for has_close—elements!") == \
        "dont pay 100050 for hascloseelements"
    assert Normalizer(punctuation=True) == Normalizer() and Normalizer(punctuation=False).punctuation == "keep"
    assert Normalizer.from_spec("digits=1", base=Normalizer(punctuation="delete")) == \
        Normalizer(punctuation="delete", digits=True)
    with pytest.raises(ValueError, match="punctuation must be one of"):
        Normalizer(punctuation="drop")
    assert Normalizer(unicode=None).normalize("Ｆｕｌｌ") == "ｆｕｌｌ"


def test_record_text_includes_roles():
    r = Record("s", 1, [Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello")])
    assert record_text(r) == "system: Be brief.\nuser: Hi\nassistant: Hello"
    assert record_text(text(1, "raw doc")) == "raw doc"


# ---------------------------------------------------------------------------------------------------------------
# near duplicates


def test_near_duplicates_which_rows_go_and_which_cluster():
    v1 = words_replaced(BASE, [10])                 # one substitution: J ~ 0.86
    v2 = BASE + " and more"                          # small insertion at the end
    far = words_replaced(BASE, list(range(0, 66, 3)))  # every third word changed: J ~ 0
    other = "A completely different text about sailing boats on the northern lakes during the long summer months"
    recs = [text(1, other), text(2, BASE), text(3, v1), text(4, far), text(5, v2)]
    assert exact_j(BASE, v1) >= 0.8 and exact_j(BASE, v2) >= 0.8 and exact_j(BASE, far) < 0.5
    dd, kept, removed = run(recs)
    assert [r.row for r in kept] == [1, 2, 4]
    assert [(r.record.row, r.reason, r.matched["row"], r.matched["cluster"]) for r in removed] == [
        (3, "near-duplicate", 2, 1), (5, "near-duplicate", 2, 1)]
    for r in removed:  # the reported Jaccard is the exact Jaccard of the shingle sets
        assert r.matched["jaccard"] == pytest.approx(exact_j(BASE, recs[r.record.row - 1].text), abs=1e-4)
    s = dd.summary()
    assert s["removed"] == {"exact-duplicate": 0, "near-duplicate": 2}
    assert s["duplicate_clusters"] == 1
    assert (s["bands"], s["rows"]) == (21, 6) and s["miss_rate_at_threshold"] < 0.002


def test_union_find_chain_keeps_earliest_and_reports_link():
    words = BASE.split()
    a = " ".join(words[:50])
    b = " ".join(words[3:53])   # A~B and B~C above 0.8 with these shifts? check with exact Jaccard below
    c = " ".join(words[6:56])
    ja, jb, jc = exact_j(a, b), exact_j(b, c), exact_j(a, c)
    assert ja >= 0.8 and jb >= 0.8 and jc < 0.8, (ja, jb, jc)
    dd, kept, removed = run([text(1, a), text(2, b), text(3, c)], batch=1)
    assert [r.row for r in kept] == [1]
    by_row = {r.record.row: r.matched for r in removed}
    assert by_row[2]["row"] == 1 and by_row[3]["row"] == 1 and by_row[3]["cluster"] == 0
    assert by_row[3]["jaccard"] == pytest.approx(jc, abs=1e-4)
    assert by_row[3]["linked_via"]["row"] == 2 and by_row[3]["linked_via"]["jaccard"] >= 0.8


def test_exact_and_near_share_cluster_representative():
    v = words_replaced(BASE, [20])
    recs = [text(1, BASE), text(2, v), text(3, v.upper())]
    _, kept, removed = run(recs)
    assert [r.row for r in kept] == [1]
    m = {r.record.row: (r.reason, r.matched) for r in removed}
    assert m[2][0] == "near-duplicate" and m[2][1]["row"] == 1
    assert m[3][0] == "exact-duplicate" and m[3][1]["row"] == 2 and m[3][1]["representative"]["row"] == 1


def test_empty_and_short_texts():
    recs = [
        text(1, "!!!"), text(2, "???"),            # both normalize to nothing: not duplicates of each other
        text(3, "!!!"),                              # identical raw text: exact duplicate of row 1
        text(4, "Hello world"), text(5, "hello, WORLD!"),  # 2 tokens < ngram: one shingle each, exact dup
        text(6, "hello there"),                      # short, different: kept
    ]
    _, kept, removed = run(recs)
    assert [r.row for r in kept] == [1, 2, 4, 6]
    assert [(r.record.row, r.reason, r.matched["row"]) for r in removed] == [(3, "exact-duplicate", 1), (5, "exact-duplicate", 4)]
    # near only: the two empty sets are still not duplicates; equal short texts are (Jaccard 1 on one shingle)
    _, kept, removed = run(recs, exact=False)
    assert [(r.record.row, r.reason, r.matched["row"], r.matched["jaccard"]) for r in removed] == [
        (5, "near-duplicate", 4, 1.0)]
    empty = set_matrix(np.zeros(0, np.int64), np.zeros(3, np.int64))
    assert pair_jaccard(empty, np.array([0]), np.array([1])).tolist() == [0.0]


def test_no_records_and_single_record():
    dd = Deduplicator()
    dd.finalize()
    assert dd.filter_batch([]) == ([], [])
    _, kept, removed = run([text(1, BASE)])
    assert len(kept) == 1 and not removed


def test_determinism_and_batching_independence():
    rng = random.Random(7)
    words = BASE.split()
    recs = []
    for i in range(60):
        w = list(words)
        for _ in range(rng.randrange(0, 6)):
            w[rng.randrange(len(w))] = rng.choice(["alpha", "beta", "gamma", "delta"])
        recs.append(text(i + 1, " ".join(w[: rng.randrange(40, len(w))])))
    out = []
    for batch in (1, 7, 1000):
        _, kept, removed = run(recs, batch=batch)
        out.append(([r.row for r in kept], [(r.record.row, r.reason, r.matched["row"], r.matched["jaccard"]) for r in removed]))
    assert out[0] == out[1] == out[2]
    assert out[0][1]  # there are duplicates in this family


def test_filter_batch_in_a_different_order():
    recs = [text(1, BASE), text(2, words_replaced(BASE, [5])), text(3, "unrelated short text here")]
    dd = Deduplicator()
    dd.add_batch(recs)
    dd.finalize()
    kept, removed = dd.filter_batch(list(reversed(recs)))
    assert [r.row for r in kept] == [3, 1] and [r.record.row for r in removed] == [2]
    with pytest.raises(KeyError):
        dd.filter_batch([text(99, "never seen")])


# ---------------------------------------------------------------------------------------------------------------
# fast path vs reference, and vs datasketch


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from(list("ab cD,.\n\t1é_-Ａ'")), max_size=40), min_size=1, max_size=6),
       st.integers(1, 6), st.sampled_from(["space", "delete", "keep"]))
def test_vectorized_shingles_match_reference(texts, n, punctuation):
    norm = Normalizer(punctuation=punctuation)
    docs = [norm.normalize_bytes(t) for t in texts]
    tok, off = token_hashes(docs)
    sh, soff = shingle_hashes(tok, off, n)
    for i, t in enumerate(texts):
        assert set(sh[soff[i]:soff[i + 1]].tolist()) == reference_shingle_set(t, norm, n)
        assert docs[i].split() == norm.normalize(t).encode().split()


def test_signatures_bit_identical_to_datasketch_affine32():
    from datasketch import MinHash

    texts = [BASE, words_replaced(BASE, [3, 9]), "short text", ""]
    norm = Normalizer()
    tok, off = token_hashes([norm.normalize_bytes(t) for t in texts])
    sh, soff = shingle_hashes(tok, off, 5)
    sig = MinHasher(128, seed=1).signatures(sh, soff)
    for i in range(len(texts)):
        m = MinHash(num_perm=128, seed=1, hashfunc=lambda v: v)
        m.update_batch(fold32(sh[soff[i]:soff[i + 1]]).tolist())
        assert np.array_equal(m.hashvalues, sig[i])


def test_jaccard_estimates_agree_with_datasketch_within_tolerance():
    """Our estimate (own hashing) and datasketch's (SHA-1 of the shingle strings) both estimate the same exact
    Jaccard; each has standard deviation sqrt(J(1-J)/k), so they differ by less than 4*sqrt(2J(1-J)/k)."""
    from datasketch import MinHash

    k = 128
    norm = Normalizer()
    rng = random.Random(3)
    vocab = [f"w{i}" for i in range(400)]
    base = [rng.choice(vocab) for _ in range(300)]
    diffs = []
    for changes in (0, 5, 15, 30, 60, 120, 300):
        other = list(base)
        for p in rng.sample(range(300), changes):
            other[p] = rng.choice(vocab) + "x"
        a, b = " ".join(base), " ".join(other)
        sets = []
        ours = []
        for t in (a, b):
            toks = norm.normalize(t).split()
            sets.append({" ".join(toks[i:i + 5]) for i in range(len(toks) - 4)})
            d = [norm.normalize_bytes(t)]
            tok, off = token_hashes(d)
            sh, soff = shingle_hashes(tok, off, 5)
            ours.append(MinHasher(k, seed=1).signatures(sh, soff)[0])
        true_j = len(sets[0] & sets[1]) / len(sets[0] | sets[1])
        m1, m2 = MinHash(num_perm=k), MinHash(num_perm=k)
        m1.update_batch([s.encode() for s in sets[0]])
        m2.update_batch([s.encode() for s in sets[1]])
        ds = m1.jaccard(m2)
        est = float(np.mean(ours[0] == ours[1]))
        tol = 4 * math.sqrt(max(2 * true_j * (1 - true_j), 1e-9) / k) + 1e-9
        assert abs(est - ds) <= tol, (changes, true_j, est, ds)
        assert abs(est - true_j) <= 4 * math.sqrt(max(true_j * (1 - true_j), 1e-9) / k) + 1e-9
        diffs.append(est - true_j)
    assert abs(np.mean(diffs)) < 0.05  # no systematic bias


def test_lsh_band_choice_and_miss_rate():
    assert choose_bands(0.8, 128) == (21, 6)
    assert miss_rate(0.8, 21, 6) < 0.002
    # datasketch's automatic choice for 0.8/128 (9 bands x 13 rows) misses most pairs at exactly 0.8
    assert miss_rate(0.8, 9, 13) > 0.5
    dd = Deduplicator(threshold=0.7, num_perm=64)
    assert dd.config.columns <= 64 and miss_rate(0.7, dd.config.bands, dd.config.rows) <= 0.01
    with pytest.raises(ValueError):
        Deduplicator(bands=30, rows=6)


# ---------------------------------------------------------------------------------------------------------------
# the pure steps (what a distributed engine runs per batch / per partition) against plain references


@settings(max_examples=80, deadline=None)
@given(st.lists(st.lists(st.integers(0, 12), max_size=10), min_size=1, max_size=12), st.data())
def test_pair_jaccard_is_exact(sets, data):
    hashes = np.array([v for s in sets for v in s], dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    matrix = set_matrix(set_values(hashes), np.cumsum([0] + [len(s) for s in sets]))
    assert [len(set(s)) for s in sets] == np.diff(matrix.indptr).tolist()
    pairs = data.draw(st.lists(st.tuples(st.integers(0, len(sets) - 1), st.integers(0, len(sets) - 1)), max_size=20))
    a = np.array([p[0] for p in pairs], dtype=np.int64)
    b = np.array([p[1] for p in pairs], dtype=np.int64)
    got = pair_jaccard(matrix, a, b, chunk=3)
    for (x, y), j in zip(pairs, got):
        sx, sy = set(sets[x]), set(sets[y])
        assert j == (len(sx & sy) / len(sx | sy) if sx and sy else 0.0)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 25), st.lists(st.tuples(st.integers(0, 24), st.integers(0, 24)), max_size=40))
def test_connected_min_labels_matches_union_find(n, edges):
    edges = [(x % n, y % n) for x, y in edges]
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for x, y in edges:
        rx, ry = find(x), find(y)
        parent[max(rx, ry)] = min(rx, ry)
    a = np.array([e[0] for e in edges], dtype=np.int64)
    b = np.array([e[1] for e in edges], dtype=np.int64)
    assert connected_min_labels(n, a, b).tolist() == [find(i) for i in range(n)]


def test_exact_first_is_a_group_by_keeping_the_earliest_row():
    keys = np.array([[1, 2], [3, 4], [1, 2], [1, 3], [3, 4], [1, 2]], dtype=np.uint64)
    assert exact_first(keys).tolist() == [0, 1, 0, 3, 1, 0]
    assert exact_first(np.zeros((0, 2), np.uint64)).tolist() == []


@pytest.mark.parametrize("max_pairs", [1, 5, 1 << 22])
def test_band_collisions_yield_every_pair_sharing_a_band(max_pairs):
    rng = np.random.default_rng(5)
    keys = rng.integers(0, 4, size=(3, 40)).astype(np.uint64)  # (bands, docs): big buckets
    keys[1, :30] = 7  # one bucket of 30 documents: 435 pairs, cut into chunks when max_pairs is small
    got = [(int(x), int(y)) for a, b in band_collisions(keys, max_pairs=max_pairs) for x, y in zip(a, b)]
    want = [(i, j) for band in keys for i in range(40) for j in range(i + 1, 40) if band[i] == band[j]]
    assert sorted(got) == sorted(want) and all(i < j for i, j in got)


def test_screen_keeps_close_pairs_and_drops_distant_ones():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 1 << 32, size=126, dtype=np.uint64).astype(np.uint32)
    rows = [base.copy() for _ in range(4)]
    for row, changed in zip(rows[1:], (13, 44, 51)):  # 90%, 65% (the margin's edge), 60% of the columns equal
        row[rng.choice(126, changed, replace=False)] += 1
    screen = Screen(np.array(rows).astype(np.uint8))
    keep = screen.pairs(np.array([0, 0, 0]), np.array([1, 2, 3]), threshold=0.8, margin=0.15)
    assert keep.tolist() == [True, True, False]
    assert screen_miss_rate(0.8, 0.15, 126) < 1e-4


def test_sketches_do_not_depend_on_batching_and_the_deduplicator_pickles_mid_run():
    import pickle

    recs = [text(i + 1, words_replaced(BASE, [i % 60])) for i in range(12)] + [text(13, "unrelated text here")]
    cfg = DedupConfig()
    whole = sketch_batch(recs, cfg)
    parts = [sketch_batch(recs[i:i + 5], cfg) for i in range(0, len(recs), 5)]
    for name in ("exact_keys", "band_keys", "screen"):
        assert np.array_equal(getattr(whole, name), np.concatenate([getattr(p, name) for p in parts]))
    dd = Deduplicator()
    dd.add_batch(recs[:6])
    clone = pickle.loads(pickle.dumps(dd))  # holds arrays and a spill file path, no open file
    for d in (dd, clone):
        d.add_batch(recs[6:])
    kept = [[r.row for r in d.filter_batch(recs)[0]] for d in (dd, clone)]
    assert kept[0] == kept[1] == [1, 13]


def test_exact_repeats_are_compacted_away_and_change_nothing():
    recs = [text(i + 1, words_replaced(BASE, [i % 7]) if i % 3 else BASE) for i in range(40)]
    results = []
    for every in (1 << 16, 1):  # never compacted / compacted after every batch
        dd = Deduplicator()
        dd.compact_min_rows = every
        for i in range(0, len(recs), 4):
            dd.add_batch(recs[i:i + 4])
        if every == 1:  # after a compaction only the 8 distinct texts keep their sketches
            dd._compact()
            assert sum(len(r) for r in dd._near_rows) == 8
        kept, removed = dd.filter_batch(recs)
        results.append(([r.row for r in kept], [(r.record.row, r.reason, r.matched["row"]) for r in removed]))
    assert results[0] == results[1] and results[0][0] == [1]


def test_kept_set_equals_exact_all_pairs_clustering():
    """On families far above the threshold (LSH misses none of their pairs), the kept set is the earliest row of
    each connected component of the exact-Jaccard >= threshold graph over all pairs."""
    rng = random.Random(11)
    words = BASE.split()
    recs, texts = [], []
    for fam in range(6):
        base = [f"{w}{fam}" for w in words]
        for _ in range(rng.randrange(1, 5)):
            w = list(base)
            if rng.random() < 0.7:
                w[rng.randrange(len(w))] = "zebra"
            texts.append(" ".join(w))
    rng.shuffle(texts)
    recs = [text(i + 1, t) for i, t in enumerate(texts)]
    _, kept, _ = run(recs, batch=4)
    parent = list(range(len(texts)))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            if exact_j(texts[i], texts[j]) >= 0.8:
                ri, rj = find(i), find(j)
                parent[max(ri, rj)] = min(ri, rj)
    assert [r.row for r in kept] == [i + 1 for i in range(len(texts)) if find(i) == i]


# ---------------------------------------------------------------------------------------------------------------
# file API and CLI


def _write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_dedup_api_writes_input_rows_unchanged_with_provenance_and_report(tmp_path):
    rows = [
        {"instruction": "Summarize the text.", "input": BASE, "output": "A budget moved.", "id": "a"},
        {"instruction": "Summarize the text.", "input": words_replaced(BASE, [7]), "output": "A budget moved.", "id": "b"},
        {"instruction": "summarize the TEXT", "input": BASE, "output": "a budget moved", "id": "c"},
        {"instruction": "Say hi.", "output": "Hi!", "id": "d"},
    ]
    src = tmp_path / "in.jsonl"
    # key order and spacing of the input lines are kept byte for byte; line 3 is blank, line 4 is not JSON
    lines = [json.dumps(rows[0]), json.dumps(rows[1], indent=None, separators=(",", ":")), "", "{not json",
             json.dumps(rows[2]), json.dumps({"id": "d", "output": "Hi!", "instruction": "Say hi."})]
    src.write_text("\n".join(lines) + "\n")
    result = dedup([str(src)], tmp_path / "kept.jsonl", report=tmp_path / "removed.jsonl")
    assert result["rows_read"] == 4 and result["rows_kept"] == 2
    assert result["removed"] == {"exact-duplicate": 1, "near-duplicate": 1}
    assert result["skipped"] == {"malformed-json": 1}
    assert (tmp_path / "kept.jsonl").read_text().splitlines() == [lines[0], lines[5]]
    assert result["provenance"] == str(tmp_path / "kept.provenance.jsonl")
    provenance = [json.loads(l) for l in (tmp_path / "kept.provenance.jsonl").read_text().splitlines()]
    assert provenance == [{"source": str(src), "row": 1}, {"source": str(src), "row": 6}]
    report = [json.loads(l) for l in (tmp_path / "removed.jsonl").read_text().splitlines()]
    assert [(r["row"], r["reason"], r["matched"]["row"], r["input"]) for r in report] == [
        (2, "near-duplicate", 1, rows[1]), (5, "exact-duplicate", 1, rows[2])]
    assert result["cleaning"]["representative_rule"].startswith("earliest row")
    # JSONL to Parquet: the input's fields as columns
    import pyarrow.parquet as pq

    dedup([str(src)], tmp_path / "kept.parquet", near=False)
    assert pq.read_table(tmp_path / "kept.parquet").to_pylist() == [rows[0], rows[1], {**rows[3], "input": None}]


def test_dedup_keeps_fields_types_and_provenance_of_every_input_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"instruction": ["Say hi.", "say HI", "Count to three."], "output": ["Hi!", "hi", "1 2 3"],
                      "score": pa.array([1, 2, 3], pa.int32()), "tags": [["a"], [], ["b", "c"]]})
    pq.write_table(table, tmp_path / "a.parquet")
    pq.write_table(table.slice(0, 1), tmp_path / "b.parquet")
    (tmp_path / "c.json").write_text(json.dumps([{"instruction": "Count to three.", "output": "1 2 3", "n": 1},
                                                 {"instruction": "Name a color.", "output": "Red.", "n": 2}]))
    result = dedup([str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")], tmp_path / "kept.parquet")
    kept = pq.read_table(tmp_path / "kept.parquet")
    assert kept.schema == table.schema  # the inputs' own column types (int32 stays int32)
    assert kept.to_pylist() == [table.to_pylist()[0], table.to_pylist()[2]]
    assert result["removed"] == {"exact-duplicate": 2}
    result = dedup([str(tmp_path / "a.parquet"), str(tmp_path / "c.json")], tmp_path / "kept.jsonl",
                   provenance=tmp_path / "where.jsonl")
    assert [json.loads(l) for l in (tmp_path / "kept.jsonl").read_text().splitlines()] == [
        table.to_pylist()[0], table.to_pylist()[2], {"instruction": "Name a color.", "output": "Red.", "n": 2}]
    assert [json.loads(l) for l in (tmp_path / "where.jsonl").read_text().splitlines()] == [
        {"source": str(tmp_path / "a.parquet"), "row": 1}, {"source": str(tmp_path / "a.parquet"), "row": 3},
        {"source": str(tmp_path / "c.json"), "row": 2}]


def test_dedup_refuses_to_write_over_an_input(tmp_path):
    src = tmp_path / "in.jsonl"
    _write_jsonl(src, [{"text": BASE}])
    for kwargs in ({"output": src}, {"output": tmp_path / "o.jsonl", "report": src},
                   {"output": tmp_path / "o.jsonl", "provenance": src}):
        with pytest.raises(DataError, match="also an input"):
            dedup([str(src)], **kwargs)
    assert json.loads(src.read_text()) == {"text": BASE}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_dedup_then_build_equals_build_with_dedup(tmp_path):
    """Standalone dedup writes the input rows, so building its output gives the examples build --dedup gives
    (Alpaca rows keep their instruction/input fields, which the alpaca template renders)."""
    from conftest import REPO, TINY_TOKENIZER

    from sftdata.build import build

    base = [json.loads(l) for l in (REPO / "examples" / "data" / "alpaca.jsonl").read_text().splitlines()[:24]]
    rows = list(base)
    rows.insert(5, {**base[2], "instruction": base[2]["instruction"].upper()})       # exact duplicate of row 3
    long_row = max(base, key=lambda r: len(r["response"].split()))
    words = long_row["response"].split()
    rows.insert(11, {**long_row, "response": " ".join(words[:-1] + ["zebra"])})       # near duplicate
    src = tmp_path / "train.jsonl"
    _write_jsonl(src, rows)
    options = dict(template="alpaca", tokenizer=str(TINY_TOKENIZER), force=True)
    direct = build([str(src)], output=tmp_path / "direct", dedup=True, **options)
    summary = dedup([str(src)], tmp_path / "kept.jsonl")
    assert summary["removed"] == {"exact-duplicate": 1, "near-duplicate": 1}
    two_step = build([str(tmp_path / "kept.jsonl")], output=tmp_path / "two_step", **options)

    def examples(out: Path) -> list[tuple]:
        import pyarrow.parquet as pq

        manifest = json.loads((out / "manifest.json").read_text())
        return [(r["input_ids"], r["labels"]) for f in manifest["splits"]["train"]["files"]
                for r in pq.read_table(out / f).to_pylist()]

    assert direct.manifest["counts"]["rows_kept"] == two_step.manifest["counts"]["rows_kept"] == 24
    assert examples(tmp_path / "direct") == examples(tmp_path / "two_step")


def test_cli_dedup(tmp_path):
    from click.testing import CliRunner

    from sftdata.cli_clean import dedup as dedup_cmd

    src = tmp_path / "in.jsonl"
    _write_jsonl(src, [{"text": BASE}, {"text": BASE.upper()}, {"text": words_replaced(BASE, [4])}])
    res = CliRunner().invoke(dedup_cmd, [str(src), "--output", str(tmp_path / "o.jsonl"), "--no-near", "--json",
                                         "--provenance", str(tmp_path / "where.jsonl")])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{"):])
    assert summary["removed"] == {"exact-duplicate": 1} and summary["provenance"] == str(tmp_path / "where.jsonl")
    assert [json.loads(l)["row"] for l in (tmp_path / "where.jsonl").read_text().splitlines()] == [1, 3]
    res = CliRunner().invoke(dedup_cmd, [str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 1 and "missing.jsonl" in res.output


def test_cli_dedup_names_bad_rows_with_their_kind(tmp_path):
    # Regression: "[ingest/missing-field]" was passed to rich as markup and vanished from the message.
    from click.testing import CliRunner

    from sftdata.cli_clean import dedup as dedup_cmd

    src = tmp_path / "in.jsonl"
    _write_jsonl(src, [{"instruction": "a", "output": "b"}, {"instruction": "x"}])
    res = CliRunner().invoke(dedup_cmd, [str(src), "--format", "alpaca", "-o", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 0, res.output
    assert f"{src}:2: [ingest/missing-field] missing field 'output'" in res.output


# ---------------------------------------------------------------------------------------------------------------
# real corpus (GPTeacher holds near duplicates)


def _shared(name: str) -> Path:
    return shared_path("data", name)


def test_gpteacher_toolformer_near_duplicates_are_verified(tmp_path):
    path = _shared("gpteacher_toolformer.json")
    result = dedup([str(path)], tmp_path / "kept.jsonl", report=tmp_path / "rem.jsonl")
    assert result["removed"].get("near-duplicate", 0) > 100
    report = [json.loads(l) for l in (tmp_path / "rem.jsonl").read_text().splitlines()]
    for r in report:
        m = r["matched"]
        assert (m["row"], m["source"]) != (r["row"], r["source"]) and m["row"] < r["row"]
        if r["reason"] == "near-duplicate":  # verified: the edge that linked it is >= threshold
            assert m.get("linked_via", m)["jaccard"] >= 0.8 - 1e-4
    s = result["cleaning"]
    assert s["candidate_pairs"] >= s["verified_pairs"] > 0
