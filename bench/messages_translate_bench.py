"""CPU per translated stream chunk: StreamTranslator.feed + sse_frame over synthetic text chunks.

    .venv/bin/python bench/messages_translate_bench.py [--chunks 100000] [--repeats 5]

Each chunk is a parsed chat.completion.chunk carrying a few characters of text (the common case of
a streamed answer); each resulting event is framed as SSE bytes, as the relay writes them. Prints
the best and median process CPU time per chunk over the repeats. Parsing the upstream's JSON is
not included: the relay pays it whether or not it translates."""

from __future__ import annotations

import argparse
import statistics
import time

from agent_gateway.messages.translate import StreamTranslator, sse_frame


def run_once(chunks: list[dict[str, object]]) -> float:
    translator = StreamTranslator(model="m", message_id="msg_bench")
    started = time.process_time()
    for chunk in chunks:
        for name, data in translator.feed(chunk):
            sse_frame(name, data)
    for name, data in translator.finish():
        sse_frame(name, data)
    return (time.process_time() - started) / len(chunks)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    words = ["Hello", " world", ", this", " is", " a", " streamed", " answer", "."]
    chunks: list[dict[str, object]] = [
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "delta": {"content": words[i % len(words)]}, "finish_reason": None}],
        }
        for i in range(args.chunks)
    ]
    per_chunk_s = [run_once(chunks) for _ in range(args.repeats)]
    best, median = min(per_chunk_s) * 1e6, statistics.median(per_chunk_s) * 1e6
    print(f"{args.chunks} text chunks x {args.repeats}: best {best:.2f} us/chunk, median {median:.2f} us/chunk")


if __name__ == "__main__":
    main()
