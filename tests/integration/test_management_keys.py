"""Management keys: create (shown once), list masked, revoke; the last one is kept."""

import pytest

from tests.conftest import auth
from tests.fixtures.state import snapshot

pytestmark = pytest.mark.anyio


async def test_create_list_revoke(gateway):
    _, mk = await gateway.new_account()
    r = await gateway.client.post("/api/management-keys", json={"name": "ci"}, headers=auth(mk))
    assert r.status_code == 201
    second = r.json()["data"]
    assert second["apiKey"].startswith("mk_")
    listed = await gateway.client.get("/api/management-keys", headers=auth(mk))
    assert second["apiKey"] not in listed.text and mk not in listed.text
    assert sorted(k["name"] for k in listed.json()["data"]) == ["ci", "initial"]
    # The new key works, and can revoke the first one.
    first_id = next(k["id"] for k in listed.json()["data"] if k["name"] == "initial")
    r = await gateway.client.delete(f"/api/management-keys/{first_id}", headers=auth(second["apiKey"]))
    assert r.status_code == 200
    r = await gateway.client.get("/api/keys", headers=auth(mk))
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_management_key"


async def test_the_last_management_key_cannot_be_revoked(gateway):
    _, mk = await gateway.new_account()
    [only] = (await gateway.client.get("/api/management-keys", headers=auth(mk))).json()["data"]
    before = await snapshot(gateway.services.db)
    r = await gateway.client.delete(f"/api/management-keys/{only['id']}", headers=auth(mk))
    assert r.status_code == 409 and r.json()["error"]["code"] == "last_management_key"
    assert await snapshot(gateway.services.db) == before


async def test_another_accounts_management_key_is_404(gateway):
    _, mk_a = await gateway.new_account("A")
    _, mk_b = await gateway.new_account("B")
    await gateway.client.post("/api/management-keys", json={"name": "extra"}, headers=auth(mk_a))
    ids_a = [k["id"] for k in (await gateway.client.get("/api/management-keys", headers=auth(mk_a))).json()["data"]]
    before = await snapshot(gateway.services.db)
    for key_id in ids_a:
        r = await gateway.client.delete(f"/api/management-keys/{key_id}", headers=auth(mk_b))
        assert r.status_code == 404 and r.json()["error"]["code"] == "management_key_not_found"
    assert await snapshot(gateway.services.db) == before


async def test_bad_create_bodies_change_nothing(gateway):
    _, mk = await gateway.new_account()
    before = await snapshot(gateway.services.db)
    for body in ({}, {"name": ""}, {"name": "   "}, {"name": 3}, {"name": "x", "admin": True}, {"name": "a\x00b"}):
        r = await gateway.client.post("/api/management-keys", json=body, headers=auth(mk))
        assert r.status_code == 400, body
    assert await snapshot(gateway.services.db) == before
