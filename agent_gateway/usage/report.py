"""Usage reports: per key requests, tokens and errors over the last hour, day, 7 and 30 days."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

# sqlalchemy's select: its typed overloads take the five columns these reports read (sqlmodel's stop at four).
from sqlalchemy import case, func, select
from sqlmodel import col

from agent_gateway.db.engine import Database
from agent_gateway.db.models import UsageRecord

WINDOWS = {"1h": timedelta(hours=1), "24h": timedelta(days=1), "7d": timedelta(days=7), "30d": timedelta(days=30)}


def empty_usage() -> dict[str, dict[str, int]]:
    """A key's usage in every window, before it made any request."""
    return {w: empty_totals() for w in WINDOWS}


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
                    col(UsageRecord.api_key_id),
                    func.count(),
                    func.coalesce(func.sum(UsageRecord.prompt_tokens), 0),
                    func.coalesce(func.sum(UsageRecord.completion_tokens), 0),
                    func.coalesce(func.sum(case((col(UsageRecord.status_code) >= 400, 1), else_=0)), 0),
                )
                .where(col(UsageRecord.created_at) >= now - span)
                .group_by(UsageRecord.api_key_id)
            )
            if account_id is not None:
                query = query.where(col(UsageRecord.account_id) == account_id)
            if api_key_id is not None:
                query = query.where(col(UsageRecord.api_key_id) == api_key_id)
            for key_id, requests, prompt, completion, errors in await session.execute(query):
                result.setdefault(key_id, empty_usage())[window] = {
                    "requests": int(requests),
                    "promptTokens": int(prompt),
                    "completionTokens": int(completion),
                    "errors": int(errors),
                }
    return result


# --- time series for charts ---------------------------------------------------------------

BUCKET_SPANS = {"hour": timedelta(hours=1), "day": timedelta(days=1)}
_BUCKET_FORMATS = {"hour": ("%Y-%m-%d %H", "YYYY-MM-DD HH24"), "day": ("%Y-%m-%d", "YYYY-MM-DD")}


@dataclass(frozen=True)
class UsageBucket:
    """One UTC hour or day of one key's usage."""

    start: datetime
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def bucket_starts(now: datetime, bucket: str, count: int) -> list[datetime]:
    """The starts of `count` consecutive UTC hours or days, oldest first, the last one holding `now`."""
    now = now.astimezone(UTC)
    last = now.replace(minute=0, second=0, microsecond=0)
    if bucket == "day":
        last = last.replace(hour=0)
    step = BUCKET_SPANS[bucket]
    return [last - step * i for i in range(count - 1, -1, -1)]


async def usage_series(
    db: Database, now: datetime, *, account_id: str, bucket: str, count: int
) -> dict[str, list[UsageBucket]]:
    """key id -> `count` hourly or daily buckets ending with the current one; empty buckets are zeros."""
    starts = bucket_starts(now, bucket, count)
    python_format, postgres_format = _BUCKET_FORMATS[bucket]
    async with db.transaction() as session:
        if session.bind.dialect.name == "postgresql":  # type: ignore[union-attr]  # Database sessions are always bound
            label = func.to_char(func.timezone("UTC", UsageRecord.created_at), postgres_format)
        else:
            # SQLite keeps UTC timestamps as ISO text, which strftime reads directly.
            label = func.strftime(python_format, UsageRecord.created_at)
        query = (
            select(
                col(UsageRecord.api_key_id),
                label,
                func.count(),
                func.coalesce(func.sum(UsageRecord.prompt_tokens), 0),
                func.coalesce(func.sum(UsageRecord.completion_tokens), 0),
            )
            .where(col(UsageRecord.account_id) == account_id, col(UsageRecord.created_at) >= starts[0])
            .group_by(UsageRecord.api_key_id, label)
        )
        rows = list(await session.execute(query))
    position = {start.strftime(python_format): i for i, start in enumerate(starts)}
    result: dict[str, list[UsageBucket]] = {}
    for key_id, when, requests, prompt, completion in rows:
        index = position.get(when)
        if index is None:  # stamped after the current bucket (a clock ahead of ours)
            continue
        series = result.setdefault(key_id, [UsageBucket(start) for start in starts])
        series[index] = UsageBucket(starts[index], int(requests), int(prompt), int(completion))
    return result
