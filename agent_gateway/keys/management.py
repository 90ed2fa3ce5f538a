"""Management keys (`mk_…`): authenticate a request's account, create, list and revoke."""

from __future__ import annotations

import logging
from datetime import datetime
from datetime import timedelta

from sqlalchemy import func, update
from sqlmodel import col, select

from agent_gateway.clock import Clock, as_utc
from agent_gateway.db.engine import Database
from agent_gateway.db.models import Account, ManagementKey, new_id
from agent_gateway.errors import AuthenticationError, Conflict, NotFound, PermissionDenied
from agent_gateway.keys.sessions import end_key_sessions
from agent_gateway.keys.tokens import (
    API_KEY_PREFIX,
    MANAGEMENT_KEY_PREFIX,
    IssuedToken,
    hash_token,
    issue_token,
)

log = logging.getLogger(__name__)

# last_used_at is informative; writing it on every call would turn each read into a write.
_LAST_USED_GRANULARITY = timedelta(minutes=1)


async def authenticate_management_key(db: Database, clock: Clock, plaintext: str) -> Account:
    if plaintext.startswith(API_KEY_PREFIX):
        raise PermissionDenied(
            "This endpoint needs a management key (mk_…); an API key (sk_…) only calls /v1 inference.",
            code="management_key_required",
        )
    if not plaintext.startswith(MANAGEMENT_KEY_PREFIX):
        raise AuthenticationError("The management key is not valid.", code="invalid_management_key")
    now = clock.now()
    async with db.transaction() as session:
        row = (
            await session.execute(
                select(ManagementKey, Account)
                .join(Account, col(Account.id) == col(ManagementKey.account_id))
                .where(col(ManagementKey.key_hash) == hash_token(plaintext))
            )
        ).first()
        if row is None or row[0].revoked_at is not None:
            raise AuthenticationError("The management key is not valid.", code="invalid_management_key")
        key, account = row
        if account.disabled_at is not None:
            raise PermissionDenied(f"Account {account.id} is disabled by the operator; contact them.",
                                   code="account_disabled")
        if key.last_used_at is None or now - as_utc(key.last_used_at) > _LAST_USED_GRANULARITY:
            await session.execute(
                update(ManagementKey).where(col(ManagementKey.id) == key.id).values(last_used_at=now)
            )
    return account


def new_management_key(account_id: str, name: str, now: datetime) -> tuple[ManagementKey, IssuedToken]:
    """A management key row and its plaintext (shown once); the caller adds the row to its session."""
    token = issue_token(MANAGEMENT_KEY_PREFIX)
    key = ManagementKey(id=new_id("mkey"), account_id=account_id, name=name, key_hash=token.key_hash,
                        prefix=token.prefix, last_four=token.last_four, created_at=now)
    return key, token


async def create_management_key(
    db: Database, clock: Clock, account_id: str, name: str
) -> tuple[ManagementKey, IssuedToken]:
    key, token = new_management_key(account_id, name, clock.now())
    async with db.transaction() as session:
        session.add(key)
    log.info("management key created id=%s account=%s", key.id, account_id)
    return key, token


async def list_management_keys(db: Database, account_id: str) -> list[ManagementKey]:
    async with db.transaction() as session:
        rows = await session.scalars(
            select(ManagementKey)
            .where(col(ManagementKey.account_id) == account_id, col(ManagementKey.revoked_at).is_(None))
            .order_by(col(ManagementKey.created_at))
        )
        return list(rows)


async def revoke_management_key(db: Database, clock: Clock, account_id: str, key_id: str) -> None:
    async with db.transaction() as session:
        # Lock the account row so two concurrent revocations cannot both see "two keys left".
        await session.execute(select(Account.id).where(col(Account.id) == account_id).with_for_update())
        key = await session.get(ManagementKey, key_id)
        if key is None or key.account_id != account_id or key.revoked_at is not None:
            raise NotFound(f"No management key {key_id!r}.", code="management_key_not_found")
        live = await session.scalar(
            select(func.count())
            .select_from(ManagementKey)
            .where(col(ManagementKey.account_id) == account_id, col(ManagementKey.revoked_at).is_(None))
        )
        if (live or 0) <= 1:  # COUNT(*) is never NULL; the driver's scalar is typed Optional
            raise Conflict(
                "This is the account's last management key; create another before revoking it.",
                code="last_management_key",
            )
        key.revoked_at = clock.now()
        session.add(key)
        await end_key_sessions(session, key.id, key.revoked_at)
    log.info("management key revoked id=%s account=%s", key_id, account_id)
