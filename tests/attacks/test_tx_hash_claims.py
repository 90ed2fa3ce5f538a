"""The tx-hash flow (the buyer transfers USDC itself, then claims the transaction): an overpayment
is credited, never kept silently; a claim names this chain and this deployment, so it cannot be
replayed at another gateway; and only recent transfers can be claimed."""

from __future__ import annotations

import shutil

import httpx
import pytest

from agent_gateway.accounts.service import get_account
from tests.attacks.conftest import ATTACK_POOLS, ORDER, PRICE, attack_gateway_settings, rpc
from tests.e2e.test_x402 import claim_signature, transfer
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
