"""The key directory: `sk_…` → what the proxy needs to admit a request, cached in process.

Only keys that are active on an active subscription are cached, for at most `ttl_s`; every
revocation drops the entry in every process (through the revocation bus) and writes a lease
tombstone, so a stale cache entry can never admit a revoked key (the acquire refuses it)."""

from __future__ import annotations

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

    async def lookup(self, plaintext: str) -> KeyRecord | None:
        key_hash = hash_token(plaintext)
        now = time.monotonic()
        cached = self._by_hash.get(key_hash)
        if cached is not None and cached[0] > now:
            return cached[1]
        record = await self._load(key_hash)
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
        return record

    def forget(self, key_id: str) -> None:
        key_hash = self._hash_of.pop(key_id, None)
        if key_hash is not None:
            self._by_hash.pop(key_hash, None)

    async def _load(self, key_hash: str) -> KeyRecord | None:
        async with self._db.transaction() as session:
            row = (
                await session.execute(
                    select(ApiKey, Subscription)
                    .join(Subscription, col(Subscription.id) == ApiKey.subscription_id)
                    .where(col(ApiKey.key_hash) == key_hash)
                )
            ).first()
        if row is None:
            return None
        key, sub = row
        return KeyRecord(
            key_id=key.id,
            name=key.name,
            account_id=key.account_id,
            subscription_id=sub.id,
            key_status=key.status,
            deleted=key.deleted_at is not None,
            subscription_status=sub.status,
            pool_slug=sub.pool_slug,
            blocks=tuple(sub.blocks),
            period_end=as_utc(sub.period_end),
            created_at=as_utc(key.created_at),
        )
