"""Several payments in one transaction: anyone can copy pending `transferWithAuthorization` calls
from the mempool and execute them, together with calls of its own, inside one transaction of a
contract it controls (a bundler). A transaction is therefore not the unit of payment: every x402
payment it carries is delivered once, and a tx-hash claim of that transaction counts only the
sender's own plain transfers, never an authorization's."""

from __future__ import annotations

import time

import httpx
import pytest
from web3 import Web3

from agent_gateway.testing.devchain import load_artifact, token_contract
from tests.attacks.conftest import (
    ATTACK_POOLS,
    ORDER,
    PRICE,
    attack_gateway_settings,
    available_seats,
    payment_status,
    receipt_status,
    rpc,
    run_background_pass,
)
from tests.attacks.test_front_running import manual_mining
from tests.e2e.test_x402 import claim_signature
from tests.fixtures.live import live_gateway
from tests.fixtures.x402 import challenge, payment_header, sign_authorization

pytestmark = pytest.mark.anyio

_AUTHORIZED_TRANSFER = (
    "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)")


def send(chain, wallet, tx: dict) -> str:
    w3 = chain.web3()
    tx = {"type": 2, "chainId": chain.chain_id, "value": 0, "maxPriorityFeePerGas": 10**9, "maxFeePerGas": 10**11,
          "nonce": w3.eth.get_transaction_count(wallet.address, "pending"), **tx}
    signed = w3.eth.account.sign_transaction(tx, wallet.key)
    return "0x" + bytes(w3.eth.send_raw_transaction(signed.raw_transaction)).hex()


def deploy_bundler(chain, owner):
    artifact = load_artifact("CallBatch")
    tx_hash = send(chain, owner, {"data": artifact["bytecode"], "gas": 1_000_000})
    address = chain.web3().eth.wait_for_transaction_receipt(tx_hash, timeout=30)["contractAddress"]
    return chain.web3().eth.contract(address=address, abi=artifact["abi"])


def pending_settlements(chain, count: int, deadline_s: float = 30) -> list[dict]:
    """The relayer's first `count` settlements waiting in the node's pool, in nonce order."""
    deadline = time.monotonic() + deadline_s
    while True:
        pending = rpc(chain, "txpool_content")["pending"]
        mine = {a.lower(): txs for a, txs in pending.items()}.get(chain.relayer_address.lower(), {})
        if len(mine) >= count:
            return [mine[n] for n in sorted(mine, key=int)][:count]
        assert time.monotonic() < deadline, f"{len(mine)} of {count} settlements pending"
        time.sleep(0.02)  # polling the node's pool, bounded by the deadline


def own_authorized_transfer(chain, wallet) -> bytes:
    """The calldata of `wallet`'s own EIP-3009 payment of the price to payTo."""
    authorization, signature = sign_authorization(chain, wallet.key, payer=wallet.address, to=chain.pay_to,
                                                  value=PRICE)
    raw = bytes.fromhex(signature[2:])
    token = token_contract(chain.web3(), chain.token)
    return bytes.fromhex(token.encode_abi(_AUTHORIZED_TRANSFER, args=[
        wallet.address, chain.pay_to, PRICE, int(authorization["validAfter"]), int(authorization["validBefore"]),
        bytes.fromhex(authorization["nonce"][2:]), raw[64] if raw[64] >= 27 else raw[64] + 27, raw[:32], raw[32:64],
    ])[2:])


def bundle(chain, griefer, bundler, calls: list[bytes], outbid: list[dict]) -> str:
    """One transaction of the griefer's bundler making `calls` to the token, tipping more than every
    settlement in `outbid`, mined in the next block (with those settlements after it)."""
    top_tip = max(int(s["maxPriorityFeePerGas"], 16) for s in outbid)
    top_fee = max(int(s["maxFeePerGas"], 16) for s in outbid)
    tip = 2 * top_tip + 10**9
    data = bundler.encode_abi("run", args=[chain.token, calls])
    tx_hash = send(chain, griefer, {"to": bundler.address, "data": data, "gas": 600_000,
                                    "maxPriorityFeePerGas": tip, "maxFeePerGas": 2 * top_fee + tip})
    rpc(chain, "evm_mine")
    return tx_hash


def pay_pending(http: httpx.Client, chain, buyer) -> str:
    """An x402 purchase whose settlement is left waiting in the mempool: the 202's payment id."""
    accepted = challenge(http, ORDER)
    authorization, signature = sign_authorization(chain, buyer.key, payer=buyer.address, to=chain.pay_to,
                                                  value=PRICE)
    r = http.post("/api/agent/subscribe-pool", json=ORDER,
                  headers={"PAYMENT-SIGNATURE": payment_header(accepted, authorization, signature)})
    assert r.status_code == 202, r.text
    return r.json()["data"]["paymentId"]


def claim(live, wallet, tx_hash: str) -> httpx.Response:
    return httpx.post(live.url + "/api/agent/subscribe-pool", timeout=30,
                      json={**ORDER, "txHash": tx_hash, "signature": claim_signature(wallet.key, tx_hash, live)})


def delivered_once(live, payment_id: str) -> dict:
    status = payment_status(live, payment_id)
    assert status["state"] == "delivered", status
    return status


def subscriptions_of(live, account_id: str) -> int:
    from sqlalchemy import func, select

    from agent_gateway.db.models import Subscription

    async def count() -> int:
        async with live.services.db.transaction() as session:
            return await session.scalar(select(func.count()).select_from(Subscription)
                                        .where(Subscription.account_id == account_id))

    return live.server.call(count())


def test_a_griefer_bundling_a_pending_settlement_with_its_own_authorization_cannot_take_the_buyers_seat(
        tmp_path, database_url, upstream, attack_chain, attack_view):
    chain = attack_chain
    buyer, griefer = attack_view.new_wallet(), attack_view.new_wallet()
    bundler = deploy_bundler(chain, griefer)
    pay_to_before = attack_view.usdc(chain.pay_to)
    with live_gateway(tmp_path, database_url, upstream, pools=ATTACK_POOLS,
                      **attack_gateway_settings(chain, settle_wait_s=0.5)) as live, \
            httpx.Client(base_url=live.url, timeout=60) as http:
        with manual_mining(chain):
            payment_id = pay_pending(http, chain, buyer)
            [settlement] = pending_settlements(chain, 1)
            carrier = bundle(chain, griefer, bundler,
                             [bytes.fromhex(settlement["input"][2:]), own_authorized_transfer(chain, griefer)],
                             outbid=[settlement])
        assert receipt_status(chain, carrier) == 1 and receipt_status(chain, settlement["hash"]) == 0
        assert attack_view.usdc(chain.pay_to) == pay_to_before + 2 * PRICE

        # The griefer claims the bundle by tx hash: its Transfer is an authorization's, which only an
        # x402 payment of that authorization may count.
        r = claim(live, griefer, carrier)
        assert r.status_code == 402 and r.json()["error"]["code"] == "transfer_mismatch", r.text

        run_background_pass(live)
        run_background_pass(live)

        status = delivered_once(live, payment_id)
        assert status["txHash"] == carrier
        assert subscriptions_of(live, status["accountId"]) == 1
        assert available_seats(live) == 49


def test_two_buyers_settlements_bundled_into_one_transaction_are_each_delivered_once(
        tmp_path, database_url, upstream, attack_chain, attack_view):
    chain = attack_chain
    first, second, griefer = attack_view.new_wallet(), attack_view.new_wallet(), attack_view.new_wallet()
    bundler = deploy_bundler(chain, griefer)
    with live_gateway(tmp_path, database_url, upstream, pools=ATTACK_POOLS,
                      **attack_gateway_settings(chain, settle_wait_s=0.5)) as live, \
            httpx.Client(base_url=live.url, timeout=60) as http:
        with manual_mining(chain):
            payment_ids = [pay_pending(http, chain, first), pay_pending(http, chain, second)]
            settlements = pending_settlements(chain, 2)
            carrier = bundle(chain, griefer, bundler, [bytes.fromhex(s["input"][2:]) for s in settlements],
                             outbid=settlements)
        assert receipt_status(chain, carrier) == 1
        assert [receipt_status(chain, s["hash"]) for s in settlements] == [0, 0]

        run_background_pass(live)
        run_background_pass(live)

        accounts = set()
        for payment_id, buyer in zip(payment_ids, (first, second), strict=True):
            status = delivered_once(live, payment_id)
            assert status["txHash"] == carrier and status["payer"] == buyer.address.lower()
            assert subscriptions_of(live, status["accountId"]) == 1
            accounts.add(status["accountId"])
        assert len(accounts) == 2 and available_seats(live) == 48
        assert attack_view.usdc(first.address) == attack_view.usdc(second.address) == 100 * 10**6 - PRICE


def test_a_bundle_holding_the_senders_plain_transfer_delivers_the_buyer_and_the_claim_each_once(
        tmp_path, database_url, upstream, attack_chain, attack_view):
    chain = attack_chain
    buyer, sender = attack_view.new_wallet(), attack_view.new_wallet()
    bundler = deploy_bundler(chain, sender)
    token = token_contract(chain.web3(), chain.token)
    # The sender lets its bundler move the price from its balance (transferFrom: a plain transfer).
    approve = token.functions.approve(bundler.address, PRICE).build_transaction(
        {"from": sender.address, "gas": 100_000, "maxPriorityFeePerGas": 10**9, "maxFeePerGas": 10**11})
    assert receipt_status(chain, send(chain, sender, {k: approve[k] for k in ("to", "data", "gas")})) == 1
    plain = bytes.fromhex(token.encode_abi("transferFrom", args=[sender.address, chain.pay_to, PRICE])[2:])
    with live_gateway(tmp_path, database_url, upstream, pools=ATTACK_POOLS,
                      **attack_gateway_settings(chain, settle_wait_s=0.5)) as live, \
            httpx.Client(base_url=live.url, timeout=60) as http:
        with manual_mining(chain):
            payment_id = pay_pending(http, chain, buyer)
            [settlement] = pending_settlements(chain, 1)
            carrier = bundle(chain, sender, bundler, [bytes.fromhex(settlement["input"][2:]), plain],
                             outbid=[settlement])
        assert receipt_status(chain, carrier) == 1

        r = claim(live, sender, carrier)
        assert r.status_code == 201, r.text
        claimed = r.json()["data"]
        assert claimed["amount"] == str(PRICE) and "credited" not in claimed  # its own transfer, not the buyer's

        run_background_pass(live)
        run_background_pass(live)

        status = delivered_once(live, payment_id)
        assert status["txHash"] == carrier and status["accountId"] != claimed["accountId"]
        assert subscriptions_of(live, status["accountId"]) == 1
        assert subscriptions_of(live, claimed["accountId"]) == 1
        assert available_seats(live) == 48
        assert Web3.to_checksum_address(payment_status(live, claimed["paymentId"])["payer"]) == sender.address
