"""Pools after start: their durable states, reloading the pools file, and keeping every process's
catalog in step with the database.

The database holds the truth: `pool_states` (each pool's live status) and `catalog_versions` (the
pools files applied, whole). A process serves the newest applied file with the stored statuses. A
change made through one process reaches the others by a notification (Redis pub/sub, when
configured) and, should one be missed, by each process re-reading both every `poll_s` seconds."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy import func
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import col, select

from agent_gateway.admin import audit
from agent_gateway.catalog.pools import Catalog, CatalogError, Pool, PoolStatus, parse_catalog, read_pools_file
from agent_gateway.catalog.states import SeededPool, check_transition, reload_problems
from agent_gateway.clock import Clock
from agent_gateway.db.engine import Database
from agent_gateway.db.models import (
    ApiKey,
    CatalogVersion,
    KeyStatus,
    Payment,
    PaymentState,
    PoolState,
    SeatInventory,
    Subscription,
    SubscriptionStatus,
)
from agent_gateway.errors import Conflict, InvalidRequest, NotFound, ServiceUnavailable
from agent_gateway.keys.revocation import RevocationBus
from agent_gateway.money import format_usdc
from agent_gateway.proxy.leases import Leases
from agent_gateway.subscriptions.inventory import ensure_inventory

log = logging.getLogger(__name__)

# Runs inside the transition's transaction (session, slug, from, to, now): the funding lifecycle
# hangs its work on a state change here (start pledges' periods on `active`, refunds on `closed`),
# so the change and its consequences commit together.
TransitionHook = Callable[[AsyncSession, str, PoolStatus, PoolStatus, datetime], Awaitable[None]]
# Runs after the transition committed (slug, from, to): what must wait for the commit, such as
# ending revoked keys in every process. A failure is logged, never raised: the change stands.
CommittedHook = Callable[[str, PoolStatus, PoolStatus], Awaitable[None]]
_LIVE = (SubscriptionStatus.ACTIVE, SubscriptionStatus.PENDING)
_SETTLING = (PaymentState.RECEIVED, PaymentState.VERIFIED, PaymentState.RESERVED, PaymentState.BROADCAST,
             PaymentState.CONFIRMED)


class PoolsFileRefused(InvalidRequest):
    code = "pools_file_refused"


@dataclass(frozen=True)
class BlockReport:
    name: str
    hours_utc: str
    seats: int
    sold: int

    @property
    def left(self) -> int:
        return max(0, self.seats - self.sold)


@dataclass(frozen=True)
class PoolReport:
    pool: Pool
    file_status: PoolStatus
    blocks: list[BlockReport]
    in_flight: int | None  # None: the lease store (Redis) did not answer
    live_subscriptions: int
    pledged: int = 0  # seats pledged (pending subscriptions): the funding round's progress


@dataclass(frozen=True)
class ReloadResult:
    changed: bool
    version_sha256: str
    added: list[str]
    catalog: Catalog


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def summarize(catalog: Catalog) -> dict[str, Any]:
    """What an audit record keeps of a pools file: the sellable facts per pool."""
    return {slug: {"seats": p.seats, "models": list(p.models), "status": str(p.status),
                   "prices": {b: format_usdc(a) for b, a in p.prices_atomic.items()}}
            for slug, p in catalog.pools.items()}


def _before(previous: Any) -> dict[str, Any] | None:
    """The audit record's "before": the file that was applied until now (our own, once validated)."""
    if previous is None:
        return None
    try:
        pools = summarize(parse_catalog(previous.pools_toml, "the previous pools file"))
    except CatalogError:  # written by an older version with other rules: keep its fingerprint only
        pools = None
    return {"sha256": previous.sha256, "pools": pools}


class PoolAdmin:
    def __init__(self, db: Database, clock: Clock, catalog: Catalog, pools_file: Path, text: str,
                 leases: Leases, notifier: RevocationBus | None, poll_s: float) -> None:
        self.db = db
        self.clock = clock
        self.catalog = catalog  # the running catalog every service reads; updated in place
        self.pools_file = pools_file
        self._start_text = text
        self._file = catalog  # the applied file, with the file's statuses
        self._sha = _sha(text)
        self._statuses: dict[str, PoolStatus] = {}
        self._leases = leases
        self._notifier = notifier
        self._poll_s = poll_s
        self._poller: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[Any]] = set()
        self._refresh_lock = asyncio.Lock()
        self.transition_hooks: list[TransitionHook] = []
        self.committed_hooks: list[CommittedHook] = []

    # --- running -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Apply this process's pools file under the reload rules (a bad one stops the start, saying
        why), then follow the changes other processes make."""
        await self._apply(self._start_text, str(self.pools_file), actor="startup", reason="", at_start=True)
        if self._notifier is not None:
            self._notifier.subscribe(self._on_notice)
            await self._notifier.start()
        self._poller = asyncio.create_task(self._poll(), name="agw-catalog-poll")

    async def close(self) -> None:
        tasks = [t for t in (self._poller, *self._pending) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._notifier is not None:
            await self._notifier.close()

    def _on_notice(self, _version: str, _reason: str) -> None:
        task = asyncio.create_task(self._refresh_logged())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            await self._refresh_logged()

    async def _refresh_logged(self) -> None:
        try:
            await self.refresh()
        except Exception as exc:  # a database hiccup must not end the follower; the next poll retries
            log.warning("could not refresh the catalog from the database (%s: %s); retrying at the next poll",
                        type(exc).__name__, exc)

    async def _announce(self, reason: str) -> None:
        if self._notifier is None:
            return
        try:
            await self._notifier.publish(self._sha, reason)
        except Exception:  # the change is committed; the other processes' polls pick it up
            log.warning("catalog change not announced (%s); other processes poll for it", reason)

    async def refresh(self) -> bool:
        """Serve the newest applied file with the stored statuses; True when anything changed."""
        async with self._refresh_lock:
            async with self.db.transaction() as session:
                latest = (await session.execute(
                    select(CatalogVersion.id, CatalogVersion.sha256).order_by(col(CatalogVersion.id).desc()).limit(1)
                )).first()
                text = None
                if latest is not None and latest.sha256 != self._sha:
                    text = (await session.get(CatalogVersion, latest.id)).pools_toml  # type: ignore[union-attr]
                rows = (await session.execute(select(PoolState.pool_slug, PoolState.status))).all()
            statuses = {slug: PoolStatus(status) for slug, status in rows}
            if text is None and statuses == self._statuses:
                return False
            if text is not None and latest is not None:
                self._file = parse_catalog(text, f"catalog version {latest.id}")
                self._sha = latest.sha256
            self._statuses = statuses
            self.catalog.adopt(self._file.with_statuses(statuses))
            log.info("catalog refreshed: version %s, %d pools (%s)", self._sha[:12], len(self.catalog.pools),
                     ", ".join(f"{s} {p.status}" for s, p in self.catalog.pools.items()))
            return True

    # --- reload ------------------------------------------------------------------------------

    async def reload(self, actor: str, reason: str = "") -> ReloadResult:
        """Re-read AGW_POOLS_FILE and apply it in every process, or change nothing and say why."""
        try:
            text = read_pools_file(self.pools_file)
        except CatalogError as exc:
            raise PoolsFileRefused(str(exc), code="invalid_pools_file") from None
        return await self._apply(text, str(self.pools_file), actor=actor, reason=reason, at_start=False)

    async def _apply(self, text: str, source: str, *, actor: str, reason: str, at_start: bool) -> ReloadResult:
        try:
            catalog = parse_catalog(text, source)
        except CatalogError as exc:
            raise PoolsFileRefused(str(exc), code="invalid_pools_file") from None
        sha = _sha(text)
        now = self.clock.now()
        async with self.db.transaction() as session:
            # Locked: a concurrent reload waits, and no seat is sold between the check and the commit
            # (by this database's rows; see docs/decisions.md for processes still on the old file).
            states = list(await session.scalars(select(PoolState).order_by(col(PoolState.pool_slug)).with_for_update()))
            held = {(r.pool_slug, r.block): r.seats_held for r in await session.scalars(
                select(SeatInventory).order_by(col(SeatInventory.pool_slug), col(SeatInventory.block))
                .with_for_update())}
            in_use = {(slug, block) for slug, blocks in (await session.execute(
                select(Subscription.pool_slug, Subscription.blocks).where(col(Subscription.status).in_(_LIVE))
            )).all() for block in blocks}
            # A payment still on its way will reserve and deliver seats of its pool and blocks.
            in_use |= {(slug, block) for slug, blocks in (await session.execute(
                select(Payment.pool_slug, Payment.blocks).where(col(Payment.state).in_(_SETTLING))
            )).all() for block in blocks}
            seeded = {s.pool_slug: SeededPool(PoolStatus(s.status), PoolStatus(s.file_status)) for s in states}
            problems = reload_problems(catalog, seeded, held, in_use)
            if problems:
                raise PoolsFileRefused(f"{source}: refused, nothing changed: " + "; ".join(problems),
                                       extra={"problems": problems})
            added = [slug for slug in catalog.pools if slug not in seeded]
            if added:
                # Processes starting together on a new database all seed: the first row wins, the
                # others' inserts do nothing (and they seed from the same file).
                dialect = session.bind.dialect.name  # type: ignore[union-attr]  # sessions are always bound
                insert = pg_insert if dialect == "postgresql" else sqlite_insert
                await session.execute(insert(PoolState).values([
                    {"pool_slug": slug, "status": catalog.pools[slug].status,
                     "file_status": catalog.pools[slug].status, "updated_at": now} for slug in added
                ]).on_conflict_do_nothing())
            previous = (await session.execute(select(CatalogVersion.sha256, CatalogVersion.pools_toml)
                                              .order_by(col(CatalogVersion.id).desc()).limit(1))).first()
            latest = previous.sha256 if previous is not None else None
            changed = latest != sha
            if changed:
                session.add(CatalogVersion(sha256=sha, pools_toml=text, source=source[:500], actor=actor,
                                           created_at=now))
            if not at_start or changed:
                audit.record(session, now, actor=actor, action="pools.reload", target="pools", reason=reason,
                             before=_before(previous),
                             after={"sha256": sha, "changed": changed, "added": added,
                                    "pools": summarize(catalog)})
        await ensure_inventory(self.db, catalog)
        await self.refresh()
        if changed or added:
            log.info("pools file applied by %s: %s (version %s, new pools: %s)", actor, source, sha[:12],
                     ", ".join(added) or "none")
            await self._announce("reload")
        return ReloadResult(changed=changed, version_sha256=sha, added=added, catalog=self.catalog)

    # --- states ------------------------------------------------------------------------------

    async def set_state(self, slug: str, target: str, actor: str, reason: str = "",
                        expected: PoolStatus | None = None) -> PoolStatus:
        """Move a pool to `target` along the allowed transitions (catalog.states), audited; with
        `expected`, only from that state (409 pool_state_changed otherwise: a background pass that
        judged the pool in one state never moves it from another)."""
        try:
            wanted = PoolStatus(target)
        except ValueError:
            raise InvalidRequest(f"status must be one of {', '.join(s.value for s in PoolStatus)}.",
                                 code="invalid_pool_status") from None
        now = self.clock.now()
        async with self.db.transaction() as session:
            row = await session.get(PoolState, slug, with_for_update=True)
            if row is None or slug not in self._file.pools:
                raise NotFound(f"No pool {slug!r}.", code="pool_not_found")
            current = PoolStatus(row.status)
            if expected is not None and current != expected:
                raise Conflict(f"Pool {slug} is {current}, no longer {expected}.", code="pool_state_changed")
            check_transition(slug, current, wanted)
            row.status, row.updated_at = wanted, now
            session.add(row)
            for hook in self.transition_hooks:
                await hook(session, slug, current, wanted, now)
            audit.record(session, now, actor=actor, action="pool.state", target=f"pool:{slug}", reason=reason,
                         before={"status": str(current)}, after={"status": str(wanted)})
        log.info("pool %s: %s -> %s by %s", slug, current, wanted, actor)
        for after in self.committed_hooks:
            try:
                await after(slug, current, wanted)
            except Exception:
                log.exception("pool %s: work after the transition %s -> %s failed", slug, current, wanted)
        await self.refresh()
        await self._announce("state")
        return wanted

    # --- the view ----------------------------------------------------------------------------

    async def report(self) -> list[PoolReport]:
        """Each pool: state, seats sold and left per block, requests in flight now, live seats."""
        catalog = self.catalog
        async with self.db.transaction() as session:
            held = {(r.pool_slug, r.block): r.seats_held for r in await session.scalars(select(SeatInventory))}
            keys = (await session.execute(
                select(Subscription.pool_slug, ApiKey.id)
                .join(Subscription, col(Subscription.id) == col(ApiKey.subscription_id))
                .where(col(ApiKey.status) == KeyStatus.ACTIVE, col(ApiKey.deleted_at).is_(None),
                       col(Subscription.status) == SubscriptionStatus.ACTIVE)
            )).all()
            counts = dict((await session.execute(
                select(Subscription.pool_slug, func.count()).where(col(Subscription.status).in_(_LIVE))
                .group_by(col(Subscription.pool_slug))
            )).all())
            pledged = dict((await session.execute(
                select(Subscription.pool_slug, func.count())
                .where(col(Subscription.status) == SubscriptionStatus.PENDING)
                .group_by(col(Subscription.pool_slug))
            )).all())
        by_pool: dict[str, list[str]] = defaultdict(list)
        for slug, key_id in keys:
            by_pool[slug].append(key_id)
        reports = []
        for slug, pool in catalog.pools.items():
            blocks = [BlockReport(name=b, hours_utc=catalog.blocks[b].label, seats=pool.seats,
                                  sold=held.get((slug, b), 0)) for b in pool.prices_atomic]
            file_pool = self._file.pool(slug)
            try:
                in_flight: int | None = await self._leases.held(by_pool.get(slug, []))
            except ServiceUnavailable:  # the rest of the view is still worth showing
                in_flight = None
            reports.append(PoolReport(pool=pool, file_status=file_pool.status if file_pool else pool.status,
                                      blocks=blocks, in_flight=in_flight, live_subscriptions=counts.get(slug, 0),
                                      pledged=pledged.get(slug, 0)))
        return reports
