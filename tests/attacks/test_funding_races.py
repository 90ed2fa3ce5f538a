"""A pledge delivered while the operator activates its pool: the delivery holds the pool's state row
from the moment it decides "pledge" until it commits, so the activation waits for it and starts it.
Without that lock the activation would run in between and leave a pledge pending on a live pool,
with its money taken and its key refused for good."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from agent_gateway.accounts.service import create_account
from agent_gateway.app import create_app
from agent_gateway.clock import FixedClock
from agent_gateway.db.engine import Database
from agent_gateway.db.models import Subscription
from agent_gateway.lifespan import build_services
from agent_gateway.settings import Settings
from agent_gateway.subscriptions.funding import is_pledge
from agent_gateway.subscriptions.service import new_subscriptions

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]
ROUND = """
[pools.round]
name = "Seed round"
models = ["round-1"]
upstreams = ["http://127.0.0.1:9/v1"]
seats = 10
status = "funding"
prices = { europe = "20.00" }
"""


async def waiting_for_a_lock(db: Database) -> bool:
    # A transaction of its own each time: PostgreSQL keeps one snapshot of the activity view per transaction.
    async with db.transaction() as probe:
        return bool((await probe.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ))).scalar_one())


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_an_activation_waits_for_a_pledge_being_delivered_and_starts_it(settings: Settings, clock: FixedClock,
                                                                             pools_file: Path):
    pools_file.write_text(pools_file.read_text() + ROUND)
    services = build_services(settings, clock)
    app = create_app(services=services)
    async with app.router.lifespan_context(app):
        pools, db = services.admin.pools, services.db
        account, _ = await create_account(db, clock, "pledger")
        await pools.set_state("round", "activating", actor="ops")
        async with db.transaction() as session:
            assert await is_pledge(session, "round")  # decided: a pledge (the pool is not live yet)
            activation = asyncio.create_task(pools.set_state("round", "active", actor="ops"))
            deadline = time.monotonic() + 10
            while not await waiting_for_a_lock(db):  # the activation queues behind this delivery's row lock
                assert not activation.done(), "the activation did not wait for the delivery"
                assert time.monotonic() < deadline, "the activation never queued behind the delivery"
                await asyncio.sleep(0.01)  # polling for the condition, bounded by the deadline
            [pledge] = new_subscriptions(account.id, "round", ["europe"], "month", 20_000_000, 1, clock.now(),
                                         pledge=True)
            session.add(pledge)
        await activation
        async with db.transaction() as session:
            started = await session.get(Subscription, pledge.id)
        assert started is not None and started.status == "active"
        assert started.period_end - started.period_start == timedelta(days=30)
