"""Housekeeping: sign-in challenges, dashboard sessions and console sessions are deleted a day after
they expired or were ended (anyone may ask for a challenge, so kept for ever they would only grow),
live ones are kept, and a deleted session's cookie or challenge stays refused."""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest
from eth_account import Account as EthAccount
from eth_account.messages import encode_defunct
from sqlalchemy import func, select

from agent_gateway.db.engine import Database
from agent_gateway.db.models import AdminSession, DashboardSession, WalletChallenge
from agent_gateway.lifespan import STALE_ROWS_KEPT
from tests.attacks.test_dashboard_sessions import sign_in as customer_sign_in
from tests.integration.test_admin_dashboard import console, csrf, sign_in as admin_sign_in  # noqa: F401  (fixture)

pytestmark = pytest.mark.anyio
ORIGIN = {"origin": "http://gateway.test"}


async def rows(db: Database) -> tuple[int, int, int]:
    async with db.read() as session:
        return tuple([(await session.execute(select(func.count()).select_from(table))).scalar_one()  # type: ignore[return-value]
                      for table in (WalletChallenge, DashboardSession, AdminSession)])


async def challenge(client: httpx.AsyncClient, wallet: str) -> dict:
    r = await client.post("/api/agent/auth/challenge", json={"address": wallet})
    assert r.status_code == 201, r.text
    return r.json()["data"]


async def cookie_after(client: httpx.AsyncClient, sign_in) -> str:  # type: ignore[no-untyped-def]
    """The cookie a sign-in sets, taken out of the client's jar (which keeps cookies by the real
    time, not the test's clock: it would still send one the gateway's clock has expired)."""
    client.cookies.clear()
    await sign_in()
    cookie = client.cookies["agw_dashboard"]
    client.cookies.clear()
    return cookie


async def page_with(client: httpx.AsyncClient, path: str, cookie: str) -> int:
    client.cookies.clear()
    return (await client.get(path, headers={"cookie": f"agw_dashboard={cookie}"})).status_code


async def test_ended_challenges_and_sessions_are_deleted_a_day_later_and_stay_refused(console, clock):
    client, db, jobs = console.client, console.services.db, console.services.jobs
    _, mk = await console.new_account()
    customer = await cookie_after(client, lambda: customer_sign_in(client, mk))
    operator = await cookie_after(client, lambda: admin_sign_in(client))
    wallet = EthAccount.create()
    old = await challenge(client, wallet.address)
    # A session signed out now is kept for a day too, like one that expired.
    signed_out = await cookie_after(client, lambda: customer_sign_in(client, mk))
    client.cookies.set("agw_dashboard", signed_out)
    page = await client.get("/dashboard/keys")
    r = await client.post("/dashboard/signout", headers=ORIGIN, data={"csrf_token": csrf(page.text)})
    assert r.status_code == 303
    assert await rows(db) == (1, 2, 1)

    # Within a day of its end a row stays: here a day less a second after the sign-out.
    clock.advance(STALE_ROWS_KEPT - timedelta(seconds=1))
    assert await jobs.run_pass("housekeeping") == "ran"
    assert await rows(db) == (1, 2, 1)
    # A day after it, the signed-out session goes; the challenge (10 minutes) and the sessions
    # (12 hours) ended later.
    clock.advance(timedelta(seconds=2))
    assert await jobs.run_pass("housekeeping") == "ran"
    assert await rows(db) == (1, 1, 1)
    # A day after those ended, they go too; a challenge and a session from now on are kept.
    clock.advance(timedelta(hours=12))
    fresh = await challenge(client, wallet.address)
    live = await cookie_after(client, lambda: customer_sign_in(client, mk))
    assert await jobs.run_pass("housekeeping") == "ran"
    assert await rows(db) == (1, 1, 0)
    assert await page_with(client, "/dashboard/keys", live) == 200  # today's session and challenge are kept

    # Deleted is refused, as expired was: the cookies lead to the sign-in pages, the challenge is unknown.
    assert await page_with(client, "/dashboard/keys", customer) == 303
    assert await page_with(client, "/dashboard/admin", operator) == 303
    signature = "0x" + wallet.sign_message(encode_defunct(text=old["message"])).signature.hex()
    r = await client.post("/api/agent/auth/sign-in", json={"challengeId": old["challengeId"], "signature": signature})
    assert r.status_code == 404 and r.json()["error"]["code"] == "challenge_not_found"
    assert fresh["challengeId"] != old["challengeId"]
