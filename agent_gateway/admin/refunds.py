"""Refunds as the operator sees them: refund one payment (to the balance or on-chain), list the
refunds and what each waits for, and the refund wallet's balances. The state machine is
payments.refunds; this adds the operator's checks and the audit record, in the refund's transaction."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy.exc import IntegrityError

from agent_gateway.admin import audit
from agent_gateway.db.engine import Database
from agent_gateway.db.models import Payment, Refund, RefundDestination
from agent_gateway.money import format_usdc
from agent_gateway.payments import ledger
from agent_gateway.payments.refunds import RefundRefused, Refunds, RefundWallet, destination_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefundResult:
    refund: Refund
    payment: Payment
    key_ids: list[str]  # revoked (and ended everywhere) by this refund


class RefundAdmin:
    def __init__(self, db: Database, refunds: Refunds) -> None:
        self.db = db
        self.refunds = refunds

    @property
    def default_destination(self) -> RefundDestination:
        return self.refunds.default_destination

    @property
    def chain_enabled(self) -> bool:
        return self.refunds.chain_enabled

    async def refund_payment(self, payment_id: str, to: str | None, *, actor: str, reason: str) -> RefundResult:
        """Refund one payment, audited (`payment.refund`, before/after). `to` is balance or chain
        (None: AGW_REFUND_TO). To the balance and final: done at once. On-chain: the refund wallet
        must hold the USDC and gas (409 refund_wallet_short_usdc / _gas otherwise); the transfer is
        signed, stored and sent at once, and confirmed by the background pass. Not yet past the
        reorg horizon: planned, and made by the background pass once final.

        404 payment_not_found; 409 already_refunded (also for a second, concurrent request: one
        refund per payment), payment_not_refundable, payment_already_credited, chain_refunds_off."""
        destination = destination_of(to, self.refunds.default_destination)
        await self.refunds.refusal(payment_id, destination)
        payment = await ledger.load_payment(self.db, payment_id)
        if destination == RefundDestination.CHAIN:
            # Refuse before anything is written: a refund that would fail for lack of funds.
            await self.refunds.check_wallet(ledger.refundable_atomic(payment))
        now = self.refunds.clock.now()
        try:
            async with self.db.transaction() as session:
                outcome = await self.refunds.plan_payment(session, payment_id, destination, note=reason, actor=actor,
                                                          now=now)
                refund = outcome.refund
                assert refund is not None
                audit.record(session, now, actor=actor, action="payment.refund", target=f"payment:{payment_id}",
                             reason=reason,
                             before={"state": str(payment.state), "amount": format_usdc(payment.amount_atomic)},
                             after={"refund": refund.id, "destination": str(destination),
                                    "amount": format_usdc(refund.amount_atomic), "refundState": str(refund.state),
                                    "waiting": refund.waiting, "to": refund.to_address})
        except IntegrityError:  # a concurrent refund of the same payment committed first
            raise RefundRefused(f"Payment {payment_id} is already refunded (a concurrent request).",
                                code="already_refunded") from None
        if outcome.key_ids:
            await self.refunds.keys.end_revoked_keys(outcome.key_ids, "payment_refunded")
        key_ids = list(outcome.key_ids)
        if refund.state == "planned" and refund.waiting is None:  # on-chain: sign, store and send now
            carried = await self.refunds.carry_out(refund.id)
            key_ids += carried.key_ids
        refund = await self.refunds.get(refund.id)
        log.warning("payment %s refund %s by %s (%s): %s USDC to %s, now %s%s", payment_id, refund.id, actor,
                    reason or "no reason given", format_usdc(refund.amount_atomic), destination, refund.state,
                    f" (waiting: {refund.waiting})" if refund.waiting else "")
        return RefundResult(refund=refund, payment=await ledger.load_payment(self.db, payment_id), key_ids=key_ids)

    async def list(self, *, state: str | None = None, payment_id: str | None = None, pool: str | None = None,
                   limit: int = 100) -> list[Refund]:
        return await self.refunds.list(state=state, payment_id=payment_id, pool=pool, limit=limit)

    async def get(self, refund_id: str) -> Refund:
        return await self.refunds.get(refund_id)

    async def wallet(self) -> RefundWallet | None:
        """The refund wallet's USDC and ETH (None: on-chain refunds are off)."""
        return await self.refunds.wallet_balances()
