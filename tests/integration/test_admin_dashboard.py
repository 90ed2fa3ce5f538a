"""The operator's dashboard pages: signed in with the admin token and a name (never a customer's key),
they show pools, accounts, money and the audit log and change them through the admin services."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
import pytest

from agent_gateway.clock import FixedClock
from agent_gateway.settings import Settings
from tests.conftest import Gateway, in_process_gateway
from tests.integration.test_admin import ADMIN_TOKEN, FUNDING_POOL, admin

pytestmark = pytest.mark.anyio
ORIGIN = {"origin": "http://gateway.test"}


@pytest.fixture
async def console(settings: Settings, clock: FixedClock) -> AsyncIterator[Gateway]:
    async with in_process_gateway(settings, clock, admin_token=ADMIN_TOKEN, session_secret="s" * 40) as gateway:
        yield gateway


def csrf(page: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


async def sign_in(client: httpx.AsyncClient, token: str = ADMIN_TOKEN, actor: str = "olga") -> httpx.Response:
    page = await client.get("/dashboard/admin/signin")
    return await client.post("/dashboard/admin/signin", headers=ORIGIN,
                             data={"csrf_token": csrf(page.text), "admin_token": token, "actor": actor})


async def post(client: httpx.AsyncClient, path: str, **form: str) -> httpx.Response:
    page = await client.get("/dashboard/admin")
    return await client.post(path, headers=ORIGIN, data={"csrf_token": csrf(page.text), **form})


async def test_the_admin_pages_need_the_admin_token_never_a_customer_key(console):
    _, mk = await console.new_account()
    for path in ("/dashboard/admin", "/dashboard/admin/accounts", "/dashboard/admin/money", "/dashboard/admin/audit"):
        r = await console.client.get(path)
        assert r.status_code == 303 and r.headers["location"].endswith("/admin/signin"), path
    for token, actor, status in ((mk, "olga", 401), (ADMIN_TOKEN[:-1], "olga", 401), (ADMIN_TOKEN, "<b>", 400)):
        r = await sign_in(console.client, token, actor)
        assert r.status_code == status
        assert (await console.client.get("/dashboard/admin")).status_code == 303
    # A customer signed in to the dashboard is no operator.
    page = await console.client.get("/dashboard/signin")
    await console.client.post("/dashboard/signin", headers=ORIGIN,
                              data={"csrf_token": csrf(page.text), "management_key": mk})
    assert (await console.client.get("/dashboard/admin")).status_code == 303


async def test_an_operator_changes_pools_and_accounts_and_the_log_names_them(console):
    account_id, mk = await console.new_account("Client Co", credit="100")
    await console.buy(mk, quantity=2)
    assert (await sign_in(console.client)).status_code == 303
    page = await console.client.get("/dashboard/admin")
    assert page.status_code == 200 and "operator olga" in page.text
    alpha = page.text[page.text.index('id="admin-pool-alpha"'):]
    assert re.search(r'data-block="europe">.*?class="right sold">2<.*?class="right left">1<', alpha, re.S)
    r = await post(console.client, "/dashboard/admin/pools/alpha/state", status="paused", reason="upgrade")
    assert r.status_code == 303
    assert console.services.catalog.pools["alpha"].status == "paused"
    r = await post(console.client, "/dashboard/admin/pools/alpha/state", status="closed")
    assert r.status_code == 303  # refused: back to the page with the reason
    assert "cannot go to closed" in (await console.client.get("/dashboard/admin")).text
    found = await console.client.get("/dashboard/admin/accounts", params={"q": "client"})
    assert f'/admin/accounts/{account_id}"' in found.text
    r = await post(console.client, f"/dashboard/admin/accounts/{account_id}/credit", amount="5", reason="goodwill")
    r = await post(console.client, f"/dashboard/admin/accounts/{account_id}/debit", amount="1e999999999", reason="x")
    r = await post(console.client, f"/dashboard/admin/accounts/{account_id}/disable", reason="abuse")
    detail = await console.client.get(f"/dashboard/admin/accounts/{account_id}")
    # 100 - 2 × 49 + 5; the debit with an exponent was refused.
    assert 'id="account-disabled"' in detail.text and ">7.00 USDC<" in detail.text
    audit = await console.client.get("/dashboard/admin/audit")
    rows = re.findall(r'class="strong">(\w+)</td><td data-label="Action">([\w.]+)</td>', audit.text)
    assert rows == [("olga", "account.disable"), ("olga", "account.balance"), ("olga", "pool.state"),
                    ("startup", "pools.reload")]
    assert (await console.client.get("/dashboard/admin/money")).status_code == 200


async def test_a_forged_admin_form_is_refused(console):
    await sign_in(console.client)
    page = await console.client.get("/dashboard/admin")
    r = await console.client.post("/dashboard/admin/pools/alpha/state", data={"csrf_token": csrf(page.text),
                                  "status": "paused"}, headers={"origin": "http://evil.example"})
    assert r.status_code == 403
    r = await console.client.post("/dashboard/admin/pools/alpha/state", data={"status": "paused"}, headers=ORIGIN)
    assert r.status_code == 403
    assert console.services.catalog.pools["alpha"].status == "active"


async def test_changing_the_admin_token_ends_admin_sessions(console):
    await sign_in(console.client)
    assert (await console.client.get("/dashboard/admin")).status_code == 200
    console.services.settings.admin_token = "adm-" + "z9" * 20
    assert (await console.client.get("/dashboard/admin")).status_code == 303


async def test_a_pool_that_sells_nothing_now_is_not_offered_to_customers(console, pools_file):
    pools_file.write_text(pools_file.read_text() + FUNDING_POOL)
    assert (await console.client.post("/api/admin/pools/reload", headers=admin())).status_code == 200
    _, mk = await console.new_account()
    page = await console.client.get("/dashboard/signin")
    await console.client.post("/dashboard/signin", headers=ORIGIN,
                              data={"csrf_token": csrf(page.text), "management_key": mk})
    assert "Seed round" in (await console.client.get("/dashboard/buy")).text  # funding: pledges on sale
    assert "/buy?pool=seed" in (await console.client.get("/dashboard/pools")).text
    r = await console.client.post("/api/admin/pools/seed/state", json={"status": "activating"}, headers=admin())
    assert r.status_code == 200
    assert "Seed round" not in (await console.client.get("/dashboard/buy")).text
    assert "/buy?pool=seed" not in (await console.client.get("/dashboard/pools")).text
