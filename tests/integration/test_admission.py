"""The proxy's refusal order, each refusal changing nothing (in process, on SQLite and PostgreSQL)."""

from datetime import timedelta

import pytest

from agent_gateway.proxy.leases import AcquireResult
from tests.conftest import auth
from tests.fixtures.state import snapshot

pytestmark = pytest.mark.anyio
CHAT = {"model": "alpha-1", "messages": [{"role": "user", "content": "hi"}]}


async def key_for(gateway, blocks=("europe",)) -> tuple[str, str, str]:
    _, mk = await gateway.new_account(credit="1000")
    sub = (await gateway.buy(mk, blocks=list(blocks)))[0]
    minted = await gateway.mint(mk, sub["id"])
    return mk, minted["apiKey"], minted["id"]


async def refused(gateway, headers, body=CHAT, path="/v1/chat/completions"):
    before = await snapshot(gateway.services.db)
    r = await gateway.client.post(path, json=body, headers=headers)
    assert await snapshot(gateway.services.db) == before
    return r


async def test_no_key_is_402_with_the_catalog_and_where_to_buy(gateway):
    r = await refused(gateway, {})
    assert r.status_code == 402
    body = r.json()
    assert body["error"]["code"] == "api_key_required"
    # Payments are off here: no x402 path is suggested (tests/e2e/test_payment_paths.py: with them on).
    assert body["buy"] == {"catalog": "/api/agent/plans", "management": "/api/pools/{slug}/subscribe",
                           "dashboard": "/dashboard/"}
    assert "subscribe-pool" not in r.text and "x402" not in body["error"]["message"]
    assert [p["pool"] for p in body["catalog"]["products"]] == ["alpha", "tiny", "resting"]


async def test_unknown_and_garbled_keys_are_401(gateway):
    r = await refused(gateway, auth("sk_" + "x" * 43))
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = await refused(gateway, {"Authorization": "Token abc"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_authorization_header"
    mk, _, _ = await key_for(gateway)
    r = await refused(gateway, auth(mk))
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


async def test_disabled_beats_wrong_model_and_expired_subscription_is_403(gateway, clock):
    mk, sk, key_id = await key_for(gateway)
    await gateway.client.post(f"/api/keys/{key_id}/disable", headers=auth(mk))
    r = await refused(gateway, auth(sk), {**CHAT, "model": "nope"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "key_disabled"
    _, sk2, _ = await key_for(gateway)
    clock.advance(timedelta(days=30, seconds=1))  # past the period end, before any expiry job ran
    r = await refused(gateway, auth(sk2))
    assert r.status_code == 403 and r.json()["error"]["code"] == "subscription_expired"
    r = await gateway.client.get("/v1/models", headers=auth(sk2))
    assert r.status_code == 403 and r.json()["error"]["code"] == "subscription_expired"


async def test_wrong_model_beats_outside_blocks(gateway):
    _, sk, _ = await key_for(gateway, blocks=("asia",))  # the clock says 10:00, europe
    r = await refused(gateway, auth(sk), {**CHAT, "model": "gpt-4"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "alpha-1" in r.json()["error"]["message"]


async def test_outside_blocks_beats_concurrency_and_says_when(gateway):
    _, sk, key_id = await key_for(gateway, blocks=("asia",))
    result, lease = await gateway.services.leases.acquire(key_id)
    assert result is AcquireResult.ACQUIRED
    r = await refused(gateway, auth(sk))
    assert r.status_code == 429 and r.json()["error"]["code"] == "outside_reserved_hours"
    assert r.headers["Retry-After"] == str(14 * 3600)  # 10:00 -> asia opens at 00:00
    assert r.json()["blocks"] == [{"block": "asia", "hoursUtc": "00:00-08:00 UTC"}]
    await gateway.services.leases.release(lease)


async def test_a_busy_key_is_429_and_the_refusal_does_not_touch_the_slot(gateway):
    _, sk, key_id = await key_for(gateway)
    result, lease = await gateway.services.leases.acquire(key_id)
    r = await refused(gateway, auth(sk))
    assert r.status_code == 429 and r.json()["error"]["code"] == "concurrency_limit"
    # The holder still holds it; releasing frees it for the next caller.
    assert (await gateway.services.leases.acquire(key_id))[0] is AcquireResult.BUSY
    assert await gateway.services.leases.release(lease)
    result, again = await gateway.services.leases.acquire(key_id)
    assert result is AcquireResult.ACQUIRED
    await gateway.services.leases.release(again)


@pytest.mark.parametrize("raw,code", [(b"{bad", "invalid_json"), (b"[]", "invalid_json"),
                                      (b'{"messages": []}', "invalid_model")])
async def test_bad_inference_bodies_are_400(gateway, raw, code):
    _, sk, _ = await key_for(gateway)
    before = await snapshot(gateway.services.db)
    r = await gateway.client.post("/v1/chat/completions", content=raw,
                                  headers={**auth(sk), "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == code
    assert await snapshot(gateway.services.db) == before


async def test_metrics_speak_prometheus(gateway):
    await refused(gateway, {})
    r = await gateway.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert 'agw_proxy_requests_total{endpoint="chat.completions",outcome="refused_api_key_required"}' in r.text
    assert "agw_proxy_in_flight" in r.text and "agw_proxy_overhead_seconds_bucket" in r.text
