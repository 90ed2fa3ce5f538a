"""Serving the app: the checks before binding, the file-descriptor limit, and the uvicorn config
with its guarded HTTP protocol (header read deadline, connection bound)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from agent_gateway.metrics import CONNECTIONS_REFUSED, SLOW_HEADERS_CLOSED
from agent_gateway.settings import Settings

log = logging.getLogger(__name__)

# File descriptors kept free of client connections: the database pool, Redis, upstream
# connections, the listening socket, logs.
FD_RESERVE = 1_024


class ServeSettingsError(Exception):
    """A setting that makes `serve` refuse to start (the CLI exits with 2)."""


def check_serving_settings(settings: Settings) -> None:
    """Refuse settings that are only wrong once the gateway is reachable from other machines.

    Off loopback, sign-in messages, challenge resources and discovery documents need the URL
    clients really use; `http://0.0.0.0:8080` is not one (and the dashboard is always on)."""
    if settings.public_url is None and not is_loopback(settings.host):
        raise ServeSettingsError(
            f"AGW_PUBLIC_URL is required when serving on {settings.host} (not a loopback address): set it "
            f"to the URL clients use to reach the gateway, e.g. AGW_PUBLIC_URL=https://gateway.example.com")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: other machines may resolve it to us


def raise_fd_limit(max_connections: int, upstream_connections: int = 0) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit so thousands of streams fit; return the
    connection bound that the limit allows (max_connections, or less when descriptors are short).

    Every relayed stream holds two descriptors, its client's and its upstream's, so the pooled
    upstream connections are set aside before the client connections are counted."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + upstream_connections + FD_RESERVE
    target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
    bound = min(max_connections, max(16, soft - FD_RESERVE - upstream_connections))
    if bound < max_connections:
        log.warning("open-file limit %d (hard %s) allows %d client connections, under AGW_MAX_CONNECTIONS=%d; "
                    "raise the hard limit (ulimit -Hn, LimitNOFILE=) to reach it",
                    soft, _limit_text(hard), bound, max_connections)
    else:
        log.info("open-file limit %d (hard %s); client connections bounded at %d", soft, _limit_text(hard), bound)
    return bound


def _limit_text(value: int) -> str:
    import resource

    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with two guards uvicorn does not have.

    - Header read deadline: a timer armed when a connection opens, and when a read leaves a
      request's headers incomplete; cancelled when they are complete. If it fires, the connection
      is closed: a client that trickles (or never sends) its headers cannot hold it. Between
      requests uvicorn's own keep-alive timeout applies. A response that completes before its
      request's body has arrived closes the connection (uvicorn would read on).
    - Connection bound: past `max_connections` open connections in this process, a new one is
      closed at once, before reading anything. No 503 (uvicorn's limit_concurrency would answer
      one): the request was never read, so a client may safely retry it, and a closed socket
      costs less than an answer while the process is flooded.

    Set per server by `protocol_for(...)`. Per connection: one timer; per request: two attribute
    writes (a timer only when the headers span reads)."""

    header_timeout_s: float = 10.0
    max_connections: int = 20_000
    _header_timer: asyncio.TimerHandle | None = None
    _headers_pending = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # uvicorn narrows BaseTransport the same way
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            CONNECTIONS_REFUSED.inc()
            _warn_refused(self.max_connections)
            transport.close()
            return
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # Armed only when a request's headers did not all come in one read: a keep-alive request
        # whose headers arrive at once (nearly all of them) costs two attribute writes, no timer.
        if self._headers_pending and self._header_timer is None and not self.transport.is_closing():
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._headers_pending = True

    def on_headers_complete(self) -> None:
        self._headers_pending = False
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        cycle = self.cycle
        # Answered before its body had arrived (refused early, or the body was late): close rather
        # than read the rest, which a client could trickle for as long as it likes.
        if cycle.more_body and cycle.response_complete and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            SLOW_HEADERS_CLOSED.inc()
            self.transport.close()


_refused_warned_at = -1e9


def _warn_refused(bound: int) -> None:
    global _refused_warned_at
    now = time.monotonic()
    if now - _refused_warned_at >= 60:
        _refused_warned_at = now
        log.warning("connection bound reached (%d open): closing new connections until some end", bound)


def protocol_for(header_timeout_s: float, max_connections: int) -> type[GuardedHttpProtocol]:
    return type("GatewayHttpProtocol", (GuardedHttpProtocol,),
                {"header_timeout_s": header_timeout_s, "max_connections": max_connections})


def build_config(app: Any, settings: Settings, max_connections: int) -> uvicorn.Config:
    return uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(), access_log=False,
        http=protocol_for(settings.header_read_timeout_s, max_connections),
        # Forwarded headers are the app's business (web.edge.TrustForwardedHeaders, AGW_TRUSTED_PROXIES),
        # so they are handled the same under any server.
        proxy_headers=False,
        # Room for a burst of new connections while the loop is busy.
        backlog=4096,
    )


def serve(app: Any, settings: Settings) -> None:
    """Run the app until stopped (the settings were checked by check_serving_settings)."""
    bound = raise_fd_limit(settings.max_connections, settings.upstream_max_connections)
    uvicorn.Server(build_config(app, settings, bound)).run()
