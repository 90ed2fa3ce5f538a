"""The payment ledger: every state of a payment is a committed row, and each transition is a
conditional UPDATE from the state it expects, so a transition happens once even when two
processes (a request and the reconciler) reach it together.

    received ─► verified ─► reserved ─► broadcast ─► confirmed ─► delivered ─► revoked (reason)
                               └─► submitted ─┘   (through an x402 facilitator; may fail too)
        └──────────┴───────────┴────────────┴─────────────┴──► failed (reason)       ▲
                                                               └──► credited (reason) ┘
                                          delivered | credited (past the horizon) ─► refunded

`failed` means no money moved, so the claim is released and the authorization or tx hash may be
redeemed again. `credited` means the money arrived but the seats could not be delivered (sold out
before a tx-hash claim, or a renewed subscription expired while its payment settled): the amount
went to the account's prepaid balance, and the claim stays taken for good.

An x402 authorization stays spendable until its `validBefore`, by anyone holding a copy, and
always to our `payTo`. So a failed x402 payment is watched until then (payments.late); if its
authorization pays us after all, it goes `failed → credited` (`paid_after_failure`), taking its
claim back, unless a retry holding the same authorization owns that transfer.

`received` claims the payment (x402: payer + authorization nonce; tx-hash: the claimed transaction)
under a unique index (the transaction that carried an x402 payment is not unique: one transaction
can execute several authorizations, each a payment of its own);
`reserved` holds the seats in the inventory; `broadcast` stores the signed settlement *before* it
is sent, so a restart resends the same bytes and never a second transaction. Through an x402
facilitator the transaction is not ours to sign: `submitted` is written *before* its `/settle` is
called, so a payment whose answer was lost (a crash, a timeout) has a row that says "maybe sent",
which the reconciler resolves from the chain (the authorization used → follow its transaction;
expired unused → failed); the facilitator's answer moves it on to `broadcast` with the hash it
names. `delivered` creates the account (bound to the payer's wallet, if new), the subscriptions
and their keys in the same transaction that moves the state.

`confirmed` names the transaction that really carried the Transfer (`tx_hash`, `block_number`):
our relayer's settlement, or a front-runner's copy of it. Until that block is past the reorg
horizon (`chain_final`), a delivered or credited payment is checked again; if its transfer is
gone for good it becomes `revoked`: subscriptions canceled and their seats released, keys
revoked, a renewal's added period and any credit taken back, all in one transaction.

`refunded` means the money is being given back (payments.refunds owns the refund's own progress:
balance credited, or a transfer from the refund wallet signed, sent and confirmed). Only a payment
past the reorg horizon is refunded, so a refunded payment is never re-checked nor revoked later; it
takes back what the payment bought, like `revoked`, in the refund's transaction."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar

from sqlalchemy import case, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from agent_gateway.accounts.service import add_credit, take_back_credit
from agent_gateway.catalog.pools import Catalog
from agent_gateway.catalog.pricing import BILLING_CYCLES, Order
from agent_gateway.clock import Clock, as_utc
from agent_gateway.db.engine import Database, rows_changed
from agent_gateway.db.models import Account, ApiKey, Payment, PaymentState, Subscription, SubscriptionStatus, new_id
from agent_gateway.errors import Conflict, PaymentRequired
from agent_gateway.keys.api_keys import new_api_key, revoke_subscription_keys
from agent_gateway.keys.management import new_management_key
from agent_gateway.keys.tokens import IssuedToken
from agent_gateway.subscriptions.inventory import release_seats, release_subscription_seats, reserve_seats
from agent_gateway.subscriptions.funding import is_pledge
from agent_gateway.subscriptions.service import new_subscriptions

log = logging.getLogger(__name__)
T = TypeVar("T")

FINAL_STATES = (PaymentState.DELIVERED, PaymentState.FAILED, PaymentState.CREDITED, PaymentState.REVOKED,
                PaymentState.REFUNDED)
# Money arrived: re-checked for reorgs until past the horizon.
SETTLED_STATES = (PaymentState.DELIVERED, PaymentState.CREDITED)
# Before the settlement was stored: nothing can have been sent for these x402 payments. (A tx-hash
# claim's money is on-chain before its row exists: the reconciler re-checks those instead.)
UNSENT_STATES = (PaymentState.RECEIVED, PaymentState.VERIFIED, PaymentState.RESERVED)
# Maybe on its way to the chain: our own signed settlement (`broadcast`), or one handed to the
# facilitator (`submitted`). Only the chain can fail these.
IN_FLIGHT_STATES = (PaymentState.SUBMITTED, PaymentState.BROADCAST)


class PaymentAlreadyUsed(PaymentRequired):
    code = "payment_already_used"


@dataclass(frozen=True)
class Claim:
    """What identifies a payment before anything is recorded."""

    method: str
    network: str
    payer: str
    amount_atomic: int
    auth_nonce: str | None = None
    valid_before: int | None = None
    tx_hash: str | None = None
    authorization: dict | None = None
    watch_from_block: int | None = None  # the head when the authorization was seen unused
    block_number: int | None = None  # tx-hash: the claimed transaction's block
    sender_nonce: int | None = None  # tx-hash: the claimed transaction's nonce
    credit_atomic: int = 0  # tx-hash: paid beyond the price, credited at delivery
    identifier: str | None = None  # x402 payment-identifier: the payer's idempotency key
    fingerprint: str | None = None  # with an identifier: the request it names (payments.idempotency)


@dataclass(frozen=True)
class Delivery:
    payment: Payment
    account: Account
    subscriptions: list[Subscription]
    keys: list[tuple[ApiKey, IssuedToken]]  # empty when delivered by the reconciler
    management_key: IssuedToken | None  # a new account's first management key
    # A delivery shown again (a payment-identifier retry): the keys minted then, never their plaintext.
    existing_keys: dict[str, ApiKey] = field(default_factory=dict)


async def record_received(db: Database, clock: Clock, claim: Claim, order: Order, *,
                          account_id: str | None, key_name: str, renew_subscription_id: str | None = None,
                          state: PaymentState = PaymentState.RECEIVED) -> Payment:
    """Claim the payment; a second claim of the same authorization or tx hash is refused."""
    now = clock.now()
    payment = Payment(
        id=new_id("pay"), method=claim.method, network=claim.network, payer=claim.payer.lower(),
        amount_atomic=claim.amount_atomic, auth_nonce=claim.auth_nonce, valid_before=claim.valid_before,
        tx_hash=claim.tx_hash, authorization=claim.authorization, state=state, account_id=account_id, pool_slug=order.pool.slug,
        blocks=list(order.blocks), quantity=order.quantity, billing_cycle=order.billing_cycle,
        unit_price_atomic=order.unit_price_atomic, key_name=key_name,
        renew_subscription_id=renew_subscription_id, watch_from_block=claim.watch_from_block,
        block_number=claim.block_number, sender_nonce=claim.sender_nonce, credit_atomic=claim.credit_atomic,
        payment_identifier=claim.identifier, request_fingerprint=claim.fingerprint,
        created_at=now, updated_at=now,
    )
    try:
        async with db.transaction() as session:
            session.add(payment)
    except IntegrityError as exc:
        raise PaymentAlreadyUsed(
            "This payment was already redeemed (or is being redeemed right now).") from exc
    log.info("payment %s %s: %s from %s, %d atomic", payment.id, state, claim.method, payment.payer,
             claim.amount_atomic)
    return payment


async def advance(db: Database, clock: Clock, payment_id: str, expected: PaymentState, new: PaymentState, **values: object) -> bool:
    """Move from `expected` to `new` (with extra column values); False if the payment was elsewhere."""
    async with db.transaction() as session:
        moved = await session.execute(
            update(Payment).where(col(Payment.id) == payment_id, col(Payment.state) == expected)
            .values(state=new, updated_at=clock.now(), **values)
        )
    if rows_changed(moved) == 1:
        log.info("payment %s %s -> %s", payment_id, expected, new)
    return rows_changed(moved) == 1


async def confirm(db: Database, clock: Clock, payment_id: str, expected: PaymentState, tx_hash: str,
                  block_number: int) -> bool:
    """`expected` -> confirmed, recording the transaction that carried the Transfer; False if the
    payment was elsewhere. Several x402 payments may name one transaction (a bundle of
    authorizations): only tx-hash claims hold their transaction under the unique index."""
    return await advance(db, clock, payment_id, expected, PaymentState.CONFIRMED, tx_hash=tx_hash,
                         block_number=block_number)


async def replace_settlement(db: Database, clock: Clock, payment_id: str, old_tx_hash: str,
                             tx_hash: str, raw_tx: str) -> bool:
    """Swap a stored settlement whose relayer nonce was taken (it can never be mined) for a new one."""
    async with db.transaction() as session:
        moved = await session.execute(
            update(Payment).where(col(Payment.id) == payment_id, col(Payment.state) == PaymentState.BROADCAST,
                                  col(Payment.tx_hash) == old_tx_hash)
            .values(tx_hash=tx_hash, raw_tx=raw_tx, updated_at=clock.now())
        )
    if rows_changed(moved) == 1:
        log.warning("payment %s: settlement %s replaced by %s (relayer nonce taken)", payment_id, old_tx_hash, tx_hash)
    return rows_changed(moved) == 1


async def reserve(db: Database, clock: Clock, catalog: Catalog, payment: Payment) -> None:
    """verified -> reserved, holding the seats in the same transaction (Conflict sold_out if gone)."""
    async with db.transaction() as session:
        if payment.renew_subscription_id is None:
            await reserve_seats(session, catalog, payment.pool_slug, tuple(payment.blocks), payment.quantity)
        moved = await session.execute(
            update(Payment).where(col(Payment.id) == payment.id, col(Payment.state) == PaymentState.VERIFIED)
            .values(state=PaymentState.RESERVED, seats_held=payment.renew_subscription_id is None, updated_at=clock.now())
        )
        if rows_changed(moved) != 1:
            raise Conflict("The payment moved on while its seats were being reserved.", code="payment_state_changed")
    log.info("payment %s verified -> reserved", payment.id)


async def fail(db: Database, clock: Clock, payment_id: str, reason: str, *, only_from: tuple[PaymentState, ...]) -> bool:
    """One of the states `only_from` -> failed, giving back held seats in the same transaction.

    The caller names the states it saw: a payment that moved on meanwhile (a request broadcast it
    while the reconciler looked at an older copy) is left alone, and False is returned."""
    async with db.transaction() as session:
        payment = await session.get(Payment, payment_id, with_for_update=True)
        if payment is None or payment.state not in only_from:
            return False
        if payment.seats_held:
            await release_seats(session, payment.pool_slug, list(payment.blocks), payment.quantity)
        previous = payment.state
        payment.state, payment.failure_reason, payment.seats_held = PaymentState.FAILED, reason, False
        payment.chain_final, payment.updated_at = True, clock.now()
        session.add(payment)
    log.warning("payment %s %s -> failed: %s", payment_id, previous, reason)
    return True


async def credit_instead(db: Database, clock: Clock, payment_id: str, reason: str, *,
                         only_from: tuple[PaymentState, ...]) -> Account | None:
    """Money already received but seats cannot be delivered: credit the amount to the payer's
    prepaid balance (its wallet account, created if new) and end the payment as `credited`, in one
    transaction. None if the payment was no longer in one of the states `only_from`."""
    now = clock.now()
    async with db.transaction() as session:
        payment = await session.get(Payment, payment_id, with_for_update=True)
        if payment is None or payment.state not in only_from:
            return None
        account = await _credit(session, payment, reason, now)
    return account


async def _credit(session: AsyncSession, payment: Payment, reason: str, now: datetime) -> Account:
    if payment.seats_held:
        await release_seats(session, payment.pool_slug, list(payment.blocks), payment.quantity)
    account, _ = await _account_for(session, payment, now)
    await add_credit(session, account.id, payment.amount_atomic, f"payment {payment.id}: {reason}", now)
    previous = payment.state
    payment.state, payment.failure_reason, payment.seats_held = PaymentState.CREDITED, reason, False
    payment.account_id, payment.updated_at = account.id, now
    session.add(payment)
    log.warning("payment %s %s -> credited (%s): %d atomic to account %s", payment.id, previous, reason,
                payment.amount_atomic, account.id)
    return account


# Failures after which the authorization can never move money: its nonce is spent (canceled by the
# payer, or used by a transfer that did not pay us) or it expired unused.
_AUTHORIZATION_SPENT_OR_DEAD = ("authorization_canceled", "authorization_used_elsewhere", "authorization_expired",
                                "authorization_expired_unused")
# Failures after the authorization left our hands (given to a facilitator's /settle, or sent in our
# own settlement and visible in the mempool): the cases where someone other than the payer can
# still send it. Watched before the others, which anyone can create for free (an authorization from
# an empty wallet fails `insufficient_balance`), so a flood of those cannot crowd these out.
_HANDED_OFF = ("settlement_refused", "settlement_reverted", "transfer_mismatch")


async def failed_payments_to_watch(db: Database, clock: Clock, chain_now: int, *, failed_since: datetime,
                                   grace_s: int, limit: int) -> list[Payment]:
    """Failed x402 payments whose authorization may still be used (it had not expired `grace_s`
    ago, chain time) and so pay `payTo` after all: the payer kept a copy, a facilitator sent it after
    answering "refused", or anyone who saw it pending sent it. Up to `limit`: failures after the
    authorization was handed off first, then those checked longest ago; each marked checked now.
    Only failures since `failed_since` (the index's range)."""
    async with db.transaction() as session:
        rows = list(await session.scalars(
            select(Payment).where(col(Payment.state) == PaymentState.FAILED,
                                  col(Payment.updated_at) >= failed_since,
                                  col(Payment.method) == "x402-exact",
                                  col(Payment.valid_before) > chain_now - grace_s,
                                  or_(col(Payment.failure_reason).is_(None),
                                      col(Payment.failure_reason).not_in(_AUTHORIZATION_SPENT_OR_DEAD)))
            .order_by(case((col(Payment.failure_reason).in_(_HANDED_OFF), 0), else_=1),
                      col(Payment.rechecked_at).asc().nulls_first(), col(Payment.updated_at), col(Payment.id))
            .limit(limit)))
        if rows:
            await session.execute(update(Payment).where(col(Payment.id).in_([p.id for p in rows]))
                                  .values(rechecked_at=clock.now()))
        return rows


async def credit_paid_after_failure(db: Database, clock: Clock, payment_id: str, tx_hash: str,
                                    block_number: int) -> Account | None:
    """failed -> credited: the payment's authorization was used after all, by `tx_hash` (mined in
    `block_number`, with the confirmations), and its Transfer paid `payTo`. The seats were given
    back when it failed, so the money goes to the payer's prepaid balance (its wallet's account,
    created if new), and the payment names the transaction so the reorg re-checks follow it (a
    reorg that takes the transfer away takes the credit back).

    Exactly once: the row takes the authorization back under its unique index. If another payment
    holds it now (the buyer retried with the same authorization), that payment owns the transfer
    and None is returned. A payment identifier another request has taken since is left to it."""
    now = clock.now()
    for keep_identifier in (True, False):
        try:
            async with db.transaction() as session:
                payment = await session.get(Payment, payment_id, with_for_update=True)
                if payment is None or payment.state != PaymentState.FAILED:
                    return None
                if await _authorization_held(session, payment):
                    log.info("payment %s: its authorization is another payment's now; that one owns transfer %s",
                             payment_id, tx_hash)
                    return None
                reason = payment.failure_reason
                payment.tx_hash, payment.block_number = tx_hash, block_number
                payment.chain_final, payment.rechecked_at = False, None
                if not keep_identifier:
                    payment.payment_identifier = None
                # The payer's money, so the payer's wallet account: not the account the request named.
                # Anyone can send a mined authorization to the gateway again as a purchase for an
                # account of theirs (refused, "nonce already used": one more failed row of it).
                payment.account_id = None
                account = await _credit(session, payment, "paid_after_failure", now)
                await session.flush()
        except IntegrityError as exc:
            # Taken between the check and the write (the index decides; the "credited" logged
            # above was rolled back with the rest).
            if keep_identifier and "identifier" in str(exc.orig):
                continue  # another request holds the identifier now: credit without it
            log.info("payment %s: its authorization was taken by another payment meanwhile; not credited",
                     payment_id)
            return None
        log.warning("payment %s: failed (%s), then paid by %s in block %d; credited to account %s",
                    payment_id, reason, tx_hash, block_number, account.id)
        return account
    return None


async def _authorization_held(session: AsyncSession, payment: Payment) -> bool:
    """Whether another payment, not failed, holds this payment's authorization (payer, nonce)."""
    held = await session.scalars(select(col(Payment.id)).where(
        col(Payment.payer) == payment.payer, col(Payment.auth_nonce) == payment.auth_nonce,
        col(Payment.state) != PaymentState.FAILED, col(Payment.id) != payment.id).limit(1))
    return held.first() is not None


async def deliver(db: Database, clock: Clock, payment_id: str, *, mint_keys: bool) -> Delivery | None:
    """confirmed -> delivered: the account, the subscriptions (or the renewal) and, on request, keys.

    Returns None when another caller delivered it first (the state was no longer `confirmed`), or
    when a renewal could not be delivered and was credited instead (the state is `credited`)."""
    try:
        return await _deliver(db, clock, payment_id, mint_keys=mint_keys)
    except IntegrityError:
        # Two first payments from one new wallet raced to create its account; the loser finds
        # the winner's account on the second try.
        return await _deliver(db, clock, payment_id, mint_keys=mint_keys)


async def _deliver(db: Database, clock: Clock, payment_id: str, *, mint_keys: bool) -> Delivery | None:
    now = clock.now()
    async with db.transaction() as session:
        payment = await session.get(Payment, payment_id, with_for_update=True)
        if payment is None or payment.state != PaymentState.CONFIRMED:
            return None
        account, management_key = await _account_for(session, payment, now)
        keys: list[tuple[ApiKey, IssuedToken]] = []
        if payment.renew_subscription_id is not None:
            sub = await _renewed_subscription(session, payment.renew_subscription_id)
            if sub.status != SubscriptionStatus.ACTIVE:
                # It expired (seats given back, keys revoked) while the renewal settled: the
                # money is kept for the customer as prepaid balance instead of being lost.
                await _credit(session, payment, "subscription_expired_before_renewal", now)
                return None
            # Paid renewals extend from the current end (or from now, if it already passed).
            sub.period_end = max(as_utc(sub.period_end), now) + BILLING_CYCLES[payment.billing_cycle][1]
            session.add(sub)
            subscriptions = [sub]
        else:
            subscriptions = new_subscriptions(account.id, payment.pool_slug, payment.blocks, payment.billing_cycle,
                                              payment.unit_price_atomic, payment.quantity, now,
                                              payment_id=payment.id,
                                              pledge=await is_pledge(session, payment.pool_slug))
            session.add_all(subscriptions)
            await session.flush()
            if mint_keys:
                for sub in subscriptions:
                    key, token = new_api_key(account.id, sub.id, payment.key_name, now)
                    session.add(key)
                    keys.append((key, token))
        if payment.credit_atomic:
            await add_credit(session, account.id, payment.credit_atomic,
                             f"payment {payment.id}: paid beyond the price", now)
        payment.state, payment.seats_held, payment.account_id, payment.updated_at = PaymentState.DELIVERED, False, account.id, now
        session.add(payment)
    log.info("payment %s confirmed -> delivered: account %s, %d subscription(s)%s", payment_id, account.id,
             len(subscriptions), "" if mint_keys else " (keys to be minted after wallet sign-in)")
    return Delivery(payment, account, subscriptions, keys, management_key)


async def _account_for(session: AsyncSession, payment: Payment, now: datetime) -> tuple[Account, IssuedToken | None]:
    if payment.account_id is not None:
        known = await session.get(Account, payment.account_id)
        if known is None:  # the buyer's account, authenticated when the payment was made
            raise RuntimeError(f"payment {payment.id}: account {payment.account_id} is missing")
        return known, None
    account = (await session.scalars(select(Account).where(col(Account.wallet_address) == payment.payer))).first()
    if account is not None:
        return account, None
    account = Account(id=new_id("acct"), name=f"wallet {payment.payer}", wallet_address=payment.payer,
                      created_at=now)
    session.add(account)
    await session.flush()
    key, token = new_management_key(account.id, "x402", now)
    session.add(key)
    return account, token


async def _renewed_subscription(session: AsyncSession, subscription_id: str) -> Subscription:
    """The subscription a renewal extends, locked. It exists: the order was made for it, and
    subscriptions are never deleted."""
    sub = await session.get(Subscription, subscription_id, with_for_update=True)
    if sub is None:
        raise RuntimeError(f"the renewed subscription {subscription_id} is missing")
    return sub


@dataclass(frozen=True)
class Revocation:
    payment: Payment
    subscription_ids: list[str]  # canceled
    key_ids: list[str]  # revoked: the caller ends them everywhere (KeyRevoker)
    taken_back_atomic: int  # credit reversed on the account's prepaid balance


async def revoke(db: Database, clock: Clock, payment_id: str, reason: str) -> Revocation | None:
    """delivered | credited -> revoked: the money is gone (a reorganised transfer), so is what it
    bought, in one transaction. None if the payment was not in one of those states any more."""
    now = clock.now()
    async with db.transaction() as session:
        payment = await session.get(Payment, payment_id, with_for_update=True)
        if payment is None or payment.state not in SETTLED_STATES:
            return None
        canceled, key_ids = await _take_back_purchase(session, payment, now)
        taken_back = payment.credit_atomic if payment.state == PaymentState.DELIVERED else payment.amount_atomic
        if taken_back and payment.account_id is not None:
            await take_back_credit(session, payment.account_id, taken_back,
                                   f"payment {payment.id} revoked: {reason}", now)
        previous = payment.state
        payment.state, payment.failure_reason, payment.chain_final, payment.updated_at = PaymentState.REVOKED, reason, True, now
        session.add(payment)
    log.warning("payment %s %s -> revoked (%s): %d subscription(s) canceled, %d key(s) revoked, %d atomic "
                "taken back from account %s", payment_id, previous, reason, len(canceled), len(key_ids), taken_back,
                payment.account_id)
    return Revocation(payment, canceled, key_ids, taken_back)


def refundable_atomic(payment: Payment) -> int:
    """What a refund of `payment` gives back: the price it paid. A delivered tx-hash claim's overpaid
    part is already on the prepaid balance (`credit_atomic`) and stays there; a credited payment's
    whole amount is on the balance."""
    if payment.state == PaymentState.CREDITED:
        return payment.amount_atomic
    return payment.amount_atomic - payment.credit_atomic


async def refund(session: AsyncSession, payment_id: str, now: datetime, reason: str, *,
                 take_back_credit_atomic: int = 0) -> Revocation | None:
    """Within the caller's transaction (the refund's own transition): delivered | credited ->
    refunded, for a payment past the reorg horizon only. What it bought is taken back (subscriptions
    canceled, seats released, keys revoked: the caller ends them everywhere after commit), and
    `take_back_credit_atomic` is taken off the account's balance (a credited payment refunded to its
    wallet; 409 credit_spent if the balance no longer holds it). None if the payment is not settled
    and final."""
    payment = await session.get(Payment, payment_id, with_for_update=True)
    if payment is None or payment.state not in SETTLED_STATES or not payment.chain_final:
        return None
    if take_back_credit_atomic and payment.account_id is not None:
        # The credit this payment left must still be there: refunding money the account already
        # spent on seats would pay for them twice.
        account = await session.get(Account, payment.account_id, with_for_update=True)
        if account is not None and account.balance_atomic < take_back_credit_atomic:
            raise Conflict(f"Payment {payment.id} was credited and the account {account.id} has spent that credit "
                           f"(balance {account.balance_atomic} atomic, {take_back_credit_atomic} needed).",
                           code="credit_spent")
    canceled, key_ids = await _take_back_purchase(session, payment, now)
    if take_back_credit_atomic and payment.account_id is not None:
        await take_back_credit(session, payment.account_id, take_back_credit_atomic,
                               f"payment {payment.id} refunded to its wallet: {reason}", now, kind="refund")
    previous = payment.state
    payment.state, payment.failure_reason, payment.updated_at = PaymentState.REFUNDED, reason[:60], now
    session.add(payment)
    log.warning("payment %s %s -> refunded (%s): %d subscription(s) canceled, %d key(s) revoked", payment_id,
                previous, reason, len(canceled), len(key_ids))
    return Revocation(payment, canceled, key_ids, take_back_credit_atomic)


async def _take_back_purchase(session: AsyncSession, payment: Payment, now: datetime) -> tuple[list[str], list[str]]:
    """What a delivered payment bought, taken back in the caller's transaction: its subscriptions
    canceled (a renewal: its added period, and the seat if nothing paid is left), their seats
    released, their keys revoked. The ids canceled and the key ids revoked."""
    canceled: list[Subscription] = []
    if payment.state == PaymentState.DELIVERED and payment.renew_subscription_id is not None:
        sub = await _renewed_subscription(session, payment.renew_subscription_id)
        # The renewal's period goes; if nothing paid is left, the seat goes too.
        sub.period_end = as_utc(sub.period_end) - BILLING_CYCLES[payment.billing_cycle][1]
        session.add(sub)
        if sub.status == SubscriptionStatus.ACTIVE and sub.period_end <= now:
            canceled.append(sub)
    elif payment.state == PaymentState.DELIVERED:
        canceled = list(await session.scalars(
            select(Subscription).where(col(Subscription.payment_id) == payment.id,
                                       col(Subscription.status).in_((SubscriptionStatus.ACTIVE, SubscriptionStatus.PENDING)))
            .with_for_update()))
    for sub in canceled:
        sub.status = SubscriptionStatus.CANCELED
        session.add(sub)
    await release_subscription_seats(session, [(sub.pool_slug, sub.blocks) for sub in canceled])
    key_ids = await revoke_subscription_keys(session, [s.id for s in canceled])
    return [s.id for s in canceled], key_ids


async def record_carrier(db: Database, clock: Clock, payment_id: str, tx_hash: str, block_number: int) -> bool:
    """A settled payment's Transfer is now in another block (re-mined after a reorg), or in
    another transaction (the same authorization, mined again by someone else). False only if the
    payment is no longer delivered or credited. It cannot meet the unique index: a tx-hash claim
    is only ever re-recorded with its own hash, and x402 payments are not under it."""
    async with db.transaction() as session:
        moved = await session.execute(
            update(Payment).where(col(Payment.id) == payment_id, col(Payment.state).in_(SETTLED_STATES))
            .values(tx_hash=tx_hash, block_number=block_number, updated_at=clock.now()))
    if rows_changed(moved) == 1:
        log.warning("payment %s: its Transfer is now in %s, block %d", payment_id, tx_hash, block_number)
    return rows_changed(moved) == 1


async def mark_chain_final(db: Database, payment_id: str) -> None:
    """Past the reorg horizon: the payment is no longer re-checked."""
    async with db.transaction() as session:
        await session.execute(update(Payment).where(col(Payment.id) == payment_id).values(chain_final=True))
    log.info("payment %s is past the reorg horizon", payment_id)


async def settled_payments_to_recheck(db: Database, clock: Clock, limit: int) -> list[Payment]:
    """Up to `limit` delivered or credited payments whose transfer is not yet past the reorg horizon,
    the ones checked longest ago first (never checked: first of all), each marked checked now. So
    every payment gets its turn however many there are, and one that stays undecided pass after
    pass (a node that lags, a transfer back in the mempool) goes to the back instead of taking a
    place in every pass."""
    async with db.transaction() as session:
        rows = list(await session.scalars(
            select(Payment).where(col(Payment.chain_final).is_(False), col(Payment.state).in_(SETTLED_STATES),
                                  col(Payment.block_number).is_not(None))
            .order_by(col(Payment.rechecked_at).asc().nulls_first(), col(Payment.created_at), col(Payment.id))
            .limit(limit)))
        if rows:
            await session.execute(update(Payment).where(col(Payment.id).in_([p.id for p in rows]))
                                  .values(rechecked_at=clock.now()))
        return rows


async def get_payment(db: Database, payment_id: str) -> Payment | None:
    async with db.transaction() as session:
        return await session.get(Payment, payment_id)


async def load_payment(db: Database, payment_id: str) -> Payment:
    """A payment known to exist (rows are never deleted): one this process wrote or read before."""
    payment = await get_payment(db, payment_id)
    if payment is None:
        raise RuntimeError(f"payment {payment_id} is missing from the ledger")
    return payment


def stored(value: T | None, column: str, payment: Payment) -> T:
    """A column the payment's state guarantees (the ledger wrote it on the way to that state)."""
    if value is None:
        raise RuntimeError(f"payment {payment.id} is {payment.state} but has no {column}")
    return value


async def unfinished_payments(db: Database, older_than: datetime) -> list[Payment]:
    """Payments not in a final state and not touched since `older_than`: the reconciler's work."""
    async with db.transaction() as session:
        rows = await session.scalars(
            select(Payment).where(col(Payment.state).not_in(FINAL_STATES), col(Payment.updated_at) <= older_than)
            .order_by(col(Payment.created_at)).limit(200)
        )
        return list(rows)
