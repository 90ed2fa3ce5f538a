"""The /v1 routes: admit a request in the contract's refusal order, then hand it to the relay."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agent_gateway.web.auth import bearer_token, bearer_token_of, services_of
from agent_gateway.web.bodies import parse_json_object, read_body
from agent_gateway.web.catalog import plans_catalog
from agent_gateway.web.keys import admitted_key, key_plan
from agent_gateway.web.rendering import iso
from agent_gateway.catalog.blocks import seconds_until_next
from agent_gateway.catalog.pools import Pool, PoolStatus
from agent_gateway.errors import (
    InvalidRequest,
    NotFound,
    PaymentRequired,
    PermissionDenied,
    RateLimited,
    ServiceUnavailable,
)
from agent_gateway.messages.translate import to_chat_request
from agent_gateway.messages.wire import Translation
from agent_gateway.services import Services
from agent_gateway.strict_json import dumps_passed_on
from agent_gateway.metrics import proxy_requests
from agent_gateway.proxy.directory import KeyRecord
from agent_gateway.proxy.leases import AcquireResult
from agent_gateway.v1.relay import ProxyCall, RelayDeps, RelayResponse
from agent_gateway.proxy.streams import Registration

_STREAMABLE = {"chat.completions", "completions", "messages"}
# The body fields the gateway itself reads: each must appear once, or an upstream that keeps the
# first copy would act on a value the gateway never checked (a model outside the key's pool).
READ_KEYS = frozenset({"model", "stream", "stream_options", "include_usage"})


async def admit_key(request: Request, services: Services, token: str | None = None, *,
                    key_header: str = "Authorization: Bearer sk_…") -> KeyRecord:
    """No key → 402, unknown → 401, disabled/revoked/deleted → 403, expired → 403.

    `token` is the key a face has already read (the Messages face also reads x-api-key), and
    `key_header` how that face asks for it; by default the bearer token."""
    if token is None:
        token = bearer_token(request)
    if token is None:
        buy = {"catalog": "/api/agent/plans", "management": "/api/pools/{slug}/subscribe",
               "dashboard": "/dashboard/"}
        if services.payments.enabled:  # agents can pay on their own only when x402 is on
            buy["agents"] = "/api/agent/subscribe-pool"
        raise PaymentRequired(
            f"This endpoint needs an API key ({key_header}). Buy a seat to get one.",
            code="api_key_required",
            extra={"buy": buy, "catalog": await plans_catalog(services)},
        )
    return await admitted_key(services, token)


def _refuse_lookalike_keys(obj: dict, names: frozenset[str]) -> None:
    """A key the gateway reads may not also appear spelled in another case (`"Model"`, `"ſtream"`):
    upstreams that match field names case-insensitively (Go's encoding/json, last one wins) would
    read the other spelling — a model outside the key's pool, or a stream without usage."""
    for key in obj:
        if key not in names and key.casefold() in names:
            raise InvalidRequest(f"The key {key!r} is {key.casefold()!r} spelled differently; send it once, "
                                 f"as {key.casefold()!r}.", code="ambiguous_key")


def _check_stream_fields(payload: dict) -> None:
    """`stream` is a boolean and `stream_options` an object (null means absent, as for OpenAI):
    a truthy non-boolean would be streamed by a lenient upstream without usage metering."""
    _refuse_lookalike_keys(payload, READ_KEYS)
    stream = payload.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest(f"\"stream\" must be true or false, not {_json_type(stream)}.",
                             code="invalid_stream")
    options = payload.get("stream_options")
    if options is not None and not (isinstance(options, dict)
                                    and isinstance(options.get("include_usage", False), bool)):
        raise InvalidRequest("\"stream_options\" must be an object whose \"include_usage\" is true or false.",
                             code="invalid_stream")
    if options:
        _refuse_lookalike_keys(options, READ_KEYS)


def _json_type(value: object) -> str:
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (int, float)):
        return "a number"
    return "an array" if isinstance(value, list) else "an object"


def _with_usage(payload: dict) -> dict:
    """The body with `stream_options.include_usage` set, the rest as it was."""
    options = payload.get("stream_options")
    return {**payload, "stream_options": {**(options if isinstance(options, dict) else {}), "include_usage": True}}


def _pool_of(services: Services, key: KeyRecord) -> Pool:
    pool = services.catalog.pool(key.pool_slug)
    if pool is None or pool.status != PoolStatus.ACTIVE:
        state = pool.status if pool else "withdrawn"
        raise ServiceUnavailable(f"Pool {key.pool_slug} is {state} and serves no requests now.",
                                 code="pool_not_active")
    return pool


def _check_blocks(services: Services, key: KeyRecord) -> None:
    now = services.clock.now()
    blocks = [services.catalog.blocks[b] for b in key.blocks if b in services.catalog.blocks]
    if any(block.contains(now) for block in blocks):
        return
    wait = seconds_until_next(blocks, now) if blocks else 86_400
    hours = ", ".join(f"{b.name} {b.label}" for b in blocks)
    raise RateLimited(
        f"This key is reserved for {hours}; the next block opens in {_human(wait)}.",
        code="outside_reserved_hours",
        headers={"Retry-After": str(wait)},
        extra={"blocks": [{"block": b.name, "hoursUtc": b.label} for b in blocks],
               "retryAfterSeconds": wait},
    )


def _human(seconds: int) -> str:
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h {rest // 60:02d}m" if hours else f"{max(1, rest // 60)}m"


async def proxy_request(request: Request, path: str, endpoint: str, *, api: str = "openai",
                        token: str | None = None) -> Response:
    """Admit the request in the contract's order and relay it. `api="anthropic"` is the Messages
    face: a pool that speaks Messages gets the body as it is (the relay ends its stream at
    `message_stop`); any other pool gets it translated to a chat completion and back."""
    started = time.perf_counter()
    services = services_of(request)
    # One pass over the raw headers (the first of a repeated name wins, as in Starlette's Headers):
    # admission, the relay and the upstream client look up half a dozen names, each a scan of the
    # list otherwise.
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in reversed(request.scope["headers"])}
    try:
        if token is None:
            token = bearer_token_of(headers.get("authorization"))
        key = await admit_key(request, services, token, key_header=(
            "x-api-key: sk_… or Authorization: Bearer sk_…" if api == "anthropic" else "Authorization: Bearer sk_…"))
        body = await read_body(request, services.settings.max_proxy_body_bytes, headers)
        payload = parse_json_object(body, services.settings.max_json_depth, watched_keys=READ_KEYS)
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("The request needs a \"model\" string.", code="invalid_model")
        _check_stream_fields(payload)
        pool = _pool_of(services, key)
        translate = api == "anthropic" and pool.upstream_api != "anthropic"
        if translate and endpoint == "messages.count_tokens":
            # A chat-completions upstream has no way to count a prompt (docs/decisions.md).
            raise NotFound("This pool translates Messages to chat completions, which cannot count tokens; "
                           "count_tokens needs a pool with an anthropic upstream.",
                           code="count_tokens_not_available")
        if model not in pool.models:
            raise NotFound(f"The model {model!r} is not in this key's pool; it serves {', '.join(pool.models)}.",
                           code="model_not_found")
        _check_blocks(services, key)
        translation = None
        if translate:
            # A Messages request for a chat-completions upstream (usage is always asked for).
            body, path = dumps_passed_on(to_chat_request(payload), body), "/chat/completions"
            stops = payload.get("stop_sequences")
            translation = Translation(model=model, stop_sequences=stops if isinstance(stops, list) else None)
        stream = payload.get("stream") is True and endpoint in _STREAMABLE
        strip_usage = False
        if stream and api == "openai":  # a Messages stream always carries its usage
            options = payload.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage") is True):
                # Ask upstream for usage so every stream is metered; the relay removes that event again.
                body = dumps_passed_on(_with_usage(payload), body)
                strip_usage = True
        # Registered before the lease is taken, so a revocation arriving from here on is seen.
        registration = Registration()
        unregister = services.streams.add(key.key_id, registration.cancel)
        try:
            result, lease = await services.leases.acquire(key.key_id)
        except BaseException:
            unregister()
            raise
        if lease is None:
            unregister()
        if result is AcquireResult.REVOKED:
            services.directory.forget(key.key_id)
            raise PermissionDenied("This API key was revoked.", code="key_revoked")
        if lease is None:
            raise RateLimited(
                "Concurrency limit reached for this key: one request at a time. "
                "Finish the request in flight and retry.",
                code="concurrency_limit", headers={"Retry-After": "1"},
            )
    except Exception as exc:
        code = getattr(exc, "code", "error")
        proxy_requests(endpoint, f"refused_{code}").inc()
        raise
    call = ProxyCall(
        key=key, lease=lease, pool=pool, path=path, endpoint=endpoint, model=model, body=body,
        headers=headers, stream=stream, strip_usage=strip_usage,
        # Lease ids are already unique (a process tag and a counter): no system call per request.
        request_id=headers.get("x-request-id") or f"req_{lease.lease_id}",
        started=started, created_at=services.clock.now(), registration=registration, unregister=unregister,
        api=api, translation=translation,
    )
    return RelayResponse(call, RelayDeps(upstream=services.upstream, leases=services.leases, usage=services.usage))


async def chat_completions(request: Request) -> Response:
    return await proxy_request(request, "/chat/completions", "chat.completions")


async def completions(request: Request) -> Response:
    return await proxy_request(request, "/completions", "completions")


async def embeddings(request: Request) -> Response:
    return await proxy_request(request, "/embeddings", "embeddings")


async def models(request: Request) -> Response:
    services = services_of(request)
    key = await admit_key(request, services)
    pool = services.catalog.pool(key.pool_slug)
    created = int(key.created_at.timestamp())
    data = [{"id": m, "object": "model", "created": created, "owned_by": key.pool_slug}
            for m in (pool.models if pool else ())]
    return JSONResponse({"object": "list", "data": data})


async def key_usage(request: Request) -> Response:
    """The key's own plan and usage (snake_case, like the reference service's /v1/usage)."""
    services = services_of(request)
    key = await admit_key(request, services)
    plan = await key_plan(services, key)
    return JSONResponse({"success": True, "data": {
        "plan": {"slug": key.pool_slug, "status": key.subscription_status, "expires_at": iso(key.period_end),
                 "blocks": [{"block": b.name, "hours_utc": b.label} for b in plan.blocks],
                 "in_block_now": plan.in_block_now},
        "rate_limits": {"concurrent_requests": 1, "rpm": None, "tpm": None},
        "budget": {"limit": None},
        "key": {"name": key.name, "type": "subscription", "created_at": iso(key.created_at)},
        "usage": {window: {"requests": t["requests"], "prompt_tokens": t["promptTokens"],
                           "completion_tokens": t["completionTokens"], "errors": t["errors"]}
                  for window, t in plan.usage.items()},
    }})


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/embeddings", embeddings, methods=["POST"]),
    Route("/v1/models", models, methods=["GET"]),
    Route("/v1/usage", key_usage, methods=["GET"]),
]

# The inference routes, also answered by web.edge.DirectRoutes ahead of the router (same endpoints).
direct_routes = {route.path: route.endpoint for route in routes if route.methods == {"POST"}}
