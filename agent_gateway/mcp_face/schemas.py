"""The MCP tools as an MCP client sees them: fixed names, descriptions an LLM can act on, and the
JSON Schemas of their arguments (the web floor's body models) and of their structured results."""

from __future__ import annotations

from typing import Any

from mcp import types
from pydantic import Field

from agent_gateway.web.bodies import CamelBody
from agent_gateway.web.orders import OrderBody, RenewBody, SubscribeBody


class NoArguments(CamelBody):
    pass


class KeyArguments(CamelBody):
    api_key: str = Field(min_length=1, max_length=200, description="The subscription key, sk_….")


class SnippetArguments(CamelBody):
    api_key: str | None = Field(default=None, min_length=1, max_length=200,
                                description="Optional: the sk_… key to put into the code (a placeholder otherwise).")


USDC = {"type": "string", "description": "An amount of USDC as a decimal string, e.g. \"10.00\"."}
ATOMIC = {"type": "string", "pattern": "^[0-9]+$", "description": "The same amount in atomic units (6 decimals)."}
NULLABLE_STRING = {"type": ["string", "null"]}

# A pool's funding round (null once it is past it): a seat bought now is a pledge whose period
# starts when the pool goes active.
FUNDING = {"type": "object", "description": "The funding round: seats pledged of the goal, and the deadline.",
           "properties": {"pledgedSeats": {"type": "integer"}, "goalSeats": {"type": "integer"},
                          "progress": {"type": "string", "description": "pledged/goal, e.g. \"37/50\""},
                          "deadline": NULLABLE_STRING},
           "required": ["pledgedSeats", "goalSeats", "progress", "deadline"]}

_BLOCK = {"type": "object", "properties": {
    "block": {"type": "string"}, "hoursUtc": {"type": "string"}, "pricePerMonth": USDC, "seats": {"type": "integer"},
    "availableSeats": {"type": "integer"}, "status": {"type": "string", "enum": ["available", "limited", "sold-out"]},
}, "required": ["block", "hoursUtc", "pricePerMonth", "availableSeats", "status"]}

_POOL = {"type": "object", "properties": {
    "slug": {"type": "string"}, "name": {"type": "string"}, "description": {"type": "string"},
    "models": {"type": "array", "items": {"type": "string"}}, "status": {"type": "string"},
    "seatsPerBlock": {"type": "integer"}, "annualDiscount": {"type": "string"}, "minPricePerMonth": USDC,
    "blocks": {"type": "array", "items": _BLOCK},
    "funding": {"anyOf": [FUNDING, {"type": "null"}]},
}, "required": ["slug", "name", "models", "status", "blocks"]}

# The x402 v2 PaymentRequired, as in the HTTP 402's PAYMENT-REQUIRED header.
_PAYMENT_REQUIRED = {"type": "object", "properties": {
    "x402Version": {"type": "integer", "const": 2},
    "resource": {"type": "object"},
    "accepts": {"type": "array", "items": {"type": "object", "properties": {
        "scheme": {"type": "string"}, "network": {"type": "string"}, "amount": ATOMIC, "asset": {"type": "string"},
        "payTo": {"type": "string"}, "maxTimeoutSeconds": {"type": "integer"}, "extra": {"type": "object"},
    }, "required": ["scheme", "network", "amount", "asset", "payTo", "maxTimeoutSeconds"]}},
}, "required": ["x402Version", "accepts"]}

_QUOTE = {"type": "object", "properties": {
    "pool": {"type": "string"}, "blocks": {"type": "array", "items": {"type": "string"}},
    "quantity": {"type": "integer"}, "billingCycle": {"type": "string", "enum": ["month", "year"]},
    "periodDays": {"type": "integer"}, "currency": {"type": "string", "const": "USDC"},
    "pricePerSeat": USDC, "total": USDC, "totalAtomic": ATOMIC,
    "paymentRequired": {"anyOf": [_PAYMENT_REQUIRED, {"type": "null"}],
                        "description": "What subscribe_pool will ask to be paid (null when payments are off)."},
}, "required": ["pool", "blocks", "quantity", "billingCycle", "total", "totalAtomic", "paymentRequired"]}

_SUBSCRIPTION = {"type": "object", "properties": {
    "id": {"type": "string"}, "pool": {"type": "string"}, "blocks": {"type": "array", "items": {"type": "string"}},
    "billingCycle": {"type": "string"}, "status": {"type": "string"}, "price": USDC,
    "currentPeriodStart": NULLABLE_STRING, "currentPeriodEnd": NULLABLE_STRING,
    "keyId": NULLABLE_STRING, "apiKey": {"type": "string", "description": "The sk_… key; shown only in this answer."},
}, "required": ["id", "pool", "blocks", "status", "currentPeriodEnd"]}

_PURCHASE = {"type": "object", "properties": {
    "paymentId": {"type": "string"}, "state": {"type": "string"}, "txHash": NULLABLE_STRING,
    "payer": {"type": "string"}, "amount": USDC, "amountAtomic": ATOMIC, "accountId": {"type": "string"},
    "managementKey": {**NULLABLE_STRING, "description": "An mk_… key for the wallet's new account (only when the "
                                                        "account was created by this payment)."},
    "subscriptions": {"type": "array", "items": _SUBSCRIPTION},
    "poll": {"type": "string", "description": "When the settlement is still confirming: where to poll it."},
    "message": {"type": "string"},
    "repeated": {"type": "boolean", "description": "A retry with an x402 payment-identifier already used for this "
                                                   "purchase: shown again, without plaintext keys."},
    "paymentIdentifier": {"type": "string"},
}, "required": ["paymentId"]}

_USAGE_WINDOW = {"type": "object", "properties": {
    "requests": {"type": "integer"}, "promptTokens": {"type": "integer"}, "completionTokens": {"type": "integer"},
    "errors": {"type": "integer"},
}, "required": ["requests", "promptTokens", "completionTokens", "errors"]}

_KEY_STATUS = {"type": "object", "properties": {
    "pool": {"type": "string"}, "models": {"type": "array", "items": {"type": "string"}},
    "blocks": {"type": "array", "items": {"type": "object", "properties": {
        "block": {"type": "string"}, "hoursUtc": {"type": "string"}}, "required": ["block", "hoursUtc"]}},
    "inBlockNow": {"type": "boolean"}, "expiresAt": {"type": "string"}, "subscriptionId": {"type": "string"},
    "status": {"type": "string"},
    "usage": {"type": "object", "additionalProperties": _USAGE_WINDOW,
              "description": "Per window (1h, 24h, 7d, 30d)."},
}, "required": ["pool", "blocks", "inBlockNow", "expiresAt", "usage"]}

_SNIPPETS = {"type": "object", "properties": {
    "baseUrls": {"type": "object", "properties": {"openai": {"type": "string"}, "anthropic": {"type": "string"}},
                 "required": ["openai", "anthropic"]},
    "model": {"type": "string"}, "apiKey": {"type": "string"},
    "snippets": {"type": "object", "properties": {
        "openaiPython": {"type": "string"}, "anthropicPython": {"type": "string"}, "curl": {"type": "string"}},
        "required": ["openaiPython", "anthropicPython", "curl"]},
    "notes": {"type": "string"},
}, "required": ["baseUrls", "model", "snippets"]}

_LIST_POOLS = {"type": "object", "properties": {
    "pools": {"type": "array", "items": _POOL},
    "paymentsEnabled": {"type": "boolean", "description": "Whether subscribe_pool and renew_subscription take x402."},
}, "required": ["pools", "paymentsEnabled"]}

_PAID = ("Paid with x402 (USDC, scheme exact): called without payment it answers an error whose structured content is "
         "the x402 PaymentRequired; sign it (EIP-3009) and call again with the payment in _meta[\"x402/payment\"]. "
         "The settlement's receipt comes back in _meta[\"x402/payment-response\"]. An x402 MCP client "
         "(e.g. the x402 SDK's x402MCPSession) does both calls for you.")

# (name, arguments model, output schema, description)
TOOL_SPECS: list[tuple[str, type[CamelBody], dict[str, Any], str]] = [
    ("list_pools", NoArguments, _LIST_POOLS,
     "List the inference pools for sale: their models, daily UTC time blocks, price per seat per month (USDC) and "
     "seats left in each block now. Start here to choose a pool and blocks."),
    ("quote", OrderBody, _QUOTE,
     "Price an order (pool, blocks, quantity, billing cycle) without buying: the total in USDC and in atomic units, "
     "and the x402 payment requirements subscribe_pool will ask for. Fails if the pool or a block is unknown "
     "or sold out."),
    ("subscribe_pool", SubscribeBody, _PURCHASE,
     "Buy seats on a pool. " + _PAID + " Returns the subscriptions, each with its sk_… API key (an OpenAI-compatible "
     "key for this gateway's /v1, shown only once: keep it), and, when the paying wallet has no account yet, a "
     "management key (mk_…). The same payment is never accepted twice."),
    ("renew_subscription", RenewBody, _PURCHASE,
     "Extend an active subscription by one more period, keeping its seats and key. " + _PAID),
    ("key_status", KeyArguments, _KEY_STATUS,
     "Show what an sk_… key can do now: its pool and models, its time blocks and whether one is open now, when it "
     "expires, and its usage over the last hour, day, 7 and 30 days."),
    ("connection_snippets", SnippetArguments, _SNIPPETS,
     "Get base URLs and ready-to-run code (OpenAI SDK, Anthropic SDK, curl) to call the models with an sk_… key."),
]


def tool_definitions() -> list[types.Tool]:
    return [
        types.Tool(name=name, description=description, inputSchema=model.model_json_schema(by_alias=True),
                   outputSchema=output)
        for name, model, output, description in TOOL_SPECS
    ]


ARGUMENTS: dict[str, type[CamelBody]] = {name: model for name, model, _, _ in TOOL_SPECS}
PAID_TOOLS = frozenset({"subscribe_pool", "renew_subscription"})
