"""Prometheus metrics and the /metrics endpoint."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response

PROXY_REQUESTS = Counter(
    "agw_proxy_requests_total",
    "Inference requests by endpoint and outcome (ok, refused_*, upstream_error, client_disconnected, revoked).",
    ["endpoint", "outcome"],
)
PROXY_IN_FLIGHT = Gauge("agw_proxy_in_flight", "Inference requests holding a lease right now.")
PROXY_OVERHEAD = Histogram(
    "agw_proxy_overhead_seconds",
    "Time the gateway adds to a request: admission before the upstream call plus the tail after it.",
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
STREAMS_REVOKED = Counter("agw_streams_revoked_total", "Running streams ended because their key was revoked.")
SUBSCRIPTIONS_EXPIRED = Counter("agw_subscriptions_expired_total", "Subscriptions expired by the background job.")
PAYMENTS_REVOKED = Counter(
    "agw_payments_revoked_total",
    "Delivered or credited payments revoked because their transfer was reorganised away for good, by reason.",
    ["reason"],
)


async def metrics_endpoint(request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
