"""The upstream client: pooled aiohttp connections, timeouts, and its errors translated at this boundary."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp

from agent_gateway.catalog.pools import Pool
from agent_gateway.errors import UpstreamError, UpstreamTimeout

# End-to-end request headers worth passing on; everything else (hop-by-hop headers, the
# customer's Authorization, cookies) stays at the gateway.
_FORWARDED_REQUEST_HEADERS = ("content-type", "accept", "user-agent", "openai-organization", "openai-project")


@dataclass(frozen=True)
class UpstreamTimeouts:
    connect_s: float
    first_byte_s: float
    total_s: float


class UpstreamResponse:
    """An upstream response whose body is still to be read; close() drops the connection."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.content_type = response.headers.get("content-type", "application/json")

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except (aiohttp.ClientError, asyncio.IncompleteReadError) as exc:
            raise UpstreamError(f"The upstream broke off its response: {exc}", code="upstream_interrupted") from exc

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, asyncio.IncompleteReadError) as exc:
            raise UpstreamError(f"The upstream broke off the stream: {exc}", code="upstream_interrupted") from exc

    def close(self) -> None:
        # close(), not release(): an unfinished body must not be drained, the upstream request
        # is abandoned so the GPU stops generating for a client that is gone.
        self._response.close()

    def release(self) -> None:
        self._response.release()


class UpstreamClient:
    def __init__(self, timeouts: UpstreamTimeouts, max_connections: int) -> None:
        self.timeouts = timeouts
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._round_robin: dict[str, itertools.cycle[str]] = {}

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0, keepalive_timeout=30)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeouts.connect_s),
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def base_url(self, pool: Pool) -> str:
        cycle = self._round_robin.get(pool.slug)
        if cycle is None:
            cycle = self._round_robin[pool.slug] = itertools.cycle(pool.upstreams)
        return next(cycle)

    async def send(self, pool: Pool, path: str, body: bytes, request_headers: dict[str, str],
                   extra_headers: dict[str, str]) -> UpstreamResponse:
        """Send the request and wait for the response headers (the first-byte timeout)."""
        assert self._session is not None, "UpstreamClient.start() was not called"
        headers = {name: request_headers[name] for name in _FORWARDED_REQUEST_HEADERS if name in request_headers}
        headers["accept-encoding"] = "identity"
        headers.update(extra_headers)
        if pool.upstream_api_key_env:
            secret = os.environ.get(pool.upstream_api_key_env)
            if secret:
                headers["authorization"] = f"Bearer {secret}"
        url = self.base_url(pool) + path
        try:
            async with asyncio.timeout(self.timeouts.first_byte_s):
                response = await self._session.post(url, data=body, headers=headers)
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"The upstream did not answer within {self.timeouts.first_byte_s:g} s.", code="upstream_timeout"
            ) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"The upstream could not be reached: {exc.__class__.__name__}.",
                                code="upstream_unreachable") from exc
        return UpstreamResponse(response)
