"""The dashboard in a real headless Chromium against a real gateway: sign-in, keys, forgery, pages."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route

from agent_gateway.testing.server import ServerThread
from agent_gateway.usage.recorder import UsageEvent
from tests.fixtures.browser import Browser, chromium  # noqa: F401  (fixture)
from tests.fixtures.live import LiveGateway, live_gateway

DASHBOARD_POOLS = """
[blocks]
day = "00:00-24:00"
asia = "00:00-08:00"
europe = "08:00-16:00"
americas = "16:00-24:00"

[pools.alpha]
name = "Alpha models"
description = "The test models, served by the test upstream."
models = ["test-model", "test-embedding"]
upstreams = ["{upstream}"]
seats = 500
annual_discount = "0.15"
prices = {{ day = "10.00", asia = "39.00", europe = "49.00", americas = "45.00" }}

[pools.small]
name = "Small pool"
models = ["small-1"]
upstreams = ["{upstream}"]
seats = 4
status = "funding"
prices = {{ europe = "5.00" }}
"""


@pytest.fixture
def live(tmp_path: Path, sqlite_url: str, upstream) -> Iterator[LiveGateway]:  # type: ignore[no-untyped-def]
    with live_gateway(tmp_path, sqlite_url, upstream, pools=DASHBOARD_POOLS) as running:
        yield running


@pytest.fixture
def browser(chromium, live: LiveGateway) -> Browser:  # noqa: F811
    return Browser(chromium, live.url)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def buy_seat(live: LiveGateway, mk: str, pool: str = "alpha", blocks: tuple[str, ...] = ("day",)) -> str:
    with live.admin() as http:
        r = http.post(f"/api/pools/{pool}/subscribe", json={"blocks": list(blocks), "quantity": 1},
                      headers=bearer(mk))
    assert r.status_code == 201, r.text
    return r.json()["data"]["subscriptions"][0]["id"]


def models_call(live: LiveGateway, sk: str) -> tuple[int, str | None]:
    with live.admin() as http:
        r = http.get("/v1/models", headers=bearer(sk))
    return r.status_code, (r.json().get("error") or {}).get("code") if r.status_code != 200 else None


def api_key_status(live: LiveGateway, mk: str, key_id: str) -> str | None:
    with live.admin() as http:
        keys = http.get("/api/keys", headers=bearer(mk)).json()["data"]
    return next((k["status"] for k in keys if k["id"] == key_id), None)


def key_row(browser: Browser, key_id: str) -> str:
    return f'#keys-table tr[data-key-id="{key_id}"]'


def confirm(browser: Browser, link_css: str, screenshot: str | None = None) -> None:
    browser.submit_and_wait(link_css, "#confirm-submit")
    if screenshot:
        browser.screenshot(screenshot)
    browser.submit_and_wait("#confirm-submit", ".flash")


def test_sign_in_create_a_key_shown_once_use_it_disable_enable_delete(browser: Browser, live: LiveGateway):
    mk = live.new_account()
    subscription_id = buy_seat(live, mk)

    browser.open("/dashboard/")
    browser.wait_for_path("/dashboard/signin")
    browser.wait_for("#management_key")
    browser.screenshot("01-signin")
    browser.sign_in(mk)
    browser.wait_for_path("/dashboard/keys")
    assert "No API keys yet" in browser.text()
    browser.screenshot("02-keys-empty")

    browser.type("#key-name", "browser key")
    browser.select("#key-subscription", subscription_id)
    plaintext = browser.submit_and_wait("#create-key-submit", "#new-key-value").text
    assert plaintext.startswith("sk_") and len(plaintext) > 40
    # The page's script points this history entry at the list: a reload is a GET, not a re-post.
    browser.wait_for_path("/dashboard/keys")
    browser.driver.execute_cdp_cmd("Browser.grantPermissions", {
        "origin": live.url, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    browser.click("#new-key-copy")
    browser.wait_for_text("#new-key-copy", "Copied")
    copied = browser.driver.execute_async_script(
        "var done = arguments[0]; navigator.clipboard.readText().then(done, function (e) { done('error: ' + e); });")
    assert copied == plaintext
    browser.screenshot("03-key-created-shown-once")

    browser.driver.refresh()
    row = browser.wait_for("#keys-table tbody tr")
    key_id = row.get_attribute("data-key-id")
    assert plaintext not in browser.driver.page_source
    assert not browser.has("#new-key-value")
    assert f"{plaintext[:7]}…{plaintext[-4:]}" in row.text
    assert "browser key" in row.text and "active" in row.text.lower()
    assert models_call(live, plaintext) == (200, None)

    confirm(browser, f'{key_row(browser, key_id)} [data-action="disable"]', "04-confirm-disable")
    assert "disabled" in browser.text(".flash-success")
    assert "disabled" in browser.text(key_row(browser, key_id)).lower()
    assert models_call(live, plaintext) == (403, "key_disabled")
    assert api_key_status(live, mk, key_id) == "disabled"
    browser.screenshot("05-key-disabled")

    confirm(browser, f'{key_row(browser, key_id)} [data-action="enable"]')
    assert "active" in browser.text(key_row(browser, key_id)).lower()
    assert models_call(live, plaintext) == (200, None)

    confirm(browser, f'{key_row(browser, key_id)} [data-action="delete"]', "06-confirm-delete")
    assert "deleted" in browser.text(".flash-success")
    assert not browser.has(key_row(browser, key_id))
    assert "No API keys yet" in browser.text()
    assert models_call(live, plaintext) == (403, "key_revoked")
    assert api_key_status(live, mk, key_id) is None


@pytest.mark.parametrize("attempt, shown", [
    ("mk_" + "x" * 43, "The management key is not valid."),
    ("sk_" + "x" * 43, "needs a management key"),
    ("hello", "The management key is not valid."),
])
def test_a_wrong_management_key_is_refused_at_sign_in(browser: Browser, live: LiveGateway, attempt, shown):
    live.new_account()
    browser.open("/dashboard/signin")
    browser.type("#management_key", attempt)
    error = browser.submit_and_wait("#signin-submit", "#signin-error")
    assert shown in error.text
    assert browser.path == "/dashboard/signin"
    if attempt == "hello":
        browser.screenshot("07-signin-refused")
    browser.open("/dashboard/keys")
    browser.wait_for_path("/dashboard/signin")
    assert browser.cookie("agw_dashboard") is not None  # the anonymous session holding the CSRF token


def attacker_site(target: str, csrf_token: str) -> Starlette:
    """Another origin serving a page that posts to the dashboard, even with a stolen token."""

    async def page(request):  # type: ignore[no-untyped-def]
        return HTMLResponse(
            f'<h1>Win a prize</h1><form method="post" action="{target}">'
            f'<input type="hidden" name="csrf_token" value="{csrf_token}">'
            '<button id="prize" type="submit">Claim</button></form>'
        )

    return Starlette(routes=[Route("/", page)])


def test_forged_form_posts_are_refused_and_change_nothing(browser: Browser, live: LiveGateway):
    mk = live.new_account()
    sk, key_id = live.new_key(mk, blocks=["day"])
    browser.sign_in(mk)
    browser.open(f"/dashboard/keys/{key_id}/disable")
    browser.wait_for("#confirm-submit")
    token = browser.find("#confirm input[name=csrf_token]").get_attribute("value")
    cookie = browser.cookie("agw_dashboard")
    assert token and cookie and token not in cookie  # the cookie is signed, the token is not readable from it
    target = f"{live.url}/dashboard/keys/{key_id}/disable"

    forgeries = {
        "no token": ({"agw_dashboard": cookie}, {}, {"origin": live.url}),
        "wrong token": ({"agw_dashboard": cookie}, {"csrf_token": "x" * 43}, {"origin": live.url}),
        "another origin": ({"agw_dashboard": cookie}, {"csrf_token": token}, {"origin": "http://evil.example"}),
        "another referer": ({"agw_dashboard": cookie}, {"csrf_token": token},
                            {"referer": "http://evil.example/page"}),
        "no origin or referer": ({"agw_dashboard": cookie}, {"csrf_token": token}, {}),
        "null origin": ({"agw_dashboard": cookie}, {"csrf_token": token}, {"origin": "null"}),
        "token without its session": ({}, {"csrf_token": token}, {"origin": live.url}),
        "forged cookie": ({"agw_dashboard": cookie[:-3] + "AAA"}, {"csrf_token": token}, {"origin": live.url}),
    }
    for name, (cookies, form, headers) in forgeries.items():
        with httpx.Client(cookies=cookies, timeout=30) as http:
            r = http.post(target, data=form, headers=headers)
        assert r.status_code == 403, name
        assert "This form was refused" in r.text and "Nothing was changed" in r.text, name
        assert api_key_status(live, mk, key_id) == "active", name
    assert models_call(live, sk) == (200, None)

    # A page on another origin of the same site: the browser sends the cookie and a leaked token,
    # and the Origin check alone refuses it.
    with ServerThread(attacker_site(target, token)) as attacker:
        browser.driver.get(attacker.url + "/")
        browser.submit_and_wait("#prize", "#error-page")
    assert "sent from another site" in browser.text("#error-page")
    browser.screenshot("08-forged-post-refused")
    assert api_key_status(live, mk, key_id) == "active"
    assert models_call(live, sk) == (200, None)

    # The same post from the dashboard's own origin goes through: the refusals above were the checks.
    with httpx.Client(cookies={"agw_dashboard": cookie}, timeout=30) as http:
        r = http.post(target, data={"csrf_token": token}, headers={"origin": live.url})
    assert r.status_code == 303
    assert api_key_status(live, mk, key_id) == "disabled"
    assert models_call(live, sk) == (403, "key_disabled")


def test_management_keys_last_key_refusal_create_once_and_revocation_ends_the_session(
    browser: Browser, live: LiveGateway
):
    mk = live.new_account()
    browser.sign_in(mk)
    browser.open("/dashboard/management-keys")
    row = browser.wait_for("#mkeys-table tbody tr")
    first_id = row.get_attribute("data-key-id")
    assert "this session" in row.text

    confirm(browser, f'#mkeys-table tr[data-key-id="{first_id}"] [data-action="revoke"]', "09-confirm-revoke")
    assert "last management key" in browser.text(".flash-error")
    assert browser.path == "/dashboard/management-keys"
    browser.screenshot("10-last-management-key-refused")

    browser.type("#mkey-name", "second")
    second = browser.submit_and_wait("#create-mkey-submit", "#new-mkey-value").text
    assert second.startswith("mk_")
    browser.wait_for_path("/dashboard/management-keys")
    browser.screenshot("11-management-key-created")
    browser.driver.refresh()
    browser.wait_for("#mkeys-table")
    assert second not in browser.driver.page_source
    assert len(browser.find_all("#mkeys-table tbody tr")) == 2

    # Revoked elsewhere (the API, with the other key): the next page view ends the session.
    with live.admin() as http:
        r = http.delete(f"/api/management-keys/{first_id}", headers=bearer(second))
    assert r.status_code == 200, r.text
    browser.open("/dashboard/keys")
    browser.wait_for_path("/dashboard/signin")
    assert "session ended" in browser.text(".flash-error")
    browser.screenshot("12-session-ended")

    browser.sign_in(second)
    browser.wait_for_path("/dashboard/keys")
    browser.submit_and_wait("#signout", ".flash-info")
    assert browser.path == "/dashboard/signin" and "signed out" in browser.text(".flash-info")
    browser.open("/dashboard/subscriptions")
    browser.wait_for_path("/dashboard/signin")


def test_every_page_renders_from_the_gateway_alone(browser: Browser, live: LiveGateway):
    mk = live.new_account()
    live.new_key(mk, blocks=["day"])
    keyless = buy_seat(live, mk, blocks=("europe", "americas"))
    browser.sign_in(mk)

    browser.open("/dashboard/keys")
    browser.wait_for("#keys-table")
    options = browser.find_all("#key-subscription option")
    assert [o.get_attribute("value") for o in options] == [keyless]  # active seats without a key only
    browser.screenshot("13-keys")
    check_no_external_fetch(browser, live)

    browser.open("/dashboard/subscriptions")
    table = browser.wait_for("#subscriptions-table")
    assert len(browser.find_all("#subscriptions-table tbody tr")) == 2
    assert "day 00:00-24:00" in table.text and "europe 08:00-16:00" in table.text
    assert "Create its key" in browser.text(f'tr[data-subscription-id="{keyless}"]')
    assert f"{live.url}/api/pools/alpha/subscribe" in browser.text("#curl-subscribe")
    # Payments are off on this gateway: no x402 path is offered (the agent and renewal examples are
    # checked with payments on in tests/e2e/test_payment_paths.py), and the page says how balance comes.
    assert not browser.has("#curl-agent") and not browser.has("#curl-renew")
    assert not browser.has('a[href*="renew="]')
    assert "x402" not in browser.text() and "PAYMENT-SIGNATURE" not in browser.text()
    assert "the operator credits the prepaid balance" in browser.text("#no-x402")
    browser.screenshot("14-subscriptions")
    check_no_external_fetch(browser, live)

    browser.open("/dashboard/management-keys")
    browser.wait_for("#mkeys-table")
    browser.screenshot("17-management-keys")
    check_no_external_fetch(browser, live)

    browser.open("/dashboard/does-not-exist")
    browser.wait_for_text("#error-page", "Page not found")
    browser.screenshot("18-not-found")


def seed_usage(live: LiveGateway, mk: str, key_id: str) -> dict[datetime, int]:
    """Past requests written through the gateway's own usage recorder: {when: how many}."""
    with live.admin() as http:
        account_id = http.get("/api/account", headers=bearer(mk)).json()["data"]["id"]
        keys = http.get("/api/keys", headers=bearer(mk)).json()["data"]
    subscription_id = next(k["subscriptionId"] for k in keys if k["id"] == key_id)
    now = datetime.now(UTC)
    history = {now - timedelta(hours=h): n for h, n in ((3, 2), (5, 4), (9, 1))}
    history.update({now - timedelta(days=d, hours=1): 1 + (d * 5) % 7 for d in range(1, 13)})

    async def record() -> None:
        for at, count in history.items():
            for _ in range(count):
                live.services.usage.record(UsageEvent(
                    api_key_id=key_id, account_id=account_id, subscription_id=subscription_id,
                    endpoint="chat.completions", model="test-model", status_code=200, prompt_tokens=120,
                    completion_tokens=380, latency_ms=900.0, usage_source="upstream", created_at=at))
        await live.services.usage.flush()

    live.server.call(record())
    return history


def test_usage_page_counts_requests_and_tokens_per_key_and_per_day(browser: Browser, live: LiveGateway):
    mk = live.new_account()
    sk, key_id = live.new_key(mk, blocks=["day"])
    with live.admin() as http:
        for _ in range(3):
            r = http.post("/v1/chat/completions", headers=bearer(sk),
                          json={"model": "test-model", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200, r.text
    history = seed_usage(live, mk, key_id)
    now = datetime.now(UTC)
    expected = {window: 3 + sum(n for at, n in history.items() if now - at < span)
                for window, span in {"24h": timedelta(days=1), "7d": timedelta(days=7),
                                     "30d": timedelta(days=30)}.items()}
    assert expected["24h"] < expected["7d"] < expected["30d"]
    browser.sign_in(mk)

    # The proxy's own usage is written in batches: reload until all of it is counted.
    browser.open("/dashboard/usage?window=24h")
    browser.wait(lambda d: d.refresh() or browser.text("#stat-requests") == str(expected["24h"]),
                 f"usage never showed {expected['24h']} requests")
    for window, count in expected.items():
        cell = browser.find(f'#usage-table td[data-window="{window}"][data-metric="requests"]')
        assert cell.text == f"{count:,}", window
    browser.screenshot("15-usage-24h")
    check_no_external_fetch(browser, live)

    browser.open("/dashboard/usage?window=30d")
    browser.wait_for_text("#stat-requests", str(expected["30d"]))
    per_day: dict[str, int] = {f"{now:%b %d}": 3}
    for at, count in history.items():
        per_day[f"{at:%b %d}"] = per_day.get(f"{at:%b %d}", 0) + count
    bars = {title.get_attribute("textContent") for title in browser.find_all(".chart:first-child rect.bar title")}
    for day, count in per_day.items():
        assert f"{day}: {count} requests" in bars, (day, bars)
    browser.screenshot("16-usage-30d")

    browser.open("/dashboard/usage?window=7d")
    browser.wait_for_text("#stat-requests", str(expected["7d"]))


def test_public_pools_page_shows_models_and_seats_without_sign_in(browser: Browser, live: LiveGateway):
    browser.open("/dashboard/pools")
    alpha = browser.wait_for("#pool-alpha")
    assert "test-model" in alpha.text and "test-embedding" in alpha.text
    seats = '#pool-alpha tr[data-block="day"] .seats'
    day = browser.text('#pool-alpha tr[data-block="day"]')
    assert "00:00-24:00" in day and "10.00 USDC" in day
    assert browser.text(seats) == "500 / 500"
    assert "funding" in browser.text("#pool-small").lower()
    assert "Sign in" in browser.text(".who")
    check_no_external_fetch(browser, live)

    buy_seat(live, live.new_account())
    browser.driver.refresh()
    browser.wait_for_text(seats, "499 / 500")
    browser.screenshot("19-pools")


def check_no_external_fetch(browser: Browser, live: LiveGateway) -> None:
    loaded = browser.resources_loaded()
    assert loaded, "the page loaded no stylesheet or script"
    assert all(url.startswith(live.url + "/dashboard/static/") for url in loaded), loaded
    html = browser.driver.page_source
    external = re.findall(r'(?:src|href)="(https?://[^"]+)"', html)
    assert not [url for url in external if not url.startswith(live.url)], external


# --- Layout: phone, tablet and desktop widths ------------------------------------------------------

WIDTHS = {"phone": 390, "tablet": 768, "desktop": 1280}
LAYOUT_PAGES = {
    "keys": "/dashboard/keys", "subscriptions": "/dashboard/subscriptions", "usage": "/dashboard/usage",
    "management-keys": "/dashboard/management-keys", "pools": "/dashboard/pools", "buy": "/dashboard/buy",
    "buy-review": "/dashboard/buy/review?pool=alpha&blocks=europe&blocks=americas&quantity=2&cycle=year",
}
# For each nav link: inside the viewport, and the topmost element at its centre (not clipped or covered).
NAV_PROBLEMS = """
var problems = [];
var links = document.querySelectorAll('.nav a');
if (!links.length) { problems.push('no nav links'); }
links.forEach(function (a) {
  var r = a.getBoundingClientRect();
  var name = a.textContent.trim();
  if (r.width < 1 || r.height < 1) { problems.push(name + ': not shown'); return; }
  if (r.left < 0 || r.top < 0 || r.right > window.innerWidth || r.bottom > window.innerHeight) {
    problems.push(name + ': outside the viewport ' + JSON.stringify([r.left, r.top, r.right, r.bottom]));
    return;
  }
  if (r.height < 24) { problems.push(name + ': a target ' + r.height + 'px tall'); }
  var hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
  if (!hit || !(hit === a || a.contains(hit))) { problems.push(name + ': covered by ' + (hit && hit.outerHTML.slice(0, 60))); }
});
// Cards stay inside the page (a card running past the right edge hides its contents' end).
document.querySelectorAll('main .card, main .stat-inline').forEach(function (card) {
  var r = card.getBoundingClientRect();
  if (r.right > document.documentElement.clientWidth + 0.5) {
    problems.push((card.id || card.className) + ': runs past the right edge to ' + r.right);
  }
});
return problems;
"""


def set_viewport(browser: Browser, width: int) -> None:
    browser.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": 900, "deviceScaleFactor": 1, "mobile": width < 600})


@pytest.mark.parametrize("device", list(WIDTHS))
def test_every_page_fits_the_width_and_keeps_a_usable_nav(browser: Browser, live: LiveGateway, device: str):
    width = WIDTHS[device]
    mk = live.new_account()
    live.new_key(mk, blocks=["day"])
    buy_seat(live, mk, blocks=("europe", "americas"))
    history_key = live.new_key(mk, blocks=["asia", "europe", "americas"])[1]
    seed_usage(live, mk, history_key)
    set_viewport(browser, width)
    browser.sign_in(mk)
    problems = {}
    for name, path in LAYOUT_PAGES.items():
        browser.open(path)
        browser.wait_for("main h1")
        scroll_width, inner_width = browser.driver.execute_script(
            "return [document.documentElement.scrollWidth, window.innerWidth]")
        browser.screenshot(f"layout-{name}-{width}")
        found = browser.driver.execute_script(NAV_PROBLEMS)
        # A phone widens its layout viewport to fit content that does not fit: that is sideways scrolling too.
        if scroll_width > inner_width or inner_width != width:
            found.append(f"scrolls sideways: {scroll_width}px of content, {inner_width}px layout, {width}px screen")
        if found:
            problems[name] = found
    assert problems == {}, f"at {width}px"
    # The nav works by clicking, at this width: every link leads to its page.
    for label, path in (("Subscriptions", "/dashboard/subscriptions"), ("Pools", "/dashboard/pools"),
                        ("Management keys", "/dashboard/management-keys")):
        link = next(a for a in browser.find_all(".nav a") if a.text.strip() == label)
        link.click()
        browser.wait_for_path(path)


def test_a_person_buys_a_seat_in_the_browser_and_mints_its_key(browser: Browser, live: LiveGateway):
    mk = live.new_account(credit_usdc=100)
    browser.sign_in(mk)
    browser.open("/dashboard/pools")
    browser.submit_and_wait('#pool-alpha [data-action="buy"]', "#buy-form")
    assert browser.path == "/dashboard/buy?pool=alpha"
    browser.click("#block-europe")
    browser.click("#block-americas")
    browser.screenshot("21-buy-form")
    browser.submit_and_wait("#buy-review", "#confirm")
    # The confirmation shows the exact price (49.00 + 45.00 for 30 days) and the balance it comes from.
    assert browser.text("#order-total") == "94.00 USDC"
    assert browser.text("#order-balance") == "100.00 USDC"
    assert "Pay 94.00 USDC" in browser.text("#confirm-submit")
    browser.screenshot("22-buy-confirm")
    browser.submit_and_wait("#confirm-submit", ".flash-success")
    assert browser.path.startswith("/dashboard/subscriptions?bought=sub_")
    assert "Bought 1 seat on Alpha models (europe, americas) for 94.00 USDC" in browser.text(".flash-success")
    assert browser.text("#balance") == "6.00 USDC"
    row = browser.wait_for("#subscriptions-table tr.just-bought")
    assert "europe" in row.text and "americas" in row.text and "active" in row.text.lower()
    browser.screenshot("23-bought")
    with live.admin() as http:
        subscriptions = http.get("/api/subscriptions", headers=bearer(mk)).json()["data"]
    assert [(s["blocks"], s["price"]) for s in subscriptions] == [(["europe", "americas"], "94.00")]

    # "Create its key" leads to the key form with this seat chosen.
    browser.submit_and_wait('tr.just-bought [data-action="mint"]', "#create-key")
    browser.type("#key-name", "bought in the browser")
    plaintext = browser.submit_and_wait("#create-key-submit", "#new-key-value").text
    assert plaintext.startswith("sk_")
    assert models_call(live, plaintext) == (200, None)

    # A second seat is more than the 6.00 USDC left: the confirmation says how to add balance, no x402.
    browser.open("/dashboard/buy?pool=alpha&blocks=day")
    browser.submit_and_wait("#buy-review", "#short-balance")
    assert "Add at least 4.00 USDC" in browser.text("#short-balance")
    assert "x402" not in browser.text() and not browser.has("#confirm-submit")
    browser.screenshot("24-buy-short-balance")
