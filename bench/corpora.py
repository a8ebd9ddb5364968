"""Generated corpora for the benchmarks: deterministic (seeded), no network.

``tool_call_conversations`` makes agent conversations in the OpenAI chat shape: a ``tools`` list (function schemas),
assistant turns with ``tool_calls`` (one call, or several in parallel), ``tool`` results answering them by
``tool_call_id``, ``reasoning_content`` on some assistant turns, and several user turns per conversation.

    python bench/corpora.py tool_calls.jsonl --rows 5000 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

# (name, description, {parameter: (JSON type, description)}, result fields)
TOOLS = [
    ("get_weather", "Current weather for a city.", {"city": ("string", "City name"), "unit": ("string", "celsius or fahrenheit")},
     ("temperature", "conditions", "humidity")),
    ("search_web", "Search the web and return the top results.", {"query": ("string", "Search terms"),
                                                                  "max_results": ("integer", "How many results")},
     ("results",)),
    ("calculate", "Evaluate an arithmetic expression.", {"expression": ("string", "The expression")}, ("value",)),
    ("get_stock_price", "Latest price of a stock.", {"ticker": ("string", "Ticker symbol")}, ("price", "currency", "change")),
    ("create_event", "Add an event to the user's calendar.", {"title": ("string", "Title"), "date": ("string", "YYYY-MM-DD"),
                                                             "duration_minutes": ("integer", "Length")},
     ("event_id", "status")),
    ("send_email", "Send an e-mail.", {"to": ("string", "Recipient"), "subject": ("string", "Subject"),
                                      "body": ("string", "Body text")}, ("message_id", "status")),
    ("translate", "Translate text.", {"text": ("string", "Text"), "target_language": ("string", "ISO code")},
     ("translation",)),
    ("query_database", "Run a read-only SQL query.", {"sql": ("string", "The query"), "limit": ("integer", "Row limit")},
     ("rows", "row_count")),
]
WORDS = ("the of and to in is that for it as with on be by this are from at or an have not which but all can more "
         "data model city price report meeting budget travel weather market order user result table invoice plan "
         "schedule team project update review summary question answer system error value number total list").split()
CITIES = ("Paris", "Tokyo", "Lagos", "Lima", "Oslo", "Hanoi", "Denver", "Cairo", "Perth", "Quito")
TICKERS = ("AAPL", "MSFT", "NVDA", "AMZN", "GOOG", "TSLA", "META", "ASML")


def _sentence(rng: random.Random, low: int = 6, high: int = 24) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(low, high))]
    return words[0].capitalize() + " " + " ".join(words[1:]) + "."


def _text(rng: random.Random, sentences: tuple[int, int]) -> str:
    return " ".join(_sentence(rng) for _ in range(rng.randint(*sentences)))


def _schema(name: str, description: str, parameters: dict[str, tuple[str, str]]) -> dict[str, Any]:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object",
                       "properties": {p: {"type": t, "description": d} for p, (t, d) in parameters.items()},
                       "required": list(parameters)[:1]}}}


def _argument(rng: random.Random, name: str, kind: str) -> Any:
    if kind == "integer":
        return rng.randint(1, 120)
    return {"city": lambda: rng.choice(CITIES), "ticker": lambda: rng.choice(TICKERS),
            "unit": lambda: rng.choice(("celsius", "fahrenheit")), "date": lambda: f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
            "target_language": lambda: rng.choice(("fr", "de", "ja", "es")),
            "expression": lambda: f"{rng.randint(2, 999)} * {rng.randint(2, 99)} + {rng.randint(1, 50)}",
            "sql": lambda: f"SELECT name, total FROM orders WHERE total > {rng.randint(10, 900)} ORDER BY total DESC",
            }.get(name, lambda: _sentence(rng, 2, 8))()


def _result(rng: random.Random, fields: tuple[str, ...]) -> str:
    value = {f: (round(rng.uniform(-20, 900), 2) if rng.random() < 0.5 else _sentence(rng, 2, 10)) for f in fields}
    return json.dumps(value, ensure_ascii=False)


def tool_call_conversation(rng: random.Random, index: int) -> dict[str, Any]:
    """One agent conversation: 1-3 user requests, each answered through 0-2 rounds of tool calls (one call, or two to
    three in parallel) and then a final answer; about a third of the assistant turns carry ``reasoning_content``."""
    offered = rng.sample(TOOLS, rng.randint(2, 5))
    messages: list[dict[str, Any]] = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": "You are a helpful assistant. " + _text(rng, (0, 2))})
    calls_made = 0
    for _ in range(rng.randint(1, 3)):
        messages.append({"role": "user", "content": _text(rng, (1, 4))})
        for _ in range(rng.choice((0, 1, 1, 1, 2))):
            calls = []
            for name, _desc, params, fields in rng.sample(offered, 1 if rng.random() < 0.6 else min(len(offered), rng.randint(2, 3))):
                arguments = {p: _argument(rng, p, t) for p, (t, _) in params.items() if p == next(iter(params)) or rng.random() < 0.7}
                calls_made += 1
                calls.append(({"id": f"call_{index}_{calls_made}", "type": "function",
                               "function": {"name": name,
                                            # both shapes seen in the wild: a JSON string (OpenAI API) or an object
                                            "arguments": json.dumps(arguments) if rng.random() < 0.5 else arguments}},
                              fields))
            turn: dict[str, Any] = {"role": "assistant", "content": _sentence(rng) if rng.random() < 0.3 else "",
                                    "tool_calls": [c for c, _ in calls]}
            if rng.random() < 0.35:
                turn["reasoning_content"] = _text(rng, (1, 3))
            messages.append(turn)
            for call, fields in calls:
                messages.append({"role": "tool", "tool_call_id": call["id"], "name": call["function"]["name"],
                                 "content": _result(rng, fields)})
        answer: dict[str, Any] = {"role": "assistant", "content": _text(rng, (1, 5))}
        if rng.random() < 0.35:
            answer["reasoning_content"] = _text(rng, (1, 4))
        messages.append(answer)
    return {"tools": [_schema(name, desc, params) for name, desc, params, _ in offered], "messages": messages}


def tool_call_conversations(rows: int, seed: int = 0) -> list[dict[str, Any]]:
    """``rows`` agent conversations (see :func:`tool_call_conversation`), the same for the same ``seed``."""
    rng = random.Random(seed)
    return [tool_call_conversation(rng, i) for i in range(rows)]


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output")
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_jsonl(args.output, tool_call_conversations(args.rows, args.seed))


if __name__ == "__main__":
    main()
