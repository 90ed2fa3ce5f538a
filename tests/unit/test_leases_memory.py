"""In-process leases, the stream registry and the local revocation bus."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from agent_gateway.proxy.leases import AcquireResult, MemoryLeases, RedisLeases, make_leases
from agent_gateway.keys.revocation import LocalRevocationBus, make_revocation_bus
from agent_gateway.proxy.streams import Registration, StreamRegistry

pytestmark = pytest.mark.anyio

ACQUIRED, BUSY, REVOKED = AcquireResult.ACQUIRED, AcquireResult.BUSY, AcquireResult.REVOKED


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def eventually(condition: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"condition still false after {timeout_s}s")
        await asyncio.sleep(0.01)


# --- MemoryLeases ----------------------------------------------------------------------------

async def test_acquire_busy_release_reacquire() -> None:
    leases = MemoryLeases()
    result, lease = await leases.acquire("k1")
    assert result is ACQUIRED and lease is not None and lease.key_id == "k1"
    assert await leases.acquire("k1") == (BUSY, None)
    assert (await leases.acquire("k2"))[0] is ACQUIRED  # keys are independent
    assert await leases.release(lease) is True
    again, second = await leases.acquire("k1")
    assert again is ACQUIRED and second is not None and second.lease_id != lease.lease_id


async def test_stale_release_never_frees_a_newer_holder() -> None:
    leases = MemoryLeases()
    _, a = await leases.acquire("k1")
    assert a is not None and await leases.release(a) is True
    _, b = await leases.acquire("k1")
    assert b is not None
    assert await leases.release(a) is False
    assert (await leases.acquire("k1"))[0] is BUSY  # B still holds the slot
    assert await leases.renew(b) is True
    assert await leases.release(b) is True
    assert await leases.release(b) is False


async def test_refused_acquire_changes_nothing() -> None:
    leases = MemoryLeases()
    _, holder = await leases.acquire("k1")
    assert holder is not None
    for _ in range(3):
        assert await leases.acquire("k1") == (BUSY, None)
    assert await leases.renew(holder) is True
    assert await leases.release(holder) is True  # still the holder's own lease
    await leases.revoke("k2")
    assert await leases.acquire("k2") == (REVOKED, None)
    await leases.restore("k2")
    assert (await leases.acquire("k2"))[0] is ACQUIRED  # the refusal left no slot behind


async def test_concurrent_acquires_admit_exactly_one() -> None:
    leases = MemoryLeases()
    results = await asyncio.gather(*(leases.acquire("k1") for _ in range(200)))
    verdicts = [result for result, _ in results]
    assert verdicts.count(ACQUIRED) == 1
    assert verdicts.count(BUSY) == 199


async def test_revoke_blocks_even_while_free_and_restore_reenables() -> None:
    leases = MemoryLeases()
    _, held = await leases.acquire("k1")
    assert held is not None
    await leases.revoke("k1")
    assert await leases.acquire("k1") == (REVOKED, None)  # the tombstone wins over BUSY
    assert await leases.release(held) is True
    assert await leases.acquire("k1") == (REVOKED, None)  # and holds while the slot is free
    await leases.restore("k1")
    assert (await leases.acquire("k1"))[0] is ACQUIRED


async def test_tombstone_expires_exactly_at_its_ttl() -> None:
    clock = ManualClock()
    leases = MemoryLeases(tombstone_ttl_s=120.0, clock=clock)
    await leases.revoke("k1")
    clock.now += 119.999
    assert (await leases.acquire("k1"))[0] is REVOKED
    clock.now += 0.001
    assert (await leases.acquire("k1"))[0] is ACQUIRED


async def test_tombstone_expires_in_real_time() -> None:
    leases = MemoryLeases(tombstone_ttl_s=0.2)
    await leases.revoke("k1")
    assert (await leases.acquire("k1"))[0] is REVOKED

    async def acquired() -> bool:
        return (await leases.acquire("k1"))[0] is ACQUIRED

    await eventually(acquired, timeout_s=3.0)


async def test_renew_reports_loss() -> None:
    leases = MemoryLeases()
    _, lease = await leases.acquire("k1")
    assert lease is not None and await leases.renew(lease) is True
    await leases.release(lease)
    assert await leases.renew(lease) is False


async def test_factories_pick_the_in_process_implementations_without_redis() -> None:
    assert isinstance(make_leases(None), MemoryLeases)
    assert isinstance(make_revocation_bus(None), LocalRevocationBus)
    redis_leases = make_leases("redis://127.0.0.1:1/0")  # constructing does not connect
    assert isinstance(redis_leases, RedisLeases)
    await redis_leases.close()


# --- StreamRegistry and LocalRevocationBus ---------------------------------------------------

def test_cancel_key_calls_every_callback_of_that_key_only() -> None:
    registry = StreamRegistry()
    calls: list[tuple[str, str]] = []
    registry.add("k1", lambda reason: calls.append(("first", reason)))
    registry.add("k1", lambda reason: calls.append(("second", reason)))
    registry.add("k2", lambda reason: calls.append(("other", reason)))
    assert registry.cancel_key("k1", "key_revoked") == 2
    assert sorted(calls) == [("first", "key_revoked"), ("second", "key_revoked")]
    assert registry.cancel_key("nobody", "key_revoked") == 0


def test_remover_unregisters_and_is_idempotent() -> None:
    registry = StreamRegistry()
    calls: list[str] = []
    cancel = calls.append
    remove_first = registry.add("k1", cancel)
    registry.add("k1", cancel)  # the same callable twice: two independent registrations
    remove_first()
    remove_first()
    assert registry.cancel_key("k1", "expired") == 1
    assert calls == ["expired"]


def test_a_callback_may_remove_itself_and_a_failing_one_does_not_stop_the_rest() -> None:
    registry = StreamRegistry()
    calls: list[str] = []
    removers: list[Callable[[], None]] = []

    def self_removing(reason: str) -> None:
        calls.append(reason)
        removers[0]()

    def broken(reason: str) -> None:
        raise RuntimeError("boom")

    removers.append(registry.add("k1", self_removing))
    registry.add("k1", broken)
    registry.add("k1", calls.append)
    assert registry.cancel_key("k1", "revoked") == 3
    assert calls == ["revoked", "revoked"]
    assert registry.count("k1") == 2


def test_a_request_revoked_between_admission_and_relay_is_cancelled_once_it_runs() -> None:
    # Registered before its lease is taken, so a revocation landing before the relay starts is
    # kept and acted on when the relay binds its canceller; it must not run on.
    registry = StreamRegistry()
    registration = Registration()
    remove = registry.add("k1", registration.cancel)
    assert registry.cancel_key("k1", "disabled") == 1
    late: list[str] = []
    assert registration.reason == "disabled" and late == []
    registration.bind(late.append)
    registry.cancel_key("k1", "deleted")
    assert late == ["deleted"]
    remove()
    # Once it is gone, revocations of that key reach nobody (later requests are refused by the
    # tombstone at acquire), and a new request's registration starts clean.
    assert registry.cancel_key("k1", "disabled") == 0
    after = Registration()
    registry.add("k1", after.cancel)
    assert after.reason is None
    # The first revocation is the one kept.
    registration2 = Registration()
    registration2.cancel("disabled")
    registration2.cancel("deleted")
    assert registration2.reason == "disabled"


async def test_local_bus_delivers_to_every_handler() -> None:
    bus = LocalRevocationBus()
    registry = StreamRegistry()
    seen: list[tuple[str, str]] = []
    cancelled: list[str] = []
    registry.add("k1", cancelled.append)

    def broken(key_id: str, reason: str) -> None:
        raise RuntimeError("boom")

    bus.subscribe(broken)
    bus.subscribe(lambda key_id, reason: seen.append((key_id, reason)))
    bus.subscribe(registry.cancel_key)
    await bus.start()
    await bus.publish("k1", "key_revoked")
    await bus.close()
    assert seen == [("k1", "key_revoked")]
    assert cancelled == ["key_revoked"]
