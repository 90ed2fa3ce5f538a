"""The usage recorder: the proxy hands it one event per request; it writes them in batches."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, insert, update

from agent_gateway.db.engine import Database
from agent_gateway.db.models import ApiKey, UsageRecord

log = logging.getLogger(__name__)
_USAGE_TABLE = UsageRecord.__table__  # type: ignore[attr-defined]  # SQLModel sets it on table models


@dataclass(frozen=True)
class UsageEvent:
    api_key_id: str
    account_id: str
    subscription_id: str
    endpoint: str
    model: str
    status_code: int
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    usage_source: str  # upstream | estimated | missing
    created_at: datetime


class UsageRecorder:
    """Buffers events in memory and writes them in one transaction per batch.

    `record` never touches the database, so the proxy's hot path stays free of writes; a failed
    write keeps the events for the next attempt, and `close` drains the buffer at shutdown."""

    def __init__(self, db: Database, *, flush_interval_s: float = 0.5, batch_size: int = 500,
                 max_buffer: int = 200_000) -> None:
        self._db = db
        self._buffer: deque[UsageEvent] = deque()
        self._flush_interval_s = flush_interval_s
        self._batch_size = batch_size
        self._max_buffer = max_buffer
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="agent-gateway-usage")

    def record(self, event: UsageEvent) -> None:
        if len(self._buffer) >= self._max_buffer:
            # The database has been down for a long while. Drop the new event, not the oldest:
            # a flush in flight is writing the oldest ones and removes them by count afterwards.
            log.error("usage buffer full (%d events); dropping this one", self._max_buffer)
            return
        self._buffer.append(event)
        if len(self._buffer) >= self._batch_size:
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._buffer)

    async def flush(self) -> int:
        """Write the events buffered when it is called; returns how many were written.

        Events recorded meanwhile wait for the next flush. Chasing them instead kept the writer
        busy without pause under steady traffic (a batch of a few events every few milliseconds,
        each its own transaction), holding SQLite's write lock nearly all the time."""
        written = 0
        async with self._lock:
            due = len(self._buffer)
            while written < due:
                batch = list(itertools.islice(self._buffer, min(self._batch_size, due - written)))
                await self._write(batch)
                for _ in batch:
                    self._buffer.popleft()
                written += len(batch)
        return written

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        while self._buffer:
            await self.flush()

    async def _loop(self) -> None:
        while not self._closing:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self._flush_interval_s)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
            except Exception:
                log.exception("usage write failed; %d events kept for the next attempt", self.pending)

    async def _write(self, batch: list[UsageEvent]) -> None:
        last_used: dict[str, datetime] = {}
        for event in batch:
            if event.api_key_id not in last_used or event.created_at > last_used[event.api_key_id]:
                last_used[event.api_key_id] = event.created_at
        async with self._db.transaction() as session:
            # A Core insert into the table, not the ORM's bulk insert of the model (which maps
            # every row's attributes again): one executemany over plain dicts.
            await session.execute(insert(_USAGE_TABLE), [event.__dict__ for event in batch])
            # One executemany for every key's "last used", not one statement per key, in key id
            # order: every process then takes these row locks in the same global order, so two
            # processes flushing overlapping keys queue instead of deadlocking (as
            # subscriptions/inventory.py does for seat blocks). The insert above locks no key rows.
            keys = ApiKey.__table__  # type: ignore[attr-defined]  # SQLModel sets it on table models at class creation
            await session.execute(
                update(keys)
                .where(keys.c.id == bindparam("key_id"))
                .where(keys.c.last_used_at.is_(None) | (keys.c.last_used_at < bindparam("at")))
                .values(last_used_at=bindparam("at")),
                [{"key_id": key_id, "at": last_used[key_id]} for key_id in sorted(last_used)],
            )
