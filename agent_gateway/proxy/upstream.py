"""The upstream client: pooled connections (aiohttp, or httpx), timeouts, errors translated at this boundary."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import aiohttp
import httpx

from agent_gateway.catalog.pools import Pool
from agent_gateway.errors import UpstreamError, UpstreamTimeout

# End-to-end request headers worth passing on; everything else (hop-by-hop headers, the
# customer's Authorization, cookies) stays at the gateway.
_FORWARDED_REQUEST_HEADERS = ("content-type", "accept", "user-agent", "openai-organization", "openai-project")
# An Anthropic upstream also reads the API version and the beta features asked for (never the
# client's x-api-key: the upstream's own key is sent instead).
_FORWARDED_ANTHROPIC_HEADERS = ("content-type", "accept", "user-agent", "anthropic-version", "anthropic-beta")
_DEFAULT_ANTHROPIC_VERSION = "2023-06-01"


@dataclass(frozen=True)
class UpstreamTimeouts:
    connect_s: float
    first_byte_s: float
    total_s: float


class UpstreamResponse:
    """An upstream response whose body is still to be read; close() drops the connection."""

    def __init__(self, status: int, content_type: str, backend: _Body) -> None:
        self.status = status
        self.content_type = content_type
        self._backend = backend

    async def read(self) -> bytes:
        try:
            return await self._backend.read()
        except _BODY_ERRORS as exc:
            raise UpstreamError(f"The upstream broke off its response: {exc!r}", code="upstream_interrupted") from exc

    async def read_some(self) -> bytes:
        """Everything of the body that has arrived (waiting for at least one byte); b"" at its end.

        One call per read, not an iterator: the relay calls it once per upstream read, and each
        layer of async generator would cost as much again."""
        try:
            return await self._backend.read_some()
        except _BODY_ERRORS as exc:
            raise UpstreamError(f"The upstream broke off the stream: {exc!r}", code="upstream_interrupted") from exc

    def at_eof(self) -> bool:
        """True when the whole body has been read (False when the client cannot tell)."""
        return self._backend.at_eof()

    def close(self) -> None:
        # Drop, do not drain: an abandoned upstream request must stop generating for a client
        # that is gone.
        self._backend.close()

    def release(self) -> None:
        self._backend.release()


class _Body(Protocol):
    async def read(self) -> bytes: ...
    async def read_some(self) -> bytes: ...
    def at_eof(self) -> bool: ...
    def close(self) -> None: ...
    def release(self) -> None: ...


class _AiohttpBody:
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def read(self) -> bytes:
        return await self._response.read()

    async def read_some(self) -> bytes:
        return await self._response.content.readany()

    def at_eof(self) -> bool:
        return self._response.content.at_eof()

    def close(self) -> None:
        self._response.close()

    def release(self) -> None:
        self._response.release()


class _HttpxBody:
    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self._raw: AsyncIterator[bytes] | None = None

    async def read(self) -> bytes:
        return await self._response.aread()

    async def read_some(self) -> bytes:
        if self._raw is None:
            self._raw = self._response.aiter_raw()
        return await anext(self._raw, b"")

    def at_eof(self) -> bool:
        return False

    def close(self) -> None:
        # aclose() is a coroutine; schedule it so close() can be called from a finally block.
        asyncio.ensure_future(self._response.aclose())

    release = close  # httpx has no "return to the pool" apart from closing the response


_BODY_ERRORS = (aiohttp.ClientError, asyncio.IncompleteReadError, httpx.TransportError)


class UpstreamClient:
    """Pooled connections to every pool's upstreams; `kind` picks the HTTP client library."""

    def __init__(self, timeouts: UpstreamTimeouts, max_connections: int, kind: str = "aiohttp") -> None:
        if kind not in ("aiohttp", "httpx"):
            raise ValueError(f"unknown upstream client {kind!r}")
        self.timeouts = timeouts
        self.kind = kind
        self._max_connections = max_connections
        self._aiohttp: aiohttp.ClientSession | None = None
        self._httpx: httpx.AsyncClient | None = None
        self._round_robin: dict[str, itertools.cycle[str]] = {}

    async def start(self) -> None:
        if self.kind == "aiohttp":
            connector = aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0, keepalive_timeout=30)
            self._aiohttp = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeouts.connect_s),
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
            )
        else:
            limits = httpx.Limits(max_connections=self._max_connections,
                                  max_keepalive_connections=self._max_connections, keepalive_expiry=30)
            self._httpx = httpx.AsyncClient(
                limits=limits,
                timeout=httpx.Timeout(None, connect=self.timeouts.connect_s),
            )

    async def close(self) -> None:
        if self._aiohttp is not None:
            await self._aiohttp.close()
        if self._httpx is not None:
            await self._httpx.aclose()

    def base_url(self, pool: Pool) -> str:
        cycle = self._round_robin.get(pool.slug)
        if cycle is None:
            cycle = self._round_robin[pool.slug] = itertools.cycle(pool.upstreams)
        return next(cycle)

    async def send(self, pool: Pool, path: str, body: bytes, request_headers: Mapping[str, str],
                   extra_headers: dict[str, str], api: str = "openai") -> UpstreamResponse:
        """Send the request and wait for the response headers (the first-byte timeout).

        `api="anthropic"` speaks to a Messages upstream: its headers, its way of sending the key."""
        forwarded = _FORWARDED_ANTHROPIC_HEADERS if api == "anthropic" else _FORWARDED_REQUEST_HEADERS
        headers = {name: request_headers[name] for name in forwarded if name in request_headers}
        if api == "anthropic":
            headers.setdefault("anthropic-version", _DEFAULT_ANTHROPIC_VERSION)
        headers["accept-encoding"] = "identity"
        headers.update(extra_headers)
        if pool.upstream_api_key_env:
            secret = os.environ.get(pool.upstream_api_key_env)
            if secret and api == "anthropic":
                headers["x-api-key"] = secret
            elif secret:
                headers["authorization"] = f"Bearer {secret}"
        url = self.base_url(pool) + path
        try:
            async with asyncio.timeout(self.timeouts.first_byte_s):
                if self._aiohttp is not None:
                    response = await self._aiohttp.post(url, data=body, headers=headers)
                    return UpstreamResponse(response.status, response.headers.get("content-type", "application/json"),
                                            _AiohttpBody(response))
                assert self._httpx is not None, "UpstreamClient.start() was not called"
                request = self._httpx.build_request("POST", url, content=body, headers=headers)
                reply = await self._httpx.send(request, stream=True)
                return UpstreamResponse(reply.status_code, reply.headers.get("content-type", "application/json"),
                                        _HttpxBody(reply))
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"The upstream did not answer within {self.timeouts.first_byte_s:g} s.", code="upstream_timeout"
            ) from exc
        except (aiohttp.ClientError, httpx.TransportError) as exc:
            raise UpstreamError(f"The upstream could not be reached: {exc.__class__.__name__}.",
                                code="upstream_unreachable") from exc
