"""Expiry pass: subscriptions past their period end become `expired`, their seats free, their keys revoked."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlmodel import col

from agent_gateway.clock import Clock
from agent_gateway.db.engine import Database
from agent_gateway.db.models import ApiKey, Subscription
from agent_gateway.subscriptions.inventory import release_seats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpiryResult:
    subscription_ids: list[str]
    revoked_key_ids: list[str]


async def expire_subscriptions(db: Database, clock: Clock) -> ExpiryResult:
    """One pass. The status flip is a single conditional UPDATE … RETURNING, so when several
    gateway processes run this at once each subscription is expired (and its seats freed) once."""
    now = clock.now()
    async with db.transaction() as session:
        expired = (
            await session.execute(
                update(Subscription)
                .where(Subscription.status == "active", col(Subscription.period_end) <= now)
                .values(status="expired")
                .returning(Subscription.id, Subscription.pool_slug, Subscription.blocks)
            )
        ).all()
        if not expired:
            return ExpiryResult([], [])
        ids = [row.id for row in expired]
        # Seats go back one (pool, block) row at a time, in the order buyers reserve them:
        # subscription by subscription, two blocks could be locked in the opposite order to a
        # buyer's and deadlock with it.
        freed = Counter((row.pool_slug, block) for row in expired for block in row.blocks)
        for (pool_slug, block), seats in sorted(freed.items()):
            await release_seats(session, pool_slug, [block], seats)
        # Lock the keys in id order before updating them: the usage writer locks key rows in
        # that order too, and a bare multi-row UPDATE locks them in scan order, which could
        # deadlock with a flush touching the same keys (expiring keys are often in use).
        revoked = (
            await session.execute(
                select(ApiKey.id)
                .where(col(ApiKey.subscription_id).in_(ids), ApiKey.status != "revoked")
                .order_by(col(ApiKey.id))
                .with_for_update()
            )
        ).scalars().all()
        if revoked:
            await session.execute(update(ApiKey).where(col(ApiKey.id).in_(revoked)).values(status="revoked"))
    for sub_id in ids:
        log.info("subscription expired id=%s", sub_id)
    for key_id in revoked:
        log.info("api key revoked id=%s reason=subscription_expired", key_id)
    return ExpiryResult(ids, list(revoked))
