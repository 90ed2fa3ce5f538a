"""How the pool catalog looks in answers: for people (`/api/pools`, the dashboard) and for agents."""

from __future__ import annotations

from typing import Any

from agent_gateway.web.rendering import iso
from agent_gateway.catalog.pools import Catalog, Pool, PoolStatus
from agent_gateway.money import format_usdc
from agent_gateway.services import Services
from agent_gateway.subscriptions.funding import pledged_seats
from agent_gateway.subscriptions.inventory import seats_available

# Pools whose funding round is shown: taking pledges, or funded and waiting for the operator.
_IN_ROUND = (PoolStatus.FUNDING, PoolStatus.ACTIVATING)


def render_funding(pool: Pool, pledged: int) -> dict[str, Any] | None:
    """A pool's funding round as every face shows it (None once the pool is past it)."""
    if pool.status not in _IN_ROUND:
        return None
    return {"pledgedSeats": pledged, "goalSeats": pool.funding_goal,
            "progress": f"{pledged}/{pool.funding_goal}", "deadline": iso(pool.funding_deadline)}


def funding_text(pool: Pool, pledged: int) -> str:
    """One sentence on where a pool's round stands, for refusals and pages."""
    deadline = f" by {iso(pool.funding_deadline)}" if pool.funding_deadline else ""
    if pool.status == PoolStatus.ACTIVATING:
        return (f"Pool {pool.slug} reached its funding goal ({pledged}/{pool.funding_goal} seats pledged) and waits "
                "for the operator to activate it")
    return f"Pool {pool.slug} is funding: {pledged}/{pool.funding_goal} seats pledged of the goal{deadline}"


async def funding_now(services: Services) -> dict[str, int]:
    """Seats pledged per pool in a funding round (one query; none when no pool is in one)."""
    return await pledged_seats(services.db, [p.slug for p in services.catalog.pools.values() if p.status in _IN_ROUND])


def _block_status(available: int, seats: int) -> str:
    if available <= 0:
        return "sold-out"
    return "limited" if available <= max(1, seats // 10) else "available"


def render_pool(pool: Pool, catalog: Catalog, available: dict[tuple[str, str], int],
                pledged: dict[str, int] | None = None) -> dict:
    blocks = []
    for name, price in pool.prices_atomic.items():
        left = available.get((pool.slug, name), 0)
        blocks.append(
            {
                "block": name,
                "hoursUtc": catalog.blocks[name].label,
                "pricePerMonth": format_usdc(price),
                "seats": pool.seats,
                "availableSeats": left,
                "status": _block_status(left, pool.seats),
            }
        )
    return {
        "id": pool.slug,
        "slug": pool.slug,
        "name": pool.name,
        "description": pool.description,
        "models": list(pool.models),
        "status": pool.status,
        "seatsPerBlock": pool.seats,
        "annualDiscount": str(pool.annual_discount),
        "minPricePerMonth": format_usdc(min(pool.prices_atomic.values())),
        "blocks": blocks,
        "funding": render_funding(pool, (pledged or {}).get(pool.slug, 0)),
    }


async def pools_now(services: Services) -> list[dict]:
    """Every pool as /api/pools shows it, with the seats left in each block now."""
    available = await seats_available(services.db, services.catalog)
    pledged = await funding_now(services)
    return [render_pool(p, services.catalog, available, pledged) for p in services.catalog.pools.values()]


async def plans_catalog(services: Services) -> dict:
    """The catalog in the shape agents quote from (the reference service's `products`)."""
    catalog = services.catalog
    available = await seats_available(services.db, catalog)
    pledged = await funding_now(services)
    products: list[dict[str, Any]] = []
    for pool in catalog.pools.values():
        products.append(
            {
                "type": "subscription",
                "pool": pool.slug,
                "name": pool.name,
                "models": list(pool.models),
                "status": pool.status,
                "currency": "USDC",
                "duration": "30 days",
                "annualDiscount": str(pool.annual_discount),
                "blocks": [
                    {
                        "block": name,
                        "hoursUtc": catalog.blocks[name].label,
                        "priceUsdc": format_usdc(price),
                        "availableSeats": available.get((pool.slug, name), 0),
                    }
                    for name, price in pool.prices_atomic.items()
                ],
                # A seat bought on a funding pool is a pledge: its 30 days start when the pool goes active.
                "funding": render_funding(pool, pledged.get(pool.slug, 0)),
            }
        )
        if services.payments.enabled:  # never point agents at a payment path that is switched off
            products[-1]["agentCheckout"] = {
                "endpoint": "/api/agent/subscribe-pool",
                "method": "POST",
                "body": {"pool": pool.slug, "blocks": [next(iter(pool.prices_atomic))], "quantity": 1},
            }
    return {"currency": "USDC", "x402": services.payments.enabled, "products": products}
