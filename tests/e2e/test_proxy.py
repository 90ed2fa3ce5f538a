"""The streaming proxy on a real port, driven by the official openai SDK and raw HTTP clients."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from agent_gateway.db.models import UsageRecord
from agent_gateway.testing.upstream import UpstreamSettings
from tests.fixtures.live import LiveGateway

pytestmark = pytest.mark.anyio
MESSAGES = [{"role": "user", "content": "tell me about seats"}]


def bearer(sk: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {sk}"}


async def usage_rows(live: LiveGateway, key_id: str) -> list[UsageRecord]:
    from sqlalchemy import select

    from agent_gateway.db.engine import Database

    db = Database(live.settings.database_url)
    try:
        async with db.transaction() as session:
            return list(await session.scalars(select(UsageRecord).where(UsageRecord.api_key_id == key_id)))
    finally:
        await db.dispose()


async def wait_usage(live: LiveGateway, key_id: str, count: int) -> list[UsageRecord]:
    async with asyncio.timeout(10):
        while len(rows := await usage_rows(live, key_id)) < count:
            await asyncio.sleep(0.05)
    return rows


# --- the official SDK ------------------------------------------------------------------------

async def test_openai_sdk_sync_and_async_streaming_and_not(gateway_live: LiveGateway):
    sk, key_id = gateway_live.new_key()
    direct = openai.OpenAI(base_url=gateway_live.upstream.url, api_key="direct", max_retries=0)
    expected = direct.chat.completions.create(model="test-model", messages=MESSAGES).choices[0].message.content

    sync = openai.OpenAI(base_url=gateway_live.url + "/v1", api_key=sk, max_retries=0)
    reply = await asyncio.to_thread(sync.chat.completions.create, model="test-model", messages=MESSAGES)
    assert reply.choices[0].message.content == expected
    assert reply.usage.completion_tokens == 16

    def stream_text(**extra):
        chunks = list(sync.chat.completions.create(model="test-model", messages=MESSAGES, stream=True, **extra))
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks

    text, chunks = await asyncio.to_thread(stream_text)
    assert text == expected
    # The gateway asked upstream for usage, and removed that chunk since the client did not ask.
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)
    text, chunks = await asyncio.to_thread(stream_text, stream_options={"include_usage": True})
    assert text == expected and chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16

    async with openai.AsyncOpenAI(base_url=gateway_live.url + "/v1", api_key=sk, max_retries=0) as aclient:
        areply = await aclient.chat.completions.create(model="test-model", messages=MESSAGES)
        assert areply.choices[0].message.content == expected
        astream = await aclient.chat.completions.create(model="test-model", messages=MESSAGES, stream=True)
        assert "".join([c.choices[0].delta.content or "" async for c in astream]) == expected
        completion = await aclient.completions.create(model="test-model", prompt="once upon")
        assert completion.choices[0].text
        embedding = await aclient.embeddings.create(model="test-embedding", input="hello")
        assert len(embedding.data[0].embedding) == 16
        models = await aclient.models.list()
        assert [m.id for m in models.data] == ["test-model", "test-embedding"]
    sync.close()
    direct.close()

    # Every proxied request was recorded with the upstream's own token counts.
    rows = await wait_usage(gateway_live, key_id, 7)
    assert {r.usage_source for r in rows} == {"upstream"}
    assert sorted(r.endpoint for r in rows) == ["chat.completions"] * 5 + ["completions", "embeddings"]
    assert all(r.completion_tokens == 16 for r in rows if r.endpoint == "chat.completions")
    usage = httpx.get(gateway_live.url + "/v1/usage", headers=bearer(sk)).json()["data"]
    assert usage["usage"]["1h"]["requests"] == 7 and usage["rate_limits"]["concurrent_requests"] == 1


# --- one request in flight -------------------------------------------------------------------

# The admitted request lasts 3 s, so all twenty are in while it runs even on a loaded machine.
@pytest.mark.parametrize("upstream", [UpstreamSettings(delay_s=0.15, chunks=20)], indirect=True)
async def test_twenty_simultaneous_requests_one_admitted(gateway_live: LiveGateway):
    sk, key_id = gateway_live.new_key()
    async with httpx.AsyncClient(base_url=gateway_live.url, timeout=30) as http:
        async def call():
            return await http.post("/v1/chat/completions", headers=bearer(sk),
                                   json={"model": "test-model", "messages": MESSAGES})
        responses = await asyncio.gather(*(call() for _ in range(20)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [429] * 19
    refused = [r.json()["error"] for r in responses if r.status_code == 429]
    assert {e["code"] for e in refused} == {"concurrency_limit"}
    assert gateway_live.upstream.recorder.max_in_flight(key_id) == 1
    assert gateway_live.upstream.recorder.total == 1
    # Refused requests changed nothing: one usage row, and the key is free again.
    await wait_usage(gateway_live, key_id, 1)
    await gateway_live.on_server(gateway_live.services.usage.flush())
    assert len(await usage_rows(gateway_live, key_id)) == 1
    r = httpx.post(gateway_live.url + "/v1/chat/completions", headers=bearer(sk),
                   json={"model": "test-model", "messages": MESSAGES, "max_tokens": 1}, timeout=30)
    assert r.status_code == 200


async def test_a_client_calling_back_to_back_is_never_refused(gateway_live: LiveGateway):
    """The slot is free before the client can see the end of a response, so a sequential client
    (the next request sent the moment the previous one ends, or right after [DONE]) never gets 429."""
    sk, _ = gateway_live.new_key()
    body = {"model": "test-model", "messages": MESSAGES, "max_tokens": 4}
    async with httpx.AsyncClient(base_url=gateway_live.url, timeout=30) as http:
        for _ in range(150):
            r = await http.post("/v1/chat/completions", headers=bearer(sk), json=body)
            assert r.status_code == 200, r.text
        for _ in range(50):
            async with http.stream("POST", "/v1/chat/completions", headers=bearer(sk),
                                   json={**body, "stream": True}) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line == "data: [DONE]":
                        break
            # The next request goes out right after [DONE], before the stream has closed.
            r = await http.post("/v1/chat/completions", headers=bearer(sk), json=body)
            assert r.status_code == 200, r.text


# A coding model writing SSE client code: every token of its text is the stream's end marker.
@pytest.mark.parametrize("upstream", [UpstreamSettings(delay_s=0.05, chunks=30, words=("data: [DONE]",))],
                         indirect=True)
async def test_model_text_that_mentions_the_end_marker_does_not_free_the_slot(gateway_live: LiveGateway):
    sk, key_id = gateway_live.new_key()
    body = {"model": "test-model", "messages": MESSAGES, "stream": True}
    async with httpx.AsyncClient(base_url=gateway_live.url, timeout=30) as http:
        async with http.stream("POST", "/v1/chat/completions", headers=bearer(sk), json=body) as response:
            assert response.status_code == 200
            seen = 0
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    seen += 1
                    if seen == 5:
                        # Mid-stream, after several "[DONE]"s in the text: the key is still busy.
                        second = await http.post("/v1/chat/completions", headers=bearer(sk), json=body)
                        assert second.status_code == 429, second.text
    assert gateway_live.upstream.recorder.max_in_flight(key_id) == 1


async def test_different_keys_run_in_parallel(gateway_live: LiveGateway):
    gateway_live.upstream.control("stall")
    mk = gateway_live.new_account()
    keys = [gateway_live.new_key(mk) for _ in range(3)]
    async with httpx.AsyncClient(base_url=gateway_live.url, timeout=30) as http:
        tasks = [asyncio.create_task(http.post("/v1/chat/completions", headers=bearer(sk),
                                               json={"model": "test-model", "messages": MESSAGES}))
                 for sk, _ in keys]
        await gateway_live.upstream.recorder.wait_for(lambda r: r.in_flight == 3)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await gateway_live.upstream.recorder.wait_for(lambda r: r.in_flight == 0)


# --- aborts at every phase release the slot --------------------------------------------------

async def _next_request_is_admitted(live: LiveGateway, sk: str) -> None:
    live.upstream.behaviour.reset()
    async with httpx.AsyncClient(base_url=live.url, timeout=10) as http:
        r = await http.post("/v1/chat/completions", headers=bearer(sk),
                            json={"model": "test-model", "messages": MESSAGES, "max_tokens": 2})
    assert r.status_code == 200, r.text


async def test_client_gone_before_upstream_headers(gateway_live: LiveGateway):
    sk, key_id = gateway_live.new_key()
    gateway_live.upstream.control("stall")
    recorder = gateway_live.upstream.recorder
    async with httpx.AsyncClient(base_url=gateway_live.url, timeout=30) as http:
        task = asyncio.create_task(http.post("/v1/chat/completions", headers=bearer(sk),
                                             json={"model": "test-model", "messages": MESSAGES, "stream": True}))
        await recorder.wait_for(lambda r: r.in_flight_for(key_id) == 1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    # The gateway cancelled the upstream request too.
    await recorder.wait_for(lambda r: r.in_flight == 0 and r.cancelled == 1)
    await gateway_live.wait_key_free(key_id)
    await _next_request_is_admitted(gateway_live, sk)


@pytest.mark.parametrize("upstream", [UpstreamSettings(delay_s=0.05, chunks=200)], indirect=True)
@pytest.mark.parametrize("chunks_before_leaving", [1, 20])
async def test_client_gone_after_first_chunk_or_mid_stream(gateway_live: LiveGateway, chunks_before_leaving):
    sk, key_id = gateway_live.new_key()
    recorder = gateway_live.upstream.recorder
    async with httpx.AsyncClient(base_url=gateway_live.url, timeout=30) as http:
        async with http.stream("POST", "/v1/chat/completions", headers=bearer(sk),
                               json={"model": "test-model", "messages": MESSAGES, "stream": True}) as response:
            seen = 0
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    seen += 1
                    if seen == chunks_before_leaving:
                        break
    await recorder.wait_for(lambda r: r.in_flight == 0 and r.cancelled == 1)
    await gateway_live.wait_key_free(key_id)
    await _next_request_is_admitted(gateway_live, sk)
    rows = await wait_usage(gateway_live, key_id, 2)
    cut_short = [r for r in rows if r.usage_source == "estimated"]
    assert len(cut_short) == 1 and cut_short[0].completion_tokens >= chunks_before_leaving - 1


async def test_upstream_5xx_is_502_and_frees_the_key(gateway_live: LiveGateway):
    sk, _ = gateway_live.new_key()
    gateway_live.upstream.control("fail", status=503)
    r = httpx.post(gateway_live.url + "/v1/chat/completions", headers=bearer(sk),
                   json={"model": "test-model", "messages": MESSAGES}, timeout=10)
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_error"
    await _next_request_is_admitted(gateway_live, sk)


async def test_upstream_unreachable_is_502_and_frees_the_key(tmp_path, sqlite_url, upstream):
    from tests.fixtures.live import live_gateway

    class Nowhere:
        url = "http://127.0.0.1:9/v1"

    with live_gateway(tmp_path, sqlite_url, Nowhere()) as live:  # type: ignore[arg-type]
        sk, _ = live.new_key()
        for _ in range(2):
            r = httpx.post(live.url + "/v1/chat/completions", headers=bearer(sk),
                           json={"model": "test-model", "messages": MESSAGES}, timeout=10)
            assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unreachable"


async def test_upstream_first_byte_timeout_is_504_and_frees_the_key(tmp_path, sqlite_url, upstream):
    from tests.fixtures.live import live_gateway

    with live_gateway(tmp_path, sqlite_url, upstream, upstream_first_byte_timeout_s=0.3) as live:
        sk, _ = live.new_key()
        upstream.control("stall")
        r = httpx.post(live.url + "/v1/chat/completions", headers=bearer(sk),
                       json={"model": "test-model", "messages": MESSAGES}, timeout=10)
        assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
        await upstream.recorder.wait_for(lambda r: r.in_flight == 0)
        await _next_request_is_admitted(live, sk)


@pytest.mark.parametrize("upstream", [UpstreamSettings(delay_s=0.05, chunks=100)], indirect=True)
async def test_upstream_total_timeout_mid_stream_ends_with_an_error_event(tmp_path, sqlite_url, upstream):
    from tests.fixtures.live import live_gateway

    with live_gateway(tmp_path, sqlite_url, upstream, upstream_total_timeout_s=0.5) as live:
        sk, _ = live.new_key()
        events = _sse_events(httpx.post(live.url + "/v1/chat/completions", headers=bearer(sk), timeout=10,
                                        json={"model": "test-model", "messages": MESSAGES, "stream": True}))
        assert 1 < len(events) < 100
        assert events[-1]["error"]["code"] == "upstream_timeout"
        await upstream.recorder.wait_for(lambda r: r.in_flight == 0)
        await _next_request_is_admitted(live, sk)


# A long, fast stream: far more bytes than the sockets between gateway and client can buffer.
@pytest.mark.parametrize("upstream", [UpstreamSettings(chunks=200_000)], indirect=True)
async def test_a_client_that_stops_reading_keeps_neither_the_upstream_nor_the_key(tmp_path, sqlite_url, upstream):
    import socket
    from urllib.parse import urlsplit

    from tests.fixtures.live import live_gateway

    with live_gateway(tmp_path, sqlite_url, upstream, upstream_total_timeout_s=3.0) as live:
        sk, key_id = live.new_key()
        url = urlsplit(live.url)
        body = json.dumps({"model": "test-model", "messages": MESSAGES, "stream": True}).encode()
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect((url.hostname, url.port))
        try:
            stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + sk.encode()
                            + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            # The client never reads. At the total timeout the gateway must stop the upstream and
            # free the key at once, not wait (forever) to hand the error to a client that won't read.
            await upstream.recorder.wait_for(lambda r: r.total >= 1, timeout=5)
            await upstream.recorder.wait_for(lambda r: r.in_flight == 0, timeout=6)
            await _next_request_is_admitted(live, sk)
        finally:
            stalled.close()


async def test_a_stream_cut_by_upstream_ends_with_an_error_event_the_sdk_raises(gateway_live: LiveGateway):
    sk, _ = gateway_live.new_key()
    gateway_live.upstream.control("cut", after_chunks=3)
    client = openai.OpenAI(base_url=gateway_live.url + "/v1", api_key=sk, max_retries=0)
    received = []

    def consume():
        for chunk in client.chat.completions.create(model="test-model", messages=MESSAGES, stream=True):
            received.append(chunk)

    with client, pytest.raises(openai.APIError, match="broke off"):
        await asyncio.to_thread(consume)
    assert len(received) == 3
    await _next_request_is_admitted(gateway_live, sk)


def _sse_events(response: httpx.Response) -> list[dict]:
    return [json.loads(line[5:]) for line in response.text.splitlines()
            if line.startswith("data:") and line.strip() != "data: [DONE]"]
