"""How the pool catalog looks in answers: for people (`/api/pools`, the dashboard) and for agents."""

from __future__ import annotations

from typing import Any

from agent_gateway.catalog.pools import Catalog, Pool
from agent_gateway.money import format_usdc
from agent_gateway.services import Services
from agent_gateway.subscriptions.inventory import seats_available


def _block_status(available: int, seats: int) -> str:
    if available <= 0:
        return "sold-out"
    return "limited" if available <= max(1, seats // 10) else "available"


def render_pool(pool: Pool, catalog: Catalog, available: dict[tuple[str, str], int]) -> dict:
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
    }


async def pools_now(services: Services) -> list[dict]:
    """Every pool as /api/pools shows it, with the seats left in each block now."""
    available = await seats_available(services.db, services.catalog)
    return [render_pool(p, services.catalog, available) for p in services.catalog.pools.values()]


async def plans_catalog(services: Services) -> dict:
    """The catalog in the shape agents quote from (the reference service's `products`)."""
    catalog = services.catalog
    available = await seats_available(services.db, catalog)
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
            }
        )
        if services.payments.enabled:  # never point agents at a payment path that is switched off
            products[-1]["agentCheckout"] = {
                "endpoint": "/api/agent/subscribe-pool",
                "method": "POST",
                "body": {"pool": pool.slug, "blocks": [next(iter(pool.prices_atomic))], "quantity": 1},
            }
    return {"currency": "USDC", "x402": services.payments.enabled, "products": products}
