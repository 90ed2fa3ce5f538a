"""create_app(settings): the only wiring of routes, error handlers and lifespan."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import Mount, Route

from agent_gateway.api import admin, agents, discovery, management, public
from agent_gateway.web.edge import BodyDeadline, DirectRoutes, TrustForwardedHeaders
from agent_gateway.web.rendering import (
    INFRASTRUCTURE_ERRORS,
    RefuseNul,
    handle_gateway_error,
    handle_http_exception,
    handle_infrastructure_error,
    handle_unexpected,
)
from agent_gateway.clock import Clock
from agent_gateway.dashboard import create_dashboard
from agent_gateway.errors import GatewayError
from agent_gateway.metrics import metrics_endpoint
from agent_gateway.v1 import messages as v1_messages
from agent_gateway.v1 import routes as v1_routes
from agent_gateway.lifespan import build_services, lifespan_for
from agent_gateway.mcp_face.server import McpFace
from agent_gateway.services import Services
from agent_gateway.settings import Settings


# py_ecc, imported through eth-account, raises the recursion limit to 100,000 when imported. That
# high, a runaway recursion overflows the C stack and kills the process (every stream and lease
# with it) instead of raising RecursionError. Everything is imported by now: back to CPython's default.
RECURSION_LIMIT = 1000


def create_app(settings: Settings | None = None, *, clock: Clock | None = None,
               services: Services | None = None) -> Starlette:
    services = services or build_services(settings or Settings(), clock)
    sys.setrecursionlimit(RECURSION_LIMIT)
    settings = services.settings
    # Outermost first: the client's real address before anything reads it, then the body deadline
    # around every route (mounted apps included).
    edge = [Middleware(TrustForwardedHeaders, trusted=settings.trusted_proxies)] if settings.trusted_proxies else []
    mcp = McpFace(services)
    run_services = lifespan_for(services)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with run_services(app), mcp.running():
            yield

    app = Starlette(
        routes=[
            *v1_routes.routes,
            *v1_messages.routes,
            *public.routes,
            *agents.routes,
            *management.routes,
            *admin.routes,
            *discovery.routes,
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            # Stateless: no server-initiated stream (GET) and no session to end (DELETE).
            Route("/mcp", mcp.app, methods=["POST"]),
            Mount("/dashboard", app=create_dashboard(services)),
        ],
        exception_handlers={
            GatewayError: handle_gateway_error,
            HTTPException: handle_http_exception,
            **{kind: handle_infrastructure_error for kind in INFRASTRUCTURE_ERRORS},
            Exception: handle_unexpected,
        },
        middleware=[*edge, Middleware(BodyDeadline, timeout_s=settings.body_read_timeout_s),
                    Middleware(RefuseNul),
                    # Innermost: the inference routes without the router (same endpoints as above).
                    Middleware(DirectRoutes, routes={**v1_routes.direct_routes, **v1_messages.direct_routes})],
        lifespan=lifespan,
    )
    app.state.services = services
    return app
