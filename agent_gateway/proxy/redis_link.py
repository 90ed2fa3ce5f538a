"""One pipelined Redis connection for the lease scripts: every command issued in the same turn of
the event loop goes out in one write, and the replies are matched to their callers in order.

redis-py spends ~130 µs of the gateway's CPU on each lease command (a pooled connection taken and
given back, two timeouts, a write and a read each); two commands per request were a third of a
Redis-leased gateway's event loop. Here a command costs its encoding, a future and its share of
one write and one read.

Failure is never silent: a connection that breaks, or whose oldest command has waited past
`command_timeout_s`, is closed and every command waiting on it fails with `LinkError` (the
leases turn that into a 503: fail closed). The next command opens a new connection."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time
from collections import deque
from typing import Any, cast
from urllib.parse import unquote, urlsplit


class LinkError(Exception):
    """The command's fate is unknown (connection lost, timed out) or Redis answered an error."""


class ReplyError(LinkError):
    """Redis answered this command with an error (`-NOSCRIPT …`, `-READONLY …`)."""


def encode(*parts: bytes | str | int | float) -> bytes:
    """A command in RESP: an array of bulk strings."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _NeedMore(Exception):
    pass


class ReplyParser:
    """RESP2 replies from a byte stream: integers, simple strings, errors (as ReplyError values),
    bulk strings, nil and arrays."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[Any]:
        buffer = self._buffer + data if self._buffer else data
        replies, at = [], 0
        while at < len(buffer):
            try:
                reply, at = self._parse(buffer, at)
            except _NeedMore:
                break
            replies.append(reply)
        self._buffer = buffer[at:]
        return replies

    def _parse(self, buffer: bytes, at: int) -> tuple[Any, int]:
        end = buffer.find(b"\r\n", at)
        if end < 0:
            raise _NeedMore
        kind, line = buffer[at:at + 1], buffer[at + 1:end]
        at = end + 2
        if kind == b":":
            return int(line), at
        if kind == b"+":
            return line.decode(), at
        if kind == b"-":
            return ReplyError(line.decode("utf-8", "replace")), at
        if kind == b"$":
            size = int(line)
            if size < 0:
                return None, at
            if len(buffer) < at + size + 2:
                raise _NeedMore
            return buffer[at:at + size], at + size + 2
        if kind == b"*":
            count = int(line)
            if count < 0:
                return None, at
            items = []
            for _ in range(count):
                item, at = self._parse(buffer, at)
                items.append(item)
            return items, at
        raise ValueError(f"not a RESP reply: {buffer[at - len(line) - 3:at]!r}")


class _Protocol(asyncio.Protocol):
    def __init__(self, link: RedisLink) -> None:
        self.link = link
        self.parser = ReplyParser()
        self.transport: asyncio.Transport | None = None
        self.pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.outgoing: list[bytes] = []
        self.flush_scheduled = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses

    def data_received(self, data: bytes) -> None:
        try:
            replies = self.parser.feed(data)
        except ValueError as exc:
            self.fail(LinkError(f"garbled reply from Redis: {exc}"))
            return
        pending = self.pending
        for reply in replies:
            if not pending:
                self.fail(LinkError("a reply from Redis that no command asked for"))
                return
            future, _ = pending.popleft()
            if not future.done():  # its caller may have been cancelled; the order holds anyway
                if isinstance(reply, ReplyError):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(LinkError(f"the connection to Redis was lost ({exc or 'closed'})"))

    def send(self, command: bytes, loop: asyncio.AbstractEventLoop) -> asyncio.Future[Any]:
        future = loop.create_future()
        self.pending.append((future, time.monotonic()))
        self.outgoing.append(command)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            loop.call_soon(self.flush)
        return future

    def flush(self) -> None:
        self.flush_scheduled = False
        if self.outgoing and self.transport is not None and not self.closed:
            data = b"".join(self.outgoing) if len(self.outgoing) > 1 else self.outgoing[0]
            self.outgoing.clear()
            self.transport.write(data)

    def fail(self, exc: LinkError) -> None:
        if not self.closed:
            self.closed = True
            self.link.forget(self)
            if self.transport is not None:
                self.transport.abort()
        self.outgoing.clear()
        while self.pending:
            future, _ = self.pending.popleft()
            if not future.done():
                future.set_exception(exc)


class RedisLink:
    """Lazily connected; `call(*parts)` sends one command and waits for its reply."""

    def __init__(self, url: str, *, connect_timeout_s: float = 1.0, command_timeout_s: float = 1.0) -> None:
        self._target = _parse_url(url)
        self.connect_timeout_s = connect_timeout_s
        self.command_timeout_s = command_timeout_s
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._watchdog: asyncio.TimerHandle | None = None

    async def call(self, *parts: bytes | str | int | float) -> Any:
        protocol = self._protocol
        if protocol is None:
            protocol = await self._connect()
        return await protocol.send(encode(*parts), asyncio.get_running_loop())

    async def script(self, sha: str, source: str, keys: list[str], args: list[str | int | float]) -> Any:
        """EVALSHA, or EVAL when Redis does not know the script (restarted, SCRIPT FLUSH)."""
        try:
            return await self.call("EVALSHA", sha, len(keys), *keys, *args)
        except ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await self.call("EVAL", source, len(keys), *keys, *args)

    def forget(self, protocol: _Protocol) -> None:
        if self._protocol is protocol:
            self._protocol = None

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._protocol is not None:
            self._protocol.fail(LinkError("closed"))

    async def _connect(self) -> _Protocol:
        # Commands arriving while a connection is being opened wait for that one.
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
            self._connecting.add_done_callback(self._opened)
        return await asyncio.shield(self._connecting)

    def _opened(self, future: asyncio.Future[_Protocol]) -> None:
        self._connecting = None
        if not future.cancelled() and future.exception() is None:
            self._protocol = future.result()
            if self._watchdog is None:
                self._arm_watchdog()

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        target = self._target
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                if target["path"]:
                    _, protocol = await loop.create_unix_connection(lambda: _Protocol(self), target["path"])
                else:
                    _, protocol = await loop.create_connection(
                        lambda: _Protocol(self), target["host"], target["port"], ssl=target["ssl"])
                setup = []
                if target["password"] is not None:
                    auth = [target["username"], target["password"]] if target["username"] else [target["password"]]
                    setup.append(protocol.send(encode("AUTH", *auth), loop))
                if target["db"]:
                    setup.append(protocol.send(encode("SELECT", target["db"]), loop))
                try:
                    for reply in setup:
                        await reply
                except BaseException:
                    protocol.fail(LinkError("the connection setup failed"))
                    raise
        except (OSError, TimeoutError) as exc:
            raise LinkError(f"could not connect to Redis: {type(exc).__name__}: {exc}") from exc
        return protocol

    def _arm_watchdog(self) -> None:
        loop = asyncio.get_running_loop()
        self._watchdog = loop.call_later(min(0.25, self.command_timeout_s / 2), self._check)

    def _check(self) -> None:
        """One timer for every command: the oldest one waiting too long condemns the connection."""
        protocol = self._protocol
        if protocol is not None and protocol.pending:
            _, sent = protocol.pending[0]
            if time.monotonic() - sent > self.command_timeout_s:
                protocol.fail(LinkError(f"Redis did not answer within {self.command_timeout_s:g} s"))
        self._arm_watchdog()


def script_sha(source: str) -> str:
    return hashlib.sha1(source.encode()).hexdigest()


def _parse_url(url: str) -> dict[str, Any]:
    """redis://[[user]:password@]host[:port][/db], rediss://… (TLS), unix:///path[?db=N]."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r}")
    query = dict(item.partition("=")[::2] for item in parts.query.split("&") if item)
    db = query.get("db") or (parts.path.lstrip("/") if parts.scheme != "unix" else "") or "0"
    return {
        "host": parts.hostname or "localhost",
        "port": parts.port or 6379,
        "path": parts.path if parts.scheme == "unix" else None,
        "ssl": ssl.create_default_context() if parts.scheme == "rediss" else None,
        "username": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password is not None else None,
        "db": int(db),
    }
