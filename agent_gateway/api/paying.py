"""Paying for an order over x402 inside a request, and answering with what was delivered."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from agent_gateway.api.rendering import ok
from agent_gateway.api.views import render_subscription
from agent_gateway.catalog.pricing import Order
from agent_gateway.lifespan import Services
from agent_gateway.payments.amounts import format_usdc
from agent_gateway.payments.service import Settled
from agent_gateway.payments.wire import settle_response_header


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


async def pay_for(request: Request, services: Services, order: Order, *, account_id: str | None,
                  key_name: str, renew_subscription_id: str | None = None) -> Settled:
    """Settle the request's x402 payment for `order`, or raise the 402 challenge when it has none.

    New seats must be there before we ask for (or take) money; they are reserved atomically
    again before settling. A renewal keeps the seats it holds."""
    payments = services.payments
    if renew_subscription_id is None:
        await payments.check_capacity(order)
    resource = resource_url(request, services)
    carried = payment_header(request)
    if carried is None:
        raise payments.challenge(order, resource)
    return await payments.settle_exact(order, carried[0], carried[1], resource, account_id=account_id,
                                       key_name=key_name, renew_subscription_id=renew_subscription_id)


def render_settled(settled: Settled, status_if_done: int = 201) -> Response:
    payment = settled.payment
    if settled.pending:
        return ok({"paymentId": payment.id, "state": payment.state, "txHash": payment.tx_hash,
                   "poll": f"/api/agent/payments/{payment.id}",
                   "message": "Settlement sent; seats are delivered once it is confirmed. Poll the payment; "
                              "if this answer is lost, sign in with the paying wallet to get your keys."},
                  status=202)
    delivery = settled.delivery
    keys = {key.subscription_id: (key, token) for key, token in delivery.keys}
    data = {
        "paymentId": payment.id,
        "txHash": payment.tx_hash,
        "payer": payment.payer,
        "amount": str(payment.amount_atomic),
        "accountId": delivery.account.id,
        "managementKey": delivery.management_key.plaintext if delivery.management_key else None,
        "subscriptions": [],
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
        data["subscriptions"].append(row)
    headers = {"PAYMENT-RESPONSE": settle_response_header(True, payment.tx_hash, payment.network, payment.payer)}
    return ok(data, status=status_if_done, headers=headers)
