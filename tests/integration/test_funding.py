"""Funding pools, phase 1: a seat bought on a funding pool is a pledge (pending, no period); its key
is refused with 403 pool_funding and the round's progress; reaching the goal moves the pool to
activating; the operator's activation starts every pledge's full period at that moment."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import httpx
import openai
import pytest

from agent_gateway.clock import FixedClock
from agent_gateway.settings import Settings
from tests.conftest import TEST_NOW, Gateway, auth, in_process_gateway

pytestmark = pytest.mark.anyio

ADMIN_TOKEN = "adm-" + "f3" * 20
ADMIN = {**auth(ADMIN_TOKEN), "X-Admin-Actor": "ops"}
ROUND = """
[pools.round]
name = "Seed round"
models = ["round-1"]
upstreams = ["http://127.0.0.1:9/v1"]
seats = 10
status = "funding"
funding_goal = 3
funding_deadline = 2026-12-31T00:00:00Z
prices = { europe = "20.00", americas = "15.00" }
"""
CHAT = {"model": "round-1", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def funding(settings: Settings, clock: FixedClock, pools_file: Path) -> AsyncIterator[Gateway]:
    pools_file.write_text(pools_file.read_text() + ROUND)
    async with in_process_gateway(settings, clock, admin_token=ADMIN_TOKEN) as gateway:
        yield gateway


async def pledge(gw: Gateway, mk: str, quantity: int = 1, cycle: str = "month") -> list[dict]:
    return await gw.buy(mk, pool="round", blocks=["europe"], quantity=quantity, cycle=cycle)


async def pool(gw: Gateway) -> dict:
    return (await gw.client.get("/api/pools/round")).json()["data"]


async def funded_metric(gw: Gateway) -> float:
    """agw_pools_funded_total for the pool (the counter lives as long as the test process)."""
    metrics = (await gw.client.get("/metrics")).text
    found = re.search(r'^agw_pools_funded_total\{pool="round"\} ([0-9.]+)$', metrics, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def test_a_seat_on_a_funding_pool_is_a_pledge_whose_key_is_refused_with_the_rounds_progress(funding):
    _, mk = await funding.new_account(credit="1000")
    [sub] = await pledge(funding, mk)
    assert sub["status"] == "pending" and sub["pledge"] is True
    assert sub["currentPeriodStart"] is None and sub["currentPeriodEnd"] is None
    key = await funding.mint(mk, sub["id"])  # a pledge's key can be minted
    assert key["subscriptionStatus"] == "pending" and key["subscriptionExpiresAt"] is None
    r = await funding.client.post("/v1/chat/completions", json=CHAT, headers=auth(key["apiKey"]))
    assert r.status_code == 403 and r.headers["x-should-retry"] == "false"
    error = r.json()
    assert error["error"]["code"] == "pool_funding" and "1/3 seats pledged" in error["error"]["message"]
    assert error["funding"] == {"pledgedSeats": 1, "goalSeats": 3, "progress": "1/3", "deadline": "2026-12-31T00:00:00Z"}
    # Nothing was spent from the period, because there is none yet; the pool still sells.
    assert (await pool(funding))["funding"]["progress"] == "1/3"


async def test_the_openai_sdk_gets_a_clear_refusal_and_does_not_retry_it(funding):
    _, mk = await funding.new_account(credit="1000")
    [sub] = await pledge(funding, mk)
    sk = (await funding.mint(mk, sub["id"]))["apiKey"]
    sent: list[str] = []

    async def count(request: httpx.Request) -> None:
        sent.append(request.url.path)

    transport = httpx.ASGITransport(app=funding.client._transport.app)  # type: ignore[attr-defined]
    async with httpx.AsyncClient(transport=transport, event_hooks={"request": [count]}) as http:
        # Default retries (2): a 5xx would be sent three times; this refusal is sent once.
        client = openai.AsyncOpenAI(base_url="http://gateway.test/v1", api_key=sk, http_client=http)
        with pytest.raises(openai.PermissionDeniedError) as caught:
            await client.chat.completions.create(model="round-1", messages=[{"role": "user", "content": "hi"}])
        assert caught.value.status_code == 403 and caught.value.code == "pool_funding"
        assert "1/3" in caught.value.message and sent == ["/v1/chat/completions"]
    # The Messages routes answer in Anthropic's shape, with the same status and header.
    r = await funding.client.post("/v1/messages", headers={"x-api-key": sk, "anthropic-version": "2023-06-01"},
                                  json={"model": "round-1", "max_tokens": 5,
                                        "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 403 and r.headers["x-should-retry"] == "false"
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "permission_error"
    assert "1/3 seats pledged" in body["error"]["message"]


async def test_pool_funding_comes_after_the_key_checks(funding):
    _, mk = await funding.new_account(credit="1000")
    [sub] = await pledge(funding, mk)
    key = await funding.mint(mk, sub["id"])
    r = await funding.client.post(f"/api/keys/{key['id']}/disable", headers=auth(mk))
    assert r.status_code == 200, r.text
    r = await funding.client.post("/v1/chat/completions", json=CHAT, headers=auth(key["apiKey"]))
    assert r.status_code == 403 and r.json()["error"]["code"] == "key_disabled"
    # A pledge has no period to extend yet: renewing it is refused before any payment is asked for.
    r = await funding.client.post("/api/agent/renew", json={"subscriptionId": sub["id"]})
    assert r.status_code == 409 and r.json()["error"]["code"] == "subscription_not_active"
    assert "still funding" in r.json()["error"]["message"]


async def test_enabling_an_account_again_restores_its_pledges_keys(funding):
    account_id, mk = await funding.new_account(credit="1000")
    [sub] = await pledge(funding, mk)
    key = await funding.mint(mk, sub["id"])
    r = await funding.client.post(f"/api/admin/accounts/{account_id}/disable", json={"reason": "check"},
                                  headers=ADMIN)
    assert r.status_code == 200 and r.json()["data"]["keysRevoked"] == [key["id"]], r.text
    r = await funding.client.post(f"/api/admin/accounts/{account_id}/enable", json={"reason": "ok"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    r = await funding.client.post("/v1/chat/completions", json=CHAT, headers=auth(key["apiKey"]))
    assert r.status_code == 403 and r.json()["error"]["code"] == "pool_funding"


async def test_reaching_the_goal_moves_the_pool_to_activating_and_tells_the_operator(funding, caplog):
    _, mk = await funding.new_account(credit="1000")
    await pledge(funding, mk, quantity=2)
    assert (await pool(funding))["status"] == "funding"
    funded_before = await funded_metric(funding)
    with caplog.at_level("WARNING", logger="agent_gateway.admin.funding"):
        [third] = await pledge(funding, mk)
    assert (await pool(funding))["status"] == "activating"
    assert any("reached its funding goal (3/3" in r.getMessage() for r in caplog.records)
    assert await funded_metric(funding) == funded_before + 1
    r = await funding.client.get("/api/admin/audit?target=pool:round", headers=ADMIN)
    [record] = r.json()["data"]
    assert (record["actor"], record["before"], record["after"]) == (
        "funding-goal", {"status": "funding"}, {"status": "activating"})
    assert "3/3" in record["reason"]
    [report] = [p for p in (await funding.client.get("/api/admin/pools", headers=ADMIN)).json()["data"]
                if p["slug"] == "round"]
    assert report["funding"]["progress"] == "3/3"
    # Activating neither sells nor serves; its pledges' keys say the round is funded.
    r = await funding.client.post("/api/pools/round/subscribe", json={"blocks": ["europe"], "quantity": 1},
                                  headers=auth(mk))
    assert r.status_code == 409
    sk = (await funding.mint(mk, third["id"]))["apiKey"]
    r = await funding.client.post("/v1/chat/completions", json=CHAT, headers=auth(sk))
    assert r.status_code == 403 and r.json()["error"]["code"] == "pool_funding"
    assert "reached its funding goal" in r.json()["error"]["message"]


async def test_activation_starts_every_pledge_full_period_then_and_the_keys_work_at_once(funding, clock):
    _, mk = await funding.new_account(credit="1000")
    month = await pledge(funding, mk, quantity=2)
    [year] = await pledge(funding, mk, cycle="year")
    sk = (await funding.mint(mk, month[0]["id"]))["apiKey"]
    assert (await pool(funding))["status"] == "activating"
    clock.advance(timedelta(days=9, hours=3))  # the operator takes their time; the pledges lose nothing
    r = await funding.client.post("/api/admin/pools/round/state", json={"status": "active"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    activated = (TEST_NOW + timedelta(days=9, hours=3)).isoformat().replace("+00:00", "Z")
    subs = {s["id"]: s for s in (await funding.client.get("/api/subscriptions", headers=auth(mk))).json()["data"]}
    for sub in month:
        assert subs[sub["id"]]["status"] == "active"
        assert subs[sub["id"]]["currentPeriodStart"] == activated
        assert subs[sub["id"]]["currentPeriodEnd"] == (TEST_NOW + timedelta(days=39, hours=3)).isoformat().replace(
            "+00:00", "Z")
    assert subs[year["id"]]["currentPeriodEnd"] == (TEST_NOW + timedelta(days=369, hours=3)).isoformat().replace(
        "+00:00", "Z")
    r = await funding.client.get("/v1/models", headers=auth(sk))  # admitted now: no cache to wait out
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["round-1"]
    assert (await pool(funding))["funding"] is None


async def test_a_pledge_after_the_round_is_an_ordinary_seat(funding):
    _, mk = await funding.new_account(credit="1000")
    for status in ("activating", "active"):
        r = await funding.client.post("/api/admin/pools/round/state", json={"status": status}, headers=ADMIN)
        assert r.status_code == 200, r.text
    [sub] = await pledge(funding, mk)
    assert sub["status"] == "active" and sub["currentPeriodEnd"] is not None


async def test_an_activation_called_off_is_not_redone_by_the_gateway(funding):
    _, mk = await funding.new_account(credit="1000")
    await pledge(funding, mk, quantity=3)
    r = await funding.client.post("/api/admin/pools/round/state", json={"status": "funding", "reason": "wait"},
                                  headers=ADMIN)
    assert r.status_code == 200, r.text
    assert await funding.services.admin.funding.check() == []
    await pledge(funding, mk)
    assert (await pool(funding))["status"] == "funding"
    assert (await pool(funding))["funding"]["progress"] == "4/3"


async def test_the_catalog_and_plans_show_the_round(funding):
    _, mk = await funding.new_account(credit="1000")
    await pledge(funding, mk)
    plans = (await funding.client.get("/api/agent/plans")).json()["data"]
    [product] = [p for p in plans["products"] if p["pool"] == "round"]
    assert product["funding"] == {"pledgedSeats": 1, "goalSeats": 3, "progress": "1/3",
                                  "deadline": "2026-12-31T00:00:00Z"}
    pools = {p["slug"]: p for p in (await funding.client.get("/api/pools")).json()["data"]}
    assert pools["round"]["funding"]["progress"] == "1/3" and pools["alpha"]["funding"] is None
    page = (await funding.client.get("/dashboard/pools")).text
    assert "Funding: 1/3 seats pledged" in page and "2026-12-31T00:00:00Z" in page


async def test_the_dashboard_sells_a_pledge_and_offers_its_key(funding):
    import html

    from tests.integration.test_dashboard_buy import ORIGIN, hidden_fields, review, signed_in

    _, mk = await funding.new_account(credit="100")
    client = await signed_in(funding, mk)
    page = await review(client, pool="round", blocks=["europe"])
    r = await client.post("/dashboard/buy", data=hidden_fields(page.text), headers=ORIGIN)
    assert r.status_code == 303, r.text
    subscriptions = html.unescape((await client.get(r.headers["location"])).text)
    assert "Pledged 1 seat on Seed round (europe)" in subscriptions
    assert "pledge: starts when the pool goes active" in subscriptions
    [sub] = (await funding.client.get("/api/subscriptions", headers=auth(mk))).json()["data"]
    assert sub["status"] == "pending"
    assert f'href="/dashboard/keys?subscription={sub["id"]}" data-action="mint"' in subscriptions
    keys = await client.get(f"/dashboard/keys?subscription={sub['id']}")
    assert f'<option value="{sub["id"]}" selected>' in keys.text
