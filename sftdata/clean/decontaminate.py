"""Eval-set decontamination: remove training rows that contain (or restate) an eval item.

Two detectors share one normalization and tokenization, applied identically to eval and training text
(:mod:`sftdata.clean.normalize` with ``punctuation="delete"``: case, punctuation, whitespace, line wrapping and
Unicode forms never hide a copy, whether its punctuation was kept, changed or stripped; digits are kept):

``ngram`` (copies). Every eval segment (one field of one eval row, e.g. a GSM8K ``question``, a HumanEval
``prompt``, one MT-bench turn) is cut into word ``n``-grams (default 8; segments shorter than ``n`` tokens but
at least ``min_tokens`` long are one gram of all their tokens). A training row's overlap with a segment is the
fraction of the segment's distinct n-grams that occur anywhere in the row (its text with roles, all turns). The
row is contaminated when the overlap is at least ``min_overlap`` (default 0.5). This catches verbatim copies,
copies embedded in longer text, question-only leaks (the eval question with a different or no answer), and
copies with case / punctuation / whitespace / line-wrapping changes (punctuation stripped included), all at
overlap 1.0.

``rephrase`` (restated items; n-gram tools catch ~0% of these). A rephrasing keeps what the item is *about*:
its numbers, names and rare content words. Each segment's content tokens (no stopwords) are weighted by inverse
document frequency over the eval segments; the score of a row against a segment is the weighted fraction of the
segment's content tokens present in the row. A row is flagged when the score is at least ``rephrase_threshold``
(default 0.75), every number of the segment occurs in the row, and the segment has at least
``rephrase_min_terms`` content tokens. Candidates come from an inverted index over the rare tokens (eval
document frequency <= ``rare_df``), so the scan stays vectorized. Measured recall and false positives are in
``bench/bench_decontam.py`` and ``docs/cleaning.md``; it is a heuristic with a measured error, not a proof.

Each removal names the eval file, row (1-based), id, field, the overlap / score and the method.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable

import numpy as np

from sftdata.arrays import concat_ranges, sorted_unique
from sftdata.clean.io import EvalSegment, load_eval_segments
from sftdata.clean.normalize import Normalizer, shingle_hashes, token_hashes
from sftdata.record import Record, Removal

U64 = np.uint64

STOPWORDS = """a about above after again against all am an and any are as at be because been before being below between
both but by can could did do does doing down during each few for from further had has have having he her here hers
herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off on once
only or other our ours ourselves out over own same she should so some such than that the their theirs them themselves
then there these they this those through to too under until up very was we were what when where which while who whom
why will with would you your yours yourself yourselves s t also many much one two three four five six seven eight nine
ten first second given write return returns function number numbers list string str int float def python code example
following find get make use using new let us may might must shall per each every total many how what""".split()



# Punctuation is deleted, not replaced by a space: a copy whose punctuation was stripped ("dont", "1000",
# "hascloseelements") then gives the same tokens as the eval text ("don't", "1,000", "has_close_elements").
EVAL_NORMALIZER = Normalizer(punctuation="delete")


class _GramIndex:
    """Sorted unique gram hashes with CSR postings to segment ids, and a direct-mapped lookup table."""

    def __init__(self, grams: np.ndarray, segs: np.ndarray):
        order = np.lexsort((segs, grams))
        grams, segs = grams[order], segs[order]
        keep = np.ones(len(grams), dtype=bool)
        keep[1:] = (grams[1:] != grams[:-1]) | (segs[1:] != segs[:-1])
        grams, segs = grams[keep], segs[keep]
        first = np.ones(len(grams), dtype=bool)
        first[1:] = grams[1:] != grams[:-1]
        self.keys = grams[first]
        starts = np.flatnonzero(first)
        self.post_off = np.append(starts, len(grams)).astype(np.int64)
        self.post_seg = segs.astype(np.int64)
        # direct-mapped table on the top bits of the hash: slot -> key id, -1 empty, -2 shared by several keys
        bits = max(16, int(len(self.keys) * 8).bit_length())
        self.shift = U64(64 - bits)
        slot = (self.keys >> self.shift).astype(np.int64)
        self.table = np.full(1 << bits, -1, dtype=np.int32)
        uniq, first_at, n_at = np.unique(slot, return_index=True, return_counts=True)
        self.table[uniq] = np.where(n_at == 1, first_at, -2).astype(np.int32)

    def lookup(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(positions in h, key ids)`` of the hashes present in the index."""
        if len(self.keys) == 0 or len(h) == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        t = self.table[(h >> self.shift).astype(np.intp)]
        sel = np.flatnonzero(t != -1)
        if not len(sel):
            return sel, sel
        cand = t[sel].astype(np.int64)
        shared = cand == -2
        if shared.any():  # rare: several keys in one slot, binary search those
            p = np.searchsorted(self.keys, h[sel[shared]])
            p[p == len(self.keys)] = 0
            cand[shared] = p
        ok = self.keys[cand] == h[sel]
        return sel[ok], cand[ok]

    def expand(self, rows: np.ndarray, key_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For (row, key) hits, all (row, segment) pairs through the postings."""
        postings, offsets = concat_ranges(self.post_off[key_ids], self.post_off[key_ids + 1])
        return np.repeat(rows, np.diff(offsets)), self.post_seg[postings]


class Decontaminator:
    """Removes training rows that overlap eval sets (see the module docstring for the methods and defaults)."""

    stage = "decontaminate"

    def __init__(
        self,
        eval_paths: list[str] | None = None,
        *,
        fields: Iterable[str] | str | None = None,
        ngram: int = 8,
        min_overlap: float = 0.5,
        min_tokens: int = 8,
        normalize: Normalizer | dict[str, Any] | str | None = None,
        rephrase: bool = True,
        rephrase_threshold: float = 0.75,
        rephrase_min_terms: int = 6,
        rare_df: int | None = None,
        rephrase_min_rare: int = 3,
        rephrase_max_numbers: int = 5,
        segments: list[EvalSegment] | None = None,
    ):
        if segments is None:
            if not eval_paths:
                raise ValueError("give eval_paths (eval files) or segments")
            segments = load_eval_segments(eval_paths, fields)
        self.eval_paths = list(eval_paths or sorted({s.file for s in segments}))
        self.segments = segments
        self.ngram = int(ngram)
        self.min_overlap = float(min_overlap)
        self.min_tokens = int(min_tokens)
        self.normalizer = Normalizer.from_spec(normalize, base=EVAL_NORMALIZER)
        # content terms split at punctuation: `has_close_elements(numbers: List[float])` gives has, close, elements,
        # numbers, list, float, the words a restatement uses (deleting would give hascloseelements, listfloat)
        self.term_normalizer = (dataclasses.replace(self.normalizer, punctuation="space")
                                if self.normalizer.punctuation == "delete" else self.normalizer)
        self.rephrase = rephrase
        self.rephrase_threshold = float(rephrase_threshold)
        self.rephrase_min_terms = int(rephrase_min_terms)
        self.rephrase_min_rare = int(rephrase_min_rare)
        self.rephrase_max_numbers = int(rephrase_max_numbers)
        self.counts = {"rows_seen": 0, "removed": 0, "by_method": {"ngram": 0, "rephrase": 0}}
        self._build()
        self.rare_df = int(rare_df) if rare_df is not None else max(3, math.ceil(0.01 * len(segments)))
        self._build_terms()

    # -- index ----------------------------------------------------------------------------------------------------
    def _build(self) -> None:
        docs = [self.normalizer.normalize_bytes(s.text) for s in self.segments]
        tok, off = token_hashes(docs)
        ntok = np.diff(off)
        n = self.ngram
        grams: list[np.ndarray] = []
        segs: list[np.ndarray] = []
        seg_ngrams = np.zeros(len(self.segments), dtype=np.int64)
        self.lengths = [n]
        long_ids = np.flatnonzero(ntok >= n)
        sh, soff = shingle_hashes(tok, off, n)
        per = np.diff(soff)
        mask = np.repeat(ntok >= n, per)
        grams.append(sh[mask])
        segs.append(np.repeat(np.arange(len(ntok)), per)[mask])
        for k in sorted(set(ntok[(ntok < n) & (ntok >= self.min_tokens)].tolist())):
            ids = np.flatnonzero(ntok == k)
            sh_k, soff_k = shingle_hashes(tok, off, k)
            first = soff_k[ids]  # a k-token segment has exactly one k-gram
            grams.append(sh_k[first])
            segs.append(ids)
            self.lengths.append(k)
        g = np.concatenate(grams)
        s = np.concatenate(segs)
        self.index = _GramIndex(g, s)
        # distinct grams per segment
        if len(g):
            pair = np.unique(np.stack([s.astype(np.int64), g.view(np.int64)], axis=1), axis=0)
            seg_ngrams = np.bincount(pair[:, 0], minlength=len(self.segments))
        self.seg_ngrams = seg_ngrams
        self.too_short = int(np.count_nonzero(ntok < self.min_tokens))
        del long_ids

    def _build_terms(self) -> None:
        """Content-token index for the rephrase detector."""
        tn = self.term_normalizer
        stop_h, _ = token_hashes([tn.normalize_bytes(w) for w in STOPWORDS])
        stop = sorted_unique(stop_h)
        tok, off = token_hashes([tn.normalize_bytes(s.text) for s in self.segments])
        nseg = len(self.segments)
        seg_of = np.repeat(np.arange(nseg), np.diff(off))
        # token byte lengths and digit-ness from the normalized text (build time only: eval sets are small)
        is_num = np.zeros(len(tok), dtype=bool)
        short = np.zeros(len(tok), dtype=bool)
        i = 0
        for s in self.segments:
            for t in tn.normalize_bytes(s.text).split():
                is_num[i] = t.isdigit()
                short[i] = len(t) < 2 and not t.isdigit()
                i += 1
        assert i == len(tok)
        content = ~np.isin(tok, stop) & ~short
        pairs = np.unique(np.stack([seg_of[content], tok[content].view(np.int64)], axis=1), axis=0)
        num_pairs = np.unique(np.stack([seg_of[content & is_num], tok[content & is_num].view(np.int64)], axis=1), axis=0)
        terms, inv, df = np.unique(pairs[:, 1].view(U64), return_inverse=True, return_counts=True)
        weight = np.log((nseg + 1) / df)  # idf over eval segments
        self._terms = terms
        self._term_weight = weight
        self._term_df = df
        pair_seg = pairs[:, 0]
        pair_term = inv.ravel()
        self._seg_weight = np.bincount(pair_seg, weights=weight[pair_term], minlength=nseg)
        self._seg_terms = np.bincount(pair_seg, minlength=nseg)
        # per segment: its terms (sorted hashes) and numbers, for the exact score of a candidate
        order = np.lexsort((pair_term, pair_seg))
        self._seg_term_ids = pair_term[order]
        self._seg_term_off = np.zeros(nseg + 1, dtype=np.int64)
        np.cumsum(self._seg_terms, out=self._seg_term_off[1:])
        num_term = np.searchsorted(terms, num_pairs[:, 1].view(U64)) if len(num_pairs) else np.zeros(0, dtype=np.int64)
        nterms = len(terms)
        self._term_is_num = np.zeros(nterms, dtype=bool)
        if len(num_pairs):
            self._term_is_num[num_term] = True
        self._seg_nnum = np.bincount(pair_seg[self._term_is_num[pair_term]], minlength=nseg)
        rare = df <= self.rare_df
        self._term_rare = rare
        sel = rare[pair_term]
        # CSR postings term id -> segments, for rare terms only
        rt, rs = pair_term[sel], pair_seg[sel]
        order = np.lexsort((rs, rt))
        rt, rs = rt[order], rs[order]
        self._post_off = np.zeros(nterms + 1, dtype=np.int64)
        np.cumsum(np.bincount(rt, minlength=nterms), out=self._post_off[1:])
        self._post_seg = rs.astype(np.int64)
        self._seg_rare = np.bincount(rs, minlength=nseg)
        self._term_index = _GramIndex(terms, np.arange(nterms))

    # -- scan -----------------------------------------------------------------------------------------------------
    def scan(self, records: list[Record]) -> list[dict[str, Any] | None]:
        """For each record, its best eval match (a ``matched`` dict) if it is contaminated, else None.

        Each record is tokenized as two documents: its prompt side (system / user / tool turns, or the whole raw
        text) and its assistant side; n-grams are looked up in both, the rephrase detector reads the prompt side.
        """
        prompts, answers = [], []
        for r in records:
            if r.messages is None:
                prompts.append(r.text or "")
                answers.append("")
            else:
                prompts.append("\n".join(f"{m.role}: {m.content}" for m in r.messages if m.role != "assistant"))
                answers.append("\n".join(f"{m.role}: {m.content}" for m in r.messages if m.role == "assistant"))
        nb = self.normalizer.normalize_bytes
        tok, off = token_hashes([nb(t) for pair in zip(prompts, answers) for t in pair])
        terms = None
        if self.rephrase and self.term_normalizer != self.normalizer:
            terms = token_hashes([self.term_normalizer.normalize_bytes(t) for t in prompts])
        return self.scan_tokens(tok, off, terms)

    def scan_tokens(self, tok: np.ndarray, off: np.ndarray,
                    terms: tuple[np.ndarray, np.ndarray] | None = None) -> list[dict[str, Any] | None]:
        """``tok``/``off`` as from :func:`token_hashes` over two documents per record (prompt side, answer side);
        ``terms``: the prompt sides tokenized with :attr:`term_normalizer` (one document per record) when it differs
        from :attr:`normalizer`."""
        D = (len(off) - 1) // 2
        result: list[dict[str, Any] | None] = [None] * D
        nkeys = max(len(self.index.keys), 1)
        rows_l, keys_l = [], []
        for k in self.lengths:
            sh, soff = shingle_hashes(tok, off, k)
            pos, key = self.index.lookup(sh)
            if len(pos):
                rows_l.append((np.searchsorted(soff, pos, side="right") - 1) // 2)
                keys_l.append(key)
        if rows_l:
            code = sorted_unique(np.concatenate(rows_l) * nkeys + np.concatenate(keys_l))
            rows, keys = np.divmod(code, nkeys)
            r, sg = self.index.expand(rows, keys)
            nseg = len(self.segments)
            pair, cnt = np.unique(r * nseg + sg, return_counts=True)
            pr, ps = np.divmod(pair, nseg)
            overlap = cnt / np.maximum(self.seg_ngrams[ps], 1)
            hit = np.flatnonzero(overlap >= self.min_overlap - 1e-12)
            # best segment per row: highest overlap, then lowest segment index
            for i in hit[np.lexsort((ps[hit], -overlap[hit], pr[hit]))].tolist():
                row = int(pr[i])
                if result[row] is None:
                    seg = int(ps[i])
                    result[row] = self._match(seg, "ngram", overlap=round(float(overlap[i]), 4),
                                              matched_ngrams=int(cnt[i]), eval_ngrams=int(self.seg_ngrams[seg]),
                                              ngram=self.ngram)
        if self.rephrase:
            if terms is None:  # the prompt sides of tok/off
                counts_doc = np.diff(off)
                prompt_off = np.zeros(D + 1, dtype=np.int64)
                np.cumsum(counts_doc[0::2], out=prompt_off[1:])
                terms = tok[np.repeat(np.arange(2 * D) % 2 == 0, counts_doc)], prompt_off
            self._scan_rephrase(*terms, result)
        return result

    def _scan_rephrase(self, prompt_tok: np.ndarray, prompt_off: np.ndarray,
                       result: list[dict[str, Any] | None]) -> None:
        pos, tid = self._term_index.lookup(prompt_tok)
        if not len(pos):
            return
        row_of = np.searchsorted(prompt_off, pos, side="right") - 1
        T = len(self._terms)
        hitcode = sorted_unique(row_of * T + tid)
        rows, tids = np.divmod(hitcode, T)
        rare = self._term_rare[tids]
        rows, tids = rows[rare], tids[rare]
        postings, offsets = concat_ranges(self._post_off[tids], self._post_off[tids + 1])
        if postings.size == 0:
            return
        r = np.repeat(rows, np.diff(offsets))
        sg = self._post_seg[postings]
        nseg = len(self.segments)
        pair, cnt = np.unique(r * nseg + sg, return_counts=True)
        pr, ps = np.divmod(pair, nseg)
        need = np.minimum(self.rephrase_min_rare, self._seg_rare[ps])
        ok = (cnt >= need) & (self._seg_terms[ps] >= self.rephrase_min_terms)
        if not ok.any():
            return
        pr, ps = pr[ok], ps[ok]
        # exact weighted score of every candidate (row, segment): which of the segment's terms the row has
        terms, offsets = concat_ranges(self._seg_term_off[ps], self._seg_term_off[ps + 1])
        lens = np.diff(offsets)
        cand = np.repeat(np.arange(len(ps)), lens)
        st = self._seg_term_ids[terms]
        q = pr[cand] * T + st
        at = np.searchsorted(hitcode, q)
        at[at == len(hitcode)] = 0
        present = hitcode[at] == q
        score = np.bincount(cand, weights=self._term_weight[st] * present, minlength=len(ps)) / self._seg_weight[ps]
        nums = self._term_is_num[st]
        num_total = np.bincount(cand, weights=nums, minlength=len(ps))
        num_hit = np.bincount(cand, weights=nums & present, minlength=len(ps))
        # numbers are the problem in short numeric items (all must occur); in code with many doctest numbers
        # (more than rephrase_max_numbers distinct ones) they are examples and are not required
        num_ok = (num_total > self.rephrase_max_numbers) | (num_hit >= num_total)
        flag = np.flatnonzero((score >= self.rephrase_threshold - 1e-12) & num_ok)
        matched_terms = np.bincount(cand, weights=present, minlength=len(ps))
        for i in flag[np.lexsort((ps[flag], -score[flag], pr[flag]))].tolist():
            row = int(pr[i])
            if result[row] is None:
                result[row] = self._match(int(ps[i]), "rephrase", overlap=round(float(score[i]), 4),
                                          matched_terms=int(matched_terms[i]), eval_terms=int(lens[i]))

    def _match(self, seg: int, method: str, **measure: Any) -> dict[str, Any]:
        s = self.segments[seg]
        return {"file": s.file, "index": s.index, "id": s.id, "field": s.field, "method": method, **measure}

    def filter_batch(self, records: list[Record]) -> tuple[list[Record], list[Removal]]:
        matches = self.scan(records)
        kept: list[Record] = []
        removed: list[Removal] = []
        for rec, m in zip(records, matches):
            if m is None:
                kept.append(rec)
                continue
            if m["method"] == "ngram":
                detail = (f"overlaps eval item {m['file']}:{m['index']} ({m['field']}, id {m['id']}): "
                          f"{m['matched_ngrams']}/{m['eval_ngrams']} of its {self.ngram}-grams")
            else:
                detail = (f"restates eval item {m['file']}:{m['index']} ({m['field']}, id {m['id']}): "
                          f"weighted content-term score {m['overlap']:.2f}")
            removed.append(Removal(rec, self.stage, "contaminated", detail, m))
            self.counts["by_method"][m["method"]] += 1
        self.counts["rows_seen"] += len(records)
        self.counts["removed"] += len(removed)
        return kept, removed

    def summary(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "eval_files": self.eval_paths,
            "eval_segments": len(self.segments),
            "eval_segments_too_short": self.too_short,
            "ngram": self.ngram,
            "min_overlap": self.min_overlap,
            "min_tokens": self.min_tokens,
            "rephrase": self.rephrase,
            "rephrase_threshold": self.rephrase_threshold,
            "rephrase_min_terms": self.rephrase_min_terms,
            "rare_df": self.rare_df,
            "rephrase_min_rare": self.rephrase_min_rare,
            "rephrase_max_numbers": self.rephrase_max_numbers,
            "normalization": self.normalizer.to_dict(),
            "rephrase_normalization": self.term_normalizer.to_dict(),
            "rows_seen": self.counts["rows_seen"],
            "removed": {"contaminated": self.counts["removed"]},
            "removed_by_method": dict(self.counts["by_method"]),
        }
