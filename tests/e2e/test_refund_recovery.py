"""A gateway killed in the middle of an on-chain refund (the transfer signed and stored, sent but not
mined) finishes it exactly once after a restart: the payer gets the amount once, and the refund
wallet's nonce moves by one. The node even forgets the transaction meanwhile, so the restarted
gateway must send the very bytes it stored (a second, different transaction would be a double
refund)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from x402.http.clients import x402HttpxClient

from agent_gateway.testing.processes import free_port, start_gateway
from tests.fixtures.x402 import X402_POOLS

pytestmark = pytest.mark.anyio
ADMIN_TOKEN = "adm-" + "q5" * 20
PRICE = 10_000_000  # pool alpha: 10.00 USDC


def _row(db: Path, query: str, *args: object) -> tuple | None:
    with sqlite3.connect(db) as conn:
        return conn.execute(query, args).fetchone()


def _wait(condition, what: str, log: Path, timeout_s: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: {log.read_text()[-4000:]}"
        time.sleep(0.05)  # polling the ledger for the condition, bounded by the deadline


async def test_a_gateway_killed_mid_refund_finishes_it_exactly_once_after_restart(
        tmp_path, upstream, devchain, chain_view, sqlite_template):
    db = tmp_path / "refund.db"
    shutil.copyfile(sqlite_template, db)
    pools = tmp_path / "pools.toml"
    pools.write_text(X402_POOLS.format(upstream=upstream.url))
    refund_wallet = chain_view.new_wallet(usdc_atomic=50 * 10**6, eth_wei=10**18)
    env = {**devchain.env(), "AGW_DATABASE_URL": f"sqlite:///{db}", "AGW_POOLS_FILE": str(pools),
           "AGW_ADMIN_TOKEN": ADMIN_TOKEN, "AGW_REFUND_PRIVATE_KEY": refund_wallet.key,
           "AGW_REORG_HORIZON_BLOCKS": "1", "AGW_JOB_INTERVAL_S": "0.2", "AGW_RECONCILE_AFTER_S": "5",
           "AGW_AUTO_MIGRATE": "false", "AGW_LOG_LEVEL": "INFO"}
    port, log = free_port(), tmp_path / "gateway.log"
    url = f"http://127.0.0.1:{port}"
    payer = chain_view.new_wallet()
    w3 = devchain.web3()
    gateway, _ = start_gateway(env, port=port, log=log)
    try:
        async with x402HttpxClient(devchain.x402_client(payer.key), base_url=url, timeout=60) as http:
            r = await http.post("/api/agent/subscribe-pool", json={"pool": "alpha", "blocks": ["day"], "quantity": 1})
        assert r.status_code == 201, r.text
        payment_id = r.json()["data"]["subscriptions"][0]["paymentId"]
        _wait(lambda: _row(db, "SELECT chain_final FROM payments WHERE id = ?", payment_id) == (1,),
              "the payment past the reorg horizon", log)
        payer_before = chain_view.usdc(payer.address)
        wallet_before = chain_view.usdc(refund_wallet.address)
        nonce_before = w3.eth.get_transaction_count(refund_wallet.address)

        w3.provider.make_request("evm_setAutomine", [False])
        # The operator's CLI, over HTTP: the transfer is signed, stored, then sent (and not mined).
        cli = subprocess.run([sys.executable, "-m", "agent_gateway", "admin", "--json", "refund", payment_id,
                              "--to", "chain", "--reason", "customer asked"], capture_output=True, text=True,
                             timeout=120, env={**os.environ, "AGW_ADMIN_URL": url, "AGW_ADMIN_TOKEN": ADMIN_TOKEN,
                                               "AGW_ADMIN_ACTOR": "ops"})
        assert cli.returncode == 0, cli.stderr
        answered = json.loads(cli.stdout)
        assert answered["state"] == "broadcast" and answered["payment"]["state"] == "refunded"
        stored = _row(db, "SELECT state, tx_hash, raw_tx, nonce FROM refunds WHERE id = ?", answered["id"])
        assert stored is not None and stored[0] == "broadcast" and stored[1] == answered["txHash"]
        assert stored[2].startswith("0x") and stored[3] == nonce_before
        gateway.send_signal(signal.SIGKILL)
        gateway.wait(10)
        # The node forgets it: only the stored bytes can bring it back.
        w3.provider.make_request("anvil_dropAllTransactions", [])
        assert w3.provider.make_request("eth_getTransactionByHash", [stored[1]])["result"] is None
    finally:
        w3.provider.make_request("evm_setAutomine", [True])
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait(10)
    assert chain_view.usdc(payer.address) == payer_before  # nothing moved while it was down

    gateway, _ = start_gateway(env, port=port, log=log)
    try:
        def refunded() -> bool:
            r = httpx.get(f"{url}/api/admin/refunds/{answered['id']}",
                          headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            return r.json()["data"]["state"] == "refunded"

        _wait(refunded, "the refund finished after the restart", log)
        refund = httpx.get(f"{url}/api/admin/refunds/{answered['id']}",
                           headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()["data"]
        assert refund["txHash"] == stored[1] and refund["nonce"] == nonce_before
        receipt = w3.eth.get_transaction_receipt(stored[1])
        assert receipt["status"] == 1
        # Once: the payer +amount, the refund wallet -amount and one nonce.
        assert chain_view.usdc(payer.address) == payer_before + PRICE
        assert chain_view.usdc(refund_wallet.address) == wallet_before - PRICE
        assert w3.eth.get_transaction_count(refund_wallet.address) == nonce_before + 1
    finally:
        gateway.terminate()
        gateway.wait(10)
