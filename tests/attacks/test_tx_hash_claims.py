"""The tx-hash flow (the buyer transfers USDC itself, then claims the transaction): an overpayment
is credited, never kept silently; a claim names this chain and this deployment, so it cannot be
replayed at another gateway; only recent transfers can be claimed; and a claim the gateway stopped
working on halfway (its process died) is finished by the reconciler, never failed as "unsent":
its money was on-chain before the claim was recorded."""

from __future__ import annotations

import shutil

import httpx
import pytest

from agent_gateway.accounts.service import get_account
from agent_gateway.catalog.pricing import make_order
from agent_gateway.payments import ledger
from agent_gateway.payments.ledger import Claim
from tests.attacks.conftest import (
    ATTACK_POOLS,
    ORDER,
    PRICE,
    attack_gateway_settings,
    available_seats,
    payment_status,
    rpc,
    run_background_pass,
)
from tests.e2e.test_x402 import claim_signature, transfer
from tests.e2e.test_x402_recovery import sign_in
from tests.fixtures.live import live_gateway

pytestmark = pytest.mark.anyio


def claim(live, body: dict) -> httpx.Response:
    return httpx.post(live.url + "/api/agent/subscribe-pool", json={**ORDER, **body}, timeout=30)


def test_an_overpaid_transfer_delivers_the_seat_and_credits_the_excess(attack_gateway, attack_chain, attack_view):
    live, chain = attack_gateway, attack_chain
    wallet = attack_view.new_wallet()
    paid = transfer(chain, wallet, chain.pay_to, 100 * 10**6)

    r = claim(live, {"txHash": paid, "signature": claim_signature(wallet.key, paid, live)})

    assert r.status_code == 201, r.text
    data = r.json()["data"]
    assert data["subscriptions"][0]["apiKey"].startswith("sk_")
    assert data["credited"] == "80.01" and data["creditedAtomic"] == str(100 * 10**6 - PRICE)
    assert "80.01" in data["message"]
    account = live.server.call(get_account(live.services.db, data["accountId"]))
    assert account.balance_atomic == 100 * 10**6 - PRICE


def test_a_claim_signed_for_another_chain_or_another_deployment_is_refused(
        tmp_path, sqlite_url, sqlite_template, upstream, attack_chain, attack_view):
    chain = attack_chain
    wallet = attack_view.new_wallet()
    paid = transfer(chain, wallet, chain.pay_to, PRICE)
    # Two deployments that (against the operator rules) share one payTo, each with its own database.
    (tmp_path / "b").mkdir()
    shutil.copyfile(sqlite_template, tmp_path / "b" / "b.db")
    with live_gateway(tmp_path, sqlite_url, upstream, pools=ATTACK_POOLS,
                      **attack_gateway_settings(chain, public_url="https://a.gateway.example")) as a, \
         live_gateway(tmp_path / "b", f"sqlite:///{tmp_path / 'b' / 'b.db'}", upstream, pools=ATTACK_POOLS,
                      **attack_gateway_settings(chain, public_url="https://b.gateway.example")) as b:
        for_a = claim_signature(wallet.key, paid, a)
        assert for_a != claim_signature(wallet.key, paid, b)
        for_another_chain = claim_signature(wallet.key, paid, a, chain_id=8453)
        r = claim(a, {"txHash": paid, "signature": for_another_chain})
        assert r.status_code == 402 and r.json()["error"]["code"] == "invalid_signature", r.text
        assert "on chain 31337 at a.gateway.example" in r.json()["error"]["message"]
        # Whoever saw the claim made for A cannot replay it at B.
        r = claim(b, {"txHash": paid, "signature": for_a})
        assert r.status_code == 402 and r.json()["error"]["code"] == "invalid_signature", r.text
        r = claim(a, {"txHash": paid, "signature": for_a})
        assert r.status_code == 201, r.text


def test_a_transfer_older_than_the_claim_limit_is_refused(tmp_path, sqlite_url, upstream, attack_chain, attack_view):
    chain = attack_chain
    wallet = attack_view.new_wallet()
    with live_gateway(tmp_path, sqlite_url, upstream, pools=ATTACK_POOLS,
                      **attack_gateway_settings(chain, tx_claim_max_age_s=60)) as live:
        old = transfer(chain, wallet, chain.pay_to, PRICE)
        rpc(chain, "evm_increaseTime", [120])  # two minutes pass on the chain
        rpc(chain, "evm_mine")
        r = claim(live, {"txHash": old, "signature": claim_signature(wallet.key, old, live)})
        assert r.status_code == 402 and r.json()["error"]["code"] == "transfer_too_old", r.text
        # A recent transfer is still claimed.
        fresh = transfer(chain, wallet, chain.pay_to, PRICE)
        r = claim(live, {"txHash": fresh, "signature": claim_signature(wallet.key, fresh, live)})
        assert r.status_code == 201, r.text


def interrupted_claim(live, chain, wallet, tx_hash: str, *, seats_reserved: bool) -> str:
    """What a gateway that died inside claim_tx_hash leaves behind, made with the ledger's own steps:
    the checked claim recorded (`verified`), and its seats reserved too if `seats_reserved`. The
    death comes before the claim is confirmed, so the request never answered."""
    w3 = chain.web3()
    tx, receipt = w3.eth.get_transaction(tx_hash), w3.eth.get_transaction_receipt(tx_hash)
    services = live.services
    order = make_order(services.catalog, ORDER["pool"], ORDER["blocks"], ORDER["quantity"], "month")

    async def record() -> str:
        row = await ledger.record_received(
            services.db, services.clock,
            Claim(method="tx-hash", network=services.payments.network, payer=wallet.address, amount_atomic=PRICE,
                  tx_hash=tx_hash, block_number=receipt["blockNumber"], sender_nonce=tx["nonce"]),
            order, account_id=None, key_name="agent", state="verified")
        if seats_reserved:
            await ledger.reserve(services.db, services.clock, services.catalog, row)
        return row.id

    return live.server.call(record())


def test_a_claim_interrupted_after_its_seats_were_reserved_is_delivered_by_the_reconciler(
        tmp_path, database_url, upstream, attack_chain, attack_view):
    chain = attack_chain
    wallet = attack_view.new_wallet()
    with live_gateway(tmp_path, database_url, upstream, pools=ATTACK_POOLS, **attack_gateway_settings(chain)) as live:
        paid = transfer(chain, wallet, chain.pay_to, PRICE)
        payment_id = interrupted_claim(live, chain, wallet, paid, seats_reserved=True)
        assert payment_status(live, payment_id)["state"] == "reserved" and available_seats(live) == 49

        run_background_pass(live)

        status = payment_status(live, payment_id)
        assert status["state"] == "delivered", status
        assert available_seats(live) == 49  # the reserved seat became the buyer's, no second one
        # The buyer's answer was lost: the paying wallet signs in and finds its seat.
        mk = sign_in(live.url, wallet)
        subs = httpx.get(live.url + "/api/subscriptions", headers={"Authorization": f"Bearer {mk}"},
                         timeout=30).json()["data"]
        assert [(s["paymentId"], s["status"]) for s in subs] == [(payment_id, "active")]
        # The hash stays claimed: no second delivery for it.
        r = claim(live, {"txHash": paid, "signature": claim_signature(wallet.key, paid, live)})
        assert r.status_code == 402 and r.json()["error"]["code"] == "payment_already_used", r.text


def test_a_claim_interrupted_before_its_seats_were_reserved_is_credited_if_they_sold_out_meanwhile(
        tmp_path, database_url, upstream, attack_chain, attack_view):
    chain = attack_chain
    wallet, rival = attack_view.new_wallet(), attack_view.new_wallet()
    one_seat = ATTACK_POOLS.replace("seats = 50", "seats = 1")
    with live_gateway(tmp_path, database_url, upstream, pools=one_seat, **attack_gateway_settings(chain)) as live:
        paid = transfer(chain, wallet, chain.pay_to, PRICE)
        payment_id = interrupted_claim(live, chain, wallet, paid, seats_reserved=False)
        # The last seat goes to someone else while the interrupted claim waits.
        rival_paid = transfer(chain, rival, chain.pay_to, PRICE)
        r = claim(live, {"txHash": rival_paid, "signature": claim_signature(rival.key, rival_paid, live)})
        assert r.status_code == 201, r.text

        run_background_pass(live)

        status = payment_status(live, payment_id)
        assert status["state"] == "credited" and status["failureReason"] == "sold_out_after_payment", status
        account = live.server.call(get_account(live.services.db, status["accountId"]))
        assert account.balance_atomic == PRICE and account.wallet_address == wallet.address.lower()


def test_an_interrupted_claim_whose_transfer_is_gone_for_good_fails_saying_so(
        tmp_path, database_url, upstream, attack_chain, attack_view):
    chain = attack_chain
    wallet = attack_view.new_wallet()
    with live_gateway(tmp_path, database_url, upstream, pools=ATTACK_POOLS, **attack_gateway_settings(chain)) as live:
        paid = transfer(chain, wallet, chain.pay_to, PRICE)
        payment_id = interrupted_claim(live, chain, wallet, paid, seats_reserved=True)
        rpc(chain, "anvil_reorg", [1, []])  # the transfer is reorganised away ...
        transfer(chain, wallet, wallet.address, 1)  # ... and its sender nonce spent on another transaction

        run_background_pass(live)

        status = payment_status(live, payment_id)
        assert status["state"] == "failed" and status["failureReason"] == "transfer_replaced", status
        assert available_seats(live) == 50
