"""Discovery documents for agents that know only the base URL: `/.well-known/x402`, `/openapi.json`,
the A2A agent card (`/.well-known/agent-card.json`, and `/.well-known/agent.json` for older
readers) and `/llms.txt`.

Every URL in them is absolute and built from AGW_PUBLIC_URL, never from the Host header. With
payments off they name no x402 path: an agent is pointed at the management-key path instead."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from agent_gateway import __version__
from agent_gateway.api.openapi import openapi_document
from agent_gateway.web.auth import services_of
from agent_gateway.services import Services

AGENT_PATH = "/api/agent/subscribe-pool"
# The MCP revision the /mcp endpoint speaks (the official SDK's latest), named in the agent card.
MCP_PROTOCOL_VERSION = "2025-11-25"
_CACHE = {"Cache-Control": "public, max-age=300"}


def x402_manifest(services: Services) -> dict[str, Any]:
    base = services.settings.external_url
    on = services.payments.enabled
    if on:
        instructions = (f"POST {base}{AGENT_PATH} with a JSON order {{\"pool\", \"blocks\", \"quantity\", "
                        f"\"billingCycle\"}} (catalog: GET {base}/api/agent/plans). The 402 challenge prices "
                        "that order and its bazaar extension carries the input schema; pay it with x402 (exact, "
                        "EIP-3009 USDC) and retry with PAYMENT-SIGNATURE. The 201 answer holds the seat's sk_ key "
                        f"for {base}/v1 and a management key. Without a body the challenge prices a default order. "
                        f"Renewals: POST {base}/api/agent/renew (see {base}/openapi.json). Tools: {base}/mcp.")
    else:
        instructions = ("This gateway takes no x402 payments. Seats are bought with a management key (mk_): "
                        f"POST {base}/api/pools/{{slug}}/subscribe (see {base}/openapi.json and {base}/llms.txt). "
                        f"Tools: {base}/mcp.")
    return {"version": 1, "resources": [base + AGENT_PATH] if on else [], "mcp": f"{base}/mcp",
            "instructions": instructions}


def agent_card(services: Services) -> dict[str, Any]:
    """An A2A 1.0 agent card. We serve no A2A binding: the one interface is the MCP endpoint,
    named with the binding `MCP` so that an A2A client does not send A2A calls to it."""
    base = services.settings.external_url
    on = services.payments.enabled
    buy = ("over x402 (USDC, EIP-3009) in one call, or with a management key" if on
           else "with a management key (mk_)")
    skills = [
        {"id": "browse-pools", "name": "Browse pools",
         "description": "List the inference pools, their models, time blocks (hours UTC), prices and seats left.",
         "tags": ["catalog", "pricing", "llm"], "examples": [f"GET {base}/api/agent/plans"],
         "inputModes": ["application/json"], "outputModes": ["application/json"]},
        {"id": "buy-seat", "name": "Buy a seat",
         "description": f"Buy reserved seats on a pool {buy}; the answer holds the seat's sk_ API key.",
         "tags": ["purchase", "subscription"] + (["x402", "usdc"] if on else []),
         "examples": [f"POST {base}{AGENT_PATH}" if on else f"POST {base}/api/pools/{{slug}}/subscribe"],
         "inputModes": ["application/json"], "outputModes": ["application/json"]},
        {"id": "manage-keys", "name": "Manage keys and usage",
         "description": "With a management key: list subscriptions, mint, disable, enable and delete sk_ keys, "
                        "read usage" + (", renew over x402" if on else "") + ".",
         "tags": ["keys", "usage"], "examples": [f"GET {base}/api/subscriptions"],
         "inputModes": ["application/json"], "outputModes": ["application/json"]},
        {"id": "inference", "name": "LLM inference",
         "description": "OpenAI-compatible chat completions, completions and embeddings with the seat's sk_ key, "
                        "in the seat's blocks.",
         "tags": ["llm", "openai", "inference"], "examples": [f"POST {base}/v1/chat/completions"],
         "inputModes": ["application/json"], "outputModes": ["application/json", "text/event-stream"]},
    ]
    return {
        "name": "agent_gateway",
        "description": "Reserved seats on LLM inference pools, bought " + buy + ", used through an "
                       "OpenAI-compatible API. Tools over MCP; every operation in OpenAPI.",
        "version": __version__,
        "supportedInterfaces": [{"url": f"{base}/mcp", "protocolBinding": "MCP",
                                 "protocolVersion": MCP_PROTOCOL_VERSION}],
        "url": f"{base}/mcp",  # for A2A 0.x readers
        "provider": {"organization": "agent_gateway", "url": base},
        "documentationUrl": f"{base}/llms.txt",
        "capabilities": {"streaming": False, "pushNotifications": False},
        "defaultInputModes": ["application/json"],
        "defaultOutputModes": ["application/json"],
        "skills": skills,
        "securitySchemes": {
            "managementKey": {"httpAuthSecurityScheme": {"scheme": "Bearer", "bearerFormat": "mk_…",
                                                         "description": "Management key."}},
            "apiKey": {"httpAuthSecurityScheme": {"scheme": "Bearer", "bearerFormat": "sk_…",
                                                  "description": "A seat's API key, for /v1."}},
        },
        "openapi": f"{base}/openapi.json",
        "llms": f"{base}/llms.txt",
        "x402": f"{base}/.well-known/x402" if on else None,
    }


def llms_text(services: Services) -> str:
    base = services.settings.external_url
    on = services.payments.enabled
    lines = [
        "# agent_gateway",
        "",
        "> Reserved seats on LLM inference pools. A seat is an sk_ API key for the OpenAI-compatible "
        f"API at {base}/v1, usable in its time blocks (hours UTC), one request at a time.",
        "",
        "## Find",
        f"- Catalog (pools, models, blocks, prices, seats left): GET {base}/api/agent/plans",
        f"- Every operation: {base}/openapi.json",
        f"- MCP tools (Streamable HTTP, no auth to connect): {base}/mcp",
        f"- Agent card: {base}/.well-known/agent-card.json",
        "",
        "## Buy",
    ]
    if on:
        lines += [
            f"- Over x402 (USDC, exact scheme, EIP-3009): POST {base}{AGENT_PATH} with "
            '{"pool": "<slug>", "blocks": ["<block>"], "quantity": 1, "billingCycle": "month"}. '
            "The 402 answer's PAYMENT-REQUIRED header is the x402 challenge for that order; sign it and retry "
            "with PAYMENT-SIGNATURE. The 201 answer has the seat's apiKey (sk_) and a managementKey (mk_).",
            f"- x402 manifest: {base}/.well-known/x402",
            f"- Lost the answer? Sign in with the paying wallet: POST {base}/api/agent/auth/challenge, "
            f"then POST {base}/api/agent/auth/sign-in.",
            "- Retry safely: name the purchase with the x402 payment-identifier extension (the challenge "
            'declares it; put "id", 16-128 characters of A-Z a-z 0-9 _ -, in the payment\'s '
            'extensions["payment-identifier"].info). The same payment sent again under that id returns the same '
            "purchase, without its keys (they are shown once: sign in for them); another payment under it is a 409.",
            f"- Renew: POST {base}/api/agent/renew with {{\"subscriptionId\": \"…\"}} over x402.",
        ]
    lines += [
        f"- With a management key (Authorization: Bearer mk_…): POST {base}/api/pools/<slug>/subscribe with "
        '{"blocks": ["<block>"], "quantity": 1}, paid from the account balance; then POST '
        f'{base}/api/keys/subscription with {{"name": "…", "subscriptionId": "…"}} for the sk_ key.',
        "",
        "## Use",
        f"- POST {base}/v1/chat/completions with Authorization: Bearer sk_… and a model of the seat's pool "
        f"(GET {base}/v1/models). Usage: GET {base}/v1/usage.",
        "",
    ]
    return "\n".join(lines)


async def well_known_x402(request: Request) -> Response:
    return JSONResponse(x402_manifest(services_of(request)), headers=_CACHE)


async def openapi(request: Request) -> Response:
    services = services_of(request)
    document = openapi_document(services.settings.external_url, services.catalog,
                                payments_on=services.payments.enabled, version=__version__)
    return JSONResponse(document, headers=_CACHE)


async def well_known_agent_card(request: Request) -> Response:
    card = {k: v for k, v in agent_card(services_of(request)).items() if v is not None}
    return JSONResponse(card, headers=_CACHE)


async def llms_txt(request: Request) -> Response:
    return PlainTextResponse(llms_text(services_of(request)), media_type="text/markdown; charset=utf-8",
                             headers=_CACHE)


def discovery_links(base: str) -> dict[str, str]:
    """The documents, for the front door (`/`)."""
    return {"openapi": f"{base}/openapi.json", "agentCard": f"{base}/.well-known/agent-card.json",
            "x402": f"{base}/.well-known/x402", "llms": f"{base}/llms.txt", "mcp": f"{base}/mcp"}


routes = [
    Route("/.well-known/x402", well_known_x402, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
    Route("/.well-known/agent-card.json", well_known_agent_card, methods=["GET"]),
    Route("/.well-known/agent.json", well_known_agent_card, methods=["GET"]),
    Route("/llms.txt", llms_txt, methods=["GET"]),
]
