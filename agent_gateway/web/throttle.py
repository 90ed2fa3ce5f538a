"""Limits on unauthenticated writes, declared per route: sign-in challenges and x402 attempts that
did not end in a delivery, counted per client address (agent_gateway.ratelimit)."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from agent_gateway.web.auth import services_of
from agent_gateway.web.bodies import read_body
from agent_gateway.web.x402 import payment_header
from agent_gateway.errors import GatewayError, RateLimited
from agent_gateway.ratelimit import AttemptLimiter
from agent_gateway.services import Services
from agent_gateway.settings import Settings
from agent_gateway.strict_json import JsonRefused, loads_strict

Handler = Callable[..., Awaitable[Response]]


def client_address(scope: Any) -> str:
    """The address attempts are counted under: the peer, or the client a trusted proxy named
    (web.edge). IPv6 counts per /64, the block one subscriber usually holds."""
    client = scope.get("client")
    host = client[0] if client else ""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host[:64] or "unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def too_many_attempts(retry_after_s: int, limit: int) -> RateLimited:
    return RateLimited(
        f"Too many unauthenticated attempts from this address: at most {limit} a minute may end without "
        f"a delivery. Try again in {retry_after_s} s.",
        code="too_many_attempts", headers={"Retry-After": str(retry_after_s)})


def limits_challenges(handler: Handler) -> Handler:
    """Route decorator: every call writes a row, so every call counts; past the limit, 429 first."""

    @functools.wraps(handler)
    async def endpoint(request: Request, *args: Any) -> Response:
        limiter = services_of(request).attempts
        retry = await limiter.take(client_address(request.scope))
        if retry is not None:
            raise too_many_attempts(retry, limiter.limit)
        return await handler(request, *args)

    return endpoint


def limits_failed_payments(handler: Handler) -> Handler:
    """Route decorator for x402-paid routes: an attempt that carries a payment (header or tx-hash
    claim) is refused with 429 before it touches the database or the chain once the address is
    over the limit or has too many attempts in flight, and counts only if it ended in a client error
    (not a delivery, not the gateway's own failure). A request without a payment, answered with the
    402 challenge, writes nothing and is neither counted nor refused."""

    @functools.wraps(handler)
    async def endpoint(request: Request, *args: Any) -> Response:
        services = services_of(request)
        if payment_header(request) is None:
            request, claims = await _peek_tx_hash_claim(request, services.settings)
            if not claims:
                return await handler(request, *args)
        async with payment_attempt(services, client_address(request.scope)) as attempt:
            response = await handler(request, *args)
            if 400 <= response.status_code < 500:
                await attempt.failed()
        return response

    return endpoint


class _Attempt:
    def __init__(self, limiter: AttemptLimiter, address: str) -> None:
        self.limiter, self.address = limiter, address

    async def failed(self) -> None:
        await self.limiter.record(self.address)


@asynccontextmanager
async def payment_attempt(services: Services, address: str) -> AsyncIterator[_Attempt]:
    """One paid attempt (it carries a payment) from `address`, under the rules of every x402 face:
    refused with 429 before it touches the database or the chain when the address is over the limit
    or has too many attempts in flight; counted when it ends in a client error."""
    limiter = services.attempts
    retry = await limiter.check(address)
    if retry is not None:
        raise too_many_attempts(retry, limiter.limit)
    if not limiter.in_flight.enter(address):
        raise RateLimited(
            f"Too many payment attempts from this address at once: at most {limiter.in_flight.cap} may be "
            "in flight. Retry when one has finished.", code="too_many_attempts", headers={"Retry-After": "1"})
    try:
        yield _Attempt(limiter, address)
    except GatewayError as exc:
        if _counts_as_failed(exc):
            await limiter.record(address)
        raise
    finally:
        limiter.in_flight.leave(address)


# Failures that are not the client's: a confirmation still on its way (the client was told to
# retry), a payment that moved on under a race, the chain or the gateway being unavailable.
_NOT_THE_CLIENTS = {"payment_pending", "payment_state_changed"}


def _counts_as_failed(exc: GatewayError) -> bool:
    """An attempt that ended in a client error counts against the address; a delivery, a 202
    and the gateway's own failures (5xx, a pending confirmation, a lost race) do not."""
    return 400 <= exc.status < 500 and exc.code not in _NOT_THE_CLIENTS


async def _peek_tx_hash_claim(request: Request, settings: Settings) -> tuple[Request, bool]:
    """Whether the body claims a tx hash, and a request that replays the body to the handler."""
    raw = await read_body(request, settings.max_body_bytes)
    claims = b"txHash" in raw and _names_tx_hash(raw, settings.max_json_depth)
    sent = False

    async def replay() -> Any:
        nonlocal sent
        if sent:
            return await request.receive()
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    return Request(request.scope, replay), claims


def _names_tx_hash(raw: bytes, max_depth: int) -> bool:
    # The same strict parse the handler does (depth bounded before parsing): whatever this one
    # refuses, the handler refuses too, with the right error.
    try:
        data = loads_strict(raw, max_depth)
    except JsonRefused:
        return False
    return isinstance(data, dict) and data.get("txHash") is not None
