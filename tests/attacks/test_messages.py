"""Attacks on the Anthropic Messages routes: one slot shared with the OpenAI routes, model text
that forges the end of the stream, hostile bodies and headers, the upstream's key kept apart."""

from __future__ import annotations

import asyncio
import json
import os

import httpx
import pytest

from agent_gateway.testing.upstream import UpstreamSettings
from tests.fixtures.live import MESSAGES_POOLS, LiveGateway, live_gateway

pytestmark = pytest.mark.anyio
ASK = [{"role": "user", "content": "tell me about seats"}]
BODY = {"model": "test-model", "max_tokens": 8, "messages": ASK}


def bearer(sk: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {sk}"}


# The admitted request lasts 3 s, so all twenty are in while it runs even on a loaded machine.
@pytest.mark.parametrize("upstream", [UpstreamSettings(delay_s=0.15, chunks=20)], indirect=True)
async def test_twenty_requests_split_over_both_apis_on_one_key_admit_exactly_one(messages_live: LiveGateway):
    sk, key_id = messages_live.new_key(pool="claude")
    async with httpx.AsyncClient(base_url=messages_live.url, timeout=30) as http:
        async def call(i: int) -> httpx.Response:
            if i % 2:
                return await http.post("/v1/chat/completions", headers=bearer(sk),
                                        json={"model": "test-model", "messages": ASK})
            route = "/anthropic/v1/messages" if i % 4 else "/v1/messages"
            return await http.post(route, headers={"x-api-key": sk}, json={**BODY, "max_tokens": 20})
        responses = await asyncio.gather(*(call(i) for i in range(20)))
    assert sorted(r.status_code for r in responses) == [200] + [429] * 19
    for i, r in enumerate(responses):
        if r.status_code == 429 and i % 2 == 0:
            assert r.json()["error"]["type"] == "rate_limit_error" and r.headers["retry-after"] == "1"
    assert messages_live.upstream.recorder.max_in_flight(key_id) == 1
    assert messages_live.upstream.recorder.total == 1


# A model writing SSE code: every token of its text is Anthropic's end-of-stream event. The upstream
# keeps the response open after its last event, so only message_stop itself can free the slot.
@pytest.mark.parametrize("upstream", [UpstreamSettings(delay_s=0.05, chunks=30, linger_s=30,
                                                       words=("\n\nevent: message_stop\n\n",))], indirect=True)
async def test_model_text_that_writes_message_stop_does_not_free_the_slot(messages_live: LiveGateway):
    sk, key_id = messages_live.new_key(pool="claude")
    body = {**BODY, "max_tokens": 30, "stream": True}
    async with httpx.AsyncClient(base_url=messages_live.url, timeout=30) as http:
        async with http.stream("POST", "/v1/messages", headers={"x-api-key": sk}, json=body) as response:
            assert response.status_code == 200
            deltas = 0
            async for line in response.aiter_lines():
                if line == "event: content_block_delta":
                    deltas += 1
                    if deltas == 5:
                        # Mid-stream, after several "message_stop"s in the text: the key is still busy.
                        second = await http.post("/v1/messages", headers={"x-api-key": sk}, json=BODY)
                        assert second.status_code == 429, second.text
                if line == "event: message_stop":
                    break
            assert messages_live.upstream.recorder.max_in_flight(key_id) == 1
            # The real message_stop frees the slot, while the upstream still holds the response open.
            after = await http.post("/v1/messages", headers={"x-api-key": sk}, json=BODY)
            assert after.status_code == 200, after.text
    assert deltas == 30


# The same on a translating pool: the chat upstream's model writes (JSON-escaped, as a real one
# would) both streams' end markers in every token. Only the upstream's own [DONE] ends the
# Messages stream and frees the slot; the text reaches the client whole.
@pytest.mark.parametrize("upstream", [UpstreamSettings(delay_s=0.05, chunks=30, linger_s=30, words=(
    "\\n\\ndata: [DONE]\\n\\nevent: message_stop\\n\\n",))], indirect=True)
async def test_chat_model_text_that_writes_done_or_message_stop_does_not_end_a_translated_stream(
        messages_live: LiveGateway):
    sk, key_id = messages_live.new_key(pool="alpha")
    body = {**BODY, "max_tokens": 30, "stream": True}
    text = ""
    async with httpx.AsyncClient(base_url=messages_live.url, timeout=30) as http:
        async with http.stream("POST", "/v1/messages", headers={"x-api-key": sk}, json=body) as response:
            assert response.status_code == 200
            deltas = 0
            event = ""
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == "content_block_delta":
                    deltas += 1
                    text += json.loads(line[6:])["delta"]["text"]
                    if deltas == 5:
                        second = await http.post("/v1/messages", headers={"x-api-key": sk}, json=BODY)
                        assert second.status_code == 429, second.text
                if line == "event: message_stop":
                    break
            assert messages_live.upstream.recorder.max_in_flight(key_id) == 1
            after = await http.post("/v1/messages", headers={"x-api-key": sk}, json=BODY)
            assert after.status_code == 200, after.text
    assert deltas == 30
    assert text == "\n\ndata: [DONE]\n\nevent: message_stop\n\n" * 30


async def test_the_clients_key_never_reaches_the_upstream_which_gets_the_pools_own_key(
        tmp_path, sqlite_url, upstream, monkeypatch):
    monkeypatch.setenv("MSG_TEST_UPSTREAM_KEY", "upstream-secret")
    pools = MESSAGES_POOLS.replace('upstream_api = "anthropic"',
                                   'upstream_api = "anthropic"\nupstream_api_key_env = "MSG_TEST_UPSTREAM_KEY"')
    with live_gateway(tmp_path, sqlite_url, upstream, pools=pools) as live:
        sk, _ = live.new_key(pool="claude")
        r = httpx.post(live.url + "/v1/messages", json=BODY, timeout=30, headers={
            "x-api-key": sk, "anthropic-version": "2023-06-01", "anthropic-beta": "x-beta", "cookie": "c=1",
            "x-forwarded-for": "6.6.6.6"})
        assert r.status_code == 200, r.text
        seen = upstream.app.state.last_headers
        assert seen["x-api-key"] == "upstream-secret" and "authorization" not in seen
        assert seen["anthropic-version"] == "2023-06-01" and seen["anthropic-beta"] == "x-beta"
        assert "cookie" not in seen and "x-forwarded-for" not in seen
        assert sk not in " ".join(seen.values())
        # Bearer auth on the Messages route: still only the pool's key goes upstream.
        r = httpx.post(live.url + "/anthropic/v1/messages", json=BODY, headers=bearer(sk), timeout=30)
        assert r.status_code == 200 and "authorization" not in upstream.app.state.last_headers
    assert os.environ["MSG_TEST_UPSTREAM_KEY"] == "upstream-secret"


@pytest.mark.parametrize(("content", "status", "kind"), [
    (b'{"model": "test-model", "max_tokens": 8, "messages": [], "stream": "yes"}', 400, "invalid_request_error"),
    (b'{"model": "test-model", "model": "other", "max_tokens": 8, "messages": []}', 400, "invalid_request_error"),
    (b'{"Model": "other", "model": "test-model", "max_tokens": 8, "messages": []}', 400, "invalid_request_error"),
    (b'{"model": "test-model", "messages": [', 400, "invalid_request_error"),
    (b'[1, 2]', 400, "invalid_request_error"),
    (b'{"max_tokens": 8, "messages": []}', 400, "invalid_request_error"),
    (b'{"model": "test-model", "pad": "' + b"x" * 11_000_000 + b'"}', 413, "request_too_large"),
])
async def test_hostile_bodies_get_anthropic_shaped_4xx_and_never_reach_the_upstream(
        messages_live: LiveGateway, content, status, kind):
    sk, _ = messages_live.new_key(pool="claude")
    async with httpx.AsyncClient(base_url=messages_live.url, timeout=60) as http:
        r = await http.post("/v1/messages", content=content,
                            headers={"x-api-key": sk, "content-type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == kind
    assert messages_live.upstream.recorder.total == 0


@pytest.mark.parametrize("headers", [
    {"x-api-key": ""}, {"x-api-key": "sk_a sk_b"}, {"Authorization": "Basic abc"}, {"x-api-key": "mk_not_an_sk"},
])
async def test_garbled_or_foreign_keys_are_authentication_errors(messages_live: LiveGateway, headers):
    r = httpx.post(messages_live.url + "/v1/messages", json=BODY, headers=headers, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert messages_live.upstream.recorder.total == 0


async def test_upstream_failures_are_anthropic_api_errors_and_free_the_key(messages_live: LiveGateway):
    sk, _ = messages_live.new_key(pool="claude")
    messages_live.upstream.control("fail", status=503)
    r = httpx.post(messages_live.url + "/v1/messages", json=BODY, headers={"x-api-key": sk}, timeout=30)
    assert r.status_code == 502 and r.json()["error"]["type"] == "api_error"
    messages_live.upstream.behaviour.reset()
    r = httpx.post(messages_live.url + "/v1/messages", json=BODY, headers={"x-api-key": sk}, timeout=30)
    assert r.status_code == 200
