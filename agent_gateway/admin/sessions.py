"""Operators' console sessions, kept in the database like customers' dashboard sessions: sign-out
ends one in every process at once (a copied cookie is worthless after it), and a session counts
only while the admin token it was opened with is still the one set."""

from __future__ import annotations

import hmac
import logging
from datetime import datetime, timedelta

from sqlalchemy import delete, or_, update
from sqlmodel import col

from agent_gateway.clock import Clock, as_utc
from agent_gateway.db.engine import Database, rows_changed
from agent_gateway.db.models import AdminSession, new_id

log = logging.getLogger(__name__)


async def start_admin_session(db: Database, actor: str, token_mark: str, now: datetime,
                              ttl: timedelta) -> AdminSession:
    row = AdminSession(id=new_id("asess"), actor=actor, token_mark=token_mark, created_at=now, expires_at=now + ttl)
    async with db.transaction() as session:
        session.add(row)
    log.info("admin session started id=%s actor=%s", row.id, actor)
    return row


async def find_live_admin_session(db: Database, clock: Clock, session_id: str, token_mark: str) -> str | None:
    """The actor of a live session, or None when it was ended, has expired, or was opened with
    another admin token."""
    async with db.transaction() as session:
        row = await session.get(AdminSession, session_id)
    if row is None or row.ended_at is not None or as_utc(row.expires_at) <= clock.now():
        return None
    if not hmac.compare_digest(row.token_mark.encode(), token_mark.encode()):
        return None
    return row.actor


async def end_admin_session(db: Database, clock: Clock, session_id: str) -> None:
    async with db.transaction() as session:
        await session.execute(update(AdminSession)
                              .where(col(AdminSession.id) == session_id, col(AdminSession.ended_at).is_(None))
                              .values(ended_at=clock.now()))
    log.info("admin session ended id=%s", session_id)


async def delete_stale_admin_sessions(db: Database, before: datetime) -> int:
    """Forget console sessions that expired or were ended before `before` (no row is no session)."""
    async with db.transaction() as session:
        result = await session.execute(delete(AdminSession).where(
            or_(col(AdminSession.expires_at) < before, col(AdminSession.ended_at) < before)))
    return rows_changed(result)
