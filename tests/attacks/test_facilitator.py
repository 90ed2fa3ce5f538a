"""Attacks and failures in facilitator mode, against a real x402 facilitator (the SDK's own, over
HTTP) on anvil: replays and forgeries, a facilitator that is down, talks nonsense, loses its answer
or says "already used", and a front-runner between /verify and /settle. Whatever happens, money
moves at most once, and the buyer gets the seats exactly when the chain shows it paid."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from eth_account import Account
from prometheus_client import REGISTRY

from agent_gateway.testing.devchain import start_devchain, token_contract
from agent_gateway.testing.facilitator import TestFacilitator
from tests.attacks.conftest import rpc, run_background_pass
from tests.e2e.test_x402 import ORDER, PRICE
from tests.fixtures.facilitator import AUTH_HEADER, facilitator_settings
from tests.fixtures.live import LiveGateway, live_gateway
from tests.fixtures.x402 import X402_POOLS, ChainView, Wallet, challenge, payment_header, sign_authorization

pytestmark = pytest.mark.anyio
START_USDC = 100 * 10**6


def pay(live: LiveGateway, chain, wallet: Wallet, *, signer_key: str | None = None, **fields) -> str:
    """A PAYMENT-SIGNATURE header for ORDER against the gateway's own challenge."""
    with httpx.Client(base_url=live.url) as http:
        accepted = challenge(http, ORDER)
    values = {"payer": wallet.address, "to": accepted["payTo"], "value": int(accepted["amount"]), **fields}
    authorization, signature = sign_authorization(chain, signer_key or wallet.key, **values)
    return payment_header(accepted, authorization, signature)


def post(live: LiveGateway, header: str) -> httpx.Response:
    return httpx.post(live.url + "/api/agent/subscribe-pool", json=ORDER, headers={"PAYMENT-SIGNATURE": header},
                      timeout=60)


def _nonce(chain, address: str) -> int:
    return chain.web3().eth.get_transaction_count(address)


def facilitator_requests(endpoint: str, outcome: str) -> float:
    return REGISTRY.get_sample_value("agw_facilitator_requests_total",
                                     {"endpoint": endpoint, "outcome": outcome}) or 0.0


def status(live: LiveGateway, payment_id: str) -> dict:
    return httpx.get(f"{live.url}/api/agent/payments/{payment_id}", timeout=30).json()["data"]


async def test_a_replayed_payment_is_settled_once_sequentially_and_ten_at_once(
        facilitator_gateway, facilitator, devchain, chain_view):
    live, wallet = facilitator_gateway, chain_view.new_wallet()
    pay_to_before = chain_view.usdc(devchain.pay_to)
    header = pay(live, devchain, wallet)
    first = post(live, header)
    assert first.status_code == 201, first.text
    again = post(live, header)
    assert again.status_code == 402 and again.json()["error"]["code"] == "payment_already_used"
    async with httpx.AsyncClient(base_url=live.url, timeout=60) as http:
        burst = await asyncio.gather(*(http.post("/api/agent/subscribe-pool", json=ORDER,
                                                 headers={"PAYMENT-SIGNATURE": header}) for _ in range(10)))
    assert {(r.status_code, r.json()["error"]["code"]) for r in burst} == {(402, "payment_already_used")}
    assert facilitator.count("/verify") == 1 and facilitator.count("/settle") == 1
    assert chain_view.usdc(wallet.address) == START_USDC - PRICE
    assert chain_view.usdc(devchain.pay_to) == pay_to_before + PRICE


@pytest.mark.parametrize("case,code", [("forged", "invalid_signature"), ("amount", "wrong_amount"),
                                       ("pay_to", "wrong_recipient")])
async def test_forged_payments_never_reach_the_facilitator(facilitator_gateway, facilitator, devchain, chain_view,
                                                           case, code):
    live, wallet = facilitator_gateway, chain_view.new_wallet()
    pay_to_before = chain_view.usdc(devchain.pay_to)
    changes = {"forged": {"signer_key": Account.create().key.hex()}, "amount": {"value": PRICE - 1},
               "pay_to": {"to": Account.create().address}}[case]
    r = post(live, pay(live, devchain, wallet, **changes))
    assert r.status_code == 402 and r.json()["error"]["code"] == code
    assert facilitator.count("/verify") == 0 and facilitator.count("/settle") == 0
    assert chain_view.usdc(wallet.address) == START_USDC
    assert chain_view.usdc(devchain.pay_to) == pay_to_before


async def test_the_facilitators_verify_refusal_moves_nothing_and_frees_the_authorization(
        facilitator_gateway, facilitator, devchain, chain_view):
    live = facilitator_gateway
    broke = chain_view.new_wallet(usdc_atomic=0)
    header = pay(live, devchain, broke)  # signed correctly, but the payer has no USDC
    r = post(live, header)
    assert r.status_code == 402 and r.json()["error"]["code"] == "insufficient_balance", r.text
    assert facilitator.count("/verify") == 1 and facilitator.count("/settle") == 0
    # Nothing was claimed for good: once funded, the same authorization buys the seat.
    devchain.fund(broke.address, PRICE)
    r = post(live, header)
    assert r.status_code == 201, r.text
    assert chain_view.usdc(broke.address) == 0


async def test_a_facilitator_that_is_down_is_a_503_and_the_same_payment_works_later(
        facilitator_gateway, facilitator, devchain, chain_view):
    live, wallet = facilitator_gateway, chain_view.new_wallet()
    header = pay(live, devchain, wallet)
    facilitator.fault = "down"
    r = post(live, header)
    assert r.status_code == 503 and r.json()["error"]["code"] == "facilitator_unavailable", r.text
    assert chain_view.usdc(wallet.address) == START_USDC
    facilitator.fault = None
    r = post(live, header)
    assert r.status_code == 201, r.text
    assert chain_view.usdc(wallet.address) == START_USDC - PRICE


@pytest.fixture
def any_db_gateway(tmp_path: Path, database_url: str, upstream, devchain, facilitator):
    """A facilitator-mode gateway on SQLite and on PostgreSQL (the `submitted` transitions are storage)."""
    with live_gateway(tmp_path, database_url, upstream, pools=X402_POOLS,
                      **facilitator_settings(devchain, facilitator)) as live:
        yield live


async def test_a_lost_settle_answer_is_finished_from_the_chain_and_never_sent_twice(
        any_db_gateway, facilitator, devchain, chain_view):
    live, wallet = any_db_gateway, chain_view.new_wallet()
    pay_to_before, facilitator_nonce = chain_view.usdc(devchain.pay_to), _nonce(devchain, facilitator.address)
    header = pay(live, devchain, wallet)
    facilitator.fault, facilitator.fault_paths = "lose_settle_answer", ("/settle",)
    lost_before = facilitator_requests("settle", "unavailable")
    r = post(live, header)
    assert facilitator_requests("settle", "unavailable") == lost_before + 1
    assert r.status_code == 503 and r.json()["error"]["code"] == "facilitator_unavailable", r.text
    payment_id = r.json()["paymentId"]
    assert status(live, payment_id)["state"] == "submitted"
    # The facilitator did settle: the money moved once. The reconciler reads the chain and delivers.
    assert chain_view.usdc(devchain.pay_to) == pay_to_before + PRICE
    run_background_pass(live)
    assert status(live, payment_id)["state"] == "delivered"
    assert facilitator.count("/settle") == 1 and _nonce(devchain, facilitator.address) == facilitator_nonce + 1
    assert post(live, header).json()["error"]["code"] == "payment_already_used"
    assert chain_view.usdc(devchain.pay_to) == pay_to_before + PRICE


async def test_a_settle_answered_already_used_is_read_from_the_chain_not_as_a_failure(
        facilitator_gateway, facilitator, devchain, chain_view):
    live, wallet = facilitator_gateway, chain_view.new_wallet()
    facilitator.fault, facilitator.fault_paths = "say_used", ("/settle",)
    r = post(live, pay(live, devchain, wallet))
    assert r.status_code == 201, r.text
    data = r.json()["data"]
    assert data["subscriptions"][0]["apiKey"].startswith("sk_")
    assert devchain.web3().eth.get_transaction(data["txHash"])["from"] == facilitator.address
    assert chain_view.usdc(wallet.address) == START_USDC - PRICE


async def test_a_settle_refused_with_the_authorization_unused_charges_nothing_and_frees_it(
        facilitator_gateway, facilitator, devchain, chain_view):
    live, wallet = facilitator_gateway, chain_view.new_wallet()
    header = pay(live, devchain, wallet)
    facilitator.fault, facilitator.fault_paths = "refuse_settle", ("/settle",)
    r = post(live, header)
    assert r.status_code == 402 and r.json()["error"]["code"] == "settlement_refused", r.text
    assert chain_view.usdc(wallet.address) == START_USDC
    facilitator.fault = None
    r = post(live, header)
    assert r.status_code == 201, r.text


async def test_a_made_up_transaction_hash_is_not_believed_and_the_real_transfer_is_found(
        tmp_path: Path, sqlite_url: str, upstream, devchain, facilitator, chain_view):
    with live_gateway(tmp_path, sqlite_url, upstream, pools=X402_POOLS,
                      **facilitator_settings(devchain, facilitator, settle_wait_s=0.5)) as live:
        wallet = chain_view.new_wallet()
        facilitator.fault, facilitator.fault_paths = "wrong_hash", ("/settle",)
        r = post(live, pay(live, devchain, wallet))
        # No receipt for the named hash: the buyer is told to poll, nothing is delivered on its word.
        assert r.status_code == 202, r.text
        payment_id = r.json()["data"]["paymentId"]
        assert status(live, payment_id)["state"] == "broadcast"
        run_background_pass(live)
        final = status(live, payment_id)
        assert final["state"] == "delivered", final
        assert final["txHash"] != "0x" + "5a" * 32
        assert devchain.web3().eth.get_transaction(final["txHash"])["from"] == facilitator.address
        assert chain_view.usdc(wallet.address) == START_USDC - PRICE


async def test_a_front_runner_between_verify_and_settle_still_pays_for_the_seat(
        facilitator_gateway, facilitator, devchain, chain_view):
    live, wallet, attacker = facilitator_gateway, chain_view.new_wallet(), chain_view.new_wallet(usdc_atomic=0)
    pay_to_before = chain_view.usdc(devchain.pay_to)
    carried: dict = {}

    def front_run(body: dict) -> None:
        # The attacker executes the buyer's authorization itself, just before the facilitator does.
        auth, signature = body["paymentPayload"]["payload"]["authorization"], body["paymentPayload"]["payload"]["signature"]
        w3 = devchain.web3()
        call = token_contract(w3, devchain.token).get_function_by_signature(
            "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)")(
            auth["from"], auth["to"], int(auth["value"]), int(auth["validAfter"]), int(auth["validBefore"]),
            bytes.fromhex(auth["nonce"][2:]), bytes.fromhex(signature[2:]))
        tx = call.build_transaction({"from": attacker.address, "gas": 200_000, "gasPrice": w3.eth.gas_price,
                                     "nonce": w3.eth.get_transaction_count(attacker.address, "pending")})
        sent = w3.eth.send_raw_transaction(Account.sign_transaction(tx, attacker.key).raw_transaction)
        assert w3.eth.wait_for_transaction_receipt(sent, timeout=30)["status"] == 1
        carried["tx"] = "0x" + bytes(sent).hex()

    facilitator.before_settle = front_run
    r = post(live, pay(live, devchain, wallet))
    assert r.status_code == 201, r.text
    assert r.json()["data"]["txHash"] == carried["tx"]  # the transaction that really paid
    assert chain_view.usdc(wallet.address) == START_USDC - PRICE
    assert chain_view.usdc(devchain.pay_to) == pay_to_before + PRICE


async def test_nonsense_from_the_facilitator_is_a_502_and_an_authorization_that_expires_unused_is_released(
        tmp_path: Path, database_url: str, upstream):
    # A chain of its own: the test moves the chain's clock.
    with start_devchain(agents=0) as chain, \
            TestFacilitator(chain.rpc_url, chain.facilitator_key, [chain.network], auth_header=AUTH_HEADER) as facilitator, \
            live_gateway(tmp_path, database_url, upstream, pools=X402_POOLS,
                         **facilitator_settings(chain, facilitator)) as live:
        view = ChainView(chain)
        wallet = view.new_wallet()
        seats_before = httpx.get(f"{live.url}/api/pools/alpha").json()["data"]["blocks"][0]["availableSeats"]
        facilitator.fault, facilitator.fault_paths = "nonsense", ("/settle",)
        nonsense_before = facilitator_requests("settle", "bad_response")
        r = post(live, pay(live, chain, wallet))
        assert r.status_code == 502 and r.json()["error"]["code"] == "facilitator_bad_response", r.text
        assert facilitator_requests("settle", "bad_response") == nonsense_before + 1
        payment_id = r.json()["paymentId"]
        # Maybe sent, as far as the gateway knows: held while the authorization can still be used.
        run_background_pass(live)
        assert status(live, payment_id)["state"] == "submitted"
        rpc(chain, "evm_increaseTime", [3600])
        rpc(chain, "evm_mine")
        run_background_pass(live)
        final = status(live, payment_id)
        assert final["state"] == "failed" and final["failureReason"] == "authorization_expired", final
        assert view.usdc(wallet.address) == START_USDC
        assert httpx.get(f"{live.url}/api/pools/alpha").json()["data"]["blocks"][0]["availableSeats"] == seats_before


async def test_a_settlement_the_facilitator_calls_pending_is_followed_by_its_hash(
        tmp_path: Path, sqlite_url: str, upstream, devchain, chain_view):
    import threading
    import time

    from tests.attacks.conftest import wait_for_pending
    from tests.e2e.test_x402_recovery import _payment_state

    # A facilitator that gives up waiting for the receipt at once: it answers `settlement_pending`
    # with the hash of the transaction it sent (success false), as it would on a slow chain.
    with TestFacilitator(devchain.rpc_url, devchain.facilitator_key, [devchain.network], auth_header=AUTH_HEADER,
                         confirmation_timeout_s=0.2) as impatient, \
            live_gateway(tmp_path, sqlite_url, upstream, pools=X402_POOLS,
                         **facilitator_settings(devchain, impatient, settle_wait_s=60)) as live:
        wallet = chain_view.new_wallet()
        header = pay(live, devchain, wallet)
        w3 = devchain.web3()
        outcome: dict = {}
        refused_before = facilitator_requests("settle", "refused")
        w3.provider.make_request("evm_setAutomine", [False])
        try:
            buyer = threading.Thread(target=lambda: outcome.update(response=post(live, header)))
            buyer.start()
            pending = wait_for_pending(devchain, impatient.address)
            db = Path(sqlite_url.removeprefix("sqlite:///"))
            deadline = time.monotonic() + 30
            while (_payment_state(db) or (None, None))[1] != "broadcast":
                assert time.monotonic() < deadline, "the facilitator's pending answer never moved the payment on"
                time.sleep(0.02)  # polling the ledger, bounded by the deadline
            rpc(devchain, "evm_mine")
            buyer.join(60)
        finally:
            w3.provider.make_request("evm_setAutomine", [True])
    r = outcome["response"]
    assert r.status_code == 201, r.text
    assert facilitator_requests("settle", "refused") == refused_before + 1  # success false, with the hash
    assert r.json()["data"]["txHash"] == pending["hash"]
    assert chain_view.usdc(wallet.address) == START_USDC - PRICE


async def test_a_reorganised_facilitator_settlement_is_settled_again_through_the_facilitator(
        facilitator_gateway, facilitator, devchain, chain_view):
    """We hold no signed transaction of a facilitator's settlement; when a reorg drops it, the
    authorization (still valid, unused) goes to /settle again, and the buyer keeps the seat it paid
    for, charged once."""
    from tests.attacks.test_reorg import reorg

    live, payer = facilitator_gateway, chain_view.new_wallet()
    pay_to_before = chain_view.usdc(devchain.pay_to)
    r = post(live, pay(live, devchain, payer))
    assert r.status_code == 201, r.text
    bought = r.json()["data"]
    first_tx = status(live, bought["paymentId"])["txHash"]
    reorg(devchain, 1)  # the block holding the settlement is replaced by an empty one
    assert chain_view.usdc(devchain.pay_to) == pay_to_before
    # The facilitator's next transaction (another customer's, here a plain one) takes the dropped
    # one's account nonce; its signer counts nonces itself and only upwards, so until then its
    # next settlement would wait behind the gap.
    w3, account = devchain.web3(), Account.from_key(devchain.facilitator_key)
    filler = {"to": account.address, "value": 0, "gas": 21_000, "gasPrice": w3.eth.gas_price,
              "nonce": w3.eth.get_transaction_count(account.address), "chainId": devchain.chain_id}
    w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(account.sign_transaction(filler).raw_transaction))
    settles_before = facilitator.count("/settle")

    run_background_pass(live)  # not mined, not pending: handed to the facilitator again
    assert facilitator.count("/settle") == settles_before + 1
    run_background_pass(live)  # ... and its new transaction found

    final = status(live, bought["paymentId"])
    assert final["state"] == "delivered" and final["txHash"] != first_tx, final
    assert chain_view.usdc(devchain.pay_to) == pay_to_before + PRICE
    assert chain_view.usdc(payer.address) == START_USDC - PRICE
    run_background_pass(live)  # found: nothing is sent a third time
    assert facilitator.count("/settle") == settles_before + 1
