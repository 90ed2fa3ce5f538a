"""x402 purchase benchmark on a local anvil chain: 402 → 201 latency and purchases per second.

    .venv/bin/python bench/purchase_bench.py [--purchases 50] [--agents 10] [--per-agent 5]

Starts anvil with the test USDC and one gateway process (SQLite), then (1) makes `--purchases`
sequential purchases with the official x402 client, timing each from the first POST (answered
402) to the 201, and (2) lets `--agents` wallets buy `--per-agent` seats each, all at once.
Then (3) the same sequential purchases through a second gateway in facilitator mode
(AGW_FACILITATOR_URL, no relayer key), against the x402 SDK's own facilitator served over HTTP
from this process (agent_gateway.testing.facilitator), on the same chain."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from eth_account import Account
from x402.http.clients import x402HttpxClient

from agent_gateway.testing.devchain import start_devchain
from agent_gateway.testing.facilitator import TestFacilitator
from agent_gateway.testing.processes import start_gateway
from load import percentile  # bench/load.py, beside this script

POOLS = """
[blocks]
day = "00:00-24:00"

[pools.bench]
name = "Bench"
models = ["test-model"]
upstreams = ["http://127.0.0.1:9/v1"]
seats = 100000
prices = { day = "1.00" }
"""
ORDER = {"pool": "bench", "blocks": ["day"], "quantity": 1}


async def buy(url: str, client: Any, n: int) -> list[float]:
    times = []
    async with x402HttpxClient(client, base_url=url, timeout=60) as http:
        for _ in range(n):
            started = time.perf_counter()
            r = await http.post("/api/agent/subscribe-pool", json=ORDER)
            if r.status_code != 201:
                raise SystemExit(f"purchase failed: {r.status_code} {r.text}")
            times.append(time.perf_counter() - started)
    return times


def pct(values: list[float], q: float) -> float:
    return percentile(values, q) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--purchases", type=int, default=50)
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--per-agent", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="agw-bench-") as tmp, start_devchain(agents=1) as chain:
        work = Path(tmp)
        (work / "pools.toml").write_text(POOLS)
        env = {**chain.env(), "AGW_DATABASE_URL": f"sqlite:///{work / 'bench.db'}",
               "AGW_POOLS_FILE": str(work / "pools.toml"), "AGW_LOG_LEVEL": "WARNING"}
        gateway, url = start_gateway(env)
        try:
            wallets = [Account.create() for _ in range(args.agents + 1)]
            for wallet in wallets:
                chain.fund(wallet.address, 10_000 * 10**6, 10**18)
            # Warm up the gateway's connections and caches with one purchase.
            asyncio.run(buy(url, chain.x402_client(wallets[0].key.hex()), 1))
            sequential = asyncio.run(buy(url, chain.x402_client(wallets[0].key.hex()), args.purchases))

            async def crowd() -> float:
                started = time.perf_counter()
                await asyncio.gather(*(buy(url, chain.x402_client(w.key.hex()), args.per_agent) for w in wallets[1:]))
                return time.perf_counter() - started

            seconds = asyncio.run(crowd())
        finally:
            gateway.terminate()
            gateway.wait(10)
        with TestFacilitator(chain.rpc_url, chain.facilitator_key, [chain.network]) as facilitator:
            facilitated_env = {**env, "AGW_DATABASE_URL": f"sqlite:///{work / 'facilitated.db'}",
                               "AGW_RELAYER_KEY": "", "AGW_FACILITATOR_URL": facilitator.url}
            gateway, url = start_gateway(facilitated_env)
            try:
                asyncio.run(buy(url, chain.x402_client(wallets[0].key.hex()), 1))
                facilitated = asyncio.run(buy(url, chain.x402_client(wallets[0].key.hex()), args.purchases))
            finally:
                gateway.terminate()
                gateway.wait(10)
    total = args.agents * args.per_agent
    print(f"| sequential purchases | {args.purchases} | p50 {pct(sequential, .5):.1f} ms | "
          f"p99 {pct(sequential, .99):.1f} ms | mean {statistics.fmean(sequential) * 1000:.1f} ms |")
    print(f"| sequential purchases, facilitator | {args.purchases} | p50 {pct(facilitated, .5):.1f} ms | "
          f"p99 {pct(facilitated, .99):.1f} ms | mean {statistics.fmean(facilitated) * 1000:.1f} ms |")
    print(f"| {args.agents} agents at once | {total} | {total / seconds:.1f} purchases/s | "
          f"{seconds:.2f} s total | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
