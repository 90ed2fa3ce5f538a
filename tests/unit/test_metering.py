"""The stream meter: whole events out, usage found, and the end of a stream told apart from
model text that merely mentions it."""

import json

from agent_gateway.proxy.metering import ANTHROPIC, StreamMeter, find_usage


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


def named(name: str, payload: object) -> bytes:
    return b"event: " + name.encode() + b"\n" + event(payload)


def test_a_messages_stream_ends_at_message_stop_and_not_at_text_that_mentions_it():
    meter = StreamMeter(strip_usage_event=False, dialect=ANTHROPIC)
    start = named("message_start", {"type": "message_start", "message": {
        "content": [], "usage": {"input_tokens": 11, "output_tokens": 1}}})
    assert meter.feed(start) == start and meter.usage == (11, 1)
    for text in ["event: message_stop", "\nevent: message_stop\n\n", 'data: {"type":"message_stop"}']:
        piece = named("content_block_delta", {"type": "content_block_delta",
                                              "delta": {"type": "text_delta", "text": text}})
        assert meter.feed(piece) == piece and meter.done is False
    # The output count arrives in message_delta; the input count of message_start is kept.
    tail = named("message_delta", {"type": "message_delta", "usage": {"output_tokens": 42}})
    assert meter.feed(tail) == tail and meter.usage == (11, 42) and meter.done is False
    assert meter.feed(b"event: message_st") == b""
    assert meter.feed(b'op\r\ndata: {"type":"message_stop"}\r\n\r\n') and meter.done is True


def test_a_whole_message_body_gives_its_input_and_output_tokens():
    body = json.dumps({"content": [{"type": "text", "text": '"usage": {"input_tokens": 999}'}],
                       "usage": {"input_tokens": 7, "output_tokens": 9}}).encode()
    assert find_usage(body, ANTHROPIC) == (7, 9)


def openai_stream_with_usage() -> tuple[bytes, bytes]:
    """An OpenAI stream as an upstream sends it when include_usage is set (`"usage":null` on every
    chunk, then one usage-only event), and the same stream without that event."""
    chunks = [event({"choices": [{"index": 0, "delta": {"content": text}}], "usage": None})
              for text in ['say "usage": {"prompt_tokens": 999}', "\n\n", "ok"]]
    usage = event({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3}})
    done = b"data: [DONE]\n\n"
    return b"".join(chunks) + usage + done, b"".join(chunks) + done


def test_usage_is_found_and_stripped_the_same_whether_the_stream_comes_in_one_read_or_byte_by_byte():
    upstream, stripped = openai_stream_with_usage()
    for reads in ([upstream], [upstream[i:i + 1] for i in range(len(upstream))],
                  [upstream[i:i + 7] for i in range(0, len(upstream), 7)]):
        meter = StreamMeter(strip_usage_event=True)
        out = b"".join(meter.feed(read) for read in reads) + meter.finish()
        assert out == stripped
        assert meter.usage == (4, 3) and meter.events == 4 and meter.done
        kept = StreamMeter(strip_usage_event=False)
        assert b"".join(kept.feed(read) for read in reads) + kept.finish() == upstream
        assert kept.usage == (4, 3) and kept.events == 5


def test_a_messages_stream_in_one_read_merges_its_usage_events():
    parts = [named("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 11, "output_tokens": 1}}}),
             named("content_block_delta", {"type": "content_block_delta",
                                           "delta": {"type": "text_delta", "text": '"usage": {"output_tokens": 5}'}}),
             named("message_delta", {"type": "message_delta", "usage": {"output_tokens": 42}}),
             named("message_stop", {"type": "message_stop"})]
    meter = StreamMeter(strip_usage_event=True, dialect=ANTHROPIC)
    assert meter.feed(b"".join(parts)) == b"".join(parts)
    assert meter.usage == (11, 42) and meter.done and meter.events == 4


def test_the_end_is_found_after_text_that_mentions_it_in_the_same_read():
    mention = delta('reply with "data: [DONE]" when you are finished')
    meter = StreamMeter(strip_usage_event=False)
    assert meter.feed(mention + mention) == mention + mention and meter.done is False
    assert meter.feed(mention + b"data: [DONE]\n\n") and meter.done is True
    anthropic = StreamMeter(strip_usage_event=False, dialect=ANTHROPIC)
    text = named("content_block_delta", {"type": "content_block_delta",
                                         "delta": {"type": "text_delta", "text": "event: message_stop"}})
    anthropic.feed(text)
    assert anthropic.done is False
    anthropic.feed(text + named("message_stop", {"type": "message_stop"}))
    assert anthropic.done is True
