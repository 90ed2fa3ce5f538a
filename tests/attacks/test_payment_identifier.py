"""Attacks on the x402 `payment-identifier` extension (an idempotency key in the payment payload):
a retry under the key is shown the same purchase and never charged or delivered again, never with
its plaintext keys; the key with another payment is refused; another wallet's key is its own; a
malformed key is refused before anything is written; racing copies settle once. Over HTTP and MCP,
on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import httpx
import pytest
from eth_account import Account
from sqlalchemy import func, select
from x402.extensions.payment_identifier import append_payment_identifier_to_extensions, generate_payment_id
from x402.http.clients import x402_httpx_transport

from agent_gateway.db.models import Payment
from tests.fixtures.live import LiveGateway, live_gateway
from tests.fixtures.mcp import mcp_session
from tests.fixtures.x402 import X402_POOLS, ChainView, Wallet, chain_settings, sign_authorization

pytestmark = pytest.mark.anyio
PRICE = 10_000_000  # pool alpha of X402_POOLS
ORDER = {"pool": "alpha", "blocks": ["day"], "quantity": 1}
URL = "/api/agent/subscribe-pool"


@pytest.fixture
def paid_gateway(tmp_path, database_url, upstream, devchain):  # type: ignore[no-untyped-def]
    # Refused attempts here are the point; the per-address limit on them is tested elsewhere.
    with live_gateway(tmp_path, database_url, upstream, pools=X402_POOLS, unauth_writes_per_minute=10_000,
                      **chain_settings(devchain)) as live:
        yield live


class Buyer:
    """Hand-made x402 payments for ORDER (or another order) from one wallet, with or without an identifier."""

    def __init__(self, live: LiveGateway, devchain, wallet: Wallet, *, path: str = URL,  # type: ignore[no-untyped-def]
                 body: dict = ORDER, headers: dict[str, str] | None = None) -> None:
        self.live, self.chain, self.wallet = live, devchain, wallet
        self.path, self.body, self.headers = path, body, headers or {}
        self.required = self._challenge(body)

    def _challenge(self, order: dict) -> dict:
        with httpx.Client(base_url=self.live.url) as http:
            r = http.post(self.path, json=order, headers=self.headers)
        assert r.status_code == 402, r.text
        return json.loads(base64.b64decode(r.headers["PAYMENT-REQUIRED"]))

    def payment(self, identifier: Any = None, *, order: dict | None = None, signer_key: str | None = None,
                payer: str | None = None) -> dict:
        required = self.required if order is None else self._challenge(order)
        accepted = required["accepts"][0]
        authorization, signature = sign_authorization(
            self.chain, signer_key or self.wallet.key, payer=payer or self.wallet.address, to=accepted["payTo"],
            value=int(accepted["amount"]))
        payload: dict[str, Any] = {"x402Version": 2, "accepted": accepted, "resource": required["resource"],
                                   "payload": {"authorization": authorization, "signature": signature}}
        if identifier is not None:
            # As the SDK's client helper does: our declaration, with the id appended to its info.
            payload["extensions"] = append_payment_identifier_to_extensions(
                json.loads(json.dumps(required["extensions"])), identifier)
        return payload

    @staticmethod
    def header(payment: dict) -> str:
        return base64.b64encode(json.dumps(payment).encode()).decode()

    async def post(self, http: httpx.AsyncClient, payment: dict, order: dict | None = None) -> httpx.Response:
        return await http.post(self.live.url + self.path, json=self.body if order is None else order,
                               headers={**self.headers, "PAYMENT-SIGNATURE": self.header(payment)})


def code(response: httpx.Response) -> str:
    return response.json()["error"]["code"]


async def payment_rows(live: LiveGateway) -> int:
    async with live.services.db.transaction() as session:
        return (await session.execute(select(func.count()).select_from(Payment))).scalar_one()


def assert_shown_again(response: httpx.Response, first: dict) -> None:
    """A retry's answer: the first purchase, its subscriptions and key ids, no plaintext key."""
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert data["repeated"] is True and data["paymentId"] == first["paymentId"]
    assert data["accountId"] == first["accountId"] and data["managementKey"] is None
    assert {(s["id"], s["keyId"]) for s in data["subscriptions"]} == {
        (s["id"], s["keyId"]) for s in first["subscriptions"]}
    assert all("apiKey" not in s and s["hasKey"] for s in data["subscriptions"])
    assert "sk_" not in response.text and "mk_" not in response.text
    assert "sign in with the paying wallet" in data["message"]
    receipt = json.loads(base64.b64decode(response.headers["PAYMENT-RESPONSE"]))
    assert receipt["success"] is True and receipt["transaction"] == first["txHash"]


async def test_the_official_client_retrying_under_its_identifier_gets_the_same_purchase_once(
        paid_gateway, devchain, chain_view: ChainView):
    live = paid_gateway
    wallet = chain_view.new_wallet()
    identifier = generate_payment_id()
    client = devchain.x402_client(wallet.key)
    # The SDK's own way to send an id: append it to the server's declaration before paying. Had the
    # challenge not declared the extension, the helper would send none.
    client.on_before_payment_creation(
        lambda context: append_payment_identifier_to_extensions(context.payment_required.extensions, identifier))
    sent: list[str] = []

    class Recording(httpx.AsyncHTTPTransport):
        """Under the SDK's paying transport: sees the paid retry it sends."""

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            if "payment-signature" in request.headers:
                sent.append(request.headers["payment-signature"])
            return await super().handle_async_request(request)

    pay_to_before, relayer_before = chain_view.usdc(devchain.pay_to), chain_view.relayer_nonce()
    async with httpx.AsyncClient(transport=x402_httpx_transport(client, Recording()), base_url=live.url,
                                 timeout=60) as http:
        r = await http.post(URL, json=ORDER)
    assert r.status_code == 201, r.text
    first = r.json()["data"]
    assert first["subscriptions"][0]["apiKey"].startswith("sk_") and first["managementKey"].startswith("mk_")
    assert len(sent) == 1 and json.loads(base64.b64decode(sent[0]))["extensions"]["payment-identifier"]["info"][
        "id"] == identifier
    # The answer was lost; the client sends the very same payment again, twice.
    async with httpx.AsyncClient(timeout=60) as http:
        for _ in range(2):
            again = await http.post(live.url + URL, json=ORDER, headers={"PAYMENT-SIGNATURE": sent[0]})
            assert_shown_again(again, first)
        status = (await http.get(f"{live.url}/api/agent/payments/{first['paymentId']}")).json()["data"]
    assert status["state"] == "delivered"
    assert chain_view.usdc(devchain.pay_to) == pay_to_before + PRICE
    assert chain_view.usdc(wallet.address) == 100 * 10**6 - PRICE
    assert chain_view.relayer_nonce() == relayer_before + 1
    assert await payment_rows(live) == 1


async def test_the_identifier_with_another_payment_or_order_is_refused_naming_it(
        paid_gateway, devchain, chain_view: ChainView):
    live = paid_gateway
    buyer = Buyer(live, devchain, chain_view.new_wallet())
    identifier = generate_payment_id()
    original = buyer.payment(identifier)
    async with httpx.AsyncClient(timeout=60) as http:
        r = await buyer.post(http, original)
        assert r.status_code == 201, r.text
        pay_to_before, relayer_before = chain_view.usdc(devchain.pay_to), chain_view.relayer_nonce()
        # A new authorization under the same id; another order (two seats) under the same id; the
        # same payment for another order body (another key name).
        refused = [
            await buyer.post(http, buyer.payment(identifier)),
            await buyer.post(http, buyer.payment(identifier, order={**ORDER, "quantity": 2}), {**ORDER, "quantity": 2}),
            await buyer.post(http, original, {**ORDER, "name": "someone-else"}),
        ]
        for response in refused:
            assert response.status_code == 409, response.text
            assert code(response) == "payment_identifier_conflict"
            assert identifier in response.json()["error"]["message"]
        # Without the id, or under another, the redeemed authorization stays redeemed.
        original_without_id = {k: v for k, v in original.items() if k != "extensions"}
        under_another_id = {**original_without_id, "extensions": buyer.payment(generate_payment_id())["extensions"]}
        for replay in (original_without_id, under_another_id):
            r = await buyer.post(http, replay)
            assert r.status_code == 402 and code(r) == "payment_already_used", r.text
    assert chain_view.usdc(devchain.pay_to) == pay_to_before and chain_view.relayer_nonce() == relayer_before
    assert await payment_rows(live) == 1


async def test_another_wallet_under_the_same_identifier_gets_its_own_purchase_never_the_first(
        paid_gateway, devchain, chain_view: ChainView):
    live = paid_gateway
    alice, bob = Buyer(live, devchain, chain_view.new_wallet()), Buyer(live, devchain, chain_view.new_wallet())
    identifier = generate_payment_id()
    async with httpx.AsyncClient(timeout=60) as http:
        r = await alice.post(http, alice.payment(identifier))
        assert r.status_code == 201, r.text
        alices = r.json()["data"]
        # Mallory signs with her own key but names Alice as the payer, under Alice's id: her
        # signature is refused, and nothing of Alice's purchase is in the answer.
        mallory = Account.create()
        forged = await alice.post(http, alice.payment(identifier, signer_key=mallory.key.hex()))
        assert forged.status_code == 402 and code(forged) == "invalid_signature", forged.text
        assert alices["paymentId"] not in forged.text and alices["accountId"] not in forged.text
        # Bob's id is his own: the same string buys Bob's own seat.
        r = await bob.post(http, bob.payment(identifier))
        assert r.status_code == 201, r.text
        bobs = r.json()["data"]
    assert bobs["paymentId"] != alices["paymentId"] and bobs["accountId"] != alices["accountId"]
    assert bobs["payer"] == bob.wallet.address.lower() and bobs["subscriptions"][0]["apiKey"].startswith("sk_")
    assert chain_view.usdc(alice.wallet.address) == chain_view.usdc(bob.wallet.address) == 100 * 10**6 - PRICE


async def test_racing_copies_under_one_identifier_settle_exactly_once(paid_gateway, devchain, chain_view: ChainView):
    live = paid_gateway
    buyer = Buyer(live, devchain, chain_view.new_wallet())
    pay_to_before, relayer_before = chain_view.usdc(devchain.pay_to), chain_view.relayer_nonce()
    async with httpx.AsyncClient(timeout=60) as http:
        # Eight copies of one payment under one id at once: one delivery; the others are shown that
        # purchase (still settling, or delivered), never its keys.
        same = buyer.payment(generate_payment_id())
        responses = await asyncio.gather(*(buyer.post(http, same) for _ in range(8)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses.count(201) == 1 and set(statuses) <= {200, 201, 202}, [r.text for r in responses]
        first = next(r for r in responses if r.status_code == 201).json()["data"]
        for r in responses:
            if r.status_code != 201:
                assert r.json()["data"]["repeated"] is True and r.json()["data"]["paymentId"] == first["paymentId"]
                assert "sk_" not in r.text
        # Eight different payments under one id at once: exactly one settles, seven conflicts.
        identifier = generate_payment_id()
        responses = await asyncio.gather(*(buyer.post(http, buyer.payment(identifier)) for _ in range(8)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [201] + [409] * 7, [r.text for r in responses]
        assert {code(r) for r in responses if r.status_code == 409} == {"payment_identifier_conflict"}
    assert chain_view.usdc(devchain.pay_to) == pay_to_before + 2 * PRICE
    assert chain_view.usdc(buyer.wallet.address) == 100 * 10**6 - 2 * PRICE
    assert chain_view.relayer_nonce() == relayer_before + 2


@pytest.mark.parametrize("identifier", ["too-short", "x" * 129, "pay_with spaces_and_more", "pay_ünïcode_1234567",
                                        "pay_7d5d747be160e28\n", 12345678901234567890])
async def test_a_malformed_identifier_is_a_400_before_anything_is_written(paid_gateway, devchain,
                                                                        chain_view: ChainView, identifier):
    live = paid_gateway
    buyer = Buyer(live, devchain, chain_view.new_wallet())
    payment = buyer.payment()
    payment["extensions"] = {"payment-identifier": {"info": {"required": False, "id": identifier}}}
    relayer_before = chain_view.relayer_nonce()
    async with httpx.AsyncClient(timeout=60) as http:
        r = await buyer.post(http, payment)
    assert r.status_code == 400 and code(r) == "invalid_payment_identifier", r.text
    assert "16-128" in r.json()["error"]["message"]
    assert chain_view.usdc(buyer.wallet.address) == 100 * 10**6 and chain_view.relayer_nonce() == relayer_before
    assert await payment_rows(live) == 0


async def test_a_failed_payment_frees_its_identifier(paid_gateway, devchain, chain_view: ChainView):
    """No money moved, so the id is free again, as the authorization is."""
    live = paid_gateway
    buyer = Buyer(live, devchain, chain_view.new_wallet(usdc_atomic=PRICE - 1))
    identifier = generate_payment_id()
    async with httpx.AsyncClient(timeout=60) as http:
        r = await buyer.post(http, buyer.payment(identifier))
        assert r.status_code == 402 and code(r) == "insufficient_balance", r.text
        devchain.fund(buyer.wallet.address, PRICE)
        r = await buyer.post(http, buyer.payment(identifier))
        assert r.status_code == 201, r.text


async def test_an_mcp_retry_is_shown_the_purchase_and_so_is_the_same_payment_over_http(
        paid_gateway, devchain, chain_view: ChainView):
    live = paid_gateway
    buyer = Buyer(live, devchain, chain_view.new_wallet())
    async with mcp_session(live.url) as session:
        unpaid = await session.call_tool("subscribe_pool", ORDER)
        required = unpaid.structuredContent
        assert required["extensions"]["payment-identifier"]["info"] == {"required": False}
        buyer.required = required
        payment = buyer.payment(generate_payment_id())
        first = await session.call_tool("subscribe_pool", ORDER, meta={"x402/payment": payment})
        assert not first.isError, first.content
        again = await session.call_tool("subscribe_pool", ORDER, meta={"x402/payment": payment})
        assert not again.isError, again.content
        bought, shown = first.structuredContent, again.structuredContent
        assert bought["subscriptions"][0]["apiKey"].startswith("sk_")
        assert shown["repeated"] is True and shown["paymentId"] == bought["paymentId"]
        assert [s["id"] for s in shown["subscriptions"]] == [s["id"] for s in bought["subscriptions"]]
        assert "sk_" not in json.dumps(shown) and again.meta["x402/payment-response"]["success"] is True
        other = await session.call_tool("subscribe_pool", ORDER,
                                        meta={"x402/payment": buyer.payment(payment["extensions"]["payment-identifier"]
                                                                            ["info"]["id"])})
        assert other.isError and other.structuredContent["error"]["code"] == "payment_identifier_conflict"
    # One purchase, whichever face the retry comes through.
    async with httpx.AsyncClient(timeout=60) as http:
        r = await buyer.post(http, payment)
    assert r.status_code == 200 and r.json()["data"]["paymentId"] == bought["paymentId"], r.text
    assert chain_view.usdc(buyer.wallet.address) == 100 * 10**6 - PRICE
    assert await payment_rows(live) == 1


async def test_renewals_and_account_purchases_are_shown_again_too(paid_gateway, devchain, chain_view: ChainView):
    """A renewal's retry shows the renewed subscription, extended once; a purchase through the
    management endpoint tells the account to mint keys with its management key."""
    live = paid_gateway
    wallet = chain_view.new_wallet()
    async with httpx.AsyncClient(timeout=60) as http:
        r = await Buyer(live, devchain, wallet).post(http, Buyer(live, devchain, wallet).payment())
        assert r.status_code == 201, r.text
        subscription = r.json()["data"]["subscriptions"][0]
        renewal = Buyer(live, devchain, wallet, path="/api/agent/renew", body={"subscriptionId": subscription["id"]})
        payment = renewal.payment(generate_payment_id())
        first, again = await renewal.post(http, payment), await renewal.post(http, payment)
        assert first.status_code == 200 and again.status_code == 200, (first.text, again.text)
        assert "repeated" not in first.json()["data"] and again.json()["data"]["repeated"] is True
        renewed = [s["currentPeriodEnd"] for s in (first.json()["data"]["subscriptions"][0],
                                                   again.json()["data"]["subscriptions"][0])]
        assert renewed[0] == renewed[1] > subscription["currentPeriodEnd"]

        mk = live.new_account(credit_usdc=0)
        account = Buyer(live, devchain, wallet, path="/api/pools/alpha/subscribe",
                        body={"blocks": ["day"], "quantity": 1}, headers={"Authorization": f"Bearer {mk}"})
        payment = account.payment(generate_payment_id())
        first, again = await account.post(http, payment), await account.post(http, payment)
        assert first.status_code == 201 and again.status_code == 200, (first.text, again.text)
        shown = again.json()["data"]
        assert shown["subscriptions"][0]["id"] == first.json()["data"]["subscriptions"][0]["id"]
        assert "with its management key" in shown["message"] and "sk_" not in again.text
    assert chain_view.usdc(wallet.address) == 100 * 10**6 - 3 * PRICE


async def test_a_retry_of_a_refunded_purchase_is_told_it_was_refunded(tmp_path, database_url, upstream, devchain,
                                                                       chain_view: ChainView):
    """A purchase the operator refunded has ended: its retry is a 409 saying so, never a 202 "still
    confirming" that an agent would poll for ever."""
    with live_gateway(tmp_path, database_url, upstream, pools=X402_POOLS,
                      **chain_settings(devchain, reorg_horizon_blocks=1)) as live:
        buyer = Buyer(live, devchain, chain_view.new_wallet())
        payment = buyer.payment(generate_payment_id())
        async with httpx.AsyncClient(timeout=60) as http:
            r = await buyer.post(http, payment)
            assert r.status_code == 201, r.text
            payment_id = r.json()["data"]["subscriptions"][0]["paymentId"]
            await live.on_server(live.services.jobs.run_once())  # past the reorg horizon
            refunded = await live.on_server(live.services.admin.refunds.refund_payment(
                payment_id, "balance", actor="ops", reason="goodwill"))
            assert refunded.refund.state == "refunded"
            r = await buyer.post(http, payment)
            assert r.status_code == 409 and code(r) == "payment_refunded", r.text
            assert "refunded" in r.json()["error"]["message"]
