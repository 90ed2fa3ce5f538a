"""Pledges: seats bought on a pool that is still funding. A pledge is a `pending` subscription whose
period has not started; it starts, whole, when the operator marks the pool `active`."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import func, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from agent_gateway.catalog.pools import PoolStatus
from agent_gateway.catalog.pricing import BILLING_CYCLES
from agent_gateway.db.engine import Database, rows_changed
from agent_gateway.db.models import PoolState, Subscription, SubscriptionStatus

log = logging.getLogger(__name__)

# A seat delivered while its pool is in one of these states is a pledge (an `activating` pool is
# funded but not yet live; a `closed` one's pledges are the refund phase's to return).
_PLEDGING = (PoolStatus.FUNDING, PoolStatus.ACTIVATING, PoolStatus.CLOSED)


async def is_pledge(session: AsyncSession, pool_slug: str) -> bool:
    """Whether a seat delivered now on `pool_slug` is a pledge, from the pool's stored state.

    The state row is locked until the caller commits, so a purchase and the activation that starts
    every pledge never interleave: a pledge made while the pool activates either is seen by the
    activation or sees the pool active (docs/decisions.md "Funding pools")."""
    row = await session.get(PoolState, pool_slug, with_for_update=True)
    return row is not None and PoolStatus(row.status) in _PLEDGING


async def pledged_seats(db: Database, pool_slugs: Iterable[str]) -> dict[str, int]:
    """Seats pledged (pending subscriptions) per pool; pools with none are absent."""
    slugs = list(pool_slugs)
    if not slugs:
        return {}
    async with db.read() as session:
        rows = (await session.execute(
            select(Subscription.pool_slug, func.count())
            .where(col(Subscription.pool_slug).in_(slugs), col(Subscription.status) == SubscriptionStatus.PENDING)
            .group_by(col(Subscription.pool_slug))
        )).all()
    return {slug: count for slug, count in rows}


async def start_pledges(session: AsyncSession, slug: str, before: PoolStatus, after: PoolStatus,
                        now: datetime) -> None:
    """A pool state transition hook: on `active`, every pledge on the pool starts its full period now.

    Runs in the transition's transaction, so the pool is never active with pledges not started."""
    if after != PoolStatus.ACTIVE:
        return
    started = 0
    for cycle, (_, period) in BILLING_CYCLES.items():
        result = await session.execute(
            update(Subscription)
            .where(col(Subscription.pool_slug) == slug, col(Subscription.status) == SubscriptionStatus.PENDING,
                   col(Subscription.billing_cycle) == cycle)
            .values(status=SubscriptionStatus.ACTIVE, period_start=now, period_end=now + period)
        )
        started += rows_changed(result)
    if started:
        log.info("pool %s active (was %s): %d pledge(s) started their period at %s", slug, before, started,
                 now.isoformat())
