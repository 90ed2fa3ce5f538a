"""Reorganised payments: a delivered purchase is checked again until its block is past the reorg
horizon. A transfer that is gone for good takes its seats, keys and credit with it at once (with a
ledger record, a metric and a log line); one that is mined again stays delivered."""

from __future__ import annotations

import logging

import httpx
import pytest
from x402.http.clients import x402HttpxClient

from agent_gateway.accounts.service import get_account
from agent_gateway.payments.reorgs import ReorgWatch
from tests.attacks.conftest import (
    ATTACK_POOLS,
    HORIZON_BLOCKS,
    ORDER,
    PRICE,
    available_seats,
    cancel_authorization,
    key_works,
    payment_status,
    receipt_status,
    revoked_count,
    rpc,
    run_background_pass,
)
from tests.e2e.test_x402 import claim_signature, transfer
from tests.fixtures.x402 import challenge, payment_header, sign_authorization

pytestmark = pytest.mark.anyio


def buy(live, chain, payer) -> tuple[dict, str]:
    """An x402 purchase paid with a hand-signed authorization: (the 201's data, the authorization nonce)."""
    with httpx.Client(base_url=live.url, timeout=60) as http:
        accepted = challenge(http, ORDER)
        authorization, signature = sign_authorization(chain, payer.key, payer=payer.address, to=chain.pay_to,
                                                      value=PRICE)
        r = http.post("/api/agent/subscribe-pool", json=ORDER,
                      headers={"PAYMENT-SIGNATURE": payment_header(accepted, authorization, signature)})
    assert r.status_code == 201, r.text
    return r.json()["data"], authorization["nonce"]


def reorg(chain, depth: int) -> None:
    """Replace the last `depth` blocks with empty ones (the transactions in them are dropped)."""
    rpc(chain, "anvil_reorg", [depth, []])


def mine(chain, blocks: int) -> None:
    rpc(chain, "anvil_mine", [hex(blocks)])


def test_a_reorganised_purchase_whose_authorization_is_then_canceled_loses_seats_and_keys_at_once(
        attack_gateway, attack_chain, attack_view, caplog):
    live, chain = attack_gateway, attack_chain
    payer = attack_view.new_wallet()
    bought, nonce = buy(live, chain, payer)
    api_key = bought["subscriptions"][0]["apiKey"]
    assert key_works(live, api_key) == 200 and available_seats(live) == 49
    reorg(chain, 1)
    assert attack_view.usdc(payer.address) == 100 * 10**6  # the transfer is gone; the money is back
    # The payer makes sure it never comes back.
    assert receipt_status(chain, cancel_authorization(chain, payer, nonce)) == 1
    revoked_before = revoked_count("authorization_canceled")

    with caplog.at_level(logging.WARNING, logger="agent_gateway"):
        run_background_pass(live)

    status = payment_status(live, bought["paymentId"])
    assert status["state"] == "revoked" and status["failureReason"] == "authorization_canceled", status
    assert key_works(live, api_key) == 403
    assert available_seats(live) == 50
    assert revoked_count("authorization_canceled") == revoked_before + 1
    assert any(bought["paymentId"] in r.getMessage() and "revoked" in r.getMessage() for r in caplog.records)


def test_a_reorganised_purchase_that_is_mined_again_stays_delivered(attack_gateway, attack_chain, attack_view):
    live, chain = attack_gateway, attack_chain
    payer = attack_view.new_wallet()
    pay_to_before = attack_view.usdc(chain.pay_to)
    bought, _ = buy(live, chain, payer)
    reorg(chain, 1)
    assert attack_view.usdc(chain.pay_to) == pay_to_before

    run_background_pass(live)  # the authorization is still valid: our signed settlement goes out again
    run_background_pass(live)  # ... and is found mined

    # Charged exactly once, and the buyer keeps what it paid for.
    assert attack_view.usdc(chain.pay_to) == pay_to_before + PRICE
    assert attack_view.usdc(payer.address) == 100 * 10**6 - PRICE
    status = payment_status(live, bought["paymentId"])
    assert status["state"] == "delivered", status
    assert key_works(live, bought["subscriptions"][0]["apiKey"]) == 200


def test_a_reorganised_tx_hash_claim_is_revoked_with_its_credit_once_the_transfer_is_gone_for_good(
        attack_gateway, attack_chain, attack_view):
    live, chain = attack_gateway, attack_chain
    wallet = attack_view.new_wallet()
    paid = transfer(chain, wallet, chain.pay_to, PRICE + 5_010_000)
    r = httpx.post(live.url + "/api/agent/subscribe-pool", timeout=30,
                   json={**ORDER, "txHash": paid, "signature": claim_signature(wallet.key, paid, live)})
    assert r.status_code == 201, r.text
    data = r.json()["data"]
    assert data["credited"] == "5.01"
    api_key = data["subscriptions"][0]["apiKey"]
    reorg(chain, 1)
    revoked_before = revoked_count("transfer_vanished")

    run_background_pass(live)
    # Within the horizon the transfer may still come back: nothing is taken yet.
    assert payment_status(live, data["paymentId"])["state"] == "delivered"
    assert key_works(live, api_key) == 200

    mine(chain, HORIZON_BLOCKS)
    run_background_pass(live)

    status = payment_status(live, data["paymentId"])
    assert status["state"] == "revoked" and status["failureReason"] == "transfer_vanished", status
    assert key_works(live, api_key) == 403 and available_seats(live) == 50
    account = live.server.call(get_account(live.services.db, data["accountId"]))
    assert account.balance_atomic == 0  # the 5.01 credit went with the transfer
    assert revoked_count("transfer_vanished") == revoked_before + 1


def test_a_payment_past_the_reorg_horizon_is_no_longer_rechecked(attack_gateway, attack_chain, attack_view):
    live, chain = attack_gateway, attack_chain
    old_buyer, new_buyer = attack_view.new_wallet(), attack_view.new_wallet()
    old, _ = buy(live, chain, old_buyer)
    mine(chain, HORIZON_BLOCKS)
    run_background_pass(live)  # the old purchase is past the horizon now
    new, new_nonce = buy(live, chain, new_buyer)
    # A reorganisation deeper than the horizon (which the horizon says does not happen) takes both.
    reorg(chain, HORIZON_BLOCKS + 2)
    assert attack_view.usdc(old_buyer.address) == attack_view.usdc(new_buyer.address) == 100 * 10**6
    assert receipt_status(chain, cancel_authorization(chain, new_buyer, new_nonce)) == 1

    run_background_pass(live)

    assert payment_status(live, new["paymentId"])["state"] == "revoked"
    assert payment_status(live, old["paymentId"])["state"] == "delivered"
    assert key_works(live, old["subscriptions"][0]["apiKey"]) == 200


def test_a_reorganised_purchase_whose_authorization_expires_unused_is_revoked(
        tmp_path, sqlite_url, upstream, attack_view):
    from agent_gateway.testing.devchain import start_devchain
    from tests.attacks.conftest import ATTACK_POOLS, attack_gateway_settings
    from tests.fixtures.live import live_gateway
    from tests.fixtures.x402 import ChainView

    # A chain of its own: its clock is moved past the authorization's validBefore.
    with start_devchain(agents=0) as chain, live_gateway(tmp_path, sqlite_url, upstream, pools=ATTACK_POOLS,
                                                          **attack_gateway_settings(chain)) as live:
        payer = ChainView(chain).new_wallet()
        bought, _ = buy(live, chain, payer)
        reorg(chain, 1)
        rpc(chain, "evm_increaseTime", [3600])
        mine(chain, 1)

        run_background_pass(live)

        status = payment_status(live, bought["paymentId"])
        assert status["state"] == "revoked" and status["failureReason"] == "authorization_expired_unused", status
        assert key_works(live, bought["subscriptions"][0]["apiKey"]) == 403
        assert ChainView(chain).usdc(payer.address) == 100 * 10**6  # and it can never be charged now


def test_a_reorganised_tx_hash_claim_whose_nonce_is_reused_is_revoked_at_once(attack_gateway, attack_chain,
                                                                              attack_view):
    live, chain = attack_gateway, attack_chain
    wallet = attack_view.new_wallet()
    paid = transfer(chain, wallet, chain.pay_to, PRICE)
    r = httpx.post(live.url + "/api/agent/subscribe-pool", timeout=30,
                   json={**ORDER, "txHash": paid, "signature": claim_signature(wallet.key, paid, live)})
    assert r.status_code == 201, r.text
    data = r.json()["data"]
    reorg(chain, 1)
    # The sender spends the same account nonce on another transaction: the claimed one can never return.
    transfer(chain, wallet, wallet.address, 1)

    run_background_pass(live)

    status = payment_status(live, data["paymentId"])
    assert status["state"] == "revoked" and status["failureReason"] == "transfer_replaced", status
    assert key_works(live, data["subscriptions"][0]["apiKey"]) == 403


def test_with_more_payments_to_recheck_than_a_pass_takes_the_newest_still_gets_its_turn(
        tmp_path, database_url, upstream, attack_chain, attack_view):
    from tests.attacks.conftest import attack_gateway_settings
    from tests.fixtures.live import live_gateway

    chain = attack_chain
    # A busy deployment: five purchases inside the reorg horizon, a pass that takes two.
    with live_gateway(tmp_path, database_url, upstream, pools=ATTACK_POOLS,
                      **attack_gateway_settings(chain, reorg_horizon_blocks=1000)) as live:
        watch = ReorgWatch(live.services.payments, batch_size=2)
        payers = [attack_view.new_wallet() for _ in range(5)]
        bought = [buy(live, chain, payer) for payer in payers]
        # The newest purchase is reorganised away and its payer makes sure it never comes back.
        reorg(chain, 1)
        assert receipt_status(chain, cancel_authorization(chain, payers[-1], bought[-1][1])) == 1
        newest = bought[-1][0]

        def one_pass() -> None:
            for revocation in live.server.call(watch.recheck_settled()):
                live.server.call(live.services.keys.end_revoked_keys(revocation.key_ids, "payment_revoked"))

        # The four older ones stay undecided (not yet past the horizon) on every pass; they must not
        # hold the newest back: within ceil(5 / 2) passes every payment has been re-checked.
        for _ in range(3):
            one_pass()

        status = payment_status(live, newest["paymentId"])
        assert status["state"] == "revoked" and status["failureReason"] == "authorization_canceled", status
        assert key_works(live, newest["subscriptions"][0]["apiKey"]) == 403
        for data, _ in bought[:-1]:
            assert payment_status(live, data["paymentId"])["state"] == "delivered"
            assert key_works(live, data["subscriptions"][0]["apiKey"]) == 200
        assert available_seats(live) == 46


def test_a_front_run_purchase_remined_below_the_head_seen_at_payment_is_found_and_stays_delivered(
        tmp_path, sqlite_url, upstream, attack_chain, attack_view):
    from tests.attacks.conftest import attack_gateway_settings, send_with_higher_tip, wait_for_pending
    from tests.attacks.test_front_running import manual_mining
    from tests.fixtures.live import live_gateway

    chain = attack_chain
    buyer, attacker = attack_view.new_wallet(), attack_view.new_wallet(usdc_atomic=0)
    with live_gateway(tmp_path, sqlite_url, upstream, pools=ATTACK_POOLS,
                      **attack_gateway_settings(chain, settle_wait_s=0.5)) as live, \
            httpx.Client(base_url=live.url, timeout=60) as http:
        accepted = challenge(http, ORDER)
        authorization, signature = sign_authorization(chain, buyer.key, payer=buyer.address, to=chain.pay_to,
                                                      value=PRICE)
        mine(chain, HORIZON_BLOCKS)  # empty blocks: what the reorganisation below takes holds nothing else
        with manual_mining(chain):
            r = http.post("/api/agent/subscribe-pool", json=ORDER,
                          headers={"PAYMENT-SIGNATURE": payment_header(accepted, authorization, signature)})
            assert r.status_code == 202, r.text
            payment_id = r.json()["data"]["paymentId"]
            ours = wait_for_pending(chain, chain.relayer_address)
            copy = send_with_higher_tip(chain, attacker, ours)
            rpc(chain, "evm_mine")
        assert receipt_status(chain, copy) == 1 and receipt_status(chain, ours["hash"]) == 0
        run_background_pass(live)
        assert payment_status(live, payment_id)["txHash"] == copy  # delivered, carried by the copy

        # A new branch forks below the head the gateway read before settling and drops both
        # transactions; the re-check sends our settlement again, and it is mined lower than before.
        rpc(chain, "anvil_rollback", [HORIZON_BLOCKS])
        for _ in range(3):
            run_background_pass(live)

        status = payment_status(live, payment_id)
        assert status["state"] == "delivered" and status["txHash"] == ours["hash"], status
        assert attack_view.usdc(buyer.address) == 100 * 10**6 - PRICE  # charged once
