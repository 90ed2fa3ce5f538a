"""The key directory: `sk_…` → what the proxy needs to admit a request, cached in process.

Only keys that are active on an active subscription are cached, for at most `ttl_s`; every
revocation drops the entry in every process (through the revocation bus) and writes a lease
tombstone, so a stale cache entry can never admit a revoked key (the acquire refuses it).

Misses are read in batches: the first miss starts a read, and every miss that arrives while it
runs joins the next one (one `IN (…)` query), while a second request for a key already being read
waits for that read. Sixty-four new keys at once (a client fleet starting, or their entries
expiring together) cost two queries instead of sixty-four transactions queued on the pool."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlmodel import col

from agent_gateway.clock import as_utc
from agent_gateway.db.engine import Database
from agent_gateway.db.models import ApiKey, KeyStatus, Subscription, SubscriptionStatus
from agent_gateway.keys.tokens import hash_token

_NEGATIVE_TTL_S = 5.0
_MAX_ENTRIES = 200_000
_BATCH = 500  # key hashes per query, well under SQLite's 32,766 bound parameters


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    name: str
    account_id: str
    subscription_id: str
    key_status: KeyStatus
    deleted: bool
    subscription_status: SubscriptionStatus
    pool_slug: str
    blocks: tuple[str, ...]
    period_end: datetime
    created_at: datetime


class KeyDirectory:
    def __init__(self, db: Database, ttl_s: float = 60.0) -> None:
        self._db = db
        self._ttl_s = ttl_s
        self._by_hash: dict[str, tuple[float, KeyRecord | None]] = {}
        self._hash_of: dict[str, str] = {}  # key id -> hash, to forget by id
        self._reading: dict[str, asyncio.Future[KeyRecord | None]] = {}  # queued or being read
        self._queue: list[str] = []  # hashes for the next read
        self._reader: asyncio.Task[None] | None = None
        self._forgets = 0  # counts forget() calls, so a read that overlapped one caches nothing

    async def lookup(self, plaintext: str) -> KeyRecord | None:
        key_hash = hash_token(plaintext)
        cached = self._by_hash.get(key_hash)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        future = self._reading.get(key_hash)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            future.add_done_callback(_consume)
            self._reading[key_hash] = future
            self._queue.append(key_hash)
            if self._reader is None or self._reader.done():
                self._reader = asyncio.create_task(self._read_queue(), name="agent-gateway-key-directory")
        # Shielded: a caller that gives up must not cancel the read others are waiting for.
        return await asyncio.shield(future)

    def forget(self, key_id: str) -> None:
        self._forgets += 1
        key_hash = self._hash_of.pop(key_id, None)
        if key_hash is not None:
            self._by_hash.pop(key_hash, None)

    async def _read_queue(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[:_BATCH], self._queue[_BATCH:]
            forgets = self._forgets
            try:
                records = await self._load(batch)
            except Exception as exc:  # the database is down: these callers get the error, later ones retry
                for key_hash in batch:
                    self._reading.pop(key_hash).set_exception(exc)
                continue
            except BaseException:  # cancelled (shutdown): nobody may be left waiting on a read that won't come
                for key_hash in batch + self._queue:
                    self._reading.pop(key_hash).cancel()
                self._queue = []
                raise
            # A revocation during the read may predate the snapshot: answer from it, but keep nothing.
            keep = forgets == self._forgets
            now = time.monotonic()
            for key_hash in batch:
                record = records.get(key_hash)
                if keep:
                    self._remember(key_hash, record, now)
                self._reading.pop(key_hash).set_result(record)

    def _remember(self, key_hash: str, record: KeyRecord | None, now: float) -> None:
        if len(self._by_hash) >= _MAX_ENTRIES:
            self._by_hash.clear()
            self._hash_of.clear()
        if record is None:
            # Unknown keys are cached briefly so a flood of bad keys does not become a flood of reads.
            self._by_hash[key_hash] = (now + _NEGATIVE_TTL_S, None)
        elif (record.key_status == KeyStatus.ACTIVE and not record.deleted
              and record.subscription_status == SubscriptionStatus.ACTIVE):
            self._by_hash[key_hash] = (now + self._ttl_s, record)
            self._hash_of[record.key_id] = key_hash

    async def _load(self, key_hashes: list[str]) -> dict[str, KeyRecord]:
        # Columns, not entities: no ORM objects to build for a record that is only read.
        async with self._db.read() as session:
            rows = (
                await session.execute(
                    select(col(ApiKey.key_hash), col(ApiKey.id), col(ApiKey.name), col(ApiKey.account_id),
                           col(ApiKey.status), col(ApiKey.deleted_at), col(ApiKey.created_at),
                           col(Subscription.id), col(Subscription.status), col(Subscription.pool_slug),
                           col(Subscription.blocks), col(Subscription.period_end))
                    .join(Subscription, col(Subscription.id) == ApiKey.subscription_id)
                    .where(col(ApiKey.key_hash).in_(key_hashes))
                )
            ).all()
        return {
            key_hash: KeyRecord(
                key_id=key_id, name=name, account_id=account_id, subscription_id=subscription_id,
                key_status=KeyStatus(key_status), deleted=deleted_at is not None,
                subscription_status=SubscriptionStatus(subscription_status), pool_slug=pool_slug,
                blocks=tuple(blocks), period_end=as_utc(period_end), created_at=as_utc(created_at),
            )
            for (key_hash, key_id, name, account_id, key_status, deleted_at, created_at, subscription_id,
                 subscription_status, pool_slug, blocks, period_end) in rows
        }


def _consume(future: asyncio.Future[KeyRecord | None]) -> None:
    # Every caller may have given up before a read fails; the error was theirs, not the loop's.
    if not future.cancelled():
        future.exception()
