"""Orders and quotes: which seats, for how long, at what price in USDC atomic units."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

from agent_gateway.catalog.pools import Catalog, Pool, PoolStatus
from agent_gateway.errors import Conflict, InvalidRequest, NotFound
from agent_gateway.money import format_usdc, round_atomic

MAX_QUANTITY = 100
# A month is the 30-day period prices are quoted for; a year is twelve of them at the
# pool's annual discount.
BILLING_CYCLES = {"month": (1, timedelta(days=30)), "year": (12, timedelta(days=360))}


@dataclass(frozen=True)
class Order:
    pool: Pool
    blocks: tuple[str, ...]
    quantity: int
    billing_cycle: str
    unit_price_atomic: int  # one seat, all chosen blocks, the whole cycle

    @property
    def total_atomic(self) -> int:
        return self.unit_price_atomic * self.quantity

    @property
    def period(self) -> timedelta:
        return BILLING_CYCLES[self.billing_cycle][1]

    def quote(self) -> dict:
        return {
            "pool": self.pool.slug,
            "blocks": list(self.blocks),
            "quantity": self.quantity,
            "billingCycle": self.billing_cycle,
            "periodDays": self.period.days,
            "currency": "USDC",
            "pricePerSeat": format_usdc(self.unit_price_atomic),
            "total": format_usdc(self.total_atomic),
            "totalAtomic": str(self.total_atomic),
        }


def make_order(
    catalog: Catalog, pool_slug: str, blocks: list[str], quantity: int, billing_cycle: str
) -> Order:
    """Validate what a buyer asked for against the catalog; raise a clear error otherwise."""
    pool = catalog.pool(pool_slug)
    if pool is None:
        raise NotFound(f"No pool {pool_slug!r}. See GET /api/pools.", code="pool_not_found")
    if not pool.status.sells:
        raise Conflict(f"Pool {pool_slug} is {pool.status} and sells no seats now.",
                       code="pool_paused" if pool.status == PoolStatus.PAUSED else "pool_not_selling")
    if not blocks:
        raise InvalidRequest("blocks must name at least one block.", code="invalid_blocks")
    if len(set(blocks)) != len(blocks):
        raise InvalidRequest("blocks must not repeat a block.", code="duplicate_blocks")
    for block in blocks:
        if block not in catalog.blocks:
            raise InvalidRequest(
                f"Unknown block {block!r}; blocks are {', '.join(catalog.blocks)}.", code="unknown_block"
            )
        if block not in pool.prices_atomic:
            raise InvalidRequest(
                f"Pool {pool_slug} does not sell the {block} block.", code="block_not_offered"
            )
    if not 1 <= quantity <= MAX_QUANTITY:
        raise InvalidRequest(f"quantity must be between 1 and {MAX_QUANTITY}.", code="invalid_quantity")
    if billing_cycle not in BILLING_CYCLES:
        raise InvalidRequest('billingCycle must be "month" or "year".', code="invalid_billing_cycle")
    months, _ = BILLING_CYCLES[billing_cycle]
    monthly = sum(pool.prices_atomic[b] for b in blocks)
    discount = pool.annual_discount if billing_cycle == "year" else Decimal(0)
    unit = round_atomic(Decimal(monthly * months) * (1 - discount))
    # Keep the blocks in the catalog's order so equal orders compare and display equally.
    ordered = tuple(b for b in catalog.blocks if b in blocks)
    return Order(pool, ordered, quantity, billing_cycle, unit)


def default_order(catalog: Catalog, available: dict[tuple[str, str], int]) -> Order:
    """What a bodyless order means: one seat on the cheapest block with a seat left of the first
    active pool that has one, for a month. `available` is (pool, block) -> seats left."""
    for pool in catalog.pools.values():
        if pool.status != PoolStatus.ACTIVE:
            continue
        open_blocks = [b for b, price in pool.prices_atomic.items() if available.get((pool.slug, b), 0) > 0]
        if open_blocks:
            cheapest = min(open_blocks, key=lambda b: pool.prices_atomic[b])
            return make_order(catalog, pool.slug, [cheapest], 1, "month")
    raise Conflict("No active pool has a seat left; see GET /api/pools.", code="sold_out")


def order_body(order: Order) -> dict:
    """The agent order body (POST /api/agent/subscribe-pool) that asks for `order`."""
    return {"pool": order.pool.slug, "blocks": list(order.blocks), "quantity": order.quantity,
            "billingCycle": order.billing_cycle}
