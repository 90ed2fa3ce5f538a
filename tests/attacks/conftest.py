"""Fixtures for the payment attacks: a chain of their own (they stop automining, reorganise blocks
and move the chain's clock, which must not reach other tests), a gateway on it selling 19.99 USDC
seats, and the chain-side moves an attacker or a payer makes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from prometheus_client import REGISTRY
from web3 import Web3

from agent_gateway.testing.devchain import DevChain, start_devchain
from tests.fixtures.live import LiveGateway, live_gateway
from tests.fixtures.x402 import ChainView, Wallet, chain_settings

PRICE = 19_990_000  # 19.99 USDC: one seat of pool alpha
ORDER = {"pool": "alpha", "blocks": ["day"], "quantity": 1}
HORIZON_BLOCKS = 3
ATTACK_POOLS = """
[blocks]
day = "00:00-24:00"

[pools.alpha]
name = "Alpha"
models = ["test-model"]
upstreams = ["{upstream}"]
seats = 50
prices = {{ day = "19.99" }}
"""


@pytest.fixture(scope="module")
def attack_chain() -> Iterator[DevChain]:
    with start_devchain(agents=0) as chain:
        yield chain


@pytest.fixture
def attack_view(attack_chain: DevChain) -> ChainView:
    return ChainView(attack_chain)


def attack_gateway_settings(chain: DevChain, **overrides: Any) -> dict:
    return chain_settings(chain, **{"reorg_horizon_blocks": HORIZON_BLOCKS, "settle_wait_s": 60, **overrides})


@pytest.fixture
def attack_gateway(tmp_path: Path, sqlite_url: str, upstream, attack_chain: DevChain) -> Iterator[LiveGateway]:
    with live_gateway(tmp_path, sqlite_url, upstream, pools=ATTACK_POOLS, **attack_gateway_settings(attack_chain)) as live:
        yield live


# --- the chain, as an attacker or a payer moves it ---------------------------------------------

def rpc(chain: DevChain, method: str, params: list | None = None) -> Any:
    reply = chain.web3().provider.make_request(method, params or [])
    assert "error" not in reply, reply
    return reply["result"]


def wait_for_pending(chain: DevChain, sender: str, deadline_s: float = 30) -> dict:
    """The first transaction from `sender` waiting in the node's pool (as txpool_content shows it)."""
    deadline = time.monotonic() + deadline_s
    while True:
        pending = rpc(chain, "txpool_content")["pending"]
        mine = {a.lower(): txs for a, txs in pending.items()}.get(sender.lower())
        if mine:
            return next(iter(mine.values()))
        assert time.monotonic() < deadline, f"no pending transaction from {sender}"
        time.sleep(0.02)  # polling the node's pool, bounded by the deadline


def send_with_higher_tip(chain: DevChain, wallet: Wallet, copied: dict) -> str:
    """Resend a pending transaction's calldata from `wallet`, tipping more so it is mined first."""
    w3 = chain.web3()
    tip = int(copied["maxPriorityFeePerGas"], 16) * 2 + 10**9
    tx = {"type": 2, "chainId": chain.chain_id, "nonce": w3.eth.get_transaction_count(wallet.address, "pending"),
          "to": Web3.to_checksum_address(copied["to"]), "data": copied["input"], "value": 0, "gas": int(copied["gas"], 16),
          "maxPriorityFeePerGas": tip, "maxFeePerGas": int(copied["maxFeePerGas"], 16) * 2 + tip}
    return "0x" + bytes(w3.eth.send_raw_transaction(Account.sign_transaction(tx, wallet.key).raw_transaction)).hex()


def cancel_authorization(chain: DevChain, payer: Wallet, nonce: str, *, tip_wei: int = 10 * 10**9) -> str:
    """The payer cancels its EIP-3009 authorization on-chain (sent, not waited for)."""
    w3 = chain.web3()
    domain = {"name": chain.token_name, "version": chain.token_version, "chainId": chain.chain_id,
              "verifyingContract": chain.token}
    types = {"CancelAuthorization": [{"name": "authorizer", "type": "address"}, {"name": "nonce", "type": "bytes32"}]}
    signed = Account.sign_typed_data(payer.key, domain, types,
                                     {"authorizer": payer.address, "nonce": bytes.fromhex(nonce[2:])})
    abi = [{"name": "cancelAuthorization", "type": "function", "stateMutability": "nonpayable", "outputs": [],
            "inputs": [{"name": "authorizer", "type": "address"}, {"name": "nonce", "type": "bytes32"},
                       {"name": "v", "type": "uint8"}, {"name": "r", "type": "bytes32"}, {"name": "s", "type": "bytes32"}]}]
    call = w3.eth.contract(address=chain.token, abi=abi).functions.cancelAuthorization(
        payer.address, bytes.fromhex(nonce[2:]), signed.v, signed.r.to_bytes(32, "big"), signed.s.to_bytes(32, "big"))
    tx = call.build_transaction({"from": payer.address, "chainId": chain.chain_id, "gas": 100_000,
                                 "nonce": w3.eth.get_transaction_count(payer.address, "pending"),
                                 "maxPriorityFeePerGas": tip_wei, "maxFeePerGas": 4 * tip_wei + 10**10})
    return "0x" + bytes(w3.eth.send_raw_transaction(Account.sign_transaction(tx, payer.key).raw_transaction)).hex()


def receipt_status(chain: DevChain, tx_hash: str) -> int:
    return chain.web3().eth.wait_for_transaction_receipt(tx_hash, timeout=30)["status"]


# --- the gateway, as a buyer sees it ---------------------------------------------------------

def payment_status(live: LiveGateway, payment_id: str) -> dict:
    return httpx.get(f"{live.url}/api/agent/payments/{payment_id}", timeout=30).json()["data"]


def available_seats(live: LiveGateway) -> int:
    return httpx.get(f"{live.url}/api/pools/alpha", timeout=30).json()["data"]["blocks"][0]["availableSeats"]


def key_works(live: LiveGateway, api_key: str) -> int:
    """The status of a request made with the key (200 while it works, 403 once revoked)."""
    return httpx.get(f"{live.url}/v1/models", headers={"Authorization": f"Bearer {api_key}"}, timeout=30).status_code


def run_background_pass(live: LiveGateway) -> None:
    """One run of the gateway's background job (expiry, reconciler, reorg re-check), on its own loop."""
    live.server.call(live.services.jobs.run_once())


def revoked_count(reason: str) -> float:
    return REGISTRY.get_sample_value("agw_payments_revoked_total", {"reason": reason}) or 0.0
