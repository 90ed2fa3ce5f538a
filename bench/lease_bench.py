"""Lease renewal cost in Redis: what holding N streams in flight costs at a given lease TTL.

    .venv/bin/python bench/lease_bench.py [--ttls 30,9] [--streams 1,1000,5000] [--redis URL]

Starts a private redis-server on a free port (so no other client's commands are counted; or use
--redis, on a Redis nobody else is using). For each TTL and each stream count it takes N leases
with the gateway's own RedisLeases, then renews each one every third of the TTL exactly as the relay
does for a running request (phases spread like streams that started at different moments), for
three renewal intervals. Redis's INFO commandstats and INFO cpu are read before and after the
window (after CONFIG RESETSTAT). Prints a Markdown table: commands per second in all and per
stream, Redis CPU, and this process's CPU per renewal (the client side, which a gateway process
pays for its own streams)."""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time

import redis

from agent_gateway.proxy.leases import AcquireResult, RedisLeases
from agent_gateway.testing.processes import free_port


def start_redis() -> tuple[subprocess.Popen, str, tempfile.TemporaryDirectory]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found; pass --redis URL")
    port = free_port()
    workdir = tempfile.TemporaryDirectory(prefix="agw-lease-bench-")
    process = subprocess.Popen([binary, "--port", str(port), "--save", "", "--appendonly", "no",
                                "--dir", workdir.name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                process.kill()
                raise SystemExit("redis-server did not start") from None
            time.sleep(0.05)
    return process, url, workdir


def redis_cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def script_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(int(stats.get(name, {}).get("calls", 0)) for name in ("cmdstat_evalsha", "cmdstat_eval"))


def idle_cpu_pct(url: str, seconds: float = 5.0) -> float:
    """Redis's own CPU with no client traffic (its timers), subtracted from the per-renewal figure."""
    admin = redis.Redis.from_url(url)
    cpu0, t0 = redis_cpu_s(admin), time.monotonic()
    time.sleep(seconds)
    cpu, elapsed = redis_cpu_s(admin) - cpu0, time.monotonic() - t0
    admin.close()
    return 100 * cpu / elapsed


async def measure(url: str, ttl_s: float, streams: int, intervals: int, idle_cpu_pct: float) -> dict:
    leases = RedisLeases(url, lease_ttl_ms=int(ttl_s * 1000), prefix=f"bench{secrets.token_hex(4)}")
    interval = leases.renew_interval_s
    admin = redis.Redis.from_url(url)
    held = []
    for start in range(0, streams, 500):
        results = await asyncio.gather(*(leases.acquire(f"key{i}") for i in range(start, min(streams, start + 500))))
        held.extend(lease for verdict, lease in results if verdict is AcquireResult.ACQUIRED)
    assert len(held) == streams, f"only {len(held)} of {streams} leases taken"
    lost = 0

    async def renew_loop(lease) -> None:  # noqa: ANN001
        nonlocal lost
        # A stream that started at a random moment within the last interval.
        await asyncio.sleep(random.uniform(0, interval))
        while True:
            if not await leases.renew(lease):
                lost += 1
                return
            await asyncio.sleep(interval)

    loops = [asyncio.create_task(renew_loop(lease)) for lease in held]
    await asyncio.sleep(interval)  # every stream is renewing: measure the steady state
    admin.config_resetstat()
    cpu0, client0, t0 = redis_cpu_s(admin), time.process_time(), time.monotonic()
    await asyncio.sleep(interval * intervals)
    calls, cpu = script_calls(admin), redis_cpu_s(admin) - cpu0
    seconds, client_cpu = time.monotonic() - t0, time.process_time() - client0
    for loop in loops:
        loop.cancel()
    await asyncio.gather(*loops, return_exceptions=True)
    for start in range(0, len(held), 500):
        await asyncio.gather(*(leases.release(lease) for lease in held[start:start + 500]))
    await leases.close()
    admin.close()
    return {"ttl_s": ttl_s, "interval_s": interval, "streams": streams, "seconds": seconds, "calls": calls,
            "per_s": calls / seconds, "per_stream_s": calls / seconds / streams,
            "redis_cpu_pct": 100 * cpu / seconds,
            "redis_cpu_us_per_call": 1e6 * max(0.0, cpu - idle_cpu_pct / 100 * seconds) / max(1, calls),
            "client_cpu_us_per_call": 1e6 * client_cpu / max(1, calls), "lost": lost}


def report(rows: list[dict]) -> str:
    lines = ["| lease TTL | renewal every | streams in flight | renewals/s | per stream/s | Redis CPU | "
             "Redis CPU per renewal | client CPU per renewal | leases lost |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['ttl_s']:g} s | {r['interval_s']:g} s | {r['streams']:,} | {r['per_s']:.1f} | "
                     f"{r['per_stream_s']:.3f} | {r['redis_cpu_pct']:.2f}% | {r['redis_cpu_us_per_call']:.1f} µs | "
                     f"{r['client_cpu_us_per_call']:.0f} µs | {r['lost']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ttls", default="30,9", help="lease TTLs in seconds, comma-separated")
    parser.add_argument("--streams", default="1,1000,5000", help="streams in flight, comma-separated")
    parser.add_argument("--intervals", type=int, default=3, help="renewal intervals per measurement window")
    parser.add_argument("--redis", metavar="URL", help="an existing Redis to use (nobody else's traffic on it)")
    opts = parser.parse_args()
    process = workdir = None
    url = opts.redis
    if url is None:
        process, url, workdir = start_redis()
    try:
        idle = idle_cpu_pct(url)
        rows = [asyncio.run(measure(url, float(ttl), int(n), opts.intervals, idle))
                for ttl in opts.ttls.split(",") for n in opts.streams.split(",")]
    finally:
        if process is not None:
            process.terminate()
            process.wait(10)
            workdir.cleanup()
    print(report(rows))
    print(f"\nRedis idle (no clients): {idle:.2f}% CPU, subtracted before dividing by the renewals.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
