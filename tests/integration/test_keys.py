"""API keys: minted once per subscription, never shown again, disable/enable/delete, ownership."""

import asyncio
from datetime import timedelta

import pytest

from agent_gateway.jobs.expiry import expire_subscriptions
from tests.conftest import auth
from tests.fixtures.state import snapshot

pytestmark = pytest.mark.anyio


async def test_a_key_is_shown_once_then_listed_only_masked(gateway):
    _, mk = await gateway.new_account(credit="100")
    sub = (await gateway.buy(mk))[0]
    minted = await gateway.mint(mk, sub["id"], name="client-acme")
    plaintext = minted["apiKey"]
    assert plaintext.startswith("sk_") and len(plaintext) == 46
    assert minted["subscriptionId"] == sub["id"] and minted["status"] == "active"
    for path in ("/api/keys", "/api/usage", "/api/subscriptions"):
        response = await gateway.client.get(path, headers=auth(mk))
        assert response.status_code == 200
        assert plaintext not in response.text
        assert plaintext[7:-4] not in response.text
    listed = (await gateway.client.get("/api/keys", headers=auth(mk))).json()["data"]
    assert len(listed) == 1
    assert listed[0]["keyPreview"] == f"{plaintext[:7]}…{plaintext[-4:]}"
    assert listed[0]["name"] == "client-acme" and listed[0]["pool"] == "alpha"


async def test_the_mint_answer_has_the_plaintext_once_and_nothing_that_looks_like_a_second_key(gateway):
    _, mk = await gateway.new_account(credit="100")
    sub = (await gateway.buy(mk))[0]
    minted = await gateway.mint(mk, sub["id"])
    # `apiKey` is the key to use; the masked form is `keyPreview`, never a field called `key`.
    assert "key" not in minted
    assert minted["keyPreview"] == f"{minted['apiKey'][:7]}…{minted['apiKey'][-4:]}"
    created = await gateway.client.post("/api/management-keys", json={"name": "ci"}, headers=auth(mk))
    data = created.json()["data"]
    assert "key" not in data and data["keyPreview"] == f"{data['apiKey'][:7]}…{data['apiKey'][-4:]}"


async def test_one_live_key_per_subscription(gateway):
    _, mk = await gateway.new_account(credit="100")
    sub = (await gateway.buy(mk))[0]
    await gateway.mint(mk, sub["id"])
    before = await snapshot(gateway.services.db)
    r = await gateway.client.post("/api/keys/subscription", json={"name": "again", "subscriptionId": sub["id"]},
                                  headers=auth(mk))
    assert r.status_code == 409 and r.json()["error"]["code"] == "subscription_has_key"
    assert "apiKey" not in r.text
    assert await snapshot(gateway.services.db) == before


async def test_concurrent_mints_for_one_subscription_yield_one_key(gateway):
    _, mk = await gateway.new_account(credit="100")
    sub = (await gateway.buy(mk))[0]

    async def mint(i):
        return await gateway.client.post(
            "/api/keys/subscription", json={"name": f"k{i}", "subscriptionId": sub["id"]}, headers=auth(mk))

    statuses = sorted(r.status_code for r in await asyncio.gather(*(mint(i) for i in range(6))))
    assert statuses == [201] + [409] * 5
    assert (await snapshot(gateway.services.db))["counts"]["api_keys"] == 1


async def test_disable_enable_delete_lifecycle(gateway):
    _, mk = await gateway.new_account(credit="100")
    sub = (await gateway.buy(mk))[0]
    key_id = (await gateway.mint(mk, sub["id"]))["id"]
    r = await gateway.client.post(f"/api/keys/{key_id}/disable", headers=auth(mk))
    assert r.status_code == 200 and r.json()["data"]["status"] == "disabled"
    r = await gateway.client.post(f"/api/keys/{key_id}/enable", headers=auth(mk))
    assert r.status_code == 200 and r.json()["data"]["status"] == "active"
    r = await gateway.client.delete(f"/api/keys/{key_id}", headers=auth(mk))
    assert r.status_code == 200
    assert (await gateway.client.get("/api/keys", headers=auth(mk))).json()["data"] == []
    # Every action on a deleted key is a 404 and changes nothing.
    before = await snapshot(gateway.services.db)
    for method, path in (("POST", f"/api/keys/{key_id}/disable"), ("POST", f"/api/keys/{key_id}/enable"),
                         ("DELETE", f"/api/keys/{key_id}")):
        r = await gateway.client.request(method, path, headers=auth(mk))
        assert r.status_code == 404 and r.json()["error"]["code"] == "api_key_not_found"
    assert await snapshot(gateway.services.db) == before
    # The subscription may mint a fresh key once the old one is deleted.
    fresh = await gateway.mint(mk, sub["id"], name="fresh")
    assert fresh["id"] != key_id


async def test_another_accounts_ids_are_404_and_change_nothing(gateway):
    _, mk_a = await gateway.new_account("A", credit="100")
    _, mk_b = await gateway.new_account("B", credit="100")
    sub_a = (await gateway.buy(mk_a))[0]
    key_a = (await gateway.mint(mk_a, sub_a["id"]))["id"]
    sub_b = (await gateway.buy(mk_b))[0]
    before = await snapshot(gateway.services.db)
    for method, path in (("POST", f"/api/keys/{key_a}/disable"), ("POST", f"/api/keys/{key_a}/enable"),
                         ("DELETE", f"/api/keys/{key_a}")):
        r = await gateway.client.request(method, path, headers=auth(mk_b))
        assert r.status_code == 404 and r.json()["error"]["code"] == "api_key_not_found", r.text
    r = await gateway.client.post("/api/keys/subscription", json={"name": "x", "subscriptionId": sub_a["id"]},
                                  headers=auth(mk_b))
    assert r.status_code == 404 and r.json()["error"]["code"] == "subscription_not_found"
    listed = (await gateway.client.get("/api/subscriptions", headers=auth(mk_b))).json()["data"]
    assert [s["id"] for s in listed] == [sub_b["id"]]
    assert (await gateway.client.get("/api/keys", headers=auth(mk_b))).json()["data"] == []
    assert await snapshot(gateway.services.db) == before


@pytest.mark.parametrize("body,status,code", [
    ({"name": "", "subscriptionId": "sub_x"}, 400, "invalid_field"),
    ({"name": 5, "subscriptionId": "sub_x"}, 400, "invalid_field"),
    ({"subscriptionId": "sub_x"}, 400, "invalid_field"),
    ({"name": "k"}, 400, "invalid_field"),
    ({"name": "k", "subscriptionId": "sub_nope"}, 404, "subscription_not_found"),
])
async def test_bad_mint_requests_change_nothing(gateway, body, status, code):
    _, mk = await gateway.new_account(credit="100")
    await gateway.buy(mk)
    before = await snapshot(gateway.services.db)
    r = await gateway.client.post("/api/keys/subscription", json=body, headers=auth(mk))
    assert r.status_code == status and r.json()["error"]["code"] == code and r.json()["error"]["message"]
    assert await snapshot(gateway.services.db) == before


async def test_expired_subscriptions_mint_no_keys_and_cannot_be_re_enabled(gateway, clock):
    _, mk = await gateway.new_account(credit="100")
    sub = (await gateway.buy(mk))[0]
    key_id = (await gateway.mint(mk, sub["id"]))["id"]
    other = (await gateway.buy(mk))[0]
    clock.advance(timedelta(days=31))
    await expire_subscriptions(gateway.services.db, clock)
    r = await gateway.client.post(f"/api/keys/{key_id}/enable", headers=auth(mk))
    assert r.status_code == 409 and r.json()["error"]["code"] == "subscription_not_active"
    r = await gateway.client.post("/api/keys/subscription", json={"name": "x", "subscriptionId": other["id"]},
                                  headers=auth(mk))
    assert r.status_code == 409 and r.json()["error"]["code"] == "subscription_not_active"


async def test_nul_characters_anywhere_are_a_clear_400_and_change_nothing(gateway):
    # PostgreSQL cannot store or even compare NUL in text; it must never turn into a 500.
    _, mk = await gateway.new_account(credit="100")
    sub = (await gateway.buy(mk))[0]
    before = await snapshot(gateway.services.db)
    attempts = [
        ("POST", "/api/keys/subscription", {"name": "k", "subscriptionId": "sub\x00"}),
        ("POST", "/api/keys/subscription", {"name": "k\x00", "subscriptionId": sub["id"]}),
        ("POST", "/api/keys/%00/disable", None),
        ("DELETE", "/api/keys/key_%00", None),
        ("DELETE", "/api/management-keys/%00", None),
        ("GET", "/api/usage?window=%00", None),
        ("GET", "/api/agent/payments/%00", None),
    ]
    for method, path, body in attempts:
        r = await gateway.client.request(method, path, json=body, headers=auth(mk))
        assert r.status_code == 400, (path, r.text)
        assert "NUL" in r.json()["error"]["message"]
    assert await snapshot(gateway.services.db) == before
