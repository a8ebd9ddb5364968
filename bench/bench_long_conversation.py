"""Cost of one long conversation against its number of messages, with and without a length limit, in one run.

    python bench/bench_long_conversation.py                       # 1,000 … 8,000 messages, chatml on the qwen3 tokenizer
    python bench/bench_long_conversation.py --messages 2000 10000 --max-length 4096

Every trained turn's serving prompt is rendered and checked against the conversation's render (the mask guarantee),
and a Jinja render of k messages costs O(k): without a length limit a conversation of n messages costs O(n²). With
``max_length`` only the turns that start inside the limit are rendered, so the cost grows with the tokens of the
conversation (tokenizing it once), not with n². The bench prints seconds per conversation and the growth exponent
between consecutive sizes (1 = linear, 2 = quadratic).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sftdata.record import Message, Record  # noqa: E402
from sftdata.render import EncodeOptions, Encoder  # noqa: E402
from sftdata.templates import load_template  # noqa: E402
from sftdata.tokenizer import load_tokenizer  # noqa: E402


def conversation(n: int) -> Record:
    """A user/assistant conversation of ``n`` messages (about 10 tokens each)."""
    messages = []
    for i in range(n // 2):
        messages.append(Message("user", f"question number {i} about something"))
        messages.append(Message("assistant", f"answer number {i} with some words in it"))
    return Record(source="bench", row=1, messages=messages)


def seconds(encoder: Encoder, record: Record) -> float:
    start = time.perf_counter()
    examples, problems = encoder.encode_batch([record])
    elapsed = time.perf_counter() - start
    if problems or not examples:
        raise SystemExit(f"the conversation was refused: {problems}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, nargs="+", default=[1000, 2000, 4000, 8000])
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--template", default="chatml")
    parser.add_argument("--tokenizer", default=str(REPO.parent / "shared" / "tokenizers" / "qwen3"))
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.tokenizer)
    template = load_template(args.template, tokenizer)
    encoders = {"no limit": Encoder(template, tokenizer, EncodeOptions()),
                f"max_length {args.max_length}": Encoder(template, tokenizer, EncodeOptions(max_length=args.max_length))}
    print(f"{'messages':>9} " + " ".join(f"{name + ' (s)':>22} {'exponent':>8}" for name in encoders))
    previous: dict[str, float] = {}
    for n in args.messages:
        record = conversation(n)
        cells = []
        for name, encoder in encoders.items():
            t = seconds(encoder, record)
            growth = (f"{math.log(t / previous[name]) / math.log(n / prev_n):8.2f}" if name in previous else f"{'':>8}")
            previous[name] = t
            cells.append(f"{t:22.3f} {growth}")
        prev_n = n
        print(f"{n:>9,} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
