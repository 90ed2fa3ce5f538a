"""The key directory's reads: they never wait for a writer, misses arriving together are read in
one query, and a record read while its key was being revoked is answered but never cached."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

import pytest
from sqlalchemy import insert, update
from sqlalchemy.exc import DBAPIError

from agent_gateway.db.models import Account, ApiKey, KeyStatus, Subscription, new_id
from agent_gateway.keys.api_keys import new_api_key
from tests.conftest import Gateway, auth

pytestmark = pytest.mark.anyio


async def new_keys(gateway: Gateway, count: int) -> tuple[str, list[dict]]:
    """A management key and `count` minted API keys (each with its `apiKey` plaintext and `id`)."""
    _, mk = await gateway.new_account(credit=str(50 * count))
    subs = await gateway.buy(mk, quantity=count)
    return mk, [await gateway.mint(mk, sub["id"], name=f"k{i}") for i, sub in enumerate(subs)]


async def many_keys(gateway: Gateway, count: int) -> list[dict]:
    """`count` active keys on one-seat subscriptions, written straight to the database (more than
    the test pools sell)."""
    now = gateway.services.clock.now()
    account = Account(id=new_id("acct"), name="many", created_at=now)
    subs = [Subscription(id=new_id("sub"), account_id=account.id, pool_slug="alpha", blocks=["europe"],
                         billing_cycle="month", status="active", price_atomic=1, period_start=now,
                         period_end=now + timedelta(days=30), created_at=now) for _ in range(count)]
    minted = [new_api_key(account.id, sub.id, f"k{i}", now) for i, sub in enumerate(subs)]
    async with gateway.services.db.transaction() as session:
        session.add(account)
        await session.flush()
        session.add_all(subs)
        await session.flush()
        session.add_all([key for key, _ in minted])
    return [{"id": key.id, "apiKey": token.plaintext} for key, token in minted]


async def test_a_key_lookup_answers_while_a_writer_holds_its_transaction_open(gateway):
    _, [key] = await new_keys(gateway, 1)
    services = gateway.services
    async with services.db.transaction() as session:
        # On SQLite this transaction holds the file's write lock until it ends (BEGIN IMMEDIATE),
        # as a usage flush does; the lookup must not queue behind it.
        await session.execute(update(ApiKey).where(ApiKey.id == key["id"]).values(name="renamed, not committed"))
        record = await asyncio.wait_for(services.directory.lookup(key["apiKey"]), timeout=10)
    assert record is not None and record.key_id == key["id"]
    assert record.name == "k0"  # the last committed state: the open write is not seen


async def test_a_write_through_a_read_session_is_refused(gateway):
    db = gateway.services.db
    with pytest.raises(DBAPIError, match="(?i)read-?only"):
        async with db.read() as session:
            await session.execute(insert(Account).values(id=new_id("acct"), name="sneaky", created_at=gateway.services.clock.now()))
    async with db.read() as session:
        assert (await session.get(Account, "nope")) is None  # the pool still serves reads afterwards


async def test_misses_arriving_together_are_read_in_one_query(gateway, monkeypatch):
    keys = await many_keys(gateway, 24)
    services = gateway.services
    # Only the directory's reads are counted: the background passes (expiry, refunds, funding) read
    # the same database on their own schedule.
    await services.jobs.stop()
    reads = []
    plain_read = services.db.read

    @asynccontextmanager
    async def counted() -> AsyncIterator:
        reads.append(1)
        async with plain_read() as session:
            yield session

    monkeypatch.setattr(services.db, "read", counted)
    records = await asyncio.gather(*(services.directory.lookup(key["apiKey"]) for key in keys),
                                   services.directory.lookup(keys[0]["apiKey"]),
                                   services.directory.lookup("sk_" + "0" * 43))
    assert [r.key_id if r else None for r in records] == [key["id"] for key in keys] + [keys[0]["id"], None]
    assert len(reads) == 1
    # All cached now: the same requests read nothing more, and they are admitted.
    await asyncio.gather(*(services.directory.lookup(key["apiKey"]) for key in keys))
    assert len(reads) == 1
    answer = await gateway.client.get("/v1/models", headers=auth(keys[5]["apiKey"]))
    assert answer.status_code == 200


async def test_a_caller_that_gives_up_does_not_cancel_the_read_for_the_others(gateway, monkeypatch):
    _, [key] = await new_keys(gateway, 1)
    directory = gateway.services.directory
    release = asyncio.Event()
    plain_load = directory._load

    async def held(hashes):
        await release.wait()
        return await plain_load(hashes)

    monkeypatch.setattr(directory, "_load", held)
    quitter = asyncio.create_task(directory.lookup(key["apiKey"]))
    stayer = asyncio.create_task(directory.lookup(key["apiKey"]))
    await asyncio.sleep(0)  # both are now waiting on the one read
    quitter.cancel()
    release.set()
    record = await asyncio.wait_for(stayer, timeout=10)
    assert record is not None and record.key_id == key["id"]
    assert quitter.cancelled()


async def test_a_record_read_while_its_key_is_disabled_is_not_cached(gateway, monkeypatch):
    mk, [key] = await new_keys(gateway, 1)
    directory = gateway.services.directory
    read_done, release = asyncio.Event(), asyncio.Event()
    plain_load = directory._load

    async def slow_after_reading(hashes):
        records = await plain_load(hashes)  # the snapshot says: active
        read_done.set()
        await release.wait()
        return records

    monkeypatch.setattr(directory, "_load", slow_after_reading)
    lookup = asyncio.create_task(directory.lookup(key["apiKey"]))
    await read_done.wait()
    disabled = await gateway.client.post(f"/api/keys/{key['id']}/disable", headers=auth(mk))
    assert disabled.status_code == 200
    release.set()
    stale = await lookup
    assert stale is not None and stale.key_status == KeyStatus.ACTIVE  # read before the disable
    monkeypatch.setattr(directory, "_load", plain_load)
    fresh = await directory.lookup(key["apiKey"])
    assert fresh is not None and fresh.key_status == KeyStatus.DISABLED
    answer = await gateway.client.post("/v1/chat/completions", headers=auth(key["apiKey"]),
                                       json={"model": "alpha-model", "messages": []})
    assert answer.status_code == 403 and answer.json()["error"]["code"] == "key_disabled"


async def test_a_read_cancelled_at_shutdown_leaves_nobody_waiting(gateway, monkeypatch):
    _, [key] = await new_keys(gateway, 1)
    directory = gateway.services.directory
    entered = asyncio.Event()

    async def never(hashes):
        entered.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(directory, "_load", never)
    first = asyncio.create_task(directory.lookup(key["apiKey"]))
    await entered.wait()
    queued = asyncio.create_task(directory.lookup("sk_" + "1" * 43))  # waits for the next read
    await asyncio.sleep(0)  # let it join the queue
    directory._reader.cancel()
    for waiter in (first, queued):
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(waiter, timeout=10)
    monkeypatch.setattr(directory, "_load", type(directory)._load.__get__(directory))
    record = await directory.lookup(key["apiKey"])  # a later lookup reads afresh
    assert record is not None and record.key_id == key["id"]
