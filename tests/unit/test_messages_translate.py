"""The Anthropic Messages <-> chat completions translator, against Anthropic's documented streams
and the official `anthropic` SDK's own models and stream reader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter

from agent_gateway.errors import InvalidRequest
from agent_gateway.messages.translate import (
    StreamTranslator,
    TranslationError,
    from_chat_response,
    sse_frame,
    to_chat_request,
)

FIXTURES = Path(__file__).parent.parent / "fixtures" / "anthropic"
EVENT = TypeAdapter(RawMessageStreamEvent)


def load(name: str) -> dict[str, Any]:
    fixture: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    assert fixture["source"].startswith(("https://docs.anthropic.com/", "https://github.com/anthropics/"))
    return fixture


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "delta": delta or {}, "finish_reason": finish}
    choice.update(extra.pop("choice", {}))
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [choice], **extra}


def translate(chunks: list[dict[str, Any]], **kwargs: Any) -> list[tuple[str, dict[str, Any]]]:
    translator = StreamTranslator(model=kwargs.pop("model", "m"), message_id=kwargs.pop("message_id", "msg_1"), **kwargs)
    events = [event for c in chunks for event in translator.feed(c)]
    return events + translator.finish()


def comparable(events: list[Any]) -> list[Any]:
    """The documented events minus what an OpenAI upstream cannot know or does not send.

    Pings are keep-alives the HTTP side may add; message_start's usage is unknown before the
    upstream's final chunk (it is reported in message_delta instead, which the docs call cumulative);
    a tool_use block's `caller` says who invoked the tool on Anthropic's side, which a chat
    completions upstream has no notion of."""
    out = []
    for name, data in events:
        if name == "ping":
            continue
        data = json.loads(json.dumps(data))
        if name == "message_start":
            data["message"].pop("usage")
        if name == "message_delta":
            data["usage"] = {"output_tokens": data["usage"]["output_tokens"]}
        if name == "content_block_start":
            data["content_block"].pop("caller", None)
        out.append([name, data])
    return out


def read_with_sdk(events: list[tuple[str, dict[str, Any]]]) -> Message:
    """Serve the frames to the official SDK's stream reader and take its final message."""
    body = b"".join(sse_frame(name, data) for name, data in events)

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    client = anthropic.Anthropic(api_key="k", base_url="http://gw", http_client=httpx2.Client(transport=httpx2.MockTransport(handler)))
    with client.messages.stream(model="m", max_tokens=10, messages=[{"role": "user", "content": "hi"}]) as stream:
        return stream.get_final_message()


# --- streams against the documented examples ----------------------------------------------------


@pytest.mark.parametrize("name", ["stream_text.json", "stream_tool_use.json"])
def test_the_stream_is_the_documented_event_sequence(name: str) -> None:
    fixture = load(name)
    start = fixture["events"][0][1]["message"]
    ours = translate(fixture["chat_chunks"], model=start["model"], message_id=start["id"])
    assert comparable(ours) == comparable(fixture["events"])
    for _, data in ours:
        EVENT.validate_python(data)


def test_the_sdk_reads_a_translated_tool_use_stream_into_text_then_a_parsed_tool_call() -> None:
    fixture = load("stream_tool_use.json")
    message = read_with_sdk(translate(fixture["chat_chunks"]))
    assert [block.type for block in message.content] == ["text", "tool_use"]
    assert message.content[0].text == "I'll check the current weather in Paris for you."  # type: ignore[union-attr]
    assert message.content[1].input == {"location": "Paris"}  # type: ignore[union-attr]
    assert message.stop_reason == "tool_use"
    assert message.usage.output_tokens == 65


def test_each_chunk_is_translated_as_it_arrives_nothing_waits_for_the_end() -> None:
    translator = StreamTranslator(model="m", message_id="msg_1")
    first = translator.feed(chunk({"role": "assistant", "content": "Hel"}))
    assert [name for name, _ in first] == ["message_start", "content_block_start", "content_block_delta"]
    assert first[-1][1]["delta"] == {"type": "text_delta", "text": "Hel"}
    assert translator.feed(chunk({"content": "lo"})) == [
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo"}})
    ]
    opening = translator.feed(chunk({"tool_calls": [{"index": 0, "id": "call_a", "function": {"name": "f", "arguments": "{\"a"}}]}))
    assert [name for name, _ in opening] == ["content_block_stop", "content_block_start", "content_block_delta"]
    assert opening[-1][1]["delta"] == {"type": "input_json_delta", "partial_json": "{\"a"}


def test_several_tool_calls_become_consecutive_tool_use_blocks() -> None:
    calls = [
        chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "read", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"path\": "}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "\"a.py\"}"}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function", "function": {"name": "read", "arguments": "{\"path\""}}]}),
        chunk({"tool_calls": [{"index": 1, "function": {"arguments": ": \"b.py\"}"}}]}),
        chunk({}, "tool_calls"),
    ]
    events = translate(calls)
    starts = [(d["index"], d["content_block"]["id"]) for n, d in events if n == "content_block_start"]
    assert starts == [(0, "call_a"), (1, "call_b")]
    names = [n for n, _ in events]
    assert names.index("content_block_stop") < names.index("content_block_start", names.index("content_block_start") + 1)
    message = read_with_sdk(events)
    assert [b.input for b in message.content] == [{"path": "a.py"}, {"path": "b.py"}]  # type: ignore[union-attr]
    assert message.stop_reason == "tool_use"


def test_usage_from_the_final_chunk_is_reported_in_message_delta() -> None:
    translator = StreamTranslator(model="m", message_id="msg_1")
    translator.feed(chunk({"content": "hi"}))
    translator.feed(chunk({}, "stop"))
    translator.feed({"id": "chatcmpl-1", "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3}})
    assert (translator.input_tokens, translator.output_tokens) == (12, 3)
    closing = translator.finish()
    assert [n for n, _ in closing] == ["content_block_stop", "message_delta", "message_stop"]
    assert closing[1][1]["usage"] == {"input_tokens": 12, "output_tokens": 3}


@pytest.mark.parametrize(
    ("finish", "choice", "stops", "reason", "sequence"),
    [
        ("stop", {}, None, "end_turn", None),
        ("length", {}, None, "max_tokens", None),
        ("tool_calls", {}, None, "tool_use", None),
        ("content_filter", {}, None, "refusal", None),
        ("stop", {"stop_reason": "\nUser:"}, ["\nUser:"], "stop_sequence", "\nUser:"),  # vLLM
        ("stop", {"matched_stop": "END"}, ["END"], "stop_sequence", "END"),  # SGLang
        ("stop", {"stop_reason": 128009}, ["END"], "end_turn", None),  # a stop token id is EOS
        ("stop", {"stop_reason": "other"}, ["END"], "end_turn", None),  # not one the client asked for
    ],
)
def test_stop_reasons(finish: str, choice: dict[str, Any], stops: list[str] | None, reason: str, sequence: str | None) -> None:
    events = translate([chunk({"content": "x"}), chunk({}, finish, choice=choice)], stop_sequences=stops)
    delta = [d for n, d in events if n == "message_delta"][0]["delta"]
    assert delta == {"stop_reason": reason, "stop_sequence": sequence}
    EVENT.validate_python([d for n, d in events if n == "message_delta"][0])


def test_an_empty_upstream_stream_still_closes_as_a_valid_message() -> None:
    translator = StreamTranslator(model="m", message_id="msg_1")
    events = translator.finish()
    assert [n for n, _ in events] == ["message_start", "message_delta", "message_stop"]
    for _, data in events:
        EVENT.validate_python(data)


def test_sse_frame_is_one_named_event() -> None:
    frame = sse_frame("message_stop", {"type": "message_stop"})
    assert frame == b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


# --- non-streaming responses -------------------------------------------------------------------


def test_a_chat_completion_becomes_a_message_the_sdk_parses() -> None:
    chat = {
        "id": "chatcmpl-9",
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "content": "Let me look.",
                    "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"location\": \"Paris\"}"}}
                    ],
                },
            }
        ],
        "usage": {"prompt_tokens": 40, "completion_tokens": 9, "total_tokens": 49},
    }
    message = Message.model_validate(from_chat_response(chat, model="claude-x"))
    assert message.id.startswith("msg_") and message.model == "claude-x" and message.role == "assistant"
    assert message.content[0].type == "text" and message.content[0].text == "Let me look."
    tool = message.content[1]
    assert tool.type == "tool_use" and tool.id == "call_1" and tool.name == "get_weather" and tool.input == {"location": "Paris"}
    assert message.stop_reason == "tool_use" and message.stop_sequence is None
    assert (message.usage.input_tokens, message.usage.output_tokens) == (40, 9)


@pytest.mark.parametrize(
    ("choice", "reason", "sequence"),
    [
        ({"finish_reason": "stop"}, "end_turn", None),
        ({"finish_reason": "length"}, "max_tokens", None),
        ({"finish_reason": "content_filter"}, "refusal", None),
        ({"finish_reason": "stop", "stop_reason": "###"}, "stop_sequence", "###"),
        ({"finish_reason": "stop", "matched_stop": "###"}, "stop_sequence", "###"),
    ],
)
def test_non_streaming_stop_reasons(choice: dict[str, Any], reason: str, sequence: str | None) -> None:
    chat = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}, **choice}], "usage": {}}
    message = Message.model_validate(from_chat_response(chat, model="m"))
    assert (message.stop_reason, message.stop_sequence) == (reason, sequence)


# --- requests ----------------------------------------------------------------------------------

PNG = "iVBORw0KGgo="


def test_a_full_messages_request_becomes_the_equivalent_chat_request() -> None:
    body = {
        "model": "qwen",
        "max_tokens": 512,
        "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Use tools."}],
        "stop_sequences": ["\nUser:"],
        "temperature": 0.2,
        "top_p": 0.9,
        "metadata": {"user_id": "u-7"},
        "stream": True,
        "tools": [{"name": "get_weather", "description": "Weather", "input_schema": {"type": "object", "properties": {}}}],
        "tool_choice": {"type": "tool", "name": "get_weather"},
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Checking."}, {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]}, {"type": "text", "text": "Thanks"}]},
            {"role": "assistant", "content": "You're welcome."},
        ],
    }
    assert to_chat_request(body) == {
        "model": "qwen",
        "max_tokens": 512,
        "stop": ["\nUser:"],
        "temperature": 0.2,
        "top_p": 0.9,
        "user": "u-7",
        "stream": True,
        "stream_options": {"include_usage": True},
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {}}}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "messages": [
            {"role": "system", "content": "Be brief.\n\nUse tools."},
            {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]},
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [{"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}],
            },
            {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "You're welcome."},
        ],
    }


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, {"tool_choice": "auto"}),
        ({"type": "any"}, {"tool_choice": "required"}),
        ({"type": "none"}, {"tool_choice": "none"}),
        ({"type": "auto", "disable_parallel_tool_use": True}, {"tool_choice": "auto", "parallel_tool_calls": False}),
        ({"type": "any", "disable_parallel_tool_use": False}, {"tool_choice": "required"}),
    ],
)
def test_tool_choice(choice: dict[str, Any], expected: dict[str, Any]) -> None:
    chat = to_chat_request({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "tool_choice": choice})
    assert {k: chat[k] for k in expected} == expected
    assert ("parallel_tool_calls" in chat) == ("parallel_tool_calls" in expected)


def test_what_coding_agents_and_the_sdk_send_is_accepted() -> None:
    """thinking, top_k, service_tier, cache_control, URL images and replayed thinking blocks."""
    cache = {"type": "ephemeral"}
    body = {
        "model": "m",
        "max_tokens": 5,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "top_k": 40,
        "service_tier": "auto",
        "system": [{"type": "text", "text": "S", "cache_control": cache}],
        "tools": [{"name": "t", "input_schema": {"type": "object"}, "cache_control": cache}],
        "messages": [
            {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}, {"type": "text", "text": "Q", "cache_control": cache}]},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "s"}, {"type": "text", "text": "A"}]},
        ],
    }
    chat = to_chat_request(body)
    assert chat["messages"][1]["content"][0] == {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    assert chat["messages"][2] == {"role": "assistant", "content": "A"}
    assert not {"thinking", "top_k", "service_tier"} & set(chat)
    assert "cache_control" not in json.dumps(chat)


@pytest.mark.parametrize(
    ("change", "path", "code"),
    [
        ({"mcp_servers": []}, "mcp_servers", "unsupported_field"),
        ({"container": "c"}, "container", "unsupported_field"),
        ({"metadata": {"session": "x"}}, "metadata.session", "unsupported_field"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type", "unsupported_field"),
        ({"tool_choice": {"type": "sometimes"}}, "tool_choice.type", "unsupported_field"),
        ({"system": [{"type": "image", "source": {}}]}, "system[0].type", "unsupported_field"),
        (
            {"messages": [{"role": "user", "content": [{"type": "document", "source": {"type": "text", "data": "d"}}]}]},
            "messages[0].content[0].type",
            "unsupported_field",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "document", "source": {}}]}]}]},
            "messages[0].content[0].content[0].type",
            "unsupported_field",
        ),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role", "invalid_field"),
        ({"max_tokens": None}, "max_tokens", "invalid_field"),
    ],
)
def test_what_cannot_be_translated_is_a_400_naming_the_field(change: dict[str, Any], path: str, code: str) -> None:
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], **change}
    with pytest.raises(TranslationError) as caught:
        to_chat_request(body)
    error = caught.value
    assert isinstance(error, InvalidRequest) and error.status == 400
    assert error.code == code
    assert error.message.startswith(f"{path}: ")


def test_tool_results_become_tool_messages_and_their_images_follow_in_the_user_turn() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
    body = {
        "model": "m",
        "max_tokens": 5,
        "messages": [
            {"role": "user", "content": "Look at both"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "read", "input": {}}, {"type": "tool_use", "id": "t2", "name": "shot", "input": {}}]},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": "file text", "is_error": False},
                    {"type": "tool_result", "tool_use_id": "t2", "content": [{"type": "text", "text": "screen:"}, image]},
                    {"type": "text", "text": "Now?"},
                ],
            },
        ],
    }
    assert to_chat_request(body)["messages"][2:] == [
        {"role": "tool", "tool_call_id": "t1", "content": "file text"},
        {"role": "tool", "tool_call_id": "t2", "content": "screen:"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}, {"type": "text", "text": "Now?"}]},
    ]
