"""Prometheus metrics and the /metrics endpoint (behind a bearer token when AGW_METRICS_TOKEN is set).

Under `serve --workers N` every worker writes its values to files in PROMETHEUS_MULTIPROC_DIR
(prometheus_client's multiprocess mode, chosen by that variable before this module is imported),
and /metrics, whichever worker answers it, adds up all of them."""

from __future__ import annotations

import hmac
import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.requests import Request
from starlette.responses import Response

from agent_gateway.errors import AuthenticationError

PROXY_REQUESTS = Counter(
    "agw_proxy_requests_total",
    "Inference requests by endpoint and outcome (ok, refused_*, upstream_error, client_disconnected, revoked).",
    ["endpoint", "outcome"],
)
_PROXY_REQUEST_CHILDREN: dict[tuple[str, str], Counter] = {}


def proxy_requests(endpoint: str, outcome: str) -> Counter:
    """PROXY_REQUESTS for one endpoint and outcome; `labels()` takes a lock and builds a key on
    every call, which is paid twice per request (a few endpoints × outcomes, so cached)."""
    child = _PROXY_REQUEST_CHILDREN.get((endpoint, outcome))
    if child is None:
        child = _PROXY_REQUEST_CHILDREN[endpoint, outcome] = PROXY_REQUESTS.labels(endpoint, outcome)
    return child


PROXY_IN_FLIGHT = Gauge("agw_proxy_in_flight", "Inference requests holding a lease right now.",
                        multiprocess_mode="livesum")  # several workers: the sum over the live ones
PROXY_OVERHEAD = Histogram(
    "agw_proxy_overhead_seconds",
    "Time the gateway adds to a request: admission before the upstream call plus the tail after it.",
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
STREAMS_REVOKED = Counter("agw_streams_revoked_total", "Running streams ended because their key was revoked.")
POOLS_FUNDED = Counter("agw_pools_funded_total",
                       "Funding pools moved to activating because their pledges reached the goal, by pool.", ["pool"])
BACKGROUND_PASSES = Counter(
    "agw_background_passes_total",
    "Background passes by name and outcome: ran (here), skipped (another process on the database was running it), "
    "failed (logged; run again next interval).",
    ["name", "outcome"],
)
SUBSCRIPTIONS_EXPIRED = Counter("agw_subscriptions_expired_total", "Subscriptions expired by the background job.")
PAYMENTS_REVOKED = Counter(
    "agw_payments_revoked_total",
    "Delivered or credited payments revoked because their transfer was reorganised away for good, by reason.",
    ["reason"],
)
PAYMENTS_PAID_AFTER_FAILURE = Counter(
    "agw_payments_paid_after_failure_total",
    "Failed x402 payments whose authorization paid payTo afterwards; the amount was credited to the payer's balance.",
)
REFUNDS = Counter(
    "agw_refunds_total",
    "Refunds by destination (balance, chain) and outcome (refunded; canceled: the payment was revoked first; "
    "reverted: a refund transfer reverted and is signed again; refused: the refund wallet lacked USDC or gas).",
    ["destination", "outcome"],
)
POOLS_CLOSED = Counter("agw_pools_closed_total",
                       "Funding rounds closed by a missed deadline, by pool and deadline (funding, activation).",
                       ["pool", "deadline"])
FACILITATOR_REQUESTS = Counter(
    "agw_facilitator_requests_total",
    "Requests to the x402 facilitator by endpoint (verify, settle, supported) and outcome (ok, refused, "
    "unavailable, bad_response).",
    ["endpoint", "outcome"],
)
CONNECTIONS_REFUSED = Counter("agw_connections_refused_total",
                              "New connections closed at once because the process had AGW_MAX_CONNECTIONS open.")
SLOW_HEADERS_CLOSED = Counter("agw_slow_headers_closed_total",
                              "Connections closed because request headers took over AGW_HEADER_READ_TIMEOUT_S.")
RELAYER_BALANCE = Gauge("agw_relayer_balance_eth",
                        "The relayer's native balance (ETH), which pays settlement gas; refreshed by the background job.")
RELAYER_SETTLEMENTS_LEFT = Gauge("agw_relayer_settlements_left",
                                 "Settlements the relayer's balance pays for at the current fees (alert on this).")


async def metrics_endpoint(request: Request) -> Response:
    token = request.app.state.services.settings.metrics_token
    if token is not None and not _bearer_matches(request.headers.get("authorization", ""), token):
        raise AuthenticationError("/metrics needs 'Authorization: Bearer <AGW_METRICS_TOKEN>'.",
                                  code="invalid_metrics_token", headers={"WWW-Authenticate": "Bearer"})
    return Response(exposition(), media_type=CONTENT_TYPE_LATEST)


def exposition() -> bytes:
    """The metrics text: this process's, or every worker's added up in multiprocess mode."""
    if os.environ.get(MULTIPROCESS_DIR_VARIABLE):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest()


MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


def _bearer_matches(header: str, token: str) -> bool:
    scheme, _, given = header.strip().partition(" ")
    # Compared in constant time, as bytes so a non-ASCII header cannot raise.
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())
