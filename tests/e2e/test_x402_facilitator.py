"""Facilitator mode on a real anvil chain: the gateway verifies and settles through a real x402
facilitator (the SDK's own, over HTTP), holds no relayer key, and still delivers only what the
chain shows paid."""

from __future__ import annotations

import base64
import json
import shutil
import signal
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import httpx
import openai
import pytest
from x402.http.clients import x402HttpxClient

from agent_gateway.lifespan import build_services, run_services
from agent_gateway.payments.facilitator import FacilitatorUnavailable
from agent_gateway.payments.service import FacilitatorMismatch
from agent_gateway.settings import Settings
from agent_gateway.testing.facilitator import TestFacilitator
from agent_gateway.testing.processes import free_port, start_gateway
from tests.attacks.conftest import wait_for_pending
from tests.e2e.test_x402 import ORDER, PRICE, buy_in_background, official_client
from tests.e2e.test_x402_recovery import _payment_state, sign_in
from tests.fixtures.facilitator import AUTH_HEADER, facilitator_env, facilitator_settings
from tests.fixtures.x402 import X402_POOLS

pytestmark = pytest.mark.anyio


def nonce_of(devchain, address: str) -> int:
    return devchain.web3().eth.get_transaction_count(address)


async def test_the_official_client_buys_through_the_facilitator(facilitator_gateway, facilitator, devchain,
                                                                chain_view):
    live = facilitator_gateway
    agent = chain_view.new_wallet()
    pay_to_before = chain_view.usdc(devchain.pay_to)
    relayer_before, facilitator_before = chain_view.relayer_nonce(), nonce_of(devchain, facilitator.address)
    async with x402HttpxClient(official_client(devchain, agent), base_url=live.url, timeout=60) as http:
        r = await http.post("/api/agent/subscribe-pool", json={**ORDER, "quantity": 2})
    assert r.status_code == 201, r.text
    receipt = json.loads(base64.b64decode(r.headers["PAYMENT-RESPONSE"]))
    data = r.json()["data"]
    assert receipt["success"] is True and receipt["transaction"] == data["txHash"]
    # The facilitator's own transaction carried it: sent from its signer, none from the relayer.
    tx = devchain.web3().eth.get_transaction(data["txHash"])
    assert tx["from"] == facilitator.address
    assert nonce_of(devchain, facilitator.address) == facilitator_before + 1
    assert chain_view.relayer_nonce() == relayer_before
    assert facilitator.count("/verify") == 1 and facilitator.count("/settle") == 1
    assert chain_view.usdc(agent.address) == 100 * 10**6 - 2 * PRICE
    assert chain_view.usdc(devchain.pay_to) == pay_to_before + 2 * PRICE
    for sub in data["subscriptions"]:
        with openai.OpenAI(base_url=live.url + "/v1", api_key=sub["apiKey"], max_retries=0) as client:
            reply = client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content
    status = httpx.get(f"{live.url}/api/agent/payments/{data['paymentId']}").json()["data"]
    assert status["state"] == "delivered"


def _settings(tmp_path: Path, sqlite_url: str, devchain, facilitator: TestFacilitator, **overrides) -> Settings:
    pools = tmp_path / "pools.toml"
    pools.write_text(X402_POOLS.format(upstream="http://127.0.0.1:9/v1"))
    values = {**facilitator_settings(devchain, facilitator), **overrides}
    return Settings(_env_file=None, database_url=sqlite_url, pools_file=pools, auto_migrate=False, **values)


async def test_a_facilitator_that_does_not_settle_our_network_stops_the_start(tmp_path, sqlite_url, devchain):
    with TestFacilitator(devchain.rpc_url, devchain.facilitator_key, ["eip155:8453"],
                         auth_header=AUTH_HEADER) as base_only:
        services = build_services(_settings(tmp_path, sqlite_url, devchain, base_only))
        with pytest.raises(FacilitatorMismatch) as refused:
            async with run_services(services):
                pytest.fail("the gateway started with a facilitator that cannot settle on its network")
    message = str(refused.value)
    assert "AGW_FACILITATOR_URL" in message and devchain.network in message and "eip155:8453" in message


async def test_a_facilitator_that_refuses_our_auth_header_stops_the_start(tmp_path, sqlite_url, devchain, facilitator):
    services = build_services(_settings(tmp_path, sqlite_url, devchain, facilitator,
                                        facilitator_auth_header="Authorization: Bearer wrong"))
    with pytest.raises(FacilitatorUnavailable) as refused:
        async with run_services(services):
            pytest.fail("the gateway started with a facilitator that refuses it")
    assert "401" in refused.value.message and "wrong" not in refused.value.message
    assert facilitator.count("/supported") == 1


async def test_the_auth_header_reaches_the_facilitator_and_nothing_else_is_needed(tmp_path, sqlite_url, devchain,
                                                                                  facilitator):
    services = build_services(_settings(tmp_path, sqlite_url, devchain, facilitator))
    assert services.settings.relayer_key is None and services.payments.chain is not None
    async with run_services(services):
        assert facilitator.count("/supported") == 1


async def test_a_gateway_killed_while_settle_is_in_flight_delivers_after_restart(
        tmp_path, upstream, devchain, chain_view, sqlite_template, facilitator):
    db = tmp_path / "crash.db"
    shutil.copyfile(sqlite_template, db)
    pools = tmp_path / "pools.toml"
    pools.write_text(X402_POOLS.format(upstream=upstream.url))
    env = {**facilitator_env(devchain, facilitator), "AGW_DATABASE_URL": f"sqlite:///{db}",
           "AGW_POOLS_FILE": str(pools), "AGW_SETTLE_WAIT_S": "120", "AGW_RECONCILE_AFTER_S": "5",
           "AGW_JOB_INTERVAL_S": "0.2", "AGW_AUTO_MIGRATE": "false", "AGW_LOG_LEVEL": "INFO"}
    port, log = free_port(), tmp_path / "gateway.log"
    url = f"http://127.0.0.1:{port}"
    wallet = chain_view.new_wallet()
    pay_to_before, facilitator_before = chain_view.usdc(devchain.pay_to), nonce_of(devchain, facilitator.address)
    w3 = devchain.web3()
    gateway, _ = start_gateway(env, port=port, log=log)
    w3.provider.make_request("evm_setAutomine", [False])
    try:
        buyer, outcome = buy_in_background(devchain, wallet, url)
        # The facilitator's transaction waits in the pool: /settle is in flight, no hash in the ledger.
        wait_for_pending(devchain, facilitator.address)
        payment_id, state = _payment_state(db) or (None, None)
        assert state == "submitted", log.read_text()
        assert stored_settlement(db, payment_id) == (None, None)
        gateway.send_signal(signal.SIGKILL)
        gateway.wait(10)
        buyer.join(30)
        assert "response" not in outcome  # the buyer never got its 201
        w3.provider.make_request("evm_mine", [])
    finally:
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait(10)
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
        [sub] = httpx.get(f"{url}/api/subscriptions", headers={"Authorization": f"Bearer {mk}"}).json()["data"]
        assert sub["status"] == "active" and sub["paymentId"] == payment_id
        # Charged once, sent once: by the facilitator, never again by anyone.
        assert chain_view.usdc(devchain.pay_to) == pay_to_before + PRICE
        assert nonce_of(devchain, facilitator.address) == facilitator_before + 1
        assert facilitator.count("/settle") == 1
    finally:
        gateway.terminate()
        gateway.wait(10)



def stored_settlement(db: Path, payment_id: str) -> tuple[str | None, str | None]:
    """(tx_hash, raw_tx) of a payment, read straight from the ledger."""
    with closing(sqlite3.connect(db)) as conn:
        return conn.execute("SELECT tx_hash, raw_tx FROM payments WHERE id = ?", (payment_id,)).fetchone()


async def test_serve_refuses_to_start_naming_the_network_the_facilitator_lacks(tmp_path, devchain, sqlite_template):
    db = tmp_path / "refused.db"
    shutil.copyfile(sqlite_template, db)
    pools = tmp_path / "pools.toml"
    pools.write_text(X402_POOLS.format(upstream="http://127.0.0.1:9/v1"))
    log = tmp_path / "gateway.log"
    with TestFacilitator(devchain.rpc_url, devchain.facilitator_key, ["eip155:84532"],
                         auth_header=AUTH_HEADER) as sepolia_only:
        env = {**facilitator_env(devchain, sepolia_only), "AGW_DATABASE_URL": f"sqlite:///{db}",
               "AGW_POOLS_FILE": str(pools), "AGW_AUTO_MIGRATE": "false"}
        with pytest.raises(RuntimeError, match="gateway exited"):
            start_gateway(env, log=log)
    said = log.read_text()
    assert "not starting" in said and "does not support exact payments on eip155:31337" in said
    assert "eip155:84532" in said and "AGW_FACILITATOR_URL" in said
