"""Expiry: past-period subscriptions become expired, their keys revoked and seats freed, once."""

import asyncio
from datetime import timedelta

import pytest

from agent_gateway.db.engine import Database
from agent_gateway.jobs.expiry import expire_subscriptions
from tests.conftest import auth
from tests.fixtures.state import seats_held, snapshot

pytestmark = pytest.mark.anyio


async def test_expiry_revokes_keys_frees_seats_and_leaves_others_alone(gateway, clock):
    _, mk = await gateway.new_account(credit="1000")
    monthly = (await gateway.buy(mk, blocks=["europe"]))[0]
    yearly = (await gateway.buy(mk, blocks=["europe"], cycle="year"))[0]
    k_month = await gateway.mint(mk, monthly["id"], "month")
    k_year = await gateway.mint(mk, yearly["id"], "year")
    db = gateway.services.db
    assert await seats_held(db, "alpha", "europe") == 2

    clock.advance(timedelta(days=29))
    assert (await expire_subscriptions(db, clock)).subscription_ids == []

    clock.advance(timedelta(days=1, seconds=1))
    result = await expire_subscriptions(db, clock)
    assert result.subscription_ids == [monthly["id"]]
    assert result.revoked_key_ids == [k_month["id"]]
    subs = {s["id"]: s for s in (await gateway.client.get("/api/subscriptions", headers=auth(mk))).json()["data"]}
    assert subs[monthly["id"]]["status"] == "expired" and subs[yearly["id"]]["status"] == "active"
    keys = {k["id"]: k for k in (await gateway.client.get("/api/keys", headers=auth(mk))).json()["data"]}
    assert keys[k_month["id"]]["status"] == "revoked" and keys[k_year["id"]]["status"] == "active"
    assert await seats_held(db, "alpha", "europe") == 1
    # A second pass finds nothing more to do.
    assert (await expire_subscriptions(db, clock)).subscription_ids == []
    assert await seats_held(db, "alpha", "europe") == 1


async def test_several_processes_expiring_at_once_free_each_seat_once(gateway, clock, settings):
    _, mk = await gateway.new_account(credit="1000")
    await gateway.buy(mk, blocks=["asia", "europe"], quantity=3)
    clock.advance(timedelta(days=31))
    # Separate engines stand in for separate gateway processes with their own connections.
    others = [Database(settings.database_url) for _ in range(3)]
    try:
        results = await asyncio.gather(*(expire_subscriptions(db, clock) for db in [gateway.services.db, *others]))
    finally:
        for db in others:
            await db.dispose()
    expired = [sub for r in results for sub in r.subscription_ids]
    assert len(expired) == 3 and len(set(expired)) == 3
    assert await seats_held(gateway.services.db, "alpha", "europe") == 0
    assert await seats_held(gateway.services.db, "alpha", "asia") == 0
    assert set((await snapshot(gateway.services.db))["subscriptions"].values()) == {"expired"}


async def test_the_background_job_runs_inside_the_server(settings, clock):
    from agent_gateway.accounts.service import create_account, credit_account
    from agent_gateway.app import create_app
    from agent_gateway.catalog.pricing import make_order
    from agent_gateway.lifespan import build_services
    from agent_gateway.subscriptions.service import subscribe_with_balance

    settings.job_interval_s = 0.05
    services = build_services(settings, clock)
    app = create_app(services=services)
    async with app.router.lifespan_context(app):
        account, _ = await create_account(services.db, clock, "A")
        await credit_account(services.db, clock, account.id, 100_000_000)
        order = make_order(services.catalog, "alpha", ["europe"], 1, "month")
        [sub] = await subscribe_with_balance(services.db, clock, services.catalog, account.id, order)
        clock.advance(timedelta(days=30))

        async def expired() -> bool:
            return (await snapshot(services.db))["subscriptions"][sub.id] == "expired"

        async with asyncio.timeout(10):
            while not await expired():
                await asyncio.sleep(0.02)
