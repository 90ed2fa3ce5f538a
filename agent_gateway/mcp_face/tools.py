"""What each MCP tool does: validated arguments in, a structured result out, through the same
web-floor helpers and domain services as the HTTP faces (orders, x402 settlement, key status)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from agent_gateway.web.bodies import CamelBody, describe_validation
from agent_gateway.web.catalog import pools_now
from agent_gateway.web.keys import admitted_key, key_plan
from agent_gateway.web.orders import OrderBody, RenewBody, SubscribeBody, renewal_order
from agent_gateway.web.rendering import iso
from agent_gateway.web.snippets import connection_snippets
from agent_gateway.web.x402 import McpToolCall, body_schema, challenge, render_delivery, render_pending, settle_for
from agent_gateway.catalog.pricing import order_body
from agent_gateway.errors import InvalidRequest
from agent_gateway.mcp_face.schemas import ARGUMENTS, KeyArguments, SnippetArguments
from agent_gateway.money import format_usdc
from agent_gateway.payments.service import Settled
from agent_gateway.payments.wire import ExactPayment, payment_from_object, settle_response
from agent_gateway.services import Services


@dataclass(frozen=True)
class Answer:
    """A tool's result: its structured content, and the x402 receipt when it settled a payment."""

    data: dict[str, Any]
    payment_response: dict[str, Any] | None = None


def resource_of(services: Services, tool: str) -> str:
    """The x402 `resource` of a paid tool: the MCP endpoint under AGW_PUBLIC_URL, naming the tool."""
    return f"{services.settings.external_url}/mcp#{tool}"


def tool_call(tool: str, example: dict[str, Any]) -> McpToolCall:
    """How to call a paid tool, for the `bazaar` extension of its challenge: its argument schema
    (the model the tool validates with) and an example that is a valid call on this deployment."""
    return McpToolCall(tool, body_schema(ARGUMENTS[tool]), example)


def parse_arguments(tool: str, arguments: dict[str, Any]) -> CamelBody:
    try:
        return ARGUMENTS[tool].model_validate(arguments)
    except ValidationError as exc:
        raise InvalidRequest(describe_validation(exc).replace("request body", "arguments"),
                             code="invalid_field") from None


async def list_pools(services: Services, _: CamelBody) -> Answer:
    return Answer({"pools": await pools_now(services), "paymentsEnabled": services.payments.enabled})


async def quote(services: Services, args: CamelBody) -> Answer:
    assert isinstance(args, OrderBody)
    order = args.order(services)
    await services.payments.check_capacity(order)
    required = None
    if services.payments.enabled:
        required = challenge(services, order, resource_of(services, "subscribe_pool"),
                             call=tool_call("subscribe_pool", order_body(order))).required
        required = {k: v for k, v in required.items() if k != "error"}
    return Answer({**order.quote(), "paymentRequired": required})


async def subscribe_pool(services: Services, args: CamelBody, payment: object | None) -> Answer:
    assert isinstance(args, SubscribeBody)
    order = args.order(services)
    settled = await settle_for(services, order, resource_of(services, "subscribe_pool"), _decoder(payment),
                               call=tool_call("subscribe_pool", order_body(order)), account_id=None,
                               key_name=args.name)
    return _purchase(settled)


async def renew_subscription(services: Services, args: CamelBody, payment: object | None) -> Answer:
    assert isinstance(args, RenewBody)
    sub, order = await renewal_order(services, args)
    call = tool_call("renew_subscription", {"subscriptionId": sub.id, "billingCycle": args.billing_cycle})
    settled = await settle_for(services, order, resource_of(services, "renew_subscription"), _decoder(payment),
                               call=call, account_id=sub.account_id, key_name="renewal",
                               renew_subscription_id=sub.id)
    return _purchase(settled)


async def key_status(services: Services, args: CamelBody) -> Answer:
    assert isinstance(args, KeyArguments)
    key = await admitted_key(services, args.api_key)
    plan = await key_plan(services, key)
    pool = services.catalog.pool(key.pool_slug)
    return Answer({
        "pool": key.pool_slug, "models": list(pool.models) if pool else [],
        "blocks": [{"block": b.name, "hoursUtc": b.label} for b in plan.blocks],
        "inBlockNow": plan.in_block_now, "expiresAt": iso(key.period_end),
        "subscriptionId": key.subscription_id, "status": key.subscription_status, "usage": plan.usage,
    })


async def snippets(services: Services, args: CamelBody) -> Answer:
    assert isinstance(args, SnippetArguments)
    model = None
    if args.api_key is not None:
        key = await admitted_key(services, args.api_key)
        pool = services.catalog.pool(key.pool_slug)
        model = pool.models[0] if pool and pool.models else None
    return Answer(connection_snippets(services, args.api_key, model))


def _decoder(payment: object | None) -> Callable[[], ExactPayment] | None:
    return None if payment is None else (lambda: payment_from_object(payment))


def _purchase(settled: Settled) -> Answer:
    payment = settled.payment
    if settled.delivery is None:  # still confirming: no receipt yet, as the HTTP 202 has none
        return Answer(render_pending(settled))
    data = render_delivery(settled)
    data.update(amount=format_usdc(payment.amount_atomic), amountAtomic=str(payment.amount_atomic))
    return Answer(data, settle_response(True, payment.tx_hash, payment.network, payment.payer))


FREE_TOOLS = {"list_pools": list_pools, "quote": quote, "key_status": key_status, "connection_snippets": snippets}
PAID_TOOLS = {"subscribe_pool": subscribe_pool, "renew_subscription": renew_subscription}
