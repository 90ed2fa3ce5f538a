"""Closing a funding round refunds its pledges, on SQLite and PostgreSQL: the operator's
`funding → closed` and `activating → closed`, and the deadlines' background pass. The refunds are
planned (balance pledges: made) in the transition's own transaction, so a transition that fails
closes nothing and refunds nothing; the pledges' keys are revoked at once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from agent_gateway.clock import FixedClock
from agent_gateway.settings import Settings
from tests.conftest import Gateway, auth, in_process_gateway
from tests.fixtures.state import snapshot

pytestmark = pytest.mark.anyio
ADMIN_TOKEN = "adm-" + "f4" * 20
ADMIN = {**auth(ADMIN_TOKEN), "X-Admin-Actor": "alice"}
ROUND = """
[pools.round]
name = "Seed round"
models = ["round-1"]
upstreams = ["http://127.0.0.1:9/v1"]
seats = 10
status = "funding"
funding_goal = {goal}
funding_deadline = 2026-11-30T00:00:00Z
activation_days = 1.5
prices = {{ europe = "20.00" }}
"""


@pytest.fixture
def goal() -> int:
    return 10


@pytest.fixture
async def console(settings: Settings, clock: FixedClock, pools_file: Path, goal: int) -> AsyncIterator[Gateway]:
    pools_file.write_text(pools_file.read_text() + ROUND.format(goal=goal))
    async with in_process_gateway(settings, clock, admin_token=ADMIN_TOKEN) as gateway:
        yield gateway


async def pledge(console: Gateway, mk: str, quantity: int = 1) -> list[dict]:
    return await console.buy(mk, pool="round", quantity=quantity)


async def account(console: Gateway, account_id: str) -> dict:
    r = await console.client.get(f"/api/admin/accounts/{account_id}", headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()["data"]


async def status(console: Gateway) -> str:
    return (await console.client.get("/api/pools/round")).json()["data"]["status"]


@pytest.mark.parametrize("path", [["closed"], ["activating", "closed"]])
async def test_the_operator_closing_a_round_refunds_every_balance_pledge(console, path):
    first_id, first = await console.new_account("first", credit="100")
    second_id, second = await console.new_account("second", credit="100")
    subs = await pledge(console, first, quantity=2) + await pledge(console, second)
    key = await console.mint(first, subs[0]["id"])
    assert (await account(console, first_id))["balance"] == "60.00"
    for step in path:
        r = await console.client.post("/api/admin/pools/round/state", json={"status": step, "reason": "no go"},
                                      headers=ADMIN)
        assert r.status_code == 200, r.text
    assert await status(console) == "closed"
    for account_id in (first_id, second_id):
        view = await account(console, account_id)
        assert view["balance"] == "100.00"
        assert {s["status"] for s in view["subscriptions"]} == {"canceled"}
        assert [e["kind"] for e in view["balanceEntries"] if e["kind"] == "refund"] == \
            ["refund"] * len(view["subscriptions"])
    assert [k["status"] for k in (await account(console, first_id))["keys"]] == ["revoked"]
    r = await console.client.get("/v1/models", headers=auth(key["apiKey"]))
    assert r.status_code == 403 and r.json()["error"]["code"] in ("subscription_expired", "key_revoked")
    refunds = (await console.client.get("/api/admin/refunds?pool=round", headers=ADMIN)).json()["data"]
    assert sorted((r["subscriptionId"], r["state"], r["destination"], r["amount"]) for r in refunds) == sorted(
        (s["id"], "refunded", "balance", "20.00") for s in subs)
    seats = (await console.client.get("/api/pools/round")).json()["data"]["blocks"][0]["availableSeats"]
    assert seats == 10
    # Closed is final: nothing left to refund twice.
    r = await console.client.post("/api/admin/pools/round/state", json={"status": "funding"}, headers=ADMIN)
    assert r.status_code == 409


async def test_a_close_that_fails_closes_nothing_and_refunds_nothing(console):
    account_id, mk = await console.new_account(credit="100")
    await pledge(console, mk)

    async def broken(session, slug, before, after, now) -> None:  # type: ignore[no-untyped-def]
        raise RuntimeError("the disk is full")

    console.services.admin.pools.transition_hooks.append(broken)
    before = await snapshot(console.services.db)
    with pytest.raises(RuntimeError):
        await console.services.admin.pools.set_state("round", "closed", actor="alice")
    console.services.admin.pools.transition_hooks.remove(broken)
    assert await snapshot(console.services.db) == before
    assert await status(console) == "funding"
    assert (await account(console, account_id))["balance"] == "80.00"


async def test_the_deadline_pass_closes_an_overdue_round_and_refunds_it(console, clock: FixedClock):
    account_id, mk = await console.new_account(credit="100")
    await pledge(console, mk)
    funding = console.services.admin.funding
    assert await funding.close_overdue() == []  # 2026-11-25: before the 2026-11-30 deadline
    clock.set(clock.now().replace(day=30))
    assert await funding.close_overdue() == ["round"]
    assert await status(console) == "closed" and (await account(console, account_id))["balance"] == "100.00"
    audit = (await console.client.get("/api/admin/audit?target=pool:round", headers=ADMIN)).json()["data"]
    assert audit[0]["actor"] == "funding-deadline" and "funding deadline" in audit[0]["reason"]
    assert await funding.close_overdue() == []


@pytest.mark.parametrize("goal", [1])
async def test_an_activation_deadline_counts_from_the_move_to_activating(console, clock: FixedClock):
    account_id, mk = await console.new_account(credit="100")
    await pledge(console, mk)  # the goal (1 seat): activating now
    assert await status(console) == "activating"
    funding = console.services.admin.funding
    [deadline] = (await funding.activation_deadlines()).values()
    assert deadline == clock.now() + timedelta(days=1.5)
    clock.advance(timedelta(days=1, hours=11))
    assert await funding.close_overdue() == []
    clock.advance(timedelta(hours=1))
    assert await funding.close_overdue() == ["round"]
    audit = (await console.client.get("/api/admin/audit?target=pool:round", headers=ADMIN)).json()["data"]
    assert (audit[0]["actor"], audit[0]["before"]["status"]) == ("activation-deadline", "activating")
    assert (await account(console, account_id))["balance"] == "100.00"


async def test_a_pledge_delivered_after_its_round_closed_is_refunded_by_the_next_pass(console):
    from agent_gateway.db.models import Payment, PaymentState, new_id
    from agent_gateway.subscriptions.service import new_subscriptions

    account_id, _ = await console.new_account()
    r = await console.client.post("/api/admin/pools/round/state", json={"status": "closed"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    # A payment checked before the close delivers after it (the reconciler): a pledge on a closed pool.
    services, now = console.services, console.services.clock.now()
    payment = Payment(id=new_id("pay"), method="x402-exact", network="eip155:31337", payer="0x" + "ab" * 20,
                      amount_atomic=20_000_000, auth_nonce="0x" + "01" * 32, state=PaymentState.DELIVERED,
                      account_id=account_id, pool_slug="round", blocks=["europe"], quantity=1, billing_cycle="month",
                      unit_price_atomic=20_000_000, block_number=3, chain_final=True, created_at=now, updated_at=now)
    async with services.db.transaction() as session:
        session.add(payment)
        session.add_all(new_subscriptions(account_id, "round", ["europe"], "month", 20_000_000, 1, now,
                                          payment_id=payment.id, pledge=True))
    await services.admin.refunds.refunds.run()
    view = await account(console, account_id)
    assert view["balance"] == "20.00" and [s["status"] for s in view["subscriptions"]] == ["canceled"]
    assert [p["state"] for p in view["payments"]] == ["refunded"]
    await services.admin.refunds.refunds.run()  # once
    assert (await account(console, account_id))["balance"] == "20.00"


@pytest.mark.parametrize("goal", [1])
async def test_the_funding_deadline_never_closes_a_round_that_reached_its_goal(console, clock: FixedClock):
    """The operator called the activation off (`activating → funding`): the gateway leaves that pool
    to them (phase 1), so the funding deadline, long past by then, must not close it and refund every
    pledge of a funded round. Likewise a round whose goal a pledge reached just before the deadline
    while the goal check has not run yet."""
    account_id, mk = await console.new_account(credit="100")
    await pledge(console, mk)
    assert await status(console) == "activating"
    r = await console.client.post("/api/admin/pools/round/state", json={"status": "funding", "reason": "wait"},
                                  headers=ADMIN)
    assert r.status_code == 200, r.text
    clock.set(clock.now().replace(day=30))  # past the funding deadline
    assert await console.services.admin.funding.close_overdue() == []
    assert await status(console) == "funding" and (await account(console, account_id))["balance"] == "80.00"
