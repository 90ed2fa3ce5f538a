"""CPU per translated stream chunk, without HTTP: the translator alone, and the whole wire path.

    .venv/bin/python bench/messages_translate_bench.py [--chunks 100000] [--repeats 5]

Rows:
- translator: StreamTranslator.feed + SSE framing over parsed chat.completion.chunk objects, each
  carrying a few characters of text (the common case of a streamed answer).
- wire, 1 event per read / 100 events per read: Translation.stream() over an upstream's raw bytes
  (100-chunk streams: split into events, parse, translate, frame), fed one event per read (an
  upstream that paces its tokens) or a whole stream per read (a busy gateway reads many at once).
- passthrough meter, same two feeds: StreamMeter over the equivalent Messages stream's bytes,
  what a passthrough relay pays per read for the same answer.
Prints the best and median process CPU time per content chunk over the repeats."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

from agent_gateway.messages.translate import StreamTranslator, sse_frame
from agent_gateway.messages.wire import Translation
from agent_gateway.proxy.metering import ANTHROPIC, StreamMeter

WORDS = ["Hello", " world", ", this", " is", " a", " streamed", " answer", "."]
PER_STREAM = 100


def chat_stream() -> list[bytes]:
    """One 100-chunk chat completions stream as its upstream sends it, one SSE event per item."""
    head = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    events = [{**head, "choices": [{"index": 0, "delta": {"content": WORDS[i % len(WORDS)]}, "finish_reason": None}],
               "usage": None} for i in range(PER_STREAM)]
    events.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": None})
    events.append({**head, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": PER_STREAM}})
    return [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]


def messages_stream() -> list[bytes]:
    """The same answer as an Anthropic upstream streams it."""
    translator = StreamTranslator(model="m", message_id="msg_bench")
    out = []
    for raw in chat_stream()[:-1]:
        for name, data in translator.feed(json.loads(raw[6:])):
            out.append(sse_frame(name, data))
    out += [sse_frame(name, data) for name, data in translator.finish()]
    return out


def timed(run: Callable[[], None], streams: int) -> float:
    started = time.process_time()
    for _ in range(streams):
        run()
    return (time.process_time() - started) / (streams * PER_STREAM)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    streams = max(1, args.chunks // PER_STREAM)
    chat_events, messages_events = chat_stream(), messages_stream()
    chat_whole, messages_whole = b"".join(chat_events), b"".join(messages_events)
    parsed = [json.loads(raw[6:]) for raw in chat_events[:-1]]

    def translator() -> None:
        t = StreamTranslator(model="m", message_id="msg_bench")
        for chunk in parsed:
            for name, data in t.feed(chunk):
                sse_frame(name, data)
        for name, data in t.finish():
            sse_frame(name, data)

    def wire(reads: list[bytes]) -> Callable[[], None]:
        def run() -> None:
            stream = Translation(model="m").stream()
            for read in reads:
                stream.feed(read)
            stream.finish()
        return run

    def meter(reads: list[bytes]) -> Callable[[], None]:
        def run() -> None:
            m = StreamMeter(False, ANTHROPIC)
            for read in reads:
                m.feed(read)
            m.finish()
        return run

    rows = [("translator (parsed chunks in, frames out)", translator),
            ("wire, 1 event per read", wire(chat_events)),
            ("wire, 100 events per read", wire([chat_whole])),
            ("passthrough meter, 1 event per read", meter(messages_events)),
            ("passthrough meter, 100 events per read", meter([messages_whole]))]
    for name, run in rows:
        per_chunk = [timed(run, streams) for _ in range(args.repeats)]
        print(f"{name}: best {min(per_chunk) * 1e6:.2f} µs/chunk, median {statistics.median(per_chunk) * 1e6:.2f} µs/chunk")


if __name__ == "__main__":
    main()
