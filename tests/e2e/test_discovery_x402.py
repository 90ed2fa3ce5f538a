"""Discovery with payments on (anvil): the x402 manifest lists the agent resource, every paid
route's 402 carries a bazaar extension the x402 SDK accepts, a bodyless probe is priced for the
default order, and a bodyless *paid* request is refused before any money moves."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from openapi_spec_validator import validate
from sqlalchemy import func, select
from x402.extensions.bazaar import (
    extract_discovery_info,
    validate_discovery_extension,
    validate_discovery_extension_spec,
)

from x402.extensions.bazaar.types import parse_discovery_extension

from agent_gateway.db.engine import Database
from agent_gateway.db.models import Payment
from tests.fixtures.live import LiveGateway, live_gateway
from tests.fixtures.x402 import X402_POOLS, ChainView, chain_settings, payment_header, sign_authorization

PUBLIC_URL = "https://gateway.example.com/agw"
AGENT = "/api/agent/subscribe-pool"


@pytest.fixture
def gateway(tmp_path: Path, sqlite_url: str, upstream, devchain) -> Iterator[LiveGateway]:  # type: ignore[no-untyped-def]
    with live_gateway(tmp_path, sqlite_url, upstream, pools=X402_POOLS, public_url=PUBLIC_URL,
                      **chain_settings(devchain)) as live:
        yield live


def required_of(response: httpx.Response) -> dict:
    assert response.status_code == 402, response.text
    return json.loads(base64.b64decode(response.headers["PAYMENT-REQUIRED"]))


def payment_count(database_url: str) -> int:
    async def count() -> int:
        db = Database(database_url)
        try:
            async with db.transaction() as session:
                return int((await session.execute(select(func.count()).select_from(Payment))).scalar_one())
        finally:
            await db.dispose()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, count()).result()


def assert_bazaar_describes_a_valid_order(http: httpx.Client, required: dict, path: str,
                                          headers: dict | None = None) -> dict:
    """The SDK accepts the extension, a facilitator would catalog the call, and its example body is
    an order this deployment prices at the challenged amount."""
    extension = required["extensions"]["bazaar"]
    assert validate_discovery_extension_spec(extension).valid, validate_discovery_extension_spec(extension).errors
    result = validate_discovery_extension(parse_discovery_extension(extension))
    assert result.valid, result.errors
    payload = {"x402Version": 2, "resource": required["resource"], "accepted": required["accepts"][0],
               "payload": {}, "extensions": required["extensions"]}
    found = extract_discovery_info(payload, required["accepts"][0])
    assert found is not None and found.method == "POST"
    template = extension.get("routeTemplate")  # catalogued as the template, under the public URL's origin
    url = required["resource"]["url"]
    assert found.resource_url == (url if template is None else "https://gateway.example.com" + template)
    call = extension["info"]["input"]
    assert call["bodyType"] == "json"
    # The schema is the route's own: it requires what the route requires.
    assert set(extension["schema"]["properties"]["input"]["properties"]["body"]["required"]) <= set(call["body"])
    again = required_of(http.post(path, json=call["body"], headers=headers or {}))
    assert again["accepts"][0]["amount"] == required["accepts"][0]["amount"]
    return call


def test_the_manifest_lists_the_agent_resource_and_mcp_from_the_public_url(gateway):
    for host in ["evil.example", "gateway.example.com.evil.example:8443"]:
        manifest = httpx.get(gateway.url + "/.well-known/x402", headers={"host": host}, timeout=30).json()
        assert manifest["version"] == 1
        assert manifest["resources"] == [PUBLIC_URL + AGENT]
        assert manifest["mcp"] == PUBLIC_URL + "/mcp"
        assert "evil.example" not in json.dumps(manifest)
    card = httpx.get(gateway.url + "/.well-known/agent-card.json", timeout=30).json()
    assert "x402" in json.dumps(card)
    assert f"POST {PUBLIC_URL}{AGENT}" in httpx.get(gateway.url + "/llms.txt", timeout=30).text
    front = httpx.get(gateway.url + "/", headers={"accept": "application/json"}, timeout=30).json()
    assert front["x402"] == PUBLIC_URL + "/.well-known/x402"
    document = httpx.get(gateway.url + "/openapi.json", timeout=30).json()
    validate(document)  # still valid OpenAPI 3.1 with the x402 parts in
    paid = document["paths"]
    for path in [AGENT, "/api/agent/renew", "/api/pools/{slug}/subscribe"]:
        operation = paid[path]["post"]
        assert operation["x-payment-info"]["protocols"] == ["x402"]
        assert operation["x-payment-info"]["price"]["mode"] == "dynamic"
        assert "402" in operation["responses"]


def test_a_bodyless_probe_gets_the_402_for_the_default_order(gateway):
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        required = required_of(http.post(AGENT))
        # One seat of alpha (the first active pool), its cheapest open block, one month: 10.00 USDC.
        assert required["accepts"][0]["amount"] == "10000000"
        assert required["resource"]["url"] == PUBLIC_URL + AGENT
        call = assert_bazaar_describes_a_valid_order(http, required, AGENT)
        assert call["body"] == {"pool": "alpha", "blocks": ["day"], "quantity": 1, "billingCycle": "month"}


def test_every_paid_route_402_carries_a_bazaar_extension_the_sdk_accepts(gateway):
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        order = {"pool": "one", "blocks": ["day"], "quantity": 1, "billingCycle": "month"}
        call = assert_bazaar_describes_a_valid_order(http, required_of(http.post(AGENT, json=order)), AGENT)
        assert call["body"] == order

        poor = {"Authorization": f"Bearer {gateway.new_account(credit_usdc=0)}"}
        managed = required_of(http.post("/api/pools/alpha/subscribe", json={"blocks": ["day"], "quantity": 2},
                                        headers=poor))
        call = assert_bazaar_describes_a_valid_order(http, managed, "/api/pools/alpha/subscribe", poor)
        assert call["pathParams"] == {"slug": "alpha"} and call["body"]["quantity"] == 2
        assert managed["extensions"]["bazaar"]["routeTemplate"] == "/agw/api/pools/:slug/subscribe"

        mk = gateway.new_account()
        gateway.new_key(mk)
        sub_id = http.get("/api/subscriptions", headers={"Authorization": f"Bearer {mk}"}).json()["data"][0]["id"]
        renewal = required_of(http.post("/api/agent/renew", json={"subscriptionId": sub_id}))
        call = assert_bazaar_describes_a_valid_order(http, renewal, "/api/agent/renew")
        assert call["body"] == {"subscriptionId": sub_id, "billingCycle": "month"}


def test_a_bodyless_paid_request_is_refused_before_any_settlement(gateway, devchain, chain_view: ChainView):
    agent = chain_view.new_wallet()
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        accepted = required_of(http.post(AGENT))["accepts"][0]
        authorization, signature = sign_authorization(devchain, agent.key, payer=agent.address,
                                                      to=accepted["payTo"], value=int(accepted["amount"]))
        before = (chain_view.usdc(agent.address), chain_view.usdc(devchain.pay_to), chain_view.relayer_nonce())
        r = http.post(AGENT, headers={"PAYMENT-SIGNATURE": payment_header(accepted, authorization, signature)})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "missing_body"
    assert (chain_view.usdc(agent.address), chain_view.usdc(devchain.pay_to), chain_view.relayer_nonce()) == before
    assert payment_count(gateway.settings.database_url) == 0
