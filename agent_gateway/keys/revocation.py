"""Revoking keys everywhere at once: a lease tombstone refuses new requests in every process,
and the revocation bus tells every process to end the key's running streams and drop its cached record.

This is the one home of revocation. The tombstones are written through the small `Tombstones`
protocol (the proxy's leases implement it), so keys/ never imports the data plane."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable
from typing import Protocol

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from agent_gateway.errors import ServiceUnavailable

log = logging.getLogger(__name__)

Handler = Callable[[str, str], object]


class RevocationBus(Protocol):
    async def start(self) -> None: ...

    async def publish(self, key_id: str, reason: str) -> None:
        """Reach every process's handlers, this one's included."""
        ...

    def subscribe(self, handler: Handler) -> None:
        """handler(key_id, reason) is synchronous and runs in the event loop."""
        ...

    async def close(self) -> None: ...


def _deliver(handlers: list[Handler], key_id: str, reason: str) -> None:
    # One failing handler must not stop the others, nor kill a bus's reader task.
    for handler in handlers:
        try:
            handler(key_id, reason)
        except Exception:
            log.exception("revocation handler failed for key %s", key_id)


class LocalRevocationBus:
    """For a single process: publish calls the handlers directly."""

    def __init__(self) -> None:
        self._handlers: list[Handler] = []

    async def start(self) -> None:
        pass

    async def publish(self, key_id: str, reason: str) -> None:
        _deliver(self._handlers, key_id, reason)

    def subscribe(self, handler: Handler) -> None:
        self._handlers.append(handler)

    async def close(self) -> None:
        pass


class RedisRevocationBus:
    """Redis pub/sub on one channel, read by a background task that reconnects with backoff.

    Delivery is at most once: a process whose subscription is down when a revocation is published
    misses it. The tombstone still refuses that key's new requests there; only streams already
    running in that process go on until they end.
    """

    _MIN_BACKOFF_S = 0.1
    _MAX_BACKOFF_S = 5.0

    def __init__(
        self,
        redis_url: str,
        channel: str = "agw:revocations",
        *,
        connect_timeout_s: float = 1.0,
        start_timeout_s: float = 3.0,
        ping_interval_s: float = 10.0,
        client_name: str = "agw-revocations",
    ) -> None:
        self.channel = channel
        self._start_timeout_s = start_timeout_s
        self._ping_interval_s = ping_interval_s
        socket_timeout_s = max(connect_timeout_s, 2.0)
        # Publishing retries once (a pooled connection may be stale after a Redis restart; a
        # duplicate revocation is harmless). The subscriber never retries inside redis-py, so a
        # dropped subscription always reaches _listen, which logs it and reconnects with backoff.
        # A bounded pool that waits for a free connection (redis-py's default refuses the 101st
        # concurrent command), as for the leases.
        self._publisher = aioredis.Redis.from_pool(aioredis.BlockingConnectionPool.from_url(
            redis_url, max_connections=32, timeout=5.0,
            retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=1),
            client_name=client_name, socket_connect_timeout=connect_timeout_s, socket_timeout=socket_timeout_s,
        ))
        self._subscriber = aioredis.Redis.from_url(
            redis_url, retry=Retry(NoBackoff(), retries=0), client_name=client_name,
            socket_connect_timeout=connect_timeout_s, socket_timeout=socket_timeout_s,
        )
        self._handlers: list[Handler] = []
        self._subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def subscribed(self) -> bool:
        return self._subscribed.is_set()

    async def start(self) -> None:
        if self._task is not None:
            return
        self._task = asyncio.create_task(self._listen(), name="agw-revocation-bus")
        # Return only once Redis confirmed the subscription: a publish issued right after
        # start() would otherwise race the SUBSCRIBE and be lost.
        try:
            await asyncio.wait_for(self._subscribed.wait(), timeout=self._start_timeout_s)
        except TimeoutError as exc:
            await self._stop()
            raise ServiceUnavailable(
                f"Could not subscribe to {self.channel} within {self._start_timeout_s}s.",
                code="revocation_bus_unavailable",
            ) from exc

    async def publish(self, key_id: str, reason: str) -> None:
        payload = json.dumps({"keyId": key_id, "reason": reason})
        try:
            receivers = await self._publisher.publish(self.channel, payload)
        except (RedisError, OSError) as exc:
            log.warning("revocation bus publish failed for key %s (%s: %s)", key_id, type(exc).__name__, exc)
            raise ServiceUnavailable(
                "The revocation bus is unavailable; retry shortly.", code="revocation_bus_unavailable"
            ) from exc
        if receivers == 0:
            # Not even this process heard it: its own subscription is down right now.
            log.warning("revocation of key %s reached no subscriber on %s", key_id, self.channel)

    def subscribe(self, handler: Handler) -> None:
        self._handlers.append(handler)

    async def close(self) -> None:
        await self._stop()
        await self._publisher.aclose()
        await self._subscriber.aclose()

    async def _stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        backoff_s = self._MIN_BACKOFF_S
        dropped = False
        while True:
            pubsub = self._subscriber.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                last_heard = last_ping = loop.time()
                while True:
                    message = await pubsub.get_message(timeout=self._ping_interval_s)
                    now = loop.time()
                    if message is None:
                        # A half-open TCP connection never errors; only an unanswered ping shows it.
                        if now - last_heard > 3 * self._ping_interval_s:
                            raise RedisConnectionError("no reply to pings on the revocation channel")
                        if now - last_ping >= self._ping_interval_s:
                            await pubsub.ping()
                            last_ping = now
                        continue
                    last_heard = now
                    if message["type"] == "subscribe":
                        if dropped:
                            log.info("revocation bus resubscribed to %s", self.channel)
                        dropped, backoff_s = False, self._MIN_BACKOFF_S
                        self._subscribed.set()
                    elif message["type"] == "message":
                        self._dispatch(message["data"])
            except (RedisError, OSError) as exc:
                self._subscribed.clear()
                dropped = True
                log.warning("revocation bus connection lost (%s: %s); reconnecting in %.1fs", type(exc).__name__, exc, backoff_s)
            except Exception:
                # The reader must outlive surprises too: a dead reader silently stops revocations.
                self._subscribed.clear()
                dropped = True
                log.exception("revocation bus reader failed; reconnecting in %.1fs", backoff_s)
            finally:
                try:
                    await pubsub.aclose()
                except (RedisError, OSError):
                    pass
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, self._MAX_BACKOFF_S)

    def _dispatch(self, data: bytes) -> None:
        try:
            event = json.loads(data)
            key_id, reason = str(event["keyId"]), str(event["reason"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed revocation message on %s: %r", self.channel, data[:200])
            return
        _deliver(self._handlers, key_id, reason)


def make_revocation_bus(redis_url: str | None) -> RevocationBus:
    """Redis pub/sub when a URL is configured (any number of processes), else in-process."""
    if redis_url:
        return RedisRevocationBus(redis_url)
    return LocalRevocationBus()


RESTORED = "restored"


class Tombstones(Protocol):
    """Where a revoked key is marked so that every process's next acquire refuses it."""

    async def revoke(self, key_id: str) -> None: ...

    async def restore(self, key_id: str) -> None: ...


class KeyRevoker:
    def __init__(self, tombstones: Tombstones, bus: RevocationBus) -> None:
        self._tombstones = tombstones
        self._bus = bus

    async def revoke(self, key_ids: Iterable[str], reason: str) -> None:
        # Called after the database change committed: the tombstone covers the window in which
        # another process may still hold the key in its cache.
        for key_id in key_ids:
            await self._tombstones.revoke(key_id)
            await self._bus.publish(key_id, reason)
            log.info("api key revoked everywhere id=%s reason=%s", key_id, reason)

    async def restore(self, key_id: str) -> None:
        await self._tombstones.restore(key_id)
        await self._bus.publish(key_id, RESTORED)
