"""Expiry pass: subscriptions past their period end become `expired`, their seats free, their keys revoked."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import update
from sqlmodel import col

from agent_gateway.clock import Clock
from agent_gateway.db.engine import Database
from agent_gateway.db.models import Subscription, SubscriptionStatus
from agent_gateway.keys.api_keys import revoke_subscription_keys
from agent_gateway.subscriptions.inventory import release_subscription_seats

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
                .where(col(Subscription.status) == SubscriptionStatus.ACTIVE, col(Subscription.period_end) <= now)
                .values(status=SubscriptionStatus.EXPIRED)
                .returning(col(Subscription.id), col(Subscription.pool_slug), col(Subscription.blocks))
            )
        ).all()
        if not expired:
            return ExpiryResult([], [])
        ids = [row.id for row in expired]
        await release_subscription_seats(session, [(row.pool_slug, row.blocks) for row in expired])
        revoked = await revoke_subscription_keys(session, ids)
    for sub_id in ids:
        log.info("subscription expired id=%s", sub_id)
    for key_id in revoked:
        log.info("api key revoked id=%s reason=subscription_expired", key_id)
    return ExpiryResult(ids, list(revoked))
