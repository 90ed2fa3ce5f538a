"""Payments that fail and are paid anyway. A failed x402 payment's authorization stays valid until
its `validBefore`: the payer kept it, a facilitator may send it after answering "refused" without a
transaction, and anyone who saw our settlement pending can copy it. Whoever sends it, its transfer
can only go to our `payTo`. So each pass looks at failed x402 payments whose authorization has not
yet expired (or expired within the grace, for a log index that lags): one used since, by a mined
transaction past the confirmations whose own Transfer paid us, becomes `credited` to the paying
wallet's account (ledger.credit_paid_after_failure), and the reorg re-checks follow it from then on.
Failures after the authorization was handed off are looked at first (ledger.failed_payments_to_watch)."""

from __future__ import annotations

from datetime import timedelta

from agent_gateway.db.models import Payment
from agent_gateway.metrics import PAYMENTS_PAID_AFTER_FAILURE
from agent_gateway.payments import ledger
from agent_gateway.payments.service import PaymentService, each_payment

# Past validBefore no new use can be mined; this long after it a use is looked for once more, for a
# node or log index that lags (chain seconds).
GRACE_S = 3600
# Authorizations are refused at payment time if they run beyond maxTimeoutSeconds plus ten minutes
# (payments.rules), so a failure older than this cannot still be spendable: the index's range.
FAILED_WITHIN = timedelta(days=1)


class LatePayments:
    def __init__(self, payments: PaymentService, batch_size: int = 200) -> None:
        self.payments = payments
        self.batch_size = batch_size

    async def check(self) -> int:
        """One pass; returns how many failed payments were credited."""
        if not self.payments.enabled:
            return 0
        chain = self.payments.require_chain()
        clock = self.payments.clock
        watched = await ledger.failed_payments_to_watch(
            self.payments.db, clock, await chain.chain_now(), failed_since=clock.now() - FAILED_WITHIN,
            grace_s=GRACE_S, limit=self.batch_size)
        return sum(await each_payment(watched, self._check_one, "late-payment check"))

    async def _check_one(self, payment: Payment) -> int:
        chain = self.payments.require_chain()
        nonce = ledger.stored(payment.auth_nonce, "auth_nonce", payment)
        if not await chain.authorization_used(payment.payer, nonce):
            return 0
        event = await chain.authorization_event(payment.payer, nonce, await self.payments.watch_from_block(payment))
        if event is None or event.kind == "canceled":
            return 0  # not found yet (next pass), or canceled by the payer: nothing was paid
        carrier = await chain.receipt(event.tx_hash)
        if carrier is None or carrier.confirmations < self.payments.confirmations:
            return 0  # next pass
        if not self.payments.carries(carrier, payment):
            return 0  # its use paid someone else (not to our payTo: refused before it failed)
        account = await ledger.credit_paid_after_failure(self.payments.db, self.payments.clock, payment.id,
                                                         event.tx_hash, carrier.block_number)
        if account is None:
            return 0
        PAYMENTS_PAID_AFTER_FAILURE.inc()
        return 1
