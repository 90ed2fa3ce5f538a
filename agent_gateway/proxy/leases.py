"""Leases: one request in flight per key, in memory (one process) or in Redis (all processes); a Redis failure refuses the request (fails closed), it never admits one unlimited."""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from agent_gateway.errors import ServiceUnavailable
from agent_gateway.proxy.redis_link import LinkError, RedisLink, ReplyError, script_sha

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lease:
    key_id: str
    lease_id: str


class AcquireResult(enum.Enum):
    ACQUIRED = "acquired"
    BUSY = "busy"
    REVOKED = "revoked"


class Leases(Protocol):
    # True when release() completes without waiting on anything (the leases live in this
    # process): the relay then calls it in place, with no shield (a task) around it.
    in_process: bool

    @property
    def renew_interval_s(self) -> float | None:
        """How often a running request renews its lease; None for leases that never expire."""
        ...

    async def acquire(self, key_id: str) -> tuple[AcquireResult, Lease | None]:
        """Atomically take the key's one slot; a refusal (BUSY, REVOKED) changes nothing."""
        ...

    async def release(self, lease: Lease) -> bool:
        """Free the slot by lease id; idempotent; True only the call that actually freed it."""
        ...

    async def renew(self, lease: Lease) -> bool:
        """Extend the lease if it is still ours; False once it was lost."""
        ...

    async def revoke(self, key_id: str) -> None:
        """Write a tombstone so acquire answers REVOKED in every process."""
        ...

    async def restore(self, key_id: str) -> None:
        """Remove the tombstone (the key was re-enabled)."""
        ...

    async def held(self, key_ids: list[str]) -> int:
        """How many of these keys have a request in flight now (the operator's console)."""
        ...

    async def close(self) -> None: ...


# Lease ids: a random tag per process and a counter, unique across processes without a system
# call per request (the acquire sits on every inference request's path).
_PROCESS_TAG = secrets.token_hex(8)
_LEASE_COUNTER = itertools.count(1)


def _new_process_tag() -> None:
    # A forked worker (`serve --workers N`) would otherwise inherit its parent's tag and counter,
    # and two workers would hand out the same lease ids.
    global _PROCESS_TAG
    _PROCESS_TAG = secrets.token_hex(8)


os.register_at_fork(after_in_child=_new_process_tag)


def new_lease(key_id: str) -> Lease:
    return Lease(key_id=key_id, lease_id=f"{_PROCESS_TAG}{next(_LEASE_COUNTER):x}")


class MemoryLeases:
    """Per-process leases: correct only when one process serves all traffic (the limit would
    otherwise multiply by the number of workers)."""

    renew_interval_s = None  # they never expire
    in_process = True

    def __init__(self, tombstone_ttl_s: float = 120.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.tombstone_ttl_s = tombstone_ttl_s
        self._clock = clock
        self._holders: dict[str, str] = {}  # key_id -> lease_id
        self._tombstones: dict[str, float] = {}  # key_id -> expiry on self._clock

    async def acquire(self, key_id: str) -> tuple[AcquireResult, Lease | None]:
        # No await anywhere in this body: under asyncio nothing can interleave between the
        # check and the set, which is what makes it atomic.
        if self._revoked(key_id):
            return AcquireResult.REVOKED, None
        if key_id in self._holders:
            return AcquireResult.BUSY, None
        lease = new_lease(key_id)
        self._holders[key_id] = lease.lease_id
        return AcquireResult.ACQUIRED, lease

    async def release(self, lease: Lease) -> bool:
        # Compare before deleting: a stale release must never free a newer holder's slot.
        if self._holders.get(lease.key_id) != lease.lease_id:
            return False
        del self._holders[lease.key_id]
        return True

    async def renew(self, lease: Lease) -> bool:
        return self._holders.get(lease.key_id) == lease.lease_id

    async def revoke(self, key_id: str) -> None:
        now = self._clock()
        # Revocations are rare, so sweeping here keeps the tombstone map bounded without a timer.
        for stale in [k for k, expiry in self._tombstones.items() if expiry <= now]:
            del self._tombstones[stale]
        self._tombstones[key_id] = now + self.tombstone_ttl_s

    async def restore(self, key_id: str) -> None:
        self._tombstones.pop(key_id, None)

    async def held(self, key_ids: list[str]) -> int:
        return sum(1 for key_id in key_ids if key_id in self._holders)

    async def close(self) -> None:
        self._holders.clear()
        self._tombstones.clear()

    def _revoked(self, key_id: str) -> bool:
        expiry = self._tombstones.get(key_id)
        if expiry is None:
            return False
        if self._clock() < expiry:
            return True
        del self._tombstones[key_id]
        return False


# KEYS[1] tombstone, KEYS[2] lease; ARGV[1] lease id, ARGV[2] ttl ms. 2 = revoked, 1 = acquired, 0 = busy.
# The GET branch makes the script safe to retry: if a first attempt landed but its reply was
# lost, the retry recognises our own lease instead of reporting BUSY and stranding the slot.
_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 2 end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[2]) == ARGV[1] then return 1 end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS[1] lease, KEYS[2] tombstone. A revoked key's lease is not renewed: should a process miss
# the revocation message, its stream still ends at the next renewal instead of running on.
_RENEW = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_SHAS = {source: script_sha(source) for source in (_ACQUIRE, _RELEASE, _RENEW)}
_VERDICTS = (AcquireResult.BUSY, AcquireResult.ACQUIRED, AcquireResult.REVOKED)
# AGW_LEASE_TTL_S's default (settings.py): a crashed process's keys are free again within 9 s.
_DEFAULT_LEASE_TTL_MS = 9_000


class RedisLeases:
    """Leases shared by every gateway process through Redis.

    A lease expires after `lease_ttl_ms` unless renewed, so a crashed process frees its slots
    by itself; the relay renews well inside that TTL while a stream runs.
    """

    in_process = False

    def __init__(
        self,
        redis_url: str,
        lease_ttl_ms: int = _DEFAULT_LEASE_TTL_MS,
        # The gateway caches ACTIVE keys for at most 60 s and then re-reads the database, where
        # the revocation is already written; a tombstone only has to outlive those cache entries
        # (with margin), so it can expire instead of piling up in Redis forever.
        tombstone_ttl_ms: int = 120_000,
        prefix: str = "agw",
        *,
        connect_timeout_s: float = 1.0,
        command_timeout_s: float = 1.0,
        max_connections: int = 64,
        pool_wait_s: float = 5.0,
    ) -> None:
        self.lease_ttl_ms = lease_ttl_ms
        self.renew_interval_s = lease_ttl_ms / 3000  # three renewals per TTL
        self.tombstone_ttl_ms = tombstone_ttl_ms
        self.prefix = prefix
        # Bounded timeouts and a single quick retry (a pooled connection may be stale after a
        # Redis restart): an outage turns into a fast 503, not a hung request. The pool is
        # bounded and *waits* for a free connection: redis-py's default pool refuses the 101st
        # concurrent command outright, which turned a burst of new streams into false 503s.
        pool = aioredis.BlockingConnectionPool.from_url(
            redis_url,
            max_connections=max_connections,
            timeout=pool_wait_s,
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=command_timeout_s,
            retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=1),
        )
        self._redis = aioredis.Redis.from_pool(pool)  # tombstones (revoke, restore): rare
        # The scripts, on every request's path, go over one pipelined connection (redis_link.py).
        # Each call is an EVALSHA, sent again as EVAL if Redis lost the script.
        self._link = RedisLink(redis_url, connect_timeout_s=connect_timeout_s, command_timeout_s=command_timeout_s)
        self._undoing: set[asyncio.Task[bool]] = set()

    def _lease_key(self, key_id: str) -> str:
        return f"{self.prefix}:lease:{key_id}"

    def _tombstone_key(self, key_id: str) -> str:
        return f"{self.prefix}:revoked:{key_id}"

    async def acquire(self, key_id: str) -> tuple[AcquireResult, Lease | None]:
        lease = new_lease(key_id)
        call = asyncio.ensure_future(self._guarded(
            "acquire", _ACQUIRE,
            [self._tombstone_key(key_id), self._lease_key(key_id)], [lease.lease_id, self.lease_ttl_ms],
        ))
        try:
            # Shielded: if our caller is cancelled after Redis granted the lease but before we
            # saw the reply, nobody would know the lease id and the key would stay busy for a
            # whole TTL. Instead the call finishes and a granted lease is released at once.
            code = await asyncio.shield(call)
        except asyncio.CancelledError:
            call.add_done_callback(lambda done: self._undo(done, lease))
            raise
        except ServiceUnavailable:
            # Redis may have granted the lease and only the reply was lost: give it back (by
            # lease id, so nobody else's), or the key would stay busy for a whole TTL.
            self._release_later(lease)
            raise
        verdict = _VERDICTS[code]
        return verdict, (lease if verdict is AcquireResult.ACQUIRED else None)

    async def release(self, lease: Lease) -> bool:
        freed = await self._guarded("release", _RELEASE, [self._lease_key(lease.key_id)], [lease.lease_id])
        return freed == 1

    async def renew(self, lease: Lease) -> bool:
        kept = await self._guarded(
            "renew", _RENEW, [self._lease_key(lease.key_id), self._tombstone_key(lease.key_id)],
            [lease.lease_id, self.lease_ttl_ms],
        )
        return kept == 1

    async def revoke(self, key_id: str) -> None:
        try:
            await self._redis.set(self._tombstone_key(key_id), b"1", px=self.tombstone_ttl_ms)
        except (RedisError, OSError) as exc:
            raise _unavailable("revoke", exc) from exc

    async def restore(self, key_id: str) -> None:
        try:
            await self._redis.delete(self._tombstone_key(key_id))
        except (RedisError, OSError) as exc:
            raise _unavailable("restore", exc) from exc

    async def held(self, key_ids: list[str]) -> int:
        total = 0
        try:
            for start in range(0, len(key_ids), 500):  # EXISTS counts every named key that exists
                total += await self._redis.exists(*(self._lease_key(k) for k in key_ids[start:start + 500]))
        except (RedisError, OSError) as exc:
            raise _unavailable("held", exc) from exc
        return total

    async def close(self) -> None:
        if self._undoing:
            await asyncio.gather(*self._undoing, return_exceptions=True)
        await self._link.close()
        await self._redis.aclose()

    async def _guarded(self, op: str, script: str, keys: list[str], args: list[str | int | float]) -> int:
        # One quick retry when the connection failed (it may have been stale after a Redis
        # restart): every script is safe to run twice (acquire recognises its own lease id;
        # release and renew compare it). An error Redis answered is not retried.
        for attempt in (1, 2):
            try:
                return int(await self._link.script(_SHAS[script], script, keys, args))
            except ReplyError as exc:
                raise _unavailable(op, exc) from exc
            except LinkError as exc:
                if attempt == 2:
                    raise _unavailable(op, exc) from exc
                log.info("lease store connection failed during %s (%s); retrying once", op, exc)
        raise AssertionError("unreachable")

    def _undo(self, call: asyncio.Future[int], lease: Lease) -> None:
        if call.cancelled():
            return
        if call.exception() is not None or call.result() == 1:
            self._release_later(lease)

    def _release_later(self, lease: Lease) -> None:
        task = asyncio.ensure_future(self.release(lease))
        self._undoing.add(task)
        task.add_done_callback(self._undone)

    def _undone(self, task: asyncio.Task[bool]) -> None:
        self._undoing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("could not release an abandoned lease; it expires with its TTL: %s", task.exception())


def _unavailable(op: str, exc: BaseException) -> ServiceUnavailable:
    # Fail closed: without the lease store we cannot prove the key has no other request in
    # flight, so the request is refused (503) rather than admitted without a limit.
    log.warning("lease store unavailable during %s (%s: %s)", op, type(exc).__name__, exc)
    return ServiceUnavailable(
        "The concurrency store is unavailable; retry shortly.",
        code="lease_store_unavailable",
        headers={"Retry-After": "1"},
    )


def make_leases(redis_url: str | None, lease_ttl_s: float = _DEFAULT_LEASE_TTL_MS / 1000) -> Leases:
    """Redis leases when a URL is configured (any number of processes), else in-memory (one process)."""
    if redis_url:
        return RedisLeases(redis_url, lease_ttl_ms=int(lease_ttl_s * 1000))
    return MemoryLeases()
