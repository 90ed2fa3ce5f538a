"""Refunds on a real gateway and a real anvil chain: a funding round that misses its deadline (or its
activation deadline) is closed and every pledge refunded (the prepaid balance credited exactly; on-
chain, exactly the paid amount back to the paying wallet); the operator refunds one payment (balance
or chain), which cancels its subscriptions and revokes their keys at once; a refund the refund wallet
cannot pay is refused with a 409; a payment not yet past the reorg horizon waits, then is refunded."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import openai
import pytest
from eth_account import Account
from x402.http.clients import x402HttpxClient

from agent_gateway.clock import FixedClock
from agent_gateway.testing.devchain import DevChain, token_contract
from tests.fixtures.live import LiveGateway, live_gateway
from tests.fixtures.x402 import ChainView, Wallet, chain_settings, sign_authorization

pytestmark = pytest.mark.anyio
ADMIN_TOKEN = "adm-" + "r7" * 20
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}", "X-Admin-Actor": "ops"}
PRICE = 10 * 10**6
ROUND = {"pool": "round", "blocks": ["day"], "quantity": 1}
SHOP = {"pool": "shop", "blocks": ["day"], "quantity": 1}
ASK = [{"role": "user", "content": "hi"}]
START = datetime.now(UTC).replace(microsecond=0)
POOLS = """
[blocks]
day = "00:00-24:00"

[pools.round]
name = "Seed round"
models = ["test-model"]
upstreams = ["{{upstream}}"]
seats = 10
status = "funding"
funding_goal = {goal}
funding_deadline = {deadline}
activation_days = 2
prices = {{{{ day = "10.00" }}}}

[pools.shop]
name = "Shop"
models = ["test-model"]
upstreams = ["{{upstream}}"]
seats = 10
prices = {{{{ day = "10.00" }}}}
"""


def pools(goal: int) -> str:
    return POOLS.format(goal=goal, deadline=(START + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ"))


@pytest.fixture
def refund_wallet(chain_view: ChainView) -> Wallet:
    return chain_view.new_wallet(usdc_atomic=100 * 10**6, eth_wei=10**18)


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(START)


def gateway(tmp_path: Path, sqlite_url: str, upstream, devchain: DevChain, clock: FixedClock, *, goal: int = 5,
            **overrides) -> Iterator[LiveGateway]:
    settings = {**chain_settings(devchain), "reorg_horizon_blocks": 1, **overrides}
    return live_gateway(tmp_path, sqlite_url, upstream, pools=pools(goal), admin_token=ADMIN_TOKEN, clock=clock,
                        **settings)


async def run_jobs(live: LiveGateway, times: int = 1) -> None:
    for _ in range(times):
        await live.on_server(live.services.jobs.run_once())


async def x402_buy(live: LiveGateway, devchain: DevChain, wallet: Wallet, order: dict) -> dict:
    async with x402HttpxClient(devchain.x402_client(wallet.key), base_url=live.url, timeout=60) as http:
        r = await http.post("/api/agent/subscribe-pool", json={**order, "name": "buyer"})
    assert r.status_code == 201, r.text
    return r.json()["data"]


def balance_pledge(live: LiveGateway, mk: str) -> tuple[dict, str]:
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {mk}"}, timeout=30) as http:
        r = http.post("/api/pools/round/subscribe", json={"blocks": ["day"], "quantity": 1})
        assert r.status_code == 201, r.text
        [sub] = r.json()["data"]["subscriptions"]
        r = http.post("/api/keys/subscription", json={"name": "pledge", "subscriptionId": sub["id"]})
        assert r.status_code == 201, r.text
        return sub, r.json()["data"]["apiKey"]


def balance(live: LiveGateway, mk: str) -> str:
    return httpx.get(live.url + "/api/account", headers={"Authorization": f"Bearer {mk}"}).json()["data"]["balance"]


def key_refused(live: LiveGateway, sk: str) -> bool:
    """The key is refused for good: its subscription canceled (403 subscription_expired) or the key
    revoked (403 key_revoked); a pledge's key on a funding pool is refused otherwise (pool_funding)."""
    with openai.OpenAI(base_url=live.url + "/v1", api_key=sk, max_retries=0) as client:
        try:
            client.chat.completions.create(model="test-model", messages=ASK)
        except openai.PermissionDeniedError as exc:
            return exc.code in ("subscription_expired", "key_revoked")
    return False


def key_statuses(live: LiveGateway, account_id: str) -> list[str]:
    account = httpx.get(f"{live.url}/api/admin/accounts/{account_id}", headers=ADMIN).json()["data"]
    return [k["status"] for k in account["keys"]]


def key_works(live: LiveGateway, sk: str) -> bool:
    with openai.OpenAI(base_url=live.url + "/v1", api_key=sk, max_retries=0) as client:
        return bool(client.chat.completions.create(model="test-model", messages=ASK).choices[0].message.content)


def nonce(devchain: DevChain, address: str) -> int:
    return devchain.web3().eth.get_transaction_count(address)


def refunds(live: LiveGateway, **params: str) -> list[dict]:
    r = httpx.get(live.url + "/api/admin/refunds", params=params, headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()["data"]


async def final_purchase(live: LiveGateway, devchain: DevChain, chain_view: ChainView,
                         horizon: int) -> tuple[Wallet, str]:
    """A seat bought by a new wallet with the official x402 client, its payment then mined past the
    reorg horizon (`horizon` blocks) and marked final by a job pass: (payer, payment id)."""
    payer = chain_view.new_wallet()
    payment_id = (await x402_buy(live, devchain, payer, SHOP))["subscriptions"][0]["paymentId"]
    devchain.web3().provider.make_request("anvil_mine", [hex(horizon)])
    await run_jobs(live)
    return payer, payment_id


CLOSED_BY_FUNDING_DEADLINE = 'agw_pools_closed_total{deadline="funding",pool="round"}'
CHAIN_REFUNDS_MADE = 'agw_refunds_total{destination="chain",outcome="refunded"}'


def counter(live: LiveGateway, sample: str) -> float:
    """A sample's value on /metrics (0 when absent). The counters live as long as the process that
    serves the gateway, which other tests share: compare before and after, never absolute values."""
    for line in httpx.get(live.url + "/metrics").text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    return 0.0


def payment_state(live: LiveGateway, payment_id: str) -> str:
    return httpx.get(f"{live.url}/api/agent/payments/{payment_id}").json()["data"]["state"]


async def test_a_missed_funding_deadline_closes_the_round_and_refunds_every_pledge(
        tmp_path, sqlite_url, upstream, devchain, chain_view, refund_wallet, clock):
    with gateway(tmp_path, sqlite_url, upstream, devchain, clock, refund_to="chain",
                 refund_private_key=refund_wallet.key) as live:
        mk = live.new_account(credit_usdc=100)
        sub, sk_balance = balance_pledge(live, mk)
        assert balance(live, mk) == "90.00"
        payer = chain_view.new_wallet()
        payer_before = chain_view.usdc(payer.address)
        bought = await x402_buy(live, devchain, payer, ROUND)
        [pledge] = bought["subscriptions"]
        assert pledge["status"] == "pending" and chain_view.usdc(payer.address) == payer_before - PRICE
        payment_id = pledge["paymentId"]
        wallet_before, wallet_nonce = chain_view.usdc(refund_wallet.address), nonce(devchain, refund_wallet.address)
        closed_before, refunded_before = counter(live, CLOSED_BY_FUNDING_DEADLINE), counter(live, CHAIN_REFUNDS_MADE)

        # Before the deadline the passes leave the round alone.
        await run_jobs(live)
        assert httpx.get(live.url + "/api/pools/round").json()["data"]["status"] == "funding"
        assert refunds(live) == []

        clock.advance(timedelta(days=1, seconds=1))
        await run_jobs(live, times=2)  # closes and plans; sends; confirms
        assert httpx.get(live.url + "/api/pools/round").json()["data"]["status"] == "closed"
        audit = httpx.get(live.url + "/api/admin/audit?target=pool:round", headers=ADMIN).json()["data"]
        assert [(a["actor"], a["before"]["status"], a["after"]["status"]) for a in audit] == [
            ("funding-deadline", "funding", "closed")]

        # The balance pledge: credited back exactly, at once (a pledge paid from the balance goes back to it).
        assert balance(live, mk) == "100.00"
        by_source = {r["paymentId"] or r["subscriptionId"]: r for r in refunds(live)}
        assert by_source[sub["id"]]["state"] == "refunded" and by_source[sub["id"]]["destination"] == "balance"
        # The x402 pledge: exactly the paid amount back to the payer, from the refund wallet, once.
        chain_refund = by_source[payment_id]
        assert chain_refund["state"] == "refunded" and chain_refund["destination"] == "chain", chain_refund
        assert chain_refund["to"] == payer.address.lower() and chain_refund["amount"] == "10.00"
        assert chain_view.usdc(payer.address) == payer_before
        assert chain_view.usdc(refund_wallet.address) == wallet_before - PRICE
        assert nonce(devchain, refund_wallet.address) == wallet_nonce + 1
        receipt = devchain.web3().eth.get_transaction_receipt(chain_refund["txHash"])
        assert receipt["status"] == 1 and receipt["blockNumber"] == chain_refund["blockNumber"]
        assert payment_state(live, payment_id) == "refunded"
        # Both pledges canceled, their keys revoked; seats back.
        subs = httpx.get(live.url + "/api/subscriptions", headers={"Authorization": f"Bearer {mk}"}).json()["data"]
        assert [s["status"] for s in subs] == ["canceled"]
        assert key_refused(live, sk_balance) and key_refused(live, pledge["apiKey"])
        assert key_statuses(live, by_source[sub["id"]]["accountId"]) == ["revoked"]
        assert key_statuses(live, chain_refund["accountId"]) == ["revoked"]
        assert httpx.get(live.url + "/api/pools/round").json()["data"]["blocks"][0]["availableSeats"] == 10
        assert counter(live, CHAIN_REFUNDS_MADE) == refunded_before + 1
        assert counter(live, CLOSED_BY_FUNDING_DEADLINE) == closed_before + 1

        # More passes change nothing: refunded once.
        await run_jobs(live, times=2)
        assert chain_view.usdc(payer.address) == payer_before and balance(live, mk) == "100.00"
        assert nonce(devchain, refund_wallet.address) == wallet_nonce + 1


async def test_a_missed_activation_deadline_closes_the_round_and_refunds_to_the_balance(
        tmp_path, sqlite_url, upstream, devchain, chain_view, clock):
    with gateway(tmp_path, sqlite_url, upstream, devchain, clock, goal=2) as live:  # AGW_REFUND_TO=balance
        mk = live.new_account(credit_usdc=50)
        balance_pledge(live, mk)
        payer = chain_view.new_wallet()
        payer_before = chain_view.usdc(payer.address)
        bought = await x402_buy(live, devchain, payer, ROUND)
        payment_id = bought["subscriptions"][0]["paymentId"]
        account_id = bought["accountId"] if "accountId" in bought else None
        assert httpx.get(live.url + "/api/pools/round").json()["data"]["status"] == "activating"
        # Past the funding deadline but activating: only the activation deadline counts now.
        clock.advance(timedelta(days=1, hours=12))
        await run_jobs(live)
        assert httpx.get(live.url + "/api/pools/round").json()["data"]["status"] == "activating"
        clock.advance(timedelta(days=1))  # two days after the goal was reached
        await run_jobs(live)
        assert httpx.get(live.url + "/api/pools/round").json()["data"]["status"] == "closed"
        audit = httpx.get(live.url + "/api/admin/audit?target=pool:round", headers=ADMIN).json()["data"]
        assert audit[0]["actor"] == "activation-deadline" and audit[0]["before"]["status"] == "activating"
        assert balance(live, mk) == "50.00"
        # The x402 pledge went to the paying wallet's account balance (the default), nothing on-chain.
        assert chain_view.usdc(payer.address) == payer_before - PRICE
        assert payment_state(live, payment_id) == "refunded"
        [refund] = refunds(live, payment=payment_id)
        assert refund["state"] == "refunded" and refund["destination"] == "balance" and refund["txHash"] is None
        account = httpx.get(f"{live.url}/api/admin/accounts/{refund['accountId']}", headers=ADMIN).json()["data"]
        assert account["balance"] == "10.00" and account_id in (None, account["id"])
        assert [e["kind"] for e in account["balanceEntries"]] == ["refund"]


async def test_the_operator_refunds_one_payment_to_the_balance_or_on_chain(
        tmp_path, sqlite_url, upstream, devchain, chain_view, refund_wallet, clock):
    with gateway(tmp_path, sqlite_url, upstream, devchain, clock, refund_private_key=refund_wallet.key) as live:
        first, second = chain_view.new_wallet(), chain_view.new_wallet()
        bought = [await x402_buy(live, devchain, w, SHOP) for w in (first, second)]
        keys = [b["subscriptions"][0]["apiKey"] for b in bought]
        payments = [b["subscriptions"][0]["paymentId"] for b in bought]
        assert all(key_works(live, k) for k in keys)
        await run_jobs(live)  # past the reorg horizon (1 block)

        # To the balance (the default): credited at once, the subscription canceled, its key dead.
        r = httpx.post(f"{live.url}/api/admin/payments/{payments[0]}/refund", json={"reason": "asked"}, headers=ADMIN)
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert data["state"] == "refunded" and data["destination"] == "balance" and data["amount"] == "10.00"
        assert data["payment"]["state"] == "refunded" and len(data["keysRevoked"]) == 1
        assert key_refused(live, keys[0]) and key_works(live, keys[1])
        account = httpx.get(f"{live.url}/api/admin/accounts/{data['accountId']}", headers=ADMIN).json()["data"]
        assert account["balance"] == "10.00" and [s["status"] for s in account["subscriptions"]] == ["canceled"]
        [entry] = httpx.get(live.url + f"/api/admin/audit?target=payment:{payments[0]}", headers=ADMIN).json()["data"]
        assert entry["action"] == "payment.refund" and entry["actor"] == "ops" and entry["reason"] == "asked"
        assert entry["before"]["state"] == "delivered" and entry["after"]["destination"] == "balance"

        # Twice: refused, nothing more credited.
        r = httpx.post(f"{live.url}/api/admin/payments/{payments[0]}/refund", json={"to": "chain"}, headers=ADMIN)
        assert r.status_code == 409 and r.json()["error"]["code"] == "already_refunded"

        # On-chain: exactly the paid amount back to the paying wallet.
        payer_before = chain_view.usdc(second.address)
        r = httpx.post(f"{live.url}/api/admin/payments/{payments[1]}/refund", json={"to": "chain", "reason": "x"},
                       headers=ADMIN)
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert data["state"] in ("broadcast", "refunded") and data["txHash"] and data["payment"]["state"] == "refunded"
        assert key_refused(live, keys[1])
        await run_jobs(live)
        [refund] = refunds(live, payment=payments[1])
        assert refund["state"] == "refunded" and refund["txHash"] == data["txHash"]
        assert chain_view.usdc(second.address) == payer_before + PRICE

        # The money view shows the refund wallet.
        money = httpx.get(live.url + "/api/admin/money", headers=ADMIN).json()["data"]
        assert money["refundWallet"]["address"] == refund_wallet.address
        assert money["refundWallet"]["usdc"] == "90.00" and int(money["refundWallet"]["nativeWei"]) > 0
        # Unknown payment: 404; a payment in no refundable state: 409.
        r = httpx.post(f"{live.url}/api/admin/payments/pay_nope/refund", json={}, headers=ADMIN)
        assert r.status_code == 404 and r.json()["error"]["code"] == "payment_not_found"


async def test_a_concurrent_double_refund_refunds_once(
        tmp_path, sqlite_url, upstream, devchain, chain_view, clock):
    with gateway(tmp_path, sqlite_url, upstream, devchain, clock) as live:
        bought = await x402_buy(live, devchain, chain_view.new_wallet(), SHOP)
        payment_id = bought["subscriptions"][0]["paymentId"]
        await run_jobs(live)

        def refund(_: int) -> httpx.Response:
            return httpx.post(f"{live.url}/api/admin/payments/{payment_id}/refund", json={"to": "balance"},
                              headers=ADMIN, timeout=30)

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(refund, range(6)))
        assert sorted(r.status_code for r in answers) == [200] + [409] * 5, [r.text for r in answers]
        assert all(r.json()["error"]["code"] == "already_refunded" for r in answers if r.status_code == 409)
        [done] = refunds(live)
        account = httpx.get(f"{live.url}/api/admin/accounts/{done['accountId']}", headers=ADMIN).json()["data"]
        assert account["balance"] == "10.00" and len(account["balanceEntries"]) == 1


async def test_a_refund_the_wallet_cannot_pay_is_refused_and_a_payment_not_yet_final_waits(
        tmp_path, sqlite_url, upstream, devchain, chain_view, clock):
    poor = chain_view.new_wallet(usdc_atomic=0, eth_wei=10**18)
    with gateway(tmp_path, sqlite_url, upstream, devchain, clock, refund_private_key=poor.key,
                 reorg_horizon_blocks=3) as live:
        payer = chain_view.new_wallet()
        bought = await x402_buy(live, devchain, payer, SHOP)
        payment_id, sk = bought["subscriptions"][0]["paymentId"], bought["subscriptions"][0]["apiKey"]
        w3 = devchain.web3()

        # No USDC in the refund wallet: 409, nothing written.
        r = httpx.post(f"{live.url}/api/admin/payments/{payment_id}/refund", json={"to": "chain"}, headers=ADMIN)
        assert r.status_code == 409 and r.json()["error"]["code"] == "refund_wallet_short_usdc", r.text
        assert "0.00 USDC" in r.json()["error"]["message"]
        # USDC but no gas: 409 too.
        devchain.fund(poor.address, 50 * 10**6)
        w3.provider.make_request("anvil_setBalance", [poor.address, "0x0"])
        r = httpx.post(f"{live.url}/api/admin/payments/{payment_id}/refund", json={"to": "chain"}, headers=ADMIN)
        assert r.status_code == 409 and r.json()["error"]["code"] == "refund_wallet_short_gas", r.text
        assert refunds(live) == [] and payment_state(live, payment_id) == "delivered" and key_works(live, sk)
        money = httpx.get(live.url + "/api/admin/money", headers=ADMIN).json()["data"]
        assert money["refundWallet"]["usdc"] == "50.00" and money["refundWallet"]["nativeWei"] == "0"

        # A payment not yet past the reorg horizon (3 blocks): planned, waiting; the key still works.
        r = httpx.post(f"{live.url}/api/admin/payments/{payment_id}/refund", json={"to": "balance"}, headers=ADMIN)
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert data["state"] == "planned" and data["waiting"] == "awaiting_finality"
        await run_jobs(live)
        assert refunds(live)[0]["state"] == "planned" and key_works(live, sk)
        w3.provider.make_request("anvil_mine", ["0x3"])
        await run_jobs(live, times=2)  # the reorg pass marks it final; the refund pass makes it
        [refund] = refunds(live)
        assert refund["state"] == "refunded" and refund["waiting"] is None
        assert payment_state(live, payment_id) == "refunded" and key_refused(live, sk)
        account = httpx.get(f"{live.url}/api/admin/accounts/{refund['accountId']}", headers=ADMIN).json()["data"]
        assert account["balance"] == "10.00"


def test_chain_check_reports_the_refund_wallet(devchain, chain_view):
    from tests.e2e.test_chain_checks import chain_env, cli

    empty, funded = chain_view.new_wallet(usdc_atomic=0, eth_wei=0), chain_view.new_wallet(usdc_atomic=5 * 10**6)
    result = cli(chain_env(devchain, AGW_REFUND_PRIVATE_KEY=empty.key), "chain", "check")
    assert result.returncode == 0, result.stdout + result.stderr  # a warning: refunds wait, the gateway serves
    [line] = [x for x in result.stdout.splitlines() if "refund wallet" in x]
    assert line.startswith("warn  refund wallet: " + empty.address) and "0.00 USDC" in line, line
    result = cli(chain_env(devchain, AGW_REFUND_PRIVATE_KEY=funded.key), "chain", "check")
    [line] = [x for x in result.stdout.splitlines() if "refund wallet" in x]
    assert line.startswith(f"ok    refund wallet: {funded.address} holds 5.00 USDC"), line
    # The relayer's key is refused as the refund key (they would take each other's nonces).
    result = cli(chain_env(devchain, AGW_REFUND_PRIVATE_KEY=devchain.relayer_key), "chain", "check")
    assert result.returncode != 0 and "must not be AGW_RELAYER_KEY" in result.stderr, result.stderr


async def test_a_refund_whose_nonce_another_transaction_took_is_signed_again_and_paid_once(
        tmp_path, sqlite_url, upstream, devchain, chain_view, refund_wallet, clock):
    with gateway(tmp_path, sqlite_url, upstream, devchain, clock, refund_private_key=refund_wallet.key) as live:
        payer = chain_view.new_wallet()
        payment_id = (await x402_buy(live, devchain, payer, SHOP))["subscriptions"][0]["paymentId"]
        await run_jobs(live)
        payer_before, nonce_before = chain_view.usdc(payer.address), nonce(devchain, refund_wallet.address)
        w3 = devchain.web3()
        w3.provider.make_request("evm_setAutomine", [False])
        try:
            r = httpx.post(f"{live.url}/api/admin/payments/{payment_id}/refund", json={"to": "chain"}, headers=ADMIN)
            assert r.status_code == 200 and r.json()["data"]["state"] == "broadcast", r.text
            first = r.json()["data"]
            # The stored transfer is lost, and another transaction of the refund wallet takes its nonce.
            w3.provider.make_request("anvil_dropAllTransactions", [])
            block = w3.eth.get_block("latest")
            other = Account.from_key(refund_wallet.key).sign_transaction({
                "type": 2, "chainId": devchain.chain_id, "nonce": first["nonce"], "to": refund_wallet.address,
                "value": 0, "gas": 21_000, "maxPriorityFeePerGas": 1, "maxFeePerGas": 2 * block["baseFeePerGas"] + 1})
            w3.eth.send_raw_transaction(other.raw_transaction)
            w3.provider.make_request("evm_mine", [])
        finally:
            w3.provider.make_request("evm_setAutomine", [True])
        await run_jobs(live, times=2)  # nonce taken: planned again, signed again, sent; confirmed
        [refund] = refunds(live)
        assert refund["state"] == "refunded", refund
        assert refund["txHash"] != first["txHash"] and refund["nonce"] == first["nonce"] + 1
        assert chain_view.usdc(payer.address) == payer_before + PRICE  # once
        assert nonce(devchain, refund_wallet.address) == nonce_before + 2  # the intruder and the refund
        assert payment_state(live, payment_id) == "refunded"


async def test_a_nonce_taken_in_a_block_not_yet_final_is_not_signed_again(
        tmp_path, sqlite_url, upstream, devchain, chain_view, refund_wallet, clock):
    """The transaction that took the refund's nonce sits in a block a reorg can still drop. Signing the
    refund again then would pay twice: after the reorg the first transfer's bytes (public since they
    were sent; anyone may resend them) are mined at the freed nonce, and the second transfer at the
    next. The refund waits until the nonce is taken past the reorg horizon, or its own bytes mine."""
    horizon = 3
    with gateway(tmp_path, sqlite_url, upstream, devchain, clock, refund_private_key=refund_wallet.key,
                 reorg_horizon_blocks=horizon) as live:
        payer, payment_id = await final_purchase(live, devchain, chain_view, horizon)
        w3 = devchain.web3()
        payer_before, nonce_before = chain_view.usdc(payer.address), nonce(devchain, refund_wallet.address)
        w3.provider.make_request("evm_setAutomine", [False])
        try:
            r = httpx.post(f"{live.url}/api/admin/payments/{payment_id}/refund", json={"to": "chain"}, headers=ADMIN)
            assert r.status_code == 200 and r.json()["data"]["state"] == "broadcast", r.text
            first = r.json()["data"]
            first_raw = bytes(w3.eth.get_raw_transaction(first["txHash"]))  # public: in the node's pool
            w3.provider.make_request("anvil_dropAllTransactions", [])
            snapshot = w3.provider.make_request("evm_snapshot", [])["result"]
            block = w3.eth.get_block("latest")
            other = Account.from_key(refund_wallet.key).sign_transaction({
                "type": 2, "chainId": devchain.chain_id, "nonce": first["nonce"], "to": refund_wallet.address,
                "value": 0, "gas": 21_000, "maxPriorityFeePerGas": 1, "maxFeePerGas": 2 * block["baseFeePerGas"] + 1})
            w3.eth.send_raw_transaction(other.raw_transaction)
            w3.provider.make_request("evm_mine", [])
        finally:
            w3.provider.make_request("evm_setAutomine", [True])
        await run_jobs(live, times=2)  # the intruder's block is one deep: the refund is not signed again
        [refund] = refunds(live)
        assert refund["state"] == "broadcast" and refund["txHash"] == first["txHash"], refund
        assert chain_view.usdc(payer.address) == payer_before
        signed = [first_raw] + ([bytes(w3.eth.get_raw_transaction(refund["txHash"]))]
                                if refund["txHash"] != first["txHash"] else [])
        # The reorg drops the intruder; a real node puts the dropped block's transactions back in its
        # pool, and anyone resends the refund's first bytes: they take the freed nonce.
        assert w3.provider.make_request("evm_revert", [snapshot])["result"] is True
        for raw in signed:
            w3.eth.send_raw_transaction(raw)
        w3.provider.make_request("anvil_mine", [hex(horizon)])
        await run_jobs(live, times=2)
        [refund] = refunds(live)
        assert refund["state"] == "refunded" and refund["txHash"] == first["txHash"], refund
        assert chain_view.usdc(payer.address) == payer_before + PRICE  # once
        assert nonce(devchain, refund_wallet.address) == nonce_before + 1


async def test_a_refund_transfer_a_reorg_drops_is_sent_again_until_past_the_horizon(
        tmp_path, sqlite_url, upstream, devchain, chain_view, refund_wallet, clock):
    """A refund is `refunded` once its transfer is past the reorg horizon, like a payment is final: a
    reorg that drops the mined transfer before then (and the node that forgets it) is followed by the
    same bytes sent again, never by a refund that says refunded while the payer got nothing."""
    horizon = 3
    with gateway(tmp_path, sqlite_url, upstream, devchain, clock, refund_private_key=refund_wallet.key,
                 reorg_horizon_blocks=horizon) as live:
        payer, payment_id = await final_purchase(live, devchain, chain_view, horizon)
        w3 = devchain.web3()
        payer_before, nonce_before = chain_view.usdc(payer.address), nonce(devchain, refund_wallet.address)
        w3.provider.make_request("evm_setAutomine", [False])
        try:
            r = httpx.post(f"{live.url}/api/admin/payments/{payment_id}/refund", json={"to": "chain"}, headers=ADMIN)
            assert r.status_code == 200 and r.json()["data"]["state"] == "broadcast", r.text
            first = r.json()["data"]
            snapshot = w3.provider.make_request("evm_snapshot", [])["result"]
            w3.provider.make_request("evm_mine", [])  # mined, one confirmation
            await run_jobs(live)
            [refund] = refunds(live)
            assert refund["state"] == "broadcast" and refund["blockNumber"] is not None, refund
            # The reorg drops the block, and the node forgets the transfer.
            assert w3.provider.make_request("evm_revert", [snapshot])["result"] is True
            w3.provider.make_request("anvil_dropAllTransactions", [])
            assert chain_view.usdc(payer.address) == payer_before
        finally:
            w3.provider.make_request("evm_setAutomine", [True])
        await run_jobs(live)  # no receipt: the same bytes sent again (mined at once)
        w3.provider.make_request("anvil_mine", [hex(horizon)])
        await run_jobs(live)
        [refund] = refunds(live)
        assert refund["state"] == "refunded" and refund["txHash"] == first["txHash"], refund
        assert chain_view.usdc(payer.address) == payer_before + PRICE
        assert nonce(devchain, refund_wallet.address) == nonce_before + 1


async def test_a_reverted_refund_in_a_block_not_yet_final_is_not_signed_again(
        tmp_path, sqlite_url, upstream, devchain, chain_view, refund_wallet, clock):
    """The refund's transfer reverted (the wallet was emptied just before it in the same block). A
    reorg can drop that block and re-run the transfer where it succeeds: a second transfer signed
    meanwhile would be paid too. It is signed again only once the revert is past the horizon."""
    horizon = 3
    with gateway(tmp_path, sqlite_url, upstream, devchain, clock, refund_private_key=refund_wallet.key,
                 reorg_horizon_blocks=horizon) as live:
        payer, payment_id = await final_purchase(live, devchain, chain_view, horizon)
        w3 = devchain.web3()
        payer_before = chain_view.usdc(payer.address)
        signed: dict[str, bytes] = {}  # every transfer the gateway signed (public once sent)
        drainer = chain_view.new_wallet(usdc_atomic=0)
        w3.provider.make_request("evm_setAutomine", [False])
        try:
            r = httpx.post(f"{live.url}/api/admin/payments/{payment_id}/refund", json={"to": "chain"}, headers=ADMIN)
            assert r.status_code == 200 and r.json()["data"]["state"] == "broadcast", r.text
            first = r.json()["data"]
            signed[first["txHash"]] = bytes(w3.eth.get_raw_transaction(first["txHash"]))
            snapshot = w3.provider.make_request("evm_snapshot", [])["result"]
            # The refund wallet's USDC leaves by an authorization (no account nonce), ahead of the refund.
            held = chain_view.usdc(refund_wallet.address)
            authorization, signature = sign_authorization(devchain, refund_wallet.key, payer=refund_wallet.address,
                                                          to=drainer.address, value=held)
            call = token_contract(w3, devchain.token).get_function_by_signature(
                "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)")(
                refund_wallet.address, drainer.address, held, int(authorization["validAfter"]),
                int(authorization["validBefore"]), bytes.fromhex(authorization["nonce"][2:]),
                bytes.fromhex(signature.removeprefix("0x")))
            base = w3.eth.get_block("latest")["baseFeePerGas"]
            tx = call.build_transaction({"from": drainer.address, "nonce": w3.eth.get_transaction_count(drainer.address),
                                         "gas": 200_000, "maxPriorityFeePerGas": 10**10,
                                         "maxFeePerGas": 2 * base + 10**10, "chainId": devchain.chain_id})
            w3.eth.send_raw_transaction(Account.from_key(drainer.key).sign_transaction(tx).raw_transaction)
            w3.provider.make_request("evm_mine", [])
        finally:
            w3.provider.make_request("evm_setAutomine", [True])
        assert w3.eth.get_transaction_receipt(first["txHash"])["status"] == 0  # reverted
        await run_jobs(live)
        devchain.fund(refund_wallet.address, 100 * 10**6)  # the operator tops the wallet up
        await run_jobs(live, times=2)
        [refund] = refunds(live)
        assert refund["state"] == "broadcast" and refund["txHash"] == first["txHash"], refund
        if refund["txHash"] not in signed:
            signed[refund["txHash"]] = bytes(w3.eth.get_raw_transaction(refund["txHash"]))
        # The reorg drops the drain (and all after it); the dropped transactions come back to the pool.
        assert w3.provider.make_request("evm_revert", [snapshot])["result"] is True
        for raw in signed.values():
            w3.eth.send_raw_transaction(raw)
        w3.provider.make_request("anvil_mine", [hex(horizon)])
        await run_jobs(live, times=2)
        [refund] = refunds(live)
        assert refund["state"] == "refunded" and refund["txHash"] == first["txHash"], refund
        assert chain_view.usdc(payer.address) == payer_before + PRICE  # once
