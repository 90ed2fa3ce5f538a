"""The database adapter: URLs, the async engine, sessions and the SQLite locking policy."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

from sqlalchemy import event
from sqlalchemy.engine import CursorResult, Result, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

_ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+psycopg"}
_SYNC_DRIVERS = {"sqlite": "sqlite", "postgresql": "postgresql+psycopg"}


def _backend(url: str) -> str:
    url = url.replace("postgres://", "postgresql://", 1)
    return make_url(url).get_backend_name()


def async_url(url: str) -> str:
    url = url.replace("postgres://", "postgresql://", 1)
    return make_url(url).set(drivername=_ASYNC_DRIVERS[_backend(url)]).render_as_string(hide_password=False)


def sync_url(url: str) -> str:
    url = url.replace("postgres://", "postgresql://", 1)
    return make_url(url).set(drivername=_SYNC_DRIVERS[_backend(url)]).render_as_string(hide_password=False)


def is_sqlite(url: str) -> bool:
    return _backend(url) == "sqlite"


def create_engine(url: str) -> AsyncEngine:
    if is_sqlite(url):
        engine = create_async_engine(async_url(url), connect_args={"timeout": 30})
        _use_immediate_transactions(engine)
        return engine
    return create_async_engine(async_url(url), pool_size=10, max_overflow=20, pool_pre_ping=True)


def _use_immediate_transactions(engine: AsyncEngine) -> None:
    # SQLite's deferred transactions let two writers both read, then fail to upgrade their
    # locks ("database is locked") instead of waiting. BEGIN IMMEDIATE takes the write lock up
    # front, so concurrent writers queue on the busy timeout and conditional updates stay atomic.
    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


class Database:
    """The engine plus a session factory; services open one transaction per unit of work."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_engine(url)
        self._sessions = async_sessionmaker(self.engine, class_=AsyncSession, expire_on_commit=False)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A session whose work commits on success and rolls back on any exception."""
        async with self._sessions() as session, session.begin():
            yield session

    async def dispose(self) -> None:
        await self.engine.dispose()


def rows_changed(result: Result[Any]) -> int:
    """The rows an UPDATE or DELETE touched. `execute` is typed as returning a Result, but for
    those statements SQLAlchemy returns a CursorResult, which carries the count."""
    return cast("CursorResult[Any]", result).rowcount
