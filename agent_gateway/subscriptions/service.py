"""Buying seats from the prepaid balance, and listing an account's subscriptions."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import update
from sqlmodel import col, select

from agent_gateway.catalog.pools import Catalog
from agent_gateway.catalog.pricing import BILLING_CYCLES, Order
from agent_gateway.clock import Clock
from agent_gateway.db.engine import Database, rows_changed
from agent_gateway.db.models import Account, ApiKey, BalanceEntry, Subscription, SubscriptionStatus, new_id
from agent_gateway.errors import PaymentRequired
from agent_gateway.money import format_usdc
from agent_gateway.subscriptions.funding import is_pledge
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
        # The pool's state row first (locked), then the seats: the order a pools-file reload locks in.
        pledge = await is_pledge(session, order.pool.slug)
        await reserve_seats(session, catalog, order.pool.slug, order.blocks, order.quantity)
        charged = await session.execute(
            update(Account)
            .where(col(Account.id) == account_id, col(Account.balance_atomic) >= order.total_atomic)
            .values(balance_atomic=Account.balance_atomic - order.total_atomic)
        )
        if rows_changed(charged) != 1:
            # Raising rolls back the seat reservation above.
            account = await session.get(Account, account_id)
            balance = account.balance_atomic if account else 0
            raise PaymentRequired(
                f"This order costs {format_usdc(order.total_atomic)} USDC and the prepaid balance is "
                f"{format_usdc(balance)} USDC. Add at least {format_usdc(order.total_atomic - balance)} USDC "
                f"to the balance (the operator runs: agent-gateway accounts credit {account_id} AMOUNT), "
                "or buy fewer seats.",
                code="insufficient_balance",
                extra={"quote": order.quote(), "balance": format_usdc(balance),
                       "shortfall": format_usdc(order.total_atomic - balance)},
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
        subscriptions = new_subscriptions(account_id, order.pool.slug, order.blocks, order.billing_cycle,
                                          order.unit_price_atomic, order.quantity, now, charge_id=charge.id,
                                          pledge=pledge)
        session.add_all(subscriptions)
    log.info(
        "seats %s account=%s pool=%s blocks=%s quantity=%d total_atomic=%d", "pledged" if pledge else "bought",
        account_id, order.pool.slug, ",".join(order.blocks), order.quantity, order.total_atomic,
    )
    return subscriptions


def new_subscriptions(account_id: str, pool_slug: str, blocks: Sequence[str], billing_cycle: str,
                      unit_price_atomic: int, quantity: int, now: datetime, *, charge_id: str | None = None,
                      payment_id: str | None = None, pledge: bool = False) -> list[Subscription]:
    """`quantity` independent seats paid by a balance charge or a payment: active from now, or, as a
    `pledge`, pending with no period yet (start = end = now until the pool's activation starts it)."""
    period = BILLING_CYCLES[billing_cycle][1]
    status, end = (SubscriptionStatus.PENDING, now) if pledge else (SubscriptionStatus.ACTIVE, now + period)
    return [
        Subscription(id=new_id("sub"), account_id=account_id, pool_slug=pool_slug, blocks=list(blocks),
                     billing_cycle=billing_cycle, status=status, price_atomic=unit_price_atomic,
                     period_start=now, period_end=end, charge_id=charge_id, payment_id=payment_id,
                     created_at=now)
        for _ in range(quantity)
    ]


async def list_subscriptions(db: Database, account_id: str) -> list[SubscriptionView]:
    async with db.transaction() as session:
        rows = await session.execute(
            select(Subscription, ApiKey)
            .outerjoin(
                ApiKey,
                (col(ApiKey.subscription_id) == col(Subscription.id)) & col(ApiKey.deleted_at).is_(None),
            )
            .where(col(Subscription.account_id) == account_id)
            .order_by(col(Subscription.created_at), col(Subscription.id))
        )
        return [SubscriptionView(sub, key) for sub, key in rows]
