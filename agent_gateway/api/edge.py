"""ASGI middleware at the edge of the app: who the client is (forwarded headers, only from trusted
proxies) and how long its request body may take to arrive."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
from typing import Any

from agent_gateway.errors import RequestTimeout

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
    (waiting for a client disconnect during a stream) pass straight through."""

    def __init__(self, app: Any, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        body_done = False

        async def receive_in_time() -> Any:
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                body_done = True  # the error below ends the request; later reads pass through
                raise RequestTimeout(
                    f"The request body did not arrive within {self.timeout_s:g} s; send it in one go.",
                    headers={"Connection": "close"}) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await self.app(scope, receive_in_time, send)
