"""Funding rounds: a funding pool whose pledges reach its goal moves to `activating`, and the operator
is told (the log, the `agw_pools_funded_total` metric, the console's pools view). The move is an
audited transition like any other, made by the actor `funding-goal`; marking the pool `active` stays
the operator's (the transition hook `subscriptions.funding.start_pledges` then starts every pledge).

A pledge triggers the check at once in the process that took it; the background jobs also check on
every pass (`AGW_JOB_INTERVAL_S`), which covers pledges delivered by the payment reconciler.

Deadlines (`close_overdue`, a background pass): a pool still `funding` at its `funding_deadline` is
closed by the actor `funding-deadline`; one left `activating` for its pools file's
`activation_days` (counted from the transition into `activating`, the pool state row's
`updated_at`) is closed by `activation-deadline`. Closing plans every pledge's refund in the
transition's transaction (the hook `payments.refunds.Refunds.on_pool_transition`)."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta

from sqlmodel import col, select

from agent_gateway.admin.pools import PoolAdmin
from agent_gateway.catalog.pools import PoolStatus
from agent_gateway.db.engine import Database
from agent_gateway.clock import as_utc
from agent_gateway.db.models import AuditRecord, PoolState
from agent_gateway.errors import Conflict
from agent_gateway.metrics import POOLS_CLOSED, POOLS_FUNDED
from agent_gateway.subscriptions.funding import pledged_seats

log = logging.getLogger(__name__)

ACTOR = "funding-goal"
FUNDING_DEADLINE_ACTOR = "funding-deadline"
ACTIVATION_DEADLINE_ACTOR = "activation-deadline"


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

    async def activation_deadlines(self) -> dict[str, datetime]:
        """Each activating pool's activation deadline: when it entered activating plus its
        `activation_days`."""
        pools = {p.slug: p for p in self._pools.catalog.pools.values() if p.status == PoolStatus.ACTIVATING}
        if not pools:
            return {}
        async with self._db.read() as session:
            rows = (await session.execute(
                select(PoolState.pool_slug, PoolState.status, PoolState.updated_at)
                .where(col(PoolState.pool_slug).in_(list(pools))))).all()
        return {slug: as_utc(since) + timedelta(days=pools[slug].activation_days)
                for slug, status, since in rows if status == PoolStatus.ACTIVATING}

    async def close_overdue(self) -> list[str]:
        """Close every funding pool past its funding deadline and every activating pool past its
        activation deadline (pledges refunded by the closing transition's hook); the slugs closed."""
        async with self._lock:
            now = self._pools.clock.now()
            due: list[tuple[str, PoolStatus, str, str, str]] = []
            for pool in self._pools.catalog.pools.values():
                if (pool.status == PoolStatus.FUNDING and pool.funding_deadline is not None
                        and pool.funding_deadline <= now):
                    due.append((pool.slug, PoolStatus.FUNDING, FUNDING_DEADLINE_ACTOR, "funding",
                                f"funding deadline {pool.funding_deadline.isoformat()} passed before the goal "
                                f"({pool.funding_goal} seats)"))
            for slug, deadline in (await self.activation_deadlines()).items():
                if deadline <= now:
                    due.append((slug, PoolStatus.ACTIVATING, ACTIVATION_DEADLINE_ACTOR, "activation",
                                f"activation deadline {deadline.isoformat()} passed without activation"))
            closed = []
            for slug, expected, actor, deadline_kind, reason in due:
                try:
                    await self._pools.set_state(slug, PoolStatus.CLOSED, actor=actor, reason=reason, expected=expected)
                except Conflict:  # moved meanwhile (the goal reached, the operator acted, another process)
                    continue
                POOLS_CLOSED.labels(slug, deadline_kind).inc()
                log.warning("pool %s closed: %s; its pledges are refunded", slug, reason)
                closed.append(slug)
            return closed
