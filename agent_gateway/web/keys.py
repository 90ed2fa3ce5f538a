"""An `sk_` key as its holder sees it: whether it is admitted (the proxy's order of refusals) and
its plan (blocks, whether one is open now, expiry) with its usage."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from agent_gateway.web.rendering import iso
from agent_gateway.catalog.blocks import Block
from agent_gateway.db.models import KeyStatus, SubscriptionStatus
from agent_gateway.errors import AuthenticationError, PermissionDenied
from agent_gateway.proxy.directory import KeyRecord
from agent_gateway.services import Services
from agent_gateway.usage.report import empty_usage, usage_by_key


async def admitted_key(services: Services, token: str) -> KeyRecord:
    """The key behind `token` if it may be used now: unknown → 401, disabled/revoked/deleted or
    expired → 403 (the order the proxy refuses in)."""
    key = await services.directory.lookup(token)
    if key is None:
        raise AuthenticationError("Invalid API key.", code="invalid_api_key")
    if key.deleted:
        raise PermissionDenied("This API key was deleted.", code="key_revoked")
    if key.key_status == KeyStatus.DISABLED:
        raise PermissionDenied("This API key is disabled; enable it from the management API.", code="key_disabled")
    if key.subscription_status != SubscriptionStatus.ACTIVE or key.period_end <= services.clock.now():
        raise PermissionDenied(
            f"The subscription behind this key ended on {iso(key.period_end)}; renew it to continue.",
            code="subscription_expired",
        )
    if key.key_status != KeyStatus.ACTIVE:
        raise PermissionDenied("This API key was revoked.", code="key_revoked")
    return key


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
