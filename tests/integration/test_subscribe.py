"""Buying seats with a management key: prices, the prepaid balance, capacity, and bad input."""

import asyncio

import pytest

from tests.conftest import auth
from tests.fixtures.state import balance, seats_held, snapshot

pytestmark = pytest.mark.anyio


async def test_buying_seats_charges_the_balance_and_holds_the_seats(gateway):
    account, mk = await gateway.new_account(credit="500.00")
    response = await gateway.client.post(
        "/api/pools/alpha/subscribe",
        json={"blocks": ["europe", "asia"], "quantity": 2, "billingCycle": "month"},
        headers=auth(mk),
    )
    assert response.status_code == 201, response.text
    data = response.json()["data"]
    assert data["quote"]["total"] == "176.00"
    subs = data["subscriptions"]
    assert len(subs) == 2 and len({s["id"] for s in subs}) == 2
    for sub in subs:
        assert sub["status"] == "active" and sub["blocks"] == ["asia", "europe"]
        assert sub["currentPeriodEnd"] == "2026-12-25T10:00:00Z"
    db = gateway.services.db
    assert await balance(db, account) == 324_000_000
    assert await seats_held(db, "alpha", "europe") == 2
    assert await seats_held(db, "alpha", "asia") == 2
    assert await seats_held(db, "alpha", "americas") == 0
    pools = (await gateway.client.get("/api/pools/alpha")).json()["data"]
    assert {b["block"]: b["availableSeats"] for b in pools["blocks"]} == {"asia": 1, "europe": 1, "americas": 3}
    listed = (await gateway.client.get("/api/subscriptions", headers=auth(mk))).json()["data"]
    assert sorted(s["id"] for s in listed) == sorted(s["id"] for s in subs)


async def test_a_yearly_seat_costs_twelve_months_less_the_discount(gateway):
    account, mk = await gateway.new_account(credit="1000")
    subs = await gateway.buy(mk, blocks=["europe"], cycle="year")
    assert subs[0]["price"] == "499.80"
    assert subs[0]["currentPeriodEnd"] == "2027-11-20T10:00:00Z"
    assert await balance(gateway.services.db, account) == 500_200_000


async def test_without_enough_balance_the_answer_is_402_with_the_price_and_nothing_changes(gateway):
    account, mk = await gateway.new_account(credit="40.00")
    before = await snapshot(gateway.services.db)
    response = await gateway.client.post(
        "/api/pools/alpha/subscribe", json={"blocks": ["europe"], "quantity": 1}, headers=auth(mk)
    )
    assert response.status_code == 402
    body = response.json()
    assert body["error"]["code"] == "insufficient_balance"
    assert body["quote"]["total"] == "49.00" and body["balance"] == "40.00"
    assert await snapshot(gateway.services.db) == before


async def test_a_sold_out_block_is_409_and_nothing_changes(gateway):
    _, mk = await gateway.new_account(credit="1000")
    await gateway.buy(mk, pool="tiny", blocks=["europe"])
    before = await snapshot(gateway.services.db)
    response = await gateway.client.post(
        "/api/pools/tiny/subscribe", json={"blocks": ["europe"], "quantity": 1}, headers=auth(mk)
    )
    assert response.status_code == 409 and response.json()["error"]["code"] == "sold_out"
    # Partly available: europe has 3 seats left in alpha, but asking 4 must not take any.
    response = await gateway.client.post(
        "/api/pools/alpha/subscribe", json={"blocks": ["asia", "europe"], "quantity": 4}, headers=auth(mk)
    )
    assert response.status_code == 409 and response.json()["error"]["code"] == "sold_out"
    assert await snapshot(gateway.services.db) == before


async def test_two_buyers_racing_for_the_last_seat_exactly_one_wins(gateway):
    db = gateway.services.db
    buyers = [await gateway.new_account(f"buyer{i}", credit="100") for i in range(8)]

    async def buy(mk):
        return await gateway.client.post(
            "/api/pools/tiny/subscribe", json={"blocks": ["europe"], "quantity": 1}, headers=auth(mk)
        )

    responses = await asyncio.gather(*(buy(mk) for _, mk in buyers))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201] + [409] * 7, [r.text for r in responses]
    assert await seats_held(db, "tiny", "europe") == 1
    charged = [acct for acct, _ in buyers if await balance(db, acct) != 100_000_000]
    assert len(charged) == 1 and await balance(db, charged[0]) == 90_000_000
    state = await snapshot(db)
    assert state["counts"]["subscriptions"] == 1 and state["counts"]["balance_entries"] == 9


BAD_BODIES = [
    (b"{not json", 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_json"),
    (b"", 400, "missing_body"),
    (b'{"blocks": "europe", "quantity": 1}', 400, "invalid_field"),
    (b'{"blocks": ["europe"], "quantity": "1"}', 400, "invalid_field"),
    (b'{"blocks": ["europe"], "quantity": 1.0}', 400, "invalid_field"),
    (b'{"blocks": ["europe"], "quantity": true}', 400, "invalid_field"),
    (b'{"blocks": ["europe"], "quantity": 0}', 400, "invalid_field"),
    (b'{"blocks": ["europe"], "quantity": -2}', 400, "invalid_field"),
    (b'{"blocks": ["europe"], "quantity": 1000000000000}', 400, "invalid_quantity"),
    (b'{"blocks": ["europe"]}', 400, "invalid_field"),
    (b'{"blocks": [], "quantity": 1}', 400, "invalid_field"),
    (b'{"blocks": ["mars"], "quantity": 1}', 400, "unknown_block"),
    (b'{"blocks": ["europe", "europe"], "quantity": 1}', 400, "duplicate_blocks"),
    (b'{"blocks": ["europe"], "quantity": 1, "billingCycle": "week"}', 400, "invalid_field"),
    (b'{"blocks": ["europe"], "quantity": 1, "colour": "red"}', 400, "invalid_field"),
]


@pytest.mark.parametrize("raw,status,code", BAD_BODIES)
async def test_bad_bodies_get_a_clear_error_and_change_nothing(gateway, raw, status, code):
    _, mk = await gateway.new_account(credit="1000")
    before = await snapshot(gateway.services.db)
    response = await gateway.client.post(
        "/api/pools/alpha/subscribe", content=raw,
        headers={**auth(mk), "content-type": "application/json"},
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert await snapshot(gateway.services.db) == before


async def test_unknown_and_paused_pools_and_oversized_bodies(gateway):
    _, mk = await gateway.new_account(credit="1000")
    before = await snapshot(gateway.services.db)
    body = {"blocks": ["europe"], "quantity": 1}
    r = await gateway.client.post("/api/pools/nope/subscribe", json=body, headers=auth(mk))
    assert r.status_code == 404 and r.json()["error"]["code"] == "pool_not_found"
    r = await gateway.client.post("/api/pools/resting/subscribe", json=body, headers=auth(mk))
    assert r.status_code == 409 and r.json()["error"]["code"] == "pool_paused"
    huge = b'{"blocks": ["europe"], "quantity": 1, "pad": "' + b"x" * 2_000_000 + b'"}'
    r = await gateway.client.post("/api/pools/alpha/subscribe", content=huge, headers=auth(mk))
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert await snapshot(gateway.services.db) == before


@pytest.mark.parametrize(
    "headers,status,code",
    [
        ({}, 401, "missing_api_key"),
        ({"Authorization": "Bearer"}, 401, "invalid_authorization_header"),
        ({"Authorization": "Basic abc"}, 401, "invalid_authorization_header"),
        ({"Authorization": "Bearer mk_ two words"}, 401, "invalid_authorization_header"),
        ({"Authorization": "Bearer mk_notarealkey"}, 401, "invalid_management_key"),
        ({"Authorization": "Bearer something"}, 401, "invalid_management_key"),
    ],
)
async def test_missing_or_garbled_authorization_is_401_and_changes_nothing(gateway, headers, status, code):
    await gateway.new_account(credit="1000")
    before = await snapshot(gateway.services.db)
    r = await gateway.client.post("/api/pools/alpha/subscribe", json={"blocks": ["europe"], "quantity": 1},
                                  headers=headers)
    assert r.status_code == status and r.json()["error"]["code"] == code
    r = await gateway.client.get("/api/keys", headers=headers)
    assert r.status_code == status and r.json()["error"]["code"] == code
    assert await snapshot(gateway.services.db) == before


async def test_an_api_key_cannot_use_management_endpoints(gateway):
    _, mk = await gateway.new_account(credit="1000")
    subs = await gateway.buy(mk)
    sk = (await gateway.mint(mk, subs[0]["id"]))["apiKey"]
    before = await snapshot(gateway.services.db)
    r = await gateway.client.post("/api/pools/alpha/subscribe", json={"blocks": ["europe"], "quantity": 1},
                                  headers=auth(sk))
    assert r.status_code == 403 and r.json()["error"]["code"] == "management_key_required"
    r = await gateway.client.get("/api/keys", headers=auth(sk))
    assert r.status_code == 403 and r.json()["error"]["code"] == "management_key_required"
    assert await snapshot(gateway.services.db) == before


async def test_a_short_balance_with_payments_off_says_how_to_add_balance_and_never_suggests_x402(gateway):
    account, mk = await gateway.new_account(credit="40.00")
    response = await gateway.client.post(
        "/api/pools/alpha/subscribe", json={"blocks": ["europe"], "quantity": 1}, headers=auth(mk)
    )
    assert response.status_code == 402
    assert "payment-required" not in response.headers
    body = response.json()
    message = body["error"]["message"]
    assert "x402" not in response.text and "PAYMENT-SIGNATURE" not in response.text
    assert f"agent-gateway accounts credit {account} AMOUNT" in message and "9.00 USDC" in message
    assert body["shortfall"] == "9.00"
