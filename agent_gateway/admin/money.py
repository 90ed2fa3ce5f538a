"""Money as the operator sees it: revenue per day and pool, payments by state with the ones that
need a person first, and the relayer's and payTo's balances on the chain."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, timedelta

from sqlalchemy import func, or_
from sqlmodel import col, select

from agent_gateway.clock import Clock, as_utc
from agent_gateway.db.engine import Database
from agent_gateway.db.models import Payment, PaymentState
from agent_gateway.errors import GatewayError, NotFound
from agent_gateway.payments.chain import ChainAdapter
from agent_gateway.payments.refunds import Refunds, RefundWallet
from agent_gateway.settings import Settings
from agent_gateway.subscriptions.service import SubscriptionView, list_subscriptions

P = PaymentState
_PENDING = (P.RECEIVED, P.VERIFIED, P.RESERVED, P.BROADCAST, P.CONFIRMED)
_PAID = (P.DELIVERED, P.CREDITED)  # money that arrived and stayed (a revoked payment's did not)
ATTENTION_LIMIT = 200


@dataclass(frozen=True)
class Attention:
    payment: Payment
    why: str  # pending_past_window | failed_after_broadcast | credited | reorganised


@dataclass(frozen=True)
class Balances:
    relayer_address: str | None = None
    relayer_native_wei: int | None = None
    pay_to: str | None = None
    pay_to_usdc_atomic: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class PaymentDetail:
    payment: Payment
    subscriptions: list[SubscriptionView]  # what it bought (or renewed), with their keys


@dataclass
class MoneySummary:
    days: int
    revenue_by_day: dict[date, dict[str, tuple[int, int]]] = field(default_factory=dict)  # day -> pool -> (atomic, n)
    revenue_by_pool: dict[str, tuple[int, int]] = field(default_factory=dict)
    by_state: dict[str, tuple[int, int]] = field(default_factory=dict)  # state -> (count, atomic)
    attention: list[Attention] = field(default_factory=list)
    balances: Balances | None = None
    refund_wallet: RefundWallet | None = None  # None: on-chain refunds are off


class MoneyReport:
    def __init__(self, db: Database, clock: Clock, settings: Settings, chain: ChainAdapter | None,
                 refunds: Refunds | None = None) -> None:
        self.db = db
        self.clock = clock
        self.settings = settings
        self.chain = chain
        self.refunds = refunds

    async def summary(self, days: int = 30) -> MoneySummary:
        now = self.clock.now()
        since = now - timedelta(days=days)
        out = MoneySummary(days=days)
        async with self.db.transaction() as session:
            paid = (await session.execute(
                select(Payment.created_at, Payment.pool_slug, Payment.amount_atomic)
                .where(col(Payment.state).in_(_PAID), col(Payment.created_at) >= since)
            )).all()
            states = (await session.execute(
                select(Payment.state, func.count(), func.coalesce(func.sum(Payment.amount_atomic), 0))
                .group_by(col(Payment.state))
            )).all()
            stale = now - timedelta(seconds=self.settings.payment_timeout_s + self.settings.reconcile_after_s)
            needing = list(await session.scalars(
                select(Payment).where(or_(
                    col(Payment.state).in_(_PENDING) & ((col(Payment.valid_before) < int(now.timestamp()))
                                                        | (col(Payment.updated_at) < stale)),
                    (col(Payment.state) == P.FAILED) & col(Payment.tx_hash).is_not(None),
                    col(Payment.state).in_((P.CREDITED, P.REVOKED)),
                )).order_by(col(Payment.updated_at).desc()).limit(ATTENTION_LIMIT)))
        by_day: dict[date, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
        by_pool: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for created_at, pool, amount in paid:
            cell = by_day[as_utc(created_at).date()][pool]
            cell[0] += amount
            cell[1] += 1
            by_pool[pool][0] += amount
            by_pool[pool][1] += 1
        out.revenue_by_day = {d: {p: (a, n) for p, (a, n) in pools.items()} for d, pools in sorted(by_day.items())}
        out.revenue_by_pool = {p: (a, n) for p, (a, n) in sorted(by_pool.items())}
        out.by_state = {str(state): (int(n), int(total)) for state, n, total in states}
        out.attention = sorted((Attention(p, _why(p)) for p in needing), key=lambda a: _ORDER.index(a.why))
        out.balances = await self.balances()
        out.refund_wallet = await self.refunds.wallet_balances() if self.refunds is not None else None
        return out

    async def payment(self, payment_id: str) -> PaymentDetail:
        """One payment and the subscriptions it delivered or renewed."""
        async with self.db.transaction() as session:
            payment = await session.get(Payment, payment_id)
        if payment is None:
            raise NotFound(f"No payment {payment_id!r}.", code="payment_not_found")
        subscriptions = []
        if payment.account_id is not None:
            subscriptions = [v for v in await list_subscriptions(self.db, payment.account_id)
                             if v.subscription.payment_id == payment.id
                             or v.subscription.id == payment.renew_subscription_id]
        return PaymentDetail(payment, subscriptions)

    async def balances(self) -> Balances | None:
        terms = self.settings.chain
        if self.chain is None or terms is None:
            return None
        # With a facilitator there is no relayer of ours: only payTo's balance is shown.
        relayer = self.chain.relayer_address if self.chain.has_relayer else None
        try:
            native = await self.chain.native_balance(relayer) if relayer is not None else None
            usdc = await self.chain.balance_of(terms.pay_to)
        except GatewayError as exc:  # chain_unavailable: show the rest of the page, say why
            return Balances(relayer_address=relayer, pay_to=terms.pay_to, error=exc.message)
        return Balances(relayer_address=relayer, relayer_native_wei=native,
                        pay_to=terms.pay_to, pay_to_usdc_atomic=usdc)


_ORDER = ["pending_past_window", "failed_after_broadcast", "reorganised", "credited"]


def _why(payment: Payment) -> str:
    if payment.state in _PENDING:
        return "pending_past_window"
    if payment.state == P.FAILED:
        return "failed_after_broadcast"
    if payment.state == P.REVOKED:
        return "reorganised"
    return "credited"

