"""API keys (`sk_…`): one live key per subscription; mint, list, disable, enable, delete."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from agent_gateway.clock import Clock
from agent_gateway.db.engine import Database
from agent_gateway.db.models import ApiKey, KeyStatus, Subscription, SubscriptionStatus, new_id
from agent_gateway.errors import Conflict, InvalidRequest, NotFound
from agent_gateway.keys.tokens import API_KEY_PREFIX, IssuedToken, issue_token

log = logging.getLogger(__name__)


async def revoke_subscription_keys(session: AsyncSession, subscription_ids: list[str]) -> list[str]:
    """Revoke the subscriptions' keys inside the caller's transaction; returns their ids (the caller
    ends them everywhere after commit). The rows are locked in id order first: the usage writer
    locks key rows in that order too, and a bare multi-row UPDATE locks them in scan order, which
    could deadlock with a usage flush touching the same keys."""
    if not subscription_ids:
        return []
    key_ids = list((await session.execute(
        select(ApiKey.id).where(col(ApiKey.subscription_id).in_(subscription_ids), col(ApiKey.status) != KeyStatus.REVOKED)
        .order_by(col(ApiKey.id)).with_for_update()
    )).scalars())
    if key_ids:
        await session.execute(update(ApiKey).where(col(ApiKey.id).in_(key_ids)).values(status=KeyStatus.REVOKED))
    return key_ids


@dataclass(frozen=True)
class KeyView:
    key: ApiKey
    subscription: Subscription


def new_api_key(account_id: str, subscription_id: str, name: str, now: datetime) -> tuple[ApiKey, IssuedToken]:
    """An active API key row and its plaintext (shown once); the caller adds the row to its session."""
    token = issue_token(API_KEY_PREFIX)
    key = ApiKey(id=new_id("key"), account_id=account_id, subscription_id=subscription_id, name=name,
                 key_hash=token.key_hash, prefix=token.prefix, last_four=token.last_four, status=KeyStatus.ACTIVE,
                 created_at=now)
    return key, token


# A pledge's key can be minted (and disabled, enabled) before its pool is live; inference on it is
# refused with 403 pool_funding until the pool's activation starts its period.
_KEYED = (SubscriptionStatus.ACTIVE, SubscriptionStatus.PENDING)


async def mint_key(
    db: Database, clock: Clock, account_id: str, subscription_id: str, name: str
) -> tuple[KeyView, IssuedToken]:
    """Mint the subscription's key; the plaintext is returned once and never stored."""
    try:
        async with db.transaction() as session:
            subscription = await session.get(Subscription, subscription_id, with_for_update=True)
            if subscription is None or subscription.account_id != account_id:
                raise NotFound(f"No subscription {subscription_id!r}.", code="subscription_not_found")
            if subscription.status not in _KEYED:
                raise Conflict(
                    f"Subscription {subscription_id} is {subscription.status}; keys are minted for active subscriptions "
                    "and pledges.",
                    code="subscription_not_active",
                )
            existing = await session.execute(
                select(ApiKey.id).where(
                    col(ApiKey.subscription_id) == subscription_id, col(ApiKey.deleted_at).is_(None)
                )
            )
            if existing.first() is not None:
                raise _one_key_conflict(subscription_id)
            key, token = new_api_key(account_id, subscription_id, name, clock.now())
            session.add(key)
    except IntegrityError as exc:
        # Two mints raced past the check; the partial unique index let exactly one through.
        raise _one_key_conflict(subscription_id) from exc
    log.info("api key minted id=%s subscription=%s", key.id, subscription_id)
    return KeyView(key, subscription), token


async def list_keys(db: Database, account_id: str) -> list[KeyView]:
    async with db.transaction() as session:
        rows = await session.execute(
            select(ApiKey, Subscription)
            .join(Subscription, col(Subscription.id) == col(ApiKey.subscription_id))
            .where(col(ApiKey.account_id) == account_id, col(ApiKey.deleted_at).is_(None))
            .order_by(col(ApiKey.created_at))
        )
        return [KeyView(key, sub) for key, sub in rows]


async def disable_key(db: Database, account_id: str, key_id: str) -> KeyView:
    async with db.transaction() as session:
        key, subscription = await _owned_key(session, account_id, key_id)
        if key.status == KeyStatus.REVOKED:
            raise Conflict("This key was revoked when its subscription ended.", code="key_revoked")
        key.status = KeyStatus.DISABLED
        session.add(key)
    log.info("api key disabled id=%s", key_id)
    return KeyView(key, subscription)


async def enable_key(db: Database, account_id: str, key_id: str) -> KeyView:
    async with db.transaction() as session:
        key, subscription = await _owned_key(session, account_id, key_id)
        if key.status == KeyStatus.REVOKED or subscription.status not in _KEYED:
            raise Conflict(
                f"This key cannot be enabled: its subscription is {subscription.status}.",
                code="subscription_not_active",
            )
        key.status = KeyStatus.ACTIVE
        session.add(key)
    log.info("api key enabled id=%s", key_id)
    return KeyView(key, subscription)


async def delete_key(db: Database, clock: Clock, account_id: str, key_id: str) -> None:
    async with db.transaction() as session:
        key, _ = await _owned_key(session, account_id, key_id)
        # Soft delete: usage history keeps pointing at the row; the subscription may mint anew.
        key.deleted_at = clock.now()
        key.status = KeyStatus.REVOKED
        session.add(key)
    log.info("api key deleted id=%s", key_id)


def validate_key_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise InvalidRequest("name must be a string of 1 to 200 characters.", code="invalid_name")
    return name.strip()


async def _owned_key(session: AsyncSession, account_id: str, key_id: str) -> tuple[ApiKey, Subscription]:
    key = await session.get(ApiKey, key_id, with_for_update=True)
    if key is None or key.account_id != account_id or key.deleted_at is not None:
        raise NotFound(f"No API key {key_id!r}.", code="api_key_not_found")
    subscription = await session.get(Subscription, key.subscription_id)
    if subscription is None:  # the foreign key keeps it; never deleted
        raise RuntimeError(f"api key {key_id} has no subscription {key.subscription_id}")
    return key, subscription


def _one_key_conflict(subscription_id: str) -> Conflict:
    return Conflict(
        f"Subscription {subscription_id} already has a key; delete it before minting another.",
        code="subscription_has_key",
    )
