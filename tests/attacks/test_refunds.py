"""Attacks on the refund surface of the admin API: never without the admin token (an mk_ or sk_
key is no admin token), hostile payment ids and bodies refused with a 4xx (never a 5xx) and nothing
changed, and a burst of refunds of one payment refunds it exactly once (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from agent_gateway.clock import FixedClock
from agent_gateway.db.models import Payment, PaymentState, new_id
from agent_gateway.errors import Conflict
from agent_gateway.payments import ledger
from agent_gateway.settings import Settings
from agent_gateway.subscriptions.service import new_subscriptions
from tests.attacks.test_admin_console import ADMIN_TOKEN, _console
from tests.conftest import Gateway, auth
from tests.fixtures.state import snapshot

pytestmark = pytest.mark.anyio
ADMIN = {**auth(ADMIN_TOKEN), "X-Admin-Actor": "alice"}
PAYER = "0x" + "ab" * 20


@pytest.fixture
async def console(settings: Settings, clock: FixedClock) -> AsyncIterator[Gateway]:
    async for gateway in _console(settings, clock, ADMIN_TOKEN):
        yield gateway


async def delivered_payment(gateway: Gateway, account_id: str, *, state: PaymentState = PaymentState.DELIVERED,
                            final: bool = True) -> tuple[str, str]:
    """A settled x402 payment of 10.00 USDC for one alpha seat, as the ledger leaves it; (payment id,
    subscription id). Written straight to the ledger: these attacks are on the admin API, not the chain."""
    now = gateway.services.clock.now()
    payment = Payment(id=new_id("pay"), method="x402-exact", network="eip155:31337", payer=PAYER,
                      amount_atomic=10_000_000, auth_nonce="0x" + new_id("n").encode().hex().ljust(64, "0")[:64],
                      tx_hash="0x" + "cd" * 32, state=state, account_id=account_id, pool_slug="alpha",
                      blocks=["europe"], quantity=1, billing_cycle="month", unit_price_atomic=10_000_000,
                      block_number=7, chain_final=final, created_at=now, updated_at=now)
    async with gateway.services.db.transaction() as session:
        session.add(payment)
        [sub] = new_subscriptions(account_id, "alpha", ["europe"], "month", 10_000_000, 1, now, payment_id=payment.id)
        if state == PaymentState.DELIVERED:
            session.add(sub)
    return payment.id, sub.id


async def test_refunds_are_never_reachable_without_the_admin_token(console):
    account_id, mk = await console.new_account(credit="100")
    payment_id, sub_id = await delivered_payment(console, account_id)
    sk = (await console.mint(mk, sub_id))["apiKey"]
    before = await snapshot(console.services.db)
    for header in (None, f"Bearer {mk}", f"Bearer {sk}", f"Bearer {ADMIN_TOKEN[:-1]}", f"Basic {ADMIN_TOKEN}"):
        headers = {"X-Admin-Actor": "mallory"} | ({"Authorization": header} if header else {})
        for method, path in (("POST", f"/api/admin/payments/{payment_id}/refund"), ("GET", "/api/admin/refunds"),
                             ("GET", "/api/admin/refunds/wallet"), ("GET", "/api/admin/refunds/rfd_x")):
            r = await console.client.request(method, path, headers=headers, json={"to": "balance"}
                                             if method == "POST" else None)
            assert r.status_code == 401, (method, path, header, r.text)
    # A customer's own management key cannot refund its own payment either.
    r = await console.client.post(f"/api/admin/payments/{payment_id}/refund", headers=auth(mk), json={})
    assert r.status_code == 401
    assert await snapshot(console.services.db) == before


@pytest.mark.parametrize(("path", "body", "status", "code"), [
    ("/api/admin/payments/PAY/refund", b'{"to": "moon"}', 400, "invalid_refund_destination"),
    ("/api/admin/payments/PAY/refund", b'{"to": 1}', 400, "invalid_field"),
    ("/api/admin/payments/PAY/refund", b'{"to": "balance", "amount": "999"}', 400, "invalid_field"),
    ("/api/admin/payments/PAY/refund", b'{"to": "balance", "to": "chain"}', 400, "duplicate_key"),
    ("/api/admin/payments/PAY/refund", b'{"reason": "a\\nb"}', 400, "invalid_reason"),
    ("/api/admin/payments/PAY/refund", b'{"reason": "' + b"r" * 600 + b'"}', 400, "invalid_field"),
    ("/api/admin/payments/PAY/refund", b'not json', 400, None),
    ("/api/admin/payments/PAY/refund", b'[' * 300 + b']' * 300, 400, "json_too_deep"),
    ("/api/admin/payments/PAY/refund", b'{"to": "chain"}', 409, "chain_refunds_off"),
    ("/api/admin/payments/pay_nope/refund", b'{}', 404, "payment_not_found"),
    ("/api/admin/payments/%00%27%3B--/refund", b'{}', 400, "invalid_path"),
    ("/api/admin/payments/%27%3B--/refund", b'{}', 404, "payment_not_found"),
    ("/api/admin/payments/" + "p" * 5000 + "/refund", b'{}', 404, "payment_not_found"),
    ("/api/admin/payments/%E2%80%AEpay/refund", b'{}', 404, "payment_not_found"),
])
async def test_hostile_refund_requests_are_refused_and_change_nothing(console, path, body, status, code):
    account_id, _ = await console.new_account(credit="10")
    payment_id, _ = await delivered_payment(console, account_id)
    before = await snapshot(console.services.db)
    r = await console.client.post(path.replace("PAY", payment_id), content=body,
                                  headers={**ADMIN, "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    if code is not None:
        assert r.json()["error"]["code"] == code
    assert await snapshot(console.services.db) == before


@pytest.mark.parametrize("query", ["?state=bogus", "?limit=0", "?limit=-1", "?limit=1e9", "?limit=501",
                                   "?payment=%00", "?pool=" + "x" * 3000, "?state=refunded&limit=abc"])
async def test_hostile_refund_listings_are_4xx_or_empty(console, query):
    r = await console.client.get("/api/admin/refunds" + query, headers=auth(ADMIN_TOKEN))
    assert r.status_code in (200, 400), r.text
    if r.status_code == 200:
        assert r.json()["data"] == []
    for bogus in ("rfd_nope", "%27%22", "x" * 3000):
        r = await console.client.get(f"/api/admin/refunds/{bogus}", headers=auth(ADMIN_TOKEN))
        assert r.status_code == 404 and r.json()["error"]["code"] == "refund_not_found"


@pytest.mark.parametrize(("state", "final", "to", "code"), [
    (PaymentState.FAILED, True, "balance", "payment_not_refundable"),
    (PaymentState.REVOKED, True, "balance", "payment_not_refundable"),
    (PaymentState.BROADCAST, False, "balance", "payment_not_refundable"),
    (PaymentState.CREDITED, True, "balance", "payment_already_credited"),
])
async def test_payments_in_no_refundable_state_are_refused(console, state, final, to, code):
    account_id, _ = await console.new_account(credit="10")
    payment_id, _ = await delivered_payment(console, account_id, state=state, final=final)
    before = await snapshot(console.services.db)
    r = await console.client.post(f"/api/admin/payments/{payment_id}/refund", json={"to": to}, headers=ADMIN)
    assert r.status_code == 409 and r.json()["error"]["code"] == code, r.text
    assert await snapshot(console.services.db) == before


async def test_a_burst_of_refunds_of_one_payment_refunds_it_once(console):
    account_id, mk = await console.new_account()
    payment_id, sub_id = await delivered_payment(console, account_id)
    key_id = (await console.mint(mk, sub_id))["id"]
    answers = await asyncio.gather(*[
        console.client.post(f"/api/admin/payments/{payment_id}/refund", json={"reason": f"try {i}"}, headers=ADMIN)
        for i in range(8)])
    assert sorted(r.status_code for r in answers) == [200] + [409] * 7, [r.text for r in answers]
    assert {r.json()["error"]["code"] for r in answers if r.status_code == 409} == {"already_refunded"}
    [done] = [r.json()["data"] for r in answers if r.status_code == 200]
    assert done["state"] == "refunded" and done["keysRevoked"] == [key_id]
    r = await console.client.get(f"/api/admin/accounts/{account_id}", headers=ADMIN)
    account = r.json()["data"]
    assert account["balance"] == "10.00"
    assert [(e["kind"], e["delta"]) for e in account["balanceEntries"]] == [("refund", "10.00")]
    assert [s["status"] for s in account["subscriptions"]] == ["canceled"]
    assert [k["status"] for k in account["keys"]] == ["revoked"]
    r = await console.client.get(f"/api/admin/audit?target=payment:{payment_id}", headers=ADMIN)
    assert [a["action"] for a in r.json()["data"]] == ["payment.refund"]


async def test_a_credited_payment_whose_credit_was_spent_is_never_refunded(console):
    """A credited payment left its amount on the balance; once the account spent it on seats, a
    refund to the wallet would pay twice for them: refused up front and again in the signing
    transaction (the ledger's guard), with nothing changed."""
    account_id, _ = await console.new_account(credit="4")  # 10.00 credited, 6.00 of it spent since
    payment_id, _ = await delivered_payment(console, account_id, state=PaymentState.CREDITED)
    before = await snapshot(console.services.db)
    r = await console.client.post(f"/api/admin/payments/{payment_id}/refund", json={"to": "chain"}, headers=ADMIN)
    assert r.status_code == 409 and r.json()["error"]["code"] == "credit_spent", r.text
    assert "4.00 USDC" in r.json()["error"]["message"]
    now = console.services.clock.now()
    with pytest.raises(Conflict) as refused:
        async with console.services.db.transaction() as session:
            await ledger.refund(session, payment_id, now, "operator", take_back_credit_atomic=10_000_000)
    assert refused.value.code == "credit_spent"
    assert await snapshot(console.services.db) == before
    # With the credit still there, the only objection left is that on-chain refunds are off here.
    other_id, _ = await console.new_account(credit="10")
    other_payment, _ = await delivered_payment(console, other_id, state=PaymentState.CREDITED)
    r = await console.client.post(f"/api/admin/payments/{other_payment}/refund", json={"to": "chain"}, headers=ADMIN)
    assert r.status_code == 409 and r.json()["error"]["code"] == "chain_refunds_off", r.text
