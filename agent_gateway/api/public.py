"""Public routes: the pool catalog for people and agents, and health."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agent_gateway.web.auth import services_of
from agent_gateway.web.catalog import plans_catalog, render_pool
from agent_gateway.web.rendering import ok
from agent_gateway.errors import NotFound
from agent_gateway.subscriptions.inventory import seats_available


async def list_pools(request: Request) -> Response:
    services = services_of(request)
    available = await seats_available(services.db, services.catalog)
    return ok([render_pool(p, services.catalog, available) for p in services.catalog.pools.values()])


async def get_pool(request: Request) -> Response:
    services = services_of(request)
    pool = services.catalog.pool(request.path_params["slug"])
    if pool is None:
        raise NotFound(f"No pool {request.path_params['slug']!r}. See GET /api/pools.", code="pool_not_found")
    available = await seats_available(services.db, services.catalog)
    return ok(render_pool(pool, services.catalog, available))


async def agent_plans(request: Request) -> Response:
    return ok(await plans_catalog(services_of(request)))


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


routes = [
    Route("/api/pools", list_pools, methods=["GET"]),
    Route("/api/pools/{slug}", get_pool, methods=["GET"]),
    Route("/api/agent/plans", agent_plans, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
]
