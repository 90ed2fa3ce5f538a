"""Redis leases and the Redis revocation bus, against a real Redis (skipped only if unreachable)."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from agent_gateway.errors import ServiceUnavailable
from agent_gateway.proxy.leases import AcquireResult, Lease, RedisLeases
from agent_gateway.keys.revocation import RedisRevocationBus

pytestmark = pytest.mark.anyio

REDIS_URL = os.environ.get("AGW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
CLOSED_PORT_URL = "redis://127.0.0.1:1/0"
ACQUIRED, BUSY, REVOKED = AcquireResult.ACQUIRED, AcquireResult.BUSY, AcquireResult.REVOKED

MakeLeases = Callable[..., RedisLeases]


async def eventually(condition: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"condition still false after {timeout_s}s")
        await asyncio.sleep(0.01)


@pytest.fixture
async def redis_admin() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=2)
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        await client.aclose()
        pytest.skip(f"Redis not reachable at {REDIS_URL} (set AGW_TEST_REDIS_URL): {exc!r}")
    yield client
    await client.aclose()


@pytest.fixture
async def prefix(redis_admin: aioredis.Redis) -> AsyncIterator[str]:
    """A key prefix (and channel name) no other test or run shares; its keys are deleted after."""
    prefix = f"agwtest-{secrets.token_hex(6)}"
    yield prefix
    keys = [key async for key in redis_admin.scan_iter(match=f"{prefix}:*")]
    if keys:
        await redis_admin.delete(*keys)


@pytest.fixture
async def make_leases(prefix: str) -> AsyncIterator[MakeLeases]:
    """Each call is a separate RedisLeases with its own connection pool: a separate "process"."""
    made: list[RedisLeases] = []

    def make(url: str = REDIS_URL, **options: object) -> RedisLeases:
        leases = RedisLeases(url, prefix=prefix, **options)  # type: ignore[arg-type]
        made.append(leases)
        return leases

    yield make
    for leases in made:
        await leases.close()


# --- leases ----------------------------------------------------------------------------------

async def test_acquire_busy_release_reacquire(make_leases: MakeLeases) -> None:
    leases = make_leases()
    result, lease = await leases.acquire("k1")
    assert result is ACQUIRED and lease is not None
    assert await leases.acquire("k1") == (BUSY, None)
    assert (await leases.acquire("k2"))[0] is ACQUIRED
    assert await leases.release(lease) is True
    again, second = await leases.acquire("k1")
    assert again is ACQUIRED and second is not None and second.lease_id != lease.lease_id


async def test_stale_release_never_frees_a_newer_holder(make_leases: MakeLeases) -> None:
    leases = make_leases()
    _, a = await leases.acquire("k1")
    assert a is not None and await leases.release(a) is True
    _, b = await leases.acquire("k1")
    assert b is not None
    assert await leases.release(a) is False
    assert (await leases.acquire("k1"))[0] is BUSY
    assert await leases.release(b) is True
    assert await leases.release(b) is False


async def test_refused_acquire_changes_nothing(
    make_leases: MakeLeases, redis_admin: aioredis.Redis, prefix: str
) -> None:
    leases = make_leases(lease_ttl_ms=60_000)
    _, holder = await leases.acquire("k1")
    assert holder is not None
    await redis_admin.pexpire(f"{prefix}:lease:k1", 40_000)  # so a refusal that re-SETs shows up
    for _ in range(3):
        assert await leases.acquire("k1") == (BUSY, None)
    assert await redis_admin.get(f"{prefix}:lease:k1") == holder.lease_id.encode()
    assert await redis_admin.pttl(f"{prefix}:lease:k1") <= 40_000

    await leases.revoke("k2")
    assert await leases.acquire("k2") == (REVOKED, None)
    assert await redis_admin.exists(f"{prefix}:lease:k2") == 0


async def test_two_hundred_concurrent_acquires_from_two_processes_admit_one(make_leases: MakeLeases) -> None:
    first, second = make_leases(), make_leases()
    results = await asyncio.gather(
        *((first if i % 2 else second).acquire("k1") for i in range(200))
    )
    verdicts = [result for result, _ in results]
    assert verdicts.count(ACQUIRED) == 1
    assert verdicts.count(BUSY) == 199


async def test_a_burst_of_a_thousand_new_requests_waits_for_connections_instead_of_failing(
    make_leases: MakeLeases, redis_admin: aioredis.Redis, prefix: str
) -> None:
    # 1,000 streams starting at once on 1,000 keys: more commands in flight than the pool has
    # connections. Each must queue for a connection, not be refused as "store unavailable".
    leases = make_leases()
    acquired = await asyncio.gather(*(leases.acquire(f"k{i}") for i in range(1000)))
    assert [result for result, _ in acquired] == [ACQUIRED] * 1000
    freed = await asyncio.gather(*(leases.release(lease) for _, lease in acquired if lease is not None))
    assert freed == [True] * 1000
    assert [key async for key in redis_admin.scan_iter(match=f"{prefix}:lease:*")] == []


async def test_revoke_blocks_even_while_free_and_restore_reenables(make_leases: MakeLeases) -> None:
    leases, other_process = make_leases(), make_leases()
    _, held = await leases.acquire("k1")
    assert held is not None
    await leases.revoke("k1")
    assert await other_process.acquire("k1") == (REVOKED, None)
    assert await leases.release(held) is True
    assert await other_process.acquire("k1") == (REVOKED, None)
    await other_process.restore("k1")
    assert (await leases.acquire("k1"))[0] is ACQUIRED


async def test_a_revoked_keys_lease_is_not_renewed(make_leases: MakeLeases) -> None:
    # The backstop for a process that missed the revocation message: its stream ends at the
    # next renewal.
    leases = make_leases()
    _, lease = await leases.acquire("k1")
    assert lease is not None and await leases.renew(lease) is True
    await leases.revoke("k1")
    assert await leases.renew(lease) is False
    await leases.restore("k1")
    assert await leases.renew(lease) is True


async def test_tombstone_expires_after_its_ttl(make_leases: MakeLeases) -> None:
    leases = make_leases(tombstone_ttl_ms=200)
    await leases.revoke("k1")
    assert (await leases.acquire("k1"))[0] is REVOKED

    async def acquired() -> bool:
        return (await leases.acquire("k1"))[0] is ACQUIRED

    await eventually(acquired, timeout_s=3.0)


async def test_lease_of_a_crashed_holder_expires(make_leases: MakeLeases) -> None:
    crashed, survivor = make_leases(lease_ttl_ms=300), make_leases()
    _, orphan = await crashed.acquire("k1")  # never released: its process "died"
    assert orphan is not None
    assert (await survivor.acquire("k1"))[0] is BUSY
    taken: list[Lease] = []

    async def acquired() -> bool:
        result, lease = await survivor.acquire("k1")
        taken.extend([lease] if lease else [])
        return result is ACQUIRED

    await eventually(acquired, timeout_s=3.0)
    assert await crashed.release(orphan) is False  # the late release cannot free the new holder
    assert await survivor.renew(taken[0]) is True


async def test_renew_keeps_the_lease_past_its_ttl_and_reports_loss(make_leases: MakeLeases) -> None:
    holder, other = make_leases(lease_ttl_ms=300), make_leases()
    _, lease = await holder.acquire("k1")
    assert lease is not None
    loop = asyncio.get_running_loop()
    until = loop.time() + 0.9  # three original TTLs
    while loop.time() < until:
        assert await holder.renew(lease) is True
        assert (await other.acquire("k1"))[0] is BUSY
        await asyncio.sleep(0.1)

    async def taken_over() -> bool:  # renewals stop: the lease lapses and someone else gets it
        return (await other.acquire("k1"))[0] is ACQUIRED

    await eventually(taken_over, timeout_s=3.0)
    assert await holder.renew(lease) is False


async def test_cancelled_acquire_does_not_strand_a_granted_lease(
    make_leases: MakeLeases, redis_admin: aioredis.Redis, prefix: str
) -> None:
    async with ReplyHoldingProxy(REDIS_URL) as proxy:
        leases = make_leases(proxy.url)
        _, warm = await leases.acquire("warmup")  # connect and load scripts before holding replies
        assert warm is not None and await leases.release(warm)
        proxy.replies.clear()
        attempt = asyncio.create_task(leases.acquire("k1"))

        async def granted() -> bool:
            return await redis_admin.exists(f"{prefix}:lease:k1") == 1

        await eventually(granted)  # Redis executed the script; the reply is stuck in the proxy
        attempt.cancel()
        with pytest.raises(asyncio.CancelledError):
            await attempt
        proxy.replies.set()

        async def freed() -> bool:
            return await redis_admin.exists(f"{prefix}:lease:k1") == 0

        await eventually(freed, timeout_s=3.0)


async def test_an_acquire_whose_reply_was_lost_gives_the_lease_back(
    make_leases: MakeLeases, redis_admin: aioredis.Redis, prefix: str
) -> None:
    # Redis granted the lease, but the reply never came in time: the caller got a 503, and the
    # key must not stay busy for a whole TTL because of a lease nobody knows it holds.
    async with ReplyHoldingProxy(REDIS_URL) as proxy:
        leases = make_leases(proxy.url, command_timeout_s=0.2, lease_ttl_ms=60_000)
        _, warm = await leases.acquire("warmup")
        assert warm is not None and await leases.release(warm)
        proxy.replies.clear()
        with pytest.raises(ServiceUnavailable):
            await leases.acquire("k1")
        assert await redis_admin.exists(f"{prefix}:lease:k1") == 1  # granted after all
        proxy.replies.set()

        async def freed() -> bool:
            return await redis_admin.exists(f"{prefix}:lease:k1") == 0

        await eventually(freed, timeout_s=3.0)
        assert (await make_leases().acquire("k1"))[0] is ACQUIRED


async def test_concurrent_lease_commands_share_one_pipelined_connection(make_leases: MakeLeases) -> None:
    # redis-py took a pooled connection per command in flight (up to 64, each its own write and
    # read); the lease scripts now go out together on one connection, replies matched in order.
    async with ReplyHoldingProxy(REDIS_URL) as proxy:
        leases = make_leases(proxy.url)
        acquired = await asyncio.gather(*(leases.acquire(f"k{i % 100}") for i in range(300)))
        verdicts = [result for result, _ in acquired]
        assert verdicts.count(ACQUIRED) == 100 and verdicts.count(BUSY) == 200
        assert await asyncio.gather(*(leases.release(lease) for _, lease in acquired if lease)) == [True] * 100
        assert proxy.connections == 1


async def test_a_caller_cancelled_mid_command_does_not_shift_the_replies(make_leases: MakeLeases) -> None:
    async with ReplyHoldingProxy(REDIS_URL) as proxy:
        leases = make_leases(proxy.url)
        _, held = await leases.acquire("k1")
        assert held is not None
        proxy.replies.clear()
        stale = asyncio.create_task(leases.release(Lease("k1", "not-the-holder")))  # Redis answers 0
        renewal = asyncio.create_task(leases.renew(held))  # Redis answers 1
        await asyncio.sleep(0.05)  # both sent; their replies are held back
        stale.cancel()
        proxy.replies.set()
        # Had the cancelled command's reply been handed to the next caller, the renewal would read 0.
        assert await renewal is True
        assert (await leases.acquire("k1"))[0] is BUSY


async def test_scripts_flushed_from_redis_are_loaded_again(
    make_leases: MakeLeases, redis_admin: aioredis.Redis
) -> None:
    leases = make_leases()
    _, lease = await leases.acquire("k1")
    assert lease is not None and await leases.release(lease)
    await redis_admin.script_flush()  # as after a Redis restart: EVALSHA answers NOSCRIPT
    result, lease = await leases.acquire("k1")
    assert result is ACQUIRED and lease is not None and await leases.release(lease)


async def test_redis_down_fails_closed_quickly(make_leases: MakeLeases) -> None:
    leases = make_leases(CLOSED_PORT_URL, connect_timeout_s=1.0)
    lease = Lease("k1", "0" * 32)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ServiceUnavailable) as caught:
        await leases.acquire("k1")
    assert caught.value.code == "lease_store_unavailable" and caught.value.status == 503
    assert loop.time() - started < 3.0
    for call in (leases.release(lease), leases.renew(lease), leases.revoke("k1"), leases.restore("k1")):
        with pytest.raises(ServiceUnavailable):
            await call


async def test_unresponsive_redis_fails_closed_within_the_command_timeout(make_leases: MakeLeases) -> None:
    async with SilentServer() as silent:
        leases = make_leases(silent.url, connect_timeout_s=0.5, command_timeout_s=0.3)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ServiceUnavailable) as caught:
            await leases.acquire("k1")
        assert caught.value.code == "lease_store_unavailable"
        assert loop.time() - started < 3.0


# --- revocation bus --------------------------------------------------------------------------

@pytest.fixture
async def make_bus(prefix: str) -> AsyncIterator[Callable[..., RedisRevocationBus]]:
    made: list[RedisRevocationBus] = []

    def make(url: str = REDIS_URL, **options: object) -> RedisRevocationBus:
        bus = RedisRevocationBus(url, channel=f"{prefix}:revocations", **options)  # type: ignore[arg-type]
        made.append(bus)
        return bus

    yield make
    for bus in made:
        await bus.close()


class Inbox:
    def __init__(self) -> None:
        self.received: list[tuple[str, str]] = []
        self.arrived = asyncio.Event()

    def __call__(self, key_id: str, reason: str) -> None:
        self.received.append((key_id, reason))
        self.arrived.set()

    async def next(self, timeout_s: float = 5.0) -> tuple[str, str]:
        await asyncio.wait_for(self.arrived.wait(), timeout=timeout_s)
        self.arrived.clear()
        return self.received[-1]


async def test_publish_reaches_the_other_process_and_this_one(make_bus: Callable[..., RedisRevocationBus]) -> None:
    publisher, listener = make_bus(), make_bus()
    at_publisher, at_listener = Inbox(), Inbox()
    publisher.subscribe(at_publisher)
    listener.subscribe(at_listener)
    await publisher.start()
    await listener.start()
    await publisher.publish("k1", "key_revoked")  # right after start: must not be lost
    assert await at_listener.next() == ("k1", "key_revoked")
    assert await at_publisher.next() == ("k1", "key_revoked")


async def test_many_revocations_at_once_are_all_published(make_bus: Callable[..., RedisRevocationBus]) -> None:
    # Hundreds of keys disabled at the same moment: more publishes in flight than connections.
    publisher, listener = make_bus(), make_bus()
    at_listener = Inbox()
    listener.subscribe(at_listener)
    await publisher.start()
    await listener.start()
    await asyncio.gather(*(publisher.publish(f"k{i}", "disabled") for i in range(300)))

    async def all_arrived() -> bool:
        return len(at_listener.received) == 300

    await eventually(all_arrived)
    assert sorted(at_listener.received) == sorted((f"k{i}", "disabled") for i in range(300))


async def test_bad_messages_and_failing_handlers_do_not_stop_the_reader(
    make_bus: Callable[..., RedisRevocationBus], redis_admin: aioredis.Redis
) -> None:
    bus, inbox = make_bus(), Inbox()
    failures: list[str] = []

    def broken(key_id: str, reason: str) -> None:
        failures.append(key_id)
        raise RuntimeError("boom")

    bus.subscribe(broken)
    bus.subscribe(inbox)
    await bus.start()
    await redis_admin.publish(bus.channel, b"not json")
    await redis_admin.publish(bus.channel, b'{"keyId": "k1"}')
    await bus.publish("k2", "expired")
    assert await inbox.next() == ("k2", "expired")
    await bus.publish("k3", "key_revoked")
    assert await inbox.next() == ("k3", "key_revoked")
    assert inbox.received == [("k2", "expired"), ("k3", "key_revoked")]
    assert failures == ["k2", "k3"]


async def test_bus_resubscribes_after_its_connection_is_killed(
    make_bus: Callable[..., RedisRevocationBus], redis_admin: aioredis.Redis, prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="agent_gateway.keys.revocation")
    bus, inbox = make_bus(client_name=prefix), Inbox()
    bus.subscribe(inbox)
    await bus.start()
    subscribers = [c for c in await redis_admin.client_list() if c.get("name") == prefix and c.get("sub") != "0"]
    assert len(subscribers) == 1
    await redis_admin.execute_command("CLIENT", "KILL", "ID", subscribers[0]["id"])

    async def delivered() -> bool:  # revocations published while it is down are lost, so keep sending
        await bus.publish("k1", "key_revoked")
        try:
            await asyncio.wait_for(inbox.arrived.wait(), timeout=0.1)
        except TimeoutError:
            return False
        return True

    await eventually(delivered, timeout_s=10.0)
    assert bus.subscribed
    fresh = [c for c in await redis_admin.client_list() if c.get("name") == prefix and c.get("sub") != "0"]
    assert [c["id"] for c in fresh] != [subscribers[0]["id"]]
    messages = [record.getMessage() for record in caplog.records]
    assert any("connection lost" in message for message in messages)
    assert any("resubscribed" in message for message in messages)


async def test_bus_reconnects_when_redis_stops_answering_pings(
    make_bus: Callable[..., RedisRevocationBus], redis_admin: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="agent_gateway.keys.revocation")
    async with ReplyHoldingProxy(REDIS_URL) as proxy:
        bus, inbox = make_bus(proxy.url, ping_interval_s=0.1), Inbox()
        bus.subscribe(inbox)
        await bus.start()
        proxy.replies.clear()  # a half-open connection: no error, just silence

        async def gave_up_on_silence() -> bool:
            return any("no reply to pings" in record.getMessage() for record in caplog.records)

        await eventually(gave_up_on_silence)
        proxy.replies.set()

        async def delivered() -> bool:
            await redis_admin.publish(bus.channel, b'{"keyId": "k1", "reason": "key_revoked"}')
            try:
                await asyncio.wait_for(inbox.arrived.wait(), timeout=0.1)
            except TimeoutError:
                return False
            return True

        await eventually(delivered, timeout_s=10.0)


async def test_bus_without_redis_fails_closed(make_bus: Callable[..., RedisRevocationBus]) -> None:
    with pytest.raises(ServiceUnavailable) as caught:
        await make_bus(CLOSED_PORT_URL).publish("k1", "key_revoked")
    assert caught.value.code == "revocation_bus_unavailable"
    with pytest.raises(ServiceUnavailable) as caught:
        await make_bus(CLOSED_PORT_URL, start_timeout_s=0.5).start()
    assert caught.value.code == "revocation_bus_unavailable"


# --- stand-ins for a misbehaving Redis -------------------------------------------------------

class SilentServer:
    """Accepts TCP connections and never answers: an unresponsive store."""

    async def __aenter__(self) -> SilentServer:
        self._connections: list[asyncio.StreamWriter] = []
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"redis://127.0.0.1:{port}/0"
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.append(writer)
        while await reader.read(65536):
            pass

    async def __aexit__(self, *exc_info: object) -> None:
        self._server.close()
        for writer in self._connections:
            writer.close()


class ReplyHoldingProxy:
    """A TCP proxy to Redis whose replies can be held back while requests still go through."""

    def __init__(self, target_url: str) -> None:
        self._target = urlsplit(target_url)
        self.replies = asyncio.Event()
        self.replies.set()
        self._writers: list[asyncio.StreamWriter] = []
        self.connections = 0

    async def __aenter__(self) -> ReplyHoldingProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        userinfo, _, _ = self._target.netloc.rpartition("@")
        netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
        self.url = urlunsplit(self._target._replace(netloc=netloc))
        return self

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        upstream_reader, upstream_writer = await asyncio.open_connection(
            self._target.hostname or "127.0.0.1", self._target.port or 6379
        )
        self._writers += [client_writer, upstream_writer]
        await asyncio.gather(
            self._pipe(client_reader, upstream_writer, None),
            self._pipe(upstream_reader, client_writer, self.replies),
        )

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, gate: asyncio.Event | None) -> None:
        try:
            while data := await source.read(65536):
                if gate is not None:
                    await gate.wait()
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            sink.close()

    async def __aexit__(self, *exc_info: object) -> None:
        self._server.close()
        for writer in self._writers:
            writer.close()
