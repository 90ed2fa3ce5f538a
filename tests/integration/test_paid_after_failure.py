"""The ledger side of a failed x402 payment paid afterwards (failed -> credited), on SQLite and
PostgreSQL: credited once, even when two passes race; never when a retry holds the same
authorization (that one owns the transfer); without its payment identifier when another request
has taken it since; and the reorg re-checks follow the credited payment. The chain side is in
tests/e2e/test_late_payments.py."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from agent_gateway.catalog.pricing import make_order
from agent_gateway.payments import ledger
from agent_gateway.payments.ledger import Claim
from tests.fixtures.state import balance, seats_held

pytestmark = pytest.mark.anyio
PAYER = "0x" + "cd" * 20
CARRIER = "0x" + "77" * 32
VALID_BEFORE = 2_000_000_000


def claim(amount: int, nonce: str, identifier: str | None = None) -> Claim:
    return Claim(method="x402-exact", network="eip155:31337", payer=PAYER, amount_atomic=amount, auth_nonce=nonce,
                 valid_before=VALID_BEFORE, identifier=identifier, fingerprint="f" * 64 if identifier else None)


async def failed_payment(gateway, nonce: str, identifier: str | None = None,  # type: ignore[no-untyped-def]
                         reason: str = "settlement_refused"):
    db, clock = gateway.services.db, gateway.services.clock
    the_order = make_order(gateway.services.catalog, "alpha", ["europe"], 1, "month")
    payment = await ledger.record_received(db, clock, claim(the_order.total_atomic, nonce, identifier), the_order,
                                           account_id=None, key_name="agent")
    assert await ledger.fail(db, clock, payment.id, reason, only_from=ledger.UNSENT_STATES)
    return payment


async def wallet_balance(gateway) -> int | None:  # type: ignore[no-untyped-def]
    from sqlmodel import col, select

    from agent_gateway.db.models import Account

    async with gateway.services.db.read() as session:
        account = (await session.scalars(select(Account).where(col(Account.wallet_address) == PAYER))).first()
    return None if account is None else await balance(gateway.services.db, account.id)


async def watched(gateway, limit: int = 100) -> list[str]:  # type: ignore[no-untyped-def]
    services = gateway.services
    rows = await ledger.failed_payments_to_watch(services.db, services.clock, VALID_BEFORE - 60,
                                                 failed_since=services.clock.now().replace(year=2000), grace_s=3600,
                                                 limit=limit)
    return [p.id for p in rows]


async def test_a_failed_payment_paid_afterwards_is_credited_once_and_rechecked_for_reorgs(gateway):
    db, clock = gateway.services.db, gateway.services.clock
    payment = await failed_payment(gateway, "0x" + secrets.token_hex(32))
    assert await watched(gateway) == [payment.id]
    # Two passes (two processes, or a pass and a slow one) credit it at the same moment: once.
    results = await asyncio.gather(*(ledger.credit_paid_after_failure(db, clock, payment.id, CARRIER, 120)
                                     for _ in range(4)))
    assert sum(r is not None for r in results) == 1
    assert await wallet_balance(gateway) == payment.amount_atomic
    done = await ledger.get_payment(db, payment.id)
    assert (done.state, done.failure_reason, done.tx_hash, done.block_number) == ("credited", "paid_after_failure",
                                                                                CARRIER, 120)
    assert await seats_held(db, "alpha", "europe") == 0  # the seats went back when it failed; they stay back
    assert await watched(gateway) == []
    # Credited is settled money: the reorg re-check follows it until it is past the horizon.
    assert [p.id for p in await ledger.settled_payments_to_recheck(db, clock, 10)] == [payment.id]
    # And a reorg that takes the transfer away takes the credit back.
    assert await ledger.revoke(db, clock, payment.id, "transfer_reorganised_away") is not None
    assert await wallet_balance(gateway) == 0


async def test_a_retry_holding_the_same_authorization_owns_the_transfer(gateway):
    db, clock = gateway.services.db, gateway.services.clock
    nonce = "0x" + secrets.token_hex(32)
    first = await failed_payment(gateway, nonce)
    the_order = make_order(gateway.services.catalog, "alpha", ["europe"], 1, "month")
    retry = await ledger.record_received(db, clock, claim(the_order.total_atomic, nonce), the_order,
                                         account_id=None, key_name="agent")
    assert await ledger.credit_paid_after_failure(db, clock, first.id, CARRIER, 120) is None
    assert (await ledger.get_payment(db, first.id)).state == "failed"
    assert (await ledger.get_payment(db, retry.id)).state == "received"
    assert await wallet_balance(gateway) is None  # nothing credited: the retry delivers the seats


async def test_two_failed_payments_of_one_authorization_credit_it_once(gateway):
    db, clock = gateway.services.db, gateway.services.clock
    nonce = "0x" + secrets.token_hex(32)
    first, second = await failed_payment(gateway, nonce), await failed_payment(gateway, nonce)
    assert sorted(await watched(gateway)) == sorted([first.id, second.id])
    assert await ledger.credit_paid_after_failure(db, clock, first.id, CARRIER, 120) is not None
    assert await ledger.credit_paid_after_failure(db, clock, second.id, CARRIER, 120) is None
    assert await wallet_balance(gateway) == first.amount_atomic


async def test_an_identifier_taken_by_a_later_request_stays_with_it(gateway):
    db, clock = gateway.services.db, gateway.services.clock
    failed = await failed_payment(gateway, "0x" + secrets.token_hex(32), identifier="order-42")
    the_order = make_order(gateway.services.catalog, "alpha", ["europe"], 1, "month")
    # The buyer tried again under the same identifier with a new authorization, which is in flight.
    later = await ledger.record_received(db, clock, claim(the_order.total_atomic, "0x" + secrets.token_hex(32),
                                                          "order-42"), the_order, account_id=None, key_name="agent")
    assert await ledger.credit_paid_after_failure(db, clock, failed.id, CARRIER, 120) is not None
    done = await ledger.get_payment(db, failed.id)
    assert done.state == "credited" and done.payment_identifier is None
    assert (await ledger.get_payment(db, later.id)).payment_identifier == "order-42"
    assert await wallet_balance(gateway) == failed.amount_atomic


async def test_spent_or_expired_authorizations_are_not_watched(gateway):
    db, clock = gateway.services.db, gateway.services.clock
    the_order = make_order(gateway.services.catalog, "alpha", ["europe"], 1, "month")
    canceled = await ledger.record_received(db, clock, claim(the_order.total_atomic, "0x" + secrets.token_hex(32)),
                                            the_order, account_id=None, key_name="agent")
    assert await ledger.fail(db, clock, canceled.id, "authorization_canceled", only_from=ledger.UNSENT_STATES)
    live = await failed_payment(gateway, "0x" + secrets.token_hex(32))
    assert await watched(gateway) == [live.id]
    # An hour past validBefore (chain time) the watch ends.
    past = await ledger.failed_payments_to_watch(db, clock, VALID_BEFORE + 3600, failed_since=clock.now().replace(
        year=2000), grace_s=3600, limit=100)
    assert past == []


async def test_a_flood_of_free_failures_cannot_crowd_out_a_handed_off_one(gateway):
    """Anyone can make failed rows for free (authorizations from an empty wallet); a payment that
    failed after its authorization was handed off (to a facilitator, or into the mempool) is still
    looked at in every pass, however many of those there are."""
    handed_off = await failed_payment(gateway, "0x" + secrets.token_hex(32))
    assert await watched(gateway, limit=1) == [handed_off.id]  # checked once already
    flood = [await failed_payment(gateway, "0x" + secrets.token_hex(32), reason="insufficient_balance")
             for _ in range(3)]
    for _ in range(3):
        assert await watched(gateway, limit=1) == [handed_off.id]
    # The free ones take their turns in the room left over.
    assert sorted((await watched(gateway, limit=4))[1:]) == sorted(p.id for p in flood)
