"""The payment service: the only path from a paid request to delivered seats.

Facts from the chain adapter → pure rules → a ledger row that claims the payment → seats
reserved → the settlement signed, stored, then sent → receipt and Transfer checked → delivery.
Every step is a committed ledger transition; a step that cannot finish leaves the payment for
the reconciler (`reconcile`), which drives it to `delivered` or to a named failure.

The settlement is sent by our own relayer (the chain adapter signs it) or, with a facilitator
configured, by an x402 facilitator (`payments.facilitator`): verification and sending differ, the
state machine and every check after the send are the same."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar
from urllib.parse import urlsplit

from agent_gateway.catalog.pools import Catalog
from agent_gateway.catalog.pricing import Order
from agent_gateway.clock import Clock
from agent_gateway.db.engine import Database
from agent_gateway.db.models import Payment, PaymentState
from agent_gateway.errors import Conflict, GatewayError, PaymentRequired, ServiceUnavailable
from agent_gateway.payments import idempotency, ledger
from agent_gateway.money import format_usdc
from agent_gateway.payments.chain import ChainAdapter, Receipt, SettlementWouldRevert, Transfer
from agent_gateway.payments.facilitator import ConnectFailed, FacilitatorClient, FacilitatorError, our_reason
from agent_gateway.payments.ledger import Claim, Delivery, PaymentAlreadyUsed
from agent_gateway.networks import chain_defaults
from agent_gateway.payments.rules import check_chain_facts, check_payment, reason_message
from agent_gateway.payments.wallet import recover_personal_signer
from agent_gateway.payments.wire import ExactPayment, Offer
from agent_gateway.settings import ChainSettings, Settings
from agent_gateway.subscriptions.inventory import seats_available

log = logging.getLogger(__name__)
T = TypeVar("T")
_POLL_S = 0.05


def tx_claim_message(tx_hash: str, chain_id: int, domain: str) -> str:
    """What a tx-hash buyer signs with the paying wallet: binds the claim to the sender, to the
    chain and to one deployment (its public URL's host), so another gateway cannot honour it."""
    return f"agent_gateway: claim pool subscription for transaction {tx_hash.lower()} on chain {chain_id} at {domain}"


class PaymentRefused(PaymentRequired):
    """The payment breaks a rule before anything is claimed; the binding answers with a fresh challenge."""


class FacilitatorMismatch(Exception):
    """The configured facilitator cannot settle on this gateway's network: `serve` does not start."""


@dataclass(frozen=True)
class Settled:
    """The outcome of a paid request: delivered now, or still settling (answer 202 and poll).
    `repeated`: a payment-identifier retry, shown the purchase its first request made."""

    payment: Payment
    delivery: Delivery | None
    repeated: bool = False

    @property
    def pending(self) -> bool:
        return self.delivery is None


async def each_payment(payments: Iterable[Payment], step: Callable[[Payment], Awaitable[T]], what: str) -> list[T]:
    """`step` on each payment of a background pass, in turn; the results of those that finished. One
    that fails (a node that lags, a broken row) is logged and left for the next pass, and never
    stops the others."""
    results = []
    for payment in payments:
        try:
            results.append(await step(payment))
        except GatewayError as exc:
            log.warning("payment %s: %s deferred: %s", payment.id, what, exc.message)
        except Exception:
            log.exception("payment %s: %s failed; retried next pass", payment.id, what)
    return results


class PaymentService:
    def __init__(self, settings: Settings, db: Database, clock: Clock, catalog: Catalog,
                 chain: ChainAdapter | None, facilitator: FacilitatorClient | None = None) -> None:
        self.settings = settings
        self.db = db
        self.clock = clock
        self.catalog = catalog
        self.chain = chain
        self.facilitator = facilitator
        defaults = chain_defaults(settings.chain_id)
        self.confirmations = settings.confirmations or defaults.confirmations
        self.reorg_horizon_blocks = settings.reorg_horizon_blocks or defaults.reorg_horizon_blocks

    @property
    def enabled(self) -> bool:
        return self.chain is not None

    @property
    def terms(self) -> ChainSettings:
        """The chain settings; like `require_chain`, a 503 when payments are off."""
        if self.settings.chain is None:
            raise ServiceUnavailable("USDC payments are not configured on this gateway.", code="payments_disabled")
        return self.settings.chain

    @property
    def network(self) -> str:
        return self.terms.network

    @property
    def domain(self) -> str:
        """This deployment's domain: the host (and port) of its public URL."""
        return urlsplit(self.settings.external_url).netloc

    def tx_claim_message(self, tx_hash: str) -> str:
        return tx_claim_message(tx_hash, self.terms.chain_id, self.domain)

    # --- the 402 -------------------------------------------------------------------------

    def offer(self, order: Order, resource_url: str) -> Offer:
        terms = self.terms
        return Offer(
            scheme="exact", network=terms.network, amount_atomic=order.total_atomic, asset=terms.usdc_address,
            pay_to=terms.pay_to, max_timeout_s=self.settings.payment_timeout_s, token_name=terms.usdc_name,
            token_version=terms.usdc_version, resource_url=resource_url,
            description=f"{order.quantity} seat(s) on {order.pool.slug} ({', '.join(order.blocks)}, "
                        f"{order.billing_cycle})",
        )

    async def check_capacity(self, order: Order) -> None:
        """Never ask for money for seats that are not there (checked again, atomically, before settling)."""
        available = await seats_available(self.db, self.catalog)
        for block in order.blocks:
            if available.get((order.pool.slug, block), 0) < order.quantity:
                raise Conflict(f"Not enough seats left in the {block} block of pool {order.pool.slug}.",
                               code="sold_out")

    # --- x402 exact ----------------------------------------------------------------------

    async def settle_exact(self, order: Order, payment: ExactPayment, resource_url: str, *,
                           account_id: str | None = None, key_name: str = "agent",
                           renew_subscription_id: str | None = None) -> Settled:
        """Settle a decoded x402 `exact` payment for `order` (the HTTP binding decoded its header)."""
        chain = self.require_chain()
        offer = self.offer(order, resource_url)
        fingerprint = None
        if payment.identifier is not None:
            fingerprint = idempotency.request_fingerprint(payment, order, account_id=account_id, key_name=key_name,
                                                          renew_subscription_id=renew_subscription_id)
            # Before any chain call: a retry is answered even once its authorization has expired.
            if (repeated := await self._repeated(payment, fingerprint, offer)) is not None:
                return repeated
        # The head before the authorization is checked unused: any use of it is in a later block.
        chain_now, watch_from_block = await asyncio.gather(chain.chain_now(), chain.block_number())
        verdict = check_payment(offer, payment, self.terms.chain_id, self.terms.usdc_address, chain_now)
        if not verdict.ok:
            raise PaymentRefused(reason_message(verdict.reason), code=verdict.reason)
        try:
            row = await ledger.record_received(
                self.db, self.clock,
                Claim(method="x402-exact", network=self.network, payer=payment.payer, amount_atomic=payment.value,
                      auth_nonce=payment.nonce, valid_before=payment.valid_before,
                      authorization=dataclasses.asdict(payment), watch_from_block=watch_from_block,
                      identifier=payment.identifier, fingerprint=fingerprint),
                order, account_id=account_id, key_name=key_name, renew_subscription_id=renew_subscription_id,
            )
        except PaymentAlreadyUsed:
            # A concurrent request claimed it first. With an identifier, that one is this same
            # purchase (shown as it stands) or another request under the key (a conflict).
            if fingerprint is not None and (repeated := await self._repeated(payment, fingerprint, offer)):
                return repeated
            raise
        try:
            if self.facilitator is not None:
                await self._verify_with_facilitator(row, payment, offer)
                await ledger.reserve(self.db, self.clock, self.catalog, row)
                # Durable before /settle is called: if this process dies while it is in flight,
                # the row says "maybe sent", and the reconciler reads the chain (never fails it blind).
                if not await ledger.advance(self.db, self.clock, row.id, PaymentState.RESERVED, PaymentState.SUBMITTED):
                    raise Conflict("The payment moved on while it was being settled.", code="payment_state_changed")
            else:
                await self._verify_on_chain(row, payment)
                await ledger.reserve(self.db, self.clock, self.catalog, row)
        except BaseException as exc:
            await ledger.fail(self.db, self.clock, row.id, getattr(exc, "code", type(exc).__name__),
                              only_from=ledger.UNSENT_STATES)
            raise
        if self.facilitator is not None:
            return await self._settle_through_facilitator(row.id, payment, offer)
        try:
            settlement = await chain.build_settlement(payment)
            stored = False
            try:
                stored = await ledger.advance(self.db, self.clock, row.id, PaymentState.RESERVED, PaymentState.BROADCAST,
                                              tx_hash=settlement.tx_hash, raw_tx=settlement.raw_tx)
            finally:
                if not stored:
                    # The relayer nonce goes back, or every later settlement would queue behind
                    # a gap. (Had the row been stored after all, _send rebuilds on the conflict.)
                    await chain.release_settlement(settlement)
            if not stored:
                raise Conflict("The payment moved on while it was being settled.", code="payment_state_changed")
        except BaseException as exc:
            # Nothing was sent: the claim and any held seats are given back.
            await ledger.fail(self.db, self.clock, row.id, getattr(exc, "code", type(exc).__name__),
                              only_from=ledger.UNSENT_STATES)
            raise
        try:
            sent = await self._send(row.id, payment, settlement.tx_hash, settlement.raw_tx, mint_keys=True)
        except ServiceUnavailable:
            # Stored as broadcast: the reconciler resends (or rebuilds) it.
            log.warning("payment %s: broadcast failed; left for the reconciler", row.id)
            return Settled(await ledger.load_payment(self.db, row.id), None)
        if isinstance(sent, Settled):
            return sent
        return await self._await_delivery(row.id, sent, mint_keys=True)

    async def _repeated(self, payment: ExactPayment, fingerprint: str, offer: Offer) -> Settled | None:
        shown = await idempotency.purchase_shown_again(self.db, payment, fingerprint, offer, self.terms.chain_id,
                                                       self.terms.usdc_address)
        return None if shown is None else Settled(*shown, repeated=True)

    async def _send(self, payment_id: str, payment: ExactPayment, tx_hash: str, raw_tx: str, *,
                    mint_keys: bool) -> str | Settled:
        """Broadcast the stored settlement; returns its hash. If its relayer nonce was taken by
        another transaction (several gateway processes share the relayer), those bytes can never be
        mined: sign a new settlement, store it in place of the old one, and send that. The
        authorization itself can only ever be executed once on-chain, so this cannot charge twice.
        If no new settlement can be built because it would revert, the chain decides the outcome
        (`settle_by_authorization`), and that outcome is returned instead of a hash."""
        chain = self.require_chain()
        for _ in range(3):
            try:
                return await chain.broadcast(raw_tx)
            except ServiceUnavailable as exc:
                if exc.code != "relayer_nonce_conflict":
                    raise
            try:
                settlement = await chain.build_settlement(payment)
            except SettlementWouldRevert:
                row = await ledger.load_payment(self.db, payment_id)
                return await self.settle_by_authorization(row, "settlement_would_fail", mint_keys=mint_keys)
            replaced = False
            try:
                replaced = await ledger.replace_settlement(self.db, self.clock, payment_id, tx_hash,
                                                           settlement.tx_hash, settlement.raw_tx)
            finally:
                if not replaced:
                    await chain.release_settlement(settlement)
            if not replaced:
                raise ServiceUnavailable("The payment moved on while its settlement was replaced.",
                                         code="payment_state_changed")
            tx_hash, raw_tx = settlement.tx_hash, settlement.raw_tx
        raise ServiceUnavailable("The relayer's nonce kept being taken; the reconciler will retry.",
                                 code="relayer_nonce_conflict")

    async def _verify_on_chain(self, row: Payment, payment: ExactPayment) -> None:
        chain = self.require_chain()
        used, balance = await asyncio.gather(
            chain.authorization_used(payment.payer, payment.nonce), chain.balance_of(payment.payer))
        verdict = check_chain_facts(payment, used, balance)
        if not verdict.ok:
            raise PaymentRequired(reason_message(verdict.reason), code=verdict.reason)
        revert = await chain.simulate_settlement(payment)
        if revert is not None:
            raise SettlementWouldRevert(revert)
        if not await ledger.advance(self.db, self.clock, row.id, PaymentState.RECEIVED, PaymentState.VERIFIED):
            raise Conflict("The payment moved on while it was being verified.", code="payment_state_changed")

    # --- through an x402 facilitator -------------------------------------------------------

    async def _verify_with_facilitator(self, row: Payment, payment: ExactPayment, offer: Offer) -> None:
        """The facilitator's /verify in place of our own chain reads and simulation (our pure rules
        have already judged the payment against the offer)."""
        assert self.facilitator is not None
        verdict = await self.facilitator.verify(payment, offer.requirements(), offer.resource_url)
        if not verdict.valid:
            code = our_reason(verdict.reason)
            log.info("payment %s: the facilitator refused it: %s %s", row.id, verdict.reason, verdict.message or "")
            said = f"The x402 facilitator refused the payment ({verdict.reason or 'no reason given'})."
            raise PaymentRequired(f"{reason_message(code)} {said}" if code else said,
                                  code=code or "payment_refused_by_facilitator")
        if not await ledger.advance(self.db, self.clock, row.id, PaymentState.RECEIVED, PaymentState.VERIFIED):
            raise Conflict("The payment moved on while it was being verified.", code="payment_state_changed")

    async def _settle_through_facilitator(self, payment_id: str, payment: ExactPayment, offer: Offer) -> Settled:
        """/settle for a payment stored as `submitted`. A transaction the facilitator names is checked
        on-chain like our own (receipt, confirmations, the Transfer); without one, the chain says
        whether the authorization was used anyway (a retry answered "nonce already used" is a
        payment, never a failure). An answer that never came leaves the payment `submitted` for
        the reconciler, which reads the chain too."""
        assert self.facilitator is not None
        try:
            answer = await self.facilitator.settle(payment, offer.requirements(), offer.resource_url)
        except ConnectFailed:
            # No connection was made: /settle certainly did nothing, so the claim is given back.
            await ledger.fail(self.db, self.clock, payment_id, "facilitator_unavailable",
                              only_from=(PaymentState.SUBMITTED,))
            raise
        except FacilitatorError as exc:
            # It may have sent the transaction: only the chain can say. The buyer can poll.
            log.warning("payment %s: /settle gave no usable answer (%s); left for the reconciler",
                        payment_id, exc.code)
            exc.extra = {**exc.extra, "paymentId": payment_id, "poll": f"/api/agent/payments/{payment_id}"}
            exc.message = (f"The x402 facilitator gave no usable answer to /settle ({exc.detail}). "
                           f"Payment {payment_id} may still settle: do not pay again, poll "
                           f"/api/agent/payments/{payment_id}. It is delivered if the transfer happens (sign in "
                           "with the paying wallet for its keys), and released if the authorization expires unused.")
            raise
        if answer.tx_hash is not None:
            # Whatever `success` says: a transaction that reverted, or one still pending, is judged
            # by its receipt, and a revert by the authorization's state.
            if not answer.success:
                log.info("payment %s: /settle answered %s with transaction %s", payment_id, answer.reason, answer.tx_hash)
            if not await ledger.advance(self.db, self.clock, payment_id, PaymentState.SUBMITTED, PaymentState.BROADCAST,
                                        tx_hash=answer.tx_hash):
                return Settled(await ledger.load_payment(self.db, payment_id), None)  # the reconciler has it
            return await self._await_delivery(payment_id, answer.tx_hash, mint_keys=True)
        log.info("payment %s: /settle refused it: %s %s", payment_id, answer.reason, answer.message or "")
        return await self.settle_by_authorization(await ledger.load_payment(self.db, payment_id),
                                                  "settlement_refused", mint_keys=True)

    async def check_facilitator(self) -> None:
        """At start: the facilitator must settle `exact` on our network (x402 v2), or we do not serve."""
        if self.facilitator is None:
            return
        kinds = await self.facilitator.supported()
        if (2, "exact", self.network) not in kinds:
            usable = ", ".join(sorted(network for version, scheme, network in kinds
                                      if version == 2 and scheme == "exact")) or "none"
            raise FacilitatorMismatch(
                f"The x402 facilitator at AGW_FACILITATOR_URL does not support exact payments on {self.network} "
                f"(x402 v2); the networks its /supported lists for exact v2: {usable}. Point "
                f"AGW_FACILITATOR_URL at a facilitator for this network, or check AGW_CHAIN_ID.")
        log.info("x402 facilitator %s settles exact on %s", self.facilitator.url, self.network)

    # --- tx hash -------------------------------------------------------------------------

    async def claim_tx_hash(self, order: Order, tx_hash: str, signature: str, *, key_name: str = "agent") -> Settled:
        """The reference service's flow: the buyer sent USDC itself and proves it owns the sender."""
        chain = self.require_chain()
        tx_hash = tx_hash.lower()
        tx = await chain.transaction(tx_hash)
        if tx is None:
            raise PaymentRequired("No such transaction on this chain (yet); retry once it is mined.",
                                  code="transaction_not_found")
        message = self.tx_claim_message(tx_hash)
        signer = recover_personal_signer(message, signature)
        if signer is None or signer != tx.from_.lower():
            raise PaymentRequired("The signature must be made by the wallet that sent the transaction, over "
                                  f"the message {message!r}.", code="invalid_signature")
        receipt = await chain.receipt(tx_hash)
        if receipt is None or receipt.confirmations < self.confirmations:
            raise PaymentRequired("The transaction is not confirmed yet; retry in a few seconds.",
                                  code="payment_pending", headers={"Retry-After": "5"})
        mined_at, chain_now = await asyncio.gather(chain.block_timestamp(receipt.block_number), chain.chain_now())
        if chain_now - mined_at > self.settings.tx_claim_max_age_s:
            raise PaymentRequired(
                f"The transaction was mined {chain_now - mined_at} s ago; this gateway accepts claims of transfers "
                f"up to {self.settings.tx_claim_max_age_s} s old. Pay with x402 instead.", code="transfer_too_old")
        paid = self.paid_by_plain_transfer(receipt, signer)
        if not receipt.ok or paid < order.total_atomic:
            raise PaymentRequired(
                f"The transaction does not pay {format_usdc(order.total_atomic)} USDC from {signer} to "
                f"{self.terms.pay_to} by a plain transfer (a transfer of an EIP-3009 authorization is "
                f"redeemed over x402, never by tx hash).", code="transfer_mismatch")
        row = await ledger.record_received(
            self.db, self.clock,
            Claim(method="tx-hash", network=self.network, payer=signer, amount_atomic=paid, tx_hash=tx_hash,
                  block_number=receipt.block_number, sender_nonce=tx.nonce, credit_atomic=paid - order.total_atomic),
            order, account_id=None, key_name=key_name, state=PaymentState.VERIFIED,
        )
        try:
            await ledger.reserve(self.db, self.clock, self.catalog, row)
        except Conflict:
            # The money is already ours: never lose it. It becomes the wallet account's prepaid
            # balance, and the tx hash stays claimed (`credited`), so it cannot be credited twice.
            account = await ledger.credit_instead(self.db, self.clock, row.id, "sold_out_after_payment",
                                                  only_from=(PaymentState.VERIFIED,))
            if account is None:
                raise Conflict("The claim moved on while its seats were being reserved; retry it.",
                               code="payment_state_changed") from None
            raise Conflict(
                f"The seats sold out before this claim; the {format_usdc(paid)} USDC paid were credited to "
                f"account {account.id} (sign in with the paying wallet to use or see it).",
                code="sold_out_after_payment") from None
        # The transfer is already on-chain and confirmed: nothing to broadcast.
        if not await ledger.advance(self.db, self.clock, row.id, PaymentState.RESERVED, PaymentState.CONFIRMED):
            current = await ledger.load_payment(self.db, row.id)
            if current.state != PaymentState.CONFIRMED:
                raise self._claim_finished_elsewhere(current)
        delivery = await ledger.deliver(self.db, self.clock, row.id, mint_keys=True)
        if delivery is None:
            # Lost a race to the reconciler (this request stalled past AGW_RECONCILE_AFTER_S): it
            # finished the claim without keys. Nothing is pending on-chain, so never a 202.
            raise self._claim_finished_elsewhere(await ledger.load_payment(self.db, row.id))
        return Settled(delivery.payment, delivery)

    @staticmethod
    def _claim_finished_elsewhere(payment: Payment) -> GatewayError:
        if payment.state in (PaymentState.DELIVERED, PaymentState.CREDITED):
            return Conflict(
                f"This claim was completed meanwhile by the gateway's background pass (payment {payment.id} is "
                f"{payment.state}); sign in with the paying wallet (POST /api/agent/auth/challenge) for its keys "
                "or balance.", code="claim_completed_elsewhere")
        return Conflict(f"The claim moved on while it was being delivered (payment {payment.id} is {payment.state}"
                        f"{': ' + payment.failure_reason if payment.failure_reason else ''}).",
                        code="payment_state_changed")

    def _pays_us(self, transfer: Transfer, payer: str) -> bool:
        return (transfer.token.lower() == self.terms.usdc_address.lower() and transfer.from_.lower() == payer.lower()
                and transfer.to.lower() == self.terms.pay_to.lower())

    def _transfers_to_us(self, receipt: Receipt, payer: str) -> list[int]:
        return [t.value for t in receipt.transfers if self._pays_us(t, payer)]

    def paid_by_plain_transfer(self, receipt: Receipt, payer: str) -> int:
        """What `payer` paid payTo in the transaction by plain transfers (transfer, transferFrom):
        what a tx-hash claim may count. If an EIP-3009 authorization of `payer` was executed in it,
        none of its Transfers count: the token does not say which Transfer is the authorization's,
        and an authorization's Transfer is an x402 payment's (redeemed by (payer, nonce)), so the
        two ways of paying can never count one Transfer. Anyone can put a pending authorization into
        a transaction of theirs, but not into the payer's own."""
        if receipt.authorizer_in_it(payer):
            return 0
        return sum(self._transfers_to_us(receipt, payer))

    # --- receipts, delivery, reconciliation ----------------------------------------------

    async def _await_delivery(self, payment_id: str, tx_hash: str, *, mint_keys: bool) -> Settled:
        """Wait (bounded) for the receipt and confirmations, then deliver; else leave it pending."""
        chain = self.require_chain()
        deadline = asyncio.get_running_loop().time() + self.settings.settle_wait_s
        while True:
            receipt = await chain.receipt(tx_hash)
            # A reverted settlement waits for its confirmations too: if a front-runner's copy
            # carried the payment, that one is in the same block or an earlier one, and deep enough.
            if receipt is not None and receipt.confirmations >= self.confirmations:
                break
            if asyncio.get_running_loop().time() >= deadline:
                log.info("payment %s: no receipt within %.0f s; answering 202", payment_id,
                         self.settings.settle_wait_s)
                return Settled(await ledger.load_payment(self.db, payment_id), None)
            await asyncio.sleep(_POLL_S)  # polling the node for the receipt, bounded by the deadline
        payment = await ledger.load_payment(self.db, payment_id)
        return await self._finish(payment, receipt, mint_keys=mint_keys)

    async def _finish(self, payment: Payment, receipt: Receipt, *, mint_keys: bool) -> Settled:
        if not receipt.ok:
            return await self.settle_by_authorization(payment, "settlement_reverted", mint_keys=mint_keys)
        if not self.carries(receipt, payment) and payment.raw_tx is None:
            # A transaction the facilitator named, which did not execute this authorization: the
            # authorization's own state and events decide (it may have been used by another one).
            return await self.settle_by_authorization(payment, "transfer_mismatch", mint_keys=mint_keys)
        if not self.carries(receipt, payment):
            await ledger.fail(self.db, self.clock, payment.id, "transfer_mismatch", only_from=(PaymentState.BROADCAST,))
            raise GatewayError("The settlement's Transfer does not match the payment.", code="transfer_mismatch")
        await ledger.confirm(self.db, self.clock, payment.id, PaymentState.BROADCAST, receipt.tx_hash, receipt.block_number)
        return await self._deliver_confirmed(payment.id, mint_keys=mint_keys)

    async def settle_by_authorization(self, payment: Payment, reason: str, *, mint_keys: bool) -> Settled:
        """The one rule for a broadcast payment whose own settlement reverted, cannot be rebuilt
        (it would revert), or expired unsent (`reason`): the chain decides, never our transaction.

        - The authorization is unused: nothing was charged; the payment fails with `reason`.
        - It was used by a mined transaction (ours, a front-runner's copy of ours, anyone's) whose
          Transfer paid `payTo` the amount: the purchase is delivered, and the ledger names that
          transaction, so the reorg re-checks follow it. Until it has the confirmations, the
          payment stays pending.
        - The payer canceled it, or its use paid someone else: failed, nothing delivered.
        Used alike by the request path (`_finish`, `_send`, a facilitator's answer) and the
        reconciler, for `broadcast` and `submitted` payments."""
        chain = self.require_chain()
        in_flight = ledger.IN_FLIGHT_STATES
        if not await chain.authorization_used(payment.payer, ledger.stored(payment.auth_nonce, "auth_nonce", payment)):
            await ledger.fail(self.db, self.clock, payment.id, reason, only_from=in_flight)
            raise PaymentRequired(f"{_UNSETTLED[reason]} The authorization is still unused: nothing was charged.",
                                  code=reason)
        event = await chain.authorization_event(payment.payer, ledger.stored(payment.auth_nonce, "auth_nonce", payment), await self.watch_from_block(payment))
        if event is None:
            # Used, yet no event found (a lagging log index): look again on the next pass.
            raise ServiceUnavailable("The authorization was used on-chain, but the transaction is not found yet; "
                                     "poll the payment.", code="authorization_use_not_found")
        if event.kind == "canceled":
            await ledger.fail(self.db, self.clock, payment.id, "authorization_canceled", only_from=in_flight)
            raise PaymentRequired("The payer canceled the authorization on-chain before it was settled; nothing "
                                  "was charged and nothing is delivered.", code="authorization_canceled")
        carrier = await chain.receipt(event.tx_hash)
        if carrier is None or carrier.confirmations < self.confirmations:
            return Settled(await ledger.load_payment(self.db, payment.id), None)
        if not self.carries(carrier, payment):
            await ledger.fail(self.db, self.clock, payment.id, "authorization_used_elsewhere", only_from=in_flight)
            raise PaymentRequired("The authorization was used by a transaction that did not pay this gateway.",
                                  code="authorization_used_elsewhere")
        if payment.tx_hash is not None and event.tx_hash != payment.tx_hash:
            log.warning("payment %s: settled by another transaction %s (front-run of %s); delivering",
                        payment.id, event.tx_hash, payment.tx_hash)
        # One transaction can carry several authorizations (a bundler's): each is its own payment,
        # redeemed once by (payer, nonce), and all of them name that transaction.
        for state in in_flight:  # the state it is in: a conditional update from the other is a no-op
            if await ledger.confirm(self.db, self.clock, payment.id, state, event.tx_hash, carrier.block_number):
                break
        return await self._deliver_confirmed(payment.id, mint_keys=mint_keys)

    async def watch_from_block(self, payment: Payment) -> int:
        """The block from which on an x402 payment's authorization can have been used."""
        if payment.watch_from_block is not None:
            return payment.watch_from_block
        # Recorded before the gateway kept it: the authorization window is minutes, so its use
        # lies within the last reorg horizon's worth of blocks (and many more).
        return max(0, await self.require_chain().block_number() - 100 * self.reorg_horizon_blocks)

    def carries(self, receipt: Receipt, payment: Payment) -> bool:
        """The mined receipt still pays `payTo` what the payment recorded, from the payer: for x402,
        by the Transfer of the payment's own (payer, nonce) executed in it (the payer may have
        signed another authorization under that nonce, for less or to someone else, and other
        Transfers of the payer in the transaction are other payments); for a tx-hash claim, by
        plain transfers."""
        if not receipt.ok:
            return False
        if payment.method == "x402-exact":
            moved = receipt.authorization_transfer(payment.payer, ledger.stored(payment.auth_nonce, "auth_nonce", payment))
            return moved is not None and self._pays_us(moved, payment.payer) and moved.value >= payment.amount_atomic
        return self.paid_by_plain_transfer(receipt, payment.payer) >= payment.amount_atomic

    async def _deliver_confirmed(self, payment_id: str, *, mint_keys: bool) -> Settled:
        delivery = await ledger.deliver(self.db, self.clock, payment_id, mint_keys=mint_keys)
        if delivery is not None:
            return Settled(delivery.payment, delivery)
        current = await ledger.load_payment(self.db, payment_id)
        if current.state == PaymentState.CREDITED:
            raise Conflict(
                f"The subscription expired while this renewal was settling; the {format_usdc(current.amount_atomic)} "
                f"USDC paid were credited to account {current.account_id}'s prepaid balance.",
                code="renewal_credited")
        return Settled(current, None)

    async def reconcile(self) -> int:
        """One pass over unfinished payments; returns how many reached a final state."""
        if self.chain is None:
            return 0
        older_than = self.clock.now() - timedelta(seconds=self.settings.reconcile_after_s)
        return sum(await each_payment(await ledger.unfinished_payments(self.db, older_than), self._reconcile_one,
                                      "reconciliation"))

    async def _reconcile_one(self, payment: Payment) -> int:
        chain = self.require_chain()
        if payment.method == "tx-hash" and payment.state in ledger.UNSENT_STATES:
            return await self._reconcile_tx_claim(payment)
        if payment.state in ledger.UNSENT_STATES:
            # An x402 payment stopped before its settlement was stored, so it was never sent. (If a
            # request moved it on since this pass read it, `only_from` leaves it alone.)
            return int(await ledger.fail(self.db, self.clock, payment.id, "abandoned_before_settlement",
                                         only_from=ledger.UNSENT_STATES))
        if payment.state == PaymentState.CONFIRMED:
            return int(await ledger.deliver(self.db, self.clock, payment.id, mint_keys=False) is not None)
        if payment.state == PaymentState.SUBMITTED:
            return await self._reconcile_submitted(payment)
        # Read the clock before the receipt: once the chain is past the authorization's window no
        # block can execute it any more, so "no receipt" after that is final.
        expired = payment.valid_before is not None and await chain.chain_now() >= payment.valid_before
        tx_hash = ledger.stored(payment.tx_hash, "tx_hash", payment)
        receipt = await chain.receipt(tx_hash)
        if receipt is not None:
            if receipt.confirmations < self.confirmations:
                return 0
            try:
                settled = await self._finish(payment, receipt, mint_keys=False)
            except ServiceUnavailable:
                raise  # nothing decided: the next pass looks again
            except GatewayError:
                return 1  # _finish recorded the failure (or the credit)
            return int(not settled.pending)
        if expired:
            # Even a settlement still waiting in a mempool can only revert now. Whether anything
            # was charged is the chain's to say: someone else may have used the authorization.
            try:
                settled = await self.settle_by_authorization(payment, "authorization_expired", mint_keys=False)
            except (PaymentRequired, Conflict):
                return 1  # failed, recorded
            return int(not settled.pending)
        if await chain.transaction(tx_hash) is not None:
            return 0  # in the mempool: wait
        if payment.raw_tx is None:
            # Named by a facilitator, unknown to our node: we hold no bytes to send. If the
            # authorization was used (by whatever transaction), follow that; else wait for expiry.
            return await self._reconcile_submitted(payment)
        # Never reached the node (or was dropped): resend it (rebuilt only if its nonce was taken).
        try:
            sent = await self._send(payment.id, ExactPayment(**ledger.stored(payment.authorization, "authorization", payment)),
                                    tx_hash, ledger.stored(payment.raw_tx, "raw_tx", payment), mint_keys=False)
        except (PaymentRequired, Conflict):
            return 1  # the chain said failed, recorded
        if isinstance(sent, Settled):
            return int(not sent.pending)
        log.info("payment %s: settlement %s resent", payment.id, payment.tx_hash)
        return 0

    async def _reconcile_submitted(self, payment: Payment) -> int:
        """A payment handed to the facilitator whose answer never came (the process died, the
        facilitator timed out), or whose named transaction the node does not know. No transaction
        of ours exists to look up, so the authorization is: used → the transaction that used it
        decides (delivered once confirmed); unused and expired → failed, nothing was charged;
        unused and still valid → the facilitator may still send it: look again next pass. It is
        not sent again: one stuck /settle must not become two transactions."""
        chain = self.require_chain()
        # The clock first: expired before an "unused" reading means unused for ever.
        expired = payment.valid_before is not None and await chain.chain_now() >= payment.valid_before
        if not expired and not await chain.authorization_used(
                payment.payer, ledger.stored(payment.auth_nonce, "auth_nonce", payment)):
            return 0
        try:
            settled = await self.settle_by_authorization(payment, "authorization_expired", mint_keys=False)
        except (PaymentRequired, Conflict):
            return 1  # failed, recorded
        return int(not settled.pending)

    async def _reconcile_tx_claim(self, payment: Payment) -> int:
        """A tx-hash claim stopped between its record and its delivery (the process died). Its
        money was on-chain before the row was written, so nothing is "unsent": the transfer is
        checked again and the claim delivered (keys after wallet sign-in), or credited if the seats
        sold out meanwhile; only a transfer gone for good fails it (which frees the hash to be
        claimed again should it ever be mined)."""
        chain = self.require_chain()
        receipt = await chain.receipt(ledger.stored(payment.tx_hash, "tx_hash", payment))
        if receipt is None or not self.carries(receipt, payment):
            reason = await self.claimed_transfer_gone(payment, receipt)
            if reason is None:
                return 0  # may still be mined: look again next pass
            return int(await ledger.fail(self.db, self.clock, payment.id, reason, only_from=(PaymentState.VERIFIED, PaymentState.RESERVED)))
        if receipt.confirmations < self.confirmations:
            return 0
        if payment.state == PaymentState.VERIFIED:
            try:
                await ledger.reserve(self.db, self.clock, self.catalog, payment)
            except Conflict as exc:
                if exc.code != "sold_out":
                    return 0  # moved on meanwhile: whoever moved it finishes it
                return int(await ledger.credit_instead(self.db, self.clock, payment.id, "sold_out_after_payment",
                                                       only_from=(PaymentState.VERIFIED,)) is not None)
        if not await ledger.advance(self.db, self.clock, payment.id, PaymentState.RESERVED, PaymentState.CONFIRMED,
                                    block_number=receipt.block_number):
            return 0
        return int(await ledger.deliver(self.db, self.clock, payment.id, mint_keys=False) is not None)

    async def claimed_transfer_gone(self, payment: Payment, receipt: Receipt | None) -> str | None:
        """Why a tx-hash claim's transfer is gone for good, or None while it may still be mined.
        `receipt`: the claimed transaction's receipt when it is mined (and then it no longer pays)."""
        chain = self.require_chain()
        if receipt is not None:
            return "transfer_reverted"  # executed (again, after a reorg) and does not pay us
        if await chain.transaction(ledger.stored(payment.tx_hash, "tx_hash", payment)) is not None:
            return None  # in the mempool: it will be mined
        if payment.sender_nonce is not None and await chain.sender_nonce(payment.payer) > payment.sender_nonce:
            return "transfer_replaced"  # another transaction took its nonce: it can never be mined
        if await chain.block_number() >= ledger.stored(payment.block_number, "block_number", payment) + self.reorg_horizon_blocks:
            return "transfer_vanished"  # unknown to the node a whole horizon later
        return None

    def require_chain(self) -> ChainAdapter:
        if self.chain is None:
            raise ServiceUnavailable("USDC payments are not configured on this gateway.", code="payments_disabled")
        return self.chain


_UNSETTLED = {
    "settlement_reverted": "The settlement reverted on-chain.",
    "settlement_refused": "The x402 facilitator refused to settle the payment.",
    "transfer_mismatch": "The transaction the x402 facilitator named does not carry this payment.",
    "settlement_would_fail": "The settlement could not be sent again: it would revert.",
    "authorization_expired": "The authorization expired before the settlement was mined.",
}
