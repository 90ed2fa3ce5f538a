"""Run an ASGI app under uvicorn in a background thread on a free loopback port."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Coroutine
import threading
from types import TracebackType
from typing import Any

import uvicorn


class _Server(uvicorn.Server):
    """uvicorn.Server that signals a threading.Event once startup has finished (or failed)."""

    def __init__(self, config: uvicorn.Config, ready: threading.Event) -> None:
        super().__init__(config)
        self._ready = ready
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        try:
            await super().startup(sockets=sockets)
        finally:
            # Set even when startup raises, so start() never waits out its whole timeout.
            self._ready.set()


class ServerThread:
    """Serve `app` on 127.0.0.1 from a daemon thread; use as a context manager or call start()/stop().

    uvicorn picks uvloop and httptools itself when they are installed ("auto").
    """

    def __init__(
        self,
        app: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        startup_timeout: float = 10.0,
        shutdown_timeout: float = 5.0,
        **uvicorn_options: Any,
    ) -> None:
        self.app = app
        self.host = host
        self.startup_timeout = startup_timeout
        self.shutdown_timeout = shutdown_timeout
        options: dict[str, Any] = {
            # log_config=None keeps uvicorn from re-configuring logging for the whole test process.
            "log_config": None,
            "access_log": False,
            "lifespan": "auto",
            "timeout_graceful_shutdown": shutdown_timeout,
            # As under `serve`: forwarded headers are the app's business (AGW_TRUSTED_PROXIES).
            "proxy_headers": False,
        }
        options.update(uvicorn_options)
        self._config = uvicorn.Config(app, host=host, port=port, **options)
        self._requested_port = port
        self._sock: socket.socket | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.port: int = port

    @property
    def url(self) -> str:
        """Base URL without a trailing slash, e.g. http://127.0.0.1:54321."""
        if self._server is None:
            raise RuntimeError("ServerThread is not running")
        return f"http://{self.host}:{self.port}"

    @property
    def server(self) -> _Server:
        if self._server is None:
            raise RuntimeError("ServerThread is not running")
        return self._server

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 30.0) -> Any:
        """Run a coroutine on the server's own event loop (where its services live) and wait for it."""
        loop = self.server.loop
        assert loop is not None, "the server has not started"
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    def start(self) -> ServerThread:
        if self._thread is not None:
            raise RuntimeError("ServerThread already started")
        # Binding the socket here (port 0 = kernel picks) tells us the port before uvicorn runs,
        # and there is no window in which another process can take it.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self._requested_port))
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self.port = sock.getsockname()[1]
        ready = threading.Event()
        self._server = _Server(self._config, ready)
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name=f"uvicorn-{self.port}", daemon=True
        )
        self._thread.start()
        if not ready.wait(self.startup_timeout) or not self._server.started:
            self._server.should_exit = True
            self._thread.join(self.shutdown_timeout)
            self._sock.close()
            raise RuntimeError(f"uvicorn did not start on {self.host}:{self.port}") from self._error
        return self

    def _run(self, ready: threading.Event) -> None:
        assert self._server is not None and self._sock is not None
        try:
            self._server.run(sockets=[self._sock])
        except BaseException as exc:  # uvicorn reports startup failure with SystemExit
            self._error = exc
        finally:
            ready.set()

    def stop(self) -> None:
        if self._thread is None or self._server is None:
            return
        self._server.should_exit = True
        # uvicorn cancels still-running requests after timeout_graceful_shutdown; the extra
        # margin covers its 0.1 s main-loop tick and lifespan shutdown.
        self._thread.join(self.shutdown_timeout + 2.0)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(2.0)
        if self._sock is not None:
            self._sock.close()
        alive = self._thread.is_alive()
        self._thread = None
        if alive:
            raise RuntimeError(f"uvicorn on port {self.port} did not stop")

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
