"""The operator's pages in a real headless Chromium against one real gateway on the anvil chain:
pools (state, seats, in flight, funding; a state change and a reload, good and bad), payments
needing attention (made through the real payment paths and the ledger), and an account (search,
view, credit and debit, disable). One gateway and one signed-in browser serve the whole module:
each test uses pools and accounts of its own, so they do not disturb each other."""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account as EthAccount
from x402.http.clients import x402HttpxClient

from agent_gateway.catalog.pricing import make_order
from agent_gateway.payments import ledger
from agent_gateway.payments.ledger import Claim
from agent_gateway.testing.devchain import DevChain, token_contract
from tests.e2e.test_x402 import PRICE, buy_in_background, claim_signature, official_client, transfer
from tests.fixtures.browser import Browser, start_chromium
from tests.fixtures.live import LiveGateway, live_gateway
from tests.fixtures.x402 import ChainView, chain_settings

pytestmark = pytest.mark.anyio
ADMIN_TOKEN = "adm-" + "b7" * 20
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}", "X-Admin-Actor": "ops"}
OPERATOR = "olga"
REFUND_WALLET_USDC = 50 * 10**6
POOLS = """
[blocks]
day = "00:00-24:00"
night = "00:00-08:00"

[pools.alpha]
name = "Alpha"
models = ["test-model"]
upstreams = ["{upstream}"]
seats = 50
prices = {{ day = "10.00" }}

[pools.beta]
name = "Beta"
models = ["beta-model"]
upstreams = ["{upstream}"]
seats = 7
prices = {{ day = "4.00", night = "2.00" }}

[pools.one]
name = "One seat"
models = ["one-model"]
upstreams = ["{upstream}"]
seats = 1
prices = {{ day = "3.00" }}

[pools.round]
name = "Seed round"
models = ["round-model"]
upstreams = ["{upstream}"]
seats = 10
status = "funding"
funding_goal = 5
funding_deadline = 2031-01-31T00:00:00Z
prices = {{ day = "6.00" }}
"""


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path, upstream_session,
            devchain: DevChain) -> Iterator[LiveGateway]:
    directory = tmp_path_factory.mktemp("admin-browser")
    shutil.copyfile(sqlite_template, directory / "live.db")
    refund_wallet = ChainView(devchain).new_wallet(usdc_atomic=REFUND_WALLET_USDC, eth_wei=10**18)
    with live_gateway(directory, f"sqlite:///{directory / 'live.db'}", upstream_session, pools=POOLS,
                      admin_token=ADMIN_TOKEN, session_secret="s" * 40,
                      **chain_settings(devchain, reorg_horizon_blocks=1, refund_private_key=refund_wallet.key)) as live:
        yield live


@pytest.fixture(scope="module")
def operator(tmp_path_factory: pytest.TempPathFactory, console: LiveGateway) -> Iterator[Browser]:
    """One Chromium signed in to the operator's pages for the whole module."""
    driver = start_chromium(tmp_path_factory.mktemp("chromium") / "profile")
    try:
        browser = Browser(driver, console.url)
        browser.open("/dashboard/admin")
        browser.wait_for_path("/dashboard/admin/signin")
        browser.type("#admin_token", ADMIN_TOKEN)
        browser.type("#actor", OPERATOR)
        browser.submit_and_wait("#admin-signin-submit", "#admin-actor")
        browser.wait_for_path("/dashboard/admin")
        yield browser
    finally:
        driver.quit()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def subscribe(live: LiveGateway, mk: str, pool: str, blocks: list[str], quantity: int = 1) -> list[dict]:
    with live.admin() as http:
        r = http.post(f"/api/pools/{pool}/subscribe", json={"blocks": blocks, "quantity": quantity}, headers=bearer(mk))
    assert r.status_code == 201, r.text
    return r.json()["data"]["subscriptions"]


def mint(live: LiveGateway, mk: str, subscription_id: str) -> dict:
    with live.admin() as http:
        r = http.post("/api/keys/subscription", json={"name": "browser", "subscriptionId": subscription_id},
                      headers=bearer(mk))
    assert r.status_code == 201, r.text
    return r.json()["data"]


def v1_call(live: LiveGateway, sk: str, model: str) -> tuple[int, str | None]:
    """One chat completion on the key: (status, error code or None)."""
    with live.admin() as http:
        r = http.post("/v1/chat/completions", headers=bearer(sk),
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    return r.status_code, None if r.status_code == 200 else r.json()["error"]["code"]


def block_row(browser: Browser, pool: str, block: str) -> tuple[str, str]:
    row = f'#admin-pool-{pool} tr[data-block="{block}"]'
    return browser.text(f"{row} .sold"), browser.text(f"{row} .left")


def submit_form(browser: Browser, button_css: str, **fields: str) -> str:
    """Fill the fields of the form holding `button_css`, submit it, and return the flash shown."""
    form = browser.find(button_css).find_element("xpath", "./ancestor::form")
    for name, value in fields.items():
        field = form.find_element("css selector", f'[name="{name}"]')
        if field.tag_name == "select":
            from selenium.webdriver.support.ui import Select
            Select(field).select_by_value(value)
        else:
            field.clear()
            field.send_keys(value)
    return browser.submit_and_wait(button_css, ".flash").text


def audit_rows(browser: Browser) -> list[str]:
    browser.open("/dashboard/admin/audit")
    browser.wait_for("#audit")
    return [row.text for row in browser.find_all("#audit tbody tr")]


# --- pools -----------------------------------------------------------------------------------

async def test_the_pools_page_shows_seats_in_flight_and_funding_and_changes_a_state(console, operator):
    mk = console.new_account()
    bought = subscribe(console, mk, "beta", ["day", "night"], quantity=2)
    key = mint(console, mk, bought[0]["id"])
    subscribe(console, mk, "round", ["day"], quantity=2)  # two pledges towards a goal of five
    result, lease = await console.on_server(console.services.leases.acquire(key["id"]))
    assert lease is not None, result
    try:
        operator.open("/dashboard/admin")
        operator.wait_for("#admin-pool-beta")
        assert block_row(operator, "beta", "day") == ("2", "5")
        assert block_row(operator, "beta", "night") == ("2", "5")
        assert operator.text("#admin-pool-beta .in-flight") == "1"
        assert operator.text("#admin-pool-alpha .in-flight") == "0"
        assert "Funding: 2/5 seats pledged" in operator.text("#admin-pool-round .funding")
        assert "funding" in operator.text("#admin-pool-round .pool-actions").lower()
        operator.screenshot("admin-01-pools")
    finally:
        await console.on_server(console.services.leases.release(lease))
    operator.driver.refresh()
    operator.wait_for_text("#admin-pool-beta .in-flight", "0")

    assert v1_call(console, key["apiKey"], "beta-model") == (200, None)
    flash = submit_form(operator, '#admin-pool-beta [data-action="set-state"]', status="paused",
                        reason="upstream maintenance")
    assert "Pool beta is now paused" in flash
    assert "paused" in operator.text("#admin-pool-beta .pool-actions").lower()
    # Neither served nor sold, at once, and the public catalog says so.
    assert v1_call(console, key["apiKey"], "beta-model") == (503, "pool_not_active")
    with console.admin() as http:
        assert http.get("/api/pools/beta").json()["data"]["status"] == "paused"
    # A move the table does not allow is not offered: a paused pool goes back to active only.
    options = [o.get_attribute("value") for o in operator.find_all('#admin-pool-beta select[name="status"] option')]
    assert options == ["active"]
    flash = submit_form(operator, '#admin-pool-beta [data-action="set-state"]', status="active", reason="done")
    assert "Pool beta is now active" in flash
    assert v1_call(console, key["apiKey"], "beta-model") == (200, None)
    rows = audit_rows(operator)
    assert any(OPERATOR in r and "pool.state" in r and "upstream maintenance" in r and "paused" in r for r in rows)


async def test_reloading_the_pools_file_from_the_page_applies_a_good_file_and_a_bad_one_changes_nothing(
        console, operator):
    mk = console.new_account()
    subscribe(console, mk, "beta", ["night"], quantity=1)
    pools_file = console.settings.pools_file
    original = pools_file.read_text()
    operator.open("/dashboard/admin")
    sold, left = block_row(operator, "beta", "night")
    try:
        # Seats below those sold: refused, saying why; nothing changes.
        pools_file.write_text(original.replace("seats = 7", "seats = 0"))
        flash = submit_form(operator, "#reload-pools", reason="shrink beta")
        assert "flash-error" in operator.find(".flash").get_attribute("class")
        assert "beta" in flash and "seats" in flash, flash
        assert block_row(operator, "beta", "night") == (sold, left)
        operator.screenshot("admin-02-reload-refused")
        # Not TOML at all: refused too.
        pools_file.write_text("[pools.beta\nseats = ")
        flash = submit_form(operator, "#reload-pools")
        assert "flash-error" in operator.find(".flash").get_attribute("class") and "TOML" in flash, flash
        assert block_row(operator, "beta", "night") == (sold, left)
        with console.admin() as http:
            assert http.get("/api/pools/beta").json()["data"]["seatsPerBlock"] == 7

        # Two more seats: applied without a restart.
        pools_file.write_text(original.replace("seats = 7", "seats = 9"))
        flash = submit_form(operator, "#reload-pools", reason="grow beta")
        assert "Pools file applied" in flash
        assert block_row(operator, "beta", "night") == (sold, str(int(left) + 2))
        with console.admin() as http:
            assert http.get("/api/pools/beta").json()["data"]["seatsPerBlock"] == 9
    finally:
        pools_file.write_text(original)
        with console.admin() as http:
            assert http.post("/api/admin/pools/reload", json={"reason": "test cleanup"}, headers=ADMIN).status_code == 200
    rows = audit_rows(operator)
    assert any("pools.reload" in r and "grow beta" in r and OPERATOR in r for r in rows)
    assert not any("shrink beta" in r for r in rows)  # a refused reload changed nothing, so nothing is recorded


# --- payments needing attention --------------------------------------------------------------

async def pending_past_window(live: LiveGateway, payer: str) -> str:
    """An x402 payment taken through the ledger to `broadcast` (its settlement stored as sent) whose
    authorization's window has passed with no receipt: the reconciler's next pass decides it, and
    until then it needs a look. (On the chain this takes the authorization's whole window, at
    least AGW_PAYMENT_TIMEOUT_S; the ledger service makes the same rows at once.)"""
    services = live.services
    db, clock = services.db, services.clock
    order = make_order(services.catalog, "alpha", ["day"], 1, "month")
    claim = Claim(method="x402-exact", network=f"eip155:{live.settings.chain_id}",
                  payer=payer, amount_atomic=order.total_atomic, auth_nonce="0x" + secrets.token_hex(32),
                  valid_before=int(time.time()) - 60)
    payment = await ledger.record_received(db, clock, claim, order, account_id=None, key_name="agent")
    assert await ledger.advance(db, clock, payment.id, "received", "verified")
    payment.state = "verified"
    await ledger.reserve(db, clock, services.catalog, payment)
    assert await ledger.advance(db, clock, payment.id, "reserved", "broadcast", tx_hash="0x" + secrets.token_hex(32))
    return payment.id


@contextmanager
def blocks_mined_by_hand(devchain: DevChain) -> Iterator[Any]:
    """Anvil stops mining each transaction as it arrives, so that several land in one block, in the
    order of their tips; mining resumes after."""
    w3 = devchain.web3()
    w3.provider.make_request("evm_setAutomine", [False])
    try:
        yield w3
    finally:
        w3.provider.make_request("evm_setAutomine", [True])


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # polling the chain for the condition, bounded by the deadline


def failed_after_broadcast(live: LiveGateway, devchain: DevChain, view: ChainView) -> str:
    """A real x402 purchase whose settlement is broadcast and then reverts: the payer moves its
    USDC away with a higher tip in the same block. The authorization stays unused, so the payment
    fails (`settlement_reverted`) with its transaction on record."""
    wallet, elsewhere = view.new_wallet(usdc_atomic=PRICE), view.new_wallet(usdc_atomic=0, eth_wei=0)
    with blocks_mined_by_hand(devchain) as w3:
        relayer_nonce = w3.eth.get_transaction_count(devchain.relayer_address)
        buyer, outcome = buy_in_background(devchain, wallet, live.url)
        wait_until(lambda: w3.eth.get_transaction_count(devchain.relayer_address, "pending") > relayer_nonce,
                   "the gateway to broadcast its settlement")
        tx = token_contract(w3, devchain.token).functions.transfer(elsewhere.address, PRICE).build_transaction(
            {"from": wallet.address, "nonce": w3.eth.get_transaction_count(wallet.address), "chainId": devchain.chain_id,
             "gas": 100_000, "maxPriorityFeePerGas": 200 * 10**9, "maxFeePerGas": 400 * 10**9})
        w3.eth.send_raw_transaction(EthAccount.sign_transaction(tx, wallet.key).raw_transaction)
        w3.provider.make_request("evm_mine", [])
    buyer.join(60)
    response = outcome.get("response")
    assert response is not None and response.status_code == 402, outcome
    assert response.json()["error"]["code"] == "settlement_reverted", response.text
    assert view.usdc(elsewhere.address) == PRICE
    with live.admin() as http:
        money = http.get("/api/admin/money", headers=ADMIN).json()["data"]
    [failed] = [a for a in money["needsAttention"] if a["payer"] == wallet.address.lower()]
    assert failed["state"] == "failed" and failed["txHash"]
    return failed["id"]


async def credited_payment(live: LiveGateway, devchain: DevChain, view: ChainView) -> str:
    """A tx-hash payment for the last seat of pool "one", bought by a rival between the transfer and
    the claim: the money is credited to the payer's balance (the real path, on the chain)."""
    wallet, rival = view.new_wallet(), view.new_wallet()
    order = {"pool": "one", "blocks": ["day"], "quantity": 1}
    paid = transfer(devchain, wallet, devchain.pay_to, 3_000_000)
    async with x402HttpxClient(official_client(devchain, rival), base_url=live.url, timeout=60) as http:
        assert (await http.post("/api/agent/subscribe-pool", json=order)).status_code == 201
    r = httpx.post(live.url + "/api/agent/subscribe-pool", timeout=30,
                   json={**order, "txHash": paid, "signature": claim_signature(wallet.key, paid, live)})
    assert r.status_code == 409 and r.json()["error"]["code"] == "sold_out_after_payment", r.text
    with live.admin() as http:
        found = http.get("/api/admin/accounts", params={"q": wallet.address}, headers=ADMIN).json()["data"]
        detail = http.get(f"/api/admin/accounts/{found[0]['id']}", headers=ADMIN).json()["data"]
    [payment] = [p for p in detail["payments"] if p["txHash"] == paid]
    assert payment["state"] == "credited"
    return payment["id"]


async def reorganised(live: LiveGateway, payment_id: str) -> None:
    """What the reorg pass does when a delivered payment's transfer is no longer on the chain (a
    reorganisation, which a shared test chain cannot stage): revoke it and end its keys."""
    services = live.services
    revocation = await ledger.revoke(services.db, services.clock, payment_id, "transfer_gone")
    assert revocation is not None
    await services.keys.end_revoked_keys(revocation.key_ids, "payment_revoked")


async def test_the_money_page_lists_the_payments_needing_attention_first(console, operator, devchain):
    view = ChainView(devchain)
    delivered = []
    for buyer in (view.new_wallet(), view.new_wallet()):
        async with x402HttpxClient(official_client(devchain, buyer), base_url=console.url, timeout=60) as http:
            r = await http.post("/api/agent/subscribe-pool", json={"pool": "alpha", "blocks": ["day"], "quantity": 1})
        assert r.status_code == 201, r.text
        delivered.append(r.json()["data"]["paymentId"])
    fine, revoked = delivered
    await console.on_server(reorganised(console, revoked))
    credited = await credited_payment(console, devchain, view)
    failed = failed_after_broadcast(console, devchain, view)
    pending = await console.on_server(pending_past_window(console, view.new_wallet().address))

    operator.open("/dashboard/admin/money")
    operator.wait_for("#attention")
    rows = operator.find_all("#attention tbody tr")
    listed = [(row.get_attribute("data-payment-id"), row.find_element("css selector", ".why").text) for row in rows]
    ours = {pending: "pending past window", failed: "failed after broadcast", revoked: "reorganised",
            credited: "credited"}
    assert {pid: why for pid, why in listed if pid in ours} == ours
    # The ones that need a person most come first: the order of the reasons is fixed.
    order = ["pending past window", "failed after broadcast", "reorganised", "credited"]
    whys = [why for _, why in listed]
    assert whys == sorted(whys, key=order.index)
    # A payment delivered as it should is not there.
    with console.admin() as http:
        delivered = http.get("/api/admin/money", headers=ADMIN).json()["data"]
    assert delivered["paymentsByState"]["delivered"]["count"] >= 1
    assert not any("delivered" in row.text.lower() for row in rows) and fine not in dict(listed)
    failed_row = operator.text(f'#attention tr[data-payment-id="{failed}"]')
    assert "settlement_reverted" in failed_row
    assert "credited" in operator.text(f'#attention tr[data-payment-id="{credited}"]')
    operator.screenshot("admin-03-money-attention")


# --- an account ------------------------------------------------------------------------------

async def test_an_account_is_found_shown_credited_debited_and_disabled_from_the_pages(console, operator, devchain):
    wallet = ChainView(devchain).new_wallet()
    async with x402HttpxClient(official_client(devchain, wallet), base_url=console.url, timeout=60) as http:
        r = await http.post("/api/agent/subscribe-pool", json={"pool": "alpha", "blocks": ["day"], "quantity": 1})
    assert r.status_code == 201, r.text
    bought = r.json()["data"]
    account_id, sk = bought["accountId"], bought["subscriptions"][0]["apiKey"]
    subscription_id = bought["subscriptions"][0]["id"]
    assert v1_call(console, sk, "test-model") == (200, None)

    # Found by id, by wallet (any case) and by the key as it is shown.
    for query in (account_id, wallet.address.upper().replace("0X", "0x"), sk[:7], f"{sk[:7]}…{sk[-4:]}"):
        operator.open("/dashboard/admin/accounts")
        operator.type("#account-search", query)
        operator.submit_and_wait("#account-search-submit", "#account-results")
        links = [a.get_attribute("href") for a in operator.find_all("#account-results a")]
        assert any(link.endswith(f"/admin/accounts/{account_id}") for link in links), (query, links)
    operator.find(f'#account-results a[href$="/admin/accounts/{account_id}"]').click()
    operator.wait_for_path(f"/dashboard/admin/accounts/{account_id}")
    page = operator.wait_for("#account-subscriptions").text
    assert subscription_id in page and f"{sk[:7]}…{sk[-4:]}" in page and "active" in page.lower()
    payments = operator.text("#account-payments")
    assert bought["paymentId"] in payments and "delivered" in payments.lower() and "10.00" in payments
    assert operator.text("#balance") == "0.00 USDC"
    operator.screenshot("admin-04-account")
    # The payment's own page: what it bought, and back to the account.
    operator.find(f'#account-payments tr[data-payment-id="{bought["paymentId"]}"] a').click()
    operator.wait_for_path(f"/dashboard/admin/payments/{bought['paymentId']}")
    assert "delivered" in operator.wait_for("#payment-state").text.lower()
    assert subscription_id in operator.text("#payment-subscriptions")
    operator.find(f'#payment-facts a[href$="/admin/accounts/{account_id}"]').click()
    operator.wait_for_path(f"/dashboard/admin/accounts/{account_id}")

    flash = submit_form(operator, '[data-action="credit"]', amount="5.25", reason="goodwill for the outage")
    assert "Done: credit" in flash and operator.text("#balance") == "5.25 USDC"
    flash = submit_form(operator, '[data-action="debit"]', amount="2.00", reason="duplicate goodwill")
    assert "Done: debit" in flash and operator.text("#balance") == "3.25 USDC"
    # A debit below zero is refused, saying why, and changes nothing.
    flash = submit_form(operator, '[data-action="debit"]', amount="100", reason="too much")
    assert "below zero" in flash and operator.text("#balance") == "3.25 USDC"
    journal = operator.text("#account-journal")
    assert "credited by olga: goodwill for the outage" in journal and "debited by olga: duplicate goodwill" in journal

    flash = submit_form(operator, '[data-action="disable"]', reason="chargeback")
    assert "Done: disable" in flash and operator.has("#account-disabled")
    # Its key is refused on /v1 at once, and the page shows it.
    assert v1_call(console, sk, "test-model") == (403, "key_disabled")
    assert "disabled" in operator.text("#account-subscriptions").lower()
    operator.screenshot("admin-05-account-disabled")

    rows = audit_rows(operator)
    target = f"account:{account_id}"
    mine = [r for r in rows if target in r]
    assert len(mine) == 3 and all(OPERATOR in r for r in mine)
    assert "account.disable" in mine[0] and "chargeback" in mine[0]
    assert "account.balance" in mine[1] and "duplicate goodwill" in mine[1] and '"3.25"' in mine[1]
    assert "account.balance" in mine[2] and "goodwill for the outage" in mine[2] and '"0.00"' in mine[2]
    operator.screenshot("admin-06-audit")


# --- a refund --------------------------------------------------------------------------------

async def run_pass(live: LiveGateway, name: str) -> None:
    """One pass of a background job on the gateway's own loop (the module's gateway runs them hourly)."""
    await live.on_server(live.services.jobs.passes[name]())


def refund_from_the_page(browser: Browser, payment_id: str, to: str, reason: str) -> str:
    """The operator refunds a payment from its page: the form, then the confirmation. The flash."""
    browser.open(f"/dashboard/admin/payments/{payment_id}")
    browser.select("#refund-to", to)
    browser.type("#refund-reason", reason)
    browser.submit_and_wait("#refund-submit", "#confirm-submit")
    assert "10.00 USDC" in browser.text("#confirm") and "canceled" in browser.text("#confirm")
    browser.screenshot(f"admin-07-confirm-refund-{to}")
    return browser.submit_and_wait("#confirm-submit", ".flash").text


async def test_a_payment_is_refunded_from_the_console_to_the_balance_and_on_chain(console, operator, devchain):
    view = ChainView(devchain)
    wallets = [view.new_wallet(), view.new_wallet()]
    bought = []
    for wallet in wallets:
        async with x402HttpxClient(official_client(devchain, wallet), base_url=console.url, timeout=60) as http:
            r = await http.post("/api/agent/subscribe-pool", json={"pool": "alpha", "blocks": ["day"], "quantity": 1})
        assert r.status_code == 201, r.text
        bought.append(r.json()["data"])
    keys = [b["subscriptions"][0]["apiKey"] for b in bought]
    payments = [b["paymentId"] for b in bought]
    assert all(v1_call(console, sk, "test-model") == (200, None) for sk in keys)
    await run_pass(console, "reorgs")  # past the reorg horizon (one block here): refundable

    # To the prepaid balance: done at once, the subscription canceled, its key refused at once.
    flash = refund_from_the_page(operator, payments[0], "balance", "customer asked within a day")
    assert "10.00 USDC to the balance, refunded" in flash and "1 key(s) revoked" in flash, flash
    assert v1_call(console, keys[0], "test-model")[0] in (401, 403)
    assert v1_call(console, keys[1], "test-model") == (200, None)
    assert "refunded" in operator.text("#payment-state").lower()
    assert "canceled" in operator.text("#payment-subscriptions").lower()
    assert "revoked" in operator.text("#payment-subscriptions").lower()
    [row] = operator.find_all("#payment-refunds tbody tr")
    assert "refunded" in row.text.lower() and "customer asked within a day" in row.text and OPERATOR in row.text
    assert not operator.has("#refund-form")  # refunded once: no second refund offered
    operator.screenshot("admin-08-payment-refunded")
    operator.find("#payment-facts a").click()  # the account: canceled, and the money on its balance
    operator.wait_for("#account-subscriptions")
    assert operator.text("#balance") == "10.00 USDC"
    assert "canceled" in operator.text("#account-subscriptions").lower()

    # On-chain: the transfer is sent at once from the refund wallet; the background pass confirms it.
    payer_before = view.usdc(wallets[1].address)
    flash = refund_from_the_page(operator, payments[1], "chain", "double charge")
    assert "10.00 USDC to the chain" in flash, flash
    assert v1_call(console, keys[1], "test-model")[0] in (401, 403)
    tx_hash = operator.text("#payment-refunds .refund-tx")
    assert tx_hash.startswith("0x") and len(tx_hash) == 66
    await run_pass(console, "refunds")
    operator.driver.refresh()
    operator.wait(lambda d: "refunded" in operator.text("#payment-refunds .refund-state").lower(),
                  "the refund never showed refunded")
    assert operator.text("#payment-refunds .refund-tx") == tx_hash
    assert view.usdc(wallets[1].address) == payer_before + 10_000_000

    # The money page: the refund wallet's balances and both refunds with their state and hash.
    operator.open("/dashboard/admin/money")
    operator.wait_for("#refund-wallet")
    assert operator.text("#refund-wallet-usdc") == f"{(REFUND_WALLET_USDC - 10_000_000) / 1e6:.2f} USDC"
    assert operator.text("#refund-wallet-eth").endswith("ETH")
    listed = {row.get_attribute("data-refund-id"): row.text for row in operator.find_all("#refunds tbody tr")}
    assert len(listed) >= 2
    assert any(payments[1] in text and tx_hash in text and "refunded" in text.lower() for text in listed.values())
    assert any(payments[0] in text and "balance" in text for text in listed.values())
    operator.screenshot("admin-09-money-refunds")

    rows = [r for r in audit_rows(operator) if "payment.refund" in r]
    assert any(payments[0] in r and "customer asked within a day" in r and OPERATOR in r for r in rows)
    assert any(payments[1] in r and "double charge" in r and "chain" in r for r in rows)


# --- hostile text --------------------------------------------------------------------------------

async def test_markup_in_names_and_reasons_is_shown_as_text_and_never_runs(console, operator):
    from agent_gateway.accounts.service import create_account

    name = "<img src=x onerror=\"document.title='pwned'\">Evil Co"
    reason = "<script>document.title='pwned'</script>refund"
    account, _ = await console.on_server(create_account(console.services.db, console.services.clock, name))
    operator.open(f"/dashboard/admin/accounts/{account.id}")
    submit_form(operator, '[data-action="credit"]', amount="1", reason=reason)
    pages = {"search": "/dashboard/admin/accounts?q=Evil", "account": f"/dashboard/admin/accounts/{account.id}",
             "audit": "/dashboard/admin/audit"}
    for page, path in pages.items():
        operator.open(path)
        operator.wait_for("h1")
        assert operator.driver.title != "pwned", page
        assert not operator.driver.execute_script("return document.querySelectorAll('main img, main script').length")
        shown = operator.text("main")
        assert (name in shown) if page != "audit" else (reason in shown), page
