"""Anthropic Messages translated to chat completions: the official anthropic SDK against a pool
whose upstream speaks only OpenAI (pool "alpha", upstream_api = "openai")."""

from __future__ import annotations

import asyncio
import json
import time

import anthropic
import httpx
import pytest

from agent_gateway.testing.upstream import UpstreamSettings
from tests.e2e.test_messages import ASK, SLOW, TOOLS, sdk
from tests.e2e.test_proxy import usage_rows, wait_usage
from tests.fixtures.live import MESSAGES_POOLS, LiveGateway, live_gateway

pytestmark = pytest.mark.anyio


def chat_text(live: LiveGateway, messages: list[dict], max_tokens: int) -> str:
    """What the upstream's own chat endpoint answers to the same conversation."""
    with httpx.Client(base_url=live.upstream.root_url) as http:
        r = http.post("/v1/chat/completions", json={"model": "test-model", "messages": messages,
                                                     "max_tokens": max_tokens})
    return r.json()["choices"][0]["message"]["content"]


async def test_the_sdk_gets_text_a_system_prompt_and_typed_streams_from_a_chat_upstream(messages_live: LiveGateway):
    sk, _ = messages_live.new_key(pool="alpha")
    expected = chat_text(messages_live, ASK, 16)
    with_system = chat_text(messages_live, [{"role": "system", "content": "You sell seats."}, *ASK], 16)
    for prefix in ("/anthropic", ""):
        client = sdk(messages_live, sk, prefix)
        reply = await asyncio.to_thread(client.messages.create, model="test-model", max_tokens=16, messages=ASK)
        assert reply.type == "message" and reply.role == "assistant" and reply.model == "test-model"
        assert reply.content[0].type == "text" and reply.content[0].text == expected
        assert reply.usage.input_tokens == 4 and reply.usage.output_tokens == 16
        assert reply.stop_reason == "end_turn"
        reply = await asyncio.to_thread(client.messages.create, model="test-model", max_tokens=16, messages=ASK,
                                        system="You sell seats.")
        assert reply.content[0].text == with_system and reply.usage.input_tokens == 7

        def stream() -> tuple[list[str], anthropic.types.Message]:
            with client.messages.stream(model="test-model", max_tokens=16, messages=ASK) as events:
                kinds = [event.type for event in events]
                return kinds, events.get_final_message()

        kinds, final = await asyncio.to_thread(stream)
        assert kinds[:2] == ["message_start", "content_block_start"] and kinds[-1] == "message_stop"
        assert kinds.count("text") == 16 and "message_delta" in kinds and "content_block_stop" in kinds
        assert final.content[0].text == expected and final.stop_reason == "end_turn"
        assert final.usage.input_tokens == 4 and final.usage.output_tokens == 16
        client.close()

    async with anthropic.AsyncAnthropic(base_url=messages_live.url, api_key=sk, max_retries=0) as aclient:
        areply = await aclient.messages.create(model="test-model", max_tokens=16, messages=ASK)
        assert areply.content[0].text == expected
        async with aclient.messages.stream(model="test-model", max_tokens=16, messages=ASK,
                                           system="You sell seats.") as astream:
            text = "".join([t async for t in astream.text_stream])
            final = await astream.get_final_message()
        assert text == final.content[0].text == with_system and final.usage.input_tokens == 7
        raw = await aclient.messages.create(model="test-model", max_tokens=16, messages=ASK, stream=True)
        types = [event.type async for event in raw]
        assert types[0] == "message_start" and types[-1] == "message_stop"
        # A chat upstream cannot count a prompt: count_tokens is Anthropic's 404 (docs/decisions.md).
        with pytest.raises(anthropic.NotFoundError) as err:
            await aclient.messages.count_tokens(model="test-model", messages=ASK)
        assert err.value.body["error"]["type"] == "not_found_error"
        assert "count_tokens" in err.value.body["error"]["message"]


@pytest.mark.parametrize("stream_first", [True, False])
async def test_a_full_tool_use_round_trip_through_a_chat_upstream(messages_live: LiveGateway, stream_first: bool):
    sk, _ = messages_live.new_key(pool="alpha")
    client = sdk(messages_live, sk)

    def ask(messages: list[dict], stream: bool) -> anthropic.types.Message:
        if stream:
            with client.messages.stream(model="test-model", max_tokens=16, tools=TOOLS, messages=messages) as events:
                return events.get_final_message()
        return client.messages.create(model="test-model", max_tokens=16, tools=TOOLS, messages=messages)

    def round_trip() -> tuple[anthropic.types.Message, anthropic.types.Message]:
        call = ask(ASK, stream_first)
        tool_use = call.content[0]
        answer = ask([
            *ASK, {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in call.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use.id,
                                          "content": "seat 7 is free"}]},
        ], not stream_first)
        return call, answer

    call, answer = await asyncio.to_thread(round_trip)
    assert call.stop_reason == "tool_use"
    assert call.content[0].type == "tool_use" and call.content[0].name == "lookup_seat"
    assert call.content[0].input == {"query": "tell me about seats"}
    assert answer.stop_reason == "end_turn" and answer.content[0].type == "text" and answer.content[0].text
    client.close()


async def test_translated_usage_rows_hold_the_input_and_output_tokens(tmp_path, database_url, upstream):
    with live_gateway(tmp_path, database_url, upstream, pools=MESSAGES_POOLS) as live:
        sk, key_id = live.new_key(pool="alpha")
        client = sdk(live, sk)
        await asyncio.to_thread(client.messages.create, model="test-model", max_tokens=5, messages=ASK)

        def stream() -> None:
            with client.messages.stream(model="test-model", max_tokens=16, messages=ASK,
                                        system="You sell seats.") as events:
                events.until_done()

        await asyncio.to_thread(stream)
        rows = sorted(await wait_usage(live, key_id, 2), key=lambda row: row.completion_tokens)
        assert [(r.prompt_tokens, r.completion_tokens, r.usage_source, r.endpoint) for r in rows] == [
            (4, 5, "upstream", "messages"), (7, 16, "upstream", "messages")]
        assert len(await usage_rows(live, key_id)) == 2
        client.close()


@pytest.mark.parametrize("upstream", [SLOW], indirect=True)
async def test_a_translated_stream_in_flight_holds_the_key_on_either_api(messages_live: LiveGateway):
    sk, key_id = messages_live.new_key(pool="alpha")
    client = anthropic.AsyncAnthropic(base_url=messages_live.url, api_key=sk, max_retries=0)
    async with client.messages.stream(model="test-model", max_tokens=400, messages=ASK) as events:
        async for event in events:
            if event.type == "text":  # the first text arrives while the upstream still generates
                break
        assert messages_live.upstream.recorder.in_flight == 1
        r = await client._client.post(messages_live.url + "/v1/chat/completions",
                                      headers={"Authorization": f"Bearer {sk}"},
                                      json={"model": "test-model", "messages": ASK})
        assert r.status_code == 429 and r.json()["error"]["code"] == "concurrency_limit"
        with pytest.raises(anthropic.RateLimitError):
            await client.messages.create(model="test-model", max_tokens=8, messages=ASK)
    await messages_live.upstream.recorder.wait_for(lambda r: r.in_flight == 0 and r.cancelled == 1)
    await messages_live.wait_key_free(key_id)
    reply = await client.messages.create(model="test-model", max_tokens=2, messages=ASK)
    assert reply.usage.output_tokens == 2
    assert messages_live.upstream.recorder.max_in_flight(key_id) == 1
    await client.close()


@pytest.mark.parametrize("upstream", [SLOW], indirect=True)
async def test_revoking_the_key_ends_a_translated_stream_with_an_error_event(messages_live: LiveGateway):
    mk = messages_live.new_account()
    sk, key_id = messages_live.new_key(mk, pool="alpha")
    frames: list[tuple[str, dict]] = []
    event = ""
    async with httpx.AsyncClient(base_url=messages_live.url, timeout=30) as http:
        async with http.stream("POST", "/v1/messages", headers={"x-api-key": sk},
                               json={"model": "test-model", "max_tokens": 400, "messages": ASK,
                                     "stream": True}) as response:
            assert response.status_code == 200
            revoked_at = None
            async for line in response.aiter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    frames.append((event, json.loads(line[5:])))
                    if len(frames) == 5 and revoked_at is None:
                        r = await http.post(f"/api/keys/{key_id}/disable", headers={"Authorization": f"Bearer {mk}"})
                        assert r.status_code == 200
                        revoked_at = time.perf_counter()
            assert revoked_at is not None
            seconds = time.perf_counter() - revoked_at
    assert seconds < 1.0
    assert frames[0][0] == "message_start" and frames[1][0] == "content_block_start"
    name, data = frames[-1]
    assert name == "error" and data["type"] == "error" and data["error"]["type"] == "permission_error"
    assert len(frames) < 50


async def test_the_chat_upstreams_refusals_reach_the_sdk_in_anthropics_shape(messages_live: LiveGateway):
    sk, _ = messages_live.new_key(pool="alpha")
    client = sdk(messages_live, sk)
    upstream = messages_live.upstream
    upstream.control("fail", status=422, count=1)
    with pytest.raises(anthropic.UnprocessableEntityError) as err:
        await asyncio.to_thread(client.messages.create, model="test-model", max_tokens=8, messages=ASK)
    assert err.value.body == {"type": "error", "error": {"type": "invalid_request_error",
                                                    "message": "injected failure"}}
    upstream.control("fail", status=404, count=1)
    with pytest.raises(anthropic.NotFoundError) as err:
        await asyncio.to_thread(client.messages.create, model="test-model", max_tokens=8, messages=ASK, stream=True)
    assert err.value.body == {"type": "error", "error": {"type": "not_found_error", "message": "injected failure"}}
    upstream.control("fail", status=500, count=1)
    with pytest.raises(anthropic.APIStatusError) as err:
        await asyncio.to_thread(client.messages.create, model="test-model", max_tokens=8, messages=ASK)
    assert err.value.status_code == 502 and err.value.body["error"]["type"] == "api_error"
    # A body the translator refuses is the gateway's own 400, before the upstream is asked.
    calls = upstream.recorder.total
    with pytest.raises(anthropic.BadRequestError) as err:
        await asyncio.to_thread(client.messages.create, model="test-model", max_tokens=0, messages=ASK)
    assert err.value.body["error"]["type"] == "invalid_request_error" and "max_tokens" in str(err.value.body)
    assert upstream.recorder.total == calls
    client.close()


@pytest.mark.parametrize("upstream", [UpstreamSettings(delay_s=0.05, chunks=100)], indirect=True)
async def test_a_translated_stream_cut_by_the_upstream_ends_with_an_error_event_the_sdk_raises(
        messages_live: LiveGateway):
    sk, _ = messages_live.new_key(pool="alpha")
    client = sdk(messages_live, sk)
    messages_live.upstream.control("cut", after_chunks=3)

    def read_stream() -> list[str]:
        seen: list[str] = []
        with client.messages.stream(model="test-model", max_tokens=100, messages=ASK) as events:
            for event in events:
                seen.append(event.type)
        return seen

    with pytest.raises(anthropic.APIStatusError) as err:
        await asyncio.to_thread(read_stream)
    assert err.value.body["error"]["type"] == "api_error"
    await messages_live.upstream.recorder.wait_for(lambda r: r.in_flight == 0)
    messages_live.upstream.behaviour.reset()
    reply = await asyncio.to_thread(client.messages.create, model="test-model", max_tokens=2, messages=ASK)
    assert reply.usage.output_tokens == 2
    client.close()
