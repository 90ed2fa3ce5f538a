"""x402 on a real anvil chain: the official client buys seats in one call, and every attack on the
payment path is refused with balances and seat counts checked afterwards."""

from __future__ import annotations

import asyncio
import base64
import json
import threading

import httpx
import openai
import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from x402.http.clients import x402HttpxClient

from agent_gateway.payments.service import tx_claim_message
from tests.fixtures.live import LiveGateway
from tests.fixtures.x402 import ChainView, Wallet, challenge, payment_header, send_authorization, sign_authorization

pytestmark = pytest.mark.anyio
PRICE = 10_000_000  # pool alpha: 10.00 USDC per seat, one block
ORDER = {"pool": "alpha", "blocks": ["day"], "quantity": 1}


def official_client(devchain, wallet: Wallet):
    return devchain.x402_client(wallet.key)


def buy_in_background(devchain, wallet: Wallet, url: str) -> tuple[threading.Thread, dict]:
    """The official client buys ORDER from `url` on a thread of its own, for tests that kill the
    gateway under the request: the thread's outcome is {"response": …} or {"error": …}."""
    outcome: dict = {}

    async def run() -> None:
        async with x402HttpxClient(official_client(devchain, wallet), base_url=url, timeout=120) as http:
            outcome["response"] = await http.post("/api/agent/subscribe-pool", json=ORDER)

    def buy() -> None:
        try:
            asyncio.run(run())
        except Exception as exc:  # the gateway dies under this request
            outcome["error"] = exc

    buyer = threading.Thread(target=buy)
    buyer.start()
    return buyer, outcome


async def seats(live: LiveGateway, pool: str = "alpha") -> int:
    async with httpx.AsyncClient(base_url=live.url) as http:
        data = (await http.get(f"/api/pools/{pool}")).json()["data"]
    return data["blocks"][0]["availableSeats"]


async def test_the_official_client_pays_the_402_and_gets_working_keys(x402_gateway, devchain, chain_view):
    live = x402_gateway
    agent = chain_view.new_wallet()
    pay_to_before, seats_before = chain_view.usdc(devchain.pay_to), await seats(live)
    async with x402HttpxClient(official_client(devchain, agent), base_url=live.url, timeout=60) as http:
        r = await http.post("/api/agent/subscribe-pool", json={**ORDER, "quantity": 2, "name": "my-agent"})
    assert r.status_code == 201, r.text
    receipt = json.loads(base64.b64decode(r.headers["PAYMENT-RESPONSE"]))
    assert receipt["success"] is True and receipt["network"] == devchain.network
    assert receipt["payer"].lower() == agent.address.lower()
    data = r.json()["data"]
    assert data["managementKey"].startswith("mk_") and len(data["subscriptions"]) == 2
    # Money moved exactly once, for exactly the price; two seats are gone.
    assert chain_view.usdc(agent.address) == 100 * 10**6 - 2 * PRICE
    assert chain_view.usdc(devchain.pay_to) == pay_to_before + 2 * PRICE
    assert await seats(live) == seats_before - 2
    # Each key works through the proxy with the openai SDK.
    for sub in data["subscriptions"]:
        assert sub["status"] == "active" and sub["apiKey"].startswith("sk_")
        with openai.OpenAI(base_url=live.url + "/v1", api_key=sub["apiKey"], max_retries=0) as client:
            reply = client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content
    # The new management key manages the account that the wallet now owns.
    r = httpx.get(live.url + "/api/subscriptions", headers={"Authorization": f"Bearer {data['managementKey']}"})
    assert sorted(s["id"] for s in r.json()["data"]) == sorted(s["id"] for s in data["subscriptions"])


async def test_the_402_challenge_says_exactly_what_to_pay(x402_gateway, devchain):
    with httpx.Client(base_url=x402_gateway.url) as http:
        r = http.post("/api/agent/subscribe-pool", json={**ORDER, "quantity": 3, "billingCycle": "month"})
        assert r.status_code == 402
        header = json.loads(base64.b64decode(r.headers["PAYMENT-REQUIRED"]))
        body = r.json()
    accept = header["accepts"][0]
    assert header["x402Version"] == 2
    assert accept == {**accept, "scheme": "exact", "network": "eip155:31337", "amount": str(3 * PRICE),
                      "asset": devchain.token, "payTo": devchain.pay_to,
                      "extra": {"name": "USD Coin", "version": "2"}}
    assert accept["maxTimeoutSeconds"] >= 60
    assert body["accepts"] == header["accepts"] and body["quote"]["total"] == "30.00"


# --- attacks -------------------------------------------------------------------------------

class Attack:
    """Builds a payment for ORDER against the gateway's own challenge, with one thing wrong."""

    def __init__(self, live: LiveGateway, devchain, wallet: Wallet) -> None:
        self.live, self.chain, self.wallet = live, devchain, wallet
        with httpx.Client(base_url=live.url) as http:
            self.accepted = challenge(http, ORDER)

    def header(self, **changes) -> str:
        accepted = {**self.accepted, **changes.pop("accepted", {})}
        signer = changes.pop("signer_key", self.wallet.key)
        fields = {"payer": self.wallet.address, "to": accepted["payTo"], "value": int(accepted["amount"])}
        fields.update(changes)
        authorization, signature = sign_authorization(self.chain, signer, **fields)
        return payment_header(accepted, authorization, signature)

    def post(self, header: str) -> httpx.Response:
        return httpx.post(self.live.url + "/api/agent/subscribe-pool", json=ORDER,
                          headers={"PAYMENT-SIGNATURE": header}, timeout=60)


def assert_nothing_moved(chain_view: ChainView, devchain, wallet: Wallet, pay_to_before: int) -> None:
    assert chain_view.usdc(wallet.address) == 100 * 10**6
    assert chain_view.usdc(devchain.pay_to) == pay_to_before


@pytest.mark.parametrize("case,code", [
    ("forged", "invalid_signature"),
    ("pay_to", "wrong_recipient"),
    ("amount", "wrong_amount"),
    ("asset", "wrong_asset"),
    ("chain", "wrong_network"),
    ("expired", "expired"),
    ("not_yet_valid", "not_yet_valid"),
])
async def test_bad_payments_are_refused_and_nothing_moves(x402_gateway, devchain, chain_view, case, code):
    wallet = chain_view.new_wallet()
    other = Account.create()
    attack = Attack(x402_gateway, devchain, wallet)
    now = devchain.web3().eth.get_block("latest")["timestamp"]
    header = {
        "forged": lambda: attack.header(signer_key=other.key.hex()),
        "pay_to": lambda: attack.header(to=other.address, accepted={"payTo": other.address}),
        "amount": lambda: attack.header(value=PRICE - 1, accepted={"amount": str(PRICE - 1)}),
        "asset": lambda: attack.header(accepted={"asset": other.address}),
        "chain": lambda: attack.header(accepted={"network": "eip155:8453"}),
        "expired": lambda: attack.header(valid_before=now - 1),
        "not_yet_valid": lambda: attack.header(valid_after=now + 3600),
    }[case]()
    pay_to_before, seats_before, relayer_before = (chain_view.usdc(devchain.pay_to), await seats(x402_gateway),
                                                   chain_view.relayer_nonce())
    r = attack.post(header)
    assert r.status_code == 402, r.text
    assert r.json()["error"]["code"] == code, r.text
    assert "PAYMENT-REQUIRED" in r.headers
    assert_nothing_moved(chain_view, devchain, wallet, pay_to_before)
    assert await seats(x402_gateway) == seats_before and chain_view.relayer_nonce() == relayer_before


async def test_insufficient_balance_and_used_nonce_are_refused_before_settlement(x402_gateway, devchain, chain_view):
    poor = chain_view.new_wallet(usdc_atomic=PRICE - 1)
    attack = Attack(x402_gateway, devchain, poor)
    relayer_before = chain_view.relayer_nonce()
    r = attack.post(attack.header())
    assert r.status_code == 402 and r.json()["error"]["code"] == "insufficient_balance"
    assert chain_view.relayer_nonce() == relayer_before


async def test_replays_deliver_once_and_broadcast_once(x402_gateway, devchain, chain_view):
    wallet = chain_view.new_wallet()
    attack = Attack(x402_gateway, devchain, wallet)
    header = attack.header()
    pay_to_before, seats_before, relayer_before = (chain_view.usdc(devchain.pay_to), await seats(x402_gateway),
                                                   chain_view.relayer_nonce())
    first = attack.post(header)
    assert first.status_code == 201, first.text
    again = attack.post(header)
    assert again.status_code == 402 and again.json()["error"]["code"] == "payment_already_used"
    # Twenty at once with a fresh authorization: one delivery, one broadcast.
    header2 = attack.header()
    async with httpx.AsyncClient(timeout=60) as http:
        responses = await asyncio.gather(*(
            http.post(x402_gateway.url + "/api/agent/subscribe-pool", json=ORDER,
                      headers={"PAYMENT-SIGNATURE": header2}) for _ in range(20)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(201) == 1 and statuses.count(402) == 19, [r.text for r in responses if r.status_code != 402]
    assert {r.json()["error"]["code"] for r in responses if r.status_code == 402} == {"payment_already_used"}
    assert chain_view.usdc(devchain.pay_to) == pay_to_before + 2 * PRICE
    assert chain_view.usdc(wallet.address) == 100 * 10**6 - 2 * PRICE
    assert chain_view.relayer_nonce() == relayer_before + 2
    assert await seats(x402_gateway) == seats_before - 2


async def test_seats_sold_out_while_paying_means_no_settlement(x402_gateway, devchain, chain_view):
    wallet, rival = chain_view.new_wallet(), chain_view.new_wallet()
    order = {"pool": "one", "blocks": ["day"], "quantity": 1}
    with httpx.Client(base_url=x402_gateway.url) as http:
        accepted = challenge(http, order)
    # The rival buys the only seat between our 402 and our payment.
    async with x402HttpxClient(official_client(devchain, rival), base_url=x402_gateway.url, timeout=60) as http:
        assert (await http.post("/api/agent/subscribe-pool", json=order)).status_code == 201
    pay_to_before, relayer_before = chain_view.usdc(devchain.pay_to), chain_view.relayer_nonce()
    authorization, signature = sign_authorization(devchain, wallet.key, payer=wallet.address,
                                                  to=accepted["payTo"], value=int(accepted["amount"]))
    r = httpx.post(x402_gateway.url + "/api/agent/subscribe-pool", json=order, timeout=60,
                   headers={"PAYMENT-SIGNATURE": payment_header(accepted, authorization, signature)})
    assert r.status_code == 409 and r.json()["error"]["code"] == "sold_out"
    assert_nothing_moved(chain_view, devchain, wallet, pay_to_before)
    assert chain_view.relayer_nonce() == relayer_before


async def test_rpc_down_is_a_clear_503_and_nothing_is_charged(tmp_path, sqlite_url, upstream, devchain, chain_view):
    from agent_gateway.testing.devchain import start_devchain
    from tests.fixtures.live import live_gateway
    from tests.fixtures.x402 import X402_POOLS, chain_settings

    wallet = chain_view.new_wallet()
    # The gateway refuses to start on a node it cannot check, so it starts on a node of its own
    # (the same token address, domain and keys as the session chain) that then goes away.
    with start_devchain(agents=0) as node, live_gateway(tmp_path, sqlite_url, upstream, pools=X402_POOLS,
                                                        **chain_settings(devchain, chain_rpc_url=node.rpc_url)) as live:
        node.stop()
        attack = Attack(live, devchain, wallet)  # the 402 needs no chain access
        pay_to_before = chain_view.usdc(devchain.pay_to)
        r = attack.post(attack.header())
        assert r.status_code == 503 and r.json()["error"]["code"] == "chain_unavailable"
        assert_nothing_moved(chain_view, devchain, wallet, pay_to_before)
        assert await seats(live) == 50


# --- the tx-hash flow ---------------------------------------------------------------------

def transfer(devchain, wallet: Wallet, to: str, value: int) -> str:
    w3 = devchain.web3()
    abi = [{"name": "transfer", "type": "function", "stateMutability": "nonpayable",
            "inputs": [{"name": "to", "type": "address"}, {"name": "value", "type": "uint256"}],
            "outputs": [{"name": "", "type": "bool"}]}]
    token = w3.eth.contract(address=devchain.token, abi=abi)
    tx = token.functions.transfer(to, value).build_transaction(
        {"from": wallet.address, "nonce": w3.eth.get_transaction_count(wallet.address), "chainId": devchain.chain_id})
    signed = Account.sign_transaction(tx, wallet.key)
    tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
    w3.eth.wait_for_transaction_receipt(tx_hash)
    return "0x" + tx_hash.hex().removeprefix("0x")


def claim_signature(key: str, tx_hash: str, live: LiveGateway | None, *, chain_id: int | None = None,
                    domain: str | None = None) -> str:
    """The wallet's EIP-191 signature of the claim message, bound to a chain and a deployment's domain
    (by default the live gateway's: its chain id and the host of its public URL; without `live`,
    both must be given)."""
    from urllib.parse import urlsplit

    message = tx_claim_message(tx_hash, chain_id or live.settings.chain_id,
                               domain or urlsplit(live.settings.external_url).netloc)
    return "0x" + Account.sign_message(encode_defunct(text=message), key).signature.hex().removeprefix("0x")


async def test_tx_hash_flow_claims_once_and_checks_recipient_and_sender(x402_gateway, devchain, chain_view):
    wallet, thief = chain_view.new_wallet(), chain_view.new_wallet()
    url = x402_gateway.url + "/api/agent/subscribe-pool"
    paid = transfer(devchain, wallet, devchain.pay_to, PRICE)
    seats_before = await seats(x402_gateway)
    # Someone else cannot claim it: the signature must come from the sender.
    r = httpx.post(url, json={**ORDER, "txHash": paid, "signature": claim_signature(thief.key, paid, x402_gateway)}, timeout=30)
    assert r.status_code == 402 and r.json()["error"]["code"] == "invalid_signature"
    r = httpx.post(url, json={**ORDER, "txHash": paid, "signature": claim_signature(wallet.key, paid, x402_gateway)}, timeout=30)
    assert r.status_code == 201, r.text
    assert r.json()["data"]["subscriptions"][0]["apiKey"].startswith("sk_")
    # The same hash again: refused, nothing more delivered.
    r = httpx.post(url, json={**ORDER, "txHash": paid, "signature": claim_signature(wallet.key, paid, x402_gateway)}, timeout=30)
    assert r.status_code == 402 and r.json()["error"]["code"] == "payment_already_used"
    # A transfer to someone else is not a payment to us.
    elsewhere = transfer(devchain, wallet, thief.address, PRICE)
    r = httpx.post(url, json={**ORDER, "txHash": elsewhere, "signature": claim_signature(wallet.key, elsewhere, x402_gateway)},
                   timeout=30)
    assert r.status_code == 402 and r.json()["error"]["code"] == "transfer_mismatch"
    assert await seats(x402_gateway) == seats_before - 1


async def test_a_tx_hash_paid_after_the_last_seat_sold_is_credited_once(x402_gateway, devchain, chain_view):
    from tests.e2e.test_x402_recovery import sign_in

    wallet, rival = chain_view.new_wallet(), chain_view.new_wallet()
    order = {"pool": "one", "blocks": ["day"], "quantity": 1}
    paid = transfer(devchain, wallet, devchain.pay_to, 3_000_000)
    # The rival buys the only seat after our transfer, before our claim.
    async with x402HttpxClient(official_client(devchain, rival), base_url=x402_gateway.url, timeout=60) as http:
        assert (await http.post("/api/agent/subscribe-pool", json=order)).status_code == 201
    claim = {**order, "txHash": paid, "signature": claim_signature(wallet.key, paid, x402_gateway)}
    url = x402_gateway.url + "/api/agent/subscribe-pool"
    r = httpx.post(url, json=claim, timeout=30)
    assert r.status_code == 409 and r.json()["error"]["code"] == "sold_out_after_payment", r.text
    # The money is the wallet account's prepaid balance, and the claim cannot be credited again.
    for _ in range(3):
        again = httpx.post(url, json=claim, timeout=30)
        assert again.status_code == 402 and again.json()["error"]["code"] == "payment_already_used", again.text
    mk = sign_in(x402_gateway.url, wallet)
    account = httpx.get(x402_gateway.url + "/api/account", headers={"Authorization": f"Bearer {mk}"}).json()["data"]
    assert account["balance"] == "3.00"
    assert await seats(x402_gateway, "one") == 0


async def test_an_authorization_already_used_on_chain_is_refused(x402_gateway, devchain, chain_view):
    wallet = chain_view.new_wallet()
    attack = Attack(x402_gateway, devchain, wallet)
    header = attack.header()
    # Someone settles the very same authorization on-chain first, outside the gateway.
    send_authorization(devchain, header, chain_view.new_wallet(usdc_atomic=0))
    pay_to_before, seats_before, relayer_before = (chain_view.usdc(devchain.pay_to), await seats(x402_gateway),
                                                   chain_view.relayer_nonce())
    r = attack.post(header)
    assert r.status_code == 402 and r.json()["error"]["code"] == "nonce_already_used"
    assert chain_view.usdc(devchain.pay_to) == pay_to_before and await seats(x402_gateway) == seats_before
    assert chain_view.relayer_nonce() == relayer_before


async def test_management_subscribe_pays_with_x402_when_the_balance_is_short(x402_gateway, devchain, chain_view):
    live = x402_gateway
    mk = live.new_account(credit_usdc=0)
    wallet = chain_view.new_wallet()
    headers = {"Authorization": f"Bearer {mk}"}
    r = httpx.post(live.url + "/api/pools/alpha/subscribe", json={"blocks": ["day"], "quantity": 1}, headers=headers)
    assert r.status_code == 402 and r.json()["error"]["code"] == "insufficient_balance"
    assert json.loads(base64.b64decode(r.headers["PAYMENT-REQUIRED"]))["accepts"][0]["amount"] == str(PRICE)
    async with x402HttpxClient(official_client(devchain, wallet), base_url=live.url, headers=headers,
                               timeout=60) as http:
        r = await http.post("/api/pools/alpha/subscribe", json={"blocks": ["day"], "quantity": 1})
    assert r.status_code == 201, r.text
    data = r.json()["data"]
    assert data["managementKey"] is None  # the seats went to the paying account, which already has keys
    listed = httpx.get(live.url + "/api/subscriptions", headers=headers).json()["data"]
    assert [s["id"] for s in listed] == [data["subscriptions"][0]["id"]]


async def test_a_late_receipt_gets_202_and_the_reconciler_delivers(tmp_path, sqlite_url, upstream, devchain, chain_view):
    from tests.fixtures.live import live_gateway
    from tests.fixtures.x402 import X402_POOLS, chain_settings

    wallet = chain_view.new_wallet()
    w3 = devchain.web3()
    with live_gateway(tmp_path, sqlite_url, upstream, pools=X402_POOLS,
                      **chain_settings(devchain, settle_wait_s=0.5)) as live:
        w3.provider.make_request("evm_setAutomine", [False])
        try:
            async with x402HttpxClient(official_client(devchain, wallet), base_url=live.url, timeout=60) as http:
                r = await http.post("/api/agent/subscribe-pool", json=ORDER)
            assert r.status_code == 202, r.text
            pending = r.json()["data"]
            assert pending["state"] == "broadcast" and pending["txHash"]
        finally:
            w3.provider.make_request("evm_setAutomine", [True])
        w3.provider.make_request("evm_mine", [])
        await live.on_server(live.services.jobs.run_once())
        status = httpx.get(live.url + pending["poll"]).json()["data"]
        assert status["state"] == "delivered" and status["accountId"]
        # Nothing was broadcast twice: exactly one settlement paid us.
        assert chain_view.usdc(wallet.address) == 100 * 10**6 - PRICE
