"""Attacks on the operator's dashboard pages: hostile text (account names, reasons, searches, path
parameters) is shown as text on every page, every admin form refuses a forged post and changes
nothing, no redirect leaves the site, and a copied admin cookie is worthless once signed out."""

from __future__ import annotations

import json
import re
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import func, select

from agent_gateway.app import create_app
from agent_gateway.dashboard.admin_pages import ADMIN_SESSION_TTL
from agent_gateway.db.models import AuditRecord
from agent_gateway.lifespan import build_services
from tests.fixtures.state import snapshot
from tests.integration.test_admin import ADMIN_TOKEN
from tests.integration.test_admin_dashboard import ORIGIN, console, csrf, post, sign_in  # noqa: F401  (fixture)

pytestmark = pytest.mark.anyio
HOSTILE = "<script>alert(1)</script>\"'><img src=x onerror=alert(2)>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
HOSTILE_ID = "\"><img src=x onerror=alert(2)>"  # no slash: it reaches the page as a path parameter


def admin_forms(account_id: str) -> list[tuple[str, dict[str, str]]]:
    """Every form the operator's pages post, with a valid body."""
    return [
        ("/dashboard/admin/pools/alpha/state", {"status": "paused", "reason": "r"}),
        ("/dashboard/admin/pools/reload", {"reason": "r"}),
        (f"/dashboard/admin/accounts/{account_id}/credit", {"amount": "5", "reason": "r"}),
        (f"/dashboard/admin/accounts/{account_id}/debit", {"amount": "1", "reason": "r"}),
        (f"/dashboard/admin/accounts/{account_id}/disable", {"reason": "r"}),
        ("/dashboard/admin/payments/pay_any/refund", {"to": "balance", "reason": "r"}),
    ]


async def audit_count(console) -> int:  # noqa: F811
    async with console.services.db.transaction() as session:
        return int(await session.scalar(select(func.count()).select_from(AuditRecord)) or 0)


def assert_inert(html: str, where: str) -> None:
    """No tag from the hostile text made it into the page as markup."""
    assert "<script>alert" not in html and "<img src=x" not in html, where


async def test_hostile_text_is_shown_as_text_on_every_admin_page(console, pools_file):  # noqa: F811
    # A pool whose name and description are markup (the pools file is the operator's, but still).
    pools_file.write_text(pools_file.read_text() + f"""
[pools.marked]
name = {json.dumps(HOSTILE)}
description = {json.dumps(HOSTILE)}
models = ["marked-1"]
upstreams = ["http://127.0.0.1:9/v1"]
seats = 2
prices = {{ europe = "5.00" }}
""")
    r = await console.client.post("/api/admin/pools/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}",
                                                                      "X-Admin-Actor": "olga"})
    assert r.status_code == 200, r.text
    account_id, mk = await console.new_account(HOSTILE, credit="100")
    await console.buy(mk)
    assert (await sign_in(console.client)).status_code == 303
    r = await post(console.client, f"/dashboard/admin/accounts/{account_id}/credit", amount="5", reason=HOSTILE)
    assert r.status_code == 303
    r = await post(console.client, "/dashboard/admin/pools/alpha/state", status="paused", reason=HOSTILE)
    assert r.status_code == 303
    pages = {
        "account": f"/dashboard/admin/accounts/{account_id}",
        "search": "/dashboard/admin/accounts?q=" + HOSTILE.replace("#", "%23"),
        "search by name": "/dashboard/admin/accounts?q=script",
        "audit": "/dashboard/admin/audit",
        "pools": "/dashboard/admin",
        "money": "/dashboard/admin/money",
        "public pools": "/dashboard/pools",
    }
    for name, path in pages.items():
        page = await console.client.get(path)
        assert page.status_code == 200, (name, page.status_code)
        assert_inert(page.text, name)
    # The hostile text is there, shown as text: the name, the reason in the journal and the log.
    account_page = (await console.client.get(pages["account"])).text
    assert account_page.count(ESCAPED) >= 2
    assert ESCAPED in (await console.client.get(pages["search by name"])).text
    assert (await console.client.get(pages["audit"])).text.count(ESCAPED) >= 2
    assert ESCAPED in (await console.client.get(pages["pools"])).text
    # A hostile id in a path or a form comes back in a message (a flash, an error page): as text.
    for path, form in ((f"/dashboard/admin/pools/{HOSTILE_ID}/state", {"status": "active"}),
                       (f"/dashboard/admin/accounts/{HOSTILE_ID}/credit", {"amount": "1", "reason": "x"}),
                       (f"/dashboard/admin/accounts/{account_id}/{HOSTILE_ID}", {"reason": "x"}),
                       ("/dashboard/admin/pools/resting/state", {"status": HOSTILE})):
        r = await post(console.client, path, **form)
        assert r.status_code == 303, (path, r.status_code)
        landed = await console.client.get(r.headers["location"])
        assert "flash-error" in landed.text, path
        assert_inert(landed.text, path)
    for path in (f"/dashboard/admin/accounts/{HOSTILE_ID}", f"/dashboard/admin/payments/{HOSTILE_ID}",
                 f"/dashboard/admin/pools/{HOSTILE}/state"):
        page = await console.client.get(path)
        assert page.status_code in (404, 405), (path, page.status_code)
        assert_inert(page.text, path)


async def test_every_admin_form_refuses_a_forged_post_and_changes_nothing(console):  # noqa: F811
    account_id, mk = await console.new_account("Target", credit="100")
    await console.buy(mk)
    assert (await sign_in(console.client)).status_code == 303
    token = csrf((await console.client.get("/dashboard/admin")).text)
    before, audited = await snapshot(console.services.db), await audit_count(console)
    forgeries = {
        "no token": ({}, ORIGIN),
        "wrong token": ({"csrf_token": "x" * 43}, ORIGIN),
        "another origin": ({"csrf_token": token}, {"origin": "http://evil.example"}),
        "another referer": ({"csrf_token": token}, {"referer": "http://evil.example/admin"}),
        "no origin": ({"csrf_token": token}, {}),
        "null origin": ({"csrf_token": token}, {"origin": "null"}),
    }
    for path, form in admin_forms(account_id):
        for name, (extra, headers) in forgeries.items():
            r = await console.client.post(path, data={**form, **extra}, headers=headers)
            assert r.status_code == 403, (path, name, r.status_code)
            assert "Nothing was changed" in r.text
        # JSON is no form: it carries no token, and is refused the same way.
        r = await console.client.post(path, json={**form, "csrf_token": token}, headers=ORIGIN)
        assert r.status_code == 403, path
    assert await snapshot(console.services.db) == before and await audit_count(console) == audited
    assert console.services.catalog.pools["alpha"].status == "active"


async def test_a_customer_session_or_no_session_cannot_post_admin_forms(console):  # noqa: F811
    account_id, mk = await console.new_account("Target", credit="100")
    before, audited = await snapshot(console.services.db), await audit_count(console)
    # A customer signed in to the dashboard, posting with its own valid token: not an operator.
    page = await console.client.get("/dashboard/signin")
    r = await console.client.post("/dashboard/signin", headers=ORIGIN,
                                  data={"csrf_token": csrf(page.text), "management_key": mk})
    assert r.status_code == 303
    token = csrf((await console.client.get("/dashboard/keys")).text)
    for path, form in admin_forms(account_id):
        r = await console.client.post(path, data={**form, "csrf_token": token}, headers=ORIGIN)
        assert r.status_code == 303 and r.headers["location"] == "/dashboard/admin/signin", path
    # Signed out, with the anonymous session's own token: the same.
    console.client.cookies.clear()
    token = csrf((await console.client.get("/dashboard/admin/signin")).text)
    for path, form in admin_forms(account_id):
        r = await console.client.post(path, data={**form, "csrf_token": token}, headers=ORIGIN)
        assert r.status_code == 303 and r.headers["location"] == "/dashboard/admin/signin", path
    assert await snapshot(console.services.db) == before and await audit_count(console) == audited


async def test_no_admin_redirect_leaves_the_site(console):  # noqa: F811
    assert (await sign_in(console.client)).status_code == 303
    for hostile in ("%5C%5Cevil.example", "%5Cevil.example", "@evil.example", "..%5C..%5Cevil.example",
                    "%09%2F%2Fevil.example", "javascript:alert(1)"):
        for path in (f"/dashboard/admin/accounts/{hostile}/credit", f"/dashboard/admin/accounts/{hostile}/disable",
                     f"/dashboard/admin/payments/{hostile}/refund", f"/dashboard/admin/pools/{hostile}/state"):
            r = await post(console.client, path, amount="1", reason="x", status="active", to="balance")
            if r.status_code == 303:
                location = r.headers["location"]
                assert location.startswith("/dashboard/admin"), location
                assert not re.match(r"^(/[/\\]|[a-z]+:)", location), location
            else:
                assert r.status_code in (403, 404), (path, r.status_code)
        r = await console.client.get(f"/dashboard/admin/payments/{hostile}/refund", params={"reason": "x"})
        assert r.status_code in (303, 404) and not r.headers.get("location", "/dashboard/").startswith("//")


# --- admin sessions are kept server-side -----------------------------------------------------

COOKIE = "agw_dashboard"


async def sign_out(client: httpx.AsyncClient) -> None:
    token = csrf((await client.get("/dashboard/admin")).text)
    r = await client.post("/dashboard/signout", data={"csrf_token": token}, headers=ORIGIN)
    assert r.status_code == 303


async def test_a_copied_admin_cookie_is_worthless_after_sign_out_in_every_process(console):  # noqa: F811
    assert (await sign_in(console.client)).status_code == 303
    stolen = console.client.cookies[COOKIE]
    token = csrf((await console.client.get("/dashboard/admin")).text)
    # Another gateway process on the same database and session key accepts the cookie too…
    other = create_app(services=build_services(console.services.settings, console.services.clock))
    async with other.router.lifespan_context(other):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=other), base_url="http://gateway.test",
                                     cookies={COOKIE: stolen}) as thief:
            assert (await thief.get("/dashboard/admin")).status_code == 200
            # …until the operator signs out in the first one: then nowhere.
            await sign_out(console.client)
            before, audited = await snapshot(console.services.db), await audit_count(console)
            thief.cookies.set(COOKIE, stolen)
            r = await thief.get("/dashboard/admin")
            assert r.status_code == 303 and r.headers["location"] == "/dashboard/admin/signin"
            thief.cookies.set(COOKIE, stolen)
            r = await thief.post("/dashboard/admin/pools/alpha/state", headers=ORIGIN,
                                 data={"csrf_token": token, "status": "paused", "reason": "stolen"})
            assert r.status_code == 303 and r.headers["location"] == "/dashboard/admin/signin"
    assert console.services.catalog.pools["alpha"].status == "active"
    assert await snapshot(console.services.db) == before and await audit_count(console) == audited


async def test_signing_out_ends_only_that_operators_session(console):  # noqa: F811
    assert (await sign_in(console.client, actor="olga")).status_code == 303
    olga = console.client.cookies[COOKIE]
    console.client.cookies.clear()
    assert (await sign_in(console.client, actor="bob")).status_code == 303
    bob = console.client.cookies[COOKIE]
    await sign_out(console.client)
    console.client.cookies.set(COOKIE, bob)
    assert (await console.client.get("/dashboard/admin")).status_code == 303
    console.client.cookies.set(COOKIE, olga)
    page = await console.client.get("/dashboard/admin")
    assert page.status_code == 200 and "operator olga" in page.text


async def test_an_admin_session_ends_when_it_expires(console):  # noqa: F811
    assert (await sign_in(console.client)).status_code == 303
    cookie = console.client.cookies[COOKIE]
    console.services.clock.advance(ADMIN_SESSION_TTL + timedelta(seconds=1))
    console.client.cookies.set(COOKIE, cookie)
    assert (await console.client.get("/dashboard/admin")).status_code == 303
