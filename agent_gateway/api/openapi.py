"""`GET /openapi.json`: OpenAPI 3.1 of the public, management, agent and inference API.

Request bodies come from the pydantic models the routes read (so the document cannot drift from
the code); responses are written here by hand. x402-paid operations carry their 402 response and
`x-payment-info` (x402scan's shape: a dynamic price, `protocols: ["x402"]`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from agent_gateway.api.agents import ChallengeBody, SignInBody
from agent_gateway.api.management import ManagementKeyBody, MintKeyBody, SubscribeBody
from agent_gateway.web.orders import RenewBody, SubscribePoolBody
from agent_gateway.web.x402 import body_schema
from agent_gateway.catalog.pools import Catalog
from agent_gateway.money import format_usdc

BODY_MODELS: list[type[BaseModel]] = [SubscribePoolBody, RenewBody, ChallengeBody, SignInBody, SubscribeBody,
                                      MintKeyBody, ManagementKeyBody]

_STR = {"type": "string"}
_NULLABLE_STR = {"type": ["string", "null"]}
_DATE = {"type": ["string", "null"], "format": "date-time"}
_USDC = {"type": "string", "description": "USDC, as a decimal string (e.g. \"10.00\")."}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema


def _data(schema: dict[str, Any]) -> dict[str, Any]:
    """The `{"success": true, "data": …}` envelope of the /api answers."""
    return _obj({"success": {"type": "boolean", "const": True}, "data": schema}, ["success", "data"])


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(description, _ref("Error"))


def _body(model: type[BaseModel]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(model.__name__)}}}


_SUBSCRIPTION = _obj({
    "id": _STR, "pool": _STR, "blocks": {"type": "array", "items": _STR},
    "billingCycle": {"enum": ["month", "year"]}, "status": _STR, "price": _USDC,
    "currentPeriodStart": _DATE, "currentPeriodEnd": _DATE, "paymentId": _NULLABLE_STR,
    "hasKey": {"type": "boolean"}, "keyId": _NULLABLE_STR, "createdAt": _DATE,
    "apiKey": {"type": "string", "description": "The sk_ key, only in the answer that created it."},
}, ["id", "pool", "blocks", "status"])
_KEY = _obj({
    "id": _STR, "name": _STR, "keyPreview": _STR, "prefix": _STR, "lastFour": _STR, "status": _STR,
    "isActive": {"type": "boolean"}, "keyType": _STR, "subscriptionId": _STR, "subscriptionStatus": _STR,
    "subscriptionExpiresAt": _DATE, "pool": _STR, "blocks": {"type": "array", "items": _STR},
    "createdAt": _DATE, "lastUsedAt": _DATE,
    "apiKey": {"type": "string", "description": "The sk_ key, only in the answer that minted it."},
}, ["id", "name", "status", "subscriptionId"])
_MANAGEMENT_KEY = _obj({"id": _STR, "name": _STR, "keyPreview": _STR, "createdAt": _DATE, "lastUsedAt": _DATE,
                        "apiKey": {"type": "string", "description": "The mk_ key, only when created."}},
                       ["id", "name"])
_QUOTE = _obj({"pool": _STR, "blocks": {"type": "array", "items": _STR}, "quantity": {"type": "integer"},
               "billingCycle": _STR, "periodDays": {"type": "integer"}, "currency": {"const": "USDC"},
               "pricePerSeat": _USDC, "total": _USDC, "totalAtomic": _STR},
              ["pool", "blocks", "quantity", "total", "totalAtomic"])
_POOL = _obj({
    "id": _STR, "slug": _STR, "name": _STR, "description": _STR, "models": {"type": "array", "items": _STR},
    "status": {"enum": ["funding", "activating", "active", "paused", "closed"]}, "seatsPerBlock": {"type": "integer"},
    "annualDiscount": _STR, "minPricePerMonth": _USDC,
    "blocks": {"type": "array", "items": _obj({
        "block": _STR, "hoursUtc": _STR, "pricePerMonth": _USDC, "seats": {"type": "integer"},
        "availableSeats": {"type": "integer"}, "status": {"enum": ["available", "limited", "sold-out"]}})},
    "funding": {"anyOf": [{"type": "null"}, _obj({
        "pledgedSeats": {"type": "integer"}, "goalSeats": {"type": "integer"}, "progress": _STR, "deadline": _DATE},
        ["pledgedSeats", "goalSeats", "progress", "deadline"])],
        "description": "The funding round (null once past it): a seat bought now is a pledge, whose period starts "
                       "when the pool goes active."},
}, ["slug", "name", "status", "blocks"])
_DELIVERY = _obj({
    "paymentId": _STR, "txHash": _NULLABLE_STR, "payer": _NULLABLE_STR, "amount": _STR, "accountId": _STR,
    "managementKey": {"type": ["string", "null"], "description": "A new mk_ key when the payer had no account."},
    "subscriptions": {"type": "array", "items": _ref("Subscription")},
    "credited": _USDC, "creditedAtomic": _STR, "message": _STR,
    "repeated": {"type": "boolean", "description": "A retry with an x402 payment-identifier already used for this "
                                                   "purchase: shown again, without plaintext keys."},
    "paymentIdentifier": _STR,
}, ["paymentId", "accountId", "subscriptions"])
_SETTLING = _obj({"paymentId": _STR, "state": _STR, "txHash": _NULLABLE_STR, "poll": _STR, "message": _STR,
                  "repeated": {"type": "boolean"}, "paymentIdentifier": _STR},
                 ["paymentId", "state", "poll"])
_PAYMENT_REQUIRED = _obj({
    "error": _ref("ErrorDetail"), "x402Version": {"const": 2},
    "resource": _obj({"url": {"type": "string", "format": "uri"}, "description": _STR, "mimeType": _STR}),
    "accepts": {"type": "array", "items": _obj({
        "scheme": {"const": "exact"}, "network": _STR, "amount": _STR, "asset": _STR, "payTo": _STR,
        "maxTimeoutSeconds": {"type": "integer"}, "extra": {"type": "object"}})},
    "extensions": _obj({"bazaar": {"type": "object", "description": "How to call this resource: the x402 "
                                                                    "bazaar extension (input schema and an example)."}}),
    "quote": _ref("Quote"), "v1": {"type": "object", "description": "The same offer in x402 v1 form, on networks "
                                                                    "v1 can name."},
}, ["error", "x402Version", "accepts"])
_PLANS = _obj({"currency": {"const": "USDC"}, "x402": {"type": "boolean"},
               "products": {"type": "array", "items": {"type": "object"}}}, ["currency", "x402", "products"])
_USAGE = {"type": "object", "description": "Requests and tokens by period."}
_OPENAI_OBJECT = {"type": "object", "description": "The OpenAI-compatible request, passed to the pool's upstream; "
                                                   "`model` must be one of the key's pool models.",
                  "properties": {"model": _STR, "stream": {"type": "boolean"}}, "required": ["model"]}
_MESSAGES_OBJECT = {"type": "object", "description": "The Anthropic Messages request, passed to the pool's upstream "
                                                     "as it is; `model` must be one of the key's pool models.",
                    "properties": {"model": _STR, "stream": {"type": "boolean"}}, "required": ["model"]}

_PAID = "x402-paid"
_HEADER_PAYMENT = {"name": "PAYMENT-SIGNATURE", "in": "header", "required": False, "schema": _STR,
                   "description": "x402 v2 payment (base64 JSON); `X-PAYMENT` carries a v1 payment."}


def _x402_responses() -> dict[str, Any]:
    return {
        "402": {"description": "Payment required: the x402 challenge (also base64 in the PAYMENT-REQUIRED header), "
                               "priced for this order, with the bazaar extension describing the call.",
                "headers": {"PAYMENT-REQUIRED": {"schema": _STR}},
                "content": {"application/json": {"schema": _PAYMENT_REQUIRED}}},
        "202": _json("Settlement sent; the seats are delivered once it is confirmed: poll the payment.",
                     _data(_SETTLING)),
        "429": _error("Too many failed payment attempts from this address."),
        "503": _error("Payments are switched off on this gateway, or the chain cannot be reached."),
    }


def _payment_info(catalog: Catalog) -> dict[str, Any]:
    prices = [p for pool in catalog.pools.values() for p in pool.prices_atomic.values()]
    price: dict[str, Any] = {"mode": "dynamic", "currency": "USD",
                             "description": "Computed from the pool, the blocks, the quantity and the billing "
                                            "cycle; the 402 challenge names the exact USDC amount."}
    if prices:
        price["min"] = format_usdc(min(prices))
    return {"price": price, "protocols": ["x402"]}


def _operation(summary: str, responses: dict[str, Any], *, tags: list[str], security: str | None = None,
               body: type[BaseModel] | None = None, body_optional: bool = False,
               parameters: list[dict[str, Any]] | None = None, paid: dict[str, Any] | None = None,
               description: str | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": tags, "responses": responses}
    if description:
        op["description"] = description
    if security:
        op["security"] = [{security: []}]
    if body is not None:
        op["requestBody"] = _body(body)
        if body_optional:
            op["requestBody"]["required"] = False
    if parameters:
        op["parameters"] = parameters
    if paid is not None:
        op["responses"] = {**responses, **_x402_responses()}
        op["x-payment-info"] = paid
        op.setdefault("parameters", []).append(_HEADER_PAYMENT)
    return op


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": _STR, "description": description}


def openapi_document(base_url: str, catalog: Catalog, *, payments_on: bool, version: str) -> dict[str, Any]:
    """The whole document. With payments off, x402 is not offered: no paid operation is listed as such."""
    paid = _payment_info(catalog) if payments_on else None
    bad = _error("The request is invalid (the error names the field).")
    unauth = _error("Missing or invalid key.")
    not_found = _error("Not found.")
    mk, sk = "managementKey", "apiKey"
    slug = _path_param("slug", "The pool slug (see GET /api/pools).")
    key_id = _path_param("key_id", "The key id.")
    management_tags, agent_tags = ["management"], ["agents"]
    paths: dict[str, Any] = {
        "/": {"get": _operation("Where to go: links to the catalog, the inference API and the discovery documents",
                                {"200": _json("Links", {"type": "object"}),
                                 "303": {"description": "A browser (Accept: text/html) is sent to the dashboard."}},
                                tags=["public"])},
        "/healthz": {"get": _operation("Liveness", {"200": _json("Alive", _obj({"status": {"const": "ok"}}))},
                                       tags=["public"])},
        "/metrics": {"get": _operation(
            "Prometheus metrics", {"200": {"description": "Prometheus text format",
                                           "content": {"text/plain": {"schema": _STR}}},
                                   "401": _error("AGW_METRICS_TOKEN is set and the bearer token is not it.")},
            tags=["public"], security="metricsToken")},
        "/api/pools": {"get": _operation("The pool catalog", {"200": _json("Pools", _data({"type": "array",
                                                                                          "items": _ref("Pool")}))},
                                         tags=["public"])},
        "/api/pools/{slug}": {"get": _operation("One pool", {"200": _json("The pool", _data(_ref("Pool"))),
                                                            "404": not_found}, tags=["public"], parameters=[slug])},
        "/api/agent/plans": {"get": _operation("The catalog in the shape agents quote from",
                                               {"200": _json("Plans", _data(_PLANS))}, tags=agent_tags)},
        "/api/agent/subscribe-pool": {"post": _operation(
            "Buy seats: over x402, or by claiming a USDC transfer (txHash + signature)",
            {"201": _json("Delivered: the subscriptions with their sk_ keys, and a management key for a new account",
                          _data(_ref("Delivery"))),
             "200": _json("A retry under an x402 payment-identifier that already bought this purchase: the same "
                          "purchase, keys without their plaintext", _data(_ref("Delivery"))),
             "400": bad, "404": not_found,
             "409": _error("Sold out, the pool is paused, or the payment-identifier names another purchase.")},
            tags=agent_tags, body=SubscribePoolBody, body_optional=True, paid=paid,
            description="Without a body and without a payment, the answer is the 402 challenge for the default order "
                        "(one seat, the cheapest open block of the first active pool, one month). A payment always "
                        "needs its order as the body.")},
        "/api/agent/renew": {"post": _operation(
            "Renew a subscription over x402",
            {"200": _json("Renewed (or, for a retry under its x402 payment-identifier, the same renewal again)",
                          _data(_ref("Delivery"))), "400": bad, "404": not_found,
             "409": _error("The subscription is not active, or the payment-identifier names another purchase.")},
            tags=agent_tags, body=RenewBody, paid=paid)},
        "/api/agent/payments/{payment_id}": {"get": _operation(
            "A payment's state", {"200": _json("The payment", _data({"type": "object"})), "404": not_found},
            tags=agent_tags, parameters=[_path_param("payment_id", "The payment id from the purchase answer.")])},
        "/api/agent/auth/challenge": {"post": _operation(
            "Sign-in challenge for the paying wallet (EIP-4361)",
            {"201": _json("The message to sign", _data(_obj({"challengeId": _STR, "message": _STR, "expiresAt": _DATE,
                                                              "signWith": _STR}))),
             "400": bad, "429": _error("Too many challenges from this address.")},
            tags=agent_tags, body=ChallengeBody)},
        "/api/agent/auth/sign-in": {"post": _operation(
            "Sign in with the wallet's signature: a new management key for its account",
            {"201": _json("Signed in", _data(_obj({"accountId": _STR, "managementKey": _STR}))),
             "400": bad, "401": _error("The signature does not match the challenge."), "404": not_found},
            tags=agent_tags, body=SignInBody)},
        "/api/account": {"get": _operation(
            "The account", {"200": _json("The account", _data(_obj({"id": _STR, "name": _STR, "balance": _USDC,
                                                                    "walletAddress": _NULLABLE_STR,
                                                                    "createdAt": _DATE}))), "401": unauth},
            tags=management_tags, security=mk)},
        "/api/pools/{slug}/subscribe": {"post": _operation(
            "Buy seats from the account's balance" + (", or over x402" if payments_on else ""),
            {"201": _json("The subscriptions (from the balance), or the x402 delivery",
                          _data(_obj({"quote": _ref("Quote"), "subscriptions": {"type": "array",
                                                                                "items": _ref("Subscription")}}))),
             "400": bad, "401": unauth, "404": not_found,
             "409": _error("Sold out, the pool is paused, or the x402 payment-identifier names another purchase.")}
            | ({"200": _json("A retry under an x402 payment-identifier that already bought this purchase: the same "
                             "purchase, keys without their plaintext", _data(_ref("Delivery")))} if payments_on
               else {"402": _error("The balance does not cover the order.")}),
            tags=management_tags, security=mk, body=SubscribeBody, parameters=[slug], paid=paid)},
        "/api/subscriptions": {"get": _operation(
            "The account's subscriptions", {"200": _json("Subscriptions", _data({"type": "array",
                                                                               "items": _ref("Subscription")})),
                                            "401": unauth}, tags=management_tags, security=mk)},
        "/api/keys/subscription": {"post": _operation(
            "Mint an sk_ key for a subscription", {"201": _json("The key (apiKey shown once)", _data(_ref("Key"))),
                                                   "400": bad, "401": unauth, "404": not_found,
                                                   "409": _error("The subscription already has a key.")},
            tags=management_tags, security=mk, body=MintKeyBody)},
        "/api/keys": {"get": _operation("The account's sk_ keys",
                                        {"200": _json("Keys", _data({"type": "array", "items": _ref("Key")})),
                                         "401": unauth}, tags=management_tags, security=mk)},
        "/api/keys/{key_id}/disable": {"post": _operation(
            "Disable a key", {"200": _json("The key", _data(_ref("Key"))), "401": unauth, "404": not_found,
                              "409": _error("The key cannot be disabled in its state.")},
            tags=management_tags, security=mk, parameters=[key_id])},
        "/api/keys/{key_id}/enable": {"post": _operation(
            "Enable a key", {"200": _json("The key", _data(_ref("Key"))), "401": unauth, "404": not_found,
                             "409": _error("The key cannot be enabled in its state.")},
            tags=management_tags, security=mk, parameters=[key_id])},
        "/api/keys/{key_id}": {"delete": _operation(
            "Delete a key", {"200": _json("Deleted", _data(_obj({"id": _STR, "deleted": {"type": "boolean"}}))),
                             "401": unauth, "404": not_found}, tags=management_tags, security=mk,
            parameters=[key_id])},
        "/api/management-keys": {
            "post": _operation("Create a management key", {"201": _json("The key (apiKey shown once)",
                                                                        _data(_ref("ManagementKey"))),
                                                           "400": bad, "401": unauth},
                               tags=management_tags, security=mk, body=ManagementKeyBody),
            "get": _operation("The account's management keys",
                              {"200": _json("Keys", _data({"type": "array", "items": _ref("ManagementKey")})),
                               "401": unauth}, tags=management_tags, security=mk)},
        "/api/management-keys/{key_id}": {"delete": _operation(
            "Revoke a management key", {"200": _json("Revoked", _data(_obj({"id": _STR,
                                                                           "revoked": {"type": "boolean"}}))),
                                        "401": unauth, "404": not_found, "409": _error("The last key stays.")},
            tags=management_tags, security=mk, parameters=[key_id])},
        "/api/usage": {"get": _operation("Usage by key", {"200": _json("Keys with their usage", _data({
            "type": "array", "items": {"allOf": [_ref("Key"), _obj({"usage": _USAGE})]}})), "401": unauth},
            tags=management_tags, security=mk)},
    }
    for path, summary in [("/v1/chat/completions", "Chat completions (OpenAI-compatible; stream with SSE)"),
                          ("/v1/completions", "Completions (OpenAI-compatible)"),
                          ("/v1/embeddings", "Embeddings (OpenAI-compatible)")]:
        paths[path] = {"post": _operation(summary, _inference_responses(), tags=["inference"], security=sk,
                                          description=_INFERENCE_NOTE)}
        paths[path]["post"]["requestBody"] = {"required": True,
                                              "content": {"application/json": {"schema": _OPENAI_OBJECT}}}
    for prefix in ("", "/anthropic"):
        for path, summary in [("/v1/messages", "Anthropic Messages (stream with SSE)"),
                              ("/v1/messages/count_tokens", "Anthropic Messages: count a request's input tokens")]:
            op = _operation(summary, _messages_responses(), tags=["inference"], description=_MESSAGES_NOTE)
            op["security"] = [{"anthropicApiKey": []}, {sk: []}]
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _MESSAGES_OBJECT}}}
            paths[prefix + path] = {"post": op}
    paths["/v1/models"] = {"get": _operation(
        "The models of the key's pool", {"200": _json("Models", _obj({"object": {"const": "list"},
                                                                      "data": {"type": "array",
                                                                               "items": _obj({"id": _STR})}})),
                                         **_key_refusals()}, tags=["inference"], security=sk)}
    paths["/v1/usage"] = {"get": _operation("The key's own usage", {"200": _json("Usage", _data(_USAGE)),
                                                                    **_key_refusals()},
                                            tags=["inference"], security=sk)}
    schemas: dict[str, Any] = {model.__name__: body_schema(model) for model in BODY_MODELS}
    schemas.update({
        "ErrorDetail": _obj({"type": _STR, "code": _STR, "message": _STR}, ["type", "code", "message"]),
        "Error": _obj({"error": _ref("ErrorDetail")}, ["error"]),
        "AnthropicError": _obj({"type": {"const": "error"},
                                "error": _obj({"type": _STR, "message": _STR}, ["type", "message"])},
                               ["type", "error"]),
        "Subscription": _SUBSCRIPTION, "Key": _KEY, "ManagementKey": _MANAGEMENT_KEY, "Quote": _QUOTE,
        "Pool": _POOL, "Delivery": _DELIVERY,
    })
    return {
        "openapi": "3.1.0",
        "info": {"title": "agent_gateway", "version": version,
                 "description": "Reserved seats on LLM inference pools, bought with a management key (mk_)"
                                + (" or by agents over x402 (USDC)" if payments_on else "")
                                + ", and used through the OpenAI-compatible /v1 API with an sk_ key. "
                                  f"MCP (Streamable HTTP): {base_url}/mcp."},
        "servers": [{"url": base_url}],
        "tags": [{"name": n} for n in ("public", "agents", "management", "inference")],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "managementKey": {"type": "http", "scheme": "bearer", "bearerFormat": "mk_…",
                                  "description": "A management key: buys seats, mints and manages keys."},
                "apiKey": {"type": "http", "scheme": "bearer", "bearerFormat": "sk_…",
                           "description": "A seat's API key: calls /v1 on its pool's models, in its blocks."},
                "anthropicApiKey": {"type": "apiKey", "in": "header", "name": "x-api-key",
                                    "description": "The same sk_ key, as Anthropic's clients send it."},
                "metricsToken": {"type": "http", "scheme": "bearer",
                                 "description": "AGW_METRICS_TOKEN, when the operator set one."},
            },
        },
    }


_INFERENCE_NOTE = ("Usable in the key's blocks (hours UTC) only; each key holds one request at a time "
                   "(a second concurrent one is refused with 429).")


def _key_refusals() -> dict[str, Any]:
    return {"401": _error("Unknown API key."),
            "402": _json("No API key: where to buy one (not an x402 challenge).", {"type": "object"}),
            "403": _error("The key is disabled, revoked, or its subscription has ended; or it is a pledge on a pool "
                          "still funding (pool_funding, with the round's progress; not to be retried)."),
            "429": _error("The key's block is closed now, or it already has a request in flight.")}


_MESSAGES_NOTE = (_INFERENCE_NOTE + " Served for pools whose upstream speaks Messages (upstream_api = "
                  "\"anthropic\"); errors use Anthropic's shape {\"type\": \"error\", \"error\": {type, message}}.")


def _messages_responses() -> dict[str, Any]:
    def error(description: str) -> dict[str, Any]:
        return _json(description, _ref("AnthropicError"))

    return {"200": {"description": "The upstream's answer (JSON, or text/event-stream when streaming)",
                    "content": {"application/json": {"schema": {"type": "object"}},
                                "text/event-stream": {"schema": _STR}}},
            "400": error("invalid_request_error: the request body is invalid."),
            "401": error("authentication_error: unknown API key."),
            "402": error("billing_error: no API key; the body also says where to buy one."),
            "403": error("permission_error: the key is disabled, revoked, or its subscription has ended, or it is "
                         "a pledge on a pool still funding."),
            "404": error("not_found_error: the model is not in the key's pool, or the pool serves no Messages."),
            "413": error("request_too_large: the body is too large."),
            "429": error("rate_limit_error: the key's block is closed now, or it has a request in flight."),
            "502": error("api_error: the upstream failed."),
            "503": error("overloaded_error: the pool serves no requests now."),
            "504": error("timeout_error: the upstream timed out.")}


def _inference_responses() -> dict[str, Any]:
    return {"200": {"description": "The upstream's answer (JSON, or text/event-stream when streaming)",
                    "content": {"application/json": {"schema": {"type": "object"}},
                                "text/event-stream": {"schema": _STR}}},
            "400": _error("The request body is invalid."),
            "404": _error("The model is not in the key's pool."),
            **_key_refusals(),
            "502": _error("The upstream failed."), "503": _error("No upstream can take the request now."),
            "504": _error("The upstream timed out.")}
