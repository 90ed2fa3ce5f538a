"""The payment ledger's guarantees under the races a request and the reconciler can run into,
on SQLite and PostgreSQL. (The chain side is attacked end to end in tests/e2e/test_x402*.py.)"""

import secrets
from datetime import timedelta

import pytest

from agent_gateway.catalog.pricing import make_order
from agent_gateway.jobs.expiry import expire_subscriptions
from agent_gateway.payments import ledger
from agent_gateway.payments.ledger import Claim, PaymentAlreadyUsed
from tests.fixtures.state import balance, seats_held

pytestmark = pytest.mark.anyio
PAYER = "0x" + "ab" * 20


def order(gateway, blocks=("europe",)):
    return make_order(gateway.services.catalog, "alpha", list(blocks), 1, "month")


def x402_claim(amount: int) -> Claim:
    return Claim(method="x402-exact", network="eip155:31337", payer=PAYER, amount_atomic=amount,
                 auth_nonce="0x" + secrets.token_hex(32), valid_before=2**40)


async def to_broadcast(gateway, payment) -> None:
    db, clock, catalog = gateway.services.db, gateway.services.clock, gateway.services.catalog
    assert await ledger.advance(db, clock, payment.id, "received", "verified")
    payment.state = "verified"
    await ledger.reserve(db, clock, catalog, payment)
    assert await ledger.advance(db, clock, payment.id, "reserved", "broadcast", tx_hash="0x" + "11" * 32)


async def test_a_stale_reconciler_never_fails_a_payment_a_request_broadcast(gateway):
    db, clock = gateway.services.db, gateway.services.clock
    the_order = order(gateway)
    payment = await ledger.record_received(db, clock, x402_claim(the_order.total_atomic), the_order,
                                           account_id=None, key_name="agent")
    stale = await ledger.get_payment(db, payment.id)  # what a reconciler pass read: still `received`
    await to_broadcast(gateway, payment)
    # The reconciler acts on its stale copy ("never sent"): the payment must stay broadcast,
    # its seats held, since the settlement may be mined any moment.
    assert stale.state in ledger.UNSENT_STATES
    assert not await ledger.fail(db, clock, stale.id, "abandoned_before_settlement", only_from=ledger.UNSENT_STATES)
    current = await ledger.get_payment(db, payment.id)
    assert current.state == "broadcast" and current.seats_held
    assert await seats_held(db, "alpha", "europe") == 1
    # Once confirmed, it is delivered exactly once.
    assert await ledger.advance(db, clock, payment.id, "broadcast", "confirmed")
    assert await ledger.deliver(db, clock, payment.id, mint_keys=True) is not None
    assert await ledger.deliver(db, clock, payment.id, mint_keys=True) is None


async def test_a_renewal_settled_after_its_subscription_expired_is_credited_not_lost(gateway, clock):
    db = gateway.services.db
    account, mk = await gateway.new_account(credit="49.00")
    sub = (await gateway.buy(mk, blocks=["europe"]))[0]
    assert await balance(db, account) == 0
    the_order = order(gateway)
    renewal = await ledger.record_received(db, clock, x402_claim(the_order.total_atomic), the_order,
                                           account_id=account, key_name="renewal", renew_subscription_id=sub["id"])
    await to_broadcast(gateway, renewal)
    # The subscription runs out while the renewal's settlement waits for its receipt.
    clock.advance(timedelta(days=30, seconds=1))
    assert (await expire_subscriptions(db, clock)).subscription_ids == [sub["id"]]
    assert await ledger.advance(db, clock, renewal.id, "broadcast", "confirmed")

    assert await ledger.deliver(db, clock, renewal.id, mint_keys=False) is None
    done = await ledger.get_payment(db, renewal.id)
    assert done.state == "credited" and done.failure_reason == "subscription_expired_before_renewal"
    assert await balance(db, account) == the_order.total_atomic
    # Not credited twice, and the subscription stays expired with its seat back in the pool.
    assert await ledger.deliver(db, clock, renewal.id, mint_keys=False) is None
    assert await balance(db, account) == the_order.total_atomic
    assert await seats_held(db, "alpha", "europe") == 0


async def test_a_credited_tx_hash_stays_claimed(gateway):
    db, clock = gateway.services.db, gateway.services.clock
    the_order = order(gateway)
    tx_hash = "0x" + secrets.token_hex(32)
    claim = Claim(method="tx-hash", network="eip155:31337", payer=PAYER, amount_atomic=the_order.total_atomic,
                  tx_hash=tx_hash)
    payment = await ledger.record_received(db, clock, claim, the_order, account_id=None, key_name="agent",
                                           state="verified")
    account = await ledger.credit_instead(db, clock, payment.id, "sold_out_after_payment", only_from=("verified",))
    assert account is not None and await balance(db, account.id) == the_order.total_atomic
    # Crediting again is refused by the state, and claiming the hash again by the database.
    assert await ledger.credit_instead(db, clock, payment.id, "sold_out_after_payment", only_from=("verified",)) is None
    with pytest.raises(PaymentAlreadyUsed):
        await ledger.record_received(db, clock, claim, the_order, account_id=None, key_name="agent", state="verified")
    assert await balance(db, account.id) == the_order.total_atomic


async def test_credits_landing_at_once_all_count(gateway):
    # Refunds of unsellable payments and operator credits hit one account together: none is lost.
    import asyncio

    from agent_gateway.accounts.service import credit_account

    db, clock = gateway.services.db, gateway.services.clock
    account, _ = await gateway.new_account()
    the_order = order(gateway)
    payments = []
    for _ in range(5):
        claim = Claim(method="tx-hash", network="eip155:31337", payer=PAYER, amount_atomic=the_order.total_atomic,
                      tx_hash="0x" + secrets.token_hex(32))
        payments.append(await ledger.record_received(db, clock, claim, the_order, account_id=account,
                                                     key_name="agent", state="verified"))
    await asyncio.gather(
        *(ledger.credit_instead(db, clock, p.id, "sold_out_after_payment", only_from=("verified",)) for p in payments),
        *(credit_account(db, clock, account, 1_000_000) for _ in range(10)),
    )
    assert await balance(db, account) == 5 * the_order.total_atomic + 10 * 1_000_000


async def test_a_revoked_purchase_loses_its_seats_keys_and_credit_in_one_step_and_only_once(gateway):
    db, clock = gateway.services.db, gateway.services.clock
    the_order = order(gateway)
    claim = Claim(method="tx-hash", network="eip155:31337", payer=PAYER, amount_atomic=the_order.total_atomic + 7,
                  tx_hash="0x" + secrets.token_hex(32), block_number=5, sender_nonce=0, credit_atomic=7)
    payment = await ledger.record_received(db, clock, claim, the_order, account_id=None, key_name="agent",
                                           state="verified")
    await ledger.reserve(db, clock, gateway.services.catalog, payment)
    assert await ledger.advance(db, clock, payment.id, "reserved", "confirmed")
    delivery = await ledger.deliver(db, clock, payment.id, mint_keys=True)
    assert await balance(db, delivery.account.id) == 7 and await seats_held(db, "alpha", "europe") == 1
    assert [p.id for p in await ledger.settled_payments_to_recheck(db, clock, 500)] == [payment.id]

    revocation = await ledger.revoke(db, clock, payment.id, "transfer_vanished")

    assert revocation.key_ids == [delivery.keys[0][0].id] and revocation.taken_back_atomic == 7
    assert await balance(db, delivery.account.id) == 0 and await seats_held(db, "alpha", "europe") == 0
    done = await ledger.get_payment(db, payment.id)
    assert done.state == "revoked" and done.failure_reason == "transfer_vanished"
    assert await ledger.revoke(db, clock, payment.id, "transfer_vanished") is None
    assert await ledger.settled_payments_to_recheck(db, clock, 500) == []
    assert await balance(db, delivery.account.id) == 0 and await seats_held(db, "alpha", "europe") == 0
    # The hash stays claimed: the same transaction cannot buy the seats again.
    with pytest.raises(PaymentAlreadyUsed):
        await ledger.record_received(db, clock, claim, the_order, account_id=None, key_name="agent", state="verified")


async def test_a_revoked_renewal_takes_back_the_period_it_added(gateway, clock):
    db = gateway.services.db
    account, mk = await gateway.new_account(credit="49.00")
    sub = (await gateway.buy(mk, blocks=["europe"]))[0]
    the_order = order(gateway)
    renewal = await ledger.record_received(db, clock, x402_claim(the_order.total_atomic), the_order,
                                           account_id=account, key_name="renewal", renew_subscription_id=sub["id"])
    await to_broadcast(gateway, renewal)
    assert await ledger.confirm(db, clock, renewal.id, "broadcast", "0x" + "22" * 32, 9)
    assert await ledger.deliver(db, clock, renewal.id, mint_keys=False) is not None
    renewed_end = await period_end(db, sub["id"])

    revocation = await ledger.revoke(db, clock, renewal.id, "authorization_canceled")

    # The seat itself was paid by the first purchase: it stays, one billing cycle shorter.
    assert revocation.subscription_ids == [] and revocation.key_ids == []
    assert renewed_end - await period_end(db, sub["id"]) == timedelta(days=30)


async def period_end(db, subscription_id: str):
    from agent_gateway.clock import as_utc
    from agent_gateway.db.models import Subscription

    async with db.transaction() as session:
        return as_utc((await session.get(Subscription, subscription_id)).period_end)


async def test_one_transaction_carries_several_x402_payments_but_is_claimed_by_tx_hash_once(gateway):
    # A bundler executed two buyers' authorizations in one transaction: each is its own payment.
    db, clock = gateway.services.db, gateway.services.clock
    the_order = order(gateway)
    carrier = "0x" + secrets.token_hex(32)
    delivered = []
    for _ in range(2):
        payment = await ledger.record_received(db, clock, x402_claim(the_order.total_atomic), the_order,
                                               account_id=None, key_name="agent")
        await to_broadcast_with(gateway, payment, "0x" + secrets.token_hex(32))
        assert await ledger.confirm(db, clock, payment.id, "broadcast", carrier, 7)
        delivered.append(await ledger.deliver(db, clock, payment.id, mint_keys=False))
    assert all(d is not None and d.payment.tx_hash == carrier for d in delivered)
    assert await seats_held(db, "alpha", "europe") == 2  # two seats sold, one for each
    # A tx-hash claim holds its transaction alone: a second claim of it is refused by the database.
    claim = Claim(method="tx-hash", network="eip155:31337", payer="0x" + "cd" * 20,
                  amount_atomic=the_order.total_atomic, tx_hash=carrier)
    await ledger.record_received(db, clock, claim, the_order, account_id=None, key_name="agent", state="verified")
    with pytest.raises(PaymentAlreadyUsed):
        await ledger.record_received(db, clock, claim, the_order, account_id=None, key_name="agent", state="verified")


async def to_broadcast_with(gateway, payment, tx_hash: str) -> None:
    db, clock, catalog = gateway.services.db, gateway.services.clock, gateway.services.catalog
    assert await ledger.advance(db, clock, payment.id, "received", "verified")
    payment.state = "verified"
    await ledger.reserve(db, clock, catalog, payment)
    assert await ledger.advance(db, clock, payment.id, "reserved", "broadcast", tx_hash=tx_hash)


async def test_the_reorg_recheck_takes_the_payments_checked_longest_ago_first(gateway, clock):
    db = gateway.services.db
    ids = []
    for block in range(5):  # alpha has 3 seats a block
        the_order = order(gateway, blocks=(("asia", "europe", "americas")[block % 3],))
        payment = await ledger.record_received(db, clock, x402_claim(the_order.total_atomic), the_order,
                                               account_id=None, key_name="agent")
        await to_broadcast_with(gateway, payment, "0x" + secrets.token_hex(32))
        assert await ledger.confirm(db, clock, payment.id, "broadcast", "0x" + secrets.token_hex(32), block)
        assert await ledger.deliver(db, clock, payment.id, mint_keys=False) is not None
        ids.append(payment.id)
        clock.advance(timedelta(seconds=1))
    taken = []
    for _ in range(3):
        taken.append([p.id for p in await ledger.settled_payments_to_recheck(db, clock, 2)])
        clock.advance(timedelta(seconds=1))
    # Every payment gets its turn, oldest first among those never checked, then round again.
    assert taken == [ids[0:2], ids[2:4], [ids[4], ids[0]]]
