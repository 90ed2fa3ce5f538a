"""The x402 HTTP binding: every x402 header is read or written here, and nowhere else.

It reads `PAYMENT-SIGNATURE` (v2) or `X-PAYMENT` (v1) and decodes it with payments/wire.py, hands
the decoded payment to the payment service, writes the `PAYMENT-REQUIRED` challenge on a 402 and
`PAYMENT-RESPONSE` on delivery. The challenge, the settlement call and the delivery's shape are
transport-neutral (`challenge`, `settle_for`, `render_delivery`), so the MCP binding uses the same."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from agent_gateway.web.rendering import ok
from agent_gateway.web.views import render_subscription
from agent_gateway.accounts.service import ensure_buyer_enabled
from agent_gateway.catalog.pricing import Order
from agent_gateway.services import Services
from agent_gateway.money import format_usdc
from agent_gateway.errors import InvalidRequest, PaymentRequired
from agent_gateway.payments.ledger import Delivery
from agent_gateway.payments.service import PaymentRefused, Settled
from agent_gateway.payments.wire import (
    JSON_SCHEMA_DIALECT,
    PAYMENT_IDENTIFIER,
    ExactPayment,
    InvalidPaymentIdentifier,
    WireError,
    encode_header,
    parse_payment,
    payment_required,
    payment_identifier_extension,
    payment_required_v1,
    settle_response_header,
)


def payment_header(request: Request) -> tuple[str, int] | None:
    """The x402 payment a request carries: v2 `PAYMENT-SIGNATURE` or v1 `X-PAYMENT`."""
    if value := request.headers.get("payment-signature"):
        return value, 2
    if value := request.headers.get("x-payment"):
        return value, 1
    return None


def resource_url(request: Request, services: Services) -> str:
    """The x402 `resource` of a paid route: AGW_PUBLIC_URL plus the path, never the Host header."""
    return services.settings.external_url + request.url.path


@dataclass(frozen=True)
class HttpCall:
    """How to make a paid HTTP call, for the x402 `bazaar` extension of its challenge: the JSON body
    model the route reads (its schema is the input schema, so it cannot drift from the code) and an
    example body that is a valid order against this deployment's catalog."""

    body_model: type[BaseModel]
    example: dict[str, Any]
    method: str = "POST"
    route_template: str | None = None  # `:name` segments, e.g. /api/pools/:slug/subscribe
    path_params: dict[str, str] = field(default_factory=dict)

    def bazaar(self, base_path: str = "") -> dict[str, Any]:
        """The extension as the x402 SDK's `declare_discovery_extension(body_type="json")` declares
        it, enriched with the method (and path parameters) the way its resource-server extension does.
        `base_path` is the path of AGW_PUBLIC_URL: a route template names the whole public path."""
        call: dict[str, Any] = {"type": "http", "method": self.method, "bodyType": "json", "body": self.example}
        input_schema: dict[str, Any] = {
            "type": "object",
            "properties": {
                "type": {"type": "string", "const": "http"},
                "method": {"type": "string", "enum": ["POST", "PUT", "PATCH"]},
                "bodyType": {"type": "string", "enum": ["json", "form-data", "text"]},
                "body": body_schema(self.body_model),
            },
            "required": ["type", "method", "bodyType", "body"],
            "additionalProperties": False,
        }
        if self.path_params:
            call["pathParams"] = dict(self.path_params)
            input_schema["properties"]["pathParams"] = {
                "type": "object", "properties": {name: {"type": "string"} for name in self.path_params},
                "required": list(self.path_params)}
        extension: dict[str, Any] = {
            "info": {"input": call},
            "schema": {"$schema": JSON_SCHEMA_DIALECT, "type": "object", "properties": {"input": input_schema},
                       "required": ["input"]},
        }
        if self.route_template:
            extension["routeTemplate"] = base_path + self.route_template
        return extension

    def v1_output_schema(self) -> dict[str, Any] | None:
        """The same call in x402 v1's `outputSchema` (its discovery field)."""
        call: dict[str, Any] = {"type": "http", "method": self.method, "bodyType": "json", "discoverable": True,
                                "body": self.example, "bodySchema": body_schema(self.body_model)}
        if self.path_params:
            call["pathParams"] = dict(self.path_params)
        return {"input": call}


@dataclass(frozen=True)
class McpToolCall:
    """How to make a paid MCP tool call, for the `bazaar` extension (its `mcp` input type)."""

    tool_name: str
    input_schema: dict[str, Any]
    example: dict[str, Any]
    description: str | None = None

    def bazaar(self, base_path: str = "") -> dict[str, Any]:
        call: dict[str, Any] = {"type": "mcp", "toolName": self.tool_name, "transport": "streamable-http",
                                "inputSchema": self.input_schema, "example": self.example}
        properties: dict[str, Any] = {
            "type": {"type": "string", "const": "mcp"}, "toolName": {"type": "string"},
            "transport": {"type": "string", "enum": ["streamable-http", "sse"]},
            "inputSchema": {"type": "object"}, "example": {"type": "object"},
        }
        if self.description is not None:
            call["description"] = self.description
            properties["description"] = {"type": "string"}
        return {
            "info": {"input": call},
            "schema": {"$schema": JSON_SCHEMA_DIALECT, "type": "object", "required": ["input"],
                       "properties": {"input": {"type": "object", "properties": properties,
                                                "required": ["type", "toolName", "inputSchema"],
                                                "additionalProperties": False}}},
        }

    def v1_output_schema(self) -> dict[str, Any] | None:
        return None  # x402 v1 describes HTTP calls only


PaidCall = HttpCall | McpToolCall


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The JSON Schema of a request body model, as the wire spells it (camelCase)."""
    return model.model_json_schema(by_alias=True, mode="validation")


class X402Challenge(PaymentRequired):
    """A 402 that is an x402 challenge: `required` is the v2 PaymentRequired object, which the
    HTTP binding sends in PAYMENT-REQUIRED and the MCP binding as the tool error's structuredContent."""

    def __init__(self, message: str, *, required: dict[str, Any], code: str, headers: dict[str, str],
                 extra: dict[str, Any]) -> None:
        super().__init__(message, code=code, headers=headers, extra=extra)
        self.required = required


def challenge(services: Services, order: Order, resource: str, *, call: PaidCall, message: str | None = None,
              code: str = "payment_required") -> X402Challenge:
    """The 402: the v2 challenge in PAYMENT-REQUIRED, and the same object plus a quote in the body.
    Every x402 challenge of every face is built here. Its `bazaar` extension describes `call`, so an
    agent (or an x402 index) learns how to order."""
    payments = services.payments
    payments.require_chain()
    offer = payments.offer(order, resource)
    # `payment-identifier`: a client may name its purchase, so that a retry after a lost answer is
    # shown that purchase instead of paying twice (payments.idempotency).
    required = payment_required([offer], error=None if code == "payment_required" else code,
                                extensions={"bazaar": call.bazaar(urlsplit(services.settings.external_url).path),
                                            PAYMENT_IDENTIFIER: payment_identifier_extension()})
    headers = {"PAYMENT-REQUIRED": encode_header(required), "Cache-Control": "no-store"}
    # The body carries the same object (its `error` lives in the error envelope) plus a quote.
    extra: dict[str, object] = {**{k: v for k, v in required.items() if k != "error"}, "quote": order.quote()}
    v1 = payment_required_v1([offer], output_schema=call.v1_output_schema())
    if v1 is not None:
        extra["v1"] = v1
    return X402Challenge(
        message or f"Pay {format_usdc(order.total_atomic)} USDC with x402 (exact, {payments.network}) "
                   f"to {payments.terms.pay_to}, then retry with the PAYMENT-SIGNATURE header.",
        required=required, code=code, headers=headers, extra=extra,
    )


async def pay_for(request: Request, services: Services, order: Order, *, call: PaidCall, account_id: str | None,
                  key_name: str, renew_subscription_id: str | None = None) -> Settled:
    """Settle the request's x402 payment for `order`, or raise the 402 challenge when it has none."""
    carried = payment_header(request)
    decode = None if carried is None else (
        lambda: parse_payment(carried[0], carried[1], services.settings.max_json_depth))
    return await settle_for(services, order, resource_url(request, services), decode, call=call,
                            account_id=account_id, key_name=key_name, renew_subscription_id=renew_subscription_id)


async def settle_for(services: Services, order: Order, resource: str, decode: Callable[[], ExactPayment] | None,
                     *, call: PaidCall, account_id: str | None, key_name: str,
                     renew_subscription_id: str | None = None) -> Settled:
    """Settle a carried x402 payment for `order` through the payment service, or raise the challenge
    when there is none; `decode` reads the payment from its transport (HTTP header, MCP `_meta`).

    New seats must be there before we ask for (or take) money; they are reserved atomically
    again before settling. A renewal keeps the seats it holds."""
    payments = services.payments
    await ensure_buyer_enabled(services.db, account_id=account_id)
    if renew_subscription_id is None:
        await payments.check_capacity(order)
    if decode is None:
        raise challenge(services, order, resource, call=call)
    payments.require_chain()
    try:
        payment = decode()
    except InvalidPaymentIdentifier as exc:
        raise InvalidRequest(exc.message, code=exc.code) from None
    except WireError as exc:
        raise challenge(services, order, resource, call=call, message=exc.message, code=exc.code) from None
    # The wallet's account, when it has one, must not be disabled: refused before any settlement.
    await ensure_buyer_enabled(services.db, wallet=payment.payer)
    try:
        settled = await payments.settle_exact(order, payment, resource, account_id=account_id,
                                              key_name=key_name, renew_subscription_id=renew_subscription_id)
    except PaymentRefused as exc:
        raise challenge(services, order, resource, call=call, message=exc.message, code=exc.code) from None
    if settled.delivery is not None and renew_subscription_id is None:
        await services.admin.funding.pledged(order.pool.slug)  # a pledge may have reached the pool's goal
    return settled


def render_settled(settled: Settled, status_if_done: int = 201) -> Response:
    """201 (200 for a renewal) with the delivery; 202 while settling; 200 for a payment-identifier
    retry of a delivered purchase (nothing new was made)."""
    payment = settled.payment
    if settled.delivery is None:  # still settling
        return ok(render_pending(settled), status=202)
    headers = {"PAYMENT-RESPONSE": settle_response_header(True, payment.tx_hash, payment.network, payment.payer)}
    return ok(render_delivery(settled), status=200 if settled.repeated else status_if_done, headers=headers)


def render_pending(settled: Settled) -> dict[str, Any]:
    payment = settled.payment
    data: dict[str, Any] = {
        "paymentId": payment.id, "state": payment.state, "txHash": payment.tx_hash,
        "poll": f"/api/agent/payments/{payment.id}",
        "message": "Settlement sent; seats are delivered once it is confirmed. Poll the payment; "
                   "if this answer is lost, sign in with the paying wallet to get your keys."}
    if settled.repeated:
        data.update(repeated=True, paymentIdentifier=payment.payment_identifier,
                    message=f"This payment identifier's purchase (payment {payment.id}) is still being settled by "
                            "its first request; nothing was charged again. Poll the payment; its keys are shown "
                            "only to that first request (or, if that answer is lost, sign in with the paying wallet "
                            "for a management key and mint new ones).")
    return data


def render_delivery(settled: Settled) -> dict[str, Any]:
    """A delivered payment: the subscriptions with their plaintext keys (this once), and the new
    account's management key when the wallet's account was created by this payment."""
    payment, delivery = settled.payment, settled.delivery
    assert delivery is not None
    keys = {key.subscription_id: (key, token) for key, token in delivery.keys}
    rows: list[dict[str, Any]] = []
    data: dict[str, Any] = {
        "paymentId": payment.id,
        "txHash": payment.tx_hash,
        "payer": payment.payer,
        "amount": str(payment.amount_atomic),
        "accountId": delivery.account.id,
        "managementKey": delivery.management_key.plaintext if delivery.management_key else None,
        "subscriptions": rows,
    }
    if payment.credit_atomic:  # an overpaid tx-hash transfer: the excess is prepaid balance
        data.update(credited=format_usdc(payment.credit_atomic), creditedAtomic=str(payment.credit_atomic),
                    message=f"You paid {format_usdc(payment.credit_atomic)} USDC beyond the price; it was credited "
                            f"to account {delivery.account.id}'s prepaid balance.")
    for sub in delivery.subscriptions:
        row = render_subscription(sub, delivery.existing_keys.get(sub.id))
        if sub.id in keys:
            key, token = keys[sub.id]
            row.update(keyId=key.id, hasKey=True, apiKey=token.plaintext)
        rows.append(row)
    if settled.repeated:
        data.update(repeated=True, paymentIdentifier=payment.payment_identifier, message=_shown_again(delivery))
    return data


def _shown_again(delivery: Delivery) -> str:
    """What a payment-identifier retry is told: this is the earlier purchase, and where its keys are."""
    text = (f"This payment identifier already bought this purchase (payment {delivery.payment.id}); nothing was "
            "charged or created again. API keys are shown only once, in the first answer: ")
    if delivery.account.wallet_address == delivery.payment.payer:
        return text + ("sign in with the paying wallet (POST /api/agent/auth/challenge, then POST "
                       "/api/agent/auth/sign-in) for a management key, and mint new keys with it "
                       "(POST /api/keys/subscription; GET /api/subscriptions lists them).")
    return text + (f"account {delivery.account.id} mints new keys with its management key "
                   "(POST /api/keys/subscription; GET /api/subscriptions lists them).")
