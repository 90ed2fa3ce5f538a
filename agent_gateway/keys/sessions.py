"""Dashboard sign-in sessions, kept in the database so that sign-out and key revocation end them in
every gateway process at once: start one, find the live one behind a cookie, end one or all of a key's."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import delete, or_, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from agent_gateway.clock import Clock, as_utc
from agent_gateway.db.engine import Database, rows_changed
from agent_gateway.db.models import Account, DashboardSession, ManagementKey, new_id

log = logging.getLogger(__name__)


async def start_session(db: Database, account_id: str, management_key_id: str, now: datetime,
                        ttl: timedelta) -> DashboardSession:
    row = DashboardSession(id=new_id("dses"), account_id=account_id, management_key_id=management_key_id,
                           created_at=now, expires_at=now + ttl)
    async with db.transaction() as session:
        session.add(row)
    log.info("dashboard session started id=%s account=%s", row.id, account_id)
    return row


async def find_live_session(db: Database, clock: Clock, session_id: str) -> tuple[Account, str] | None:
    """The account and management key id behind a session, or None when the session was ended,
    has expired, or its key was revoked."""
    async with db.transaction() as session:
        row = (
            await session.execute(
                select(DashboardSession, ManagementKey.revoked_at, Account)
                .join(ManagementKey, col(ManagementKey.id) == col(DashboardSession.management_key_id))
                .join(Account, col(Account.id) == col(DashboardSession.account_id))
                .where(col(DashboardSession.id) == session_id)
            )
        ).first()
    if row is None:
        return None
    dashboard_session, key_revoked_at, account = row
    if (dashboard_session.ended_at is not None or key_revoked_at is not None or account.disabled_at is not None
            or as_utc(dashboard_session.expires_at) <= clock.now()):
        return None
    return account, dashboard_session.management_key_id


async def end_session(db: Database, clock: Clock, session_id: str) -> None:
    async with db.transaction() as session:
        await session.execute(
            update(DashboardSession)
            .where(col(DashboardSession.id) == session_id, col(DashboardSession.ended_at).is_(None))
            .values(ended_at=clock.now())
        )
    log.info("dashboard session ended id=%s", session_id)


async def end_key_sessions(session: AsyncSession, management_key_id: str, now: datetime) -> None:
    """End every session signed in with a key, inside the caller's transaction (the revocation's)."""
    await session.execute(
        update(DashboardSession)
        .where(col(DashboardSession.management_key_id) == management_key_id,
               col(DashboardSession.ended_at).is_(None))
        .values(ended_at=now)
    )


async def delete_stale_sessions(db: Database, before: datetime) -> int:
    """Forget dashboard sessions that expired or were ended before `before`: their cookies are
    refused either way (no row is no session)."""
    async with db.transaction() as session:
        result = await session.execute(delete(DashboardSession).where(
            or_(col(DashboardSession.expires_at) < before, col(DashboardSession.ended_at) < before)))
    return rows_changed(result)
