"""A funding round on a real gateway and a real anvil chain: pledges paid from the prepaid balance,
with the official x402 client over HTTP and over MCP; the official OpenAI and Anthropic SDKs get a
403 pool_funding they do not retry; the pledge that reaches the goal moves the pool to activating;
the operator's activation starts every pledge's period at that moment, and the keys work at once."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from x402.http.clients import x402HttpxClient

from agent_gateway.testing.devchain import DevChain
from tests.fixtures.live import LiveGateway, live_gateway
from tests.fixtures.mcp import mcp_session, x402_mcp_session
from tests.fixtures.x402 import chain_settings

pytestmark = pytest.mark.anyio
ADMIN_TOKEN = "adm-" + "e9" * 20
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}", "X-Admin-Actor": "ops"}
POOLS = """
[blocks]
day = "00:00-24:00"

[pools.round]
name = "Seed round"
models = ["test-model"]
upstreams = ["{upstream}"]
seats = 10
status = "funding"
funding_goal = 3
funding_deadline = 2031-01-31T00:00:00Z
prices = {{ day = "10.00" }}
"""
ORDER = {"pool": "round", "blocks": ["day"], "quantity": 1}
ASK = [{"role": "user", "content": "hi"}]


@pytest.fixture
def round_gateway(tmp_path: Path, sqlite_url: str, upstream, devchain: DevChain) -> Iterator[LiveGateway]:
    with live_gateway(tmp_path, sqlite_url, upstream, pools=POOLS, admin_token=ADMIN_TOKEN,
                      **chain_settings(devchain)) as live:
        yield live


def refused(live: LiveGateway, endpoint: str) -> float:
    """How many requests /metrics counts as refused with pool_funding on `endpoint` (every attempt
    an SDK makes is one)."""
    text = httpx.get(live.url + "/metrics").text
    found = re.search(rf'^agw_proxy_requests_total\{{endpoint="{endpoint}",outcome="refused_pool_funding"\}} '
                      r'([0-9.]+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


async def test_a_funding_round_from_pledges_to_live_keys(round_gateway, devchain, chain_view):
    live = round_gateway
    # 1. A pledge from the prepaid balance (management key): pending, no period, a key minted.
    mk = live.new_account()
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {mk}"}, timeout=30) as http:
        r = http.post("/api/pools/round/subscribe", json={"blocks": ["day"], "quantity": 1})
        assert r.status_code == 201, r.text
        [balance_pledge] = r.json()["data"]["subscriptions"]
        r = http.post("/api/keys/subscription", json={"name": "pledge", "subscriptionId": balance_pledge["id"]})
        assert r.status_code == 201, r.text
        sk_balance = r.json()["data"]["apiKey"]
    assert balance_pledge["status"] == "pending" and balance_pledge["currentPeriodEnd"] is None

    # 2. A pledge paid with the official x402 client over HTTP: settled on-chain, delivered pending.
    agent = chain_view.new_wallet()
    pay_to_before = chain_view.usdc(devchain.pay_to)
    async with x402HttpxClient(devchain.x402_client(agent.key), base_url=live.url, timeout=60) as http:
        r = await http.post("/api/agent/subscribe-pool", json={**ORDER, "name": "pledger"})
    assert r.status_code == 201, r.text
    [x402_pledge] = r.json()["data"]["subscriptions"]
    assert x402_pledge["status"] == "pending" and x402_pledge["apiKey"].startswith("sk_")
    assert chain_view.usdc(devchain.pay_to) == pay_to_before + 10 * 10**6
    pledged_at = datetime.now(UTC)

    # 3. Inference on a pledge's key: 403 pool_funding with the progress, never retried by the SDKs.
    before = refused(live, "chat.completions")
    with openai.OpenAI(base_url=live.url + "/v1", api_key=sk_balance) as client:  # default retries (2)
        with pytest.raises(openai.PermissionDeniedError) as caught:
            client.chat.completions.create(model="test-model", messages=ASK)
    assert caught.value.code == "pool_funding" and "2/3 seats pledged" in caught.value.message
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert refused(live, "chat.completions") == before + 1
    before = refused(live, "messages")
    client_a = anthropic.Anthropic(base_url=live.url, api_key=x402_pledge["apiKey"])  # default retries (2)
    with pytest.raises(anthropic.PermissionDeniedError) as denied:
        client_a.messages.create(model="test-model", max_tokens=8, messages=ASK)
    body = denied.value.body
    assert isinstance(body, dict) and body["type"] == "error" and body["error"]["type"] == "permission_error"
    assert "2/3 seats pledged" in body["error"]["message"]
    assert refused(live, "messages") == before + 1

    # 4. The catalog, the agents' plans and MCP list_pools show the round.
    plans = httpx.get(live.url + "/api/agent/plans").json()["data"]
    assert plans["products"][0]["funding"] == {"pledgedSeats": 2, "goalSeats": 3, "progress": "2/3",
                                               "deadline": "2031-01-31T00:00:00Z"}
    async with mcp_session(live.url) as session:
        listed = await session.call_tool("list_pools", {})
    assert not listed.isError and listed.structuredContent["pools"][0]["funding"]["progress"] == "2/3"

    # 5. The pledge that reaches the goal (x402 over MCP) moves the pool to activating.
    other = chain_view.new_wallet()
    async with x402_mcp_session(live.url, devchain.x402_client(other.key)) as session:
        result = await session.call_tool("subscribe_pool", {**ORDER, "name": "mcp-pledger"})
    assert result.payment_made and not result.is_error, result.content
    [mcp_pledge] = result.raw_result.structuredContent["subscriptions"]
    assert mcp_pledge["status"] == "pending"
    assert httpx.get(live.url + "/api/pools/round").json()["data"]["status"] == "activating"
    assert 'agw_pools_funded_total{pool="round"}' in httpx.get(live.url + "/metrics").text
    r = httpx.get(live.url + "/api/admin/audit?target=pool:round", headers=ADMIN)
    assert [(a["actor"], a["after"]["status"]) for a in r.json()["data"]] == [("funding-goal", "activating")]

    # 6. The operator activates: every pledge's full period starts now, and the keys work at once.
    activating_from = datetime.now(UTC)
    assert activating_from > pledged_at
    r = httpx.post(live.url + "/api/admin/pools/round/state", json={"status": "active", "reason": "go"},
                   headers=ADMIN)
    assert r.status_code == 200, r.text
    activated_by = datetime.now(UTC)
    r = httpx.get(live.url + "/api/subscriptions", headers={"Authorization": f"Bearer {mk}"})
    [started] = r.json()["data"]
    start, end = parse(started["currentPeriodStart"]), parse(started["currentPeriodEnd"])
    assert started["status"] == "active" and activating_from <= start <= activated_by
    assert end - start == timedelta(days=30) and start > parse(started["createdAt"])
    with openai.OpenAI(base_url=live.url + "/v1", api_key=sk_balance, max_retries=0) as client:
        reply = client.chat.completions.create(model="test-model", messages=ASK)
    assert reply.choices[0].message.content
    reply_a = client_a.messages.create(model="test-model", max_tokens=8, messages=ASK)
    assert reply_a.content[0].type == "text"
    with openai.OpenAI(base_url=live.url + "/v1", api_key=mcp_pledge["apiKey"], max_retries=0) as client:
        assert client.chat.completions.create(model="test-model", messages=ASK).choices[0].message.content
