"""The chain adapter on real anvil: facts, simulation, idempotent settlement, relayer nonces, a dead node."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from eth_account import Account
from x402 import x402Client
from x402.http.utils import decode_payment_required_header, encode_payment_signature_header
from x402.mechanisms.evm.exact import ExactEvmScheme

from agent_gateway.errors import InvalidRequest, ServiceUnavailable
from agent_gateway.payments.chain import ChainAdapter, Receipt, SettlementWouldRevert, SignedSettlement, Transfer
from agent_gateway.testing.devchain import DevChain, token_contract
from agent_gateway.testing.processes import free_port
from agent_gateway.payments.rules import check_chain_facts, check_payment
from agent_gateway.payments.wire import ExactPayment, Offer, encode_header, parse_payment, payment_required

pytestmark = pytest.mark.anyio
PRICE = 2_500_000


@pytest.fixture
async def adapter(devchain: DevChain) -> AsyncIterator[ChainAdapter]:
    chain = ChainAdapter(devchain.rpc_url, devchain.chain_id, devchain.token, devchain.relayer_key)
    try:
        yield chain
    finally:
        await chain.close()


def offer_for(devchain: DevChain, amount: int = PRICE) -> Offer:
    return Offer(scheme="exact", network=devchain.network, amount_atomic=amount, asset=devchain.token,
                 pay_to=devchain.pay_to, max_timeout_s=300, token_name=devchain.token_name,
                 token_version=devchain.token_version, resource_url="http://gw.test/api/agent/subscribe-pool",
                 description="test seat")


def new_payer(devchain: DevChain, usdc: int = 10 * PRICE, eth_wei: int = 0) -> str:
    account = Account.create()
    devchain.fund(account.address, usdc, eth_wei)
    return account.key.hex()


async def pay(devchain: DevChain, key: str, amount: int = PRICE, signer_key: str | None = None) -> ExactPayment:
    """The official x402 client's payment for our challenge (optionally signed by the wrong key)."""
    client = x402Client()
    client.register(devchain.network, ExactEvmScheme(signer=Account.from_key(signer_key or key)))
    client.set_spend_controls(False)
    required = decode_payment_required_header(encode_header(payment_required([offer_for(devchain, amount)])))
    header = encode_payment_signature_header(await client.create_payment_payload(required))
    payment = parse_payment(header, 2)
    if signer_key is not None:  # claim to be `key` while signed by `signer_key`
        payment = dataclasses.replace(payment, payer=Account.from_key(key).address)
    return payment


def usdc(devchain: DevChain, address: str) -> int:
    return token_contract(devchain.web3(), devchain.token).functions.balanceOf(address).call()


async def wait_receipt(chain: ChainAdapter, tx_hash: str, timeout_s: float = 10) -> Receipt:
    deadline = time.monotonic() + timeout_s
    while (receipt := await chain.receipt(tx_hash)) is None:
        assert time.monotonic() < deadline, f"{tx_hash} not mined within {timeout_s}s"
        await asyncio.sleep(0.02)  # polling anvil for the receipt (bounded by the deadline)
    return receipt


async def settle(chain: ChainAdapter, payment: ExactPayment) -> tuple[SignedSettlement, Receipt]:
    settlement = await chain.build_settlement(payment)
    return settlement, await send(chain, settlement)


async def send(chain: ChainAdapter, settlement: SignedSettlement) -> Receipt:
    assert await chain.broadcast(settlement.raw_tx) == settlement.tx_hash
    return await wait_receipt(chain, settlement.tx_hash)


# --- facts ------------------------------------------------------------------------------------

async def test_facts(devchain: DevChain, adapter: ChainAdapter) -> None:
    latest = devchain.web3().eth.get_block("latest")["timestamp"]
    now = await adapter.chain_now()
    assert latest <= now <= time.time() + 5
    key = new_payer(devchain, usdc=7 * PRICE)
    payment = await pay(devchain, key)
    assert await adapter.balance_of(payment.payer) == 7 * PRICE
    assert await adapter.authorization_used(payment.payer, payment.nonce) is False
    offer = offer_for(devchain)
    assert check_payment(offer, payment, devchain.chain_id, devchain.token, now).ok
    assert check_chain_facts(payment, False, await adapter.balance_of(payment.payer)).ok
    await settle(adapter, payment)
    assert await adapter.authorization_used(payment.payer, payment.nonce) is True
    assert await adapter.balance_of(payment.payer) == 6 * PRICE


# --- simulation -------------------------------------------------------------------------------

async def test_simulate_ok_and_revert_reasons(devchain: DevChain, adapter: ChainAdapter) -> None:
    key = new_payer(devchain)
    payment = await pay(devchain, key)
    assert await adapter.simulate_settlement(payment) is None
    await settle(adapter, payment)
    assert await adapter.simulate_settlement(payment) == "FiatTokenV2: authorization is used or canceled"
    forged = await pay(devchain, key, signer_key=new_payer(devchain, usdc=0))
    assert await adapter.simulate_settlement(forged) == "FiatTokenV2: invalid signature"
    broke = await pay(devchain, new_payer(devchain, usdc=PRICE - 1))
    assert await adapter.simulate_settlement(broke) == "ERC20: transfer amount exceeds balance"


async def test_build_refuses_a_settlement_that_would_revert(devchain: DevChain, adapter: ChainAdapter) -> None:
    payment = await pay(devchain, new_payer(devchain))
    await settle(adapter, payment)
    with pytest.raises(SettlementWouldRevert) as err:
        await adapter.build_settlement(payment)
    assert err.value.code == "settlement_would_fail" and "authorization is used" in err.value.reason
    # The refused build took no relayer nonce: the next settlement is mined without a gap.
    _, receipt = await settle(adapter, await pay(devchain, new_payer(devchain)))
    assert receipt.ok


# --- settlement -------------------------------------------------------------------------------

async def test_build_broadcast_receipt(devchain: DevChain, adapter: ChainAdapter) -> None:
    payment = await pay(devchain, new_payer(devchain))
    merchant_before = usdc(devchain, devchain.pay_to)
    settlement = await adapter.build_settlement(payment)
    assert settlement.tx_hash.startswith("0x") and len(settlement.tx_hash) == 66
    assert await adapter.receipt(settlement.tx_hash) is None  # signed, not sent
    assert await adapter.transaction(settlement.tx_hash) is None
    assert await adapter.broadcast(settlement.raw_tx) == settlement.tx_hash
    receipt = await wait_receipt(adapter, settlement.tx_hash)
    assert receipt.ok and receipt.confirmations >= 1 and receipt.tx_hash == settlement.tx_hash
    assert receipt.transfers == (Transfer(token=devchain.token, from_=payment.payer, to=devchain.pay_to, value=PRICE),)
    assert usdc(devchain, devchain.pay_to) == merchant_before + PRICE
    tx = await adapter.transaction(settlement.tx_hash)
    assert tx is not None and tx.from_ == adapter.relayer_address and tx.to == devchain.token
    assert tx.nonce == settlement.nonce and tx.block_number == receipt.block_number and tx.transfer is None
    devchain.web3().provider.make_request("anvil_mine", [2])
    assert (await adapter.receipt(settlement.tx_hash)).confirmations == receipt.confirmations + 2


async def test_broadcasting_the_same_bytes_twice_moves_money_once(devchain: DevChain, adapter: ChainAdapter) -> None:
    payment = await pay(devchain, new_payer(devchain))
    before = await adapter.balance_of(payment.payer)
    settlement = await adapter.build_settlement(payment)
    hashes = await asyncio.gather(*(adapter.broadcast(settlement.raw_tx) for _ in range(3)))
    assert set(hashes) == {settlement.tx_hash}
    await wait_receipt(adapter, settlement.tx_hash)
    assert await adapter.broadcast(settlement.raw_tx) == settlement.tx_hash  # already mined
    assert await adapter.balance_of(payment.payer) == before - PRICE


async def test_concurrent_builds_get_distinct_relayer_nonces(devchain: DevChain, adapter: ChainAdapter) -> None:
    payments = [await pay(devchain, new_payer(devchain)) for _ in range(10)]
    merchant_before = usdc(devchain, devchain.pay_to)
    settlements = await asyncio.gather(*(adapter.build_settlement(p) for p in payments))
    nonces = sorted(s.nonce for s in settlements)
    assert nonces == list(range(nonces[0], nonces[0] + 10))
    await asyncio.gather(*(adapter.broadcast(s.raw_tx) for s in reversed(settlements)))
    receipts = await asyncio.gather(*(wait_receipt(adapter, s.tx_hash) for s in settlements))
    assert all(r.ok for r in receipts)
    assert usdc(devchain, devchain.pay_to) == merchant_before + 10 * PRICE


async def test_released_nonces_are_reused(devchain: DevChain, adapter: ChainAdapter) -> None:
    first, second, third = [await pay(devchain, new_payer(devchain)) for _ in range(3)]
    a = await adapter.build_settlement(first)
    b = await adapter.build_settlement(second)
    await adapter.release_settlement(a)  # a gap below b: the next build fills it
    c = await adapter.build_settlement(third)
    assert c.nonce == a.nonce and b.nonce == a.nonce + 1
    await adapter.release_settlement(b)  # the top nonce: simply not taken
    b2 = await adapter.build_settlement(second)
    assert b2.nonce == b.nonce
    assert (await send(adapter, c)).ok and (await send(adapter, b2)).ok


async def test_a_nonce_taken_elsewhere_is_a_conflict_and_resyncs(devchain: DevChain, adapter: ChainAdapter) -> None:
    other = ChainAdapter(devchain.rpc_url, devchain.chain_id, devchain.token, devchain.relayer_key)
    try:
        mine = await adapter.build_settlement(await pay(devchain, new_payer(devchain)))
        theirs = await other.build_settlement(await pay(devchain, new_payer(devchain)))
        assert mine.nonce == theirs.nonce  # two processes sharing one relayer key
        assert (await send(other, theirs)).ok
        with pytest.raises(ServiceUnavailable) as err:
            await adapter.broadcast(mine.raw_tx)
        assert err.value.code == "relayer_nonce_conflict"
        _, receipt = await settle(adapter, await pay(devchain, new_payer(devchain)))
        assert receipt.ok  # resynced: the next settlement gets a fresh nonce
    finally:
        await other.close()


# --- the tx-hash flow -------------------------------------------------------------------------

async def test_a_direct_transfer_is_decoded(devchain: DevChain, adapter: ChainAdapter) -> None:
    key = new_payer(devchain, eth_wei=10**17)
    agent = Account.from_key(key)
    w3 = devchain.web3()
    tx = token_contract(w3, devchain.token).functions.transfer(devchain.pay_to, PRICE).build_transaction(
        {"from": agent.address, "nonce": w3.eth.get_transaction_count(agent.address)})
    tx_hash = "0x" + bytes(w3.eth.send_raw_transaction(agent.sign_transaction(tx).raw_transaction)).hex()
    await wait_receipt(adapter, tx_hash)
    info = await adapter.transaction(tx_hash)
    assert info is not None and info.from_ == agent.address and info.to == devchain.token
    assert info.transfer == Transfer(token=devchain.token, from_=agent.address, to=devchain.pay_to, value=PRICE)
    assert await adapter.transfers_in(tx_hash, devchain.pay_to) == (info.transfer,)
    assert await adapter.transfers_in(tx_hash) == (info.transfer,)
    assert await adapter.transfers_in(tx_hash, agent.address) == ()
    assert await adapter.transfers_in("0x" + "12" * 32, devchain.pay_to) is None
    with pytest.raises(InvalidRequest):
        await adapter.transaction("0x1234")


# --- a dead node ------------------------------------------------------------------------------

@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers (a hung node)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        yield server.getsockname()[1]


@pytest.mark.parametrize("kind", ["closed", "silent"])
async def test_rpc_down_is_chain_unavailable_within_the_timeout(devchain: DevChain, kind: str,
                                                                request: pytest.FixtureRequest) -> None:
    port = free_port() if kind == "closed" else request.getfixturevalue("silent_port")
    dead = ChainAdapter(f"http://127.0.0.1:{port}", devchain.chain_id, devchain.token, devchain.relayer_key,
                        request_timeout_s=0.5)
    payment = await pay(devchain, new_payer(devchain, usdc=0))
    calls = [dead.chain_now(), dead.balance_of(payment.payer), dead.authorization_used(payment.payer, payment.nonce),
             dead.simulate_settlement(payment), dead.build_settlement(payment), dead.broadcast("0x02c0"),
             dead.receipt("0x" + "ab" * 32), dead.transaction("0x" + "ab" * 32), dead.resync_nonce()]
    try:
        for call in calls:
            started = time.monotonic()
            with pytest.raises(ServiceUnavailable) as err:
                await call
            assert err.value.code == "chain_unavailable"
            assert f":{port}" not in err.value.message  # the RPC URL (it may hold an API key) stays out
            assert time.monotonic() - started < 2.0
    finally:
        await dead.close()


async def test_chain_calls_cancelled_midway_never_hold_up_later_ones(adapter, devchain):
    """A chain call can be cancelled at any moment (our own timeout, a client that went away, a
    shutdown), often while others are under way. None may leave anything held that later calls
    wait for. (web3's own HTTP provider did: every request took a lock shared by the whole process,
    through a thread pool, and a request cancelled while waiting for it could leave it held for
    good; then every chain call, async or sync, waited for ever. Seen as a hung CI worker.)"""
    for round_ in range(150):
        calls = [asyncio.create_task(adapter.block_number()) for _ in range(12)]
        for _ in range(round_ % 6):  # cancelled after 0 to 5 turns of the loop
            await asyncio.sleep(0)
        for call in calls[::2]:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
    assert await asyncio.wait_for(adapter.block_number(), 10) >= 0
    answered = threading.Event()

    def sync_call() -> None:  # a thread of its own: web3's sync provider makes a session for it
        devchain.web3().eth.block_number
        answered.set()

    threading.Thread(target=sync_call, daemon=True).start()
    assert await asyncio.to_thread(answered.wait, 10), "a sync web3 call in this process never answered"
