"""Decontamination benchmark: recall per leak kind, false positives on clean data, examples/s per core.

Eval sets: GSM8K test (``question``), HumanEval (``prompt``), MT-bench (``turns``) from ../shared/data.
Planted leaks (a GSM8K test question or a HumanEval prompt inside a training example):
  verbatim       the eval text as the user turn, its answer / solution as the assistant turn
  embedded       wrapped in unrelated text before and after
  rewrapped      re-wrapped at 40 columns, runs of spaces / tabs, code re-indented
  noisy          case changes, punctuation added / removed, whitespace changes
  noised         every punctuation character deleted, lower-cased, words double-spaced
  question-only  the eval question with another problem's answer
  rephrased      a rule-based rephrasing (synonyms, sentence order, framing; numbers kept, function names
                 dropped). An LLM rephrasing is harder; this measures the easy end of the problem.
  rephrased-hard the same, then 20% of the non-number words dropped and a filler word every 5 words, so that
                 no 8-gram survives (as with most LLM rephrasings): only the content words and numbers remain.
Clean data: GSM8K train, CodeAlpaca, GPTeacher x3, ShareGPT. Flags there are false positives unless the row
really restates an eval item (CodeAlpaca is reported to hold rephrased HumanEval problems): the flagged rows are
printed for audit.

    python bench/bench_decontam.py
"""

from __future__ import annotations

import random
import re
import string
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"

from sftdata.clean import Decontaminator, load_eval_segments  # noqa: E402
from sftdata.ingest import read_records  # noqa: E402
from sftdata.record import Message, Record  # noqa: E402

EVAL = [str(DATA / "gsm8k_test.jsonl"), str(DATA / "HumanEval.jsonl.gz"), str(DATA / "mt_bench_questions.jsonl")]
KINDS = ["verbatim", "embedded", "rewrapped", "noisy", "noised", "question-only", "rephrased", "rephrased-hard"]

SYN = {"has": "owns", "have": "own", "bought": "purchased", "buys": "purchases", "buy": "purchase", "each": "every",
       "total": "overall", "earns": "makes", "earn": "make", "gives": "hands", "gave": "handed", "wants": "would like",
       "needs": "requires", "spent": "paid", "spend": "pay", "left": "remaining", "altogether": "in all",
       "how many": "what number of", "how much": "what amount of", "then": "after that", "also": "additionally",
       "return": "give back", "returns": "gives back", "given": "provided", "list": "array", "check": "determine",
       "number": "value", "numbers": "values", "string": "text", "find": "compute", "if": "whether", "sold": "sold off",
       "friends": "pals", "per": "for each", "day": "day", "price": "cost", "cost": "price", "more": "extra",
       "is": "is", "are": "are", "will": "is going to", "can": "is able to", "does": "would", "did": "would"}
FILLER_BEFORE = ["I found this problem in an old workbook and I am stuck. ", "Quick question from my study group. ",
                 "Here is something my teacher assigned yesterday, please help. "]
FILLER_AFTER = [" Please explain every step clearly.", " Thanks a lot in advance!", " Show your reasoning."]


def rephrase(text: str, kind: str, rng: random.Random) -> str:
    if kind == "code":  # keep the docstring's description only, drop signature, names and doctests
        m = re.search(r'"""(.*?)(>>>|Example|For example|"""|$)', text, re.S) or re.search(r"'''(.*?)(>>>|''')", text, re.S)
        desc = " ".join((m.group(1) if m else text).split())
        text = "Write a function that does the following. " + desc
    sents = re.split(r"(?<=[.?!])\s+", text.strip())
    out = []
    for s in sents:
        for k, v in SYN.items():
            s = re.sub(rf"\b{k}\b", v, s, flags=re.I)
        out.append(s)
    if len(out) > 2:  # ask the question first, then give the situation
        out = [out[-1], "Here is the situation:"] + out[:-1]
    return " ".join(out)


def wrap(text: str, width: int = 40) -> str:
    lines, line = [], ""
    for w in text.split():
        if len(line) + len(w) + 1 > width:
            lines.append(line)
            line = w
        else:
            line = f"{line}  {w}" if line and len(line) % 3 == 0 else (f"{line} {w}" if line else w)
    return "\n".join(lines + [line])


def noisy(text: str, rng: random.Random) -> str:
    out = []
    for w in text.split(" "):
        w = w.upper() if rng.random() < 0.25 else w
        w = w.rstrip(",.;") if rng.random() < 0.3 else w + rng.choice(["", "", ",", " -"])
        out.append(w)
    return rng.choice([" ", "  "]).join(out)


def noised(text: str) -> str:
    """Punctuation deleted (``string.punctuation``: apostrophes, decimal points, underscores ...), lower-cased,
    double-spaced."""
    return "  ".join(text.translate(str.maketrans("", "", string.punctuation)).lower().split())


def make_leaks(seed: int = 0):
    rng = random.Random(seed)
    gsm = [s for s in load_eval_segments([EVAL[0]])]
    he = [s for s in load_eval_segments([EVAL[1]])]
    import gzip
    import json

    sol = {json.loads(l)["task_id"]: json.loads(l)["canonical_solution"] for l in gzip.open(EVAL[1], "rt")}
    ans = {json.loads(l)["question"]: json.loads(l)["answer"] for l in open(EVAL[0])}
    train_answers = [json.loads(l)["answer"] for l in open(DATA / "gsm8k_train.jsonl")]
    items = [(s, "math") for s in rng.sample(gsm, 200)] + [(s, "code") for s in rng.sample(he, 100)]
    leaks = []
    for seg, typ in items:
        q = seg.text
        answer = ans.get(q, "") if typ == "math" else sol.get(seg.id, "")
        for kind in KINDS:
            a = answer
            if kind == "verbatim":
                u = q
            elif kind == "embedded":
                u = rng.choice(FILLER_BEFORE) + q + rng.choice(FILLER_AFTER)
            elif kind == "rewrapped":
                u = wrap(q) if typ == "math" else "\n".join("\t" + l.strip() for l in q.splitlines())
            elif kind == "noisy":
                u = noisy(q, rng)
            elif kind == "noised":
                u = noised(q)
            elif kind == "question-only":
                u, a = q, rng.choice(train_answers) if typ == "math" else "    pass\n"
            elif kind == "rephrased":
                u = rephrase(q, typ, rng)
            else:
                words = [w for w in rephrase(q, typ, rng).split() if w.strip(".,?!$").isdigit() or rng.random() > 0.2]
                fill = ["actually", "indeed", "so", "basically", "now"]
                u = " ".join(w + (" " + rng.choice(fill) if i % 5 == 4 else "") for i, w in enumerate(words))
            leaks.append((Record("leaks", len(leaks) + 1, [Message("user", u), Message("assistant", a)]), seg, kind, typ))
    return leaks


def load_clean():
    spec = [("gsm8k_train.jsonl", "instruction=question,output=answer"), ("codealpaca.json", None),
            ("gpteacher_codegen.json", None), ("gpteacher_roleplay.json", None),
            ("gpteacher_toolformer.json", None), ("sharegpt_dummy.json", None)]
    out = {}
    for name, cols in spec:
        out[name] = [r for b in read_records([str(DATA / name)], columns=cols) for r in b]
    return out


def scan_all(dc: Decontaminator, records: list[Record]):
    res = []
    t = time.process_time()
    for i in range(0, len(records), 1000):
        res.extend(dc.scan(records[i:i + 1000]))
    return res, time.process_time() - t


def main() -> None:
    leaks = make_leaks()
    clean = load_clean()
    all_clean = [r for rs in clean.values() for r in rs]
    detectors = {
        "13-gram any-overlap (lm-eval style)": Decontaminator(EVAL, ngram=13, min_overlap=1e-9, rephrase=False),
        "sftdata 8-gram (>=50% of item)": Decontaminator(EVAL, rephrase=False),
        "sftdata 8-gram + rephrase": Decontaminator(EVAL),
    }
    print(f"eval: {len(detectors['sftdata 8-gram + rephrase'].segments)} segments (GSM8K test, HumanEval, MT-bench); "
          f"planted leaks: {len(leaks)} (200 GSM8K + 100 HumanEval items x {len(KINDS)} kinds); clean rows: {len(all_clean)}")
    leak_records = [x[0] for x in leaks]
    print("\nrecall per leak kind (flagged / planted; 'right item' = flagged with the planted eval item)")
    header = f"{'detector':36}" + "".join(f"{k:>15}" for k in KINDS)
    print(header)
    results = {}
    for name, dc in detectors.items():
        res, _ = scan_all(dc, leak_records)
        results[name] = res
        cells = []
        for kind in KINDS:
            idx = [i for i, x in enumerate(leaks) if x[2] == kind]
            flagged = sum(res[i] is not None for i in idx)
            right = sum(res[i] is not None and res[i]["file"] == leaks[i][1].file and res[i]["index"] == leaks[i][1].index for i in idx)
            cells.append(f"{flagged / len(idx):6.3f} ({right / len(idx):.2f})")
        print(f"{name:36}" + "".join(f"{c:>15}" for c in cells))
    for kind, typ in [(k, t) for k in ("rephrased", "rephrased-hard") for t in ("math", "code")]:
        idx = [i for i, x in enumerate(leaks) if x[2] == kind and x[3] == typ]
        r = results["sftdata 8-gram + rephrase"]
        print(f"  {kind} {typ}: {sum(r[i] is not None for i in idx)}/{len(idx)} flagged "
              f"(8-gram alone: {sum(results['sftdata 8-gram (>=50% of item)'][i] is not None for i in idx)}, "
              f"13-gram any-overlap: {sum(results['13-gram any-overlap (lm-eval style)'][i] is not None for i in idx)})")

    print("\nfalse positives on clean data (rows flagged / rows) and throughput (examples/s per core, CPU time)")
    print(f"{'detector':38} {'flagged':>8} {'rate':>8} {'ex/s/core':>10}   per corpus")
    flagged_rows = {}
    for name, dc in detectors.items():
        res, dt = scan_all(dc, all_clean)
        flagged = [(r, m) for r, m in zip(all_clean, res) if m is not None]
        flagged_rows[name] = flagged
        per = {}
        for r, _ in flagged:
            per[Path(r.source).name] = per.get(Path(r.source).name, 0) + 1
        print(f"{name:38} {len(flagged):8d} {len(flagged) / len(all_clean):8.4f} {len(all_clean) / dt:10.0f}   {per}")
    print("\nflagged clean rows (sftdata 8-gram + rephrase), for audit:")
    segs = {(s.file, s.index, s.field): s.text for s in detectors["sftdata 8-gram + rephrase"].segments}
    for r, m in flagged_rows["sftdata 8-gram + rephrase"][:12]:
        ev = segs[(m["file"], m["index"], m["field"])]
        print(f"  {Path(r.source).name}:{r.row} -> {Path(m['file']).name}:{m['index']} ({m['id']}) {m['method']} "
              f"{m['overlap']:.2f}\n     train: {' '.join(r.messages[0].content.split())[:110]}\n"
              f"     eval:  {' '.join(ev.split())[:110]}")


if __name__ == "__main__":
    main()
