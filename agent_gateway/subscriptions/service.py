"""Buying seats from the prepaid balance, and listing an account's subscriptions."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import update
from sqlmodel import col, select

from agent_gateway.catalog.pools import Catalog
from agent_gateway.catalog.pricing import Order
from agent_gateway.clock import Clock
from agent_gateway.db.engine import Database
from agent_gateway.db.models import Account, ApiKey, BalanceEntry, Subscription, new_id
from agent_gateway.errors import NotFound, PaymentRequired
from agent_gateway.payments.amounts import format_usdc
from agent_gateway.subscriptions.inventory import reserve_seats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SubscriptionView:
    subscription: Subscription
    key: ApiKey | None


async def subscribe_with_balance(
    db: Database, clock: Clock, catalog: Catalog, account_id: str, order: Order
) -> list[Subscription]:
    """Reserve the seats and charge the prepaid balance in one transaction: all or nothing."""
    now = clock.now()
    async with db.transaction() as session:
        await reserve_seats(session, catalog, order.pool.slug, order.blocks, order.quantity)
        charged = await session.execute(
            update(Account)
            .where(Account.id == account_id, Account.balance_atomic >= order.total_atomic)
            .values(balance_atomic=Account.balance_atomic - order.total_atomic)
        )
        if charged.rowcount != 1:
            # Raising rolls back the seat reservation above.
            account = await session.get(Account, account_id)
            balance = account.balance_atomic if account else 0
            raise PaymentRequired(
                f"This order costs {format_usdc(order.total_atomic)} USDC and the prepaid balance is "
                f"{format_usdc(balance)} USDC. Credit the account or pay with x402.",
                code="insufficient_balance",
                extra={"quote": order.quote(), "balance": format_usdc(balance)},
            )
        charge = BalanceEntry(
            id=new_id("bal"),
            account_id=account_id,
            delta_atomic=-order.total_atomic,
            kind="charge",
            note=f"{order.quantity} seat(s) on {order.pool.slug}: {', '.join(order.blocks)} ({order.billing_cycle})",
            created_at=now,
        )
        session.add(charge)
        await session.flush()
        subscriptions = [
            Subscription(
                id=new_id("sub"),
                account_id=account_id,
                pool_slug=order.pool.slug,
                blocks=list(order.blocks),
                billing_cycle=order.billing_cycle,
                status="active",
                price_atomic=order.unit_price_atomic,
                period_start=now,
                period_end=now + order.period,
                charge_id=charge.id,
                created_at=now,
            )
            for _ in range(order.quantity)
        ]
        session.add_all(subscriptions)
    log.info(
        "seats bought account=%s pool=%s blocks=%s quantity=%d total_atomic=%d",
        account_id, order.pool.slug, ",".join(order.blocks), order.quantity, order.total_atomic,
    )
    return subscriptions


async def list_subscriptions(db: Database, account_id: str) -> list[SubscriptionView]:
    async with db.transaction() as session:
        rows = await session.execute(
            select(Subscription, ApiKey)
            .outerjoin(
                ApiKey,
                (col(ApiKey.subscription_id) == col(Subscription.id)) & col(ApiKey.deleted_at).is_(None),
            )
            .where(Subscription.account_id == account_id)
            .order_by(col(Subscription.created_at), col(Subscription.id))
        )
        return [SubscriptionView(sub, key) for sub, key in rows]


async def get_subscription(db: Database, account_id: str, subscription_id: str) -> Subscription:
    async with db.transaction() as session:
        sub = await session.get(Subscription, subscription_id)
    if sub is None or sub.account_id != account_id:
        raise NotFound(f"No subscription {subscription_id!r}.", code="subscription_not_found")
    return sub
