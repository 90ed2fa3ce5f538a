"""A payment that failed and was paid anyway, on a real anvil chain: an x402 authorization stays
spendable until its validBefore, by anyone holding it, and always to our payTo. If it is sent after
the gateway gave up on it (refused for the payer's balance, refused by a facilitator that sends it
later anyway), the background pass credits the amount to the paying wallet's account, once; if the
buyer retried with the same authorization, the retry owns the transfer and nothing is credited."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client import REGISTRY

from agent_gateway.payments.wire import parse_payment
from agent_gateway.testing.devchain import token_contract
from tests.attacks.conftest import run_background_pass
from tests.attacks.test_bundled_settlements import _AUTHORIZED_TRANSFER, deploy_bundler, send
from tests.attacks.test_facilitator import pay, post
from tests.e2e.test_x402 import PRICE, Attack
from tests.e2e.test_x402_recovery import sign_in
from tests.fixtures.live import LiveGateway
from tests.fixtures.x402 import Wallet, send_authorization, sign_authorization

pytestmark = pytest.mark.anyio


def paid_after_failure() -> float:
    return REGISTRY.get_sample_value("agw_payments_paid_after_failure_total") or 0.0


def account_of(live: LiveGateway, wallet: Wallet) -> dict:
    mk = sign_in(live.url, wallet)
    return httpx.get(live.url + "/api/account", headers={"Authorization": f"Bearer {mk}"}, timeout=30).json()["data"]


async def test_a_payment_refused_then_sent_by_someone_else_is_credited_to_the_payer_once(
        x402_gateway, devchain, chain_view):
    live = x402_gateway
    payer = chain_view.new_wallet(usdc_atomic=0)
    attack = Attack(live, devchain, payer)
    header = attack.header()
    r = attack.post(header)
    assert r.status_code == 402 and r.json()["error"]["code"] == "insufficient_balance", r.text
    # The payer is funded later, and someone who holds the signed payment sends it.
    devchain.fund(payer.address, PRICE)
    pay_to_before, counted_before = chain_view.usdc(devchain.pay_to), paid_after_failure()
    send_authorization(devchain, header, chain_view.new_wallet(usdc_atomic=0))
    assert chain_view.usdc(devchain.pay_to) == pay_to_before + PRICE and chain_view.usdc(payer.address) == 0

    run_background_pass(live)
    assert account_of(live, payer)["balance"] == "10.00"
    assert paid_after_failure() == counted_before + 1
    # Once: another pass credits nothing more, and the payment cannot be redeemed again.
    run_background_pass(live)
    assert account_of(live, payer)["balance"] == "10.00"
    r = attack.post(header)
    assert r.status_code == 402 and r.json()["error"]["code"] in ("payment_already_used", "nonce_already_used"), r.text
    assert paid_after_failure() == counted_before + 1


async def test_a_retry_with_the_same_authorization_owns_the_transfer_and_nothing_is_credited(
        x402_gateway, devchain, chain_view):
    live = x402_gateway
    payer = chain_view.new_wallet(usdc_atomic=0)
    attack = Attack(live, devchain, payer)
    header = attack.header()
    assert attack.post(header).json()["error"]["code"] == "insufficient_balance"
    devchain.fund(payer.address, PRICE)
    r = attack.post(header)  # the same authorization, now that it can pay: the seat is bought
    assert r.status_code == 201, r.text
    counted_before = paid_after_failure()
    run_background_pass(live)
    assert account_of(live, payer)["balance"] == "0.00"
    assert paid_after_failure() == counted_before
    assert chain_view.usdc(payer.address) == 0


async def test_a_facilitator_that_refuses_then_sends_the_payment_anyway_gets_it_credited(
        facilitator_gateway, facilitator, devchain, chain_view):
    live, payer = facilitator_gateway, chain_view.new_wallet()
    header = pay(live, devchain, payer)
    facilitator.fault, facilitator.fault_paths = "refuse_settle", ("/settle",)
    r = post(live, header)
    assert r.status_code == 402 and r.json()["error"]["code"] == "settlement_refused", r.text
    facilitator.fault = None
    # "Refused", but the facilitator (or whoever it passed the payment to) sends it a moment later.
    counted_before = paid_after_failure()
    send_authorization(devchain, header, chain_view.new_wallet(usdc_atomic=0))
    run_background_pass(live)
    assert account_of(live, payer)["balance"] == "10.00"
    assert paid_after_failure() == counted_before + 1
    assert chain_view.usdc(payer.address) == 100 * 10**6 - PRICE


def authorized_transfer(devchain, payer: Wallet, *, value: int, nonce: str | None = None) -> bytes:
    """The calldata of `payer`'s EIP-3009 transfer of `value` to payTo, under `nonce` (new if None)."""
    authorization, signature = sign_authorization(devchain, payer.key, payer=payer.address, to=devchain.pay_to,
                                                  value=value, nonce=nonce)
    raw = bytes.fromhex(signature[2:])
    token = token_contract(devchain.web3(), devchain.token)
    return bytes.fromhex(token.encode_abi(_AUTHORIZED_TRANSFER, args=[
        payer.address, devchain.pay_to, value, int(authorization["validAfter"]), int(authorization["validBefore"]),
        bytes.fromhex(authorization["nonce"][2:]), raw[64] if raw[64] >= 27 else raw[64] + 27, raw[:32], raw[32:64],
    ])[2:])


async def test_a_failed_authorization_used_for_a_pittance_beside_another_payment_is_not_credited_the_price(
        x402_gateway, devchain, chain_view):
    """A payer may sign two authorizations under one nonce: the one it gave the gateway (the price)
    and another (one atomic unit). Executing the other in a transaction that also carries a second
    payment of the price, the gateway must not read the second payment's Transfer as the first's:
    only the Transfer the failed authorization itself made can be credited."""
    live = x402_gateway
    payer = chain_view.new_wallet(usdc_atomic=0)
    attack = Attack(live, devchain, payer)
    first, second = attack.header(), attack.header()
    for header in (first, second):
        assert attack.post(header).json()["error"]["code"] == "insufficient_balance"
    devchain.fund(payer.address, PRICE + 1)
    first_nonce, second = parse_payment(first, 2).nonce, parse_payment(second, 2)
    sender = chain_view.new_wallet(usdc_atomic=0)
    bundler = deploy_bundler(devchain, sender)
    # One transaction: the first payment's nonce spent on 1 atomic unit, and the second payment
    # (its nonce, the price, to payTo) signed again.
    calls = [authorized_transfer(devchain, payer, value=1, nonce=first_nonce),
             authorized_transfer(devchain, payer, value=PRICE, nonce=second.nonce)]
    tx_hash = send(devchain, sender, {"to": bundler.address, "gas": 600_000,
                                      "data": bundler.encode_abi("run", args=[devchain.token, calls])})
    assert devchain.web3().eth.wait_for_transaction_receipt(tx_hash, timeout=30)["status"] == 1
    assert chain_view.usdc(payer.address) == 0

    run_background_pass(live)
    run_background_pass(live)
    # PRICE + 1 reached payTo: the second payment's price is credited, the first's pittance is not.
    assert account_of(live, payer)["balance"] == "10.00"


async def test_a_copy_of_the_payment_sent_for_another_account_does_not_take_its_credit(
        x402_gateway, devchain, chain_view):
    """Once the payer's authorization is mined, anyone can read it from the chain and send it to the
    gateway as a purchase for an account of their own: refused (nonce already used), it is one more
    failed row of that authorization. Whichever row the pass credits, the money is the payer's."""
    live = x402_gateway
    payer, thief = chain_view.new_wallet(usdc_atomic=0), chain_view.new_wallet(usdc_atomic=PRICE)
    thieves = Attack(live, devchain, thief)
    bought = thieves.post(thieves.header())  # the thief's own account: one seat bought
    assert bought.status_code == 201, bought.text
    thief_key = bought.json()["data"]["managementKey"]
    attack = Attack(live, devchain, payer)
    header = attack.header()
    assert attack.post(header).json()["error"]["code"] == "insufficient_balance"
    run_background_pass(live)  # the failed payment is looked at: unused yet
    devchain.fund(payer.address, PRICE)
    send_authorization(devchain, header, chain_view.new_wallet(usdc_atomic=0))
    r = httpx.post(live.url + "/api/pools/alpha/subscribe", json={"blocks": ["day"], "quantity": 1}, timeout=60,
                   headers={"PAYMENT-SIGNATURE": header, "Authorization": f"Bearer {thief_key}"})
    assert r.status_code == 402 and r.json()["error"]["code"] == "nonce_already_used", r.text

    run_background_pass(live)
    assert account_of(live, payer)["balance"] == "10.00"
    assert account_of(live, thief)["balance"] == "0.00"
