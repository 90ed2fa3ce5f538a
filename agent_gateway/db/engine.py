"""The database adapter: URLs, the async engine, sessions and the SQLite locking policy."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

from sqlalchemy import event, text
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


# SQLite: how long a unit of work waits for the one writer connection (in this process) or for
# the file's write lock (held by another process), before it fails.
_SQLITE_WAIT_S = 30
# SQLite: connections for read-only units of work; each is a thread in aiosqlite.
SQLITE_READERS = 4


def create_engine(url: str) -> AsyncEngine:
    """The engine for units of work that may write. On SQLite: one connection, whose transactions
    begin with the write lock (BEGIN IMMEDIATE)."""
    if is_sqlite(url):
        # One connection: this process's writers queue for it in order, on the pool, instead of
        # polling for the write lock in SQLite's busy handler, which backs off up to 100 ms a try
        # and lets a steady writer (the usage flush) starve the others for seconds. The lock and
        # the busy timeout still serialize this process against others (the CLI, a second server).
        engine = create_async_engine(async_url(url), connect_args={"timeout": _SQLITE_WAIT_S},
                                     pool_size=1, max_overflow=0, pool_timeout=_SQLITE_WAIT_S)
        _configure_sqlite(engine, read_only=False)
        return engine
    return create_async_engine(async_url(url), pool_size=10, max_overflow=20, pool_pre_ping=True)


def create_read_engine(url: str) -> AsyncEngine | None:
    """On SQLite, a pool of read-only connections whose transactions take no lock: in WAL mode a
    reader sees the last committed state and neither waits for the writer nor blocks it. None
    elsewhere (PostgreSQL's readers never wait for writers; one pool serves both)."""
    if not is_sqlite(url):
        return None
    engine = create_async_engine(async_url(url), connect_args={"timeout": _SQLITE_WAIT_S},
                                 pool_size=SQLITE_READERS, max_overflow=0, pool_timeout=_SQLITE_WAIT_S)
    _configure_sqlite(engine, read_only=True)
    return engine


def _configure_sqlite(engine: AsyncEngine, *, read_only: bool) -> None:
    # SQLite's deferred transactions let two writers both read, then fail to upgrade their
    # locks ("database is locked") instead of waiting. BEGIN IMMEDIATE takes the write lock up
    # front, so concurrent writers queue and conditional updates stay atomic. A reader's
    # transaction is deferred (it takes a snapshot, no lock) and its connection is query_only,
    # so a write sent through it fails instead of racing the writer.
    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={_SQLITE_WAIT_S * 1000}")
        if read_only:
            cursor.execute("PRAGMA query_only=ON")
        cursor.close()

    begin = "BEGIN" if read_only else "BEGIN IMMEDIATE"

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql(begin)


class Database:
    """The engine plus a session factory; services open one transaction per unit of work."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_engine(url)
        self._sessions = async_sessionmaker(self.engine, class_=AsyncSession, expire_on_commit=False)
        self._read_engine = create_read_engine(url)
        self._read_sessions = self._sessions if self._read_engine is None else async_sessionmaker(
            self._read_engine, class_=AsyncSession, expire_on_commit=False)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A session whose work commits on success and rolls back on any exception."""
        async with self._sessions() as session, session.begin():
            yield session

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A session for a unit of work that only reads: one consistent snapshot that never waits
        for a writer, and a write through it fails (SQLite: "attempt to write a readonly
        database"; PostgreSQL: "cannot execute … in a read-only transaction")."""
        async with self._read_sessions() as session, session.begin():
            if self._read_engine is None:
                await session.execute(text("SET TRANSACTION READ ONLY"))
            yield session

    @asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[bool]:
        """Whether this process holds `name` against every other process on this database, for
        the block's duration; never waits (a holder elsewhere means False at once).

        PostgreSQL: a transaction-scoped advisory lock taken on a connection of its own, so it is
        released when the block ends however it ends, and with the connection if the process
        dies. The transaction only takes the lock: it holds no snapshot and no row. SQLite: one
        process serves a database file (several workers refuse it), so always True."""
        if self._read_engine is not None:
            yield True
            return
        async with self.engine.connect() as connection, connection.begin():
            held = (await connection.execute(text("SELECT pg_try_advisory_xact_lock(:key)"),
                                             {"key": lock_key(name)})).scalar_one()
            yield bool(held)

    async def warm_up(self) -> None:
        """On SQLite, open the pools' connections (a thread each) now, so the first requests after
        start do not pay for them. A PostgreSQL pool opens its connections as load asks for them:
        they count against the server's limit, which every process shares."""
        if self._read_engine is None:
            return
        for engine in (self.engine, self._read_engine):
            size = engine.pool.size()  # type: ignore[attr-defined]  # a QueuePool; every pool we create is one
            connections = [await engine.connect() for _ in range(size)]
            for connection in connections:
                await connection.close()

    async def dispose(self) -> None:
        await self.engine.dispose()
        if self._read_engine is not None:
            await self._read_engine.dispose()


def lock_key(name: str) -> int:
    """A name as a PostgreSQL advisory lock key (a signed 64-bit integer, the same in every process)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8, person=b"agw-lock").digest(), "big",
                          signed=True)


def rows_changed(result: Result[Any]) -> int:
    """The rows an UPDATE or DELETE touched. `execute` is typed as returning a Result, but for
    those statements SQLAlchemy returns a CursorResult, which carries the count."""
    return cast("CursorResult[Any]", result).rowcount
