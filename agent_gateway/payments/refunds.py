"""Refunds: money given back, for the pledges of a closed funding round and for one payment an
operator refunds. Every state of a refund is a committed row (`refunds`), and each transition is a
conditional UPDATE from the state it expects, so it happens once however many processes try.

    planned ──────────────────────────────────► refunded   (balance: credited in that transaction)
       │  ▲
       │  └── (reverted, or its nonce taken) ──┐
       ├──► broadcast ─────────────────────────┴► refunded  (chain: the transfer confirmed)
       └──► canceled   (the payment was revoked before it was final: its money never stayed)

`planned` is decided: a closed pool's pledges are canceled (seats released, keys revoked) in the
pool transition's own transaction, with their refunds planned beside them. A planned refund waits
(`waiting` says why) while its payment is not past the reorg horizon (`chain_final`), or while the
refund wallet lacks USDC or gas; the background pass carries it out once it can.

- To the balance: the payment moves to `refunded` (payments.ledger), the amount is credited to the
  account (a `refund` balance entry) and the refund to `refunded`, in one transaction. A pledge paid
  from the prepaid balance is always refunded there (no payment row: the refund names the pledge).
- On-chain: an ERC-20 `transfer` of the paid amount to the paying wallet, from the refund wallet
  (AGW_REFUND_PRIVATE_KEY). It is signed first; the signed bytes, their hash and the nonce are
  stored with `planned → broadcast` (and the payment's `→ refunded`) in one transaction *before*
  anything is sent, so a restart resends the same bytes and never a second transaction. The
  refund wallet's nonces are held under a unique index, so two processes never sign one nonce for
  two refunds. The refund is `refunded` once its transfer is past the reorg horizon (until then a
  reorg that drops it is followed by the same bytes sent again). A transfer that reverted, or whose
  nonce another transaction of the refund wallet took, goes back to `planned` and is signed again,
  but only once that is past the reorg horizon: before, a reorg can free the nonce (or re-run the
  reverted transfer) and the first bytes, public since they were sent, could be mined beside the
  second transfer: paid twice.

Only payments past the reorg horizon are refunded, so a refunded payment is never revoked later:
a payment revoked while its refund waits has nothing to give back (`canceled`)."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import func, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from agent_gateway.accounts.service import add_credit
from agent_gateway.catalog.pools import PoolStatus
from agent_gateway.clock import Clock
from agent_gateway.db.engine import Database, rows_changed
from agent_gateway.db.models import (
    Account,
    Payment,
    PaymentState,
    PoolState,
    Refund,
    RefundDestination,
    RefundState,
    Subscription,
    SubscriptionStatus,
    new_id,
)
from agent_gateway.errors import Conflict, GatewayError, InvalidRequest, NotFound
from agent_gateway.keys.api_keys import revoke_subscription_keys
from agent_gateway.keys.lifecycle import KeyLifecycle
from agent_gateway.metrics import REFUNDS
from agent_gateway.money import format_usdc
from agent_gateway.payments import ledger
from agent_gateway.payments.chain import ChainAdapter
from agent_gateway.subscriptions.inventory import release_subscription_seats

log = logging.getLogger(__name__)

R = RefundState
D = RefundDestination
REFUNDABLE_STATES = (PaymentState.DELIVERED, PaymentState.CREDITED)
# Why a planned refund waits (Refund.waiting).
AWAITING_FINALITY = "awaiting_finality"  # its payment is not past the reorg horizon yet
SHORT_USDC = "refund_wallet_short_usdc"
SHORT_GAS = "refund_wallet_short_gas"
CREDIT_SPENT = "credit_spent"  # a credited payment whose credit the account spent since
CHAIN_REFUNDS_OFF = "chain_refunds_off"  # planned on-chain, but no refund key is configured now
CHAIN_UNAVAILABLE = "chain_unavailable"
NONCE_TAKEN = "nonce_taken"  # its signed transfer can never be mined: signed again
TRANSFER_REVERTED = "transfer_reverted"
# Refund.reason
POOL_CLOSED = "pool_closed"
OPERATOR = "operator"
LIST_LIMIT = 500


class RefundRefused(Conflict):
    """A refund that cannot be made now (409): the payment's state, or the refund wallet's funds."""

    code = "refund_refused"


@dataclass(frozen=True)
class RefundWallet:
    """The refund wallet as the console shows it; amounts None when the chain did not answer."""

    address: str
    usdc_atomic: int | None = None
    native_wei: int | None = None
    transfer_cost_wei: int | None = None  # the most one refund transfer costs at the current fees
    outstanding_atomic: int = 0  # on-chain refunds signed but not yet mined (not yet off the balance)
    outstanding: int = 0
    error: str | None = None

    @property
    def refunds_left_by_gas(self) -> int | None:
        if self.native_wei is None or not self.transfer_cost_wei:
            return None
        return self.native_wei // self.transfer_cost_wei


@dataclass
class Outcome:
    """What one step did; `key_ids` were revoked in its transaction (`carry_out` ends them everywhere
    itself; after `plan_payment`, the caller does, once its transaction committed)."""

    refund: Refund | None
    key_ids: list[str] = field(default_factory=list)


def destination_of(text: str | None, default: RefundDestination) -> RefundDestination:
    if text is None or text == "":
        return default
    try:
        return RefundDestination(text)
    except ValueError:
        raise InvalidRequest("to must be balance or chain.", code="invalid_refund_destination") from None


class Refunds:
    """The refund state machine over one database and, for on-chain refunds, the refund wallet (a
    ChainAdapter holding AGW_REFUND_PRIVATE_KEY; None: on-chain refunds are off)."""

    def __init__(self, db: Database, clock: Clock, keys: KeyLifecycle, wallet: ChainAdapter | None, *,
                 default_destination: RefundDestination, confirmations: int, horizon_blocks: int | None = None,
                 batch_size: int = 100) -> None:
        self.db = db
        self.clock = clock
        self.keys = keys
        self.wallet = wallet
        self.default_destination = default_destination
        self.confirmations = confirmations
        # The depth past which a block is not reorganised (the payments' reorg horizon): a refund's
        # transfer is given up (signed again) only for what that deep a block says.
        self.horizon_blocks = max(confirmations, horizon_blocks or confirmations)
        self.batch_size = batch_size
        # Keys revoked by a pool transition's hook, ended everywhere once it committed (by slug).
        self._unannounced: dict[str, list[str]] = {}

    @property
    def chain_enabled(self) -> bool:
        return self.wallet is not None

    @property
    def wallet_address(self) -> str | None:
        return self.wallet.relayer_address.lower() if self.wallet is not None else None

    # --- a closed pool --------------------------------------------------------------------------

    async def on_pool_transition(self, session: AsyncSession, slug: str, before: PoolStatus, after: PoolStatus,
                                 now: datetime) -> None:
        """A pool transition hook (admin.pools): on `closed`, every pledge on the pool is canceled
        (seats released, keys revoked) and refunded, in the transition's transaction, so a pool is
        never closed with a pledge unplanned."""
        if after != PoolStatus.CLOSED:
            return
        self._unannounced[slug] = await self.plan_pool(session, slug, now, note=f"pool {slug} closed (was {before})")

    async def after_pool_transition(self, slug: str, before: PoolStatus, after: PoolStatus) -> None:
        """After the transition committed: end the pledges' keys in every process."""
        key_ids = self._unannounced.pop(slug, [])
        if key_ids:
            await self.keys.end_revoked_keys(key_ids, "pool_closed")

    async def plan_pool(self, session: AsyncSession, slug: str, now: datetime, *, note: str) -> list[str]:
        """Within the caller's transaction: cancel every pledge on `slug` and plan its refund; refunds
        to the balance of payments already final (and of balance-paid pledges) are made at once.
        Returns the key ids revoked."""
        pledges = list(await session.scalars(
            select(Subscription).where(col(Subscription.pool_slug) == slug,
                                       col(Subscription.status) == SubscriptionStatus.PENDING)
            .order_by(col(Subscription.id)).with_for_update()))
        if not pledges:
            return []
        for sub in pledges:
            sub.status = SubscriptionStatus.CANCELED
            session.add(sub)
        await release_subscription_seats(session, [(s.pool_slug, s.blocks) for s in pledges])
        key_ids = await revoke_subscription_keys(session, [s.id for s in pledges])
        by_payment: dict[str, list[Subscription]] = defaultdict(list)
        refunded = planned = 0
        for sub in pledges:
            if sub.payment_id is not None:
                by_payment[sub.payment_id].append(sub)
            elif sub.charge_id is not None:  # paid from the prepaid balance: back to it, now
                refund = self._new(now, subscription_id=sub.id, account_id=sub.account_id, pool_slug=slug,
                                   amount_atomic=sub.price_atomic, destination=D.BALANCE, to_address=None,
                                   reason=POOL_CLOSED, note=note, actor="system")
                refund.state, refund.finished_at = R.REFUNDED, now
                session.add(refund)
                await add_credit(session, sub.account_id, sub.price_atomic,
                                 f"refund {refund.id}: pledge {sub.id} on closed pool {slug}", now, kind="refund")
                REFUNDS.labels(destination=D.BALANCE, outcome="refunded").inc()
                refunded += 1
        for payment_id in sorted(by_payment):
            payment = await session.get(Payment, payment_id, with_for_update=True)
            if payment is None or await self._refund_of(session, payment_id) is not None:
                continue
            destination = self.default_destination if payment.state == PaymentState.DELIVERED else D.BALANCE
            refund = self._new(now, payment_id=payment.id, account_id=payment.account_id, pool_slug=slug,
                               amount_atomic=ledger.refundable_atomic(payment), destination=destination,
                               to_address=payment.payer, reason=POOL_CLOSED, note=note, actor="system")
            session.add(refund)
            await session.flush()
            if destination == D.BALANCE and await self._to_balance(session, refund, now) is not None:
                refunded += 1
            else:
                refund.waiting = None if payment.chain_final else AWAITING_FINALITY
                session.add(refund)
                planned += 1
        log.warning("pool %s closed: %d pledge(s) canceled, %d key(s) revoked; %d refund(s) made to the balance, "
                    "%d planned", slug, len(pledges), len(key_ids), refunded, planned)
        return key_ids

    # --- one payment ----------------------------------------------------------------------------

    async def plan_payment(self, session: AsyncSession, payment_id: str, destination: RefundDestination, *,
                           note: str, actor: str, now: datetime) -> Outcome:
        """Within the caller's transaction: plan the refund of one payment (the operator's), and
        make it at once when it goes to the balance and the payment is final. 404 unknown payment;
        409 refund_refused when it is not refundable (its state, already refunded, on-chain refunds
        off, a credited payment to the balance it is already on)."""
        payment = await session.get(Payment, payment_id, with_for_update=True)
        self.check_refundable(payment, await self._refund_of(session, payment_id), destination, payment_id)
        assert payment is not None
        amount = ledger.refundable_atomic(payment)
        refund = self._new(now, payment_id=payment.id, account_id=payment.account_id, pool_slug=payment.pool_slug,
                           amount_atomic=amount, destination=destination, to_address=payment.payer,
                           reason=OPERATOR, note=note, actor=actor)
        session.add(refund)
        await session.flush()
        outcome = Outcome(refund)
        if destination == D.BALANCE and payment.chain_final:
            outcome.key_ids = await self._to_balance(session, refund, now) or []
        elif not payment.chain_final:
            refund.waiting = AWAITING_FINALITY
            session.add(refund)
        return outcome

    async def refusal(self, payment_id: str, destination: RefundDestination) -> None:
        """The operator's refund checked before anything is written (the same checks `plan_payment`
        makes again under the payment's lock): raises what it would raise."""
        async with self.db.read() as session:
            payment = await session.get(Payment, payment_id)
            existing = await self._refund_of(session, payment_id)
            account = (await session.get(Account, payment.account_id)
                       if payment is not None and payment.account_id is not None else None)
        self.check_refundable(payment, existing, destination, payment_id, account)

    def check_refundable(self, payment: Payment | None, existing: Refund | None, destination: RefundDestination,
                         payment_id: str, account: Account | None = None) -> None:
        """Raise unless `payment` can be refunded to `destination`. With the buyer's `account`: a
        credited payment whose credit was spent since is refused (409 credit_spent), since refunding it
        would pay twice for what the credit bought (the signing transaction checks it again)."""
        if payment is None:
            raise NotFound(f"No payment {payment_id!r}.", code="payment_not_found")
        if existing is not None or payment.state == PaymentState.REFUNDED:
            raise RefundRefused(f"Payment {payment_id} is already refunded"
                                + (f" (refund {existing.id}, {existing.state})." if existing else "."),
                                code="already_refunded",
                                extra={"refundId": existing.id if existing else None})
        if payment.state not in REFUNDABLE_STATES:
            raise RefundRefused(f"Payment {payment_id} is {payment.state}: only delivered or credited payments "
                                "(money that arrived and stayed) can be refunded.", code="payment_not_refundable")
        if payment.state == PaymentState.CREDITED and destination == D.BALANCE:
            raise RefundRefused(f"Payment {payment_id} was credited: its amount is already on the account's "
                                "prepaid balance. Refund it on-chain (--to chain), or debit the balance.",
                                code="payment_already_credited")
        if payment.state == PaymentState.CREDITED and account is not None \
                and account.balance_atomic < payment.amount_atomic:
            raise RefundRefused(f"Payment {payment_id} was credited, and account {account.id} has spent that credit "
                                f"(balance {format_usdc(account.balance_atomic)} USDC, "
                                f"{format_usdc(payment.amount_atomic)} needed): refunding it would pay twice for "
                                "what the credit bought.", code=CREDIT_SPENT)
        if destination == D.CHAIN:
            self._require_wallet()
        if ledger.refundable_atomic(payment) <= 0:
            raise RefundRefused(f"Payment {payment_id} has nothing to refund.", code="payment_not_refundable")

    async def check_wallet(self, amount_atomic: int) -> RefundWallet:
        """409 unless the refund wallet holds `amount_atomic` more USDC than the on-chain refunds
        still being sent, and the gas for one more transfer than those (503 if the chain does not
        answer)."""
        wallet = await self._read_wallet(self._require_wallet(), raise_unavailable=True)
        problem = _shortfall(wallet, amount_atomic)
        if problem is not None:
            code, message = problem
            REFUNDS.labels(destination=D.CHAIN, outcome="refused").inc()
            raise RefundRefused(message, code=code, extra={"wallet": wallet.address})
        return wallet

    # --- carrying refunds out -------------------------------------------------------------------

    async def carry_out(self, refund_id: str) -> Outcome:
        """Take one refund as far as it can go now (never raises for the chain: a refund that cannot
        go on stays where it is, `waiting` saying why); its keys are ended everywhere."""
        refund = await self.get(refund_id)
        try:
            outcome = await self._step(refund)
        except GatewayError as exc:
            log.warning("refund %s: deferred: %s", refund_id, exc.message)
            await self._wait(refund, CHAIN_UNAVAILABLE if exc.code == "chain_unavailable" else exc.code[:40])
            outcome = Outcome(await self.get(refund_id))
        if outcome.key_ids:
            await self.keys.end_revoked_keys(outcome.key_ids, "payment_refunded")
        return outcome

    async def run(self) -> int:
        """The background pass: follow the sent transfers first (their nonces come before any new
        one), then carry out the planned refunds. The number of refunds that moved."""
        moved = 0
        await self._sweep_closed_pools()
        for state in (R.BROADCAST, R.PLANNED):
            async with self.db.read() as session:
                rows = list(await session.scalars(
                    select(Refund).where(col(Refund.state) == state)
                    .order_by(col(Refund.updated_at), col(Refund.id)).limit(self.batch_size)))
            for refund in rows:
                try:
                    outcome = await self.carry_out(refund.id)
                except Exception:
                    log.exception("refund %s: pass failed; retried next pass", refund.id)
                    continue
                if outcome.refund is not None and outcome.refund.state != refund.state:
                    moved += 1
        return moved

    async def _sweep_closed_pools(self) -> None:
        """A payment checked before its pool closed can deliver after it: a pledge on a closed pool
        (subscriptions.funding). Each pass cancels and refunds such pledges like the close did, under
        the pool state row's lock, which a delivery holds while it decides "pledge"."""
        async with self.db.read() as session:
            slugs = list((await session.execute(
                select(Subscription.pool_slug).distinct()
                .join(PoolState, col(PoolState.pool_slug) == col(Subscription.pool_slug))
                .where(col(Subscription.status) == SubscriptionStatus.PENDING,
                       col(PoolState.status) == PoolStatus.CLOSED))).scalars())
        for slug in slugs:
            try:  # one pool that fails to sweep must not hold back the others, nor the refunds
                async with self.db.transaction() as session:
                    row = await session.get(PoolState, slug, with_for_update=True)
                    if row is None or row.status != PoolStatus.CLOSED:
                        continue
                    key_ids = await self.plan_pool(session, slug, self.clock.now(),
                                                   note=f"pledge delivered after pool {slug} closed")
            except Exception:
                log.exception("closed pool %s: late pledges not swept; retried next pass", slug)
                continue
            if key_ids:
                await self.keys.end_revoked_keys(key_ids, "pool_closed")

    async def _step(self, refund: Refund) -> Outcome:
        if refund.state == R.BROADCAST:
            return await self._follow(refund)
        if refund.state != R.PLANNED:
            return Outcome(refund)
        payment = await ledger.get_payment(self.db, refund.payment_id) if refund.payment_id else None
        if payment is not None and payment.state in (PaymentState.REVOKED, PaymentState.FAILED):
            return await self._cancel(refund, f"payment {payment.state}")
        if payment is not None and payment.state != PaymentState.REFUNDED and not payment.chain_final:
            await self._wait(refund, AWAITING_FINALITY)
            return Outcome(await self.get(refund.id))
        if refund.destination == D.BALANCE:
            async with self.db.transaction() as session:
                key_ids = await self._to_balance(session, refund, self.clock.now())
            return Outcome(await self.get(refund.id), key_ids or [])
        return await self._sign_and_send(refund)

    async def _to_balance(self, session: AsyncSession, refund: Refund, now: datetime) -> list[str] | None:
        """planned -> refunded to the balance, in the caller's transaction: the payment refunded
        (what it bought taken back) and the amount credited. None when the payment is not (yet)
        refundable: the refund stays planned."""
        key_ids: list[str] = []
        if refund.payment_id is not None:
            revocation = await ledger.refund(session, refund.payment_id, now, f"refund {refund.id}")
            if revocation is None:
                return None
            key_ids = revocation.key_ids
        if refund.account_id is None:
            raise RuntimeError(f"refund {refund.id} to the balance has no account")
        await add_credit(session, refund.account_id, refund.amount_atomic,
                         f"refund {refund.id}" + (f" of payment {refund.payment_id}" if refund.payment_id else ""),
                         now, kind="refund")
        moved = await session.execute(
            update(Refund).where(col(Refund.id) == refund.id, col(Refund.state) == R.PLANNED)
            .values(state=R.REFUNDED, waiting=None, finished_at=now, updated_at=now))
        if rows_changed(moved) != 1:
            raise Conflict(f"Refund {refund.id} moved on meanwhile.", code="refund_state_changed")
        REFUNDS.labels(destination=D.BALANCE, outcome="refunded").inc()
        log.info("refund %s planned -> refunded: %s USDC to the balance of account %s%s", refund.id,
                 format_usdc(refund.amount_atomic), refund.account_id,
                 f" (payment {refund.payment_id})" if refund.payment_id else "")
        return key_ids

    async def _sign_and_send(self, refund: Refund) -> Outcome:
        if self.wallet is None:
            await self._wait(refund, CHAIN_REFUNDS_OFF)
            return Outcome(await self.get(refund.id))
        wallet = self.wallet
        balances = await self._read_wallet(wallet, raise_unavailable=True)
        problem = _shortfall(balances, refund.amount_atomic)
        if problem is not None:
            await self._wait(refund, problem[0])
            return Outcome(await self.get(refund.id))
        to = refund.to_address
        if to is None:
            raise RuntimeError(f"on-chain refund {refund.id} has no destination address")
        nonce = max(await wallet.pending_nonce(), await self._next_stored_nonce() or 0)
        signed = await wallet.build_transfer(to, refund.amount_atomic, nonce)
        now = self.clock.now()
        key_ids: list[str] = []
        try:
            async with self.db.transaction() as session:
                payment = await session.get(Payment, refund.payment_id) if refund.payment_id else None
                if payment is not None and payment.state != PaymentState.REFUNDED:
                    take_back = payment.amount_atomic if payment.state == PaymentState.CREDITED else 0
                    revocation = await ledger.refund(session, payment.id, now, f"refund {refund.id}",
                                                     take_back_credit_atomic=take_back)
                    if revocation is None:
                        raise Conflict(f"Payment {payment.id} is not refundable now.", code="payment_not_refundable")
                    key_ids = revocation.key_ids
                moved = await session.execute(
                    update(Refund).where(col(Refund.id) == refund.id, col(Refund.state) == R.PLANNED)
                    .values(state=R.BROADCAST, waiting=None, from_address=self.wallet_address, nonce=signed.nonce,
                            tx_hash=signed.tx_hash, raw_tx=signed.raw_tx, block_number=None, updated_at=now))
                if rows_changed(moved) != 1:
                    raise Conflict(f"Refund {refund.id} moved on meanwhile.", code="refund_state_changed")
        except IntegrityError:  # another process signed this nonce for another refund first
            log.info("refund %s: nonce %d taken by another refund; signed again next pass", refund.id, signed.nonce)
            return Outcome(refund)
        except Conflict as exc:
            log.info("refund %s: not signed: %s", refund.id, exc.message)
            if exc.code == CREDIT_SPENT:
                await self._wait(refund, CREDIT_SPENT)
            return Outcome(await self.get(refund.id))
        log.warning("refund %s planned -> broadcast: %s USDC to %s, tx %s (nonce %d), stored before sending",
                    refund.id, format_usdc(refund.amount_atomic), to, signed.tx_hash, signed.nonce)
        try:
            await wallet.broadcast(signed.raw_tx)
        except GatewayError as exc:  # stored: the next pass sends the same bytes again
            log.warning("refund %s: sending %s failed (%s); resent next pass", refund.id, signed.tx_hash, exc.message)
        return Outcome(await self.get(refund.id), key_ids)

    async def _follow(self, refund: Refund) -> Outcome:
        wallet = self._require_wallet()
        tx_hash, raw_tx = refund.tx_hash, refund.raw_tx
        if tx_hash is None or raw_tx is None:
            raise RuntimeError(f"refund {refund.id} is broadcast but has no stored transfer")
        receipt = await wallet.receipt(tx_hash)
        now = self.clock.now()
        if receipt is None:
            await self._unmined(refund, now)
            try:
                await wallet.broadcast(raw_tx)  # the same stored bytes: the node has them, or has them again
                log.debug("refund %s: transfer %s (nonce %s) sent again, not mined yet", refund.id, tx_hash,
                          refund.nonce)
            except GatewayError as exc:
                if exc.code != "relayer_nonce_conflict":
                    raise
                # Another transaction of the refund wallet took the nonce. Only once that is past
                # the reorg horizon can these bytes never be mined: before, a reorg may free the
                # nonce again, and anyone may resend them (they are public), so a second transfer
                # signed now could be paid as well.
                if not await self._nonce_taken_for_good(wallet, refund):
                    log.warning("refund %s: nonce %s of its transfer %s is taken by another transaction not yet "
                                "past the reorg horizon; waiting", refund.id, refund.nonce, tx_hash)
                    return Outcome(await self.get(refund.id))
                # The payment stays refunded; the refund is signed again.
                await self._back_to_planned(refund, NONCE_TAKEN, now)
                log.error("refund %s: its transfer %s lost nonce %s to another transaction of the refund "
                          "wallet; signed again", refund.id, tx_hash, refund.nonce)
            return Outcome(await self.get(refund.id))
        final = receipt.confirmations >= self.horizon_blocks
        if not receipt.ok and final:
            await self._back_to_planned(refund, TRANSFER_REVERTED, now)
            REFUNDS.labels(destination=D.CHAIN, outcome="reverted").inc()
            log.error("refund %s: transfer %s reverted in block %d; planned again", refund.id, tx_hash,
                      receipt.block_number)
            return Outcome(await self.get(refund.id))
        if not receipt.ok:
            # A reverted transfer in a block a reorg may drop can be mined again, and succeed then:
            # it is given up (signed again) only once its block is past the horizon.
            log.warning("refund %s: transfer %s reverted in block %d; planned again once that block is past the "
                        "reorg horizon", refund.id, tx_hash, receipt.block_number)
        # Refunded once past the reorg horizon, as a payment is final then: until that depth a reorg
        # may drop the transfer, and these bytes are followed (sent again) until then.
        done = receipt.ok and final
        async with self.db.transaction() as session:
            values: dict[str, object] = {"block_number": receipt.block_number, "updated_at": now}
            if done:
                values |= {"state": R.REFUNDED, "finished_at": now}
            moved = await session.execute(
                update(Refund).where(col(Refund.id) == refund.id, col(Refund.state) == R.BROADCAST,
                                     col(Refund.tx_hash) == tx_hash).values(**values))
        if done and rows_changed(moved) == 1:
            REFUNDS.labels(destination=D.CHAIN, outcome="refunded").inc()
            log.warning("refund %s broadcast -> refunded: %s USDC to %s in tx %s (block %d)", refund.id,
                        format_usdc(refund.amount_atomic), refund.to_address, tx_hash, receipt.block_number)
        return Outcome(await self.get(refund.id))

    async def _nonce_taken_for_good(self, wallet: ChainAdapter, refund: Refund) -> bool:
        """The refund's nonce is used, in a block past the reorg horizon, by a transaction that is
        not its stored transfer: those bytes can never be mined."""
        if refund.nonce is None or refund.tx_hash is None:
            return False
        final_block = await wallet.block_number() - self.horizon_blocks + 1
        sender = refund.from_address or wallet.relayer_address  # the key that signed it (it may have changed)
        if final_block < 0 or await wallet.sender_nonce(sender, final_block) <= refund.nonce:
            return False
        return await wallet.receipt(refund.tx_hash) is None  # asked last: not ours after all

    async def _unmined(self, refund: Refund, now: datetime) -> None:
        """A transfer with no receipt: not mined, or mined and dropped by a reorg (it counts as still
        to leave the wallet again). Touched, so the pass, longest untouched first, reaches every one."""
        async with self.db.transaction() as session:
            await session.execute(
                update(Refund).where(col(Refund.id) == refund.id, col(Refund.state) == R.BROADCAST,
                                     col(Refund.tx_hash) == refund.tx_hash)
                .values(block_number=None, updated_at=now))
        if refund.block_number is not None:
            log.error("refund %s: its transfer %s, mined in block %s, is gone (a reorg); sent again", refund.id,
                      refund.tx_hash, refund.block_number)

    async def _back_to_planned(self, refund: Refund, why: str, now: datetime) -> None:
        async with self.db.transaction() as session:
            await session.execute(
                update(Refund).where(col(Refund.id) == refund.id, col(Refund.state) == R.BROADCAST,
                                     col(Refund.tx_hash) == refund.tx_hash)
                .values(state=R.PLANNED, waiting=why, nonce=None, tx_hash=None, raw_tx=None, block_number=None,
                        updated_at=now))

    async def _cancel(self, refund: Refund, why: str) -> Outcome:
        now = self.clock.now()
        async with self.db.transaction() as session:
            moved = await session.execute(
                update(Refund).where(col(Refund.id) == refund.id, col(Refund.state) == R.PLANNED)
                .values(state=R.CANCELED, waiting=why[:40], finished_at=now, updated_at=now))
        if rows_changed(moved) == 1:
            REFUNDS.labels(destination=refund.destination, outcome="canceled").inc()
            log.warning("refund %s planned -> canceled: %s (nothing to give back)", refund.id, why)
        return Outcome(await self.get(refund.id))

    async def _wait(self, refund: Refund, why: str) -> None:
        """A planned refund that cannot go on now: say why (shown in the console; logged when it
        changes). Its `updated_at` moves too, so the pass, which takes the longest untouched first,
        gets to every refund however many wait."""
        if refund.state != R.PLANNED:
            return
        async with self.db.transaction() as session:
            await session.execute(update(Refund).where(col(Refund.id) == refund.id, col(Refund.state) == R.PLANNED)
                                  .values(waiting=why, updated_at=self.clock.now()))
        if refund.waiting != why:
            log.info("refund %s waits: %s", refund.id, why)

    async def _next_stored_nonce(self) -> int | None:
        """One past the highest nonce a refund of this wallet holds (a stored transfer the node may
        not have yet, after a crash between storing and sending)."""
        async with self.db.read() as session:
            highest = (await session.execute(
                select(func.max(Refund.nonce)).where(col(Refund.from_address) == self.wallet_address))).scalar()
        return None if highest is None else int(highest) + 1

    # --- the view -------------------------------------------------------------------------------

    async def wallet_balances(self, *, raise_unavailable: bool = False) -> RefundWallet | None:
        """The refund wallet's USDC and gas, and the on-chain refunds still being sent; None when
        on-chain refunds are off. A chain that does not answer: `error` says so (or 503)."""
        if self.wallet is None:
            return None
        return await self._read_wallet(self.wallet, raise_unavailable=raise_unavailable)

    async def _read_wallet(self, wallet: ChainAdapter, *, raise_unavailable: bool) -> RefundWallet:
        address = wallet.relayer_address
        async with self.db.read() as session:
            count, total = (await session.execute(
                select(func.count(), func.coalesce(func.sum(Refund.amount_atomic), 0))
                .where(col(Refund.state) == R.BROADCAST, col(Refund.block_number).is_(None)))).one()
        try:
            usdc = await wallet.balance_of(address)
            native = await wallet.native_balance(address)
            cost = await wallet.transfer_cost()
        except GatewayError as exc:
            if raise_unavailable:
                raise
            return RefundWallet(address=address, outstanding=int(count), outstanding_atomic=int(total),
                                error=exc.message)
        return RefundWallet(address=address, usdc_atomic=usdc, native_wei=native, transfer_cost_wei=cost,
                            outstanding=int(count), outstanding_atomic=int(total))

    async def get(self, refund_id: str) -> Refund:
        async with self.db.read() as session:
            refund = await session.get(Refund, refund_id)
        if refund is None:
            raise NotFound(f"No refund {refund_id!r}.", code="refund_not_found")
        return refund

    async def list(self, *, state: str | None = None, payment_id: str | None = None, pool: str | None = None,
                   limit: int = 100) -> list[Refund]:
        """Newest first; the ones still in progress (planned, broadcast) first of all."""
        query = select(Refund)
        if state:
            query = query.where(col(Refund.state) == state)
        if payment_id:
            query = query.where(col(Refund.payment_id) == payment_id)
        if pool:
            query = query.where(col(Refund.pool_slug) == pool)
        async with self.db.read() as session:
            rows = list(await session.scalars(
                query.order_by(col(Refund.created_at).desc(), col(Refund.id).desc()).limit(min(limit, LIST_LIMIT))))
        return sorted(rows, key=lambda r: r.state not in (R.PLANNED, R.BROADCAST))

    # --- helpers --------------------------------------------------------------------------------

    def _require_wallet(self) -> ChainAdapter:
        if self.wallet is None:
            raise RefundRefused("On-chain refunds are off: set AGW_REFUND_PRIVATE_KEY (the refund wallet).",
                                code="chain_refunds_off")
        return self.wallet

    @staticmethod
    async def _refund_of(session: AsyncSession, payment_id: str) -> Refund | None:
        return (await session.scalars(select(Refund).where(col(Refund.payment_id) == payment_id))).first()

    def _new(self, now: datetime, *, pool_slug: str, amount_atomic: int, destination: RefundDestination,
             to_address: str | None, reason: str, note: str, actor: str, payment_id: str | None = None,
             subscription_id: str | None = None, account_id: str | None = None) -> Refund:
        return Refund(id=new_id("rfd"), payment_id=payment_id, subscription_id=subscription_id, account_id=account_id,
                      pool_slug=pool_slug, amount_atomic=amount_atomic, destination=destination,
                      to_address=to_address.lower() if to_address else None, state=R.PLANNED, reason=reason,
                      note=note[:500], actor=actor, created_at=now, updated_at=now)


def _shortfall(wallet: RefundWallet, amount_atomic: int) -> tuple[str, str] | None:
    """(code, message) when the refund wallet cannot send one more refund of `amount_atomic`."""
    usdc_needed = amount_atomic + wallet.outstanding_atomic
    if wallet.usdc_atomic is not None and wallet.usdc_atomic < usdc_needed:
        pending = (f" (plus {format_usdc(wallet.outstanding_atomic)} USDC in {wallet.outstanding} refund(s) "
                   "still being sent)") if wallet.outstanding else ""
        return SHORT_USDC, (f"The refund wallet {wallet.address} holds {format_usdc(wallet.usdc_atomic)} USDC; this "
                            f"refund needs {format_usdc(amount_atomic)} USDC{pending}. Fund it and retry.")
    if wallet.native_wei is not None and wallet.transfer_cost_wei is not None:
        gas_needed = wallet.transfer_cost_wei * (1 + wallet.outstanding)
        if wallet.native_wei < gas_needed:
            return SHORT_GAS, (f"The refund wallet {wallet.address} holds {wallet.native_wei} wei for gas; one refund "
                               f"transfer may cost {wallet.transfer_cost_wei} wei at the current fees"
                               + (f" ({wallet.outstanding} more still being sent)" if wallet.outstanding else "")
                               + ". Fund it and retry.")
    return None
