"""Who is calling: the bearer token, resolved once per request and declared per route."""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response

from agent_gateway.db.models import Account
from agent_gateway.admin.audit import validate_actor
from agent_gateway.errors import AuthenticationError
from agent_gateway.keys.management import authenticate_management_key
from agent_gateway.services import Services

ManagementHandler = Callable[[Request, Services, Account], Awaitable[Response]]
AdminHandler = Callable[[Request, Services, str], Awaitable[Response]]
ACTOR_HEADER = "x-admin-actor"


def bearer_token(request: Request) -> str | None:
    """The token of `Authorization: Bearer …`, None when there is no header, 401 when it is garbled."""
    return bearer_token_of(request.headers.get("authorization"))


def bearer_token_of(header: str | None) -> str | None:
    """`bearer_token` for the Authorization header's value, already read."""
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise AuthenticationError(
            "The Authorization header must be 'Bearer <key>'.", code="invalid_authorization_header"
        )
    return token


def api_key_token(request: Request) -> str | None:
    """An Anthropic client's key: `x-api-key: sk_…`, or else `Authorization: Bearer sk_…`."""
    header = request.headers.get("x-api-key")
    if header is not None:
        token = header.strip()
        if not token or " " in token:
            raise AuthenticationError("The x-api-key header must hold one key.", code="invalid_api_key_header")
        return token
    return bearer_token(request)


def services_of(request: Request) -> Services:
    return request.app.state.services


def management(handler: ManagementHandler) -> Callable[[Request], Awaitable[Response]]:
    """Route decorator: the handler runs only for a valid management key, and gets its account."""

    @functools.wraps(handler)
    async def endpoint(request: Request) -> Response:
        services = services_of(request)
        token = bearer_token(request)
        if token is None:
            raise AuthenticationError(
                "This endpoint needs 'Authorization: Bearer mk_…' (a management key).",
                code="missing_api_key",
            )
        account = await authenticate_management_key(services.db, services.clock, token)
        return await handler(request, services, account)

    return endpoint


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def admin_token_matches(given: str, expected: str | None) -> bool:
    """Constant time whatever the lengths: both sides are hashed to 32 bytes before comparing."""
    return expected is not None and hmac.compare_digest(_digest(given), _digest(expected))


def admin(handler: AdminHandler) -> Callable[[Request], Awaitable[Response]]:
    """Route decorator for /api/admin/: the handler runs only for `Authorization: Bearer
    <AGW_ADMIN_TOKEN>`, never for a customer's key. A write also names its actor (X-Admin-Actor),
    which the handler records; a read gets the actor if one was sent, else "".
    """

    @functools.wraps(handler)
    async def endpoint(request: Request) -> Response:
        services = services_of(request)
        token = bearer_token(request)
        if token is None:
            raise AuthenticationError("The admin API needs 'Authorization: Bearer <AGW_ADMIN_TOKEN>'.",
                                      code="missing_admin_token")
        if not admin_token_matches(token, services.settings.admin_token):
            # One answer for every wrong token, an mk_/sk_ key included, and for an unset AGW_ADMIN_TOKEN.
            raise AuthenticationError("The admin token is not valid.", code="invalid_admin_token")
        header = request.headers.get(ACTOR_HEADER)
        if request.method in ("GET", "HEAD"):
            actor = validate_actor(header) if header is not None else ""
        else:
            actor = validate_actor(header)
        return await handler(request, services, actor)

    return endpoint
