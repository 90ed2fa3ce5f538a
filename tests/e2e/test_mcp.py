"""The MCP face at /mcp with real clients: the official MCP SDK lists and calls the tools, and the
x402 SDK's MCP client pays subscribe_pool on anvil and gets a key that works through the proxy."""

from __future__ import annotations

import base64
import json

import httpx
import openai
import pytest

from tests.fixtures.live import live_gateway
from tests.fixtures.x402 import X402_POOLS, chain_settings
from tests.fixtures.mcp import ORDER, mcp_session, x402_mcp_session

pytestmark = pytest.mark.anyio
PRICE = 10_000_000  # pool alpha of X402_POOLS: 10.00 USDC per seat
TOOLS = {"list_pools", "quote", "subscribe_pool", "renew_subscription", "key_status", "connection_snippets"}


@pytest.fixture
def paid_gateway(tmp_path, database_url, upstream, devchain):  # type: ignore[no-untyped-def]
    """A live gateway with payments on, on SQLite and on PostgreSQL."""
    with live_gateway(tmp_path, database_url, upstream, pools=X402_POOLS, **chain_settings(devchain)) as live:
        yield live


async def seats(url: str) -> int:
    async with httpx.AsyncClient(base_url=url) as http:
        return (await http.get("/api/pools/alpha")).json()["data"]["blocks"][0]["availableSeats"]


async def test_an_mcp_client_sees_every_tool_with_its_schemas(x402_gateway):
    async with mcp_session(x402_gateway.url) as session:
        tools = {tool.name: tool for tool in (await session.list_tools()).tools}
    assert set(tools) == TOOLS
    for tool in tools.values():
        assert tool.description and len(tool.description) > 40
        assert tool.inputSchema["type"] == "object" and tool.outputSchema and tool.outputSchema["type"] == "object"
    assert tools["subscribe_pool"].inputSchema["required"] == ["pool", "blocks"]
    assert set(tools["subscribe_pool"].inputSchema["properties"]) == {"pool", "blocks", "quantity", "billingCycle",
                                                                       "name"}
    assert tools["renew_subscription"].inputSchema["required"] == ["subscriptionId"]
    assert tools["key_status"].inputSchema["required"] == ["apiKey"]
    assert tools["list_pools"].inputSchema["properties"] == {}
    assert "x402/payment" in tools["subscribe_pool"].description


async def test_list_pools_quote_and_key_status_answer_as_the_api_does(x402_gateway, devchain):
    live = x402_gateway
    api_key, _ = live.new_key()
    with httpx.Client(base_url=live.url) as http:
        api_pools = http.get("/api/pools").json()["data"]
        r = http.post("/api/agent/subscribe-pool", json={**ORDER, "quantity": 2})
        http_required = json.loads(base64.b64decode(r.headers["PAYMENT-REQUIRED"]))
    async with mcp_session(live.url) as session:
        pools = await session.call_tool("list_pools", {})
        quote = await session.call_tool("quote", {**ORDER, "quantity": 2})
        status = await session.call_tool("key_status", {"apiKey": api_key})
        snippets = await session.call_tool("connection_snippets", {"apiKey": api_key})
    assert not pools.isError and pools.structuredContent == {"pools": api_pools, "paymentsEnabled": True}
    assert not quote.isError
    q = quote.structuredContent
    assert (q["total"], q["totalAtomic"], q["pricePerSeat"]) == ("20.00", str(2 * PRICE), "10.00")
    # The same requirements as the HTTP 402 (its resource names the tool, not the HTTP route).
    assert q["paymentRequired"]["accepts"] == http_required["accepts"]
    assert q["paymentRequired"]["resource"]["url"] == live.url + "/mcp#subscribe_pool"
    assert not status.isError
    s = status.structuredContent
    assert s["pool"] == "alpha" and s["models"] == ["test-model"] and [b["block"] for b in s["blocks"]] == ["day"]
    assert s["inBlockNow"] is True and s["expiresAt"].endswith("Z") and s["usage"]["24h"]["requests"] == 0
    assert not snippets.isError
    assert snippets.structuredContent["baseUrls"]["openai"] == live.url + "/v1"
    assert api_key in snippets.structuredContent["snippets"]["openaiPython"]


async def test_a_bad_key_or_a_bad_order_is_a_tool_error_naming_the_problem(x402_gateway):
    async with mcp_session(x402_gateway.url) as session:
        bad_key = await session.call_tool("key_status", {"apiKey": "sk_nope"})
        bad_pool = await session.call_tool("quote", {"pool": "nope", "blocks": ["day"]})
        bad_field = await session.call_tool("quote", {"pool": "alpha", "blocks": ["day"], "quantity": "2"})
    assert bad_key.isError and bad_key.structuredContent["error"]["code"] == "invalid_api_key"
    assert bad_pool.isError and bad_pool.structuredContent["error"]["code"] == "pool_not_found"
    assert bad_field.isError and bad_field.structuredContent["error"]["code"] == "invalid_field"
    assert "quantity" in bad_field.structuredContent["error"]["message"]


async def test_the_x402_mcp_client_pays_subscribe_pool_and_the_key_works(paid_gateway, devchain, chain_view):
    live = paid_gateway
    agent = chain_view.new_wallet()
    pay_to_before, seats_before = chain_view.usdc(devchain.pay_to), await seats(live.url)
    async with x402_mcp_session(live.url, devchain.x402_client(agent.key)) as session:
        result = await session.call_tool("subscribe_pool", {**ORDER, "name": "mcp-agent"})
    assert result.payment_made and not result.is_error, result.content
    receipt = result.payment_response
    assert receipt.success and receipt.network == devchain.network and receipt.transaction
    assert receipt.payer.lower() == agent.address.lower()
    data = result.raw_result.structuredContent
    assert (data["amount"], data["amountAtomic"]) == ("10.00", str(PRICE))
    assert data["managementKey"].startswith("mk_") and len(data["subscriptions"]) == 1
    # Settled on-chain for exactly the price; one seat gone.
    assert chain_view.usdc(agent.address) == 100 * 10**6 - PRICE
    assert chain_view.usdc(devchain.pay_to) == pay_to_before + PRICE
    assert await seats(live.url) == seats_before - 1
    sub = data["subscriptions"][0]
    assert sub["status"] == "active" and sub["apiKey"].startswith("sk_")
    with openai.OpenAI(base_url=live.url + "/v1", api_key=sub["apiKey"], max_retries=0) as client:
        stream = client.chat.completions.create(model="test-model", stream=True,
                                                messages=[{"role": "user", "content": "hi"}])
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text
    # A second purchase by the same wallet: its account exists, so no new management key.
    async with x402_mcp_session(live.url, devchain.x402_client(agent.key)) as session:
        again = await session.call_tool("subscribe_pool", ORDER)
    assert not again.is_error and again.raw_result.structuredContent["managementKey"] is None


async def test_renew_subscription_is_paid_the_same_way(paid_gateway, devchain, chain_view):
    live = paid_gateway
    agent = chain_view.new_wallet()
    async with x402_mcp_session(live.url, devchain.x402_client(agent.key)) as session:
        bought = await session.call_tool("subscribe_pool", ORDER)
        sub = bought.raw_result.structuredContent["subscriptions"][0]
        renewed = await session.call_tool("renew_subscription", {"subscriptionId": sub["id"]})
    assert renewed.payment_made and not renewed.is_error, renewed.content
    assert renewed.payment_response.success
    row = renewed.raw_result.structuredContent["subscriptions"][0]
    assert row["id"] == sub["id"] and row["currentPeriodEnd"] > sub["currentPeriodEnd"]
    assert chain_view.usdc(agent.address) == 100 * 10**6 - 2 * PRICE


async def test_with_payments_off_the_paid_tools_say_so(tmp_path, sqlite_url, upstream):
    with live_gateway(tmp_path, sqlite_url, upstream) as live:
        api_key, _ = live.new_key()
        async with mcp_session(live.url) as session:
            status = await session.call_tool("key_status", {"apiKey": api_key})
            paid = await session.call_tool("subscribe_pool", {"pool": "alpha", "blocks": ["day"]})
            renew = await session.call_tool("renew_subscription",
                                            {"subscriptionId": status.structuredContent["subscriptionId"]})
            quote = await session.call_tool("quote", {"pool": "alpha", "blocks": ["day"]})
    assert paid.isError and paid.structuredContent["error"]["code"] == "payments_disabled"
    assert renew.isError and renew.structuredContent["error"]["code"] == "payments_disabled"
    assert not quote.isError and quote.structuredContent["paymentRequired"] is None


async def test_the_paid_tools_challenge_carries_a_bazaar_extension_the_sdk_accepts(x402_gateway):
    """Called without payment, a paid tool's PaymentRequired is the HTTP 402's, bazaar extension
    included: its `mcp` call names the tool, its argument schema, and an example the tool accepts."""
    from x402.extensions.bazaar import validate_discovery_extension, validate_discovery_extension_spec
    from x402.extensions.bazaar.types import parse_discovery_extension

    async with mcp_session(x402_gateway.url) as session:
        unpaid = await session.call_tool("subscribe_pool", ORDER)
        assert unpaid.isError
        extension = unpaid.structuredContent["extensions"]["bazaar"]
        spec = validate_discovery_extension_spec(extension)
        assert spec.valid, spec.errors
        result = validate_discovery_extension(parse_discovery_extension(extension))
        assert result.valid, result.errors
        call = extension["info"]["input"]
        assert call["type"] == "mcp" and call["toolName"] == "subscribe_pool"
        assert set(call["inputSchema"]["properties"]) >= {"pool", "blocks", "quantity", "billingCycle"}
        # The example is a real order: quoting it prices exactly what the challenge asks.
        quoted = await session.call_tool("quote", call["example"])
        assert not quoted.isError
        assert quoted.structuredContent["totalAtomic"] == unpaid.structuredContent["accepts"][0]["amount"]
