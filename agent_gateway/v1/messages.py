"""The Anthropic Messages face: /v1/messages and /anthropic/v1/messages (and their count_tokens).

The same admission, lease, revocation and relay as the OpenAI routes (`proxy_request`), with
Anthropic's key header and error envelope. A pool whose `upstream_api` is "anthropic" gets the
request relayed as it is; any other pool gets it translated to a chat completion and the answer
translated back (messages/wire.py, inside the same relay). count_tokens needs an anthropic upstream."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from agent_gateway.errors import GatewayError
from agent_gateway.v1.routes import proxy_request
from agent_gateway.web.auth import api_key_token
from agent_gateway.web.rendering import as_gateway_error, render_error


async def _messages_call(request: Request, call: Callable[[], Awaitable[Response]]) -> Response:
    try:
        return await call()
    except GatewayError as exc:
        return render_error(exc, envelope="anthropic")
    except Exception as exc:
        known = as_gateway_error(exc)
        if known is None:
            raise
        return render_error(known, envelope="anthropic")


async def messages(request: Request) -> Response:
    # `?beta=true` (the SDK's beta client) is accepted; no client query string goes upstream.
    return await _messages_call(request, lambda: proxy_request(
        request, "/messages", "messages", api="anthropic", token=api_key_token(request)))


async def count_tokens(request: Request) -> Response:
    return await _messages_call(request, lambda: proxy_request(
        request, "/messages/count_tokens", "messages.count_tokens", api="anthropic", token=api_key_token(request)))


routes = [
    Route(prefix + path, endpoint, methods=["POST"])
    for prefix in ("", "/anthropic")
    for path, endpoint in (("/v1/messages", messages), ("/v1/messages/count_tokens", count_tokens))
]
direct_routes = {route.path: route.endpoint for route in routes}
