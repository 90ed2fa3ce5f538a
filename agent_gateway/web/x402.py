"""The x402 HTTP binding: every x402 header is read or written here, and nowhere else.

It reads `PAYMENT-SIGNATURE` (v2) or `X-PAYMENT` (v1) and decodes it with payments/wire.py, hands
the decoded payment to the payment service, writes the `PAYMENT-REQUIRED` challenge on a 402 and
`PAYMENT-RESPONSE` on delivery. The challenge, the settlement call and the delivery's shape are
transport-neutral (`challenge`, `settle_for`, `render_delivery`), so the MCP binding uses the same."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from agent_gateway.web.rendering import ok
from agent_gateway.web.views import render_subscription
from agent_gateway.catalog.pricing import Order
from agent_gateway.services import Services
from agent_gateway.money import format_usdc
from agent_gateway.errors import PaymentRequired
from agent_gateway.db.models import Payment
from agent_gateway.payments.service import PaymentRefused, Settled
from agent_gateway.payments.wire import (
    ExactPayment,
    WireError,
    encode_header,
    parse_payment,
    payment_required,
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


class X402Challenge(PaymentRequired):
    """A 402 that is an x402 challenge: `required` is the v2 PaymentRequired object, which the
    HTTP binding sends in PAYMENT-REQUIRED and the MCP binding as the tool error's structuredContent."""

    def __init__(self, message: str, *, required: dict[str, Any], code: str, headers: dict[str, str],
                 extra: dict[str, Any]) -> None:
        super().__init__(message, code=code, headers=headers, extra=extra)
        self.required = required


def challenge(services: Services, order: Order, resource: str, *, message: str | None = None,
              code: str = "payment_required") -> X402Challenge:
    """The 402: the v2 challenge in PAYMENT-REQUIRED, and the same object plus a quote in the body.
    Every x402 challenge of every face is built here."""
    payments = services.payments
    payments.require_chain()
    offer = payments.offer(order, resource)
    required = payment_required([offer], error=None if code == "payment_required" else code)
    headers = {"PAYMENT-REQUIRED": encode_header(required), "Cache-Control": "no-store"}
    # The body carries the same object (its `error` lives in the error envelope) plus a quote.
    extra: dict[str, object] = {**{k: v for k, v in required.items() if k != "error"}, "quote": order.quote()}
    v1 = payment_required_v1([offer])
    if v1 is not None:
        extra["v1"] = v1
    return X402Challenge(
        message or f"Pay {format_usdc(order.total_atomic)} USDC with x402 (exact, {payments.network}) "
                   f"to {payments.terms.pay_to}, then retry with the PAYMENT-SIGNATURE header.",
        required=required, code=code, headers=headers, extra=extra,
    )


async def pay_for(request: Request, services: Services, order: Order, *, account_id: str | None,
                  key_name: str, renew_subscription_id: str | None = None) -> Settled:
    """Settle the request's x402 payment for `order`, or raise the 402 challenge when it has none."""
    carried = payment_header(request)
    decode = None if carried is None else (
        lambda: parse_payment(carried[0], carried[1], services.settings.max_json_depth))
    return await settle_for(services, order, resource_url(request, services), decode, account_id=account_id,
                            key_name=key_name, renew_subscription_id=renew_subscription_id)


async def settle_for(services: Services, order: Order, resource: str, decode: Callable[[], ExactPayment] | None,
                     *, account_id: str | None, key_name: str, renew_subscription_id: str | None = None) -> Settled:
    """Settle a carried x402 payment for `order` through the payment service, or raise the challenge
    when there is none; `decode` reads the payment from its transport (HTTP header, MCP `_meta`).

    New seats must be there before we ask for (or take) money; they are reserved atomically
    again before settling. A renewal keeps the seats it holds."""
    payments = services.payments
    if renew_subscription_id is None:
        await payments.check_capacity(order)
    if decode is None:
        raise challenge(services, order, resource)
    payments.require_chain()
    try:
        payment = decode()
    except WireError as exc:
        raise challenge(services, order, resource, message=exc.message, code=exc.code) from None
    try:
        return await payments.settle_exact(order, payment, resource, account_id=account_id,
                                           key_name=key_name, renew_subscription_id=renew_subscription_id)
    except PaymentRefused as exc:
        raise challenge(services, order, resource, message=exc.message, code=exc.code) from None


def render_settled(settled: Settled, status_if_done: int = 201) -> Response:
    payment = settled.payment
    if settled.delivery is None:  # still settling
        return ok(render_pending(payment), status=202)
    headers = {"PAYMENT-RESPONSE": settle_response_header(True, payment.tx_hash, payment.network, payment.payer)}
    return ok(render_delivery(settled), status=status_if_done, headers=headers)


def render_pending(payment: Payment) -> dict[str, Any]:
    return {"paymentId": payment.id, "state": payment.state, "txHash": payment.tx_hash,
            "poll": f"/api/agent/payments/{payment.id}",
            "message": "Settlement sent; seats are delivered once it is confirmed. Poll the payment; "
                       "if this answer is lost, sign in with the paying wallet to get your keys."}


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
        row = render_subscription(sub)
        if sub.id in keys:
            key, token = keys[sub.id]
            row.update(keyId=key.id, hasKey=True, apiKey=token.plaintext)
        rows.append(row)
    return data
