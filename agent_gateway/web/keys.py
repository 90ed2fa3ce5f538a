"""An `sk_` key as its holder sees it: whether it is admitted (the proxy's order of refusals) and
its plan (blocks, whether one is open now, expiry) with its usage."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from agent_gateway.web.catalog import funding_text, render_funding
from agent_gateway.web.rendering import iso
from agent_gateway.catalog.blocks import Block
from agent_gateway.catalog.pools import PoolStatus
from agent_gateway.db.models import KeyStatus, SubscriptionStatus
from agent_gateway.errors import AuthenticationError, PermissionDenied
from agent_gateway.proxy.directory import KeyRecord
from agent_gateway.services import Services
from agent_gateway.subscriptions.funding import pledged_seats
from agent_gateway.usage.report import empty_usage, usage_by_key


async def admitted_key(services: Services, token: str) -> KeyRecord:
    """The key behind `token` if it may be used now: unknown → 401, disabled/revoked/deleted or
    expired → 403, a pledge on a pool still funding → 403 pool_funding (the order the proxy refuses in)."""
    key = await services.directory.lookup(token)
    if key is None:
        raise AuthenticationError("Invalid API key.", code="invalid_api_key")
    if key.deleted:
        raise PermissionDenied("This API key was deleted.", code="key_revoked")
    if key.key_status == KeyStatus.DISABLED:
        raise PermissionDenied("This API key is disabled; enable it from the management API.", code="key_disabled")
    if key.subscription_status == SubscriptionStatus.PENDING:
        raise await pool_funding_error(services, key)
    if key.subscription_status != SubscriptionStatus.ACTIVE or key.period_end <= services.clock.now():
        raise PermissionDenied(
            f"The subscription behind this key ended on {iso(key.period_end)}; renew it to continue.",
            code="subscription_expired",
        )
    if key.key_status != KeyStatus.ACTIVE:
        raise PermissionDenied("This API key was revoked.", code="key_revoked")
    return key


async def pool_funding_error(services: Services, key: KeyRecord) -> PermissionDenied:
    """403 pool_funding for a pledge's key, with the round's progress. Not a 5xx, and marked not to
    be retried (`x-should-retry: false`, which the official SDKs obey): waiting seconds won't help."""
    pool = services.catalog.pool(key.pool_slug)
    headers = {"x-should-retry": "false"}
    if pool is None or pool.status not in (PoolStatus.FUNDING, PoolStatus.ACTIVATING):
        state = pool.status if pool else "withdrawn"
        return PermissionDenied(f"This key belongs to a pledge on pool {key.pool_slug}, which is {state}; its period "
                                "has not started and it serves no requests.", code="pool_funding", headers=headers,
                                extra={"pool": key.pool_slug, "poolStatus": state})
    pledged = (await pledged_seats(services.db, [pool.slug])).get(pool.slug, 0)
    return PermissionDenied(
        f"{funding_text(pool, pledged)}. This key's seat is a pledge: its period starts, in full, when the pool "
        "goes active, and requests are refused until then.",
        code="pool_funding", headers=headers,
        extra={"pool": pool.slug, "poolStatus": pool.status, "funding": render_funding(pool, pledged)},
    )


@dataclass(frozen=True)
class KeyPlan:
    key: KeyRecord
    blocks: list[Block]
    in_block_now: bool
    usage: dict[str, dict[str, int]]  # window → requests, promptTokens, completionTokens, errors


async def key_plan(services: Services, key: KeyRecord) -> KeyPlan:
    now: datetime = services.clock.now()
    usage = (await usage_by_key(services.db, now, api_key_id=key.key_id)).get(key.key_id, empty_usage())
    blocks = [services.catalog.blocks[b] for b in key.blocks if b in services.catalog.blocks]
    return KeyPlan(key, blocks, any(b.contains(now) for b in blocks), usage)
