"""What the body rules cost on /v1: `json.loads` alone vs the gateway's strict parse (depth bound,
watched keys), in µs per body, and how long hostile bodies take to refuse. Prints Markdown rows.

    .venv/bin/python bench/json_bodies.py
"""

from __future__ import annotations

import json
import timeit

from agent_gateway.strict_json import exceeds_depth, loads_watching

WATCHED = frozenset(("model", "stream", "stream_options"))
CODE = 'def f(x):\n    """Doc."""\n    return {"a": [x[0], {"b": x}]}\n'


def chat(messages: int, text: str) -> bytes:
    return json.dumps({
        "model": "alpha-1", "stream": True, "max_tokens": 1024,
        "messages": [{"role": "system", "content": "You are a careful coding assistant."}]
        + [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i in range(messages)],
        "tools": [{"type": "function", "function": {"name": "run", "parameters": {
            "type": "object", "properties": {"code": {"type": "string"}}}}}],
    }).encode()


def main() -> None:
    bodies = {
        "chat with code": chat(8, "Please explain: " + CODE * 2),
        "chat, prose": chat(8, "Please summarise the meeting notes below in three bullet points. " * 3),
        "300-message chat with code": chat(300, "Please explain: " + CODE * 4),
        "300-message chat, prose": chat(300, "plain words with no brackets at all, just text. " * 6),
    }
    print("| body | size | json.loads µs | strict µs | added µs |\n|---|---|---|---|---|")
    for name, raw in bodies.items():
        number = 5000 if len(raw) < 10_000 else 200
        plain = min(timeit.repeat(lambda: json.loads(raw), number=number, repeat=7)) / number * 1e6
        strict = min(timeit.repeat(lambda: loads_watching(raw, 64, WATCHED), number=number, repeat=7)) / number * 1e6
        print(f"| {name} | {len(raw):,} B | {plain:.1f} | {strict:.1f} | +{strict - plain:.1f} |")
    hostile = {"the 40 KB repro": b'{"address":' + b"[" * 20000 + b"]" * 20000 + b"}",
               "200 KB of [": b"[" * 100_000, "1 MB nested": b"[" * 500_000 + b"]" * 500_000}
    print("\n| hostile body | refused in µs |\n|---|---|")
    for name, raw in hostile.items():
        seconds = min(timeit.repeat(lambda: exceeds_depth(raw, 64), number=10, repeat=5)) / 10
        print(f"| {name} | {seconds * 1e6:,.0f} |")


if __name__ == "__main__":
    main()
