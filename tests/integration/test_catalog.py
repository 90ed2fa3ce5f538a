"""The public catalog: pools, their blocks and prices, and the seats left in each block right now."""

import pytest

pytestmark = pytest.mark.anyio


def seats_left(pool: dict) -> dict[str, int]:
    return {b["block"]: b["availableSeats"] for b in pool["blocks"]}


async def plans_seats(gateway) -> dict[str, dict[str, int]]:
    plans = (await gateway.client.get("/api/agent/plans")).json()["data"]
    return {p["pool"]: seats_left(p) for p in plans["products"]}


async def test_the_catalog_describes_every_pool_without_a_key(gateway):
    response = await gateway.client.get("/api/pools")
    assert response.status_code == 200
    pools = {p["slug"]: p for p in response.json()["data"]}
    assert set(pools) == {"alpha", "tiny", "resting"}
    alpha = pools["alpha"]
    assert alpha["models"] == ["alpha-1", "alpha-2"] and alpha["status"] == "active"
    assert alpha["annualDiscount"] == "0.15" and alpha["minPricePerMonth"] == "39.00"
    assert {b["block"]: (b["hoursUtc"], b["pricePerMonth"]) for b in alpha["blocks"]} == {
        "asia": ("00:00-08:00 UTC", "39.00"),
        "europe": ("08:00-16:00 UTC", "49.00"),
        "americas": ("16:00-24:00 UTC", "45.00"),
    }
    assert seats_left(alpha) == {"asia": 3, "europe": 3, "americas": 3}
    assert pools["resting"]["status"] == "paused"
    # A pool sells only the blocks it prices.
    assert seats_left(pools["tiny"]) == {"europe": 1}

    one = await gateway.client.get("/api/pools/alpha")
    assert one.status_code == 200 and one.json()["data"] == alpha


async def test_seats_left_follow_purchases_in_both_catalogs(gateway):
    _, mk = await gateway.new_account(credit="500")
    await gateway.buy(mk, blocks=["europe", "asia"], quantity=2)
    await gateway.buy(mk, pool="tiny", blocks=["europe"])

    pools = {p["slug"]: p for p in (await gateway.client.get("/api/pools")).json()["data"]}
    assert seats_left(pools["alpha"]) == {"asia": 1, "europe": 1, "americas": 3}
    assert [b["status"] for b in pools["alpha"]["blocks"]] == ["limited", "limited", "available"]
    assert pools["tiny"]["blocks"][0]["status"] == "sold-out"

    plans = await plans_seats(gateway)
    assert plans["alpha"] == {"asia": 1, "europe": 1, "americas": 3}
    assert plans["tiny"] == {"europe": 0}


async def test_the_agent_plans_say_how_to_buy(gateway):
    plans = (await gateway.client.get("/api/agent/plans")).json()["data"]
    assert plans["currency"] == "USDC"
    alpha = next(p for p in plans["products"] if p["pool"] == "alpha")
    assert alpha["duration"] == "30 days"
    assert {b["block"]: b["priceUsdc"] for b in alpha["blocks"]} == {
        "asia": "39.00", "europe": "49.00", "americas": "45.00"}
    # This gateway has no chain configured: the plans offer no agent checkout (with payments on they
    # do: tests/e2e/test_payment_paths.py), and the endpoint says payments are off.
    assert plans["x402"] is False and "agentCheckout" not in alpha and "subscribe-pool" not in str(plans)
    answer = await gateway.client.post("/api/agent/subscribe-pool", json={"pool": "alpha", "blocks": ["asia"]})
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "payments_disabled"


async def test_an_unknown_pool_is_a_clear_404(gateway):
    response = await gateway.client.get("/api/pools/nope")
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "pool_not_found" and "GET /api/pools" in error["message"]
