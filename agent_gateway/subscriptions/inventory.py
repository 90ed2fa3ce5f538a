"""The seat inventory: per pool and block, seats held; reserving is one conditional UPDATE."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from sqlalchemy import update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import col, select
from sqlalchemy.ext.asyncio import AsyncSession

from agent_gateway.catalog.pools import Catalog
from agent_gateway.db.engine import Database, rows_changed
from agent_gateway.db.models import SeatInventory
from agent_gateway.errors import Conflict


async def ensure_inventory(db: Database, catalog: Catalog) -> None:
    """Create the missing inventory rows; safe when several processes start at once."""
    rows = [
        {"pool_slug": pool.slug, "block": block, "seats_held": 0}
        for pool in catalog.pools.values()
        for block in pool.prices_atomic
    ]
    if not rows:
        return
    async with db.transaction() as session:
        dialect = session.bind.dialect.name  # type: ignore[union-attr]  # Database sessions are always bound
        insert = pg_insert if dialect == "postgresql" else sqlite_insert
        await session.execute(insert(SeatInventory).values(rows).on_conflict_do_nothing())


async def reserve_seats(
    session: AsyncSession, catalog: Catalog, pool_slug: str, blocks: tuple[str, ...], quantity: int
) -> None:
    """Hold `quantity` seats in every block, or raise Conflict and hold none (the caller rolls back)."""
    capacity = catalog.pools[pool_slug].seats
    # A fixed lock order (sorted blocks) keeps two buyers of overlapping blocks from deadlocking.
    for block in sorted(blocks):
        result = await session.execute(
            update(SeatInventory)
            .where(
                col(SeatInventory.pool_slug) == pool_slug,
                col(SeatInventory.block) == block,
                col(SeatInventory.seats_held) + quantity <= capacity,
            )
            .values(seats_held=SeatInventory.seats_held + quantity)
        )
        if rows_changed(result) != 1:
            raise Conflict(
                f"Not enough seats left in the {block} block of pool {pool_slug} for {quantity} more.",
                code="sold_out",
            )


async def release_seats(
    session: AsyncSession, pool_slug: str, blocks: list[str], quantity: int = 1
) -> None:
    for block in sorted(blocks):
        await session.execute(
            update(SeatInventory)
            .where(col(SeatInventory.pool_slug) == pool_slug, col(SeatInventory.block) == block)
            .values(seats_held=SeatInventory.seats_held - quantity)
        )


async def release_subscription_seats(session: AsyncSession, subscriptions: Iterable[tuple[str, Iterable[str]]]) -> None:
    """Give back one seat per block for each (pool, blocks) subscription, one (pool, block) row at a
    time in the order buyers reserve them: freed subscription by subscription, two blocks could be
    locked in the opposite order to a buyer's and deadlock with it."""
    freed = Counter((pool_slug, block) for pool_slug, blocks in subscriptions for block in blocks)
    for (pool_slug, block), seats in sorted(freed.items()):
        await release_seats(session, pool_slug, [block], seats)


async def seats_available(db: Database, catalog: Catalog) -> dict[tuple[str, str], int]:
    """(pool, block) -> seats that can still be sold right now."""
    async with db.transaction() as session:
        held = {(r.pool_slug, r.block): r.seats_held for r in await session.scalars(select(SeatInventory))}
    return {
        (pool.slug, block): max(0, pool.seats - held.get((pool.slug, block), 0))
        for pool in catalog.pools.values()
        for block in pool.prices_atomic
    }
