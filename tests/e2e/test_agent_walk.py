"""The walk from nothing: an agent that knows only the gateway's base URL reads the discovery
manifest, finds the MCP server, buys a seat over MCP with x402, learns from the gateway how to
call it, and makes a chat completion. Beyond the x402 discovery convention (/.well-known/x402)
and the contract's tool names, nothing in the agent names a route: every URL comes from the
documents and the tools' answers."""

from __future__ import annotations

from decimal import Decimal

import httpx
import openai
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from x402.mcp import x402MCPSession

pytestmark = pytest.mark.anyio


async def test_an_agent_given_only_the_base_url_finds_buys_and_calls(x402_gateway, devchain, chain_view):
    base_url = x402_gateway.url
    wallet = chain_view.new_wallet()

    # 1. Discover: the x402 manifest names the MCP server (and the paid HTTP resource).
    async with httpx.AsyncClient() as http:
        manifest = (await http.get(f"{base_url}/.well-known/x402")).json()
    mcp_url = manifest["mcp"]
    assert mcp_url.startswith("http") and manifest["resources"], manifest

    async with streamable_http_client(mcp_url) as (read, write, _):
        async with ClientSession(read, write) as session:
            await session.initialize()
            tools = {tool.name: tool for tool in (await session.list_tools()).tools}
            # 2. Choose: the first pool with a seat left, its cheapest block that has one.
            pools = (await session.call_tool("list_pools", {})).structuredContent["pools"]
            pool, block = next((p, b) for p in pools for b in sorted(p["blocks"], key=lambda b: Decimal(b["pricePerMonth"]))
                               if b["availableSeats"] > 0)
            order = {"pool": pool["slug"], "blocks": [block["block"]], "quantity": 1}
            assert set(order) <= set(tools["subscribe_pool"].inputSchema["properties"])
            # 3. Buy: the x402 SDK's MCP client pays the challenge with the agent's wallet.
            paying = x402MCPSession(session, devchain.x402_client(wallet.key))
            bought = await paying.call_tool("subscribe_pool", {**order, "name": "walker"})
            assert bought.payment_made and not bought.is_error, bought.content
            api_key = bought.raw_result.structuredContent["subscriptions"][0]["apiKey"]
            # 4. Learn how to call it: the gateway's own snippets give the base URL; the key's status
            #    gives the models it may use.
            snippets = (await session.call_tool("connection_snippets", {"apiKey": api_key})).structuredContent
            status = (await session.call_tool("key_status", {"apiKey": api_key})).structuredContent

    assert status["inBlockNow"] is True
    with openai.OpenAI(base_url=snippets["baseUrls"]["openai"], api_key=api_key, max_retries=0) as client:
        reply = client.chat.completions.create(model=status["models"][0],
                                               messages=[{"role": "user", "content": "hello from nowhere"}])
    assert reply.choices[0].message.content
    # Paid exactly once, on-chain, from the agent's wallet.
    assert chain_view.usdc(wallet.address) == 100 * 10**6 - int(bought.raw_result.structuredContent["amountAtomic"])
