"""Buying seats in the dashboard: the review shows the API's price, the confirmed form buys through the
API's own service, and forged, bad, short or sold-out orders write nothing. SQLite and PostgreSQL."""

from __future__ import annotations

import html
import re
from urllib.parse import urlencode

import httpx
import pytest

from agent_gateway.catalog.pricing import make_order
from tests.conftest import auth
from tests.fixtures.state import balance, seats_held, snapshot

pytestmark = pytest.mark.anyio

SITE = "http://gateway.test"
ORIGIN = {"origin": SITE}


async def signed_in(gateway, mk: str) -> httpx.AsyncClient:
    client = gateway.client
    page = await client.get("/dashboard/signin")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    r = await client.post("/dashboard/signin", data={"csrf_token": token, "management_key": mk}, headers=ORIGIN)
    assert r.status_code == 303, r.text
    return client


def hidden_fields(page: str) -> dict[str, str]:
    return {name: html.unescape(value)
            for name, value in re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', page)}


async def review(client: httpx.AsyncClient, **order) -> httpx.Response:
    query = [("pool", order.get("pool", "alpha")), ("quantity", order.get("quantity", "1")),
             ("cycle", order.get("cycle", "month"))] + [("blocks", b) for b in order.get("blocks", ["europe"])]
    return await client.get("/dashboard/buy/review?" + urlencode(query))


async def test_review_shows_the_api_price_and_confirming_buys_through_the_same_service(gateway):
    account, mk = await gateway.new_account(credit="500.00")
    client = await signed_in(gateway, mk)
    form = await client.get("/dashboard/buy?pool=alpha")
    assert form.status_code == 200
    for block, hours, price in (("asia", "00:00-08:00", "39.00"), ("europe", "08:00-16:00", "49.00")):
        assert f'value="{block}"' in form.text and hours in form.text and f"{price} USDC" in form.text
    assert "Paused pool" not in form.text  # a paused pool is not offered

    before = await snapshot(gateway.services.db)
    page = await review(client, blocks=["europe", "asia"], quantity="2", cycle="year")
    # The exact total of the API's own pricing, next to the current balance; too much for it here.
    expected = make_order(gateway.services.catalog, "alpha", ["asia", "europe"], 2, "year").quote()
    assert expected["total"] == "1795.20"
    assert f'<dd id="order-total">{expected["total"]} USDC</dd>' in page.text
    assert '<dd id="order-balance">500.00 USDC</dd>' in page.text
    # Short by 1295.20: no confirm button, and how to add balance (payments are off: no x402).
    assert page.status_code == 402 and 'id="confirm-submit"' not in page.text
    message = html.unescape(re.search(r'id="short-balance">([^<]+)<', page.text).group(1))
    assert "Add at least 1295.20 USDC" in message and f"accounts credit {account} AMOUNT" in message
    assert "x402" not in page.text and "PAYMENT-SIGNATURE" not in page.text
    assert await snapshot(gateway.services.db) == before  # reviewing writes nothing

    page = await review(client, blocks=["europe"], quantity="2", cycle="month")
    assert 'id="confirm-submit"' in page.text and '<dd id="order-total">98.00 USDC</dd>' in page.text
    fields = hidden_fields(page.text)
    assert fields["total"] == "98000000"
    r = await client.post("/dashboard/buy", data=fields, headers=ORIGIN)
    assert r.status_code == 303 and r.headers["location"].startswith("/dashboard/subscriptions?bought=sub_")
    assert await balance(gateway.services.db, account) == 402_000_000
    assert await seats_held(gateway.services.db, "alpha", "europe") == 2
    listed = (await gateway.client.get("/api/subscriptions", headers=auth(mk))).json()["data"]
    assert len(listed) == 2 and all(s["blocks"] == ["europe"] and s["status"] == "active" for s in listed)

    subscriptions = await client.get(r.headers["location"])
    assert "Bought 2 seats on Alpha pool (europe) for 98.00 USDC" in html.unescape(subscriptions.text)
    for sub in listed:  # each new seat offers its key
        assert f'href="/dashboard/keys?subscription={sub["id"]}" data-action="mint"' in subscriptions.text
    keys = await client.get(f"/dashboard/keys?subscription={listed[1]['id']}")
    assert f'<option value="{listed[1]["id"]}" selected>' in keys.text


async def test_forged_buy_posts_are_refused_and_buy_nothing(gateway):
    _, mk = await gateway.new_account(credit="500.00")
    client = await signed_in(gateway, mk)
    fields = hidden_fields((await review(client)).text)
    before = await snapshot(gateway.services.db)
    forgeries = [
        ({k: v for k, v in fields.items() if k != "csrf_token"}, ORIGIN),
        ({**fields, "csrf_token": "x" * 43}, ORIGIN),
        (fields, {"origin": "http://evil.example"}),
        (fields, {}),
    ]
    for data, headers in forgeries:
        r = await client.post("/dashboard/buy", data=data, headers=headers)
        assert r.status_code == 403 and "Nothing was changed" in r.text
    assert await snapshot(gateway.services.db) == before


@pytest.mark.parametrize("order, shown", [
    ({"quantity": "0"}, "quantity must be between 1 and 100"),
    ({"quantity": "two"}, "Quantity must be a whole number"),
    ({"blocks": []}, "Choose at least one block"),
    ({"blocks": ["moon"]}, "Unknown block"),
    ({"cycle": "week"}, "billingCycle must be"),
    ({"pool": "resting"}, "paused and sells no seats"),
    ({"pool": "nope"}, "No pool"),
    ({"pool": "tiny", "quantity": "2"}, "Not enough seats left for 2 more (europe: 1 left)"),
])
async def test_bad_orders_are_explained_on_the_form_and_write_nothing(gateway, order, shown):
    _, mk = await gateway.new_account(credit="500.00")
    client = await signed_in(gateway, mk)
    before = await snapshot(gateway.services.db)
    page = await review(client, **order)
    assert page.status_code in (400, 404, 409) and 'id="buy-form"' in page.text
    assert shown in html.unescape(re.search(r'id="buy-error">([^<]+)<', page.text).group(1))
    assert 'id="confirm-submit"' not in page.text
    # The same order posted directly (a stale or hand-made form) is refused with the same reason.
    fields = {"csrf_token": hidden_fields(page.text)["csrf_token"], "pool": order.get("pool", "alpha"),
              "blocks": ",".join(order.get("blocks", ["europe"])), "quantity": order.get("quantity", "1"),
              "cycle": order.get("cycle", "month"), "total": "49000000"}
    r = await client.post("/dashboard/buy", data=fields, headers=ORIGIN)
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/buy"
    assert await snapshot(gateway.services.db) == before


async def test_a_balance_spent_or_seats_sold_between_review_and_confirm_buys_nothing(gateway):
    account, mk = await gateway.new_account(credit="60.00")
    client = await signed_in(gateway, mk)
    fields = hidden_fields((await review(client, blocks=["europe"])).text)
    await gateway.buy(mk, blocks=["europe"])  # the API spends the balance meanwhile
    before = await snapshot(gateway.services.db)
    r = await client.post("/dashboard/buy", data=fields, headers=ORIGIN)
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/buy"
    flash = html.unescape((await client.get("/dashboard/buy")).text)
    assert "Add at least 38.00 USDC" in flash and "x402" not in flash
    assert await snapshot(gateway.services.db) == before

    _, other = await gateway.new_account(credit="100.00")
    fields = hidden_fields((await review(client, pool="tiny")).text)
    await gateway.buy(other, pool="tiny", blocks=["europe"])  # the last seat goes to someone else
    before = await snapshot(gateway.services.db)
    r = await client.post("/dashboard/buy", data=fields, headers=ORIGIN)
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/buy"
    assert "Not enough seats left" in html.unescape((await client.get("/dashboard/buy")).text)
    assert await snapshot(gateway.services.db) == before
    assert await balance(gateway.services.db, account) == 11_000_000
