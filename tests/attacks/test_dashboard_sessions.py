"""Attacks on dashboard sessions: a cookie copied before sign-out, cookies sent over plain http
behind an https site, and cookies or headers no browser would send."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from agent_gateway.app import create_app
from agent_gateway.lifespan import build_services
from agent_gateway.settings import Settings

pytestmark = pytest.mark.anyio

SECRET = "a-fixed-secret-shared-by-every-gateway-process"
SITE = "http://gateway.test"


@asynccontextmanager
async def dashboard_client(settings: Settings, clock) -> AsyncIterator[httpx.AsyncClient]:  # type: ignore[no-untyped-def]
    """One gateway process's app (its own services, engine and caches), driven in process."""
    app = create_app(services=build_services(settings, clock))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=SITE) as client:
            yield client


async def csrf_token(client: httpx.AsyncClient, path: str = "/dashboard/signin") -> str:
    page = await client.get(path)
    assert page.status_code == 200, page.text
    return re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)


async def sign_in(client: httpx.AsyncClient, management_key: str) -> None:
    token = await csrf_token(client)
    r = await client.post("/dashboard/signin", data={"csrf_token": token, "management_key": management_key},
                          headers={"origin": SITE})
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/keys", r.text


async def is_signed_in(cookie: str, client: httpx.AsyncClient) -> bool:
    r = await client.get("/dashboard/keys", headers={"cookie": f"agw_dashboard={cookie}"})
    assert r.status_code in (200, 303), r.text
    return r.status_code == 200


async def test_a_cookie_copied_before_sign_out_is_refused_by_every_process(settings, clock, gateway):
    _, mk = await gateway.new_account()
    # Two gateway processes on one database, with the fixed session secret a deployment shares.
    shared = settings.model_copy(update={"session_secret": SECRET})
    async with dashboard_client(shared, clock) as first, dashboard_client(shared, clock) as second:
        await sign_in(first, mk)
        copied = first.cookies["agw_dashboard"]
        assert await is_signed_in(copied, second)  # the other process honours the session...

        token = await csrf_token(first, "/dashboard/keys")
        r = await first.post("/dashboard/signout", data={"csrf_token": token}, headers={"origin": SITE})
        assert r.status_code == 303 and r.headers["location"] == "/dashboard/signin"

        # ...until it is signed out: the copy is worthless in both, at once, well before its 12 h.
        assert not await is_signed_in(copied, second)
        assert not await is_signed_in(copied, first)
        r = await second.get("/dashboard/keys", headers={"cookie": f"agw_dashboard={copied}"})
        page = await second.get(r.headers["location"], headers={"cookie": r.headers["set-cookie"].split(";")[0]})
        assert "session ended" in page.text


@pytest.mark.parametrize("public_url, secure", [
    ("https://gateway.example.com", True),
    ("https://gateway.example.com:8443/agw", True),
    ("http://gateway.example.com", False),
    (None, False),
])
async def test_the_session_cookie_is_secure_exactly_when_the_public_url_is_https(settings, clock, public_url, secure):
    # The gateway itself sees plain http (TLS ends at the proxy): only the public URL says https.
    async with dashboard_client(settings.model_copy(update={"public_url": public_url}), clock) as client:
        r = await client.get("/dashboard/signin")
    set_cookie = r.headers["set-cookie"]
    assert set_cookie.startswith("agw_dashboard=")
    flags = [part.strip().lower() for part in set_cookie.split(";")[1:]]
    assert ("secure" in flags) is secure, set_cookie
    assert "httponly" in flags and "samesite=lax" in flags


def signed(body: bytes | str) -> str:
    """A cookie correctly signed with SECRET around any body, to reach past the signature check.
    The derivation is written out here, apart from the gateway's, so the test checks it."""
    text = body if isinstance(body, str) else base64.urlsafe_b64encode(body).decode().rstrip("=")
    key = hmac.new(SECRET.encode(), b"agent_gateway dashboard session v1", hashlib.sha256).digest()
    mac = base64.urlsafe_b64encode(hmac.new(key, text.encode(), hashlib.sha256).digest()).decode().rstrip("=")
    return f"{text}.{mac}"


MALFORMED_COOKIES: dict[str, bytes] = {
    "non-ASCII (UTF-8 bytes)": b"x.\xc3\xa9",
    "non-ASCII signature": b"eyJ9.\xff\xfe",
    "no dot": b"garbage",
    "two dots": b"a.b.c",
    "empty": b"",
    "huge": b"A" * 6000 + b".B",
    "quoted": b'"a.b"',
    "bad base64, signed": signed("!!!!").encode(),
    "not JSON, signed": signed(b"\xff\x00not json").encode(),
    "JSON list, signed": signed(json.dumps([1, 2, 3]).encode()).encode(),
    "wrong types, signed": signed(json.dumps({"c": 1, "e": "soon", "s": {}, "f": 3}).encode()).encode(),
    "infinite expiry, signed": signed(b'{"c":"t","e":1e400,"s":null,"f":[]}').encode(),
    "object as session id, signed": signed(json.dumps(
        {"c": "t", "e": 4102444800, "s": {"id": "x"}, "f": [], "a": {}, "k": []}).encode()).encode(),
    "unknown session id, signed": signed(json.dumps(
        {"c": "t", "e": 4102444800, "s": "dses_" + "0" * 20, "f": [], "a": "acct_x", "k": "mkey_x"}).encode()).encode(),
}


@pytest.mark.parametrize("name", list(MALFORMED_COOKIES))
async def test_a_malformed_cookie_means_signed_out_never_a_server_error(settings, clock, name):
    raw = MALFORMED_COOKIES[name]
    async with dashboard_client(settings.model_copy(update={"session_secret": SECRET}), clock) as client:
        headers = [(b"cookie", b"agw_dashboard=" + raw)]
        page = await client.get("/dashboard/keys", headers=headers)
        assert page.status_code == 303 and page.headers["location"] == "/dashboard/signin", (name, page.text)
        signin = await client.get("/dashboard/signin", headers=headers)
        assert signin.status_code == 200 and 'name="csrf_token"' in signin.text
        # A post carrying it is a refused forgery (it holds no session's token), not a crash.
        post = await client.post("/dashboard/signout", data={"csrf_token": "not-the-token"},
                                 headers=[*headers, (b"origin", SITE.encode())])
        assert post.status_code == 403


@pytest.mark.parametrize("headers", [
    {"origin": "http://["},
    {"referer": "http://[::1/dashboard/keys"},
    {"origin": "http://gateway.test:99999"},
    {"origin": "\u00e9t\u00e9".encode().decode("latin-1")},
    {"content-type": "application/x-www-form-urlencoded; charset=\u00ff"},
], ids=["origin-bad-ipv6", "referer-bad-ipv6", "origin-bad-port", "origin-non-ascii", "content-type-non-ascii"])
async def test_unreadable_origin_or_referer_headers_refuse_the_form_never_a_server_error(gateway, headers):
    r = await gateway.client.post("/dashboard/signin", data={"management_key": "mk_x", "csrf_token": "t"},
                                  headers={k: v.encode("latin-1") for k, v in headers.items()})
    assert r.status_code == 403, r.text


async def test_forms_from_the_public_url_are_accepted_behind_a_proxy_that_rewrites_host(settings, clock, gateway):
    """nginx sends the upstream's address as Host by default: the page's Origin is the public URL."""
    _, mk = await gateway.new_account()
    public = settings.model_copy(update={"public_url": "http://dashboard.example.com"})
    async with dashboard_client(public, clock) as client:  # its Host header: gateway.test
        token = await csrf_token(client)
        form = {"csrf_token": token, "management_key": mk}
        refused = await client.post("/dashboard/signin", data=form, headers={"origin": "http://evil.example"})
        assert refused.status_code == 403
        r = await client.post("/dashboard/signin", data=form, headers={"origin": "http://dashboard.example.com"})
        assert r.status_code == 303 and r.headers["location"] == "/dashboard/keys", r.text
