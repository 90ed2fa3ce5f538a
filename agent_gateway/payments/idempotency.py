"""The x402 `payment-identifier` extension on the ledger: a payer's idempotency key names one purchase.

An identifier belongs to the wallet that signed the payment: it is unique per payer over the
payments that have not failed (`ux_payments_identifier`), so one wallet's key never reaches
another wallet's purchase, and a failed payment (no money moved) frees its key as it frees its
authorization. The payment row keeps the SHA-256 of the request the key was first sent with
(`request_fingerprint`): the same key with the same request is a retry and is shown the same
purchase (never its plaintext keys again); the same key with anything else is a conflict."""

from __future__ import annotations

import hashlib
import json
import logging

from sqlalchemy import select
from sqlmodel import col

from agent_gateway.catalog.pricing import Order
from agent_gateway.db.engine import Database
from agent_gateway.db.models import Account, ApiKey, Payment, PaymentState, Subscription
from agent_gateway.errors import Conflict
from agent_gateway.payments.ledger import Delivery
from agent_gateway.payments.rules import recover_authorizer
from agent_gateway.payments.wire import ExactPayment, Offer

log = logging.getLogger(__name__)


class IdentifierConflict(Conflict):
    code = "payment_identifier_conflict"


def request_fingerprint(payment: ExactPayment, order: Order, *, account_id: str | None, key_name: str,
                        renew_subscription_id: str | None) -> str:
    """What makes two requests the same purchase: the signed authorization (every field and the
    signature) and the order it pays for, for the same buyer. Not the transport: a retry over MCP
    of a purchase first sent over HTTP is the same purchase."""
    request = {
        "payment": {"network": payment.network, "payer": payment.payer.lower(), "to": payment.to.lower(),
                    "value": str(payment.value), "validAfter": str(payment.valid_after),
                    "validBefore": str(payment.valid_before), "nonce": payment.nonce, "signature": payment.signature},
        "order": {"pool": order.pool.slug, "blocks": sorted(order.blocks), "quantity": order.quantity,
                  "billingCycle": order.billing_cycle, "renews": renew_subscription_id},
        "accountId": account_id, "keyName": key_name,
    }
    return hashlib.sha256(json.dumps(request, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


async def purchase_shown_again(db: Database, payment: ExactPayment, fingerprint: str, offer: Offer,
                               chain_id: int, token_address: str) -> tuple[Payment, Delivery | None] | None:
    """The purchase the payment's identifier already names, when this request is its retry: the
    payment, and its delivery as it stands (None while it is still settling). None for an
    identifier this payer has not used, or whose payment failed.

    The same identifier with another request is a conflict, told only to the wallet that signed
    it: a payment that does not recover to its payer is left to be refused for its signature.
    A retry needs no such check: its signature is byte for byte the one verified the first time."""
    assert payment.identifier is not None
    held = await payment_holding(db, payment.payer, payment.identifier)
    if held is None:
        return None
    if held.request_fingerprint != fingerprint:
        signer = recover_authorizer(payment, offer.token_name, offer.token_version, chain_id, token_address)
        if signer != payment.payer:
            return None
        raise conflict(payment.identifier, held)
    log.info("payment %s: retried with its payment identifier; shown as %s", held.id, held.state)
    if held.state == PaymentState.DELIVERED:
        return held, await delivered_purchase(db, held)
    if held.state in (PaymentState.CREDITED, PaymentState.REVOKED, PaymentState.REFUNDED):
        raise ended(held)
    return held, None


async def payment_holding(db: Database, payer: str, identifier: str) -> Payment | None:
    """The payment (not failed) that holds `identifier` for `payer`, if any."""
    async with db.transaction() as session:
        rows = await session.scalars(
            select(Payment).where(col(Payment.payer) == payer.lower(), col(Payment.payment_identifier) == identifier,
                                  col(Payment.state) != PaymentState.FAILED))
        return rows.first()


def conflict(identifier: str, held: Payment) -> IdentifierConflict:
    return IdentifierConflict(
        f"Payment identifier {identifier!r} already names another request from wallet {held.payer} (payment "
        f"{held.id}): one identifier is one purchase. To retry that purchase, send exactly the same payment and "
        "order again; for a new purchase, use a new identifier.")


def ended(held: Payment) -> Conflict:
    """A retried purchase whose payment ended without seats to show."""
    if held.state == PaymentState.CREDITED:
        return Conflict(f"This purchase (payment {held.id}) could not be delivered ({held.failure_reason}); the "
                        f"amount was credited to account {held.account_id}'s prepaid balance. Sign in with the "
                        "paying wallet (POST /api/agent/auth/challenge) to use it.", code="payment_credited")
    if held.state == PaymentState.REFUNDED:
        return Conflict(f"This purchase (payment {held.id}) was refunded ({held.failure_reason}): "
                        "its subscriptions were canceled, and the amount given back to the account's prepaid "
                        "balance or to the paying wallet.", code="payment_refunded")
    return Conflict(f"This purchase (payment {held.id}) was revoked ({held.failure_reason}): its transfer did not "
                    "stay on-chain, so its subscriptions were canceled.", code="payment_revoked")


async def delivered_purchase(db: Database, held: Payment) -> Delivery:
    """A delivered payment's purchase as it stands now: its account, subscriptions and the keys
    minted for them. Plaintext keys exist only in the first answer."""
    async with db.transaction() as session:
        account = await session.get(Account, held.account_id)
        if account is None:  # a delivered payment names its account, and accounts are never deleted
            raise RuntimeError(f"payment {held.id}: account {held.account_id} is missing")
        if held.renew_subscription_id is not None:
            subscriptions = [sub for sub in [await session.get(Subscription, held.renew_subscription_id)] if sub]
        else:
            subscriptions = list(await session.scalars(
                select(Subscription).where(col(Subscription.payment_id) == held.id).order_by(col(Subscription.id))))
        keys = await session.scalars(
            select(ApiKey).where(col(ApiKey.subscription_id).in_([sub.id for sub in subscriptions]),
                                 col(ApiKey.deleted_at).is_(None)))
        existing = {key.subscription_id: key for key in keys}
    return Delivery(held, account, subscriptions, [], None, existing_keys=existing)
