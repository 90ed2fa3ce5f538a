"""Key lookups while the usage writer writes: the database layer alone, no HTTP.

    .venv/bin/python bench/key_lookup_bench.py [--database URL] [--seconds 10] [--keys 64]

Creates `--keys` keys in a fresh SQLite file (or the given database), then for `--seconds` keeps
the usage recorder flushing 500-event batches back to back (what it does under load) while, every
50 ms, `--keys` lookups of keys the directory has not cached start at once (a client fleet
starting, or its cache entries expiring together). Prints one JSON line: the lookups' latency
p50/p99/max, how many took over 100 ms, and the batches written. On the code before the fix the
lookups took the write lock and queued behind the flushes in SQLite's busy handler."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent_gateway.db.engine import Database
from agent_gateway.db.migrate import upgrade_database
from agent_gateway.db.models import Account, Subscription, new_id
from agent_gateway.keys.api_keys import new_api_key
from agent_gateway.proxy.directory import KeyDirectory
from agent_gateway.usage.recorder import UsageEvent, UsageRecorder


async def make_keys(db: Database, count: int) -> list[tuple[str, str, str, str]]:
    """(plaintext, key id, account id, subscription id) of `count` active keys."""
    now = datetime.now(UTC)
    account = Account(id=new_id("acct"), name="bench", created_at=now)
    subs = [Subscription(id=new_id("sub"), account_id=account.id, pool_slug="bench", blocks=["day"],
                         billing_cycle="month", status="active", price_atomic=1, period_start=now,
                         period_end=now + timedelta(days=30), created_at=now) for _ in range(count)]
    minted = [new_api_key(account.id, sub.id, f"k{i}", now) for i, sub in enumerate(subs)]
    async with db.transaction() as session:
        session.add(account)
        await session.flush()
        session.add_all(subs)
        await session.flush()
        session.add_all([key for key, _ in minted])
    return [(token.plaintext, key.id, account.id, key.subscription_id) for key, token in minted]


async def run(url: str, seconds: float, count: int) -> dict:
    upgrade_database(url)
    db = Database(url)
    keys = await make_keys(db, count)
    usage = UsageRecorder(db)
    stop = asyncio.Event()
    batches = [0]

    async def writer() -> None:
        while not stop.is_set():
            for i in range(500):
                _, key_id, account_id, subscription_id = keys[i % len(keys)]
                usage.record(UsageEvent(key_id, account_id, subscription_id, "chat.completions", "test-model", 200,
                                        10, 16, 1.0, "upstream", datetime.now(UTC)))
            await usage.flush()
            batches[0] += 1

    latencies: list[float] = []

    async def one(directory: KeyDirectory, plaintext: str) -> None:
        started = time.perf_counter()
        assert await directory.lookup(plaintext) is not None
        latencies.append(time.perf_counter() - started)

    async def readers() -> None:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            directory = KeyDirectory(db)  # an empty cache: every lookup reads the database
            await asyncio.gather(*(one(directory, plaintext) for plaintext, *_ in keys))
            await asyncio.sleep(0.05)
        stop.set()

    await asyncio.gather(writer(), readers())
    await db.dispose()
    ms = sorted(x * 1000 for x in latencies)
    return {"lookups": len(ms), "p50_ms": round(ms[len(ms) // 2], 2), "p99_ms": round(ms[int(len(ms) * 0.99)], 2),
            "max_ms": round(ms[-1], 2), "over_100ms": sum(x > 100 for x in ms), "usage_batches": batches[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", help="a database URL (default: a fresh SQLite file)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--keys", type=int, default=64)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="agw-bench-") as tmp:
        url = opts.database or f"sqlite:///{Path(tmp) / 'bench.db'}"
        print(json.dumps(asyncio.run(run(url, opts.seconds, opts.keys))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
