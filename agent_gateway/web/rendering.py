"""Turning results and errors into responses: the one place HTTP status codes are chosen."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from agent_gateway.clock import as_utc
from agent_gateway.errors import GatewayError, ServiceUnavailable

log = logging.getLogger(__name__)

_ROUTING_ERRORS = {
    404: ("not_found_error", "route_not_found", "No such endpoint. See the README's API overview."),
    405: ("invalid_request_error", "method_not_allowed", "This endpoint does not take that HTTP method."),
}


def ok(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"success": True, "data": data}, status_code=status, headers=headers)


def error_body(type_: str, code: str, message: str) -> dict[str, Any]:
    return {"error": {"type": type_, "code": code, "message": message}}


# Anthropic's error types by status: the Messages routes answer in Anthropic's own envelope.
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                    403: "permission_error", 404: "not_found_error", 408: "invalid_request_error",
                    409: "invalid_request_error", 413: "request_too_large", 429: "rate_limit_error",
                    502: "api_error", 503: "overloaded_error", 504: "timeout_error"}


def anthropic_error_of(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error envelope for a status: `{"type": "error", "error": {"type", "message"}}`."""
    kind = _ANTHROPIC_TYPES.get(status, "invalid_request_error" if 400 <= status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def anthropic_error_body(exc: GatewayError) -> dict[str, Any]:
    """`{"type": "error", "error": {"type", "message"}}`, plus the error's extra fields (the
    catalog on a 402, the blocks on a 429) beside it, where Anthropic's clients ignore them."""
    body = anthropic_error_of(exc.status, exc.message)
    body.update({k: v for k, v in exc.extra.items() if k not in body})
    return body


def render_error(exc: GatewayError, envelope: str = "openai") -> JSONResponse:
    """The error as a response; `envelope="anthropic"` for the Messages routes."""
    if envelope == "anthropic":
        body = anthropic_error_body(exc)
    else:
        body = error_body(exc.type, exc.code, exc.message)
        body.update(exc.extra)
    return JSONResponse(body, status_code=exc.status, headers=exc.headers or None)


async def handle_gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return render_error(exc)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    type_, code, message = _ROUTING_ERRORS.get(
        exc.status_code, ("invalid_request_error", "http_error", str(exc.detail))
    )
    return JSONResponse(error_body(type_, code, message), status_code=exc.status_code, headers=exc.headers)


def as_gateway_error(exc: BaseException) -> GatewayError | None:
    """What an infrastructure failure means to a client, when it means something: no database
    connection came free within the pool's wait (the process is overloaded) is a 503 to retry,
    not a 500. None for anything else, which stays an internal error."""
    if isinstance(exc, PoolTimeout):
        return ServiceUnavailable("The gateway's database is busy; retry in a moment.", code="database_busy",
                                  headers={"Retry-After": "1"})
    return None


async def handle_infrastructure_error(request: Request, exc: Exception) -> Response:
    """The exceptions `as_gateway_error` knows (registered for their classes, so they are answered
    and not re-raised as a server error)."""
    known = as_gateway_error(exc)
    if known is None:
        return await handle_unexpected(request, exc)
    log.warning("%s %s: %s (%s)", request.method, request.url.path, known.code, exc)
    return render_error(known)


INFRASTRUCTURE_ERRORS: tuple[type[Exception], ...] = (PoolTimeout,)


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(
        error_body("api_error", "internal_error", "The gateway hit an internal error; it was logged."),
        status_code=500,
    )


def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return as_utc(value).isoformat().replace("+00:00", "Z")


class RefuseNul:
    """ASGI middleware: a NUL in the path or query (`%00`) is refused before routing. No id or
    parameter of ours contains one, and PostgreSQL cannot even compare it with stored text."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and ("\x00" in scope["path"] or b"%00" in scope.get("query_string", b"")):
            response = JSONResponse(error_body("invalid_request_error", "invalid_path",
                                               "The URL must not contain NUL (%00) characters."), status_code=400)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
