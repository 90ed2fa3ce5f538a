"""The operator's console over the admin API: pools and their states, reloading the pools file,
accounts (search, view, credit/debit, disable), money and the audit log."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from eth_account import Account as EthAccount
from eth_account.messages import encode_defunct

from agent_gateway.app import create_app
from agent_gateway.clock import FixedClock
from agent_gateway.lifespan import build_services
from agent_gateway.settings import Settings
from tests.conftest import Gateway, auth, in_process_gateway

pytestmark = pytest.mark.anyio

ADMIN_TOKEN = "adm-" + "x7" * 20


def admin(actor: str | None = "alice") -> dict[str, str]:
    headers = auth(ADMIN_TOKEN)
    if actor is not None:
        headers["X-Admin-Actor"] = actor
    return headers


@pytest.fixture
async def console(settings: Settings, clock: FixedClock) -> AsyncIterator[Gateway]:
    async with in_process_gateway(settings, clock, admin_token=ADMIN_TOKEN) as gateway:
        yield gateway


async def pools_of(console: Gateway) -> dict[str, dict]:
    r = await console.client.get("/api/admin/pools", headers=admin())
    assert r.status_code == 200, r.text
    return {p["slug"]: p for p in r.json()["data"]}


async def audit_of(console: Gateway, **params: str) -> list[dict]:
    r = await console.client.get("/api/admin/audit", params=params, headers=admin())
    assert r.status_code == 200, r.text
    return r.json()["data"]


# --- pools -------------------------------------------------------------------------------------

async def test_the_pools_view_shows_state_seats_sold_and_left_and_requests_in_flight(console):
    _, mk = await console.new_account(credit="1000")
    subs = await console.buy(mk, quantity=2, blocks=["europe", "asia"])
    key = await console.mint(mk, subs[0]["id"])
    result, lease = await console.services.leases.acquire(key["id"])  # a request in flight on that key
    pools = await pools_of(console)
    alpha = pools["alpha"]
    assert alpha["status"] == "active" and alpha["fileStatus"] == "active" and alpha["seatsPerBlock"] == 3
    blocks = {b["block"]: b for b in alpha["blocks"]}
    assert (blocks["europe"]["sold"], blocks["europe"]["left"]) == (2, 1)
    assert (blocks["asia"]["sold"], blocks["americas"]["sold"], blocks["americas"]["left"]) == (2, 0, 3)
    assert alpha["inFlight"] == 1 and alpha["liveSubscriptions"] == 2
    assert pools["resting"]["status"] == "paused" and pools["tiny"]["inFlight"] == 0
    await console.services.leases.release(lease)
    assert (await pools_of(console))["alpha"]["inFlight"] == 0


async def test_a_state_change_takes_effect_at_once_and_is_audited(console):
    _, mk = await console.new_account(credit="1000")
    sub = (await console.buy(mk))[0]
    sk = (await console.mint(mk, sub["id"]))["apiKey"]
    r = await console.client.post("/api/admin/pools/alpha/state", json={"status": "paused", "reason": "maintenance"},
                                  headers=admin("alice"))
    assert r.status_code == 200, r.text
    assert r.json()["data"]["status"] == "paused"
    # Neither sells nor serves, without a restart.
    r = await console.client.post("/api/pools/alpha/subscribe", json={"blocks": ["europe"], "quantity": 1},
                                  headers=auth(mk))
    assert r.status_code == 409 and r.json()["error"]["code"] == "pool_paused"
    r = await console.client.post("/v1/chat/completions", headers=auth(sk),
                                  json={"model": "alpha-1", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and r.json()["error"]["code"] == "pool_not_active"
    assert (await console.client.get("/api/pools/alpha")).json()["data"]["status"] == "paused"
    [record] = await audit_of(console, target="pool:alpha")
    assert (record["actor"], record["action"], record["reason"]) == ("alice", "pool.state", "maintenance")
    assert record["before"] == {"status": "active"} and record["after"] == {"status": "paused"}
    r = await console.client.post("/api/admin/pools/alpha/state", json={"status": "active"}, headers=admin("bob"))
    assert r.status_code == 200
    assert (await console.client.post("/api/pools/alpha/subscribe", json={"blocks": ["europe"], "quantity": 1},
                                      headers=auth(mk))).status_code == 201


@pytest.mark.parametrize(("path", "status", "code"), [
    ("alpha", "funding", "invalid_pool_transition"),
    ("alpha", "closed", "invalid_pool_transition"),
    ("alpha", "active", "pool_state_unchanged"),
    ("tiny", "pending", "invalid_pool_status"),
    ("nope", "paused", "pool_not_found"),
])
async def test_only_the_allowed_transitions_are_made(console, path, status, code):
    r = await console.client.post(f"/api/admin/pools/{path}/state", json={"status": status}, headers=admin())
    assert r.json()["error"]["code"] == code, r.text
    assert r.status_code in (400, 404, 409)
    assert await audit_of(console, action="pool.state") == []
    assert (await pools_of(console))["alpha"]["status"] == "active"


async def test_a_funding_pool_goes_through_activating_to_active_and_closed_is_final(console, pools_file: Path):
    pools_file.write_text(pools_file.read_text() + FUNDING_POOL)
    assert (await console.client.post("/api/admin/pools/reload", headers=admin())).status_code == 200
    for status in ("activating", "active", "paused", "active"):
        r = await console.client.post("/api/admin/pools/seed/state", json={"status": status}, headers=admin())
        assert r.status_code == 200, r.text
    pools_file.write_text(pools_file.read_text().replace("[pools.seed]", "[pools.seed2]"))
    assert (await console.client.post("/api/admin/pools/reload", headers=admin())).status_code == 200
    for status in ("closed",):
        assert (await console.client.post("/api/admin/pools/seed2/state", json={"status": status},
                                          headers=admin())).status_code == 200
    r = await console.client.post("/api/admin/pools/seed2/state", json={"status": "funding"}, headers=admin())
    assert r.status_code == 409 and "final" in r.json()["error"]["message"]
    actions = [(a["target"], a["after"].get("status")) for a in await audit_of(console, action="pool.state")]
    assert actions[0] == ("pool:seed2", "closed") and len(actions) == 5


FUNDING_POOL = """
[pools.seed]
name = "Seed round"
models = ["seed-1"]
upstreams = ["http://127.0.0.1:9/v1"]
seats = 10
status = "funding"
prices = { europe = "20.00" }
"""


# --- reloading the pools file --------------------------------------------------------------------

async def test_a_good_pools_file_applies_without_a_restart(console, pools_file: Path):
    _, mk = await console.new_account(credit="1000")
    pools_file.write_text(pools_file.read_text().replace('europe = "10.00"', 'europe = "12.50"') + FUNDING_POOL)
    r = await console.client.post("/api/admin/pools/reload", json={"reason": "new round"}, headers=admin("carol"))
    assert r.status_code == 200, r.text
    assert r.json()["data"]["changed"] is True and r.json()["data"]["added"] == ["seed"]
    catalog = {p["slug"]: p for p in (await console.client.get("/api/pools")).json()["data"]}
    assert catalog["seed"]["status"] == "funding"
    subs = await console.buy(mk, pool="tiny")
    assert subs[0]["price"] == "12.50"
    [record] = await audit_of(console, action="pools.reload", actor="carol")
    assert record["actor"] == "carol" and record["reason"] == "new round"
    assert record["before"]["pools"]["tiny"]["prices"] == {"europe": "10.00"}
    assert record["after"]["pools"]["tiny"]["prices"] == {"europe": "12.50"}
    # The same file again changes nothing, and says so (still recorded: it was an admin action).
    r = await console.client.post("/api/admin/pools/reload", headers=admin("carol"))
    assert r.json()["data"]["changed"] is False and r.json()["data"]["added"] == []


@pytest.mark.parametrize(("edit", "says"), [
    (lambda text: text + "\n[pools.broken\n", "not valid TOML"),
    (lambda text: text.replace("seats = 3", "seats = 0"), "pools.alpha.seats"),
    (lambda text: text.replace('status = "paused"', 'status = "active"'), "pools.resting.status"),
    (lambda text: text.replace("seats = 3", "seats = 1"), "below the 2 seats sold"),
    (lambda text: text.replace('asia = "39.00", europe = "49.00", ', ""), "pools.alpha.prices.europe: removed"),
    (lambda text: text[:text.index("[pools.alpha]")] + text[text.index("[pools.tiny]"):], "pools.alpha: removed"),
])
async def test_a_bad_pools_file_changes_nothing_and_says_why(console, pools_file: Path, edit, says):
    _, mk = await console.new_account(credit="1000")
    await console.buy(mk, quantity=2)
    before = (await console.client.get("/api/pools")).json()
    original = pools_file.read_text()
    pools_file.write_text(edit(original))
    r = await console.client.post("/api/admin/pools/reload", headers=admin())
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] in ("invalid_pools_file", "pools_file_refused")
    assert says in r.json()["error"]["message"]
    assert (await console.client.get("/api/pools")).json() == before
    assert await audit_of(console, action="pools.reload", actor="alice") == []
    assert len(await console.buy(mk, quantity=1)) == 1  # the old pools keep selling


async def test_a_missing_pools_file_is_refused(console, pools_file: Path):
    pools_file.unlink()
    r = await console.client.post("/api/admin/pools/reload", headers=admin())
    assert r.status_code == 400 and "not found" in r.json()["error"]["message"]


async def test_a_restart_keeps_the_states_the_operator_set(console, settings: Settings, clock: FixedClock):
    r = await console.client.post("/api/admin/pools/alpha/state", json={"status": "paused"}, headers=admin())
    assert r.status_code == 200
    services = build_services(settings, clock)
    app = create_app(services=services)
    async with app.router.lifespan_context(app):
        assert services.catalog.pools["alpha"].status == "paused"


async def test_a_start_with_a_file_that_changes_a_status_is_refused(console, settings, clock, pools_file: Path):
    pools_file.write_text(pools_file.read_text().replace('status = "paused"', 'status = "active"'))
    services = build_services(settings, clock)
    app = create_app(services=services)
    with pytest.raises(Exception, match="pools.resting.status"):
        async with app.router.lifespan_context(app):
            pass


# --- accounts ----------------------------------------------------------------------------------

async def test_accounts_are_found_by_id_wallet_key_prefix_and_name(console):
    account_id, mk = await console.new_account("Searchable Ltd", credit="100")
    other_id, _ = await console.new_account("Someone else")
    sub = (await console.buy(mk))[0]
    sk = (await console.mint(mk, sub["id"]))["apiKey"]
    wallet = "0x" + "ab" * 20
    await _bind_wallet(console, account_id, wallet)
    for query in (account_id, wallet, wallet.upper().replace("0X", "0x"), sk[:7], f"{sk[:7]}…{sk[-4:]}", sk,
                  mk[:7], "searchable"):
        r = await console.client.get("/api/admin/accounts", params={"q": query}, headers=admin())
        assert r.status_code == 200, r.text
        assert [a["id"] for a in r.json()["data"]] == [account_id], query
    r = await console.client.get("/api/admin/accounts", params={"q": "%"}, headers=admin())
    assert r.json()["data"] == []  # a LIKE wildcard is a character, not "everything"


async def test_an_account_view_shows_subscriptions_keys_balance_and_payments(console):
    account_id, mk = await console.new_account(credit="100")
    sub = (await console.buy(mk))[0]
    key = await console.mint(mk, sub["id"])
    r = await console.client.get(f"/api/admin/accounts/{account_id}", headers=admin())
    data = r.json()["data"]
    assert data["balance"] == "51.00" and data["disabled"] is False
    assert [s["id"] for s in data["subscriptions"]] == [sub["id"]]
    assert [k["id"] for k in data["keys"]] == [key["id"]] and key["apiKey"] not in r.text
    assert sorted(e["kind"] for e in data["balanceEntries"]) == ["charge", "credit"]
    assert data["payments"] == [] and len(data["managementKeys"]) == 1
    assert (await console.client.get("/api/admin/accounts/acct_nope", headers=admin())).status_code == 404


async def test_credit_and_debit_leave_an_audit_record_and_a_debit_stops_at_zero(console):
    account_id, mk = await console.new_account(credit="10")
    r = await console.client.post(f"/api/admin/accounts/{account_id}/balance",
                                  json={"amount": "5.50", "reason": "goodwill"}, headers=admin("dana"))
    assert r.status_code == 200 and r.json()["data"]["balance"] == "15.50"
    r = await console.client.post(f"/api/admin/accounts/{account_id}/balance",
                                  json={"amount": "-15.50", "reason": "chargeback"}, headers=admin("dana"))
    assert r.status_code == 200 and r.json()["data"]["balance"] == "0.00"
    r = await console.client.post(f"/api/admin/accounts/{account_id}/balance",
                                  json={"amount": "-0.01", "reason": "too far"}, headers=admin("dana"))
    assert r.status_code == 409 and r.json()["error"]["code"] == "insufficient_balance"
    for amount, code in (("0", "invalid_amount"), ("1.0000001", "invalid_amount"), ("abc", "invalid_amount")):
        r = await console.client.post(f"/api/admin/accounts/{account_id}/balance",
                                      json={"amount": amount, "reason": "x"}, headers=admin())
        assert r.status_code == 400 and r.json()["error"]["code"] == code, amount
    r = await console.client.post(f"/api/admin/accounts/{account_id}/balance", json={"amount": "1"}, headers=admin())
    assert r.status_code == 400  # a reason is required
    records = await audit_of(console, target=f"account:{account_id}")
    assert [(a["actor"], a["before"]["balance"], a["after"]["balance"], a["reason"]) for a in records] == [
        ("dana", "15.50", "0.00", "chargeback"), ("dana", "10.00", "15.50", "goodwill")]
    entries = (await console.client.get(f"/api/admin/accounts/{account_id}", headers=admin())).json()["data"]
    assert sorted(e["kind"] for e in entries["balanceEntries"]) == ["credit", "credit", "debit"]


async def test_disabling_an_account_revokes_its_keys_at_once_and_enabling_restores_them(console):
    account_id, mk = await console.new_account(credit="100")
    sub = (await console.buy(mk))[0]
    key = await console.mint(mk, sub["id"])
    body = {"model": "alpha-1", "messages": [{"role": "user", "content": "hi"}]}
    ended: list[str] = []
    console.services.streams.add(key["id"], ended.append)  # a stream of that key running in this process
    r = await console.client.post(f"/api/admin/accounts/{account_id}/disable", json={"reason": "fraud"},
                                  headers=admin("erin"))
    assert r.status_code == 200 and r.json()["data"]["keysRevoked"] == [key["id"]]
    assert ended == ["account_disabled"]
    r = await console.client.post("/v1/chat/completions", headers=auth(key["apiKey"]), json=body)
    assert r.status_code == 403 and r.json()["error"]["code"] == "key_disabled"
    r = await console.client.get("/api/keys", headers=auth(mk))
    assert r.status_code == 403 and r.json()["error"]["code"] == "account_disabled"
    r = await console.client.post(f"/api/admin/accounts/{account_id}/disable", headers=admin("erin"))
    assert r.status_code == 409
    r = await console.client.post(f"/api/admin/accounts/{account_id}/enable", json={"reason": "cleared"},
                                  headers=admin("erin"))
    assert r.status_code == 200 and r.json()["data"]["keysEnabled"] == [key["id"]]
    assert (await console.client.get("/api/keys", headers=auth(mk))).status_code == 200
    actions = [(a["action"], a["actor"]) for a in await audit_of(console, target=f"account:{account_id}")]
    assert actions == [("account.enable", "erin"), ("account.disable", "erin")]


async def test_a_disabled_accounts_wallet_cannot_sign_in(console):
    account_id, _ = await console.new_account()
    wallet = EthAccount.create()
    await _bind_wallet(console, account_id, wallet.address.lower())
    await console.client.post(f"/api/admin/accounts/{account_id}/disable", headers=admin())
    r = await console.client.post("/api/agent/auth/challenge", json={"address": wallet.address})
    assert r.status_code == 201
    challenge = r.json()["data"]
    signature = wallet.sign_message(encode_defunct(text=challenge["message"])).signature.hex()
    r = await console.client.post("/api/agent/auth/sign-in",
                                  json={"challengeId": challenge["challengeId"], "signature": "0x" + signature})
    assert r.status_code == 403 and r.json()["error"]["code"] == "account_disabled"
    assert "managementKey" not in r.text


async def _bind_wallet(console: Gateway, account_id: str, wallet: str) -> None:
    from agent_gateway.db.models import Account

    async with console.services.db.transaction() as session:
        account = await session.get(Account, account_id)
        account.wallet_address = wallet
        session.add(account)


# --- money ---------------------------------------------------------------------------------------

async def test_the_money_view_without_payments_is_empty_and_says_payments_are_off(console):
    r = await console.client.get("/api/admin/money", headers=admin())
    data = r.json()["data"]
    assert r.status_code == 200 and data["revenueByDay"] == [] and data["needsAttention"] == []
    assert data["balances"] is None
    assert (await console.client.get("/api/admin/money?days=0", headers=admin())).status_code == 400



async def test_a_process_that_hears_no_notice_follows_by_polling(console, settings: Settings, clock: FixedClock,
                                                                 pools_file: Path):
    """No Redis here: a second process (its own services, same database) learns of a state change and
    a reload made through the first from the database alone, within its poll interval."""
    import asyncio

    other = build_services(settings.model_copy(update={"catalog_poll_s": 0.05}), clock)
    app = create_app(services=other)
    async with app.router.lifespan_context(app):
        assert other.catalog.pools["alpha"].status == "active"
        await console.client.post("/api/admin/pools/alpha/state", json={"status": "paused"}, headers=admin())
        pools_file.write_text(pools_file.read_text() + FUNDING_POOL)
        assert (await console.client.post("/api/admin/pools/reload", headers=admin())).status_code == 200
        async with asyncio.timeout(10):
            while not (other.catalog.pools["alpha"].status == "paused" and "seed" in other.catalog.pools):
                await asyncio.sleep(0.02)  # waiting for the poll, bounded by the timeout


async def test_a_pool_with_a_payment_still_settling_cannot_be_removed(console, pools_file: Path, clock: FixedClock):
    from agent_gateway.db.models import Payment, PaymentState

    now = clock.now()
    async with console.services.db.transaction() as session:
        session.add(Payment(id="pay_settling", method="x402-exact", network="eip155:31337", payer="0x" + "1" * 40,
                            amount_atomic=10_000_000, state=PaymentState.VERIFIED, pool_slug="tiny", blocks=["europe"],
                            quantity=1, billing_cycle="month", unit_price_atomic=10_000_000, created_at=now,
                            updated_at=now))
    text = pools_file.read_text()
    pools_file.write_text(text[:text.index("[pools.tiny]")] + text[text.index("[pools.resting]"):])
    r = await console.client.post("/api/admin/pools/reload", headers=admin())
    assert r.status_code == 400 and r.json()["problems"] == [
        "pools.tiny: removed, but live subscriptions, reserved seats or settling payments use it"]
    assert "tiny" in console.services.catalog.pools


async def test_the_pools_view_survives_a_lease_store_that_does_not_answer(console, settings: Settings):
    from agent_gateway.admin.pools import PoolAdmin
    from agent_gateway.catalog.pools import read_pools_file
    from agent_gateway.proxy.leases import RedisLeases

    _, mk = await console.new_account(credit="100")
    await console.mint(mk, (await console.buy(mk))[0]["id"])  # an active key whose lease must be asked about
    dead = RedisLeases("redis://127.0.0.1:9/0", connect_timeout_s=0.2, command_timeout_s=0.2)
    try:
        pools = PoolAdmin(console.services.db, console.services.clock, console.services.catalog, settings.pools_file,
                          read_pools_file(settings.pools_file), dead, None, 3600)
        reports = {r.pool.slug: r for r in await pools.report()}
    finally:
        await dead.close()
    assert reports["alpha"].in_flight is None and reports["alpha"].blocks[1].sold == 1
