"""Serving the app: the checks before binding, the file-descriptor limit, the uvicorn config with
its guarded HTTP protocol (header read deadline, connection bound), and several worker processes
on one port."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from agent_gateway.metrics import CONNECTIONS_REFUSED, MULTIPROCESS_DIR_VARIABLE, SLOW_HEADERS_CLOSED
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
      request's body has arrived ends the connection (uvicorn would read on), with a lingering
      close: see `_linger`.
    - Connection bound: past `max_connections` open connections in this process, a new one is
      closed at once, before reading anything. No 503 (uvicorn's limit_concurrency would answer
      one): the request was never read, so a client may safely retry it, and a closed socket
      costs less than an answer while the process is flooded.

    Set per server by `protocol_for(...)`. Per connection: one timer; per request: two attribute
    writes (a timer only when the headers span reads)."""

    header_timeout_s: float = 10.0
    max_connections: int = 20_000
    linger_s: float = 2.0
    _header_timer: asyncio.TimerHandle | None = None
    _headers_pending = False
    _linger_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # uvicorn narrows BaseTransport the same way
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            CONNECTIONS_REFUSED.inc()
            _warn_refused(self.max_connections)
            transport.close()
            return
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def data_received(self, data: bytes) -> None:
        if self._linger_timer is not None:
            return  # the rest of a body already answered: dropped
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
            self._linger()

    def _linger(self) -> None:
        """End a connection whose request is answered but whose body is still arriving. Closing
        at once, with body bytes unread in the socket, makes the kernel send a reset, which can
        reach the client before the answer does: it would see a reset, not the 403 or 429 it was
        sent. So the write side is shut after the answer (the client reads it, then the end of the
        stream), what still arrives is read and dropped, and the socket closes when the client
        closes its side or after `linger_s`, whichever comes first."""
        self.flow.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._linger_timer = self.loop.call_later(self.linger_s, self.transport.close)

    def eof_received(self) -> None:
        if self._linger_timer is not None:
            self.transport.close()  # the client has sent all it will: done lingering
        super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if self._linger_timer is not None:
            self._linger_timer.cancel()
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


# --- several worker processes on one port ----------------------------------------------------

# A worker that exits with this never served: its start failed (database, Redis or the chain not
# reachable, a bad pools file), and starting it again would fail the same way.
WORKER_START_FAILED = 3
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def check_worker_settings(settings: Settings, workers: int) -> None:
    """Several processes are one deployment only if they share what one process keeps to itself:
    the database (SQLite is one file per machine and one writer at a time), the leases, revocations
    and attempt counts (Redis), and the key that signs dashboard cookies (each process would make
    its own, and a cookie would verify only on the worker that set it)."""
    if workers <= 1:
        return
    missing = []
    if not settings.database_url.startswith(("postgresql", "postgres://")):
        missing.append("PostgreSQL (AGW_DATABASE_URL=postgresql://…; SQLite cannot be shared by several processes)")
    if settings.redis_url is None:
        missing.append("Redis (AGW_REDIS_URL=redis://…; one request in flight per key and revocations are kept "
                       "there for every process)")
    if settings.session_secret is None:
        missing.append("a fixed AGW_SESSION_SECRET (dashboard cookies must verify on every worker)")
    if missing:
        raise ServeSettingsError(f"--workers {workers} needs " + "; ".join(missing)
                                 + ". Serve with --workers 1, or set them.")


def serve_workers(make_app: Callable[[], Any], settings: Settings, workers: int) -> int:
    """Run `workers` processes that accept on one listening socket, bound here before they fork.

    The parent binds, then forks; each worker builds its own app and services (its own event loop,
    database pool, Redis connections, background jobs: nothing that holds a connection or a thread
    is made before the fork) and runs uvicorn with the same guarded protocol as a single process.
    The kernel hands each new connection to one of the workers. The parent only supervises: it
    restarts a worker that dies while serving, stops them all on SIGTERM or SIGINT, and if a
    worker fails to start, stops the others and exits 1. Returns the exit status."""
    bound = raise_fd_limit(settings.max_connections)
    try:
        listening = bind_listening_socket(settings.host, settings.port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc.strerror or exc)
        return 1
    supervisor = _Supervisor(make_app, settings, bound, listening)
    try:
        return supervisor.run(workers)
    finally:
        listening.close()


def _forget_worker_gauges(pid: int) -> None:
    """A gone worker's live gauges (requests in flight) no longer count in the sum."""
    if os.environ.get(MULTIPROCESS_DIR_VARIABLE):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def bind_listening_socket(host: str, port: int) -> socket.socket:
    """The one socket every worker accepts on (each worker's uvicorn calls listen on it)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class _Supervisor:
    def __init__(self, make_app: Callable[[], Any], settings: Settings, bound: int, listening: socket.socket) -> None:
        self.make_app, self.settings, self.bound, self.listening = make_app, settings, bound, listening
        self.children: dict[int, int] = {}  # pid -> worker number
        self.stopping = False

    def run(self, workers: int) -> int:
        previous = {sig: signal.signal(sig, self._stop) for sig in _STOP_SIGNALS}
        try:
            for number in range(1, workers + 1):
                self._fork(number)
            log.info("serving on %s:%d with %d worker processes (pids %s)", self.settings.host, self.settings.port,
                     workers, ", ".join(map(str, self.children)))
            status = 0
            while self.children:
                pid, wait_status = os.wait()
                number = self.children.pop(pid, 0)
                if not number:
                    continue
                code = os.waitstatus_to_exitcode(wait_status)
                _forget_worker_gauges(pid)
                if self.stopping:
                    continue
                if code == WORKER_START_FAILED:
                    log.error("worker %d (pid %d) could not start; stopping the others", number, pid)
                    status = 1
                    self._stop_all()
                    continue
                log.error("worker %d (pid %d) exited (%s) while serving; starting a new one", number, pid,
                          f"signal {-code}" if code < 0 else f"status {code}")
                self._fork(number)
            return status
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _fork(self, number: int) -> None:
        # Signals wait until the worker has dropped the supervisor's handlers (which would signal
        # the supervisor's children, its siblings, from inside it).
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the supervisor's code
            os._exit(self._work(number))
        self.children[pid] = number
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)

    def _work(self, number: int) -> int:
        """Serve until stopped; the exit status: 0 stopped, 1 failed while serving, 3 never served."""
        server: uvicorn.Server | None = None
        failed = False
        try:
            for sig in _STOP_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)  # uvicorn installs its graceful shutdown on run
            self.children.clear()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
            log.info("worker %d starting (pid %d)", number, os.getpid())
            server = uvicorn.Server(build_config(self.make_app(), self.settings, self.bound))
            server.run(sockets=[self.listening])
        except BaseException:
            log.exception("worker %d failed", number)
            failed = True
        finally:
            logging.shutdown()
        if server is None or not server.started:
            return WORKER_START_FAILED  # starting it again would fail the same way: no restart storm
        return 1 if failed else 0

    def _stop(self, signum: int, frame: object) -> None:
        if not self.stopping:
            log.info("stopping %d worker processes (%s)", len(self.children), signal.Signals(signum).name)
        self._stop_all()

    def _stop_all(self) -> None:
        self.stopping = True
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
