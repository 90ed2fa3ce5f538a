"""messages/wire.py: upstream chat-completion bytes in, Messages bytes out, event by event."""

from __future__ import annotations

import json

import pytest

from agent_gateway.errors import UpstreamError
from agent_gateway.messages.wire import Translation


def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> bytes:
    body: dict = {"id": "c", "object": "chat.completion.chunk",
                  "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage:
        body["usage"] = usage
    return b"data: " + json.dumps(body).encode() + b"\n\n"


UPSTREAM = (chunk({"role": "assistant", "content": "Hel"}) + chunk({"content": "lo"}) + chunk({}, "stop")
            + chunk({}, usage={"prompt_tokens": 3, "completion_tokens": 2}) + b"data: [DONE]\n\n")


def frames(data: bytes) -> list[tuple[str, dict]]:
    out = []
    for raw in data.decode().split("\n\n"):
        if raw:
            event, payload = raw.split("\n")
            out.append((event.removeprefix("event: "), json.loads(payload.removeprefix("data: "))))
    return out


def test_each_event_is_translated_as_it_arrives_even_split_byte_by_byte():
    stream = Translation(model="m").stream()
    out = b""
    seen_text_before_done = False
    for i in range(len(UPSTREAM)):
        out += stream.feed(UPSTREAM[i:i + 1])
        if not stream.done and b"text_delta" in out:
            seen_text_before_done = True
    out += stream.finish()
    assert seen_text_before_done and stream.done
    events = frames(out)
    assert [e for e, _ in events] == ["message_start", "content_block_start", "content_block_delta",
                                      "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert "".join(d["delta"]["text"] for e, d in events if e == "content_block_delta") == "Hello"
    assert events[-2][1]["usage"] == {"input_tokens": 3, "output_tokens": 2}
    assert stream.usage == (3, 2)


def test_crlf_framing_is_read_too():
    stream = Translation(model="m").stream()
    out = stream.feed(UPSTREAM.replace(b"\n", b"\r\n")) + stream.finish()
    assert frames(out)[-1][0] == "message_stop"


@pytest.mark.parametrize("upstream", [
    UPSTREAM.removesuffix(b"data: [DONE]\n\n"),  # ended early
    chunk({"content": "a"}) + b"data: {not json\n\n",
    chunk({"content": "a"}) + b'data: {"error": {"message": "boom"}}\n\n',
])
def test_a_broken_upstream_stream_is_an_upstream_error(upstream):
    stream = Translation(model="m").stream()
    with pytest.raises(UpstreamError):
        stream.feed(upstream)
        stream.finish()


def test_a_whole_answer_that_is_not_a_json_object_is_an_upstream_error():
    with pytest.raises(UpstreamError):
        Translation(model="m").whole(b"[1]")
    body = json.loads(Translation(model="m").whole(json.dumps({
        "choices": [{"index": 0, "message": {"content": "hi"}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1}}).encode()))
    assert body["content"] == [{"type": "text", "text": "hi"}] and body["stop_reason"] == "max_tokens"


def test_model_text_with_a_lone_surrogate_escape_is_translated_not_a_502():
    # Valid JSON that orjson refuses ("\ud800" alone); the standard library reads it, and the
    # frame carries it escaped, so the SDK's JSON parser reads the same text back.
    lone = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"a\\ud800b"},"finish_reason":null}]}\n\n'
    stream = Translation(model="m").stream()
    out = stream.feed(chunk({"role": "assistant", "content": ""}) + lone + chunk({}, "stop") + b"data: [DONE]\n\n")
    out += stream.finish()
    texts = [d["delta"]["text"] for e, d in frames(out) if e == "content_block_delta"]
    assert texts == ["a\ud800b"]
    assert stream.done
