"""The fake OpenAI-compatible upstream, exercised through the official openai SDK."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from agent_gateway.testing.recorder import parse_behaviour
from agent_gateway.testing.upstream import UpstreamSettings
from tests.fixtures.upstream import RunningUpstream

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say three words"}]


def sdk(up: RunningUpstream, api_key: str = "sk-test") -> openai.OpenAI:
    # No retries: injected failures must surface on the first attempt.
    return openai.OpenAI(base_url=up.url, api_key=api_key, max_retries=0, timeout=10)


def async_sdk(up: RunningUpstream, api_key: str = "sk-test") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=up.url, api_key=api_key, max_retries=0, timeout=10)


def test_chat_non_stream_is_deterministic_and_prompt_dependent(upstream: RunningUpstream) -> None:
    with sdk(upstream) as client:
        first = client.chat.completions.create(model="test-model", messages=MESSAGES)
        again = client.chat.completions.create(model="test-model", messages=MESSAGES)
        other = client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "hi"}])
    assert first.object == "chat.completion" and first.model == "test-model"
    choice = first.choices[0]
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    words = choice.message.content.split()
    assert len(words) == 16 and len(set(words)) == 16 and all(w.startswith("tok") for w in words)
    assert again.choices[0].message.content == choice.message.content
    assert other.choices[0].message.content != choice.message.content
    assert first.usage.prompt_tokens == 5 and first.usage.completion_tokens == 16
    assert first.usage.total_tokens == 21
    assert upstream.recorder.total == 3 and list(upstream.recorder.models) == ["test-model"] * 3


def test_chat_stream_without_usage_has_no_usage_chunk(upstream: RunningUpstream) -> None:
    with sdk(upstream) as client:
        whole = client.chat.completions.create(model="test-model", messages=MESSAGES).choices[0].message.content
        chunks = list(client.chat.completions.create(model="test-model", messages=MESSAGES, stream=True))
    assert all(c.object == "chat.completion.chunk" and c.usage is None for c in chunks)
    assert all(len(c.choices) == 1 for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole
    assert [c.choices[0].finish_reason for c in chunks][-2:] == [None, "stop"]
    assert len(chunks) == 17


def test_chat_stream_with_include_usage_ends_with_usage_chunk(upstream: RunningUpstream) -> None:
    with sdk(upstream) as client:
        chunks = list(client.chat.completions.create(
            model="test-model", messages=MESSAGES, stream=True, max_tokens=5,
            stream_options={"include_usage": True},
        ))
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (5, 5, 10)
    assert all(c.usage is None and len(c.choices) == 1 for c in body)
    assert body[-1].choices[0].finish_reason == "stop"
    assert sum(1 for c in body if c.choices[0].delta.content) == 5


@pytest.mark.anyio
async def test_async_chat_stream_respects_max_tokens(upstream: RunningUpstream) -> None:
    async with async_sdk(upstream) as client:
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True, max_tokens=40)
        contents = [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]
    assert len(contents) == 40


def test_completions_non_stream_and_stream(upstream: RunningUpstream) -> None:
    with sdk(upstream) as client:
        whole = client.completions.create(model="test-model", prompt="once upon a time", max_tokens=7)
        chunks = list(client.completions.create(
            model="test-model", prompt="once upon a time", max_tokens=7, stream=True,
            stream_options={"include_usage": True},
        ))
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "stop"
    assert len(whole.choices[0].text.split()) == 7 and whole.usage.prompt_tokens == 4
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7


def test_embeddings_float_and_base64(upstream: RunningUpstream) -> None:
    with sdk(upstream) as client:
        # The SDK asks for base64 unless told otherwise, and decodes it.
        b64 = client.embeddings.create(model="test-embedding", input=["alpha beta", "gamma"])
        floats = client.embeddings.create(model="test-embedding", input="alpha beta", encoding_format="float")
        wide = client.embeddings.create(model="test-embedding", input="alpha beta", dimensions=64)
    assert [d.index for d in b64.data] == [0, 1] and len(b64.data[0].embedding) == 16
    assert b64.data[0].embedding == pytest.approx(floats.data[0].embedding, abs=1e-6)
    assert b64.data[0].embedding != b64.data[1].embedding
    assert sum(v * v for v in floats.data[0].embedding) == pytest.approx(1.0)
    assert len(wide.data[0].embedding) == 64
    assert b64.usage.prompt_tokens == 3 and floats.usage.total_tokens == 2


def test_models_lists_configured_ids(upstream: RunningUpstream) -> None:
    with sdk(upstream) as client:
        ids = [m.id for m in client.models.list()]
    assert ids == UpstreamSettings().models


def test_fail_header_raises_api_status_error(upstream: RunningUpstream) -> None:
    with sdk(upstream) as client, pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(
            model="test-model", messages=MESSAGES, extra_headers={"X-Test-Behaviour": "fail:503"}
        )
    assert info.value.status_code == 503
    assert info.value.body["type"] == "server_error"


def test_control_fail_applies_to_the_next_count_requests(upstream: RunningUpstream) -> None:
    upstream.control("fail", status=429, count=1)
    with sdk(upstream) as client:
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="test-model", messages=MESSAGES)
        assert client.chat.completions.create(model="test-model", messages=MESSAGES).choices


def test_control_api_over_http(upstream: RunningUpstream) -> None:
    with httpx.Client(base_url=upstream.root_url) as http:
        assert http.post("/_control/behaviour", json={"mode": "fail", "status": 502, "count": 2}).status_code == 200
        statuses = [http.post("/v1/chat/completions", json={"model": "x", "messages": MESSAGES}).status_code
                    for _ in range(3)]
        assert statuses == [502, 502, 200]
        assert http.post("/_control/behaviour", json={"mode": "nonsense"}).status_code == 400
        stats = http.get("/_control/stats").json()
        assert stats["total"] == 3 and stats["in_flight"] == 0 and stats["completed"] == 3
        assert http.post("/_control/reset").status_code == 200
        assert http.get("/_control/stats").json()["total"] == 0
        bad = http.post("/v1/chat/completions", json={"model": "x", "messages": MESSAGES},
                        headers={"X-Test-Behaviour": "explode"})
        assert bad.status_code == 400 and "explode" in bad.json()["error"]["message"]
        assert http.post("/v1/chat/completions", json={"model": "x"}).status_code == 400


def test_cut_makes_the_sdk_stream_raise(upstream: RunningUpstream) -> None:
    received = []
    with sdk(upstream) as client, pytest.raises((httpx.RemoteProtocolError, openai.APIConnectionError)):
        stream = client.chat.completions.create(
            model="test-model", messages=MESSAGES, stream=True, extra_headers={"X-Test-Behaviour": "cut:3"}
        )
        for chunk in stream:
            received.append(chunk)
    assert len(received) == 3
    upstream.recorder.wait_for_sync(lambda r: r.in_flight == 0)
    assert upstream.recorder.cancelled == 0


@pytest.mark.anyio
async def test_max_in_flight_is_recorded_per_key(upstream: RunningUpstream) -> None:
    # Stalled requests stay in flight until we cancel them, so the overlap is certain, not timed.
    async def call(client: openai.AsyncOpenAI, key_id: str | None) -> None:
        headers = {"X-Test-Behaviour": "stall"}
        if key_id:
            headers["X-Agent-Gateway-Key-Id"] = key_id
        await client.chat.completions.create(model="test-model", messages=MESSAGES, extra_headers=headers)

    async with async_sdk(upstream, "sk-a") as a, async_sdk(upstream, "sk-b") as b:
        tasks = [asyncio.create_task(call(a, "key-a")) for _ in range(3)]
        tasks += [asyncio.create_task(call(b, None)) for _ in range(2)]
        rec = upstream.recorder
        await rec.wait_for(lambda r: r.in_flight == 5)
        assert rec.max_in_flight("key-a") == 3
        assert rec.max_in_flight("Bearer sk-b") == 2  # no key-id header: keyed by Authorization
        assert rec.max_in_flight() == 5 and rec.in_flight_for("key-a") == 3
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await rec.wait_for(lambda r: r.in_flight == 0 and r.cancelled == 5)
    assert rec.max_in_flight("key-a") == 3 and rec.in_flight_for("key-a") == 0


@pytest.mark.parametrize("behaviour", ["stall_after:2", "delay:0.01"])
def test_in_flight_returns_to_zero_after_client_disconnects_mid_stream(
    upstream: RunningUpstream, behaviour: str
) -> None:
    body = {"model": "test-model", "messages": MESSAGES, "stream": True, "max_tokens": 10_000}
    with httpx.Client(base_url=upstream.url) as http:
        with http.stream("POST", "/chat/completions", json=body, headers={"X-Test-Behaviour": behaviour}) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            assert next(line for line in lines if line.startswith("data: ")).startswith("data: {")
            upstream.recorder.wait_for_sync(lambda r: r.in_flight == 1)
        # Leaving the block closes the half-read response, which drops the connection.
        upstream.recorder.wait_for_sync(lambda r: r.in_flight == 0 and r.cancelled == 1)
    assert upstream.recorder.completed == 0


@pytest.mark.parametrize("upstream", [UpstreamSettings(delay_s=0.001, chunks=4)], indirect=True)
def test_settings_reach_the_fixture(upstream: RunningUpstream) -> None:
    with sdk(upstream) as client:
        chunks = list(client.chat.completions.create(model="test-model", messages=MESSAGES, stream=True))
    assert upstream.app.state.settings.chunks == 4 and len(chunks) == 5


def test_parse_behaviour() -> None:
    assert parse_behaviour("delay:0.5, cut:3").mode == "cut"
    assert parse_behaviour("delay:0.5, cut:3").after_chunks == 3
    assert parse_behaviour("slow_headers:2.0").seconds == 2.0
    assert parse_behaviour("fail").status == 500
    with pytest.raises(ValueError):
        parse_behaviour("melt:1")
