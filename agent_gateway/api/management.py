"""Management routes (`Bearer mk_…`): buy seats, subscriptions, keys, management keys, usage."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from agent_gateway.web.auth import management
from agent_gateway.web.bodies import CamelBody, read_json
from agent_gateway.web.x402 import HttpCall, challenge, pay_for, payment_header, render_settled, resource_url
from agent_gateway.web.rendering import iso, ok
from agent_gateway.web.throttle import limits_failed_payments
from agent_gateway.web.views import render_key, render_management_key, render_subscription
from agent_gateway.catalog.pricing import MAX_QUANTITY, make_order
from agent_gateway.db.models import Account
from agent_gateway.errors import PaymentRequired
from agent_gateway.keys import api_keys, management as mkeys
from agent_gateway.services import Services
from agent_gateway.money import format_usdc
from agent_gateway.subscriptions.service import list_subscriptions, subscribe_with_balance
from agent_gateway.usage.report import empty_usage, usage_by_key


class SubscribeBody(CamelBody):
    blocks: list[str] = Field(min_length=1, max_length=24)
    quantity: int = Field(ge=1, json_schema_extra={"maximum": MAX_QUANTITY})
    billing_cycle: Literal["month", "year"] = "month"


class MintKeyBody(CamelBody):
    name: str = Field(min_length=1, max_length=200)
    subscription_id: str = Field(min_length=1, max_length=40)


class ManagementKeyBody(CamelBody):
    name: str = Field(min_length=1, max_length=200)


@management
@limits_failed_payments
async def subscribe(request: Request, services: Services, account: Account) -> Response:
    body = await read_json(request, SubscribeBody, services.settings)
    order = make_order(
        services.catalog, request.path_params["slug"], body.blocks, body.quantity, body.billing_cycle
    )
    slug = order.pool.slug
    call = HttpCall(SubscribeBody, {"blocks": list(order.blocks), "quantity": order.quantity,
                                    "billingCycle": order.billing_cycle},
                    route_template="/api/pools/:slug/subscribe", path_params={"slug": slug})
    if payment_header(request) is not None:
        # Paid with x402 exactly like the agent endpoint, for this account.
        settled = await pay_for(request, services, order, call=call, account_id=account.id, key_name="seat")
        return render_settled(settled)
    try:
        subscriptions = await subscribe_with_balance(
            services.db, services.clock, services.catalog, account.id, order
        )
    except PaymentRequired as exc:
        if not services.payments.enabled:
            raise
        raise challenge(
            services, order, resource_url(request, services), call=call, message=f"{exc.message} Or pay with x402: retry with PAYMENT-SIGNATURE.",
            code=exc.code) from None
    await services.admin.funding.pledged(slug)  # a pledge may have reached the pool's goal
    return ok(
        {"quote": order.quote(), "subscriptions": [render_subscription(s) for s in subscriptions]},
        status=201,
    )


@management
async def get_subscriptions(request: Request, services: Services, account: Account) -> Response:
    views = await list_subscriptions(services.db, account.id)
    return ok([render_subscription(v.subscription, v.key) for v in views])


@management
async def mint_subscription_key(request: Request, services: Services, account: Account) -> Response:
    body = await read_json(request, MintKeyBody, services.settings)
    name = api_keys.validate_key_name(body.name)
    view, token = await api_keys.mint_key(services.db, services.clock, account.id, body.subscription_id, name)
    data = render_key(view.key, view.subscription)
    data["apiKey"] = token.plaintext  # the only time the plaintext leaves the gateway
    return ok(data, status=201)


@management
async def get_keys(request: Request, services: Services, account: Account) -> Response:
    views = await api_keys.list_keys(services.db, account.id)
    return ok([render_key(v.key, v.subscription) for v in views])


@management
async def disable_key(request: Request, services: Services, account: Account) -> Response:
    view = await services.keys.disable_key(account.id, request.path_params["key_id"])
    return ok(render_key(view.key, view.subscription))


@management
async def enable_key(request: Request, services: Services, account: Account) -> Response:
    view = await services.keys.enable_key(account.id, request.path_params["key_id"])
    return ok(render_key(view.key, view.subscription))


@management
async def delete_key(request: Request, services: Services, account: Account) -> Response:
    key_id = request.path_params["key_id"]
    await services.keys.delete_key(account.id, key_id)
    return ok({"id": key_id, "deleted": True})


@management
async def create_management_key(request: Request, services: Services, account: Account) -> Response:
    body = await read_json(request, ManagementKeyBody, services.settings)
    key, token = await mkeys.create_management_key(services.db, services.clock, account.id,
                                                   api_keys.validate_key_name(body.name))
    data = render_management_key(key)
    data["apiKey"] = token.plaintext
    return ok(data, status=201)


@management
async def get_management_keys(request: Request, services: Services, account: Account) -> Response:
    keys = await mkeys.list_management_keys(services.db, account.id)
    return ok([render_management_key(k) for k in keys])


@management
async def revoke_management_key(request: Request, services: Services, account: Account) -> Response:
    key_id = request.path_params["key_id"]
    await mkeys.revoke_management_key(services.db, services.clock, account.id, key_id)
    return ok({"id": key_id, "revoked": True})


@management
async def get_usage(request: Request, services: Services, account: Account) -> Response:
    views = await api_keys.list_keys(services.db, account.id)
    usage = await usage_by_key(services.db, services.clock.now(), account_id=account.id)
    data = []
    for view in views:
        row = render_key(view.key, view.subscription)
        row["usage"] = usage.get(view.key.id, empty_usage())
        data.append(row)
    return ok(data)


@management
async def get_account(request: Request, services: Services, account: Account) -> Response:
    return ok(
        {
            "id": account.id,
            "name": account.name,
            "balance": format_usdc(account.balance_atomic),
            "walletAddress": account.wallet_address,
            "createdAt": iso(account.created_at),
        }
    )


routes = [
    Route("/api/account", get_account, methods=["GET"]),
    Route("/api/pools/{slug}/subscribe", subscribe, methods=["POST"]),
    Route("/api/subscriptions", get_subscriptions, methods=["GET"]),
    Route("/api/keys/subscription", mint_subscription_key, methods=["POST"]),
    Route("/api/keys", get_keys, methods=["GET"]),
    Route("/api/keys/{key_id}/disable", disable_key, methods=["POST"]),
    Route("/api/keys/{key_id}/enable", enable_key, methods=["POST"]),
    Route("/api/keys/{key_id}", delete_key, methods=["DELETE"]),
    Route("/api/management-keys", create_management_key, methods=["POST"]),
    Route("/api/management-keys", get_management_keys, methods=["GET"]),
    Route("/api/management-keys/{key_id}", revoke_management_key, methods=["DELETE"]),
    Route("/api/usage", get_usage, methods=["GET"]),
]
