"""ASGI middleware at the edge of the app: who the client is (forwarded headers, only from trusted
proxies), how long its request body may take to arrive, and the short way to the /v1 routes."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from agent_gateway.errors import GatewayError, RequestTimeout
from agent_gateway.web.rendering import render_error

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(value: str) -> tuple[Network, ...]:
    """`AGW_TRUSTED_PROXIES`: comma-separated IPs or CIDRs; ValueError names a bad entry."""
    networks = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or CIDR network") from None
    return tuple(networks)


class TrustForwardedHeaders:
    """Take the client address and scheme from X-Forwarded-For / X-Forwarded-Proto, but only
    when the peer is one of our trusted proxies; from anyone else they are ignored, so a client
    cannot choose the address its attempts are counted under.

    The client is the rightmost X-Forwarded-For entry that is not itself a trusted proxy (each
    proxy appends the peer it saw; entries left of the first untrusted one are the client's own
    claims). The scheme is the last X-Forwarded-Proto value, the one our nearest proxy set."""

    def __init__(self, app: Any, trusted: str) -> None:
        self.app = app
        self.networks = parse_networks(trusted)
        self._trusts = functools.lru_cache(maxsize=4096)(self._compute_trust)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            client = scope.get("client")
            if client and self._trusts(client[0]):
                self._apply(scope)
        await self.app(scope, receive, send)

    def _apply(self, scope: Any) -> None:
        forwarded_for: list[str] = []
        proto = None
        for name, value in scope["headers"]:
            if name == b"x-forwarded-for":
                forwarded_for.extend(value.decode("latin-1").split(","))
            elif name == b"x-forwarded-proto":
                proto = value.decode("latin-1").rsplit(",", 1)[-1].strip().lower()
        if proto in ("http", "https"):
            scope["scheme"] = proto
        if forwarded_for:
            host = self._client_of(forwarded_for)
            if host is not None:
                scope["client"] = (host, 0)

    def _client_of(self, entries: list[str]) -> str | None:
        host = None
        for entry in reversed(entries):
            host = _host_of(entry.strip())
            if host is None:
                return None  # a garbled entry from our own proxy's side: keep the peer
            if not self._trusts(host):
                return host
        return host  # every hop is a trusted proxy: the leftmost is the client

    def _compute_trust(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(ip in network for network in self.networks)


def _host_of(entry: str) -> str | None:
    """The IP of one X-Forwarded-For entry (`1.2.3.4`, `1.2.3.4:5678`, `[::1]:5678`, `::1`)."""
    if entry.startswith("["):
        entry = entry[1:].partition("]")[0]
    elif entry.count(":") == 1:
        entry = entry.partition(":")[0]
    try:
        return str(ipaddress.ip_address(entry))
    except ValueError:
        return None


class BodyDeadline:
    """The whole request body must arrive within `timeout_s` of the request's start, or reading it
    raises RequestTimeout (408 `body_timeout`, rendered like every GatewayError, and the
    connection is closed). Wrapping `receive` here covers every route, mounted apps included.

    Only reads of the body are timed: once its last chunk has arrived, later `receive` calls
    (waiting for a client disconnect during a stream) pass straight through. The deadline is
    enforced to the second (see _Deadlines), which keeps it to a few dict operations per request."""

    def __init__(self, app: Any, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s
        self._deadlines: _Deadlines | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadlines = self._deadlines
        if deadlines is None or deadlines.loop is not loop:
            deadlines = self._deadlines = _Deadlines(loop)
        second = math.ceil(loop.time() + self.timeout_s)
        body_done = False

        async def receive_in_time() -> Any:
            nonlocal body_done
            if body_done:
                return await receive()
            task = asyncio.current_task()
            waiting = deadlines.watch(task, second)
            try:
                message = await receive()
            except asyncio.CancelledError as exc:
                if not (exc.args and exc.args[0] is _BODY_LATE):
                    raise
                task.uncancel()  # type: ignore[union-attr]  # only our own deadline cancels it, so a task is running
                body_done = True  # the error below ends the request; later reads pass through
                raise RequestTimeout(
                    f"The request body did not arrive within {self.timeout_s:g} s; send it in one go.",
                    headers={"Connection": "close"}) from None
            finally:
                waiting.discard(task)
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await self.app(scope, receive_in_time, send)


_BODY_LATE = "request body deadline"


class _Deadlines:
    """The tasks waiting for a request body, grouped by the whole second (loop time) their
    deadline falls in, with one timer per second shared by every request in it; when it fires,
    the tasks still waiting are cancelled. An asyncio timeout per read cost ~6 µs a request (a
    timer armed and cancelled); this costs a set insert and discard."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._buckets: dict[int, set[asyncio.Task[Any] | None]] = {}

    def watch(self, task: asyncio.Task[Any] | None, second: int) -> set[asyncio.Task[Any] | None]:
        waiting = self._buckets.get(second)
        if waiting is None:
            waiting = self._buckets[second] = set()
            self.loop.call_at(second, self._expire, second)
        waiting.add(task)
        return waiting

    def _expire(self, second: int) -> None:
        for task in self._buckets.pop(second, ()):
            if task is not None and not task.done():
                task.cancel(_BODY_LATE)


Endpoint = Callable[[Request], Awaitable[Response]]


class DirectRoutes:
    """Exact-path POST routes answered without Starlette's router and exception middleware: the
    /v1 inference routes, on every request's path. Each one walked the route table (a regular
    expression per route), and two exception wrappers (each its own `send` closure) stood around
    every message the relay sends. Here a dictionary finds the endpoint and one `try` renders a
    GatewayError exactly as the app's handler does; anything else propagates to Starlette's
    ServerErrorMiddleware, which stands outside this middleware (the 500 handler, logged).

    Other methods and paths, and apps mounted under a root path, go to the router as before."""

    def __init__(self, app: Any, routes: Mapping[str, Endpoint]) -> None:
        self.app = app
        self.routes = dict(routes)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        endpoint = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if endpoint is None or scope["method"] != "POST" or scope.get("root_path"):
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive, send)
        try:
            response = await endpoint(request)
        except GatewayError as exc:
            response = render_error(exc)
        await response(scope, receive, send)
