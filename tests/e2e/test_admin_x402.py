"""The console against a real chain: a disabled account's wallet is refused before any money moves,
and the money view shows what was paid and the relayer's and payTo's balances."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from agent_gateway.testing.devchain import DevChain
from tests.fixtures.facilitator import facilitator_settings
from tests.fixtures.live import LiveGateway, live_gateway
from tests.fixtures.x402 import X402_POOLS, ChainView, chain_settings, challenge, payment_header, sign_authorization


pytestmark = pytest.mark.anyio
ADMIN_TOKEN = "adm-" + "x4" * 20
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}", "X-Admin-Actor": "ops"}
ORDER = {"pool": "alpha", "blocks": ["day"], "quantity": 1}
PRICE = 10_000_000


def assert_usdc_text(text: str, atomic: int) -> None:
    """The whole amount, to the atomic unit, with at least 2 decimals and no trailing zero past them
    ('398.97', '398.969134'): the pay-to wallet is shared by every test on the session's chain, so
    its balance need not be whole cents."""
    _, _, decimals = text.partition(".")
    assert Decimal(text) * 10**6 == atomic, (text, atomic)
    assert 2 <= len(decimals) <= 6 and (len(decimals) == 2 or not decimals.endswith("0")), text


@pytest.fixture
def console_x402(tmp_path: Path, sqlite_url: str, upstream, devchain: DevChain) -> Iterator[LiveGateway]:
    with live_gateway(tmp_path, sqlite_url, upstream, pools=X402_POOLS, admin_token=ADMIN_TOKEN,
                      **chain_settings(devchain)) as live:
        yield live


def pay(live: LiveGateway, devchain: DevChain, wallet) -> httpx.Response:
    with httpx.Client(base_url=live.url, timeout=60) as http:
        accepted = challenge(http, ORDER)
        authorization, signature = sign_authorization(devchain, wallet.key, payer=wallet.address,
                                                      to=accepted["payTo"], value=int(accepted["amount"]))
        return http.post("/api/agent/subscribe-pool", json=ORDER,
                         headers={"PAYMENT-SIGNATURE": payment_header(accepted, authorization, signature)})


async def test_a_disabled_accounts_wallet_is_refused_before_any_money_moves(console_x402, devchain):
    view = ChainView(devchain)
    wallet = view.new_wallet()
    first = pay(console_x402, devchain, wallet)
    assert first.status_code == 201, first.text
    account_id, subscription_id = first.json()["data"]["accountId"], first.json()["data"]["subscriptions"][0]["id"]
    with httpx.Client(base_url=console_x402.url, timeout=60) as http:
        r = http.post(f"/api/admin/accounts/{account_id}/disable", json={"reason": "chargeback fraud"}, headers=ADMIN)
        assert r.status_code == 200, r.text
        balance, pay_to, relayer = (view.usdc(wallet.address), view.usdc(devchain.pay_to), view.relayer_nonce())
        again = pay(console_x402, devchain, wallet)
        assert again.status_code == 403 and again.json()["error"]["code"] == "account_disabled", again.text
        # A renewal of its seat is refused before the 402: it is never asked to pay.
        r = http.post("/api/agent/renew", json={"subscriptionId": subscription_id})
        assert r.status_code == 403 and "PAYMENT-REQUIRED" not in r.headers
        assert (view.usdc(wallet.address), view.usdc(devchain.pay_to), view.relayer_nonce()) == (
            balance, pay_to, relayer)
        money = http.get("/api/admin/money", headers=ADMIN).json()["data"]
    assert money["revenueByPool"] == {"alpha": {"amount": "10.00", "payments": 1}}
    assert money["paymentsByState"]["delivered"] == {"count": 1, "amount": "10.00"}
    assert money["needsAttention"] == []
    balances = money["balances"]
    assert balances["payTo"] == devchain.pay_to
    assert_usdc_text(balances["payToUsdc"], view.usdc(devchain.pay_to))
    assert balances["relayer"] == devchain.relayer_address and int(balances["relayerNativeWei"]) > 0


async def test_in_facilitator_mode_the_money_view_shows_no_relayer_and_still_payto(tmp_path, sqlite_url, upstream,
                                                                                  devchain, facilitator):
    """With a facilitator there is no relayer key: the view says so instead of failing."""
    view = ChainView(devchain)
    with live_gateway(tmp_path, sqlite_url, upstream, pools=X402_POOLS, admin_token=ADMIN_TOKEN,
                      **facilitator_settings(devchain, facilitator)) as live:
        assert pay(live, devchain, view.new_wallet()).status_code == 201
        with httpx.Client(base_url=live.url, timeout=60) as http:
            r = http.get("/api/admin/money", headers=ADMIN)
    assert r.status_code == 200, r.text
    balances = r.json()["data"]["balances"]
    assert balances["relayer"] is None and balances["relayerNativeWei"] is None
    assert balances["payTo"] == devchain.pay_to
    assert_usdc_text(balances["payToUsdc"], view.usdc(devchain.pay_to))
