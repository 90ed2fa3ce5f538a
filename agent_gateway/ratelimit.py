"""Attempt limits per client address: a sliding one-minute log, in memory (one process) or in Redis
(every process), for the unauthenticated writes that did not end in a delivery.

Three operations, each answering None (allowed) or the seconds until the address may try again:
`check` looks without counting, `take` counts only when allowed (atomically), `record` counts
unconditionally (an attempt that has already happened and failed).

Failed payment attempts are judged when they end, so `check` alone would let a burst of
concurrent attempts all pass before the first failure is recorded. Every limiter therefore also
caps the attempts one address has in flight in this process (`InFlight`): a burst is refused past
that cap, while paying agents behind one address are never limited unless that many of them are
paying at the same instant.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

WINDOW_S = 60.0
# In-process memory bound: this many addresses with recent attempts; past it the least recently
# inserted are forgotten (an attacker needs this many addresses to reset anyone's count).
MAX_ADDRESSES = 100_000


class InFlight:
    """Attempts per address running right now in this process, capped. `enter` is False past the cap."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._running: dict[str, int] = {}

    def enter(self, address: str) -> bool:
        running = self._running.get(address, 0)
        if running >= self.cap:
            return False
        self._running[address] = running + 1
        return True

    def leave(self, address: str) -> None:
        running = self._running.get(address, 0) - 1
        if running > 0:
            self._running[address] = running
        else:
            self._running.pop(address, None)


class AttemptLimiter(Protocol):
    limit: int
    in_flight: InFlight

    async def check(self, address: str) -> int | None: ...

    async def take(self, address: str) -> int | None: ...

    async def record(self, address: str) -> None: ...

    async def close(self) -> None: ...


class MemoryAttemptLimiter:
    """One process's attempt log: per address, the times of its last `limit` attempts."""

    def __init__(self, limit: int, *, in_flight_cap: int | None = None, window_s: float = WINDOW_S,
                 max_addresses: int = MAX_ADDRESSES, now: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.in_flight = InFlight(in_flight_cap or limit)
        self.window_s = window_s
        self.max_addresses = max_addresses
        self._now = now
        self._log: dict[str, deque[float]] = {}

    async def check(self, address: str) -> int | None:
        return self._retry_after(self._log.get(address), self._now())

    async def take(self, address: str) -> int | None:
        now = self._now()
        retry = self._retry_after(self._log.get(address), now)
        if retry is None:
            self._append(address, now)
        return retry

    async def record(self, address: str) -> None:
        self._append(address, self._now())

    async def close(self) -> None:
        self._log.clear()

    def _retry_after(self, times: deque[float] | None, now: float) -> int | None:
        if times is None:
            return None
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if len(times) < self.limit:
            return None
        # The deque keeps only the last `limit` attempts, so its oldest is the one to age out.
        return max(1, math.ceil(times[0] + self.window_s - now))

    def _append(self, address: str, now: float) -> None:
        times = self._log.get(address)
        if times is None:
            if len(self._log) >= self.max_addresses:
                self._forget_stale(now)
            times = self._log[address] = deque(maxlen=self.limit)
        times.append(now)

    def _forget_stale(self, now: float) -> None:
        stale = [a for a, t in self._log.items() if not t or t[-1] <= now - self.window_s]
        for address in stale:
            del self._log[address]
        # Still full of live addresses: drop the oldest tenth at once, so this sweep stays rare.
        excess = len(self._log) - self.max_addresses + max(1, self.max_addresses // 10)
        for address in list(self._log)[:max(0, excess)]:
            del self._log[address]


# KEYS[1]: the address's log, a sorted set of attempt ids scored by Redis's own clock (ms), so
# every process counts against one time. ARGV: window (ms), limit, member (a unique id),
# mode (0 check, 1 take, 2 record). Returns -1 when allowed, else the ms until it is.
_ATTEMPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window, limit, mode = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4])
-- forget attempts older than the window
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if mode ~= 2 and redis.call('ZCARD', KEYS[1]) >= limit then
  -- over the limit: the address may try again when its oldest kept attempt ages out
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return math.max(1, tonumber(oldest[2]) + window - now)
end
if mode ~= 0 then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  -- keep only the last `limit` attempts (bounded size) and let an idle address's key expire
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(limit + 1))
  redis.call('PEXPIRE', KEYS[1], window)
end
return -1
"""


class RedisAttemptLimiter:
    """The attempt log in Redis, shared by every gateway process.

    If Redis fails, the attempt is counted by this process alone (a per-process limit) rather than
    refused or let through unlimited: a Redis outage must not stop paying agents, and must not
    lift the limit either."""

    def __init__(self, redis_url: str, limit: int, *, in_flight_cap: int | None = None, prefix: str = "agw",
                 window_s: float = WINDOW_S, connect_timeout_s: float = 1.0, command_timeout_s: float = 1.0,
                 max_connections: int = 16, pool_wait_s: float = 2.0) -> None:
        self.limit = limit
        self.in_flight = InFlight(in_flight_cap or limit)
        self.prefix = prefix
        self._window_ms = int(window_s * 1000)
        pool = aioredis.BlockingConnectionPool.from_url(
            redis_url, max_connections=max_connections, timeout=pool_wait_s,
            socket_connect_timeout=connect_timeout_s, socket_timeout=command_timeout_s,
            retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=1),
        )
        self._redis = aioredis.Redis.from_pool(pool)
        self._script = self._redis.register_script(_ATTEMPT)
        self._fallback = MemoryAttemptLimiter(limit, window_s=window_s)
        self._warned_at = -math.inf

    async def check(self, address: str) -> int | None:
        return await self._run(address, 0)

    async def take(self, address: str) -> int | None:
        return await self._run(address, 1)

    async def record(self, address: str) -> None:
        await self._run(address, 2)

    async def close(self) -> None:
        await self._redis.aclose()

    async def _run(self, address: str, mode: int) -> int | None:
        try:
            retry_ms = int(await self._script(keys=[f"{self.prefix}:attempts:{address}"],
                                              args=[self._window_ms, self.limit, secrets.token_hex(8), mode]))
        except (RedisError, OSError) as exc:
            self._warn(exc)
            fallback = self._fallback
            return await (fallback.check, fallback.take, fallback.record)[mode](address)
        return None if retry_ms < 0 else max(1, math.ceil(retry_ms / 1000))

    def _warn(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned_at >= 60:
            self._warned_at = now
            log.warning("attempt limits: Redis unavailable (%s); counting in this process only", exc)


def make_attempt_limiter(redis_url: str | None, per_minute: int, in_flight_cap: int) -> AttemptLimiter:
    """Redis-shared limits when a URL is configured, else this process's own."""
    if redis_url:
        return RedisAttemptLimiter(redis_url, per_minute, in_flight_cap=in_flight_cap)
    return MemoryAttemptLimiter(per_minute, in_flight_cap=in_flight_cap)
