"""The stream meter: whole events out, usage found, and the end of a stream told apart from
model text that merely mentions it."""

import json

from agent_gateway.proxy.metering import StreamMeter


def event(payload: object) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def delta(text: str) -> bytes:
    return event({"choices": [{"index": 0, "delta": {"content": text}}]})


def test_model_text_mentioning_done_does_not_end_the_stream():
    # A coding model writing SSE client code: its text holds the very marker of the end.
    meter = StreamMeter(strip_usage_event=False)
    for text in ['if line == "data: [DONE]":', "\ndata: [DONE]\n", "[DONE]"]:
        assert meter.feed(delta(text)) == delta(text)
        assert meter.done is False
    assert meter.feed(b"data: [DONE]\n\n") == b"data: [DONE]\n\n"
    assert meter.done is True


def test_done_is_seen_across_chunk_boundaries_and_with_crlf():
    meter = StreamMeter(strip_usage_event=False)
    assert meter.feed(delta("a") + b"data: [DO") == delta("a")
    assert meter.done is False
    assert meter.feed(b"NE]\r\n\r\n") == b"data: [DONE]\r\n\r\n"
    assert meter.done is True


def test_the_usage_event_the_gateway_asked_for_is_found_and_removed():
    usage = event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}})
    meter = StreamMeter(strip_usage_event=True)
    assert meter.feed(delta("hi") + usage + b"data: [DONE]\n\n") == delta("hi") + b"data: [DONE]\n\n"
    assert meter.usage == (3, 5) and meter.events == 2 and meter.done
