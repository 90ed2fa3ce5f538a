"""With x402 payments on, every place that suggests a way to pay names x402; with them off
(tests/integration/test_admission.py, test_catalog.py, test_subscribe.py, test_dashboard_buy.py and
the dashboard browser tests) none does."""

from __future__ import annotations

import base64
import html
import json
import re

import httpx
import pytest

from tests.fixtures.browser import Browser, chromium  # noqa: F401  (fixture)
from tests.fixtures.live import LiveGateway


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_with_payments_on_the_api_points_agents_at_x402(x402_gateway: LiveGateway):
    with x402_gateway.admin() as http:
        plans = http.get("/api/agent/plans").json()["data"]
        assert plans["x402"] is True
        alpha = next(p for p in plans["products"] if p["pool"] == "alpha")
        checkout = alpha["agentCheckout"]
        assert checkout["endpoint"] == "/api/agent/subscribe-pool" and checkout["method"] == "POST"
        assert checkout["body"]["pool"] == "alpha" and checkout["body"]["quantity"] == 1
        # The checkout it names answers with the x402 challenge.
        challenge = http.post(checkout["endpoint"], json=checkout["body"])
        assert challenge.status_code == 402 and "payment-required" in challenge.headers

        no_key = http.post("/v1/chat/completions", json={"model": "test-model", "messages": []})
        assert no_key.status_code == 402
        assert no_key.json()["buy"]["agents"] == "/api/agent/subscribe-pool"


def test_with_payments_on_a_short_balance_offers_the_x402_challenge_and_how_to_add_balance(
    x402_gateway: LiveGateway,
):
    mk = x402_gateway.new_account(credit_usdc=0)
    with x402_gateway.admin() as http:
        r = http.post("/api/pools/alpha/subscribe", json={"blocks": ["day"], "quantity": 1}, headers=bearer(mk))
    assert r.status_code == 402
    message = r.json()["error"]["message"]
    assert "Add at least 10.00 USDC" in message and "accounts credit acct_" in message
    assert "Or pay with x402: retry with PAYMENT-SIGNATURE." in message
    required = json.loads(base64.b64decode(r.headers["payment-required"]))
    assert required["accepts"][0]["amount"] == "10000000"


def dashboard_session(live: LiveGateway, mk: str) -> httpx.Client:
    client = httpx.Client(base_url=live.url, timeout=30)
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/dashboard/signin").text).group(1)
    r = client.post("/dashboard/signin", data={"csrf_token": token, "management_key": mk},
                    headers={"origin": live.url})
    assert r.status_code == 303, r.text
    return client


def test_with_payments_on_the_buy_page_says_plainly_that_a_browser_cannot_pay_x402(x402_gateway: LiveGateway):
    mk = x402_gateway.new_account(credit_usdc=5)
    client = dashboard_session(x402_gateway, mk)
    try:
        page = client.get("/dashboard/buy/review?pool=alpha&blocks=day&quantity=1&cycle=month")
    finally:
        client.close()
    assert page.status_code == 402
    short = html.unescape(re.search(r'id="short-balance">([^<]+)<', page.text).group(1))
    assert "Add at least 5.00 USDC" in short
    assert "needs a wallet signing the payment, which this page cannot do" in short
    assert "PAYMENT-SIGNATURE" in short and 'id="confirm-submit"' not in page.text


@pytest.fixture
def browser(chromium, x402_gateway: LiveGateway) -> Browser:  # noqa: F811
    return Browser(chromium, x402_gateway.url)


def test_with_payments_on_the_subscriptions_page_shows_the_agent_and_renewal_examples(
    browser: Browser, x402_gateway: LiveGateway
):
    live = x402_gateway
    mk = live.new_account()
    subs = []
    with live.admin() as http:
        for _ in range(2):
            r = http.post("/api/pools/alpha/subscribe", json={"blocks": ["day"], "quantity": 1}, headers=bearer(mk))
            assert r.status_code == 201, r.text
            subs.append(r.json()["data"]["subscriptions"][0]["id"])
    browser.sign_in(mk)
    browser.open("/dashboard/subscriptions")
    browser.wait_for("#subscriptions-table")
    assert f"{live.url}/api/agent/subscribe-pool" in browser.text("#curl-agent")
    assert f"{live.url}/api/agent/renew" in browser.text("#curl-renew")
    assert subs[1] not in browser.text("#curl-renew")  # the first active seat by default
    assert not browser.has("#no-x402")
    browser.click(f'tr[data-subscription-id="{subs[1]}"] a[href*="renew="]')
    browser.wait_for_text("#curl-renew", f'"subscriptionId": "{subs[1]}"')
    browser.screenshot("20-subscriptions-with-x402")
    browser.open("/dashboard/pools")
    assert "/api/agent/subscribe-pool" in browser.wait_for(".pools + .card").text
