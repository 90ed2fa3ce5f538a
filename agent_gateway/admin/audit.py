"""The audit log: every admin action with its actor, written in the transaction of the change."""

from __future__ import annotations

import re
import secrets
import time
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from agent_gateway.db.engine import Database
from agent_gateway.db.models import AuditRecord
from agent_gateway.errors import InvalidRequest

# A person's or a tool's name: letters, digits and . _ @ - + and inner spaces. No control
# characters or markup, so the log renders safely anywhere and cannot forge a line.
_ACTOR = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._@+ -]{0,62}[A-Za-z0-9._@+-])?$")
MAX_REASON = 500


def validate_actor(actor: str | None) -> str:
    """The actor an admin action names, or 400: every action is recorded under someone's name."""
    if actor is None or not actor.strip():
        raise InvalidRequest("Name the actor of this admin action: the X-Admin-Actor header "
                             "(`--actor` or AGW_ADMIN_ACTOR with the CLI).", code="actor_required")
    actor = actor.strip()
    if not _ACTOR.match(actor):
        raise InvalidRequest("The actor must be 1 to 64 letters, digits, spaces or . _ @ + -, starting with a "
                             "letter or digit "
                             "(e.g. alice or ops@example.com).", code="invalid_actor")
    return actor


def validate_reason(reason: str | None, *, required: bool = False) -> str:
    reason = (reason or "").strip()
    if required and not reason:
        raise InvalidRequest("Give a reason; it is kept in the audit log.", code="reason_required")
    if len(reason) > MAX_REASON or any(ord(c) < 32 and c not in "\t" for c in reason):
        raise InvalidRequest(f"A reason is at most {MAX_REASON} characters on one line.", code="invalid_reason")
    return reason


def ordered_id() -> str:
    """Ids that sort in the order they were made (nanoseconds, then randomness): records written
    within one clock tick (or under a test's stopped clock) still list in order."""
    return f"aud_{time.time_ns():016x}{secrets.token_hex(6)}"


def record(session: AsyncSession, now: datetime, *, actor: str, action: str, target: str, reason: str = "",
           before: dict[str, Any] | None = None, after: dict[str, Any] | None = None) -> AuditRecord:
    """Add the record to the caller's transaction: it commits with the change, or neither does."""
    row = AuditRecord(id=ordered_id(), actor=actor, action=action, target=target[:120], reason=reason,
                      before=before, after=after, created_at=now)
    session.add(row)
    return row


async def list_records(db: Database, *, limit: int = 100, actor: str | None = None, target: str | None = None,
                       action: str | None = None, before_id: str | None = None) -> list[AuditRecord]:
    """Newest first; `before_id` pages on from a record."""
    query = select(AuditRecord)
    if actor:
        query = query.where(col(AuditRecord.actor) == actor)
    if target:
        query = query.where(col(AuditRecord.target) == target)
    if action:
        query = query.where(col(AuditRecord.action) == action)
    async with db.transaction() as session:
        if before_id:
            anchor = await session.get(AuditRecord, before_id)
            if anchor is not None:
                query = query.where((col(AuditRecord.created_at) < anchor.created_at)
                                    | ((col(AuditRecord.created_at) == anchor.created_at)
                                       & (col(AuditRecord.id) < anchor.id)))
        rows = await session.scalars(query.order_by(col(AuditRecord.created_at).desc(), col(AuditRecord.id).desc())
                                     .limit(limit))
        return list(rows)
