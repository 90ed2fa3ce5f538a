"""What an order looks like on the wire (the bodies every paid face validates) and how a renewal
finds the subscription it extends."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field

from agent_gateway.web.bodies import CamelBody
from agent_gateway.catalog.pricing import MAX_QUANTITY, Order, make_order
from agent_gateway.db.models import Subscription, SubscriptionStatus
from agent_gateway.errors import Conflict, NotFound
from agent_gateway.services import Services


class OrderBody(CamelBody):
    """Seats to price: a pool, its blocks, how many, for how long."""

    pool: str = Field(min_length=1, max_length=64, validation_alias=AliasChoices("pool", "poolSlug"),
                      description="The pool's slug, as in the catalog.")
    blocks: list[str] = Field(min_length=1, max_length=24,
                              description="The daily UTC time blocks to reserve (names from the catalog), each once.")
    quantity: int = Field(default=1, ge=1, json_schema_extra={"maximum": MAX_QUANTITY},
                          description="How many seats (one key each).")
    billing_cycle: Literal["month", "year"] = Field(default="month", validation_alias="billingCycle",
                                                    description="One period of 30 days, or a year at the pool's "
                                                                "annual discount.")

    def order(self, services: Services) -> Order:
        return make_order(services.catalog, self.pool, self.blocks, self.quantity, self.billing_cycle)


class SubscribeBody(OrderBody):
    """An order to pay for, and the name of the keys it mints."""

    name: str = Field(default="agent", min_length=1, max_length=200, description="A name for the keys.")


class SubscribePoolBody(SubscribeBody):
    """The HTTP agent route also takes a tx-hash claim instead of an x402 header."""

    tx_hash: str | None = Field(default=None, pattern=r"^0x[0-9a-fA-F]{64}$", validation_alias="txHash")
    signature: str | None = Field(default=None, max_length=200)


class RenewBody(CamelBody):
    subscription_id: str = Field(min_length=1, max_length=40, validation_alias="subscriptionId",
                                 description="The subscription to extend (its id from the purchase).")
    billing_cycle: Literal["month", "year"] = Field(default="month", validation_alias="billingCycle",
                                                    description="Extend by 30 days, or by a year.")


async def renewal_order(services: Services, body: RenewBody) -> tuple[Subscription, Order]:
    """The active subscription a renewal extends, and the order that prices one more period of it."""
    async with services.db.transaction() as session:
        sub = await session.get(Subscription, body.subscription_id)
    if sub is None:
        raise NotFound(f"No subscription {body.subscription_id!r}.", code="subscription_not_found")
    if sub.status == SubscriptionStatus.PENDING:
        raise Conflict(f"Subscription {sub.id} is a pledge on pool {sub.pool_slug}, which is still funding; its "
                       "period starts when the pool goes active, and it can be renewed from then on.",
                       code="subscription_not_active")
    if sub.status != SubscriptionStatus.ACTIVE:
        raise Conflict(f"Subscription {sub.id} is {sub.status}; buy a new seat instead.",
                       code="subscription_not_active")
    return sub, make_order(services.catalog, sub.pool_slug, list(sub.blocks), 1, body.billing_cycle)
