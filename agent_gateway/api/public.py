"""Public routes: the pool catalog for people and agents, and health."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from agent_gateway.api.discovery import discovery_links
from agent_gateway.web.auth import services_of
from agent_gateway.web.catalog import funding_now, plans_catalog, pools_now, render_pool
from agent_gateway.web.rendering import ok
from agent_gateway.errors import NotFound
from agent_gateway.subscriptions.inventory import seats_available


async def list_pools(request: Request) -> Response:
    services = services_of(request)
    return ok(await pools_now(services))


async def get_pool(request: Request) -> Response:
    services = services_of(request)
    pool = services.catalog.pool(request.path_params["slug"])
    if pool is None:
        raise NotFound(f"No pool {request.path_params['slug']!r}. See GET /api/pools.", code="pool_not_found")
    available = await seats_available(services.db, services.catalog)
    return ok(render_pool(pool, services.catalog, available, await funding_now(services)))


async def agent_plans(request: Request) -> Response:
    return ok(await plans_catalog(services_of(request)))


def prefers_html(accept: str) -> bool:
    """True when the Accept header ranks text/html above JSON (what browsers send); `*/*` is not."""
    ranks: dict[str, float] = {}
    for part in accept.split(","):
        media, _, params = part.strip().partition(";")
        quality = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        ranks[media.strip().lower()] = quality
    html = max(ranks.get("text/html", 0.0), ranks.get("application/xhtml+xml", 0.0))
    return html > 0 and html >= ranks.get("application/json", 0.0)


async def root(request: Request) -> Response:
    """`/`: a person's browser goes to the dashboard; anything else gets where to go, as JSON."""
    services = services_of(request)
    base = services.settings.external_url
    if prefers_html(request.headers.get("accept", "")):
        return RedirectResponse(f"{base}/dashboard/", status_code=303)
    links = discovery_links(base)
    if not services.payments.enabled:  # never point agents at a payment path that is switched off
        del links["x402"]
    return JSONResponse({
        "name": "agent_gateway",
        "description": "Reserved seats on LLM inference pools, bought with a management key"
                       + (" or by agents over x402." if services.payments.enabled else "."),
        "dashboard": f"{base}/dashboard/",
        "pools": f"{base}/api/pools",
        "plans": f"{base}/api/agent/plans",
        "inference": f"{base}/v1",
        **links,
    })


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


routes = [
    Route("/", root, methods=["GET"]),
    Route("/api/pools", list_pools, methods=["GET"]),
    Route("/api/pools/{slug}", get_pool, methods=["GET"]),
    Route("/api/agent/plans", agent_plans, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
]
