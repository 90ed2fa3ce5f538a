"""Many long streams held at once by one gateway process: completion, RSS, added inter-chunk delay.

    .venv/bin/python bench/hold_bench.py [--streams 5000] [--rate 10] [--seconds 60] [--ramp 10]

Starts the test upstream pacing its chunks (1 / rate seconds apart, rate × seconds chunks per
stream) and one gateway process (SQLite, in-process leases) with one key per stream. Then, in the
same run, holds `--streams` streams at once twice: straight to the upstream (the baseline), then
through the gateway. The streams open spread over `--ramp` seconds (as clients arrive, so their
chunks are not all due at the same instant). Every content chunk's arrival time is kept; the
inter-chunk delay is the gap between two chunks of a stream. "Added" is the gateway's percentile
minus the baseline's. The gateway's RSS is sampled every 0.2 s, and its CPU is read before and
after. The load runs in `--clients` processes (default 2) so one event loop does not read all the
chunks. Prints a Markdown table and the JSON it was made from.

Check `ulimit -n` first: the gateway needs two descriptors per stream (client and upstream) and
each load process one per stream it holds."""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from array import array
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import proxy_bench  # noqa: E402  (a sibling script: its process helpers)

from agent_gateway.testing.processes import free_port, start_gateway  # noqa: E402

POOLS = """
[blocks]
day = "00:00-24:00"

[pools.bench]
name = "Bench"
models = ["test-model"]
upstreams = ["{upstream}/v1"]
seats = {seats}
prices = {{ day = "1.00" }}
"""
MARKER = b'"content":"'


def cpu_split(pid: int) -> tuple[float, float]:
    """A process's user and system CPU seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def hold(url: str, keys: list[str], chunks: int, ramp_s: float, offset: int, total: int,
         out: multiprocessing.Queue) -> None:
    """One load process: hold one stream per key; report completions and the inter-chunk gaps."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    import aiohttp

    gaps, steady = array("d"), array("d")
    # Gaps after every stream has opened (plus 2 s) are also kept apart: the steady state, without
    # the admissions of the ramp competing for the same event loop.
    steady_from = time.perf_counter() + ramp_s + 2.0
    body = json.dumps({"model": "test-model", "stream": True, "max_tokens": chunks,
                       "messages": [{"role": "user", "content": "hold"}]}).encode()

    async def one(session: aiohttp.ClientSession, index: int, key: str) -> str:
        await asyncio.sleep(ramp_s * (offset + index) / total)
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        try:
            async with session.post(url, data=body, headers=headers) as response:
                if response.status != 200:
                    return f"http {response.status}"
                seen, last = 0, 0.0
                async for data in response.content.iter_any():
                    now = time.perf_counter()
                    count = data.count(MARKER)
                    if count:
                        if seen:
                            # Chunks that arrive together follow each other with no gap.
                            arrived = [now - last] + [0.0] * (count - 1)
                            gaps.extend(arrived)
                            if now >= steady_from:
                                steady.extend(arrived)
                        seen += count
                        last = now
                return "ok" if seen == chunks else f"{seen} of {chunks} chunks"
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return type(exc).__name__

    async def run() -> list[str]:
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            return await asyncio.gather(*(one(session, i, key) for i, key in enumerate(keys)))

    results = asyncio.run(run())
    out.put((results, gaps.tobytes(), steady.tobytes()))


def run_holds(url: str, keys: list[str], chunks: int, ramp_s: float, clients: int,
              gateway_pid: int | None) -> dict:
    context = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue = context.Queue()
    shares = [keys[i::clients] for i in range(clients)]
    offsets = [0]
    for share in shares[:-1]:
        offsets.append(offsets[-1] + len(share))
    peak, stop = [0.0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            if gateway_pid is not None:
                peak[0] = max(peak[0], proxy_bench.rss_mb(gateway_pid))
            stop.wait(0.2)

    rss_before = proxy_bench.rss_mb(gateway_pid) if gateway_pid else 0.0
    cpu_before = cpu_split(gateway_pid) if gateway_pid else (0.0, 0.0)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    workers = [context.Process(target=hold, args=(url, share, chunks, ramp_s, offset, len(keys), queue))
               for share, offset in zip(shares, offsets)]
    for worker in workers:
        worker.start()
    results: list[str] = []
    gaps, steady = array("d"), array("d")
    for _ in workers:
        part, raw, raw_steady = queue.get()
        results += part
        gaps.frombytes(raw)
        steady.frombytes(raw_steady)
    for worker in workers:
        worker.join()
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    ordered, ordered_steady = sorted(gaps), sorted(steady)

    def pct(q: float, values: list[float] = ordered) -> float:
        return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")

    failures: dict[str, int] = {}
    for result in results:
        if result != "ok":
            failures[result] = failures.get(result, 0) + 1
    report = {"streams": len(keys), "completed": results.count("ok"), "failures": failures,
              "seconds": round(seconds, 1), "gaps": len(ordered),
              "gap_p50_ms": round(pct(0.50), 2), "gap_p99_ms": round(pct(0.99), 2),
              "gap_p999_ms": round(pct(0.999), 2), "gap_max_ms": round(ordered[-1] * 1000, 2) if ordered else None,
              "steady_gaps": len(ordered_steady), "steady_p50_ms": round(pct(0.50, ordered_steady), 2),
              "steady_p99_ms": round(pct(0.99, ordered_steady), 2),
              "steady_p999_ms": round(pct(0.999, ordered_steady), 2)}
    if gateway_pid:
        report.update(rss_before_mb=round(rss_before, 1), rss_peak_mb=round(peak[0], 1),
                      cpu_user_s=round(cpu_split(gateway_pid)[0] - cpu_before[0], 1),
                      cpu_sys_s=round(cpu_split(gateway_pid)[1] - cpu_before[1], 1),
                      cpu_per_chunk_us=round(sum(cpu_split(gateway_pid)) - sum(cpu_before), 3)
                      / max(1, len(ordered) + len(keys)) * 1e6)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=10.0, help="chunks per second per stream")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long each stream lasts")
    parser.add_argument("--ramp", type=float, default=10.0, help="open the streams over this many seconds")
    parser.add_argument("--clients", type=int, default=2, help="load processes")
    parser.add_argument("--log", type=Path, help="append the gateway's output to this file")
    opts = parser.parse_args()
    chunks = max(1, int(opts.rate * opts.seconds))
    with tempfile.TemporaryDirectory(prefix="agw-hold-") as tmp:
        work = Path(tmp)
        up_port, gw_port = free_port(), free_port()
        upstream = proxy_bench.start(["test-upstream", "--port", str(up_port), "--delay-ms", str(1000 / opts.rate)])
        up_url = f"http://127.0.0.1:{up_port}"
        (work / "pools.toml").write_text(POOLS.format(upstream=up_url, seats=opts.streams))
        env = {"AGW_DATABASE_URL": f"sqlite:///{work / 'bench.db'}", "AGW_POOLS_FILE": str(work / "pools.toml"),
               "AGW_LOG_LEVEL": "WARNING" if opts.log is None else "INFO",
               # One upstream connection per held stream; the client side's bound is 20,000.
               "AGW_UPSTREAM_MAX_CONNECTIONS": str(max(opts.streams, 1000)),
               "AGW_UPSTREAM_TOTAL_TIMEOUT_S": str(int(opts.seconds * 3 + 60))}
        processes = [upstream]
        try:
            proxy_bench.wait_http(up_url + "/v1/models", upstream)
            gateway, gateway_url = start_gateway(env, port=gw_port, log=opts.log)
            processes.append(gateway)
            keys = proxy_bench.provision_keys(gateway_url, env, opts.streams)
            direct = run_holds(up_url + "/v1/chat/completions", [f"direct-{i}" for i in range(opts.streams)],
                               chunks, opts.ramp, opts.clients, None)
            via = run_holds(gateway_url + "/v1/chat/completions", keys, chunks, opts.ramp, opts.clients, gateway.pid)
        finally:
            proxy_bench.stop(processes)
    print(report(opts, chunks, direct, via))
    print(json.dumps({"direct": direct, "gateway": via}))
    return 0


def report(opts: argparse.Namespace, chunks: int, direct: dict, via: dict) -> str:
    lines = [f"{opts.streams} streams held at once, {chunks} chunks each, {1000 / opts.rate:g} ms apart "
             f"(opened over {opts.ramp:g} s, {opts.clients} load processes), one gateway process:", "",
             "| path | completed | inter-chunk p50 / p99 / p99.9 / max ms, all | same, steady state (no max) | wall s | "
             "gateway RSS idle / peak MB | gateway CPU |",
             "|---|---|---|---|---|---|---|"]
    for name, row in (("direct", direct), ("gateway", via)):
        rss = f"{row['rss_before_mb']} / {row['rss_peak_mb']}" if "rss_peak_mb" in row else "—"
        cpu = (f"{row['cpu_user_s']} s user + {row['cpu_sys_s']} s system "
               f"({(row['cpu_user_s'] + row['cpu_sys_s']) / row['seconds'] * 100:.0f}% of a core; "
               f"{row['cpu_per_chunk_us']:.0f} µs per chunk)" if "cpu_user_s" in row else "—")
        lines.append(f"| {name} | {row['completed']}/{row['streams']} | {row['gap_p50_ms']} / {row['gap_p99_ms']} / "
                     f"{row['gap_p999_ms']} / {row['gap_max_ms']} | {row['steady_p50_ms']} / {row['steady_p99_ms']} / "
                     f"{row['steady_p999_ms']} | {row['seconds']} | {rss} | {cpu} |")
    lines.append("")
    lines.append(f"Added inter-chunk delay (gateway minus direct): p99 {via['gap_p99_ms'] - direct['gap_p99_ms']:.2f} ms "
                 f"over all gaps, {via['steady_p99_ms'] - direct['steady_p99_ms']:.2f} ms in the steady state "
                 f"(p99.9 {via['gap_p999_ms'] - direct['gap_p999_ms']:.2f} / "
                 f"{via['steady_p999_ms'] - direct['steady_p999_ms']:.2f} ms). "
                 f"Failures: direct {direct['failures'] or 'none'}, gateway {via['failures'] or 'none'}.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
