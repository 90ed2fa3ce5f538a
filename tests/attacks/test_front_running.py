"""Front-running the relayer's settlement: anyone can copy a `transferWithAuthorization` from the
public mempool and get it mined first. The relayer's own transaction then reverts, but the money
did reach payTo: the buyer must get the seats, on the request path and through the reconciler.
Only an authorization the chain shows unused (or canceled by the payer) is a failure."""

from __future__ import annotations

import asyncio
import threading
from contextlib import contextmanager

import httpx
import pytest
from x402.http.clients import x402HttpxClient

from tests.attacks.conftest import (
    ATTACK_POOLS,
    ORDER,
    PRICE,
    attack_gateway_settings,
    available_seats,
    cancel_authorization,
    key_works,
    payment_status,
    receipt_status,
    rpc,
    run_background_pass,
    send_with_higher_tip,
    wait_for_pending,
)
from tests.fixtures.live import live_gateway
from tests.fixtures.x402 import challenge, payment_header, sign_authorization

pytestmark = pytest.mark.anyio


class Purchase(threading.Thread):
    """An agent buying with the official x402 client, in the background (its request waits for a
    block that the test mines)."""

    def __init__(self, chain, wallet, url: str) -> None:
        super().__init__()
        self.chain, self.wallet, self.url = chain, wallet, url
        self.response: httpx.Response | None = None

    def run(self) -> None:
        async def buy() -> None:
            client = self.chain.x402_client(self.wallet.key)
            async with x402HttpxClient(client, base_url=self.url, timeout=120) as http:
                self.response = await http.post("/api/agent/subscribe-pool", json=ORDER)

        asyncio.run(buy())


def front_run(chain, relayer: str, attacker) -> tuple[str, dict]:
    """The attack: copy the relayer's pending settlement from txpool_content, resend it from the
    attacker's account with a higher tip, then mine one block holding both."""
    copied = wait_for_pending(chain, relayer)
    attacker_tx = send_with_higher_tip(chain, attacker, copied)
    rpc(chain, "evm_mine")
    return attacker_tx, copied


@contextmanager
def manual_mining(chain):
    """Blocks are mined only when the test says so (evm_mine), as transactions wait in a mempool."""
    rpc(chain, "evm_setAutomine", [False])
    try:
        yield
    finally:
        rpc(chain, "evm_setAutomine", [True])


@pytest.mark.parametrize("confirmations", [1, 3])
def test_a_front_run_settlement_still_delivers_the_seats(tmp_path, sqlite_url, upstream, attack_chain, attack_view,
                                                         confirmations):
    chain = attack_chain
    buyer, attacker = attack_view.new_wallet(), attack_view.new_wallet(usdc_atomic=0)
    buyer_before, pay_to_before = attack_view.usdc(buyer.address), attack_view.usdc(chain.pay_to)
    with live_gateway(tmp_path, sqlite_url, upstream, pools=ATTACK_POOLS,
                      **attack_gateway_settings(chain, confirmations=confirmations)) as live:
        with manual_mining(chain):
            purchase = Purchase(chain, buyer, live.url)
            purchase.start()
            attacker_tx, copied = front_run(chain, chain.relayer_address, attacker)
            for _ in range(confirmations - 1):
                rpc(chain, "evm_mine")
            purchase.join(120)

        # The attacker's copy carried the transfer; the relayer's own transaction reverted.
        assert receipt_status(chain, attacker_tx) == 1
        assert receipt_status(chain, copied["hash"]) == 0
        assert attack_view.usdc(buyer.address) == buyer_before - PRICE
        assert attack_view.usdc(chain.pay_to) == pay_to_before + PRICE
        # ... and the buyer has what it paid for: a 201 with a working key.
        response = purchase.response
        assert response is not None and response.status_code == 201, response and response.text
        data = response.json()["data"]
        assert data["txHash"] == attacker_tx
        [sub] = data["subscriptions"]
        assert sub["status"] == "active" and key_works(live, sub["apiKey"]) == 200
        # The ledger names the transaction that really paid, so the reorg checks follow that one.
        status = payment_status(live, data["paymentId"])
        assert status["state"] == "delivered" and status["txHash"] == attacker_tx


def test_a_front_run_found_by_the_reconciler_delivers_the_seats(tmp_path, sqlite_url, upstream, attack_chain,
                                                                 attack_view):
    chain = attack_chain
    buyer, attacker = attack_view.new_wallet(), attack_view.new_wallet(usdc_atomic=0)
    # The request gives up waiting before the block is mined (as a gateway that restarted would).
    with live_gateway(tmp_path, sqlite_url, upstream, pools=ATTACK_POOLS,
                      **attack_gateway_settings(chain, settle_wait_s=0.5)) as live:
        with manual_mining(chain):
            purchase = Purchase(chain, buyer, live.url)
            purchase.start()
            purchase.join(120)
            assert purchase.response is not None and purchase.response.status_code == 202, purchase.response.text
            payment_id = purchase.response.json()["data"]["paymentId"]
            attacker_tx, copied = front_run(chain, chain.relayer_address, attacker)
        assert receipt_status(chain, copied["hash"]) == 0

        run_background_pass(live)

        status = payment_status(live, payment_id)
        assert status["state"] == "delivered" and status["txHash"] == attacker_tx, status
        assert available_seats(live) == 49  # the seat stays sold: it was paid


def test_an_authorization_the_payer_canceled_first_fails_and_delivers_nothing(
        tmp_path, sqlite_url, upstream, attack_chain, attack_view):
    chain = attack_chain
    payer = attack_view.new_wallet()
    with live_gateway(tmp_path, sqlite_url, upstream, pools=ATTACK_POOLS,
                      **attack_gateway_settings(chain, settle_wait_s=0.5)) as live:
        http = httpx.Client(base_url=live.url, timeout=60)
        accepted = challenge(http, ORDER)
        authorization, signature = sign_authorization(chain, payer.key, payer=payer.address, to=chain.pay_to,
                                                      value=PRICE)
        pay_to_before = attack_view.usdc(chain.pay_to)
        with manual_mining(chain):
            r = http.post("/api/agent/subscribe-pool", json=ORDER,
                          headers={"PAYMENT-SIGNATURE": payment_header(accepted, authorization, signature)})
            assert r.status_code == 202, r.text
            payment_id = r.json()["data"]["paymentId"]
            # The payer cancels its authorization with a higher tip than the relayer's settlement.
            relayer_tx = wait_for_pending(chain, chain.relayer_address)
            cancel_tx = cancel_authorization(chain, payer, authorization["nonce"],
                                             tip_wei=int(relayer_tx["maxPriorityFeePerGas"], 16) * 2 + 10**9)
            rpc(chain, "evm_mine")
        assert receipt_status(chain, cancel_tx) == 1 and receipt_status(chain, relayer_tx["hash"]) == 0

        run_background_pass(live)

        status = payment_status(live, payment_id)
        assert status["state"] == "failed" and status["failureReason"] == "authorization_canceled", status
        assert status["accountId"] is None  # nothing delivered to anyone
        assert attack_view.usdc(chain.pay_to) == pay_to_before and attack_view.usdc(payer.address) == 100 * 10**6
        assert available_seats(live) == 50
