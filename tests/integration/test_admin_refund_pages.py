"""The refund pages of the operator's console, in process: a payment delivered through the ledger is
refunded from its page (asked, confirmed, CSRF-checked, once), and without a refund key the pages
say on-chain refunds are off. (On the chain, in a browser: tests/e2e/test_admin_browser.py.)"""

from __future__ import annotations

import re
import secrets

import pytest

from agent_gateway.catalog.pricing import make_order
from agent_gateway.payments import ledger
from agent_gateway.payments.ledger import Claim
from tests.fixtures.state import snapshot
from tests.integration.test_admin_dashboard import ORIGIN, console, csrf, sign_in  # noqa: F401  (fixture)

pytestmark = pytest.mark.anyio
PAYER = "0x" + "cd" * 20


async def delivered_payment(gateway) -> tuple[str, str]:
    """An x402 payment taken through the ledger to delivered and past the reorg horizon, as the
    request path and the reorg pass leave one: (payment id, the key's id)."""
    db, clock, catalog = gateway.services.db, gateway.services.clock, gateway.services.catalog
    order = make_order(catalog, "alpha", ["europe"], 1, "month")
    claim = Claim(method="x402-exact", network="eip155:31337", payer=PAYER, amount_atomic=order.total_atomic,
                  auth_nonce="0x" + secrets.token_hex(32), valid_before=2**40)
    payment = await ledger.record_received(db, clock, claim, order, account_id=None, key_name="agent")
    assert await ledger.advance(db, clock, payment.id, "received", "verified")
    payment.state = "verified"
    await ledger.reserve(db, clock, catalog, payment)
    tx_hash = "0x" + secrets.token_hex(32)
    assert await ledger.advance(db, clock, payment.id, "reserved", "broadcast", tx_hash=tx_hash)
    assert await ledger.confirm(db, clock, payment.id, "broadcast", tx_hash, 7)
    delivery = await ledger.deliver(db, clock, payment.id, mint_keys=True)
    assert delivery is not None
    await ledger.mark_chain_final(db, payment.id)
    return payment.id, delivery.keys[0][0].id


async def confirm_page(client, payment_id: str, **params: str):
    return await client.get(f"/dashboard/admin/payments/{payment_id}/refund", params=params)


async def test_a_payment_is_refunded_from_its_page_once_after_a_confirmation(console):  # noqa: F811
    payment_id, key_id = await delivered_payment(console)
    assert (await sign_in(console.client)).status_code == 303
    page = await console.client.get(f"/dashboard/admin/payments/{payment_id}")
    assert page.status_code == 200 and 'id="refund-form"' in page.text
    assert 'value="chain"' not in page.text and "On-chain refunds are not configured" in page.text

    # No reason: back to the payment, saying so; nothing is asked or done.
    r = await confirm_page(console.client, payment_id, to="balance", reason="  ")
    assert r.status_code == 303 and r.headers["location"] == f"/dashboard/admin/payments/{payment_id}"
    assert "Give a reason" in (await console.client.get(r.headers["location"])).text
    # The confirmation says what goes back where, and carries the choice to the POST.
    r = await confirm_page(console.client, payment_id, to="balance", reason="asked <b>nicely</b>")
    assert r.status_code == 200 and 'id="confirm-submit"' in r.text
    assert "to account" in r.text and "prepaid balance" in r.text and "&lt;b&gt;nicely" in r.text
    hidden = dict(re.findall(r'<input type="hidden" name="(to|reason)" value="([^"]*)">', r.text))
    assert hidden == {"to": "balance", "reason": "asked &lt;b&gt;nicely&lt;/b&gt;"}
    token = csrf(r.text)

    before = await snapshot(console.services.db)
    path = f"/dashboard/admin/payments/{payment_id}/refund"
    for data, headers in (({"to": "balance", "reason": "x"}, ORIGIN),
                          ({"to": "balance", "reason": "x", "csrf_token": token}, {"origin": "http://evil.example"})):
        assert (await console.client.post(path, data=data, headers=headers)).status_code == 403
    assert await snapshot(console.services.db) == before

    r = await console.client.post(path, headers=ORIGIN,
                                  data={"to": "balance", "reason": "asked <b>nicely</b>", "csrf_token": token})
    assert r.status_code == 303
    page = (await console.client.get(r.headers["location"])).text
    assert "to the balance, refunded; 1 key(s) revoked" in page
    assert 'id="refund-form"' not in page and "&lt;b&gt;nicely" in page and "<b>nicely" not in page
    after = await snapshot(console.services.db)
    assert after["keys"][key_id] != "active" and list(after["subscriptions"].values()) == ["canceled"]

    # Twice: refused, saying why, nothing more credited.
    r = await console.client.post(path, headers=ORIGIN, data={"to": "balance", "reason": "again", "csrf_token": token})
    assert r.status_code == 303
    assert "already refunded" in (await console.client.get(r.headers["location"])).text
    assert (await snapshot(console.services.db))["balances"] == after["balances"]
    audit = (await console.client.get("/dashboard/admin/audit")).text
    assert audit.count("payment.refund") == 1 and f"payment:{payment_id}" in audit


async def test_without_a_refund_key_chain_refunds_are_refused_and_the_money_page_says_so(console):  # noqa: F811
    payment_id, _ = await delivered_payment(console)
    assert (await sign_in(console.client)).status_code == 303
    money = await console.client.get("/dashboard/admin/money")
    assert 'id="refund-wallet-off"' in money.text and "On-chain refunds are not configured" in money.text
    before = await snapshot(console.services.db)
    page = await console.client.get(f"/dashboard/admin/payments/{payment_id}")
    for to in ("chain", "moon"):
        r = await console.client.post(f"/dashboard/admin/payments/{payment_id}/refund", headers=ORIGIN,
                                      data={"to": to, "reason": "x", "csrf_token": csrf(page.text)})
        assert r.status_code == 303
        said = (await console.client.get(r.headers["location"])).text
        assert "flash-error" in said and ("AGW_REFUND_PRIVATE_KEY" in said or "balance or chain" in said), to
    assert await snapshot(console.services.db) == before
    for path in ("/dashboard/admin/payments/pay_nope", "/dashboard/admin/payments/pay_nope/refund?reason=x"):
        assert (await console.client.get(path)).status_code == 404
