"""The reorg re-check: a delivered (or credited) payment is looked up again, pass after pass (the one
checked longest ago first), until its transaction is past the reorg horizon. A transfer reorganised
away is revoked only once it is gone for good; one that can still be mined again is waited for, and
an x402 settlement is sent again: ours from its stored bytes, a facilitator's by handing it the
authorization again. The rules for "gone for good" are in docs/decisions.md, "Confirmations and
reorgs"."""

from __future__ import annotations

import logging

from agent_gateway.db.models import Payment
from agent_gateway.errors import GatewayError
from agent_gateway.metrics import PAYMENTS_REVOKED
from agent_gateway.payments import ledger
from agent_gateway.payments.ledger import Revocation
from agent_gateway.payments.service import PaymentService, each_payment
from agent_gateway.payments.wire import SCHEME, ExactPayment, Offer

log = logging.getLogger(__name__)


class ReorgWatch:
    """`batch_size`: how many payments one pass re-checks, those checked longest ago first; a
    deployment with more unfinal payments than that re-checks each of them every few passes."""

    def __init__(self, payments: PaymentService, batch_size: int = 500) -> None:
        self.payments = payments
        self.db = payments.db
        self.clock = payments.clock
        self.batch_size = batch_size

    async def recheck_settled(self) -> list[Revocation]:
        """One pass over delivered and credited payments not yet past the reorg horizon: those
        whose transfer is gone for good are revoked (the caller ends their keys everywhere)."""
        if not self.payments.enabled:
            return []
        checked = await each_payment(await ledger.settled_payments_to_recheck(self.db, self.clock, self.batch_size),
                                     self._recheck_one, "reorg check")
        return [revocation for revocation in checked if revocation is not None]

    async def _recheck_one(self, payment: Payment) -> Revocation | None:
        chain = self.payments.require_chain()
        tx_hash = ledger.stored(payment.tx_hash, "tx_hash", payment)
        receipt = await chain.receipt(tx_hash)
        if receipt is not None and self.payments.carries(receipt, payment):
            if receipt.block_number != payment.block_number:  # mined again, in another block
                await ledger.record_carrier(self.db, self.clock, payment.id, tx_hash, receipt.block_number)
            if receipt.confirmations >= self.payments.reorg_horizon_blocks:
                await ledger.mark_chain_final(self.db, payment.id)
            return None
        if payment.method == "x402-exact":
            reason = await self._authorization_gone(payment)
        else:
            reason = await self.payments.claimed_transfer_gone(payment, receipt)
        if reason is None:
            return None
        revocation = await ledger.revoke(self.db, self.clock, payment.id, reason)
        if revocation is not None:
            PAYMENTS_REVOKED.labels(reason=reason).inc()
            log.warning("payment %s revoked: %s (was %s in block %s); subscriptions %s canceled, keys %s revoked",
                        payment.id, reason, payment.tx_hash, payment.block_number,
                        ",".join(revocation.subscription_ids) or "-", ",".join(revocation.key_ids) or "-")
        return revocation

    async def _authorization_gone(self, payment: Payment) -> str | None:
        """Why an x402 payment's transfer is gone for good, or None while it may still (re)appear."""
        chain = self.payments.require_chain()
        # The clock first: expired before an "unused" reading means unused for ever.
        expired = await chain.chain_now() >= ledger.stored(payment.valid_before, "valid_before", payment)
        nonce = ledger.stored(payment.auth_nonce, "auth_nonce", payment)
        if await chain.authorization_used(payment.payer, nonce):
            # Re-mined on the new branch, the use may sit lower than the head we saw before settling
            # (the branch forked below it): look from a horizon below the carrier's block too.
            from_block = min(await self.payments.watch_from_block(payment),
                             ledger.stored(payment.block_number, "block_number", payment)
                             - self.payments.reorg_horizon_blocks)
            event = await chain.authorization_event(payment.payer, nonce, from_block)
            if event is None:
                return None  # the log index lags: next pass
            if event.kind == "canceled":
                return "authorization_canceled"
            carrier = await chain.receipt(event.tx_hash)
            if carrier is None:
                return None
            if not self.payments.carries(carrier, payment):
                return "authorization_used_elsewhere"
            # Mined again, by another transaction (ours re-sent, or someone's copy).
            await ledger.record_carrier(self.db, self.clock, payment.id, event.tx_hash, carrier.block_number)
            return None
        if expired:
            return "authorization_expired_unused"
        if payment.raw_tx:
            # Still valid: our own signed settlement is a legitimate way to get it mined again.
            try:
                await chain.broadcast(payment.raw_tx)
                log.warning("payment %s: transfer reorganised away; our settlement sent again", payment.id)
            except GatewayError as exc:
                log.info("payment %s: re-sending the settlement failed: %s", payment.id, exc.message)
        elif self.payments.facilitator is not None:
            await self._settle_again_through_facilitator(payment)
        return None

    async def _settle_again_through_facilitator(self, payment: Payment) -> None:
        """A facilitator settled it, so we hold no signed transaction to send again, but the
        authorization is still valid and unused: hand it to /settle again. It can be used once, so a
        second transaction can only revert, never charge twice. Only when the node no longer knows the
        reorganised transaction: one back in the mempool is mined again without us. The next pass
        finds the new transaction through the authorization's use."""
        chain, facilitator = self.payments.require_chain(), self.payments.facilitator
        assert facilitator is not None
        if payment.tx_hash is not None and await chain.transaction(payment.tx_hash) is not None:
            return  # pending again: wait for it
        signed = ExactPayment(**ledger.stored(payment.authorization, "authorization", payment))
        # Our own requirements, as the first /settle had (a v1 payment echoes none; a v2 one's echo
        # may carry `extra` of the client's own): the pure rules held the authorization to them.
        terms = self.payments.terms
        requirements = Offer(scheme=SCHEME, network=terms.network, amount_atomic=signed.value,
                             asset=terms.usdc_address, pay_to=signed.to,
                             max_timeout_s=self.payments.settings.payment_timeout_s, token_name=terms.usdc_name,
                             token_version=terms.usdc_version, resource_url="", description="").requirements()
        try:
            answer = await facilitator.settle(signed, requirements)
        except GatewayError as exc:
            log.info("payment %s: settling again through the facilitator failed: %s", payment.id, exc.message)
            return
        log.warning("payment %s: transfer reorganised away; the facilitator settled it again: %s", payment.id,
                    answer.tx_hash or f"refused ({answer.reason})")
