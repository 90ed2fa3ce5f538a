"""Writers in several gateway processes that lock the same rows at the same time: usage flushes,
the expiry pass and buyers queue behind each other instead of deadlocking, because every
transaction locks shared rows in one global order; and no admitted request loses its usage row."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select, text

from agent_gateway.catalog.pools import load_catalog
from agent_gateway.clock import FixedClock
from agent_gateway.db.engine import Database, is_sqlite
from agent_gateway.db.models import Account, ApiKey, SeatInventory, Subscription, UsageRecord, new_id
from agent_gateway.jobs.expiry import expire_subscriptions
from agent_gateway.keys.api_keys import new_api_key
from agent_gateway.subscriptions.inventory import ensure_inventory, reserve_seats
from agent_gateway.testing.processes import start_gateway
from agent_gateway.usage.recorder import UsageEvent, UsageRecorder
from tests.fixtures.live import ALL_DAY_POOLS, buy_key, provision_account

pytestmark = pytest.mark.anyio
KEYS = 16
NOW = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)


async def make_keys(db: Database, count: int, period_end: datetime = NOW + timedelta(days=30)) -> list[ApiKey]:
    """An account with `count` one-seat subscriptions and their keys, written straight to the
    database one row at a time in descending id order (so a table scan meets them that way)."""
    account = Account(id=new_id("acct"), name="usage", created_at=NOW)
    subs = [Subscription(id=new_id("sub"), account_id=account.id, pool_slug="alpha", blocks=["europe"],
                         billing_cycle="month", status="active", price_atomic=1, period_start=NOW - timedelta(days=1),
                         period_end=period_end, created_at=NOW) for _ in range(count)]
    keys = sorted((new_api_key(account.id, sub.id, f"k{i}", NOW)[0] for i, sub in enumerate(subs)),
                  key=lambda key: key.id, reverse=True)
    async with db.transaction() as session:
        session.add(account)
        await session.flush()
        session.add_all(subs)
        await session.flush()
        for key in keys:
            session.add(key)
            await session.flush()
    return sorted(keys, key=lambda key: key.id)


def usage_event(key: ApiKey, at: datetime) -> UsageEvent:
    return UsageEvent(api_key_id=key.id, account_id=key.account_id, subscription_id=key.subscription_id,
                      endpoint="chat.completions", model="alpha-1", status_code=200, prompt_tokens=1,
                      completion_tokens=1, latency_ms=1.0, usage_source="upstream", created_at=at)


async def deadlocks(database_url: str) -> int:
    """PostgreSQL's count of deadlocks detected in this database (0 on SQLite, which has none)."""
    if is_sqlite(database_url):
        return 0
    db = Database(database_url)
    try:
        async with db.transaction() as session:
            return int(await session.scalar(
                text("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")))
    finally:
        await db.dispose()


async def wait_for_lock_waiters(db: Database, count: int) -> None:
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        async with db.transaction() as session:
            waiting = await session.scalar(text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"))
        if waiting >= count:
            return
        assert asyncio.get_running_loop().time() < deadline, f"{waiting} of {count} transactions reached the locks"
        await asyncio.sleep(0.01)  # polling pg_stat_activity, bounded by the deadline


async def run_behind_a_held_key(db: Database, held: ApiKey, *work: Awaitable) -> list:
    """Start `work` one after the other while a third transaction holds `held`'s row, each once the
    previous one is waiting for a lock; then let go. This makes the interleaving that deadlocks
    rows locked in two different orders certain instead of lucky. (SQLite has one writer at a
    time: there the work simply runs.)"""
    if is_sqlite(db.url):
        return list(await asyncio.gather(*work))
    tasks = []
    async with db.transaction() as blocker:
        await blocker.execute(select(ApiKey.id).where(ApiKey.id == held.id).with_for_update())
        for coro in work:
            tasks.append(asyncio.ensure_future(coro))
            await wait_for_lock_waiters(db, len(tasks))
    # A deadlock aborts one of the transactions: its call raises.
    return list(await asyncio.gather(*tasks))


async def test_two_processes_flushing_the_same_keys_in_opposite_orders_never_deadlock(database_url):
    # Two engines are two processes as far as the database can tell: separate connections, each
    # flushing its own buffer. Process A saw the keys' requests in one order, process B in the
    # reverse order. Held up at the middle key, A (in arrival order) would hold the lower half
    # and B the upper half, and letting go deadlocks them; in one global order B waits for A.
    setup = Database(database_url)
    engines = [Database(database_url), Database(database_url)]
    try:
        keys = await make_keys(setup, KEYS)
        deadlocks_before = await deadlocks(database_url)
        writers = [UsageRecorder(db) for db in engines]
        for key in keys:
            writers[0].record(usage_event(key, NOW))
        for key in reversed(keys):
            writers[1].record(usage_event(key, NOW))
        flushed = await run_behind_a_held_key(setup, keys[KEYS // 2], writers[0].flush(), writers[1].flush())
        assert flushed == [KEYS, KEYS]
        async with setup.transaction() as session:
            written = await session.scalar(select(func.count()).select_from(UsageRecord))
            last_used = set((await session.scalars(select(ApiKey.last_used_at))).all())
    finally:
        for db in (*engines, setup):
            await db.dispose()
    assert written == 2 * KEYS
    assert {t.astimezone(UTC) for t in last_used} == {NOW}
    assert await deadlocks(database_url) == deadlocks_before


async def test_expiring_keys_while_their_usage_is_written_never_deadlocks(database_url):
    # A batch of seats bought together expires together, usually while its keys are in use: the
    # expiry pass revokes all their keys in one transaction as a process flushes their usage.
    setup, writer_db, job_db = Database(database_url), Database(database_url), Database(database_url)
    try:
        keys = await make_keys(setup, KEYS, period_end=NOW)
        deadlocks_before = await deadlocks(database_url)
        writer = UsageRecorder(writer_db)
        for key in keys:
            writer.record(usage_event(key, NOW))
        flushed, expired = await run_behind_a_held_key(
            setup, keys[KEYS // 2], writer.flush(), expire_subscriptions(job_db, FixedClock(NOW)))
        assert flushed == KEYS and sorted(expired.revoked_key_ids) == [key.id for key in keys]
        async with setup.transaction() as session:
            statuses = set((await session.scalars(select(ApiKey.status))).all())
            written = await session.scalar(select(func.count()).select_from(UsageRecord))
    finally:
        for db in (setup, writer_db, job_db):
            await db.dispose()
    assert statuses == {"revoked"} and written == KEYS
    assert await deadlocks(database_url) == deadlocks_before


async def test_expiry_freeing_seats_while_a_buyer_reserves_them_never_deadlocks(database_url, pools_file):
    # Two subscriptions expire, one in europe, then one in asia, while a buyer of asia + europe
    # is reserving: the buyer locks its blocks in sorted order (asia, then europe). Freed
    # subscription by subscription, the expiry pass would lock europe, then wait for asia, while
    # the buyer waits for europe.
    catalog = load_catalog(pools_file)
    setup, buyer_db, job_db = Database(database_url), Database(database_url), Database(database_url)
    try:
        await ensure_inventory(setup, catalog)
        account = Account(id=new_id("acct"), name="expiry", created_at=NOW)
        async with setup.transaction() as session:
            session.add(account)
            await session.flush()
            for block in ("europe", "asia"):
                await reserve_seats(session, catalog, "alpha", (block,), 1)
                session.add(Subscription(
                    id=new_id("sub"), account_id=account.id, pool_slug="alpha", blocks=[block], billing_cycle="month",
                    status="active", price_atomic=1, period_start=NOW - timedelta(days=30), period_end=NOW,
                    created_at=NOW))
                await session.flush()
        deadlocks_before = await deadlocks(database_url)
        async with buyer_db.transaction() as buyer:
            await reserve_seats(buyer, catalog, "alpha", ("asia",), 1)  # the buyer's first block...
            expiry = asyncio.ensure_future(expire_subscriptions(job_db, FixedClock(NOW)))
            if not is_sqlite(database_url):  # (SQLite: one writer at a time, nothing interleaves)
                await wait_for_lock_waiters(setup, 1)
            await reserve_seats(buyer, catalog, "alpha", ("europe",), 1)  # ...and its second
        # A deadlock aborts one of the two: the buyer's reservation or the expiry pass raises.
        result = await expiry
        assert len(result.subscription_ids) == 2
        async with setup.transaction() as session:
            held = dict((await session.execute(
                select(SeatInventory.block, SeatInventory.seats_held).where(SeatInventory.pool_slug == "alpha"))).all())
    finally:
        for db in (setup, buyer_db, job_db):
            await db.dispose()
    assert held == {"asia": 1, "europe": 1, "americas": 0}  # both expired seats freed, the buyer's held
    assert await deadlocks(database_url) == deadlocks_before

@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_two_processes_under_load_on_shared_keys_record_every_admitted_request(
        tmp_path: Path, database_url, redis_url, upstream):  # noqa: F811
    # The load that found the deadlock: two processes, 64 clients on 16 keys, each client
    # alternating processes. Every admitted request must have exactly one usage row afterwards,
    # and PostgreSQL must have detected no deadlock.
    pools = tmp_path / "pools.toml"
    pools.write_text(ALL_DAY_POOLS.format(upstream=upstream.url))
    env = {"AGW_DATABASE_URL": database_url, "AGW_REDIS_URL": redis_url, "AGW_POOLS_FILE": str(pools),
           "AGW_AUTO_MIGRATE": "false", "AGW_LOG_LEVEL": "WARNING", "AGW_JOB_INTERVAL_S": "3600"}
    processes = [start_gateway(env, log=tmp_path / f"gateway-{name}.log") for name in ("a", "b")]
    try:
        urls = [url for _, url in processes]
        mk = provision_account(database_url)
        keys = [buy_key(urls[0], mk, "alpha", ["day"]) for _ in range(KEYS)]
        deadlocks_before = await deadlocks(database_url)
        admitted: Counter[str] = Counter()
        statuses: Counter[int] = Counter()
        stop_at = time.monotonic() + 6

        async def client(http: httpx.AsyncClient, i: int) -> None:
            sk, key_id = keys[i % KEYS]
            n = i
            while time.monotonic() < stop_at:
                n += 1
                r = await http.post(urls[n % 2] + "/v1/chat/completions", headers={"Authorization": f"Bearer {sk}"},
                                    json={"model": "test-model", "max_tokens": 2,
                                          "messages": [{"role": "user", "content": "count me"}]})
                statuses[r.status_code] += 1
                if r.status_code == 200:
                    admitted[key_id] += 1

        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(timeout=30, limits=limits) as http:
            await asyncio.gather(*(client(http, i) for i in range(64)))
    finally:
        # A graceful stop drains each process's usage buffer into the database.
        for process, _ in processes:
            process.terminate()
        for process, _ in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
    assert set(statuses) <= {200, 429} and statuses[200] > 0, statuses
    db = Database(database_url)
    try:
        async with db.transaction() as session:
            rows = dict((await session.execute(
                select(UsageRecord.api_key_id, func.count()).group_by(UsageRecord.api_key_id))).all())
        # The processes are gone; wait for their database sessions to end, so their statistics
        # (the deadlock counter among them) have been reported.
        deadline = time.monotonic() + 10
        while True:
            async with db.transaction() as session:
                others = await session.scalar(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid()"))
            if others == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)  # polling pg_stat_activity, bounded by the deadline
    finally:
        await db.dispose()
    assert rows == dict(admitted)
    assert await deadlocks(database_url) == deadlocks_before
