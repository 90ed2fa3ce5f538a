"""How subscriptions and keys look in /api answers (field by field: secrets can never leak)."""

from __future__ import annotations

from agent_gateway.web.rendering import iso
from agent_gateway.db.models import ApiKey, KeyStatus, ManagementKey, Subscription, SubscriptionStatus
from agent_gateway.keys.tokens import masked
from agent_gateway.money import format_usdc


def _started(sub: Subscription) -> bool:
    """A pledge (pending) has no period yet: it starts when its pool goes active."""
    return sub.status != SubscriptionStatus.PENDING


def render_subscription(sub: Subscription, key: ApiKey | None = None) -> dict:
    return {
        "id": sub.id,
        "pool": sub.pool_slug,
        "blocks": list(sub.blocks),
        "billingCycle": sub.billing_cycle,
        "status": sub.status,
        "price": format_usdc(sub.price_atomic),
        "currentPeriodStart": iso(sub.period_start) if _started(sub) else None,
        "currentPeriodEnd": iso(sub.period_end) if _started(sub) else None,
        "pledge": sub.status == SubscriptionStatus.PENDING,
        "paymentId": sub.payment_id,
        "hasKey": key is not None,
        "keyId": key.id if key else None,
        "createdAt": iso(sub.created_at),
    }


def render_key(key: ApiKey, sub: Subscription) -> dict:
    return {
        "id": key.id,
        "name": key.name,
        "keyPreview": masked(key.prefix, key.last_four),  # never the key: the plaintext is `apiKey`, once
        "prefix": key.prefix,
        "lastFour": key.last_four,
        "status": key.status,
        "isActive": key.status == KeyStatus.ACTIVE,
        "keyType": "subscription",
        "subscriptionId": sub.id,
        "subscriptionStatus": sub.status,
        "subscriptionExpiresAt": iso(sub.period_end) if _started(sub) else None,
        "pool": sub.pool_slug,
        "blocks": list(sub.blocks),
        "createdAt": iso(key.created_at),
        "lastUsedAt": iso(key.last_used_at),
    }


def render_management_key(key: ManagementKey) -> dict:
    return {
        "id": key.id,
        "name": key.name,
        "keyPreview": masked(key.prefix, key.last_four),  # never the key: the plaintext is `apiKey`, once
        "createdAt": iso(key.created_at),
        "lastUsedAt": iso(key.last_used_at),
    }
