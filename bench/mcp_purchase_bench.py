"""MCP purchase benchmark on a local anvil chain: subscribe_pool paid through /mcp, timed from the
first `tools/call` (answered with the x402 PaymentRequired) to the result with the sk_ key.

    .venv/bin/python bench/mcp_purchase_bench.py [--purchases 20]

Starts anvil with the test USDC and one gateway process (SQLite), opens one MCP session with the
official `mcp` client (Streamable HTTP) wrapped by the x402 SDK's x402MCPSession, makes one
warm-up purchase, then `--purchases` sequential ones."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from eth_account import Account
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from x402.mcp import x402MCPSession

from agent_gateway.testing.devchain import start_devchain
from agent_gateway.testing.processes import start_gateway
from load import percentile  # bench/load.py, beside this script
from purchase_bench import ORDER, POOLS  # the same pool and order as the HTTP purchase benchmark


async def buy(url: str, client: object, warmup: int, n: int) -> list[float]:
    times = []
    async with streamable_http_client(url + "/mcp") as (read, write, _):
        async with ClientSession(read, write) as session:
            await session.initialize()
            paying = x402MCPSession(session, client)  # type: ignore[arg-type]
            for i in range(warmup + n):
                started = time.perf_counter()
                result = await paying.call_tool("subscribe_pool", ORDER)
                elapsed = time.perf_counter() - started
                data = result.raw_result.structuredContent
                if result.is_error or not data["subscriptions"][0]["apiKey"].startswith("sk_"):
                    raise SystemExit(f"purchase failed: {result.content}")
                if i >= warmup:
                    times.append(elapsed)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--purchases", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="agw-bench-") as tmp, start_devchain(agents=1) as chain:
        work = Path(tmp)
        (work / "pools.toml").write_text(POOLS)
        env = {**chain.env(), "AGW_DATABASE_URL": f"sqlite:///{work / 'bench.db'}",
               "AGW_POOLS_FILE": str(work / "pools.toml"), "AGW_LOG_LEVEL": "WARNING"}
        gateway, url = start_gateway(env)
        try:
            wallet = Account.create()
            chain.fund(wallet.address, 10_000 * 10**6, 10**18)
            times = asyncio.run(buy(url, chain.x402_client(wallet.key.hex()), 1, args.purchases))
        finally:
            gateway.terminate()
            gateway.wait(10)
    ms = [t * 1000 for t in times]
    print(f"| MCP subscribe_pool, sequential | {args.purchases} | p50 {percentile(ms, .5):.1f} ms | "
          f"p90 {percentile(ms, .9):.1f} ms | mean {statistics.fmean(ms):.1f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
