"""Anthropic Messages on a real port, driven by the official anthropic SDK against pools whose
upstream speaks Messages natively (upstream_api = "anthropic")."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta

import anthropic
import httpx
import pytest

from agent_gateway.testing.upstream import UpstreamSettings
from tests.e2e.test_proxy import usage_rows, wait_usage
from tests.fixtures.live import LiveGateway, live_gateway

pytestmark = pytest.mark.anyio
ASK = [{"role": "user", "content": "tell me about seats"}]
TOOLS = [{"name": "lookup_seat", "description": "Look a seat up.",
          "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}]
SLOW = UpstreamSettings(delay_s=0.05, chunks=400)


def sdk(live: LiveGateway, sk: str, prefix: str = "/anthropic") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=live.url + prefix, api_key=sk, max_retries=0)


def direct(live: LiveGateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=live.upstream.root_url, api_key="direct", max_retries=0)


# --- passthrough with the official SDK ---------------------------------------------------------

async def test_anthropic_sdk_sync_and_async_text_system_prompt_and_streams(messages_live: LiveGateway):
    sk, _ = messages_live.new_key(pool="claude")
    expected = direct(messages_live).messages.create(model="test-model", max_tokens=64, messages=ASK)
    with_system = direct(messages_live).messages.create(model="test-model", max_tokens=64, messages=ASK,
                                                        system="You sell seats.")
    for prefix in ("/anthropic", ""):  # both routes
        client = sdk(messages_live, sk, prefix)
        reply = await asyncio.to_thread(client.messages.create, model="test-model", max_tokens=64, messages=ASK)
        assert reply.content[0].text == expected.content[0].text
        assert reply.usage.input_tokens == 4 and reply.usage.output_tokens == 16
        assert reply.stop_reason == "end_turn"
        reply = await asyncio.to_thread(client.messages.create, model="test-model", max_tokens=64, messages=ASK,
                                        system="You sell seats.")
        assert reply.content[0].text == with_system.content[0].text and reply.usage.input_tokens == 7

        def stream() -> tuple[list[str], anthropic.types.Message]:
            with client.messages.stream(model="test-model", max_tokens=64, messages=ASK) as events:
                kinds = [event.type for event in events]
                return kinds, events.get_final_message()

        kinds, final = await asyncio.to_thread(stream)
        assert kinds[:2] == ["message_start", "content_block_start"] and kinds[-1] == "message_stop"
        assert kinds.count("text") == 16 and "message_delta" in kinds
        assert final.content[0].text == expected.content[0].text
        assert final.usage.input_tokens == 4 and final.usage.output_tokens == 16
        client.close()

    async with anthropic.AsyncAnthropic(base_url=messages_live.url, api_key=sk, max_retries=0) as aclient:
        areply = await aclient.messages.create(model="test-model", max_tokens=64, messages=ASK)
        assert areply.content[0].text == expected.content[0].text
        async with aclient.messages.stream(model="test-model", max_tokens=64, messages=ASK) as astream:
            text = "".join([t async for t in astream.text_stream])
            final = await astream.get_final_message()
        assert text == final.content[0].text == expected.content[0].text
        raw = await aclient.messages.create(model="test-model", max_tokens=64, messages=ASK, stream=True)
        types = [event.type async for event in raw]
        assert types[0] == "message_start" and types[-1] == "message_stop"
        counted = await aclient.messages.count_tokens(model="test-model", messages=ASK)
        assert counted.input_tokens == 4


async def test_a_full_tool_use_round_trip(messages_live: LiveGateway):
    sk, _ = messages_live.new_key(pool="claude")
    client = sdk(messages_live, sk)

    def round_trip() -> tuple[anthropic.types.Message, anthropic.types.Message]:
        with client.messages.stream(model="test-model", max_tokens=64, tools=TOOLS, messages=ASK) as events:
            call = events.get_final_message()
        tool_use = call.content[0]
        answer = client.messages.create(model="test-model", max_tokens=64, tools=TOOLS, messages=[
            *ASK, {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in call.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use.id,
                                          "content": "seat 7 is free"}]},
        ])
        return call, answer

    call, answer = await asyncio.to_thread(round_trip)
    assert call.stop_reason == "tool_use"
    assert call.content[0].type == "tool_use" and call.content[0].name == "lookup_seat"
    assert call.content[0].input == {"query": "tell me about seats"}
    assert answer.stop_reason == "end_turn" and answer.content[0].type == "text" and answer.content[0].text
    client.close()


async def test_the_body_is_relayed_byte_for_byte_and_the_client_key_never_goes_upstream(messages_live: LiveGateway):
    sk, _ = messages_live.new_key(pool="claude")
    recorder = messages_live.upstream.recorder
    async with httpx.AsyncClient(base_url=messages_live.url, timeout=30) as http:
        body = {"model": "test-model", "max_tokens": 8, "messages": ASK}
        r = await http.post("/v1/messages?beta=true", json=body, headers={
            "x-api-key": sk, "anthropic-version": "2023-06-01", "anthropic-beta": "tools-2024-04-04"})
        assert r.status_code == 200, r.text
        via_gateway = r.content
    assert recorder.total == 1
    with httpx.Client(base_url=messages_live.upstream.root_url) as http:
        own = http.post("/v1/messages", json=body)
    # The same bytes but for the id (the upstream numbers its replies).
    assert via_gateway == own.content.replace(own.json()["id"].encode(), json.loads(via_gateway)["id"].encode())


# --- refusals, in the contract's order, in Anthropic's shape ---------------------------------

async def test_refusals_come_in_order_as_the_sdk_exceptions(messages_live: LiveGateway):
    mk = messages_live.new_account()
    sk, key_id = messages_live.new_key(mk, pool="claude")
    openai_pool_sk, _ = messages_live.new_key(mk, pool="alpha")
    recorder = messages_live.upstream.recorder

    async with httpx.AsyncClient(base_url=messages_live.url, timeout=30) as http:
        r = await http.post("/anthropic/v1/messages", json={"model": "test-model", "max_tokens": 8, "messages": ASK})
        assert r.status_code == 402
        body = r.json()
        assert body["type"] == "error" and body["error"]["type"] == "billing_error"
        assert body["buy"]["catalog"] == "/api/agent/plans" and "x-api-key" in body["error"]["message"]

    def call(key: str, model: str = "test-model") -> None:
        client = sdk(messages_live, key)
        try:
            client.messages.create(model=model, max_tokens=8, messages=ASK)
        finally:
            client.close()

    with pytest.raises(anthropic.AuthenticationError) as err:
        await asyncio.to_thread(call, "sk_not_a_key")
    assert err.value.status_code == 401 and err.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError) as err:
        await asyncio.to_thread(call, sk, "not-in-the-pool")
    assert err.value.body["error"]["type"] == "not_found_error" and "test-model" in err.value.body["error"]["message"]
    # A pool with an OpenAI upstream translates Messages, but refuses in the same order first.
    with pytest.raises(anthropic.NotFoundError) as err:
        await asyncio.to_thread(call, openai_pool_sk, "not-in-the-pool")
    assert err.value.body["error"]["type"] == "not_found_error" and "test-model" in err.value.body["error"]["message"]
    counter = sdk(messages_live, openai_pool_sk)
    with pytest.raises(anthropic.NotFoundError):
        await asyncio.to_thread(counter.messages.count_tokens, model="test-model", messages=ASK)
    counter.close()
    r = httpx.post(f"{messages_live.url}/api/keys/{key_id}/disable", headers={"Authorization": f"Bearer {mk}"})
    assert r.status_code == 200
    with pytest.raises(anthropic.PermissionDeniedError) as err:
        await asyncio.to_thread(call, sk, "not-in-the-pool")  # 403 comes before the model's 404
    assert err.value.body["error"]["type"] == "permission_error"
    assert recorder.total == 0  # nothing reached the upstream


@pytest.mark.parametrize("upstream", [SLOW], indirect=True)
async def test_a_second_request_while_one_streams_is_a_rate_limit_error_on_either_api(messages_live: LiveGateway):
    sk, key_id = messages_live.new_key(pool="claude")
    client = anthropic.AsyncAnthropic(base_url=messages_live.url, api_key=sk, max_retries=0)
    async with client.messages.stream(model="test-model", max_tokens=400, messages=ASK) as events:
        async for event in events:
            if event.type == "text":
                break
        with pytest.raises(anthropic.RateLimitError) as err:
            await client.messages.create(model="test-model", max_tokens=8, messages=ASK)
        assert err.value.response.headers["retry-after"] == "1"
        assert err.value.body["error"]["type"] == "rate_limit_error"
        r = await client._client.post(messages_live.url + "/v1/chat/completions",
                                      headers={"Authorization": f"Bearer {sk}"},
                                      json={"model": "test-model", "messages": ASK})
        assert r.status_code == 429 and r.json()["error"]["code"] == "concurrency_limit"
    # Leaving mid-stream freed the key at once (and stopped the upstream).
    await messages_live.upstream.recorder.wait_for(lambda r: r.in_flight == 0 and r.cancelled == 1)
    await messages_live.wait_key_free(key_id)
    reply = await client.messages.create(model="test-model", max_tokens=2, messages=ASK)
    assert reply.usage.output_tokens == 2
    assert messages_live.upstream.recorder.max_in_flight(key_id) == 1
    await client.close()


# --- revocation, blocks, usage -----------------------------------------------------------------

@pytest.mark.parametrize("upstream", [SLOW], indirect=True)
async def test_revoking_the_key_ends_its_messages_stream_with_an_error_event_within_a_second(
        messages_live: LiveGateway):
    mk = messages_live.new_account()
    sk, key_id = messages_live.new_key(mk, pool="claude")
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
    name, data = frames[-1]
    assert name == "error" and data["type"] == "error" and data["error"]["type"] == "permission_error"
    assert len(frames) < 50


async def test_usage_rows_hold_the_messages_input_and_output_tokens(tmp_path, database_url, upstream):
    from tests.fixtures.live import MESSAGES_POOLS

    with live_gateway(tmp_path, database_url, upstream, pools=MESSAGES_POOLS) as live:
        sk, key_id = live.new_key(pool="claude")
        client = sdk(live, sk)
        await asyncio.to_thread(client.messages.create, model="test-model", max_tokens=5, messages=ASK)

        def stream() -> None:
            with client.messages.stream(model="test-model", max_tokens=64, messages=ASK,
                                        system="You sell seats.") as events:
                events.until_done()

        await asyncio.to_thread(stream)
        # The stream's output count arrives in message_delta, its input count in message_start.
        rows = sorted(await wait_usage(live, key_id, 2), key=lambda row: row.completion_tokens)
        assert [(r.prompt_tokens, r.completion_tokens, r.usage_source, r.endpoint) for r in rows] == [
            (4, 5, "upstream", "messages"), (7, 16, "upstream", "messages")]
        assert len(await usage_rows(live, key_id)) == 2
        client.close()


LATER_POOL = """
[blocks]
later = "{start}-{end}"

[pools.claude]
name = "Claude-style"
models = ["test-model"]
upstreams = ["{{upstream}}"]
upstream_api = "anthropic"
seats = 5
prices = {{{{ later = "10.00" }}}}
"""


async def test_outside_its_blocks_a_key_gets_a_rate_limit_error_with_retry_after(tmp_path, sqlite_url, upstream):
    start = datetime.now(UTC).replace(second=0, microsecond=0) + timedelta(hours=2)
    pools = LATER_POOL.format(start=start.strftime("%H:%M"), end=(start + timedelta(hours=1)).strftime("%H:%M"))
    with live_gateway(tmp_path, sqlite_url, upstream, pools=pools) as live:
        sk, _ = live.new_key(pool="claude", blocks=["later"])
        client = sdk(live, sk)
        with pytest.raises(anthropic.RateLimitError) as err:
            await asyncio.to_thread(client.messages.create, model="test-model", max_tokens=8, messages=ASK)
        client.close()
        assert err.value.body["error"]["type"] == "rate_limit_error"
        assert f"later {start.strftime('%H:%M')}" in err.value.body["error"]["message"]
        expected = (start - datetime.now(UTC)).total_seconds()
        assert abs(int(err.value.response.headers["retry-after"]) - expected) <= 2
        assert upstream.recorder.total == 0


async def test_the_upstreams_own_refusal_is_passed_through_to_the_sdk(messages_live: LiveGateway):
    sk, _ = messages_live.new_key(pool="claude")
    async with httpx.AsyncClient(base_url=messages_live.url, timeout=30) as http:
        r = await http.post("/v1/messages", headers={"x-api-key": sk}, json={"model": "test-model", "messages": ASK})
    # The upstream's 400 (no max_tokens), unchanged: its type and its message.
    assert r.status_code == 400
    assert r.json() == {"type": "error", "error": {"type": "invalid_request_error",
                                                   "message": "max_tokens: Field required (a positive integer)"}}


@pytest.mark.parametrize("upstream", [UpstreamSettings(delay_s=0.05, chunks=100)], indirect=True)
async def test_a_stream_cut_by_the_upstream_or_its_timeout_ends_with_an_error_event_the_sdk_raises(
        tmp_path, sqlite_url, upstream):
    from tests.fixtures.live import MESSAGES_POOLS

    with live_gateway(tmp_path, sqlite_url, upstream, pools=MESSAGES_POOLS, upstream_total_timeout_s=1.0) as live:
        sk, _ = live.new_key(pool="claude")
        client = sdk(live, sk)

        def read_stream() -> list[str]:
            seen: list[str] = []
            with client.messages.stream(model="test-model", max_tokens=100, messages=ASK) as events:
                for event in events:
                    seen.append(event.type)
            return seen

        with pytest.raises(anthropic.APIStatusError) as err:  # the timeout: 100 chunks take 5 s
            await asyncio.to_thread(read_stream)
        assert err.value.body["error"]["type"] == "timeout_error"
        upstream.control("cut", after_chunks=3)
        with pytest.raises(anthropic.APIStatusError) as err:
            await asyncio.to_thread(read_stream)
        assert err.value.body["error"]["type"] == "api_error"
        await upstream.recorder.wait_for(lambda r: r.in_flight == 0)
        upstream.behaviour.reset()
        reply = await asyncio.to_thread(client.messages.create, model="test-model", max_tokens=2, messages=ASK)
        assert reply.usage.output_tokens == 2
        client.close()
