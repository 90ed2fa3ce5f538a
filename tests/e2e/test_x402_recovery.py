"""Lost answers never lose purchases: wallet sign-in, renewal, and a gateway killed between the
broadcast of a settlement and the delivery of the seats."""

from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path

import httpx
import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from x402.http.clients import x402HttpxClient

from agent_gateway.testing.processes import free_port, start_gateway
from tests.e2e.test_x402 import ORDER, PRICE, buy_in_background, official_client
from tests.fixtures.x402 import X402_POOLS, Wallet

pytestmark = pytest.mark.anyio


def sign_in(url: str, wallet: Wallet) -> str:
    with httpx.Client(base_url=url, timeout=30) as http:
        challenge = http.post("/api/agent/auth/challenge", json={"address": wallet.address}).json()["data"]
        signature = Account.sign_message(encode_defunct(text=challenge["message"]), wallet.key).signature.hex()
        r = http.post("/api/agent/auth/sign-in", json={"challengeId": challenge["challengeId"],
                                                       "signature": "0x" + signature.removeprefix("0x")})
        assert r.status_code == 201, r.text
        return r.json()["data"]["managementKey"]


async def test_wallet_sign_in_gives_a_new_management_key_once(x402_gateway, devchain, chain_view):
    live = x402_gateway
    wallet, stranger = chain_view.new_wallet(), chain_view.new_wallet()
    async with x402HttpxClient(official_client(devchain, wallet), base_url=live.url, timeout=60) as http:
        bought = (await http.post("/api/agent/subscribe-pool", json=ORDER)).json()["data"]
    mk = sign_in(live.url, wallet)
    assert mk != bought["managementKey"]
    subs = httpx.get(live.url + "/api/subscriptions", headers={"Authorization": f"Bearer {mk}"}).json()["data"]
    assert [s["id"] for s in subs] == [bought["subscriptions"][0]["id"]]
    with httpx.Client(base_url=live.url) as http:
        challenge = http.post("/api/agent/auth/challenge", json={"address": wallet.address}).json()["data"]
        forged = Account.sign_message(encode_defunct(text=challenge["message"]), stranger.key).signature.hex()
        r = http.post("/api/agent/auth/sign-in", json={"challengeId": challenge["challengeId"], "signature": "0x" + forged.removeprefix("0x")})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_signature"
        good = Account.sign_message(encode_defunct(text=challenge["message"]), wallet.key).signature.hex()
        body = {"challengeId": challenge["challengeId"], "signature": "0x" + good.removeprefix("0x")}
        assert http.post("/api/agent/auth/sign-in", json=body).status_code == 201
        r = http.post("/api/agent/auth/sign-in", json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "challenge_expired"
        # A wallet that never bought has no account to sign in to.
        challenge = http.post("/api/agent/auth/challenge", json={"address": stranger.address}).json()["data"]
        sig = Account.sign_message(encode_defunct(text=challenge["message"]), stranger.key).signature.hex()
        r = http.post("/api/agent/auth/sign-in", json={"challengeId": challenge["challengeId"], "signature": "0x" + sig.removeprefix("0x")})
        assert r.status_code == 404 and r.json()["error"]["code"] == "account_not_found"


async def test_paying_again_renews_a_subscription(x402_gateway, devchain, chain_view):
    live = x402_gateway
    wallet = chain_view.new_wallet()
    pay_to_before = chain_view.usdc(devchain.pay_to)
    async with x402HttpxClient(official_client(devchain, wallet), base_url=live.url, timeout=60) as http:
        bought = (await http.post("/api/agent/subscribe-pool", json=ORDER)).json()["data"]["subscriptions"][0]
        r = await http.post("/api/agent/renew", json={"subscriptionId": bought["id"]})
    assert r.status_code == 200, r.text
    renewed = r.json()["data"]["subscriptions"][0]
    assert renewed["id"] == bought["id"]
    from datetime import datetime, timedelta

    before = datetime.fromisoformat(bought["currentPeriodEnd"].replace("Z", "+00:00"))
    after = datetime.fromisoformat(renewed["currentPeriodEnd"].replace("Z", "+00:00"))
    assert after - before == timedelta(days=30)
    assert chain_view.usdc(devchain.pay_to) == pay_to_before + 2 * PRICE


def _payment_state(db: Path) -> tuple[str, str] | None:
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT id, state FROM payments ORDER BY created_at DESC LIMIT 1").fetchone()
    return row


async def test_a_gateway_killed_after_broadcast_completes_the_purchase_after_restart(
        tmp_path, upstream, devchain, chain_view, sqlite_template):
    import shutil

    db = tmp_path / "crash.db"
    shutil.copyfile(sqlite_template, db)
    pools = tmp_path / "pools.toml"
    pools.write_text(X402_POOLS.format(upstream=upstream.url))
    env = {**devchain.env(), "AGW_DATABASE_URL": f"sqlite:///{db}", "AGW_POOLS_FILE": str(pools),
           # The reconciler leaves a payment alone for 5 s after its last step: with 0, the first
           # process's own pass could fail the purchase as "abandoned" while its request verifies it.
           "AGW_SETTLE_WAIT_S": "120", "AGW_RECONCILE_AFTER_S": "5", "AGW_JOB_INTERVAL_S": "0.2",
           "AGW_AUTO_MIGRATE": "false", "AGW_LOG_LEVEL": "INFO"}
    port, log = free_port(), tmp_path / "gateway.log"
    url = f"http://127.0.0.1:{port}"
    wallet = chain_view.new_wallet()
    pay_to_before, relayer_before = chain_view.usdc(devchain.pay_to), chain_view.relayer_nonce()
    w3 = devchain.web3()
    gateway, _ = start_gateway(env, port=port, log=log)
    w3.provider.make_request("evm_setAutomine", [False])
    try:
        buyer, outcome = buy_in_background(devchain, wallet, url)
        deadline = time.monotonic() + 30
        while (_payment_state(db) or (None, None))[1] != "broadcast":
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)  # polling the ledger for the broadcast state, bounded by the deadline
        payment_id = _payment_state(db)[0]
        gateway.send_signal(signal.SIGKILL)
        gateway.wait(10)
        buyer.join(30)
        assert "response" not in outcome  # the buyer never got its 201
        w3.provider.make_request("evm_mine", [])
    finally:
        w3.provider.make_request("evm_setAutomine", [True])
    gateway, _ = start_gateway(env, port=port, log=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            state = httpx.get(f"{url}/api/agent/payments/{payment_id}").json()["data"]["state"]
            if state == "delivered":
                break
            assert state != "failed" and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)  # waiting for the reconciler, bounded by the deadline
        mk = sign_in(url, wallet)
        headers = {"Authorization": f"Bearer {mk}"}
        [sub] = httpx.get(f"{url}/api/subscriptions", headers=headers).json()["data"]
        assert sub["status"] == "active" and sub["paymentId"] == payment_id
        r = httpx.post(f"{url}/api/keys/subscription", json={"name": "recovered", "subscriptionId": sub["id"]},
                       headers=headers)
        assert r.status_code == 201
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {r.json()['data']['apiKey']}"}).status_code == 200
        # Charged once, broadcast once.
        assert chain_view.usdc(devchain.pay_to) == pay_to_before + PRICE
        assert chain_view.relayer_nonce() == relayer_before + 1
    finally:
        gateway.terminate()
        gateway.wait(10)
