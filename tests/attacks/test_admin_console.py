"""Attacks on the admin API: no route without the admin token, never a customer's key, the actor's
name validated, hostile bodies and parameters refused with a 4xx."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import pytest
from starlette.routing import Route

from agent_gateway.clock import FixedClock
from agent_gateway.settings import Settings
from agent_gateway.web.auth import admin_token_matches
from tests.conftest import Gateway, auth, in_process_gateway
from tests.fixtures.state import snapshot

pytestmark = pytest.mark.anyio

ADMIN_TOKEN = "adm-" + "k9" * 20


async def _console(settings: Settings, clock: FixedClock, token: str | None) -> AsyncIterator[Gateway]:
    async with in_process_gateway(settings, clock, admin_token=token) as gateway:
        yield gateway


@pytest.fixture
async def console(settings: Settings, clock: FixedClock) -> AsyncIterator[Gateway]:
    async for gateway in _console(settings, clock, ADMIN_TOKEN):
        yield gateway


@pytest.fixture
async def console_without_token(settings: Settings, clock: FixedClock) -> AsyncIterator[Gateway]:
    async for gateway in _console(settings, clock, None):
        yield gateway


def admin_routes(gateway: Gateway) -> list[tuple[str, str]]:
    """Every (method, concrete path) of the app under /api/admin, found from the app's own routes."""
    app = gateway.client._transport.app  # type: ignore[attr-defined]
    found = []
    for route in app.routes:
        if isinstance(route, Route) and route.path.startswith("/api/admin"):
            path = re.sub(r"\{[^}]+\}", "x1", route.path)
            found.extend((method, path) for method in sorted(route.methods or ()) if method != "HEAD")
    return found


async def test_no_admin_route_is_reachable_without_the_admin_token(console):
    account_id, mk = await console.new_account(credit="100")
    sub = (await console.buy(mk))[0]
    sk = (await console.mint(mk, sub["id"]))["apiKey"]
    routes = admin_routes(console)
    # The enumeration is real: it finds every face of the console (a new route is covered by itself).
    assert {("GET", "/api/admin/pools"), ("POST", "/api/admin/pools/reload"), ("POST", "/api/admin/pools/x1/state"),
            ("GET", "/api/admin/accounts"), ("POST", "/api/admin/accounts/x1/disable"),
            ("POST", "/api/admin/accounts/x1/balance"), ("GET", "/api/admin/money"),
            ("GET", "/api/admin/audit")} <= set(routes)
    before = await snapshot(console.services.db)
    wrong = [None, "Bearer " + mk, "Bearer " + sk, "Bearer " + ADMIN_TOKEN[:-1], "Bearer " + ADMIN_TOKEN + "x",
             "Bearer " + ADMIN_TOKEN.upper(), "Basic " + ADMIN_TOKEN, ADMIN_TOKEN, "Bearer", "Bearer  ",
             "Bearer " + "a" * 5000]
    for method, path in routes:
        for header in wrong:
            headers = {"X-Admin-Actor": "mallory"}
            if header is not None:
                headers["Authorization"] = header
            r = await console.client.request(method, path, headers=headers, json={"status": "paused", "amount": "5",
                                                                                  "reason": "x"})
            assert r.status_code == 401, (method, path, header, r.text)
            assert r.json()["error"]["type"] == "authentication_error"
            assert "mk_" not in r.text or header is None or mk not in r.text
    assert await snapshot(console.services.db) == before
    # And with the token every one of them is answered (not refused for auth).
    for method, path in routes:
        r = await console.client.request(method, path, headers={**auth(ADMIN_TOKEN), "X-Admin-Actor": "alice"})
        assert r.status_code != 401, (method, path)


async def test_an_unset_admin_token_turns_the_admin_api_off(console_without_token):
    for method, path in admin_routes(console_without_token):
        for token in (ADMIN_TOKEN, "", "None", "null"):
            r = await console_without_token.client.request(
                method, path, headers={"Authorization": f"Bearer {token}", "X-Admin-Actor": "alice"})
            assert r.status_code == 401, (method, path, token)


async def test_a_management_key_is_never_an_admin_token(settings, clock):
    # Even an operator who pastes a customer's key into AGW_ADMIN_TOKEN: refused at start.
    with pytest.raises(ValueError, match="not an mk_/sk_ key"):
        Settings(_env_file=None, database_url=settings.database_url, admin_token="mk_" + "a" * 43)
    with pytest.raises(ValueError, match="at least 32"):
        Settings(_env_file=None, database_url=settings.database_url, admin_token="short")


def test_the_token_comparison_does_not_depend_on_where_the_tokens_differ():
    """Both sides are hashed to 32 bytes and compared with hmac.compare_digest: neither the length
    nor the first differing character changes the work done, and no input raises."""
    assert admin_token_matches(ADMIN_TOKEN, ADMIN_TOKEN)
    for given in ("", "a", ADMIN_TOKEN[:-1], ADMIN_TOKEN + "\x00", "é" * 100, "\udcff", "a" * 100_000):
        assert not admin_token_matches(given, ADMIN_TOKEN)
    assert not admin_token_matches(ADMIN_TOKEN, None)


@pytest.mark.parametrize("actor", ["", "   ", "a" * 65, "<script>alert(1)</script>", "bob\u202e", "al\tice",
                                   "x'; DROP TABLE audit_log; --", "-", ".hidden", "bob\x00"])
async def test_a_write_must_name_a_valid_actor(console, actor):
    before = await snapshot(console.services.db)
    headers = [(b"authorization", f"Bearer {ADMIN_TOKEN}".encode()), (b"x-admin-actor", actor.encode("utf-8"))]
    r = await console.client.post("/api/admin/pools/alpha/state", json={"status": "paused"}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["code"] in ("actor_required", "invalid_actor"), repr(actor)
    assert (await console.client.get("/api/pools/alpha")).json()["data"]["status"] == "active"
    assert await snapshot(console.services.db) == before


async def test_a_write_without_an_actor_is_refused(console):
    r = await console.client.post("/api/admin/pools/reload", headers=auth(ADMIN_TOKEN))
    assert r.status_code == 400 and r.json()["error"]["code"] == "actor_required"
    # Reads need none.
    assert (await console.client.get("/api/admin/pools", headers=auth(ADMIN_TOKEN))).status_code == 200


async def test_an_actor_header_in_raw_bytes_is_refused_not_a_crash(console):
    r = await console.client.post("/api/admin/pools/alpha/state", json={"status": "paused"},
                                  headers=[(b"authorization", f"Bearer {ADMIN_TOKEN}".encode()),
                                           (b"x-admin-actor", "bøb".encode("latin-1"))])
    assert r.status_code == 400
    r = await console.client.get("/api/admin/pools",
                                 headers=[(b"authorization", b"Bearer \xff\xfe" + ADMIN_TOKEN.encode())])
    assert r.status_code == 401


@pytest.mark.parametrize(("path", "body", "code"), [
    ("/api/admin/pools/alpha/state", b'{"status": "paused", "status": "active"}', "duplicate_key"),
    ("/api/admin/pools/alpha/state", b'{"status": "paused", "extra": 1}', "invalid_field"),
    ("/api/admin/pools/alpha/state", b'{"status": ["paused"]}', "invalid_field"),
    ("/api/admin/pools/alpha/state", b'[' * 200 + b']' * 200, "json_too_deep"),
    ("/api/admin/pools/alpha/state", b'{"status": "paused", "reason": "a\\nb"}', "invalid_reason"),
    ("/api/admin/pools/alpha/state", b'not json', None),
    ("/api/admin/accounts/ACCOUNT/balance", b'{"amount": "1e999999999", "reason": "x"}', "invalid_amount"),
    ("/api/admin/accounts/ACCOUNT/balance", b'{"amount": "999999999999.0", "reason": "x"}', "invalid_amount"),
    ("/api/admin/accounts/ACCOUNT/balance", b'{"amount": "NaN", "reason": "x"}', "invalid_amount"),
    ("/api/admin/accounts/ACCOUNT/balance", b'{"amount": 5, "reason": "x"}', "invalid_field"),
    ("/api/admin/accounts/ACCOUNT/balance", b'{"amount": "--5", "reason": "x"}', "invalid_amount"),
    ("/api/admin/accounts/ACCOUNT/disable", b'{"reason": "' + b"r" * 600 + b'"}', "invalid_field"),
])
async def test_hostile_bodies_are_refused_and_change_nothing(console, path, body, code):
    account_id, _ = await console.new_account(credit="10")
    before = await snapshot(console.services.db)
    r = await console.client.post(path.replace("ACCOUNT", account_id), content=body,
                                  headers={**auth(ADMIN_TOKEN), "X-Admin-Actor": "alice",
                                           "Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    if code is not None:
        assert r.json()["error"]["code"] == code
    assert await snapshot(console.services.db) == before


@pytest.mark.parametrize("query", ["?q=" + "a" * 201, "?q=", "", "?q=%25%25", "?q=sk_%5F%5F"])
async def test_hostile_searches_are_refused_or_find_nothing(console, query):
    await console.new_account("Target")
    r = await console.client.get("/api/admin/accounts" + query, headers=auth(ADMIN_TOKEN))
    assert r.status_code in (200, 400), r.text
    if r.status_code == 200:
        assert r.json()["data"] == []


@pytest.mark.parametrize("query", ["?limit=0", "?limit=-1", "?limit=1e9", "?limit=100000", "?days=abc",
                                   "?before=%27"])
async def test_hostile_list_parameters_are_4xx(console, query):
    for path in ("/api/admin/audit", "/api/admin/money"):
        r = await console.client.get(path + query, headers=auth(ADMIN_TOKEN))
        assert r.status_code in (200, 400), (path, query, r.text)
