"""Usage reports: per key requests, tokens and errors over the last hour, day, 7 and 30 days."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import case, func
from sqlmodel import col, select

from agent_gateway.db.engine import Database
from agent_gateway.db.models import UsageRecord

WINDOWS = {"1h": timedelta(hours=1), "24h": timedelta(days=1), "7d": timedelta(days=7), "30d": timedelta(days=30)}


def empty_totals() -> dict[str, int]:
    return {"requests": 0, "promptTokens": 0, "completionTokens": 0, "errors": 0}


async def usage_by_key(
    db: Database, now: datetime, *, account_id: str | None = None, api_key_id: str | None = None
) -> dict[str, dict[str, dict[str, int]]]:
    """key id -> window -> totals, for one account's keys or one key."""
    result: dict[str, dict[str, dict[str, int]]] = {}
    async with db.transaction() as session:
        for window, span in WINDOWS.items():
            query = (
                select(
                    UsageRecord.api_key_id,
                    func.count(),
                    func.coalesce(func.sum(UsageRecord.prompt_tokens), 0),
                    func.coalesce(func.sum(UsageRecord.completion_tokens), 0),
                    func.coalesce(func.sum(case((col(UsageRecord.status_code) >= 400, 1), else_=0)), 0),
                )
                .where(col(UsageRecord.created_at) >= now - span)
                .group_by(UsageRecord.api_key_id)
            )
            if account_id is not None:
                query = query.where(UsageRecord.account_id == account_id)
            if api_key_id is not None:
                query = query.where(UsageRecord.api_key_id == api_key_id)
            for key_id, requests, prompt, completion, errors in await session.execute(query):
                result.setdefault(key_id, {w: empty_totals() for w in WINDOWS})[window] = {
                    "requests": int(requests),
                    "promptTokens": int(prompt),
                    "completionTokens": int(completion),
                    "errors": int(errors),
                }
    return result
