"""Agent routes: buy seats over x402 (or with a tx hash) in one call, poll a payment, renew,
and sign in with the paying wallet."""

from __future__ import annotations

from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from agent_gateway.web.auth import services_of
from agent_gateway.web.bodies import CamelBody, read_json, read_optional_json
from agent_gateway.web.orders import RenewBody, SubscribePoolBody, renewal_order
from agent_gateway.web.x402 import HttpCall, challenge, pay_for, payment_header, render_settled, resource_url
from agent_gateway.web.rendering import iso, ok
from agent_gateway.web.throttle import limits_challenges, limits_failed_payments
from agent_gateway.accounts.service import ensure_buyer_enabled
from agent_gateway.catalog.pricing import Order, default_order, order_body
from agent_gateway.errors import InvalidRequest, NotFound
from agent_gateway.payments.ledger import get_payment
from agent_gateway.payments.wallet import issue_challenge, recover_personal_signer, sign_in, sign_in_chain_id
from agent_gateway.subscriptions.inventory import seats_available


class ChallengeBody(CamelBody):
    address: str = Field(min_length=42, max_length=42)


class SignInBody(CamelBody):
    challenge_id: str = Field(min_length=1, max_length=40, validation_alias="challengeId")
    signature: str = Field(min_length=1, max_length=200)


@limits_failed_payments
async def subscribe_pool(request: Request) -> Response:
    services = services_of(request)
    body = await read_optional_json(request, SubscribePoolBody, services.settings)
    if body is None:
        # No body: the challenge for the default order, so an agent can see what buying looks like.
        # A payment always needs the order it pays for spelled out: refused before any settlement.
        if payment_header(request) is not None:
            raise InvalidRequest("A paid order needs its JSON body (pool, blocks, quantity, billingCycle): "
                                 "send the order you were quoted with the payment.", code="missing_body")
        services.payments.require_chain()
        order = default_order(services.catalog, await seats_available(services.db, services.catalog))
        raise challenge(services, order, resource_url(request, services), call=order_call(order))
    order = body.order(services)
    if body.tx_hash is not None:
        if not body.signature:
            raise InvalidRequest(f"A txHash claim needs \"signature\": the paying wallet's signature (EIP-191) "
                                 f"of {services.payments.tx_claim_message(body.tx_hash)!r}.", code="missing_signature")
        # A disabled account's wallet is refused before its transfer is claimed.
        signer = recover_personal_signer(services.payments.tx_claim_message(body.tx_hash), body.signature)
        await ensure_buyer_enabled(services.db, wallet=signer)
        settled = await services.payments.claim_tx_hash(order, body.tx_hash, body.signature, key_name=body.name)
        if settled.delivery is not None:
            await services.admin.funding.pledged(order.pool.slug)  # a pledge may have reached the pool's goal
        return render_settled(settled)
    settled = await pay_for(request, services, order, call=order_call(order), account_id=None, key_name=body.name)
    return render_settled(settled)


def order_call(order: Order) -> HttpCall:
    return HttpCall(SubscribePoolBody, order_body(order))


@limits_failed_payments
async def renew(request: Request) -> Response:
    services = services_of(request)
    body = await read_json(request, RenewBody, services.settings)
    sub, order = await renewal_order(services, body)
    call = HttpCall(RenewBody, {"subscriptionId": sub.id, "billingCycle": body.billing_cycle})
    settled = await pay_for(request, services, order, call=call, account_id=sub.account_id, key_name="renewal",
                            renew_subscription_id=sub.id)
    return render_settled(settled, status_if_done=200)


async def payment_status(request: Request) -> Response:
    services = services_of(request)
    payment = await get_payment(services.db, request.path_params["payment_id"])
    if payment is None:
        raise NotFound("No such payment.", code="payment_not_found")
    return ok({"paymentId": payment.id, "state": payment.state, "failureReason": payment.failure_reason,
               "method": payment.method, "payer": payment.payer, "amount": str(payment.amount_atomic),
               "txHash": payment.tx_hash, "pool": payment.pool_slug, "blocks": payment.blocks,
               "quantity": payment.quantity, "accountId": payment.account_id,
               "updatedAt": iso(payment.updated_at),
               "next": _NEXT_STEP.get(payment.state)})


_NEXT_STEP = {
    "delivered": "Sign in with the paying wallet (POST /api/agent/auth/challenge) to manage the seats.",
    "refunded": "The payment was refunded (to the account's prepaid balance, or to the paying wallet on-chain); "
                "what it bought is canceled.",
    "credited": "The amount is the account's prepaid balance: sign in with the paying wallet "
                "(POST /api/agent/auth/challenge) and buy seats with it (POST /api/pools/{slug}/subscribe).",
}


@limits_challenges
async def wallet_challenge(request: Request) -> Response:
    services = services_of(request)
    body = await read_json(request, ChallengeBody, services.settings)
    settings = services.settings
    chain_id = sign_in_chain_id(settings.chain_id, services.payments.enabled)
    challenge = await issue_challenge(services.db, services.clock, body.address, settings.external_url, chain_id)
    return ok({"challengeId": challenge.id, "message": challenge.message, "expiresAt": iso(challenge.expires_at),
               "signWith": "EIP-4361 (Sign-In with Ethereum): EIP-191 personal_sign of message, "
                           "then POST /api/agent/auth/sign-in"}, status=201)


async def wallet_sign_in(request: Request) -> Response:
    services = services_of(request)
    body = await read_json(request, SignInBody, services.settings)
    account, token = await sign_in(services.db, services.clock, body.challenge_id, body.signature)
    return ok({"accountId": account.id, "managementKey": token.plaintext}, status=201)


routes = [
    Route("/api/agent/subscribe-pool", subscribe_pool, methods=["POST"]),
    Route("/api/agent/renew", renew, methods=["POST"]),
    Route("/api/agent/payments/{payment_id}", payment_status, methods=["GET"]),
    Route("/api/agent/auth/challenge", wallet_challenge, methods=["POST"]),
    Route("/api/agent/auth/sign-in", wallet_sign_in, methods=["POST"]),
]
