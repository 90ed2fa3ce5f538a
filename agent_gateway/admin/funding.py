"""Funding rounds: a funding pool whose pledges reach its goal moves to `activating`, and the operator
is told (the log, the `agw_pools_funded_total` metric, the console's pools view). The move is an
audited transition like any other, made by the actor `funding-goal`; marking the pool `active` stays
the operator's (the transition hook `subscriptions.funding.start_pledges` then starts every pledge).

A pledge triggers the check at once in the process that took it; the background jobs also check on
every pass (`AGW_JOB_INTERVAL_S`), which covers pledges delivered by the payment reconciler."""

from __future__ import annotations

import asyncio
import logging

from sqlmodel import col, select

from agent_gateway.admin.pools import PoolAdmin
from agent_gateway.catalog.pools import PoolStatus
from agent_gateway.db.engine import Database
from agent_gateway.db.models import AuditRecord
from agent_gateway.errors import Conflict
from agent_gateway.metrics import POOLS_FUNDED
from agent_gateway.subscriptions.funding import pledged_seats

log = logging.getLogger(__name__)

ACTOR = "funding-goal"


class FundingWatch:
    def __init__(self, db: Database, pools: PoolAdmin) -> None:
        self._db = db
        self._pools = pools
        self._lock = asyncio.Lock()

    async def pledged(self, slug: str) -> None:
        """Seats were just pledged on `slug`: move it to `activating` if that reached its goal. Never
        raises: the pledge is committed either way, and the next job pass checks again."""
        await self._check_logged(slug)

    async def _check_logged(self, slug: str | None) -> None:
        try:
            await self.check(slug)
        except Exception as exc:
            log.warning("funding goals not checked (%s: %s); the next job pass retries", type(exc).__name__, exc)

    async def check(self, slug: str | None = None) -> list[str]:
        """Move every funding pool (or just `slug`) whose pledges reached its goal to `activating`;
        the slugs moved. A pool whose activation the operator called off (`activating → funding`) is
        left to the operator: the goal was already reached once, and they chose to wait."""
        async with self._lock:
            pools = [p for p in self._pools.catalog.pools.values()
                     if p.status == PoolStatus.FUNDING and (slug is None or p.slug == slug)]
            if not pools:
                return []
            pledged = await pledged_seats(self._db, [p.slug for p in pools])
            due = [p for p in pools if pledged.get(p.slug, 0) >= p.funding_goal]
            if not due:
                return []
            called_off = await self._called_off([p.slug for p in due])
            moved = []
            for pool in due:
                if pool.slug in called_off:
                    continue
                seats = pledged.get(pool.slug, 0)
                try:
                    await self._pools.set_state(pool.slug, PoolStatus.ACTIVATING, actor=ACTOR,
                                                reason=f"funding goal reached: {seats}/{pool.funding_goal} seats pledged")
                except Conflict:  # another process moved it first, or the operator did
                    continue
                POOLS_FUNDED.labels(pool.slug).inc()
                log.warning("pool %s reached its funding goal (%d/%d seats pledged) and is now activating; "
                            "start it with `agent-gateway admin pool-state %s active` (every pledge's period "
                            "starts then)", pool.slug, seats, pool.funding_goal, pool.slug)
                moved.append(pool.slug)
            return moved

    async def _called_off(self, slugs: list[str]) -> set[str]:
        async with self._db.read() as session:
            rows = await session.scalars(
                select(AuditRecord).where(col(AuditRecord.action) == "pool.state",
                                          col(AuditRecord.target).in_([f"pool:{s}" for s in slugs])))
            return {r.target.removeprefix("pool:") for r in rows
                    if (r.before or {}).get("status") == PoolStatus.ACTIVATING
                    and (r.after or {}).get("status") == PoolStatus.FUNDING}
